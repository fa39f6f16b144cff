"""Output folders: no command writes over its inputs, deletes what it did not write, or shares a folder
with another running command; what later commands read names its files absolutely."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from subjectpairs.corpus.manifest import ShardEntry
from subjectpairs.errors import InputError
from subjectpairs.guards import LOCK_FILE, OutputLock
from subjectpairs.pipelines.build_plan import prepare_output
from subjectpairs.pipelines.chunks import ChunkRecord
from subjectpairs.pipelines.build import run_build
from subjectpairs.pipelines.config import BuildConfig


def build_config(out: Path, **settings) -> BuildConfig:
    return BuildConfig.model_validate({"out": str(out), "candidates": "/data/candidates.parquet", **settings})


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.exists() else {}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_build(out: Path, config: BuildConfig, listed: list[str], recorded: list[str]) -> None:
    """The files of a build: config.yaml, a manifest listing ``listed``, a progress record of ``recorded``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    (out / "manifest.json").write_text(json.dumps({"shards": [{"name": name} for name in listed]}))
    for name in ("stats.json", "rejects.parquet"):
        (out / name).write_text("{}")
    (out / ".progress").mkdir()
    shards = [ShardEntry(name=name, samples=1, bytes=1, sha256="s", first_key="a", last_key="a") for name in recorded]
    record = ChunkRecord(1, "x", shards, 1, [])
    (out / ".progress" / "chunk-000001.json").write_text(record.to_json())
    for name in listed + recorded:
        (out / name).write_bytes(b"shard")


def test_overwrite_deletes_only_the_shards_the_earlier_build_recorded(tmp_path):
    out = tmp_path / "out"
    write_build(out, build_config(out), listed=["pairs-000000.tar", "../victim.tar"], recorded=["pairs-000001.tar"])
    (tmp_path / "victim.tar").write_bytes(b"not ours")
    (out / "pairs-000009.tar").write_bytes(b"no record names it")
    changed = build_config(out, pair={"seed": 9})
    with pytest.raises(InputError, match="--overwrite"):
        prepare_output(changed, overwrite=False)
    prepare_output(changed, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "pairs-000009.tar"]
    assert (tmp_path / "victim.tar").exists()
    assert BuildConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text())).config_hash() == \
        changed.config_hash()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_build_is_refused_with_or_without_overwrite(tmp_path, overwrite):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "pairs-000000.tar").write_bytes(b"someone's shard")
    (notes / "manifest.json").write_text("{}")
    (notes / "thesis.tex").write_text("months of work")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("# subjectpairs train\nshards: [x]\nout: run\n")
    (run / "metrics.jsonl").write_text("{}\n")
    for folder, why in ((notes, r"not a build's \(manifest.json, pairs-000000.tar, thesis.tex\)"),
                        (run, "config.yaml is not a build's")):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(InputError, match=why):
            prepare_output(build_config(folder), overwrite=overwrite)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_new_build_starts_in_an_empty_folder_or_beside_its_filter_stage(tmp_path):
    out = tmp_path / "out"
    (out / "candidates").mkdir(parents=True)
    (out / LOCK_FILE).write_text("{}")
    prepare_output(build_config(out), overwrite=False)
    # an unfinished build resumes: its shards, records and a killed run's staged files are its own
    (out / "pairs-000000.tar").write_bytes(b"")
    (out / ".pairs-000001.tar.partial").write_bytes(b"")
    (out / ".manifest.json.tmp-0123456789ab").write_bytes(b"")
    prepare_output(build_config(out), overwrite=False)


def test_a_second_build_into_a_folder_in_use_stops_naming_the_first(tmp_path):
    import pandas as pd

    candidates = tmp_path / "candidates.parquet"
    pd.DataFrame({"image_id": ["000a1249af2bc5f0"], "label_mid": ["/m/01yrx"], "category": ["Cat"], "xmin": [0.1],
                  "xmax": [0.9], "ymin": [0.1], "ymax": [0.9], "url": ["http://127.0.0.1:9/x.jpg"]}
                 ).to_parquet(candidates)
    out = tmp_path / "out"
    with OutputLock(str(out), "build"):
        with pytest.raises(InputError, match=r"in use by `subjectpairs build` \(pid \d+"):
            run_build(build_config(out, candidates=str(candidates)), show_progress=False)
    assert not out.exists()  # nothing written, not even config.yaml: the folder only the lock made is gone


def test_a_build_never_writes_over_its_inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    candidates = tmp_path / "filtered" / "candidates.parquet"
    for out, settings, flag in ((images, {}, "--images"), (tmp_path / "filtered", {}, "--candidates"),
                                (images / "pairs", {}, "--images"),
                                (tmp_path / "bg" / "x", {"pair": {"composite": {"backgrounds": [str(tmp_path / "bg")]}}},
                                 "--backgrounds"),
                                (tmp_path / "zoo", {"candidates": None, "filter": {"zoo_dir": str(tmp_path / "zoo")}},
                                 "--bbox")):
        config = build_config(out, **{"candidates": str(candidates), "images": str(images), **settings})
        with pytest.raises(InputError, match=flag):
            run_build(config, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no output folder, no lock was made


def test_a_build_config_names_local_files_absolutely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clipseg").mkdir()
    config = BuildConfig.model_validate({
        "out": "shards", "candidates": "c.parquet", "images": "photos", "exclude": "rejects.txt",
        "pair": {"composite": {"backgrounds": ["pool", "s3://bucket/bg"]}, "segmenter": {"model": "clipseg"}},
        "captioner": {"model": "Salesforce/blip2-opt-2.7b"},
    }).with_absolute_paths()
    assert (config.out, config.candidates, config.images, config.exclude) == tuple(
        str(tmp_path / name) for name in ("shards", "c.parquet", "photos", "rejects.txt"))
    assert config.pair.composite.backgrounds == [str(tmp_path / "pool"), "s3://bucket/bg"]
    assert config.pair.segmenter.model == str(tmp_path / "clipseg")
    assert config.captioner.model == "Salesforce/blip2-opt-2.7b"  # a hub id, not a path
    filtered = BuildConfig.model_validate({"out": "o", "filter": {"bbox": "b.csv", "classes": "s3://x/c.csv"}})
    assert filtered.with_absolute_paths().filter == {"bbox": str(tmp_path / "b.csv"), "classes": "s3://x/c.csv"}


def test_a_stale_lock_of_a_dead_build_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "command": "build"}))
    with OutputLock(str(out), "build") as lock:
        prepare_output(build_config(out), overwrite=False)
        assert json.loads((out / LOCK_FILE).read_text())["token"] == lock.token
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_the_filter_stores_absolute_filepaths_and_never_writes_into_its_zoo(tmp_path, monkeypatch, classes_csv, mid):
    from conftest import box_row, write_boxes
    from subjectpairs.curation.candidates import run_filter
    from subjectpairs.curation.config import FilterConfig

    split = tmp_path / "zoo" / "train"
    for folder in ("labels", "metadata", "data"):
        (split / folder).mkdir(parents=True)
    write_boxes(split / "labels" / "detections.csv", [box_row("aaaa", mid("Cat"))], train_format=False)
    (split / "metadata" / "classes.csv").write_bytes(classes_csv.read_bytes())
    (split / "data" / "aaaa.jpg").write_bytes(b"\xff\xd8")
    monkeypatch.chdir(tmp_path)
    report = run_filter(FilterConfig(out="out", zoo_dir="zoo"))
    assert report.candidates.filepath.tolist() == [str(split / "data" / "aaaa.jpg")]
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["zoo_dir"] == str(tmp_path / "zoo")
    for out in ("zoo", "zoo/train/filtered"):
        with pytest.raises(InputError, match="--zoo-dir|--bbox"):
            run_filter(FilterConfig(out=out, zoo_dir="zoo"))
    assert not (split / "filtered").exists() and not (tmp_path / "zoo" / "candidates.parquet").exists()
    with OutputLock(str(tmp_path / "out"), "filter"):
        with pytest.raises(InputError, match="in use by `subjectpairs filter`"):
            run_filter(FilterConfig(out="out", zoo_dir="zoo"))


@pytest.fixture
def compact_source(tmp_path):
    from test_compact import write_corpus

    source = tmp_path / "source"
    source.mkdir()
    made = write_corpus(source)
    exclude = tmp_path / "REJECTS.txt"
    exclude.write_text(made["keys"][0] + "\n")
    return source, exclude, made


def test_compact_never_replaces_another_build_or_foreign_files(compact_source, tmp_path):
    from test_compact import write_corpus

    from subjectpairs.pipelines.compact import compact_shards

    source, exclude, _ = compact_source
    other = tmp_path / "other-build"
    other.mkdir()
    manifest = write_corpus(other)["manifest"]
    (other / "manifest.json").write_text(json.dumps({**manifest, "config_hash": "d" * 64}))
    (other / "pairs-000007.tar").write_bytes(b"a shard of the other build no manifest lists")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("months of work")
    orphans = tmp_path / "orphans"
    orphans.mkdir()
    (orphans / "pairs-000000.tar").write_bytes(b"no manifest lists it")
    for out, why in ((other, "another build"), (notes, r"not a compaction's \(thesis.tex\)"),
                     (orphans, r"not a compaction's \(pairs-000000.tar\)"),
                     (source / "compacted", "lies inside the source folder"), (tmp_path, "lies inside --out")):
        before = files_in(out)
        with pytest.raises(InputError, match=why):
            compact_shards(str(source), str(exclude), str(out))
        assert files_in(out) == before


def test_compact_replaces_its_own_earlier_or_interrupted_run_and_deletes_only_what_it_listed(compact_source, tmp_path):
    from subjectpairs.pipelines.compact import RECORD_FILE, compact_shards

    source, exclude, made = compact_source
    out = tmp_path / "out"
    compact_shards(str(source), str(tmp_path / "REJECTS.txt"), str(out))
    clean = files_in(out)
    # a run stopped half way: its record names the shards it may have written, the manifest is gone
    (out / "manifest.json").unlink()
    (out / RECORD_FILE).write_text(json.dumps({"build": {k: v for k, v in made["manifest"].items() if k in (
        "version", "pipeline_version", "config_hash")}, "shards": ["pairs-000005.tar"]}))
    (out / "pairs-000005.tar").write_bytes(b"written by the stopped run")
    (out / "pairs-000009.tar").write_bytes(b"listed nowhere: not ours to delete")
    compact_shards(str(source), str(exclude), str(out))
    assert files_in(out) == {**clean, "pairs-000009.tar": b"listed nowhere: not ours to delete"}
    with OutputLock(str(out), "shards compact"):
        with pytest.raises(InputError, match="in use by `subjectpairs shards compact`"):
            compact_shards(str(source), str(exclude), str(out))


def test_a_background_pool_works_from_any_directory_and_never_lands_in_its_photos(tmp_path, monkeypatch):
    import pandas as pd
    from PIL import Image

    from subjectpairs.curation.config import BackgroundConfig
    from subjectpairs.curation.backgrounds import build_pool
    from subjectpairs.pipelines.composite import BackgroundPool

    made_in = tmp_path / "made-here"
    (made_in / "photos").mkdir(parents=True)
    Image.new("RGB", (64, 48), (20, 120, 40)).save(made_in / "photos" / "grass.jpg")
    monkeypatch.chdir(made_in)
    build_pool(BackgroundConfig(folder="photos", out="pool", min_side=32))
    for out in ("photos", "photos/pool"):
        with pytest.raises(InputError, match="--from-folder"):
            build_pool(BackgroundConfig(folder="photos", out=out, min_side=32))
    assert sorted(p.name for p in (made_in / "photos").iterdir()) == ["grass.jpg"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pool = BackgroundPool.from_entries([str(made_in / "pool")])
    assert pool.uris == (str(made_in / "photos" / "grass.jpg"),)
    uri, background = pool.background_for(0, "key", (32, 32))
    assert background.shape == (32, 32, 3)
    # a pool an earlier version wrote with relative paths is a clear error, not a build of background_errors
    table = pd.read_parquet(made_in / "pool" / "backgrounds.parquet")
    table.assign(uri="photos/grass.jpg").to_parquet(made_in / "pool" / "backgrounds.parquet")
    with pytest.raises(InputError, match="relative paths"):
        BackgroundPool.from_entries([str(made_in / "pool")])
    with OutputLock(str(tmp_path / "locked"), "backgrounds"):
        with pytest.raises(InputError, match="in use by `subjectpairs backgrounds`"):
            build_pool(BackgroundConfig(folder=str(made_in / "photos"), out=str(tmp_path / "locked")))


def test_latents_train_and_export_never_write_over_their_inputs(tmp_path):
    from subjectpairs.training.config import LatentsConfig, TrainConfig
    from subjectpairs.training.export import export_run
    from subjectpairs.training.latents import write_latents
    from subjectpairs.training.trainer import run_training

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "pairs-000000.tar").write_bytes(b"the pairs")
    (shards / "manifest.json").write_text("{}")
    before = files_in(shards)
    for out in (shards, shards / "latents", tmp_path):
        with pytest.raises(InputError, match="--shards"):
            write_latents(LatentsConfig(shards=[str(shards)], out=str(out), model="tiny"))
        with pytest.raises(InputError, match="--shards"):
            run_training(TrainConfig(shards=[str(shards)], out=str(out), model="tiny"), progress=False)
    (tmp_path / "model").mkdir()
    with pytest.raises(InputError, match="lies inside --init"):
        run_training(TrainConfig(shards=[str(shards)], out=str(tmp_path / "model" / "run"), init=str(tmp_path / "model")),
                     progress=False)
    assert not (tmp_path / "model" / "run").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"shards": [str(shards)], "out": "/gone/run", "model": "tiny"}))
    for out in (run, run / "exported"):
        with pytest.raises(InputError, match="RUN"):
            export_run(str(run), str(out))
    assert files_in(shards) == before and sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    with OutputLock(str(tmp_path / "latents"), "latents"):
        with pytest.raises(InputError, match="in use by `subjectpairs latents`"):
            write_latents(LatentsConfig(shards=[str(shards)], out=str(tmp_path / "latents"), model="tiny"))
    # a manifest the driver's data checks accept, so that the lock is what refuses
    (shards / "manifest.json").write_text(json.dumps({"shards": [{
        "name": "pairs-000000.tar", "samples": 1000, "first_key": "a", "last_key": "b"}]}))
    with OutputLock(str(tmp_path / "run2"), "train"):
        with pytest.raises(InputError, match="in use by `subjectpairs train`"):
            run_training(TrainConfig(shards=[str(shards)], out=str(tmp_path / "run2"), model="tiny", loader_workers=1),
                         progress=False)
