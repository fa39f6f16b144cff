"""Build-job benchmark: whole-job pairs/s per CPU worker on demo data, 1 worker against 2.

Each run starts a fresh local Ray with that many CPUs (not timed), builds the same demo candidates with
GrabCut into a new folder, and takes pairs / wall seconds of the build. Scaling efficiency =
(pairs/s with 2 workers / 2) / (pairs/s with 1). The projection for the 292K-pair corpus uses the
per-pair CPU seconds measured in the run without the GrabCut time, since a full build segments with CLIPSeg
on a GPU (about 7,800 images/s in bf16 on one H200, REFERENCE.md: far above what 64 cores consume).

Target: efficiency >= 0.8; under an hour for 292K pairs on a 64-core + 1-GPU node.

Usage: python benchmarks/build_bench.py [--scenes 160] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

CORPUS = 292_000
NODE_CORES = 64
TARGET_EFFICIENCY = 0.8


def measure(workers: int, candidates: str, images: str, pool: str, out: Path, progress: bool) -> dict:
    import ray

    from subjectpairs.pipelines.build import run_build
    from subjectpairs.pipelines.config import BuildConfig

    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}})
    try:
        config = BuildConfig.model_validate({
            "out": str(out), "candidates": candidates, "images": images,
            "pair": {"segmenter": {"kind": "grabcut"}, "composite": {"backgrounds": [pool]}},
            "shards": {"samples": 4}, "batch_size": 4,
        })
        # warm every worker (imports, numba cache load) on a throwaway build of the same data
        run_build(config.model_copy(update={"out": str(out) + "-warmup", "limit": 4 * workers}),
                  show_progress=progress)
        started = time.perf_counter()
        report = run_build(config, show_progress=progress)
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    stages = report.stats["stage_seconds"]
    pairs = report.manifest["pairs"]
    cpu_seconds = sum(stages.values())
    return {
        "workers": workers, "pairs": pairs, "wall": wall, "pairs_per_second": pairs / wall,
        "cpu_seconds_per_pair": cpu_seconds / pairs,
        "cpu_seconds_per_pair_without_grabcut": (cpu_seconds - stages.get("segment", 0.0)) / pairs,
        "stages": stages,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=160)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--progress", action="store_true", help="draw the progress bar, as the CLI does")
    args = parser.parse_args()

    from subjectpairs.curation.candidates import run_filter
    from subjectpairs.demo import write_demo_data

    with tempfile.TemporaryDirectory() as folder:
        filter_config, images, pool = write_demo_data(Path(folder), scenes=args.scenes, seed=0)
        candidates = str(Path(run_filter(filter_config).out_dir) / "candidates.parquet")
        runs = [measure(w, candidates, str(images), str(pool), Path(folder) / f"out-{w}", args.progress)
                for w in args.workers]

    for run in runs:
        stages = ", ".join(f"{k} {v / run['pairs'] * 1000:.0f}" for k, v in run["stages"].items())
        print(f"{run['workers']} worker(s): {run['pairs']} pairs in {run['wall']:.1f} s = "
              f"{run['pairs_per_second']:.2f} pairs/s ({run['pairs_per_second'] / run['workers']:.2f} per worker); "
              f"per pair ms: {stages}")
    base = runs[0]
    ok = True
    for run in runs[1:]:
        efficiency = (run["pairs_per_second"] / run["workers"]) / (base["pairs_per_second"] / base["workers"])
        ok &= efficiency >= TARGET_EFFICIENCY
        print(f"scaling {base['workers']} -> {run['workers']} workers: efficiency {efficiency:.2f} "
              f"(target >= {TARGET_EFFICIENCY})")
    per_pair = min(run["cpu_seconds_per_pair_without_grabcut"] for run in runs)
    core_hours = CORPUS * per_pair / 3600
    node_hours = core_hours / NODE_CORES
    print(f"projection for {CORPUS:,} pairs (CLIPSeg on GPU, {per_pair:.3f} CPU s per pair): "
          f"{core_hours:.1f} core-hours; {node_hours:.2f} h on a {NODE_CORES}-core + 1-GPU node "
          f"(target < 1 h)")
    ok &= node_hours < 1.0
    print("PASS" if ok else "MISS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
