"""Local Ray that ends with the command that started it, however that command ends.

``ray.init()`` without an address starts a local cluster as children of the calling process. Ray binds
the GCS server, the raylet, the dashboard and the monitors to it, so a SIGKILL of the command takes them
along; but the raylet starts the dashboard agent and the runtime-env agent (``include_dashboard=False``
does not stop the agent), and those outlive it: they notice that the raylet is gone, start to exit and
hang (Ray 2.60), keeping their ports, threads and memory until someone kills them.

:func:`start_ray` therefore first starts a reaper: a small process that Ray does not bind to the command,
in its own session (a Ctrl-C in the terminal does not reach it), that reads a pipe only the command holds
and keeps a list of the command's Ray processes and everything they start. When the pipe closes (the
command exited, was killed or crashed) it ends every listed process that still runs: SIGTERM, then SIGKILL
after a grace period. Processes are told apart by start time as well as pid, so a reused pid is never hit.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from typing import Any

import psutil

SCAN_SECONDS = 1.0  # how often the reaper lists new processes (workers start while a job runs)
GRACE_SECONDS = 3.0  # between SIGTERM and SIGKILL

_reaper: subprocess.Popen | None = None
_reaper_owner: int | None = None  # the pid that started it: a forked child needs its own


def start_ray(address: str | None, **options: Any) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start local Ray whose every process ends with
    this one. ``options`` go to ``ray.init``. True if this call initialised Ray (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        _start_reaper()
    ray.init(address=address, **options)
    if local:
        _request_scan()  # list the agents now, not up to a scan period later
    return True


def _start_reaper() -> None:
    global _reaper, _reaper_owner
    if _reaper is not None and _reaper_owner == os.getpid() and _reaper.poll() is None:
        return
    import ray

    _reaper = subprocess.Popen(
        [sys.executable, "-m", "subjectpairs.raycluster", str(os.getpid()), os.path.dirname(ray.__file__)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    _reaper_owner = os.getpid()


def _request_scan() -> None:
    try:
        _reaper.stdin.write(b"\n")
        _reaper.stdin.flush()
    except (AttributeError, OSError):
        pass  # no reaper (it failed to start or ended): Ray still runs, only the clean-up is missing


def _is_ray_process(process: psutil.Process, ray_dir: str) -> bool:
    try:
        command = process.cmdline()
    except psutil.Error:
        return False
    return bool(command) and (command[0].startswith("ray::") or any(ray_dir in part for part in command))


def _scan(driver: psutil.Process, ray_dir: str, tracked: dict[int, psutil.Process]) -> None:
    """Add the driver's new Ray processes and everything under the tracked ones; forget ended ones."""
    try:
        children = driver.children(recursive=True)
    except psutil.Error:
        children = []
    for process in children:
        if process.pid not in tracked and process.pid != os.getpid() and _is_ray_process(process, ray_dir):
            tracked[process.pid] = process
    _add_descendants(tracked)
    for pid in [pid for pid, process in tracked.items() if not process.is_running()]:
        del tracked[pid]


def _add_descendants(tracked: dict[int, psutil.Process]) -> None:
    for process in list(tracked.values()):
        try:
            for child in process.children(recursive=True):
                tracked.setdefault(child.pid, child)
        except psutil.Error:
            pass


def _end(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=GRACE_SECONDS)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=GRACE_SECONDS)


def reap(driver_pid: int, ray_dir: str) -> None:
    """Watch the driver's Ray processes until the pipe on stdin closes, then end those still running."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return
    tracked: dict[int, psutil.Process] = {}
    while True:
        readable, _, _ = select.select([0], [], [], SCAN_SECONDS)
        if readable and not os.read(0, 4096):
            break  # the driver is gone: its end of the pipe closed
        _scan(driver, ray_dir, tracked)
    # Once a raylet ends its children move to init, out of the driver's tree: only the tracked ones and
    # what they started remain to be found.
    _add_descendants(tracked)
    _end([process for process in tracked.values() if process.is_running()])


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2])
