"""The build job on a real local Ray: shards, manifest, rejects, determinism, resume, config guard."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from subjectpairs.configfile import hashed_settings
from subjectpairs.corpus.reader import read_shard
from subjectpairs.curation.candidates import run_filter
from subjectpairs.pipelines.build_plan import OutputInUse
from subjectpairs.pipelines.build import run_build
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.demo import write_demo_data

pytestmark = pytest.mark.slow
KEY = re.compile(r"^[0-9a-f]{16}_[0-9a-z_-]+$")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    filter_config, images, pool = write_demo_data(folder, scenes=6, seed=3)
    report = run_filter(filter_config)
    return {"candidates": str(Path(report.out_dir) / "candidates.parquet"), "images": str(images),
            "pool": str(pool), "count": report.funnel["kept"]}


def config_for(out: Path, inputs: dict, **changes) -> BuildConfig:
    settings = {
        "out": str(out), "candidates": inputs["candidates"], "images": inputs["images"],
        "pair": {"segmenter": {"kind": "grabcut"}, "size": 256, "composite": {"backgrounds": [inputs["pool"]]}},
        "shards": {"samples": 3}, "batch_size": 2,
    }
    for key, value in changes.items():
        *sections, name = key.split("__")
        target = settings
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    return BuildConfig.model_validate(settings)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("pairs-*.tar"))}


@pytest.fixture(scope="module")
def first_build(ray_local, demo_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "shards"
    report = run_build(config_for(out, demo_inputs), show_progress=False)
    return out, report


def test_a_chunk_builds_without_ray_into_the_same_shard_as_the_job(first_build, demo_inputs, tmp_path):
    """The chunk runner is the Ray task's whole work: run in this process, it writes the job's bytes."""
    from subjectpairs.pipelines.chunks import ChunkBuilder
    from subjectpairs.pipelines.shards import load_candidates, plan_chunks

    out, report = first_build
    config = config_for(tmp_path / "direct", demo_inputs)
    plan = plan_chunks(load_candidates(config.candidates, config.images), config.shards.samples)[0]
    record = ChunkBuilder(config).build(plan)
    assert [shard.name for shard in record.shards] == [report.manifest["shards"][0]["name"]]
    assert (tmp_path / "direct" / record.shards[0].name).read_bytes() == (out / record.shards[0].name).read_bytes()
    assert record.pairs + len(record.rejects) == len(plan.candidates)


def test_every_candidate_is_a_pair_or_a_recorded_rejection(first_build, demo_inputs):
    out, report = first_build
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = pd.read_parquet(out / "rejects.parquet")
    keys = [s["__key__"] for name in shard_bytes(out) for s in read_shard(str(out / name))]
    assert manifest["candidates"] == demo_inputs["count"] == len(keys) + len(rejects)
    assert len(keys) == len(set(keys)) == manifest["pairs"] and not set(keys) & set(rejects["key"])
    assert keys == sorted(keys) and all(KEY.match(k) for k in keys)
    assert set(rejects["reason"]) == {"decode_error", "not_found"}
    assert set(rejects["stage"]) == {"decode", "fetch"}
    assert all(rejects["detail"].str.len() > 0)


def test_shards_follow_the_format(first_build):
    out, _ = first_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == sorted(shard_bytes(out))
    for entry in manifest["shards"]:
        path = out / entry["name"]
        assert entry["bytes"] == path.stat().st_size and entry["samples"] <= 3
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o444 for m in members)
            assert [m.name for m in members] == sorted(m.name for m in members)
        for sample in read_shard(str(path)):
            assert set(sample) == {"__key__", "input.jpg", "target.jpg", "alpha.png", "trimap.png", "json"}
            meta = json.loads(sample["json"])
            assert meta["key"] == sample["__key__"] == f"{meta['image_id']}_{meta['label_mid'][3:]}"
            assert meta["config_hash"] == manifest["config_hash"] and meta["caption_source"] == "template"
            assert meta["captions"] == [f"a photo of a {meta['category'].lower()}"]
            assert meta["segmenter"]["name"] == "grabcut" and "seconds" not in meta
            assert set(meta["metrics"]) >= {"alpha_in_box", "matting_residual"}
            target = Image.open(io.BytesIO(sample["target.jpg"]))
            alpha = Image.open(io.BytesIO(sample["alpha.png"]))
            assert min(target.size) <= 256 and target.size == alpha.size == tuple(meta["size"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pairs"] == manifest["pairs"] and stats["rejects"] == {"decode_error": 1, "not_found": 1}
    assert {"fetch", "decode", "segment", "matting", "encode"} <= set(stats["stage_seconds"])
    assert yaml.safe_load((out / "config.yaml").read_text())["shards"]["samples"] == 3


def test_same_inputs_give_byte_identical_shards(first_build, demo_inputs, tmp_path):
    out, _ = first_build
    again = tmp_path / "again"
    run_build(config_for(again, demo_inputs), show_progress=False)
    assert shard_bytes(again) == shard_bytes(out)
    assert (again / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    assert (again / "rejects.parquet").read_bytes() == (out / "rejects.parquet").read_bytes()


def test_rerun_skips_whole_shards_and_rebuilds_damaged_or_missing_ones(first_build, demo_inputs, tmp_path):
    out, _ = first_build
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    names = sorted(shard_bytes(out))
    (copy / names[0]).write_bytes(b"garbage")  # damaged
    (copy / names[1]).unlink()  # lost
    report = run_build(config_for(copy, demo_inputs), show_progress=False)
    assert report.stats["chunks_resumed"] == report.stats["chunks"] - 2
    assert shard_bytes(copy) == shard_bytes(out)


def test_a_different_config_is_refused_unless_overwrite(first_build, demo_inputs, tmp_path):
    out = tmp_path / "guarded"
    run_build(config_for(out, demo_inputs, shards__samples=4), show_progress=False)
    with pytest.raises(OutputInUse, match="--overwrite"):
        run_build(config_for(out, demo_inputs, pair__seed=9), show_progress=False)
    report = run_build(config_for(out, demo_inputs, pair__seed=9), overwrite=True, show_progress=False)
    assert report.manifest["config_hash"] == config_for(out, demo_inputs, pair__seed=9).config_hash()
    assert all(p.name in {s["name"] for s in report.manifest["shards"]} for p in out.glob("pairs-*.tar"))


def test_runtime_settings_do_not_change_the_config_hash(demo_inputs, tmp_path):
    base = config_for(tmp_path / "a", demo_inputs)
    assert config_for(tmp_path / "b", demo_inputs, max_tasks=1).config_hash() == base.config_hash()
    assert config_for(tmp_path / "a", demo_inputs, pair__seed=1).config_hash() != base.config_hash()


def test_excluded_candidates_are_not_built_and_become_review_rejects(first_build, demo_inputs, tmp_path):
    import hashlib

    from subjectpairs.pipelines.compact import compact_shards

    out, report = first_build
    keys = [s["__key__"] for name in shard_bytes(out) for s in read_shard(str(out / name))]
    excluded = {keys[0], keys[-1]}
    exclude = tmp_path / "REJECTS.txt"
    exclude.write_text("# reviewers' rejects\n" + "\n".join(sorted(excluded)) + "\nffffffffffffffff_0zz\n")
    config = config_for(tmp_path / "excluded", demo_inputs, exclude=str(exclude))
    plain = config_for(tmp_path / "excluded", demo_inputs)
    assert config.config_hash() != plain.config_hash()
    # without an exclude file the hash is the one builds had before the setting existed
    settings = hashed_settings(plain)  # without the run-only fields
    del settings["exclude"]
    for name in ("deadline", "max_bytes", "max_redirects"):  # added later still, and at their defaults
        del settings["fetch"][name]
    settings["captioner"] = BuildConfig.UNUSED_CAPTIONER  # no BLIP-2
    assert plain.config_hash() == hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    built = run_build(config, show_progress=False)
    manifest = built.manifest
    assert manifest["candidates"] == report.manifest["candidates"] == manifest["pairs"] + manifest["rejects"]
    assert manifest["pairs"] == report.manifest["pairs"] - len(excluded)
    shards = {name: read_shard(str(tmp_path / "excluded" / name)) for name in shard_bytes(tmp_path / "excluded")}
    assert not {s["__key__"] for samples in shards.values() for s in samples} & excluded
    rejects = pd.read_parquet(tmp_path / "excluded" / "rejects.parquet")
    review = rejects[rejects["reason"] == "excluded"]
    assert set(review["key"]) == excluded and set(review["stage"]) == {"review"}
    assert all(str(exclude) in detail for detail in review["detail"])
    assert built.stats["rejects"]["excluded"] == len(excluded)

    # the other pairs keep their shards: the build and `shards compact` of the full build agree on every
    # shard and member, but for the config hash (the exclude file is part of the configuration)
    compacted = compact_shards(str(out), str(exclude), str(tmp_path / "compacted")).manifest
    assert [{k: v for k, v in s.items() if k not in ("bytes", "sha256")} for s in manifest["shards"]] == [
        {k: v for k, v in s.items() if k not in ("bytes", "sha256")} for s in compacted["shards"]
    ]
    for name, samples in shards.items():
        for ours, theirs in zip(samples, read_shard(str(tmp_path / "compacted" / name)), strict=True):
            ours_meta, theirs_meta = json.loads(ours.pop("json")), json.loads(theirs.pop("json"))
            assert ours == theirs
            assert ours_meta.pop("config_hash") == config.config_hash() != theirs_meta.pop("config_hash")
            assert ours_meta == theirs_meta
    expected = pd.read_parquet(tmp_path / "compacted" / "rejects.parquet")
    pd.testing.assert_frame_equal(rejects, expected)


def test_gated_pairs_are_quality_rejects_and_the_shards_are_those_without_them(first_build, demo_inputs, tmp_path):
    from statistics import median

    from subjectpairs.pipelines.compact import compact_shards

    out, report = first_build
    metas = {s["__key__"]: json.loads(s["json"]) for name in shard_bytes(out)
             for s in read_shard(str(out / name))}
    # a bound that only tightens the default one: the pairs below the median become quality rejects
    bound = median(meta["metrics"]["alpha_in_box"] for meta in metas.values())
    gated_keys = {key for key, meta in metas.items() if meta["metrics"]["alpha_in_box"] < bound}
    assert gated_keys
    builds = [run_build(config_for(tmp_path / name, demo_inputs, pair__quality__min_alpha_in_box=bound),
                        show_progress=False) for name in ("gated", "again")]
    for name in ("manifest.json", "rejects.parquet"):  # deterministic, gated candidates and all
        assert (tmp_path / "gated" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert shard_bytes(tmp_path / "gated") == shard_bytes(tmp_path / "again")
    built = builds[0]
    rejects = built.rejects.set_index("key")
    quality = rejects[rejects["stage"] == "quality"]
    assert set(quality.index) == gated_keys and set(quality["reason"]) == {"low_alpha_in_box"}
    for key, detail in quality["detail"].items():
        value = metas[key]["metrics"]["alpha_in_box"]
        assert detail == f"alpha_in_box {value:g} < {bound:g} (pair.quality.min_alpha_in_box)"
    assert built.stats["rejects"]["low_alpha_in_box"] == len(gated_keys)
    # by stage in the order candidates pass them: the build's funnel
    assert list(built.stats["rejects_by_stage"].items()) == [("fetch", 1), ("decode", 1), ("quality", len(gated_keys))]

    # the shards are those of the build without the gated candidates, as `shards compact` leaves them: the
    # same shards, samples and members, but for the config hash (the bound is part of the configuration)
    exclude = tmp_path / "gated.txt"
    exclude.write_text("\n".join(sorted(gated_keys)) + "\n")
    compacted = compact_shards(str(out), str(exclude), str(tmp_path / "compacted")).manifest
    assert [{k: v for k, v in s.items() if k not in ("bytes", "sha256")} for s in built.manifest["shards"]] == [
        {k: v for k, v in s.items() if k not in ("bytes", "sha256")} for s in compacted["shards"]
    ]
    for shard in built.manifest["shards"]:
        ours, theirs = (read_shard(str(tmp_path / folder / shard["name"])) for folder in ("gated", "compacted"))
        for sample, expected in zip(ours, theirs, strict=True):
            meta, expected_meta = json.loads(sample.pop("json")), json.loads(expected.pop("json"))
            assert sample == expected
            assert meta.pop("config_hash") == built.manifest["config_hash"] != expected_meta.pop("config_hash")
            assert meta == expected_meta
    assert list(rejects.index) == list(pd.read_parquet(tmp_path / "compacted" / "rejects.parquet")["key"])


def test_byte_cap_splits_a_chunk_into_parts(ray_local, demo_inputs, tmp_path):
    out = tmp_path / "capped"
    report = run_build(config_for(out, demo_inputs, shards__samples=50, shards__max_bytes=300_000),
                       show_progress=False)
    names = [s["name"] for s in report.manifest["shards"]]
    assert len(names) > 1 and names[0] == "pairs-000000.tar" and names[1] == "pairs-000000-1.tar"
    assert all(s["bytes"] <= 300_000 + 20_480 or s["samples"] == 1 for s in report.manifest["shards"])
    assert sum(s["samples"] for s in report.manifest["shards"]) == report.manifest["pairs"]


def test_sigkill_halfway_then_rerun_equals_an_uninterrupted_build(first_build, demo_inputs, tmp_path):
    out, _ = first_build
    config_file = tmp_path / "build.yaml"
    killed = tmp_path / "killed"
    settings = config_for(killed, demo_inputs, max_tasks=1).model_dump(mode="json")
    config_file.write_text(yaml.safe_dump(settings))
    command = [str(Path(sys.executable).parent / "subjectpairs"), "build", "--config", str(config_file)]
    env = dict(os.environ, RAY_ADDRESS="")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    progress = killed / ".progress"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (progress.exists() and any(progress.glob("*.json"))):
        time.sleep(0.2)
    assert process.poll() is None, "the build finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-build
    process.wait()
    assert not (killed / "manifest.json").exists()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout
    assert shard_bytes(killed) == shard_bytes(out)
    assert (killed / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    assert not list(killed.glob(".*partial*")) and not list(killed.glob("*.tmp-*"))


def test_candidates_without_a_photo_source_are_a_clear_error(tmp_path):
    table = pd.DataFrame({"image_id": ["a"], "label_mid": ["/m/01yrx"], "category": ["Cat"], "xmin": [0.1],
                          "xmax": [0.9], "ymin": [0.1], "ymax": [0.9]})
    table.to_parquet(tmp_path / "c.parquet")
    from subjectpairs.errors import InputError

    with pytest.raises(InputError, match="--images"):
        run_build(BuildConfig(out=str(tmp_path / "o"), candidates=str(tmp_path / "c.parquet")), show_progress=False)


def test_contact_sheet_shows_the_pairs(first_build, tmp_path):
    from subjectpairs.demo import contact_sheet

    out, report = first_build
    sheet = contact_sheet([str(out / s["name"]) for s in report.manifest["shards"]], tmp_path / "sheet.png", limit=4)
    image = np.asarray(Image.open(sheet))
    assert image.shape[0] == 4 * (128 + 4) and image.std() > 10


def test_photos_over_http_from_the_url_column(ray_local, demo_inputs, tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=demo_inputs["images"])
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        table = pd.read_parquet(demo_inputs["candidates"])
        table["url"] = [f"http://127.0.0.1:{httpd.server_address[1]}/{i}.jpg" for i in table.image_id]
        table.to_parquet(tmp_path / "with-urls.parquet")
        config = config_for(tmp_path / "http", demo_inputs, candidates=str(tmp_path / "with-urls.parquet"),
                            images=None, fetch={"retries": 1, "backoff": 0.01})
        report = run_build(config, show_progress=False)
    finally:
        httpd.shutdown()
    assert report.manifest["pairs"] == demo_inputs["count"] - 2
    assert dict(zip(report.rejects.reason, report.rejects.stage)) == {"decode_error": "decode", "http_404": "fetch"}
    sample = read_shard(str(tmp_path / "http" / report.manifest["shards"][0]["name"]))[0]
    assert json.loads(sample["json"])["source"].startswith("http://127.0.0.1:")


def test_a_faulty_image_server_ends_in_recorded_reasons_and_a_rerun_after_the_outage_equals_a_clean_build(
        ray_local, demo_inputs, tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    photos = Path(demo_inputs["images"])
    outage = threading.Event()

    class FaultyServer(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _reply(self, status: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/loop.jpg":
                self._reply(302, Location="/loop.jpg")
            elif self.path == "/to-file.jpg":
                self._reply(302, Location="file:///etc/passwd")
            elif self.path == "/endless.jpg":
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(10_000):  # 640 MB at most: the fetcher hangs up long before
                        self.wfile.write(bytes(65_536))
                except OSError:
                    pass
                self.close_connection = True
            elif self.path.startswith("/flaky/") and outage.is_set():
                self._reply(503)
            elif (photos / self.path.rsplit("/", 1)[-1]).is_file():
                self._reply(200, (photos / self.path.rsplit("/", 1)[-1]).read_bytes())
            else:
                self._reply(404)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FaultyServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = f"http://127.0.0.1:{httpd.server_address[1]}"
    table = pd.read_parquet(demo_inputs["candidates"]).sort_values("image_id").reset_index(drop=True)
    # row -> the reason its photo must end in; rows 0 and 1 are down during the outage, 7 and 8 are the
    # demo's undecodable and missing photos
    expected = {2: "bad_url", 3: "too_many_redirects", 4: "bad_redirect", 5: "too_large", 7: "decode_error",
                8: "http_404"}
    urls = [f"{server}/photos/{image_id}.jpg" for image_id in table.image_id]
    urls[0], urls[1] = (f"{server}/flaky/{image_id}.jpg" for image_id in table.image_id[:2])
    urls[2] = str(photos / f"{table.image_id[2]}.jpg")  # a local file named in the url column
    urls[3], urls[4], urls[5] = f"{server}/loop.jpg", f"{server}/to-file.jpg", f"{server}/endless.jpg"
    table["url"] = urls
    table.to_parquet(tmp_path / "faulty.parquet")
    fetch = {"retries": 1, "backoff": 0.01, "connect_timeout": 2, "read_timeout": 2, "deadline": 5,
             "max_bytes": 1_000_000, "max_redirects": 3}

    def build(name: str):
        return run_build(config_for(tmp_path / name, demo_inputs, candidates=str(tmp_path / "faulty.parquet"),
                                    images=None, fetch=fetch), show_progress=False)

    try:
        outage.set()
        started = time.monotonic()
        during = build("rerun")
        assert time.monotonic() - started < 120
        outage.clear()
        rerun = build("rerun")
        clean = build("clean")
    finally:
        httpd.shutdown()
    keys = [f"{image_id}_{mid[3:]}" for image_id, mid in zip(table.image_id, table.label_mid)]
    reasons = dict(zip(during.rejects.key, during.rejects.reason))
    assert reasons == {keys[0]: "http_5xx", keys[1]: "http_5xx",
                       **{keys[row]: reason for row, reason in expected.items()}}
    assert set(during.rejects.stage) == {"fetch", "decode"}
    assert rerun.stats["retried"] == 2 and rerun.stats["chunks_resumed"] == rerun.stats["chunks"] - 1
    assert dict(zip(rerun.rejects.key, rerun.rejects.reason)) == {k: r for k, r in reasons.items() if r != "http_5xx"}
    assert rerun.manifest["pairs"] == 3 and {keys[0], keys[1]} <= {
        s["__key__"] for name in shard_bytes(tmp_path / "rerun")
        for s in read_shard(str(tmp_path / "rerun" / name))}
    assert shard_bytes(tmp_path / "rerun") == shard_bytes(tmp_path / "clean")
    for name in ("manifest.json", "rejects.parquet"):
        assert (tmp_path / "rerun" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_clipseg_actor_serves_the_tasks_with_the_same_result(ray_local, demo_inputs, tiny_clipseg, tmp_path):
    # an untrained tiny model's maps are faint: a thin band keeps some foreground to compare pixels on, and
    # without the quality gate its poor mattes stay pairs
    clipseg = {"segmenter": {"kind": "clipseg", "model": str(tiny_clipseg), "device": "cpu"}, "size": 128,
               "trimap": {"band_px": 1, "cleanup_px": 0}, "composite": {"backgrounds": [demo_inputs["pool"]]},
               "quality": {"enabled": False}}
    in_task = run_build(config_for(tmp_path / "in-task", demo_inputs, pair=clipseg, segment_actors=0),
                        show_progress=False)
    served = run_build(config_for(tmp_path / "actor", demo_inputs, pair=clipseg, segment_actors=1),
                       show_progress=False)
    assert served.manifest == in_task.manifest and served.manifest["pairs"] > 0
    assert shard_bytes(tmp_path / "actor") == shard_bytes(tmp_path / "in-task")
    sample = read_shard(str(tmp_path / "actor" / served.manifest["shards"][0]["name"]))[0]
    assert json.loads(sample["json"])["segmenter"]["model"] == str(tiny_clipseg)


def test_auto_without_clipseg_warns_at_start_up_and_records_the_fallback(ray_local, demo_inputs, hub_cache, tmp_path,
                                                                          capsys):
    from subjectpairs.cli.build import build_summary
    from subjectpairs.pipelines.segmenters import NO_CLIPSEG

    out = tmp_path / "auto"
    warnings = []
    config = config_for(out, demo_inputs, pair__segmenter={"kind": "auto"}, pair__quality__enabled=False, limit=3)
    report = run_build(config, show_progress=False, warn=lambda line: warnings.append((line, out.exists())))
    ((warning, out_existed),) = warnings
    assert "fell back to GrabCut" in warning and not out_existed  # said once, before anything was written
    stats = json.loads((out / "stats.json").read_text())
    assert stats["segmenter"] == {"name": "grabcut", "requested": "auto", "reason": NO_CLIPSEG, "fallback": True}
    # the workers ran the GrabCut the driver resolved, and each pair says why
    metas = [json.loads(s["json"]) for shard in out.glob("pairs-*.tar") for s in read_shard(str(shard))]
    assert metas and all(meta["segmenter"]["why"] == NO_CLIPSEG for meta in metas)
    build_summary(report)
    assert "WARNING: segmenter: grabcut instead of CLIPSeg (auto: no CLIPSeg weights" in capsys.readouterr().err


def test_captions_come_from_the_file_then_the_captioner(ray_local, demo_inputs, tiny_blip2, tiny_clip,
                                                        tmp_path):
    table = pd.read_parquet(demo_inputs["candidates"]).sort_values("image_id")
    chosen = table.iloc[0]
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image_id": chosen.image_id, "label": chosen.category,
                                    "captions": ["a hand-written caption"]}) + "\n")
    config = config_for(tmp_path / "captioned", demo_inputs, captions=str(captions),
                        captioner={"model": str(tiny_blip2), "ranker": str(tiny_clip), "device": "cpu",
                                   "samples": 2, "min_length": 2, "max_new_tokens": 4})
    report = run_build(config, show_progress=False)
    metas = [json.loads(s["json"]) for shard in report.manifest["shards"]
             for s in read_shard(str(tmp_path / "captioned" / shard["name"]))]
    by_image = {meta["image_id"]: meta for meta in metas}
    assert by_image[chosen.image_id]["captions"] == ["a hand-written caption"]
    assert by_image[chosen.image_id]["caption_source"] == "captions.jsonl"
    # an untrained BLIP-2 never names the label, so CapFilt keeps the caption CLIP ranked first
    others = [meta for meta in metas if meta["image_id"] != chosen.image_id]
    assert others and all(meta["caption_source"] == f"blip2:{tiny_blip2}+clip:{tiny_clip}" for meta in others)
    assert all(len(meta["captions"]) == 1 and meta["captions"][0] for meta in others)


def test_the_filter_can_run_as_the_first_stage(ray_local, demo_inputs, tmp_path):
    folder = Path(demo_inputs["candidates"]).parents[1] / "openimages"
    config = config_for(tmp_path / "from-boxes", demo_inputs, candidates=None,
                        filter={"bbox": str(folder / "train-annotations-bbox.csv"),
                                "classes": str(folder / "class-descriptions-boxable.csv")})
    report = run_build(config, show_progress=False)
    assert (tmp_path / "from-boxes" / "candidates" / "candidates.parquet").exists()
    assert report.manifest["candidates"] == demo_inputs["count"]
    with pytest.raises(ValueError, match="either candidates"):
        config_for(tmp_path / "x", demo_inputs, filter={"bbox": "b.csv", "classes": "c.csv"})
    with pytest.raises(ValueError, match="rules"):
        config_for(tmp_path / "x", demo_inputs, candidates=None, filter={"bbox": "b", "classes": "c", "rules": 3})


def test_captioner_actor_gives_the_same_shards_as_captioning_in_the_task(ray_local, demo_inputs, tiny_blip2,
                                                                        tiny_clip, tmp_path):
    captioner = {"model": str(tiny_blip2), "ranker": str(tiny_clip), "device": "cpu", "samples": 2,
                 "min_length": 2, "max_new_tokens": 4}
    in_task = run_build(config_for(tmp_path / "in-task", demo_inputs, captioner=captioner, caption_actors=0),
                        show_progress=False)
    served = run_build(config_for(tmp_path / "actor", demo_inputs, captioner=captioner, caption_actors=1),
                       show_progress=False)
    assert served.manifest == in_task.manifest and served.manifest["pairs"] > 0
