"""Local Ray ends with the command that started it, even when that command is SIGKILLed."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time

import psutil
import pytest

# Starts Ray as the commands do, runs a task (so a worker exists), then lists its own process tree.
DRIVER = """
import json, sys, time
import psutil, ray
from subjectpairs.raycluster import start_ray

start_ray(None, num_cpus=1, include_dashboard=False, logging_level="WARNING")
ray.get(ray.remote(lambda: 1).remote())
tree = [(p.pid, p.create_time(), " ".join(p.cmdline())) for p in psutil.Process().children(recursive=True)]
print(json.dumps(tree), flush=True)
time.sleep(600)
"""


def _still_running(pid: int, create_time: float) -> bool:
    try:
        process = psutil.Process(pid)
        return process.create_time() == create_time and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_every_process_of_local_ray_ends_when_the_driver_is_killed():
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(driver.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=180), "the driver did not start Ray in time"
        tree = json.loads(driver.stdout.readline())
    finally:
        driver.kill()
        driver.wait()
    commands = " ".join(command for _, _, command in tree)
    # the processes that outlived a killed driver before: started by the raylet, not bound to the driver
    assert "ray::DashboardAgent" in commands and "ray::RuntimeEnvAgent" in commands
    deadline = time.monotonic() + 30
    while (running := [command for pid, created, command in tree if _still_running(pid, created)]):
        assert time.monotonic() < deadline, f"still running 30 s after the driver was killed: {running}"
        time.sleep(0.5)
