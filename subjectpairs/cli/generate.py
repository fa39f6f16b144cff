"""``subjectpairs generate``: subject-driven images from a diffusers BLIP-Diffusion folder (zero-shot, or fine-tuned)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from subjectpairs.cli.common import console, fail, input_errors
from subjectpairs.training.inference_defaults import (
    GUIDANCE_SCALE,
    NUM_INFERENCE_STEPS,
    PROMPT_REPS,
    PROMPT_STRENGTH,
)


def generated_image_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image, ``STEM-0.SUFFIX``, ``STEM-1.SUFFIX``, ... beside it for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{index}{out.suffix}") for index in range(count)]


def generate_command(
    model: Annotated[str, typer.Option(help="Diffusers BLIP-Diffusion folder or hub id.")],
    prompt: Annotated[str, typer.Option(help="What to show, after \"a {target category}\", e.g. \"on the beach\".")],
    out: Annotated[Path, typer.Option(help="Image to write (PNG, JPEG, ...); STEM-N.SUFFIX for several.")],
    subject_image: Annotated[Optional[Path], typer.Option(
        help="Photo of the subject (cropped to it); optional for a fine-tuned folder, which has its subject's "
             "cached embedding.")] = None,
    category: Annotated[Optional[str], typer.Option(
        help="The subject's category in the photo (the source), e.g. dog; a fine-tuned folder's by default.")] = None,
    target_category: Annotated[Optional[str], typer.Option(
        help="The category the prompt names (default: --category), e.g. to render a dog's look as a cat.")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = NUM_INFERENCE_STEPS,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale; off at 1 or below.")] = GUIDANCE_SCALE,
    seed: Annotated[int, typer.Option(help="Seed of the CPU generator that draws the initial noise.")] = 0,
    negative_prompt: Annotated[str, typer.Option(help="Text of the unconditional branch.")] = "",
    prompt_strength: Annotated[float, typer.Option(
        help="The prompt is repeated int(strength x reps) times.")] = PROMPT_STRENGTH,
    prompt_reps: Annotated[int, typer.Option(help="See --prompt-strength.")] = PROMPT_REPS,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the model's, 512 for SD-1.5).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the model's).")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Images of the prompt, one batch from one generator.")] = 1,
    scheduler: Annotated[Optional[str], typer.Option(
        help="Sampler: the folder's (PNDM for the released model) or one of diffusers' by name, e.g. DDIM.")] = None,
    qformer_tokenizer: Annotated[Optional[str], typer.Option(
        help="BERT tokenizer folder or hub id of the Q-Former (default: the one qformer/config.json names).")] = None,
) -> None:
    """Subject-driven generation as the authors and diffusers' BlipDiffusionPipeline do it: zero-shot from a
    subject photo, or from a fine-tuned folder's cached subject embedding."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from subjectpairs.devices import resolve_device
    from subjectpairs.training.model_folders import load_subject_embedding
    from subjectpairs.training.pipeline_blip_diffusion import BlipDiffusionPipeline, build_prompt
    from subjectpairs.training.schedulers import scheduler_class_name

    paths = generated_image_paths(out, num_images)
    if out.suffix.lower() not in Image.registered_extensions():
        raise fail(f"--out {out}: not an image file name (PNG, JPEG, ...)")
    if subject_image is not None and subject_image.resolve() in {path.resolve() for path in paths}:
        raise fail(f"--out {out}: would overwrite the subject image")
    cached = None
    if subject_image is None:
        with input_errors():
            cached = load_subject_embedding(model)
        if cached is None:
            raise fail(f"--subject-image is needed: {model} holds no cached subject embedding "
                       "(a folder made by `subjectpairs finetune` does)")
        category = category or cached[1]
    if not category:
        raise fail("--category is needed with --subject-image")
    with input_errors():
        build_prompt(prompt, target_category or category, prompt_strength, prompt_reps)
        if scheduler:
            scheduler_class_name(scheduler)
    subject = None
    if subject_image is not None:
        try:
            subject = Image.open(subject_image)
            subject.load()
        except (OSError, UnidentifiedImageError) as exc:
            raise fail(f"{subject_image}: cannot read the subject image ({exc})") from exc
    try:
        with input_errors():
            pipeline = BlipDiffusionPipeline.from_pretrained(model, scheduler=scheduler,
                                                             qformer_tokenizer=qformer_tokenizer, progress=True)
    except OSError as exc:
        raise fail(f"{model}: cannot load the model ({exc})") from exc
    pipeline = pipeline.to(resolve_device())
    with input_errors():
        images = pipeline([prompt] * num_images, subject, category, target_category, guidance_scale=guidance,
                          height=height, width=width, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(seed), neg_prompt=negative_prompt,
                          prompt_strength=prompt_strength, prompt_reps=prompt_reps,
                          subject_embeddings=cached[0] if cached is not None else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        try:
            image.save(path)
        except (OSError, ValueError) as exc:
            raise fail(f"{path}: cannot write the image ({exc})") from exc
        console.print(f"{image.size[0]}x{image.size[1]} -> {path}")
