"""Guards every command puts around its output folder: never write over an input, never share a folder
with another running command.

- :func:`refuse_overlap` stops a command whose output would be one of its inputs, lie inside an input
  folder, or hold an input, before anything is written (``latents --out`` equal to ``--shards`` once
  overwrote every pair shard).
- :class:`OutputLock` holds ``<out>/.subjectpairs.lock`` for the length of a run. A second command on the
  same folder stops with one line naming the holder; a lock left by a process that no longer runs on this
  host (a SIGKILL, a power cut) is recognised as stale and taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import psutil

from subjectpairs import storage
from subjectpairs.errors import InputError

LOCK_FILE = ".subjectpairs.lock"


def _location(uri: str) -> tuple[str, str]:
    """(protocol, normalized absolute path) of a local path or URI, for comparing places."""
    text = str(uri)
    if storage.is_remote(text):
        protocol, rest = text.split("://", 1)
        return protocol, "/" + posixpath.normpath(rest.strip("/"))
    return "file", os.path.realpath(os.path.expanduser(str(storage.local_path(text))))


def contains(folder: str, path: str) -> bool:
    """True when ``path`` is ``folder`` itself or lies anywhere under it."""
    (fp, fpath), (pp, ppath) = _location(folder), _location(path)
    if fp != pp:
        return False
    return ppath == fpath or ppath.startswith(fpath.rstrip("/") + "/")


def refuse_overlap(out: str, inputs: Mapping[str, str | None], out_flag: str = "--out") -> None:
    """Raise :class:`InputError` when ``out`` equals an input, lies inside one, or holds one.

    ``inputs`` maps the flag that named each input (for the message) to its path or URI; None is skipped.
    """
    for flag, uri in inputs.items():
        if not uri:
            continue
        if contains(uri, out):
            where = "is" if _location(uri) == _location(out) else "lies inside"
            raise InputError(f"{out_flag} {out} {where} {flag} {uri}: it would overwrite the input; "
                             "choose an output folder outside the inputs")
        if contains(out, uri):
            raise InputError(f"{flag} {uri} lies inside {out_flag} {out}: the output would overwrite or delete "
                             "the input; choose an output folder outside the inputs")


def output_entries(out: str) -> list[str]:
    """The names directly in an output folder, less its lock: what a command would write over or beside."""
    return [name for name in storage.list_folder(out) if not name.startswith(LOCK_FILE)]


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # another user's process that we may not inspect: it runs


class OutputInUse(InputError):
    """Another live process holds the output folder's lock."""


class OutputLock:
    """``<out>/.subjectpairs.lock`` held while a command writes into ``out`` (a context manager).

    Local folders get an exclusive create (the record is written under a private name and hard-linked into
    place, which fails when the lock exists), so two processes can never both hold it. Object
    stores have no such primitive that every backend offers: there the lock is written and read back, which
    catches a run that started earlier, not two that start in the same instant (docs/FORMAT.md).
    """

    def __init__(self, out: str, command: str) -> None:
        self.out = str(out)
        self.command = command
        self.uri = storage.join(self.out, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self._held = False
        self._made_folder = False

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token}).encode()

    def _read(self) -> dict | None:
        try:
            data = json.loads(storage.read_bytes(self.uri))
            return data if isinstance(data, dict) else {}
        except InputError:
            return None  # gone in the meantime
        except ValueError:
            return {}  # torn: written by a process that died mid-write

    def _stale(self, holder: dict) -> bool:
        """A lock of a process on this host that is gone, or one torn while being written."""
        if not holder:
            return True
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)

    def _refuse(self, holder: dict) -> OutputInUse:
        return OutputInUse(
            f"{self.out} is in use by `subjectpairs {holder.get('command', '?')}` (pid {holder.get('pid', '?')} "
            f"on {holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it to end, or remove "
            f"{self.uri} if that process is gone"
        )

    def acquire(self) -> None:
        if storage.is_remote(self.out):
            self._acquire_remote()
        else:
            self._acquire_local()
        self._held = True

    def _acquire_local(self) -> None:
        path = storage.local_path(self.uri)
        self._made_folder = not path.parent.exists()
        try:
            storage.make_folder(self.out)  # an --out that is or lies under a file: one line that says so
            # the record is written whole under a private name and linked into place: the lock never exists
            # half written, so a torn one can only be left by a process that died (and is rightly stale)
            written = path.with_name(f"{LOCK_FILE}.{self.token}")
            written.write_bytes(self._record())
        except OSError as exc:
            raise InputError(f"{self.out}: cannot write into the output folder ({exc.strerror})") from exc
        try:
            for _ in range(3):
                try:
                    os.link(written, path)
                    return
                except FileExistsError:
                    holder = self._read()
                    if holder is None:
                        continue
                    if not self._stale(holder):
                        raise self._refuse(holder) from None
                    self._remove_stale(path, holder)
        finally:
            written.unlink(missing_ok=True)
        raise InputError(f"{self.uri}: could not take the output folder's lock")

    def _remove_stale(self, path: Path, holder: dict) -> None:
        """Remove the stale lock ``holder`` read, unless another process took it over since: two processes
        that both judged it stale must not both remove it (the second would remove the first one's lock)."""
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)  # released by close, or by the kernel when a process dies
            if self._read() == holder:
                path.unlink(missing_ok=True)
        finally:
            os.close(folder)

    def _acquire_remote(self) -> None:
        if storage.exists(self.uri):
            holder = self._read()
            if holder is not None and not self._stale(holder):
                raise self._refuse(holder)
        storage.publish_bytes(self.uri, self._record())  # one whole put
        holder = self._read() or {}
        if holder.get("token") != self.token:
            raise self._refuse(holder)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        holder = self._read()
        if holder is None or holder.get("token") != self.token:
            return  # not ours any more: leave it
        storage.remove(self.uri)
        if self._made_folder:  # only ever a local folder
            # a command that stopped before writing anything leaves no empty folder it made behind
            with contextlib.suppress(OSError):  # not empty: the command's output is there
                storage.local_path(self.out).rmdir()

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
