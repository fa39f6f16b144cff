"""A worker node lost mid-build on a real multi-node Ray cluster costs retries, never samples."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from subjectpairs.corpus.reader import read_shard
from subjectpairs.curation.candidates import run_filter
from subjectpairs.pipelines.build import run_build
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.demo import write_demo_data

pytestmark = pytest.mark.slow


def build_config(out: Path, candidates: str, images: Path, pool: Path, **runtime) -> BuildConfig:
    return BuildConfig.model_validate({
        "out": str(out), "candidates": candidates, "images": str(images),
        "pair": {"segmenter": {"kind": "grabcut"}, "size": 192, "composite": {"backgrounds": [str(pool)]}},
        "shards": {"samples": 1}, **runtime,
    })


def test_losing_a_worker_node_loses_and_duplicates_nothing(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    filter_config, images, pool = write_demo_data(tmp_path, scenes=6, seed=11)
    candidates = str(Path(run_filter(filter_config).out_dir) / "candidates.parquet")
    reference = run_build(build_config(tmp_path / "reference", candidates, images, pool), show_progress=False)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    out = tmp_path / "cluster"
    progress = out / ".progress"
    removed = threading.Event()

    def kill_a_node_mid_build() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if progress.exists() and len(list(progress.glob("*.json"))) >= 2:
                cluster.remove_node(doomed, allow_graceful=False)
                removed.set()
                return
            time.sleep(0.05)

    # Two one-CPU nodes and two tasks in flight: while chunks remain, the doomed node is always mid-task.
    killer = threading.Thread(target=kill_a_node_mid_build)
    killer.start()
    try:
        report = run_build(build_config(out, candidates, images, pool, address=cluster.address, max_tasks=2),
                           show_progress=False)
    finally:
        killer.join()
        ray.shutdown()
        cluster.shutdown()
    assert removed.is_set(), "the node was not removed while the build ran"
    assert report.manifest["pairs"] + report.manifest["rejects"] == report.manifest["candidates"]
    keys = [s["__key__"] for shard in report.manifest["shards"] for s in read_shard(str(out / shard["name"]))]
    assert len(keys) == len(set(keys)) == report.manifest["pairs"]
    assert report.manifest == reference.manifest  # same shards, byte for byte (sha256 in the manifest)
