"""Object-store inputs and outputs, against a local S3-compatible server."""

from __future__ import annotations

import json

import pytest

from conftest import box_row, write_boxes

@pytest.mark.slow
def test_filter_reads_and_writes_s3(tmp_path, classes_csv, mid, s3):
    local = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat")), box_row("b", mid("Cat"), group=1)])
    s3.put(str(local), "corpus/in/boxes.csv")
    s3.put(str(classes_csv), "corpus/in/classes.csv")
    from subjectpairs.curation.candidates import run_filter
    from subjectpairs.curation.config import FilterConfig

    s3.invalidate_cache()
    report = run_filter(FilterConfig(out="s3://corpus/out", bbox="s3://corpus/in/boxes.csv",
                                     classes="s3://corpus/in/classes.csv"))
    assert report.candidates.image_id.tolist() == ["a"]
    s3.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls("corpus/out")) == [
        "candidates.parquet", "config.yaml", "funnel.json"]
    assert json.loads(s3.cat("corpus/out/funnel.json"))["kept"] == 1


@pytest.mark.slow
def test_build_reads_photos_from_and_writes_shards_to_s3(tmp_path, s3):
    import ray

    from subjectpairs.pipelines.build import run_build
    from subjectpairs.pipelines.config import BuildConfig
    from subjectpairs.pipelines.demo import write_demo_data
    from subjectpairs.pipelines.shards import read_shard

    assert not ray.is_initialized()  # the build starts its own Ray, whose workers see the S3 settings
    filter_config, images, pool = write_demo_data(tmp_path, scenes=3, seed=5)
    from subjectpairs.curation.candidates import run_filter

    candidates = run_filter(filter_config).out_dir + "/candidates.parquet"
    for photo in images.iterdir():
        s3.put(str(photo), f"corpus/photos/{photo.name}")
    s3.put(candidates, "corpus/in/candidates.parquet")
    report = run_build(BuildConfig(
        out="s3://corpus/shards", candidates="s3://corpus/in/candidates.parquet", images="s3://corpus/photos/",
        pair={"segmenter": {"kind": "grabcut"}, "size": 128, "composite": {"backgrounds": [str(pool)]}},
        shards={"samples": 2}, max_tasks=2,
    ), show_progress=False)
    s3.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls("corpus/shards"))
    assert {"manifest.json", "rejects.parquet", "stats.json", "config.yaml"} <= set(names)
    shards = [s["name"] for s in report.manifest["shards"]]
    assert shards, report.rejects.to_string()
    assert set(shards) <= set(names) and report.manifest["pairs"] >= 3
    samples = [s for name in shards for s in read_shard(f"s3://corpus/shards/{name}")]
    assert len(samples) == report.manifest["pairs"]
    assert set(report.rejects["reason"]) == {"decode_error", "not_found"}


def test_fetch_uses_credentials_when_configured_and_records_forbidden_reads(s3):
    from subjectpairs.pipelines.config import FetchConfig
    from subjectpairs.pipelines.fetch import PhotoFetcher
    from subjectpairs.pipelines.rejections import PairRejected

    s3.pipe("corpus/photos/a.jpg", b"photo bytes")
    assert PhotoFetcher(FetchConfig()).fetch("s3://corpus/photos/a.jpg") == b"photo bytes"
    with pytest.raises(PairRejected) as raised:
        PhotoFetcher(FetchConfig(anonymous=True)).fetch("s3://corpus/photos/a.jpg")
    assert raised.value.reason == "read_error" and "Forbidden" in raised.value.detail
