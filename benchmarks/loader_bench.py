"""Training loader benchmark: samples/s of ``BatchReader`` at input 224 / target 512, in process and with
DataLoader workers.

Shards: ``--shards`` (a shard folder, a folder with manifest.json or a .tar, as the trainer takes them), by
default synthetic pair shards made once under benchmarks/.data/loader/: scikit-image's real photos at
short side 512 (the build's default target size), 4 shards of 160 samples written with the build's
shard writer and encoder settings, with alpha and trimap PNGs, json and manifest.json. The composite
member is the photo itself: the same size and JPEG settings, so it decodes at the same cost as a real
composite.

Each configuration reads one epoch of one rank (until a stream runs out) with a fresh reader; the first
batch (worker start and shuffle-buffer fill) is timed apart, the rate is over the batches after it.
Workers needed = the GPU's consumption rate over the per-worker rate of one worker, rounded up; on a
machine with fewer cores than workers the per-worker rate falls, so read it on the training nodes' cores.

Usage: python benchmarks/loader_bench.py [--shards DIR] [--workers 0 1 2] [--gpu-samples-per-s 100]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from subjectpairs.corpus.reader import resolve_shards
from subjectpairs.corpus.writer import ChunkWriter
from subjectpairs.pipelines.images import encode_jpeg, encode_png
from subjectpairs.pipelines.sample_photos import SUBJECT_PHOTOS, photo
from subjectpairs.training.data import BatchReader, StreamPosition

SHORT_SIDE = 512
SHARDS, SAMPLES_PER_SHARD = 4, 160  # enough for about 10 s per configuration on one core
DATA_DIR = Path(__file__).resolve().parent / ".data" / "loader" / f"{SHARDS}x{SAMPLES_PER_SHARD}"
MAX_SHARD_BYTES = 2_000_000_000


def photo_members(name: str, category: str, box) -> dict[str, bytes]:
    """A pair's members (without json) for one scikit-image photo brought to short side 512."""
    image = Image.fromarray(photo(name))
    scale = SHORT_SIDE / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    rgb = np.asarray(image)
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    height, width = alpha.shape
    rows = slice(round(box.ymin * height), round(box.ymax * height))
    alpha[rows, round(box.xmin * width):round(box.xmax * width)] = 255
    trimap = np.where(alpha > 0, 255, 0).astype(np.uint8)
    return {"input.jpg": encode_jpeg(rgb), "target.jpg": encode_jpeg(rgb), "alpha.png": encode_png(alpha),
            "trimap.png": encode_png(trimap)}


def make_shards(out: Path) -> None:
    """Synthetic pair shards and manifest.json in the build's layout (docs/FORMAT.md, Shards)."""
    photos = [(category, box, photo_members(name, category, box)) for name, category, box in SUBJECT_PHOTOS]
    shards = []
    for chunk in range(SHARDS):
        writer = ChunkWriter(str(out), chunk, MAX_SHARD_BYTES)
        try:
            for index in range(SAMPLES_PER_SHARD):
                category, box, members = photos[index % len(photos)]
                key = f"{chunk:08x}{index:08x}_bench"
                meta = {"key": key, "category": category, "box": [box.xmin, box.xmax, box.ymin, box.ymax],
                        "size": [SHORT_SIDE, SHORT_SIDE], "captions": [f"a photo of a {category.lower()}"]}
                writer.write(key, {**members, "json": json.dumps(meta).encode()})
            shards.extend(shard.model_dump() for shard in writer.publish())
        finally:
            writer.close()
    manifest = {"pairs": sum(s["samples"] for s in shards), "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def measure(shards: list, workers: int, batch_size: int, shuffle_buffer: int) -> dict:
    reader = BatchReader(shards, rank=0, world_size=1, num_workers=workers, batch_size=batch_size, seed=0,
                         input_size=224, target_size=512, exclude=frozenset(), latents=None,
                         shuffle_buffer=shuffle_buffer, position=StreamPosition())
    started = time.perf_counter()
    if reader.next_batch() is None:
        raise SystemExit("the shards give no full batch; give more samples or a smaller --batch-size")
    first = time.perf_counter()
    batches = 0
    while reader.next_batch() is not None:
        batches += 1
    seconds = time.perf_counter() - first
    rate = batches * batch_size / seconds if batches else float("nan")
    return {"workers": workers, "startup_s": first - started, "samples": (batches + 1) * batch_size,
            "samples_per_s": rate, "per_worker": rate / max(workers, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=None, help="shards to read (default: synthetic, made once)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--gpu-samples-per-s", type=float, default=100.0,
                        help="samples/s the training step consumes")
    args = parser.parse_args()

    if args.shards is None:
        if not (DATA_DIR / "manifest.json").exists():
            DATA_DIR.mkdir(parents=True, exist_ok=True)
            make_shards(DATA_DIR)
        args.shards = str(DATA_DIR)
    shards = resolve_shards([args.shards])
    print(f"{len(shards)} shards from {args.shards}; batch {args.batch_size}, input 224, target 512, "
          f"{os.cpu_count()} cores")
    print(f"{'workers':>8} {'startup s':>10} {'samples':>8} {'samples/s':>10} {'per worker':>11}")
    results = []
    for workers in args.workers:
        result = measure(shards, workers, args.batch_size, args.shuffle_buffer)
        results.append(result)
        label = f"{workers}" if workers else "0 (main)"
        print(f"{label:>8} {result['startup_s']:>10.2f} {result['samples']:>8} "
              f"{result['samples_per_s']:>10.1f} {result['per_worker']:>11.1f}")

    single = next((r for r in results if r["workers"] == 1), results[0])
    needed = math.ceil(args.gpu_samples_per_s / single["per_worker"])
    print(f"at {args.gpu_samples_per_s:g} samples/s per GPU: {needed} loader workers per GPU "
          f"({single['per_worker']:.1f} samples/s per worker, measured with {single['workers']} worker(s)), "
          f"each a core of its own")


if __name__ == "__main__":
    main()
