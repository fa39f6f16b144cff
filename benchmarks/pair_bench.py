"""Per-pair synthesis benchmark, on one core.

Times the whole per-pair path that a CPU worker runs: decode the photo (JPEG bytes), trimap from a given
subject map, closed-form matting with the fast path, foreground colours, background load and
composite, and encoding of every member. The baseline in the same run swaps only the matting for the
naive full-image ``estimate_alpha_cf`` + ``estimate_foreground_ml``. Photos are scikit-image's real
photos, upscaled so the source is at least 1024 on the short side; the subject maps are GrabCut masks
softened like a CLIPSeg map (made before timing). Quality: SAD of the fast path against a full solve on
composites with a known alpha.

Targets: <= 0.15 s per pair at short side 512; >= 5x the baseline at 1024; SAD within 10% of the full
solve's (smooth edges and thin strands).

Usage: python benchmarks/pair_bench.py [--repeat 3] [--sizes 512 1024]
"""

from __future__ import annotations

import os

# One core per pair, as in the build job: set before numpy, numba or OpenCV start their thread pools.
for variable in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pymatting import estimate_alpha_cf, estimate_foreground_ml  # noqa: E402

from subjectpairs.pipelines.boxes import Box  # noqa: E402
from subjectpairs.pipelines.composite import BackgroundPool, blend  # noqa: E402
from subjectpairs.pipelines.config import PairConfig  # noqa: E402
from subjectpairs.pipelines.images import encode_jpeg, encode_png, to_uint8, to_unit_float  # noqa: E402
from subjectpairs.pipelines.known_alpha import CASES, known_alpha_composite  # noqa: E402
from subjectpairs.pipelines.matting import estimate_alpha  # noqa: E402
from subjectpairs.pipelines.pairs import PairRequest, finish, prepare  # noqa: E402
from subjectpairs.pipelines.sample_photos import SUBJECT_PHOTOS, TEXTURES, photo  # noqa: E402
from subjectpairs.pipelines.segmenter_grabcut import GrabCutSegmenter
from subjectpairs.pipelines.trimap import make_trimap  # noqa: E402

TARGET_SECONDS_512 = 0.15
TARGET_RATIO_1024 = 5.0
TARGET_SAD_RATIO = 1.10



def upscaled_jpeg(name: str, short_side: int = 1024) -> bytes:
    image = photo(name)
    scale = short_side / min(image.shape[:2])
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    buffer = io.BytesIO()
    Image.fromarray(cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def soft_subject_map(image: np.ndarray, box: Box) -> np.ndarray:
    """A GrabCut mask blurred to the softness of a CLIPSeg map upsampled from 352 px."""
    hard = GrabCutSegmenter().segment_one(image, box)
    return cv2.GaussianBlur(hard, (0, 0), 0.015 * min(image.shape[:2]))


def fast_pair(request: PairRequest, subject_map: np.ndarray, config: PairConfig, pool: BackgroundPool) -> dict:
    started = time.perf_counter()
    pair = finish(prepare(request, config), subject_map, config, pool, {"name": "given-map"})
    encode_started = time.perf_counter()
    pair.members()
    seconds = dict(pair.seconds, encode=time.perf_counter() - encode_started)
    return {"total": time.perf_counter() - started, **seconds}


def baseline_pair(request: PairRequest, subject_map: np.ndarray, config: PairConfig, pool: BackgroundPool) -> float:
    """The same path with the naive matting: full-image closed form and foreground, no crop, no rescale."""
    started = time.perf_counter()
    prepared = prepare(request, config)
    trimap, _ = make_trimap(subject_map, prepared.box, config.trimap)
    image = to_unit_float(prepared.target)
    with contextlib.redirect_stdout(io.StringIO()):
        alpha = estimate_alpha_cf(image, trimap / 255.0)
    foreground = to_uint8(estimate_foreground_ml(image, alpha))
    _, background = pool.background_for(config.seed, request.key, prepared.target.shape[:2])
    composite = blend(foreground, alpha, background)
    for encoded in (encode_jpeg(composite), encode_jpeg(prepared.target), encode_png(to_uint8(alpha)),
                    encode_png(trimap)):
        assert encoded
    return time.perf_counter() - started


def measure_size(size: int, repeat: int, pool: BackgroundPool, photos: dict[str, bytes]) -> dict:
    config = PairConfig(size=size)
    fast_runs, baseline_runs, stages = [], [], []
    print(f"\nshort side {size}: per pair, best of {repeat} (fast) / one run (baseline)")
    for name, category, box in SUBJECT_PHOTOS:
        request = PairRequest(key=f"{name}_{size}", category=category, photo=photos[name], box=box)
        subject_map = soft_subject_map(prepare(request, config).target, box)
        runs = [fast_pair(request, subject_map, config, pool) for _ in range(repeat)]
        best = min(runs, key=lambda run: run["total"])
        baseline = baseline_pair(request, subject_map, config, pool)
        fast_runs.append(best["total"])
        baseline_runs.append(baseline)
        stages.append(best)
        detail = ", ".join(f"{k} {v * 1000:.0f}" for k, v in best.items() if k != "total")
        print(f"  {name:<10} fast {best['total']:.3f} s ({detail} ms)   baseline {baseline:.2f} s"
              f"   {baseline / best['total']:.1f}x")
    fast_mean, baseline_mean = statistics.fmean(fast_runs), statistics.fmean(baseline_runs)
    print(f"  mean       fast {fast_mean:.3f} s   baseline {baseline_mean:.2f} s   {baseline_mean / fast_mean:.1f}x")
    return {"fast": fast_mean, "baseline": baseline_mean, "ratio": baseline_mean / fast_mean}


def measure_quality(size: int) -> float:
    """Worst SAD ratio (fast / full solve) over the known-alpha cases at ``size``."""
    worst = 0.0
    band = max(2, size // 128)
    for (subject, backdrop), strands in itertools.product(CASES, (False, True)):
        case = known_alpha_composite(size, subject, backdrop, band=band, strands=strands)
        fast, scale, _ = estimate_alpha(case.image, case.trimap, PairConfig().matting)
        with contextlib.redirect_stdout(io.StringIO()):
            full = estimate_alpha_cf(case.image, case.trimap / 255.0)
        ratio = case.sad(fast) / case.sad(full)
        worst = max(worst, ratio)
        edge = "strands" if strands else "smooth"
        print(f"  {subject}/{backdrop} {edge} at {size}: SAD fast {case.sad(fast):.0f} (scale {scale:.2f}) "
              f"vs full {case.sad(full):.0f} = {ratio:.3f}; MSE {case.mse(fast):.4f} vs {case.mse(full):.4f}")
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    photos = {name: upscaled_jpeg(name) for name, _, _ in SUBJECT_PHOTOS}
    with tempfile.TemporaryDirectory() as folder:
        for name in TEXTURES:
            Path(folder, f"{name}.jpg").write_bytes(upscaled_jpeg(name))
        pool = BackgroundPool.from_entries([folder])
        results = {size: measure_size(size, args.repeat, pool, photos) for size in args.sizes}
    print("\nmatting quality on known-alpha composites (fast path vs full closed-form solve)")
    worst_sad = max(measure_quality(size) for size in args.sizes)

    checks = []
    if 512 in results:
        checks.append((f"{results[512]['fast']:.3f} s per pair at 512", results[512]["fast"] <= TARGET_SECONDS_512,
                       f"<= {TARGET_SECONDS_512} s"))
    if 1024 in results:
        checks.append((f"{results[1024]['ratio']:.1f}x the baseline at 1024",
                       results[1024]["ratio"] >= TARGET_RATIO_1024, f">= {TARGET_RATIO_1024}x"))
    checks.append((f"worst SAD ratio {worst_sad:.3f}", worst_sad <= TARGET_SAD_RATIO, f"<= {TARGET_SAD_RATIO}"))
    print()
    for text, ok, target in checks:
        print(f"{'PASS' if ok else 'MISS'}  {text} (target {target})")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
