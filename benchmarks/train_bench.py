"""Training-step throughput of the full-size model (random weights cost the same per step as released ones).

Needs a GPU for the real figures (targets on one H100/H200, bf16, batch 32: >= 100 samples/s with cached
latents, >= 60 with the VAE in the step); ``--model tiny`` runs anywhere as a smoke check. Prints
samples/s for each variant and its ratio to the plain eager baseline measured in the same process:

- ``eager``: bf16 autocast, AdamW (fused on CUDA), SDPA attention (the transformers/diffusers default);
- ``channels_last``: the UNet and VAE in channels-last memory format;
- ``compile``: ``torch.compile`` of the UNet and the text encoder (minutes of compilation first).
Each variant runs with the VAE in the step and with cached latents.
"""

from __future__ import annotations

import argparse
import time

import torch

from subjectpairs.training.blip_diffusion import BlipDiffusion


def measure(model: BlipDiffusion, batch: int, latents: bool, steps: int, warmup: int) -> float:
    device = model.unet.device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-6, weight_decay=0.01, fused=device.type == "cuda")
    pixels = torch.randn(batch, 3, model.input_size, model.input_size, device=device)
    side = model.target_size
    inputs = {"latents": torch.randn(batch, 8, side // 8, side // 8, device=device).abs()} if latents else \
        {"target": torch.rand(batch, 3, side, side, device=device) * 2 - 1}
    captions, categories = ["a photo of a dog sitting on the grass"] * batch, ["dog"] * batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    for index in range(warmup + steps):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with autocast:
            loss = model(pixels, captions, categories, **inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "blip-diffusion"],
                        help="default: blip-diffusion on a GPU, tiny (a smoke check) on a CPU")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default="eager,channels_last,compile")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model is None:
        args.model = "blip-diffusion" if device.type == "cuda" else "tiny"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, model {args.model}, "
          f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup}")
    baseline: dict[bool, float] = {}
    for variant in args.variants.split(","):
        model = BlipDiffusion.from_config(args.model).to(device)
        if variant in ("channels_last", "compile"):
            model.unet.to(memory_format=torch.channels_last)
            model.vae.to(memory_format=torch.channels_last)
        if variant == "compile":
            model.unet.compile()
            model.text_encoder.compile()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for latents in (True, False):
            rate = measure(model, args.batch_size, latents, args.steps, args.warmup)
            baseline.setdefault(latents, rate)
            memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            print(f"{variant:14s} {'cached latents' if latents else 'VAE in step':15s} {rate:8.2f} samples/s "
                  f"x{rate / baseline[latents]:.2f} vs eager  ({trainable / 1e6:.0f}M trainable, peak {memory:.1f} GiB)")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
