"""Output guards: overlap with inputs, the output-folder lock, identifier grammars."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from subjectpairs.errors import InputError
from subjectpairs.guards import LOCK_FILE, OutputInUse, OutputLock, contains, refuse_overlap
from subjectpairs.identifiers import check_sample_key, is_image_id, is_label_mid, is_sample_key


def test_overlap_refuses_equal_inside_and_holding(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with pytest.raises(InputError, match="is --shards"):
        refuse_overlap(str(shards), {"--shards": str(shards)})
    with pytest.raises(InputError, match="lies inside --shards"):
        refuse_overlap(str(shards / "latents"), {"--shards": str(shards)})
    with pytest.raises(InputError, match="lies inside --out"):
        refuse_overlap(str(tmp_path), {"--shards": str(shards)})
    # the same folder spelled another way is still the same folder
    with pytest.raises(InputError):
        refuse_overlap(str(tmp_path / "x" / ".." / "shards") + "/", {"--shards": str(shards)})
    refuse_overlap(str(tmp_path / "latents"), {"--shards": str(shards), "--init": None})
    # a sibling whose name starts the same is not inside
    refuse_overlap(str(tmp_path / "shards-latents"), {"--shards": str(shards)})


def test_overlap_on_uris():
    assert contains("s3://bucket/pairs", "s3://bucket/pairs/latents")
    assert contains("s3://bucket/pairs/", "s3://bucket/pairs")
    assert not contains("s3://bucket/pairs", "s3://bucket/pairs-reviewed")
    assert not contains("s3://bucket/pairs", "gs://bucket/pairs/latents")
    with pytest.raises(InputError):
        refuse_overlap("s3://bucket/pairs/", {"--shards": "s3://bucket/pairs"})


def _hold_lock(out: str, ready, release) -> None:
    with OutputLock(out, "build"):
        ready.set()
        release.wait(30)


def test_lock_refuses_a_live_holder_and_is_released(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(OutputInUse, match=rf"in use by `subjectpairs build` \(pid {holder.pid}"):
            OutputLock(str(tmp_path), "compact").acquire()
    finally:
        release.set()
        holder.join(60)
    assert not (tmp_path / LOCK_FILE).exists()
    with OutputLock(str(tmp_path), "compact"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "compact"
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_folder_the_lock_made_goes_when_the_command_wrote_nothing(tmp_path):
    with OutputLock(str(tmp_path / "new" / "out"), "build"):
        pass  # e.g. an input error found under the lock
    assert not (tmp_path / "new" / "out").exists()
    with OutputLock(str(tmp_path / "kept"), "build"):
        (tmp_path / "kept" / "manifest.json").write_text("{}")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["manifest.json"]
    (tmp_path / "existing").mkdir()
    with OutputLock(str(tmp_path / "existing"), "build"):
        pass
    assert (tmp_path / "existing").is_dir()  # not ours to remove


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                  "command": "build", "started": "x", "token": "old"}))
    with OutputLock(str(tmp_path), "build") as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    # a torn lock (a process killed mid-write) is stale too
    (tmp_path / LOCK_FILE).write_text('{"pid": 12')
    with OutputLock(str(tmp_path), "build"):
        pass
    # a live process on another host is not ours to judge: refused
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "command": "build"}))
    with pytest.raises(OutputInUse, match="on elsewhere"):
        OutputLock(str(tmp_path), "build").acquire()


def test_lock_on_an_object_store(s3):
    with OutputLock("s3://corpus/pairs", "build"):
        assert s3.exists("corpus/pairs/" + LOCK_FILE)
        with pytest.raises(OutputInUse):
            OutputLock("s3://corpus/pairs", "build").acquire()
    assert not s3.exists("corpus/pairs/" + LOCK_FILE)


@pytest.mark.parametrize("value, ok", [
    ("000a1249af2bc5f0", True), ("a", True), ("scene-01_x", True), ("../../etc/passwd", False),
    ("/abs", False), ("a.b", False), ("", False), ("-lead", False), ("x" * 129, False), (None, False),
])
def test_image_id_grammar(value, ok):
    assert is_image_id(value) is ok


def test_mid_and_key_grammars():
    assert is_label_mid("/m/0bt9lr") and is_label_mid("/g/11b6p5x2d") and is_label_mid("custom_label")
    assert not is_label_mid("/m/../x") and not is_label_mid("/m/a.b") and not is_label_mid("/m//x")
    assert is_sample_key("000a1249af2bc5f0_0bt9lr") and not is_sample_key("a.b")
    assert not is_sample_key("../x") and not is_sample_key("/abs")
    with pytest.raises(ValueError, match="row 3: sample key '../x' is not valid"):
        check_sample_key("../x", "row 3")


def test_a_lock_being_written_is_never_taken_for_a_torn_one(tmp_path, monkeypatch):
    """A second command that looks while the first one writes its lock must not take the lock over too."""
    second: list[object] = []
    record = OutputLock._record

    def record_then_look(self):
        if self.command == "build":  # the first lock's record: another command starts right now
            other = OutputLock(str(tmp_path), "compact")
            try:
                other.acquire()
                second.append(other)
            except OutputInUse as exc:
                second.append(exc)
        return record(self)

    monkeypatch.setattr(OutputLock, "_record", record_then_look)
    first = OutputLock(str(tmp_path), "build")
    try:
        first.acquire()
        holders = [first]
    except OutputInUse:
        holders = []
    holders += [lock for lock in second if isinstance(lock, OutputLock)]
    assert len(holders) == 1
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == holders[0].token
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # no record left under a private name


def test_two_commands_taking_over_one_stale_lock_do_not_both_hold_it(tmp_path, monkeypatch):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                  "command": "build", "started": "x", "token": "old"}))
    read = OutputLock._read
    second: list[OutputLock] = []

    def read_then_race(self):
        holder = read(self)
        if self.command == "build" and not second:  # between judging the lock stale and removing it
            second.append(OutputLock(str(tmp_path), "compact"))
            second[0].acquire()
        return holder

    monkeypatch.setattr(OutputLock, "_read", read_then_race)
    with pytest.raises(OutputInUse, match="subjectpairs compact"):
        OutputLock(str(tmp_path), "build").acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == second[0].token


def test_a_process_we_may_not_inspect_is_alive(monkeypatch):
    from subjectpairs import guards

    def denied(pid):
        raise guards.psutil.AccessDenied(pid)

    monkeypatch.setattr(guards.psutil, "Process", denied)
    assert guards._pid_alive(os.getpid())
