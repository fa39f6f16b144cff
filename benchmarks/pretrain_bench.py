"""Stage-1 (``pretrain-qformer``) step throughput of the full-size model: frozen CLIP ViT-L/14 (23 layers),
BERT-base Q-Former with 16 queries, ITC + ITM + ITG, AdamW; random weights cost the same per step as real
ones.

Needs a GPU for the real figures (LAVIS's batch: 100 per GPU, bf16); ``--model tiny`` runs anywhere as a
smoke check. Prints samples/s for each variant and its ratio to the first one, measured in the same
process:

- ``eager``: the step as ``pretrain-qformer`` runs it (bf16 autocast on a GPU, SDPA attention);
- ``compile``: ``torch.compile`` of the Q-Former's and the image encoder's layers (compilation first).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from subjectpairs.training.config import PretrainQFormerConfig
from subjectpairs.training.qformer_pretraining_job import random_model
from subjectpairs.training.rank_trainer import QFormerTrainer

CAPTIONS = ["a photo of a dog sitting on the grass", "a red car parked by the sea at night",
            "two cups of coffee on a wooden table", "a man riding a bicycle down a busy street"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(trainer: QFormerTrainer, batch: int, image_size: int, steps: int, warmup: int) -> float:
    device = trainer.device
    data = {"pixel_values": torch.randn(batch, 3, image_size, image_size, device=device),
            "captions": [CAPTIONS[index % len(CAPTIONS)] for index in range(batch)]}
    for index in range(warmup + steps):
        if index == warmup:
            synchronize(device)
            started = time.perf_counter()
        trainer.train_step(data)
    synchronize(device)
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "blip-diffusion"],
                        help="default: blip-diffusion on a GPU, tiny (a smoke check) on a CPU")
    parser.add_argument("--batch-size", type=int, help="default: 100 on a GPU (LAVIS's), 8 on a CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="eager,compile")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("blip-diffusion" if device.type == "cuda" else "tiny")
    args.batch_size = args.batch_size or (100 if device.type == "cuda" else 8)
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, model {args.model}, "
          f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup}")
    config = PretrainQFormerConfig(shards=["unused"], out="unused", model=args.model, batch_size=args.batch_size,
                                   max_steps=args.steps + args.warmup, warmup_steps=0)
    baseline = None
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as scratch:
            model = random_model(config, scratch).to(device).train()
        if variant == "compile":
            for layer in (*model.qformer.encoder.layer, *model.qformer.visual_encoder.encoder.layers):
                layer.compile()
        trainer = QFormerTrainer(config, model, device, seed=0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rate = measure(trainer, args.batch_size, model.qformer.config.vision_config.image_size, args.steps,
                       args.warmup)
        baseline = baseline or rate
        memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak" if device.type == "cuda" else ""
        print(f"{variant:10s} {rate:8.2f} samples/s  x{rate / baseline:.2f}  {memory}", flush=True)
        del trainer, model


if __name__ == "__main__":
    main()
