"""`subjectpairs shards compact`: reviewers' rejects out, everything else byte for byte, deterministically.

The source corpora are written without Ray, by the build's own ChunkWriter (and, for a foreign writer,
by tests/pair_shards.py), and every shard is read back with Python's tarfile, independently of the code
under test.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from typer.testing import CliRunner

from pair_shards import write_pair_shards
from subjectpairs.cli import app
from subjectpairs.corpus.layout import read_exclude, sample_key
from subjectpairs.corpus.writer import ChunkWriter
from subjectpairs.errors import InputError
from subjectpairs.pipelines.compact import compact_shards
from subjectpairs.pipelines.rejections import Rejection
from subjectpairs.pipelines.shards import rejects_parquet

runner = CliRunner()
MEMBERS = ("input.jpg", "target.jpg", "alpha.png", "trimap.png", "json")
# chunk -> keys; chunk 1 is split into two parts by a small byte cap
CHUNKS = {0: 4, 1: 5, 2: 3}
PART_BYTES = 3 * 5 * 2048  # about three samples of five ~1 KiB members each


def members_for(key: str) -> dict[str, bytes]:
    seed = hashlib.sha256(key.encode()).digest()
    return {name: seed * (20 + len(name) + i) for i, name in enumerate(MEMBERS[:-1])} | {
        "json": json.dumps({"key": key}).encode()
    }


def write_corpus(folder: Path) -> dict:
    """Shards, manifest.json, rejects.parquet, stats.json and config.yaml laid out as the build writes them."""
    shards, keys = [], []
    for chunk, count in CHUNKS.items():
        writer = ChunkWriter(str(folder), chunk, PART_BYTES if chunk == 1 else 2_000_000_000)
        try:
            for index in range(count):
                key = sample_key(f"{chunk:08x}{index:08x}", f"/m/0{chunk}x{index}")
                writer.write(key, members_for(key))
                keys.append(key)
            shards += writer.publish()
        finally:
            writer.close()
    rejects = [Rejection(sample_key("0000000000000009", "/m/0dog"), "decode", "decode_error", "not a JPEG"),
               Rejection(sample_key("0000000100000009", "/m/0cat"), "fetch", "not_found", "gone")]
    _, reject_bytes = rejects_parquet(rejects)
    (folder / "rejects.parquet").write_bytes(reject_bytes)
    manifest = {
        "version": "0.1.0", "pipeline_version": 1, "config_hash": "c" * 64,
        "candidates": len(keys) + len(rejects), "pairs": len(keys), "rejects": len(rejects),
        "shards": [vars(shard) for shard in shards],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "stats.json").write_text(json.dumps({"pairs": len(keys), "wall_seconds": 1.5}, indent=2) + "\n")
    (folder / "config.yaml").write_text("# subjectpairs build\nout: somewhere\n")
    return {"keys": keys, "rejects": [r.key for r in rejects], "manifest": manifest}


def tar_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(member, tar.extractfile(member).read()) for member in tar.getmembers()]


def keys_of(path: Path) -> list[str]:
    return list(dict.fromkeys(member.name.partition(".")[0] for member, _ in tar_members(path)))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def corpus(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    return source, write_corpus(source)


@pytest.fixture
def rejected(corpus, tmp_path):
    """An exclude file: one key of pairs-000000, every key of pairs-000001 (so it is dropped), a key of
    pairs-000002, an earlier reject, two keys that are nowhere, comments and blank lines."""
    source, made = corpus
    by_shard = {entry["name"]: keys_of(source / entry["name"]) for entry in made["manifest"]["shards"]}
    assert list(by_shard) == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000001-1.tar", "pairs-000002.tar"]
    removed = {by_shard["pairs-000000.tar"][1], *by_shard["pairs-000001.tar"], by_shard["pairs-000002.tar"][-1]}
    unknown = {"ffffffffffffffff_0zz", "not-a-key"}
    path = tmp_path / "REJECTS.txt"
    path.write_text("# reviewer rejects\n\n" + "\n".join(sorted(removed)) + f"\n{made['rejects'][0]}  # again\n"
                    + "\n".join(sorted(unknown)) + "\n")
    return path, removed, unknown


def test_compact_removes_exactly_the_listed_pairs_and_keeps_every_other_member_byte(corpus, rejected, tmp_path):
    source, made = corpus
    exclude, removed, _ = rejected
    out = tmp_path / "out"
    report = compact_shards(str(source), str(exclude), str(out))
    assert report.removed == sorted(removed)
    assert report.dropped_shards == ["pairs-000001.tar"]
    assert not (out / "pairs-000001.tar").exists()
    assert sorted(p.name for p in out.glob("pairs-*.tar")) == [
        "pairs-000000.tar", "pairs-000001-1.tar", "pairs-000002.tar"
    ]
    for entry in made["manifest"]["shards"]:
        expected = [(m.name, data) for m, data in tar_members(source / entry["name"])
                    if m.name.partition(".")[0] not in removed]
        if not expected:
            continue
        written = tar_members(out / entry["name"])
        assert [(m.name, data) for m, data in written] == expected
        # the build's headers: sorted names, mtime 0, owner/group 0 with empty names, mode 0444, USTAR
        assert [m.name for m, _ in written] == sorted(m.name for m, _ in written)
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == ""
                   and m.mode == 0o444 and m.isfile() for m, _ in written)
    # a shard that lost nothing is the very same file
    untouched = out / "pairs-000001-1.tar"
    assert untouched.read_bytes() == (source / untouched.name).read_bytes()
    kept = [key for name in sorted(p.name for p in out.glob("pairs-*.tar")) for key in keys_of(out / name)]
    assert sorted(kept) == sorted(set(made["keys"]) - removed)


def test_manifest_and_rejects_describe_the_compacted_shards(corpus, rejected, tmp_path):
    source, made = corpus
    exclude, removed, unknown = rejected
    out = tmp_path / "out"
    report = compact_shards(str(source), str(exclude), str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == report.manifest
    before = made["manifest"]
    assert list(manifest) == list(before)  # the build's fields, in the build's order
    assert {k: manifest[k] for k in ("version", "pipeline_version", "config_hash")} == {
        k: before[k] for k in ("version", "pipeline_version", "config_hash")
    }
    assert manifest["candidates"] == before["candidates"] == manifest["pairs"] + manifest["rejects"]
    assert manifest["pairs"] == before["pairs"] - len(removed)
    assert manifest["rejects"] == before["rejects"] + len(removed)
    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        keys = keys_of(out / entry["name"])
        assert entry == {"name": entry["name"], "samples": len(keys), "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest(), "first_key": keys[0], "last_key": keys[-1]}
    assert sum(entry["samples"] for entry in manifest["shards"]) == manifest["pairs"]

    rejects = pd.read_parquet(out / "rejects.parquet")
    assert list(rejects.columns) == ["key", "stage", "reason", "detail"]
    assert list(rejects["key"]) == sorted(rejects["key"]) and len(rejects) == manifest["rejects"]
    original = pd.read_parquet(source / "rejects.parquet")
    assert original.merge(rejects).shape == original.shape  # every earlier reject row is still there
    review = rejects[rejects["stage"] == "review"]
    assert set(review["key"]) == removed and set(review["reason"]) == {"excluded"}
    assert all(str(exclude) in detail for detail in review["detail"])
    # an earlier reject listed again is not a second row, and keys that are nowhere are reported
    assert report.already_rejected == [made["rejects"][0]]
    assert report.not_found == sorted(unknown)
    for name in ("stats.json", "config.yaml"):
        assert (out / name).read_bytes() == (source / name).read_bytes()


def test_two_runs_are_byte_identical_and_a_rerun_leaves_no_stale_shard(corpus, rejected, tmp_path):
    source, _ = corpus
    exclude, _, _ = rejected
    compact_shards(str(source), str(exclude), str(tmp_path / "one"))
    compact_shards(str(source), str(exclude), str(tmp_path / "two"))
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    # into a folder an earlier compaction with fewer rejects wrote: pairs-000001.tar must go
    again = tmp_path / "again"
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("\n")
    compact_shards(str(source), str(fewer), str(again))
    assert (again / "pairs-000001.tar").exists()
    compact_shards(str(source), str(exclude), str(again))
    assert folder_bytes(again) == folder_bytes(tmp_path / "one")
    assert not [p for p in again.iterdir() if p.name.startswith(".")]


def test_an_empty_exclude_file_reproduces_a_build_exactly(corpus, tmp_path):
    source, _ = corpus
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing rejected yet\n")
    out = tmp_path / "out"
    report = compact_shards(str(source), str(empty), str(out))
    assert report.removed == [] and report.not_found == []
    for name, data in folder_bytes(source).items():
        if name != "rejects.parquet":  # the same rows; the bytes may differ only in pandas' metadata
            assert folder_bytes(out)[name] == data, name
    pd.testing.assert_frame_equal(pd.read_parquet(out / "rejects.parquet"), pd.read_parquet(source / "rejects.parquet"))


def test_shards_of_another_writer_come_out_in_the_builds_deterministic_format(tmp_path):
    dataset = write_pair_shards(tmp_path / "foreign", counts=(3, 4))
    exclude = tmp_path / "x.txt"
    exclude.write_text(dataset.all_keys[1] + "\n")
    compact_shards(str(dataset.folder), str(exclude), str(tmp_path / "a"))
    compact_shards(str(dataset.folder), str(exclude), str(tmp_path / "b"))
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    # the source manifest had shard entries only: the counts are filled in
    assert (manifest["candidates"], manifest["pairs"], manifest["rejects"]) == (7, 6, 1)
    for entry in manifest["shards"]:
        written = tar_members(tmp_path / "a" / entry["name"])
        assert all(m.mtime == 0 and m.uname == "" and m.mode == 0o444 for m, _ in written)
        source = {m.name: data for m, data in tar_members(dataset.folder / entry["name"])}
        assert all(source[m.name] == data for m, data in written)


def test_fsspec_uris_give_the_same_bytes_as_local_folders(corpus, rejected, tmp_path):
    source, _ = corpus
    exclude, _, _ = rejected
    fs = fsspec.filesystem("memory")
    root = "memory://compact-test"
    try:
        for path in source.iterdir():
            fs.pipe_file(f"/compact-test/source/{path.name}", path.read_bytes())
        fs.pipe_file("/compact-test/REJECTS.txt", exclude.read_bytes())
        report = compact_shards(f"{root}/source", f"{root}/REJECTS.txt", f"{root}/out")
        compact_shards(str(source), f"{root}/REJECTS.txt", str(tmp_path / "local"))
        remote = {path.rsplit("/", 1)[-1]: fs.cat_file(path) for path in fs.ls("/compact-test/out", detail=False)}
        assert remote == folder_bytes(tmp_path / "local")
        assert report.dropped_shards == ["pairs-000001.tar"]
    finally:
        fs.rm("/compact-test", recursive=True)


def test_a_shard_that_cannot_be_read_is_named_and_nothing_is_dropped_silently(corpus, rejected, tmp_path):
    source, made = corpus
    exclude, _, _ = rejected
    name = made["manifest"]["shards"][-1]["name"]
    data = (source / name).read_bytes()
    with tarfile.open(source / name) as tar:
        second_sample = [m.offset for m in tar.getmembers()][len(MEMBERS)]
    cases = {  # case: (the shard's bytes, what the error says)
        "not-a-tar": (b"\x17" * len(data), "cannot read this shard"),
        # tarfile takes a damaged header for the end of the archive, silently; the data after it tells
        "damaged-header": (data[:second_sample] + b"\x17" * 512 + data[second_sample + 512:], "after the end"),
        "damaged-member": (data[:600] + b"\x17" * 400 + data[1000:], "SHA-256 differs"),
        "cut-in-a-member": (data[:second_sample + 700], "cannot read this shard"),
        # a tar cut between samples reads as a shorter one: only the manifest's hash tells
        "cut-between-samples": (data[:second_sample], "SHA-256 differs"),
        "empty": (b"", "cannot read this shard"),
        "missing": (None, "not found"),
    }
    for case, (damaged, message) in cases.items():
        if damaged is None:
            (source / name).unlink()
        else:
            (source / name).write_bytes(damaged)
        out = tmp_path / case
        with pytest.raises(InputError, match=name) as raised:
            compact_shards(str(source), str(exclude), str(out))
        assert message in str(raised.value), (case, raised.value)
        assert not (out / "manifest.json").exists(), case
        result = runner.invoke(app, ["shards", "compact", str(source), "--exclude", str(exclude), "--out", str(out)])
        assert result.exit_code == 2 and name in result.output and "Traceback" not in result.output, raised
        (source / name).write_bytes(data)


def test_a_failed_run_removes_the_earlier_manifest_of_the_output(corpus, rejected, tmp_path):
    source, made = corpus
    exclude, _, _ = rejected
    out = tmp_path / "out"
    compact_shards(str(source), str(exclude), str(out))
    (source / made["manifest"]["shards"][-1]["name"]).write_bytes(b"broken")
    with pytest.raises(InputError):
        compact_shards(str(source), str(exclude), str(out))
    assert not (out / "manifest.json").exists()  # the shards there no longer match it


def test_cli_reports_removed_and_unknown_keys(corpus, rejected, tmp_path):
    source, _ = corpus
    exclude, removed, unknown = rejected
    out = tmp_path / "out"
    result = runner.invoke(app, ["shards", "compact", str(source), "--exclude", str(exclude), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"removed {len(removed)} pairs" in result.output
    assert f"{len(unknown)} listed keys are not in the corpus" in result.output
    assert "1 left empty and dropped" in result.output and "1 listed keys were already rejects" in result.output
    assert (out / "manifest.json").exists()


def test_cli_bad_input_is_one_clear_line_and_exit_code_2(corpus, rejected, tmp_path):
    source, _ = corpus
    exclude, _, _ = rejected

    def compact(*args: str):
        result = runner.invoke(app, ["shards", "compact", *args])
        assert "Traceback" not in result.output
        return result

    result = compact(str(source), "--exclude", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "missing.txt" in result.output and "not found" in result.output
    (tmp_path / "link").symlink_to(source)
    for same in (str(source), f"{source}/", f"{tmp_path}/./source", str(tmp_path / "link")):
        result = compact(str(source), "--exclude", str(exclude), "--out", same)
        assert result.exit_code == 2 and "source folder" in result.output
    result = compact(str(tmp_path / "nowhere"), "--exclude", str(exclude), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "manifest.json" in result.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{}")
    result = compact(str(tmp_path / "bad"), "--exclude", str(exclude), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "not a shard manifest" in result.output
    result = compact(str(source), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--exclude" in result.output
    assert not (tmp_path / "o").exists()
    assert compact("--help").exit_code == 0 and runner.invoke(app, ["shards", "--help"]).exit_code == 0


def test_the_trainer_reads_exclude_files_with_the_same_parser():
    """The build, `shards compact` and the trainer all take the exclude list from the corpus core."""
    import inspect

    from subjectpairs.pipelines import build_plan, compact
    from subjectpairs.training import trainer

    assert build_plan.read_exclude is compact.read_exclude is read_exclude
    assert "from subjectpairs.corpus.layout import read_exclude" in inspect.getsource(trainer)


def test_members_larger_than_the_read_buffers_pass_through_unchanged(tmp_path):
    source = tmp_path / "big"
    writer = ChunkWriter(str(source), 0, 2_000_000_000)
    try:
        for index, size in enumerate((3 << 20, 10, 1 << 20)):
            key = sample_key(f"{index:016x}", "/m/0big")
            writer.write(key, {"input.jpg": bytes(range(256)) * (size // 256 + 1), "json": b"{}"})
        shards = writer.publish()
    finally:
        writer.close()
    (source / "manifest.json").write_text(json.dumps({"shards": [vars(s) for s in shards]}))
    empty = tmp_path / "none.txt"
    empty.write_text("")
    compact_shards(str(source), str(empty), str(tmp_path / "out"))
    assert (tmp_path / "out" / "pairs-000000.tar").read_bytes() == (source / "pairs-000000.tar").read_bytes()
