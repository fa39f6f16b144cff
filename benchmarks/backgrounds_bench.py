"""Background selection from OpenImages boxes against the subject filter on the same file.

The issue asks for "the same speed class as the filter" on the full 14.6M-row train file. Each run is a
fresh process (its own peak memory); the filter runs first so the background selection can exclude its
candidates, as users run it. Prints seconds, peak RSS and the ratio background / filter.

Usage: python benchmarks/backgrounds_bench.py [--rows N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from filter_bench import classes_file, ensure_file  # noqa: E402  (the cached synthetic box files)


def child(kind: str, bbox: str, out: str) -> None:
    started = time.perf_counter()
    if kind == "filter":
        from subjectpairs.curation.candidates import run_filter
        from subjectpairs.curation.config import FilterConfig

        result = run_filter(FilterConfig(bbox=bbox, classes=str(classes_file()), out=f"{out}/candidates"))
        kept = len(result.candidates)
    else:
        from subjectpairs.curation.config import BackgroundConfig
        from subjectpairs.curation.backgrounds import build_pool

        result = build_pool(BackgroundConfig(bbox=bbox, classes=str(classes_file()), image_root="s3://images",
                                             exclude_candidates=f"{out}/candidates/candidates.parquet",
                                             out=f"{out}/pool"))
        kept = int(result.funnel["selected"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_gb": peak, "kept": kept}))


def measure(kind: str, bbox: Path, out: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", kind, str(bbox), out],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=14_610_229)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    bbox = ensure_file(args.rows)
    with tempfile.TemporaryDirectory() as out:
        filtered = measure("filter", bbox, out)
        pool = measure("backgrounds", bbox, out)
    print(f"{args.rows:,} rows: filter {filtered['seconds']:.2f} s ({filtered['peak_gb']:.2f} GB, "
          f"{filtered['kept']:,} candidates); backgrounds {pool['seconds']:.2f} s ({pool['peak_gb']:.2f} GB, "
          f"{pool['kept']:,} selected); ratio {pool['seconds'] / filtered['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
