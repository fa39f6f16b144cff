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
    from subjectpairs.demo import write_demo_data
    from subjectpairs.corpus.reader import read_shard

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
    # besides pairs the quality gate may reject: a corrupt photo and a missing one
    assert set(report.rejects.loc[report.rejects["stage"] != "quality", "reason"]) == {"decode_error", "not_found"}


def test_fetch_uses_credentials_when_configured_and_records_forbidden_reads(s3):
    from subjectpairs.pipelines.config import FetchConfig
    from subjectpairs.pipelines.fetch import PhotoFetcher
    from subjectpairs.pipelines.rejections import PairRejected

    s3.pipe("corpus/photos/a.jpg", b"photo bytes")
    assert PhotoFetcher(FetchConfig()).fetch("s3://corpus/photos/a.jpg") == b"photo bytes"
    with pytest.raises(PairRejected) as raised:
        PhotoFetcher(FetchConfig(anonymous=True)).fetch("s3://corpus/photos/a.jpg")
    assert raised.value.reason == "read_error" and "Forbidden" in raised.value.detail


def test_training_reads_shards_from_and_writes_the_run_to_s3(tmp_path, s3):
    import ray

    from pair_shards import write_pair_shards
    from subjectpairs.training.config import TrainConfig
    from subjectpairs.training.export import export_run
    from subjectpairs.training.trainer import run_training

    local = write_pair_shards(tmp_path / "pairs", counts=[6, 6]).folder
    s3.put(str(local) + "/", "corpus/pairs", recursive=True)
    settings = {"shards": ["s3://corpus/pairs"], "out": "s3://corpus/runs/first", "model": "tiny", "workers": 1,
                "loader_workers": 0, "batch_size": 2, "max_steps": 2, "checkpoint_every": 1}
    run_training(TrainConfig.model_validate(settings), progress=False)
    run_training(TrainConfig.model_validate({**settings, "max_steps": 3, "resume": True}), progress=False)
    assert not ray.is_initialized()  # the run started (and stopped) its own Ray, whose workers see S3
    s3.invalidate_cache()
    lines = s3.cat_file("corpus/runs/first/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert s3.exists("corpus/runs/first/step-00000003/trainable.safetensors")
    assert s3.exists("corpus/runs/first/base/model_index.json")
    export_run("s3://corpus/runs/first", str(tmp_path / "model"))
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_the_dreambench_evaluation_reads_the_benchmark_from_and_writes_to_s3(tmp_path, s3, tiny_clip, tiny_dino):
    """The benchmark and the evaluation folder on an object store, fine-tuned mode (whose model folders the
    workers write there and load back), and a rerun that finds everything done."""
    from pathlib import Path

    import pandas as pd
    import ray

    from subjectpairs.training.blip_diffusion import BlipDiffusion
    from subjectpairs.training.config import EvaluateConfig
    from subjectpairs.training.evaluation_job import run_evaluation

    bench = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambench"
    if not bench.is_dir():
        pytest.skip("the shared DreamBench subjects are not beside the checkout")
    s3.put(str(bench / "prompts_and_classes.txt"), "corpus/dreambench/prompts_and_classes.txt")
    s3.put(str(bench / "teapot") + "/", "corpus/dreambench/teapot", recursive=True)
    BlipDiffusion.from_config("tiny", seed=0).save_pretrained(tmp_path / "model")
    config = EvaluateConfig(model=str(tmp_path / "model"), dreambench="s3://corpus/dreambench",
                            out="s3://corpus/eval", images_per_prompt=1, steps=2, finetune_steps=1,
                            clip_model=str(tiny_clip), dino_model=str(tiny_dino))
    report = run_evaluation(config, progress=False)
    assert not ray.is_initialized()
    assert report.generated == 25 and report.summary["mode"] == "fine-tuned"
    s3.invalidate_cache()
    assert s3.exists("corpus/eval/finetuned/teapot/subject_embedding.safetensors")
    assert s3.exists("corpus/eval/images/teapot/24-seed0-0.png")
    with s3.open("corpus/eval/metrics.parquet", "rb") as stream:
        assert len(pd.read_parquet(stream)) == 25
    assert run_evaluation(config, progress=False).generated == 0
