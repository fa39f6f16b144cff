"""Reference outputs of diffusers' own BLIP-Diffusion, and a check that an export loads into it.

diffusers' BLIP-Diffusion classes run only under transformers <= 4.53 (the project runs transformers 5), so
this script runs in its own virtual environment, ``.parity-venv/`` at the repository root, which it creates
when missing (torch 2.13.0 CPU, diffusers 0.39.0, transformers 4.53.3) and then re-runs itself in.

    python tools/diffusers_reference.py                      # rebuild tests/data/diffusers-tiny-blipdiffusion/
    python tools/diffusers_reference.py --check-export DIR   # load an export with diffusers' classes
    python tools/diffusers_reference.py --check-export DIR --generate-to IMAGE.npy   # and generate with it
    python tools/diffusers_reference.py --venv-only          # create the environment and stop

The rebuild makes a tiny random BLIP-Diffusion with diffusers' classes (sizes of the project's tiny preset,
with a 4-block UNet so that diffusers' latent size, image size / 2 ** (UNet blocks - 1), equals the VAE's),
saves it component by component as the released ``Salesforce/blipdiffusion`` is laid out, reloads it the way
``--check-export`` loads a folder, and writes ``reference.npz`` beside it from diffusers' own code: the
Q-Former's subject embeddings, the text encoder's states with those embeddings at ``ctx_begin_pos`` and one
short generation by the pipeline's ``__call__``. tests/test_diffusers_parity.py compares the project's
model with them under transformers 5.

diffusers' ``BlipDiffusionPipeline.from_pretrained`` cannot load the folder (its ``model_index.json`` names
the module ``blip_diffusion``, which diffusers no longer resolves), so each component is loaded with its class.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARITY_VENV = ROOT / ".parity-venv"
# Written once every pin is installed: an environment whose install broke off is completed on the next run.
PARITY_VENV_READY = PARITY_VENV / ".installed"
REFERENCE_FOLDER = ROOT / "tests" / "data" / "diffusers-tiny-blipdiffusion"
# torch first and pinned: this machine keeps the CPU build on disk, an unpinned torch pulls the CUDA one.
TORCH_PIN = "torch==2.13.0"
PARITY_PINS = ("diffusers==0.39.0", "transformers==4.53.3", "accelerate", "safetensors", "pillow")

SEED = 0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The released scheduler config (training/presets.py SD_SCHEDULER), which that module cannot be imported here to read.
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                "clip_sample": False}
REFERENCE_CATEGORY = "dog"
REFERENCE_PROMPT = "on the beach"
CTX_BEGIN_POS = 2
GENERATION_STEPS = 3
GUIDANCE = 7.5
IMAGE_SIDE = 64
WEIGHT_NOISE = 0.02


def _in_parity_venv() -> bool:
    return Path(sys.prefix).resolve() == PARITY_VENV.resolve()


def ensure_parity_venv() -> Path:
    python = PARITY_VENV / "bin" / "python"
    if PARITY_VENV_READY.exists():
        return python
    started = time.monotonic()
    if not python.exists():
        venv.create(PARITY_VENV, with_pip=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, *PARITY_PINS], check=True)
    PARITY_VENV_READY.touch()
    print(f"created {PARITY_VENV} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return python


def _tiny_tokenizers_module():
    """training/tiny_tokenizers.py by path: the package's __init__ needs transformers 5."""
    spec = importlib.util.spec_from_file_location("tiny_tokenizers", ROOT / "training" / "tiny_tokenizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_image():
    """A fixed, non-square test image: colour gradients and a disc, so resizing and every channel matter."""
    import numpy as np
    from PIL import Image

    rows, cols = np.mgrid[0:40, 0:48]
    disc = ((rows - 22) ** 2 + (cols - 20) ** 2 < 120).astype(np.float64)
    red = 255 * (0.2 + 0.6 * cols / 47) * (1 - disc) + 230 * disc
    green = 255 * (0.1 + 0.8 * rows / 39) * (1 - disc) + 40 * disc
    blue = 255 * (0.5 + 0.4 * np.sin(rows / 4 + cols / 7)) * (1 - disc) + 60 * disc
    return Image.fromarray(np.stack([red, green, blue], axis=-1).round().astype(np.uint8))


def _perturb(module, generator) -> None:
    """Noise on every weight, so that a weight loaded under a wrong name or left at its initial value (ones,
    zeros, identical queries) changes the outputs."""
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * WEIGHT_NOISE)


def build_folder(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.blip_diffusion import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import BertTokenizer, Blip2Config, CLIPTextConfig, CLIPTokenizer

    import diffusers

    words = _tiny_tokenizers_module()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = words.write_clip_bpe(Path(scratch) / "clip")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
        bert = BertTokenizer(str(words.write_bert_wordpiece(Path(scratch) / "bert")), truncation_side="right")
    tokenizer.save_pretrained(folder / "tokenizer")
    bert.save_pretrained(folder / "qformer")
    clip_vocab, width = len(tokenizer), 32

    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    qformer_config = Blip2Config(
        vision_config={"hidden_size": width, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu",
                       "layer_norm_eps": 1e-5, "qkv_bias": True},
        qformer_config={"vocab_size": len(bert) + 1, "hidden_size": width, "num_hidden_layers": 2,  # + [DEC]
                        "num_attention_heads": 2, "intermediate_size": 64, "cross_attention_frequency": 1,
                        "encoder_hidden_size": width, "max_position_embeddings": 64},
        num_query_tokens=16)
    qformer_config.tokenizer = str(folder / "qformer")
    qformer = Blip2QFormerModel(qformer_config)
    _perturb(qformer, generator)
    # Named relative to the model folder, as the project's export names it: a path of this machine would
    # mean nothing elsewhere, and without a name diffusers downloads bert-base-uncased.
    qformer.config.tokenizer = "qformer"
    qformer.save_pretrained(folder / "qformer")

    text_encoder = ContextCLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=clip_vocab - 2,
        eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1))
    _perturb(text_encoder, generator)
    text_encoder.save_pretrained(folder / "text_encoder")

    UNet2DConditionModel(
        sample_size=IMAGE_SIDE // 8, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=width,
        attention_head_dim=4).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIDE,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(folder / "vae")
    PNDMScheduler.from_config(SD_SCHEDULER).save_pretrained(folder / "scheduler")
    BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=list(CLIP_MEAN),
                       image_std=list(CLIP_STD)).save_pretrained(folder / "image_processor")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "BlipDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "ctx_begin_pos": CTX_BEGIN_POS, "image_processor": ["blip_diffusion", "BlipImageProcessor"],
        "mean": list(CLIP_MEAN), "qformer": ["blip_diffusion", "Blip2QFormerModel"],
        "scheduler": ["diffusers", "PNDMScheduler"], "std": list(CLIP_STD),
        "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")


def load_pipeline(folder: Path):
    """Each component with diffusers' class, as diffusers' pipeline would; returns (pipeline, problems).

    A problem is anything that would stop diffusers from using the folder as it is: missing, unexpected or
    mismatched weights, a component that does not load, a Q-Former config naming no tokenizer (diffusers then
    downloads bert-base-uncased)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.blip_diffusion import BlipDiffusionPipeline, BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import BertTokenizer, Blip2Config, CLIPTokenizer

    problems: list[str] = []
    components = {}

    def load(name: str, loader):
        try:
            loaded = loader()
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the next component
            problems.append(f"{name}: does not load: {type(error).__name__}: {error}")
            return None
        if isinstance(loaded, tuple):
            loaded, info = loaded
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
                if info.get(kind):
                    problems.append(f"{name}: {kind}: {sorted(map(str, info[kind]))}")
        components[name] = loaded
        return loaded

    qformer_folder = folder / "qformer"
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    if not index:
        problems.append("model_index.json: missing")
    with tempfile.TemporaryDirectory() as scratch:
        config = load("qformer config", lambda: Blip2Config.from_pretrained(qformer_folder))
        if config is not None:
            if getattr(config, "tokenizer", None) is None:
                problems.append("qformer/config.json: no \"tokenizer\" (diffusers would download bert-base-uncased)")
            # The folder's own tokenizer files, wherever the config points: a relative name is read from the
            # working directory by diffusers, an absolute path is the exporting machine's.
            tokenizer_folder = qformer_folder
            if load("qformer tokenizer", lambda: BertTokenizer.from_pretrained(qformer_folder)) is None:
                # A stand-in vocabulary, so that the Q-Former's weights are still checked.
                tokenizer_folder = _tiny_tokenizers_module().write_bert_wordpiece(Path(scratch)).parent
            config.tokenizer = str(tokenizer_folder)
            load("qformer", lambda: Blip2QFormerModel.from_pretrained(qformer_folder, config=config,
                                                                      output_loading_info=True))
    load("text_encoder", lambda: ContextCLIPTextModel.from_pretrained(folder / "text_encoder",
                                                                      output_loading_info=True))
    load("tokenizer", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    load("unet", lambda: UNet2DConditionModel.from_pretrained(folder / "unet", output_loading_info=True))
    load("vae", lambda: AutoencoderKL.from_pretrained(folder / "vae", output_loading_info=True))
    load("scheduler", lambda: PNDMScheduler.from_pretrained(folder / "scheduler"))
    load("image_processor", lambda: BlipImageProcessor.from_pretrained(folder / "image_processor"))
    parts = ("tokenizer", "text_encoder", "vae", "unet", "scheduler", "qformer", "image_processor")
    if problems or not all(part in components for part in parts):
        return None, problems
    pipeline = BlipDiffusionPipeline(**{part: components[part] for part in parts},
                                     ctx_begin_pos=index.get("ctx_begin_pos", CTX_BEGIN_POS),
                                     mean=index.get("mean", list(CLIP_MEAN)), std=index.get("std", list(CLIP_STD)))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, problems


def generate_reference(pipeline):
    """diffusers' image (H, W, 3 floats in [0, 1]) for the reference subject, category, prompt and seed."""
    import torch

    with torch.no_grad():
        return pipeline(REFERENCE_PROMPT, reference_image(), REFERENCE_CATEGORY, REFERENCE_CATEGORY,
                        guidance_scale=GUIDANCE, height=IMAGE_SIDE, width=IMAGE_SIDE,
                        num_inference_steps=GENERATION_STEPS, generator=torch.Generator().manual_seed(SEED),
                        output_type="np").images[0]


def generate_controlled(pipeline, controlnet_folder: Path, control_image: Path):
    """diffusers' ``BlipDiffusionControlNetPipeline`` on the components of ``pipeline`` and a ControlNet folder,
    for the reference subject, prompt and seed, following ``control_image`` (H, W, 3 floats in [0, 1])."""
    import torch
    from diffusers import BlipDiffusionControlNetPipeline, ControlNetModel
    from PIL import Image

    controlled = BlipDiffusionControlNetPipeline(
        **{part: getattr(pipeline, part) for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler",
                                                       "qformer", "image_processor")},
        controlnet=ControlNetModel.from_pretrained(controlnet_folder), ctx_begin_pos=pipeline.config.ctx_begin_pos,
        mean=pipeline.config.mean, std=pipeline.config.std)
    controlled.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return controlled(REFERENCE_PROMPT, reference_image(), Image.open(control_image).convert("RGB"),
                          REFERENCE_CATEGORY, REFERENCE_CATEGORY, guidance_scale=GUIDANCE, height=IMAGE_SIDE,
                          width=IMAGE_SIDE, num_inference_steps=GENERATION_STEPS,
                          generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]


def record_reference(folder: Path) -> None:
    import numpy as np
    import torch

    pipeline, problems = load_pipeline(folder)
    if problems:
        raise SystemExit("the folder just built does not load:\n" + "\n".join(problems))
    image = reference_image()
    with torch.no_grad():
        pixel_values = pipeline.image_processor.preprocess(
            image, image_mean=pipeline.config.mean, image_std=pipeline.config.std, return_tensors="pt"
        )["pixel_values"]
        subject_embeddings = pipeline.get_query_embeddings(pixel_values, [REFERENCE_CATEGORY])
        prompt = pipeline._build_prompt([REFERENCE_PROMPT], [REFERENCE_CATEGORY])[0]
        max_length = pipeline.text_encoder.text_model.config.max_position_embeddings - subject_embeddings.shape[1]
        prompt_ids = pipeline.tokenizer([prompt], padding="max_length", truncation=True, max_length=max_length,
                                        return_tensors="pt").input_ids
        text_states = pipeline.encode_prompt(subject_embeddings, [prompt], device="cpu")
    generated = generate_reference(pipeline)
    import diffusers
    import transformers

    np.savez_compressed(
        folder / "reference.npz",
        reference_image=np.asarray(image), category=np.array(REFERENCE_CATEGORY),
        pixel_values=pixel_values.numpy(), subject_embeddings=subject_embeddings.numpy(),
        prompt=np.array(REFERENCE_PROMPT), built_prompt=np.array(prompt), prompt_ids=prompt_ids.numpy(),
        ctx_begin_pos=np.array(CTX_BEGIN_POS), text_states=text_states.numpy(),
        seed=np.array(SEED), steps=np.array(GENERATION_STEPS), guidance=np.array(GUIDANCE),
        generated=generated.astype(np.float32), generated_uint8=(generated * 255).round().astype(np.uint8),
        versions=np.array(f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
                          f"torch {torch.__version__}"),
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check-export", type=Path, metavar="FOLDER",
                      help="load FOLDER with diffusers' classes; exit 1 on missing or unexpected keys")
    mode.add_argument("--venv-only", action="store_true", help="create .parity-venv and stop")
    parser.add_argument("--generate-to", type=Path, metavar="FILE.npy",
                        help="with --check-export: diffusers' image of the reference subject, prompt and seed "
                             "from FOLDER, saved as uint8 (H, W, 3)")
    parser.add_argument("--controlnet", type=Path, metavar="FOLDER",
                        help="with --generate-to: generate with diffusers' BlipDiffusionControlNetPipeline and "
                             "this ControlNet, following --control-image")
    parser.add_argument("--control-image", type=Path, metavar="IMAGE", help="the control map of --controlnet")
    parser.add_argument("--out", type=Path, default=REFERENCE_FOLDER, help="where the reference folder goes")
    args = parser.parse_args(argv)
    if not _in_parity_venv():
        python = ensure_parity_venv()
        if args.venv_only:
            return 0
        return subprocess.run([str(python), str(Path(__file__).resolve()), *argv]).returncode
    if args.venv_only:
        return 0
    if args.generate_to is not None and args.check_export is None:
        parser.error("--generate-to needs --check-export")
    if (args.controlnet is None) != (args.control_image is None) or (args.controlnet and not args.generate_to):
        parser.error("--controlnet and --control-image go together, with --generate-to")
    if args.check_export is not None:
        pipeline, problems = load_pipeline(args.check_export.resolve())
        for problem in problems:
            print(problem)
        print(f"{args.check_export}: {'FAILS' if problems else 'loads'} with diffusers' BLIP-Diffusion classes")
        if problems:
            return 1
        if args.generate_to is not None:
            import numpy as np

            image = (generate_reference(pipeline) if args.controlnet is None
                     else generate_controlled(pipeline, args.controlnet.resolve(), args.control_image.resolve()))
            np.save(args.generate_to, (image * 255).round().astype(np.uint8))
            print(f"generated with diffusers' pipeline -> {args.generate_to}")
        return 0
    build_folder(args.out.resolve())
    record_reference(args.out.resolve())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download; a download attempt is a bug
    sys.exit(main(sys.argv[1:]))
