"""``subjectpairs edit``: put a subject in place of a word of a generated image or of a photo, as BLIP-Diffusion's
authors edit (zero-shot, prompt-to-prompt with a local blend)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from subjectpairs.cli.common import console, fail, input_errors
from subjectpairs.cli.generate import cached_subject, check_image_out, read_image
from subjectpairs.training.inference_defaults import (
    CROSS_REPLACE_STEPS,
    GUIDANCE_SCALE,
    LB_THRESHOLD,
    NUM_INFERENCE_STEPS,
    SELF_REPLACE_STEPS,
)


def edit_output_paths(out: Path) -> dict[str, Path]:
    """``out`` (the edited image) and, beside it, ``STEM-source.png`` (the source image), ``STEM-mask.png``
    (where the edit was kept) and ``STEM-attention.png`` (the edit word's attention map)."""
    beside = {kind: out.with_name(f"{out.stem}-{kind}.png") for kind in ("source", "mask", "attention")}
    return {"edited": out, **beside}


def edit_command(
    model: Annotated[str, typer.Option(help="Diffusers BLIP-Diffusion folder or hub id.")],
    source_prompt: Annotated[str, typer.Option(
        help="The whole sentence the source image shows, e.g. \"a cat sitting on a sofa\" (with --image: the "
             "photo).")],
    edit_word: Annotated[str, typer.Option(
        help="The word of --source-prompt the subject replaces, e.g. cat; it must occur there once.")],
    out: Annotated[Path, typer.Option(
        help="Edited image to write (PNG, JPEG, ...); STEM-source.png, STEM-mask.png and STEM-attention.png "
             "are written beside it.")],
    subject_image: Annotated[Optional[Path], typer.Option(
        help="Photo of the subject (cropped to it); optional for a fine-tuned folder, which has its subject's "
             "cached embedding.")] = None,
    category: Annotated[Optional[str], typer.Option(
        help="The subject's category in its photo, e.g. dog; a fine-tuned folder's by default.")] = None,
    target_category: Annotated[Optional[str], typer.Option(
        help="The word the subject is rendered as in place of --edit-word (default: --category).")] = None,
    image: Annotated[Optional[Path], typer.Option(
        help="A real photo to edit (DDIM-inverted on --source-prompt); without it the source image is generated "
             "from --seed.")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps of the edit.")] = NUM_INFERENCE_STEPS,
    inversion_steps: Annotated[int, typer.Option(
        help="DDIM inversion steps of --image; as many as --steps retrace the photo best.")] = NUM_INFERENCE_STEPS,
    guidance: Annotated[float, typer.Option(
        help="Classifier-free guidance scale of the edit; off at 1 or below.")] = GUIDANCE_SCALE,
    seed: Annotated[int, typer.Option(help="Seed of the CPU generator that draws the initial noise.")] = 0,
    negative_prompt: Annotated[str, typer.Option(help="Text of the unconditional branch.")] = "",
    cross_replace: Annotated[float, typer.Option(
        help="Fraction of the steps in which the edit takes the source's cross-attention.")] = CROSS_REPLACE_STEPS,
    self_replace: Annotated[float, typer.Option(
        help="Fraction of the steps in which the edit takes the source's self-attention (coarse layers).")
    ] = SELF_REPLACE_STEPS,
    threshold: Annotated[float, typer.Option(
        help="Local blend: the edit is kept where the edit word's normalised attention exceeds this, the source "
             "elsewhere; 0 switches the blend off.")] = LB_THRESHOLD,
    height: Annotated[Optional[int], typer.Option(
        help="Image height (default: the model's, 512 for SD-1.5).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the model's).")] = None,
    qformer_tokenizer: Annotated[Optional[str], typer.Option(
        help="BERT tokenizer folder or hub id of the Q-Former (default: the one qformer/config.json names).")] = None,
) -> None:
    """Subject-driven editing as BLIP-Diffusion's authors do it: the subject takes the place of --edit-word in an
    image of --source-prompt, generated or a real photo, and the rest of the image stays as it was."""
    import torch

    from subjectpairs.devices import resolve_device
    from subjectpairs.training.pipeline_blip_diffusion_edit import (
        BlipDiffusionEditPipeline,
        build_edit_prompts,
        check_edit_options,
    )

    paths = edit_output_paths(out)
    check_image_out(out, list(paths.values()), {f"{flag} file": [given] for flag, given in
                                                (("--subject-image", subject_image), ("--image", image))
                                                if given is not None})
    cached = None
    if subject_image is None:
        cached = cached_subject(model)
        category = category or cached[1]
    if not category:
        raise fail("--category is needed with --subject-image")
    with input_errors():
        build_edit_prompts(source_prompt, edit_word, target_category or category)
        check_edit_options(steps, inversion_steps, cross_replace, self_replace, threshold)
    subject = read_image(subject_image, "image", "--subject-image") if subject_image is not None else None
    photo = read_image(image, "image", "--image") if image is not None else None
    try:
        with input_errors():
            pipeline = BlipDiffusionEditPipeline.from_pretrained(model, qformer_tokenizer=qformer_tokenizer,
                                                                 progress=True)
    except OSError as exc:
        raise fail(f"{model}: cannot load the model ({exc})") from exc
    pipeline = pipeline.to(resolve_device())
    with input_errors():
        result = pipeline(subject, category, source_prompt, edit_word, target_category=target_category, image=photo,
                          guidance_scale=guidance, num_inference_steps=steps, num_inversion_steps=inversion_steps,
                          generator=torch.Generator().manual_seed(seed), neg_prompt=negative_prompt,
                          cross_replace_steps=cross_replace, self_replace_steps=self_replace, lb_threshold=threshold,
                          height=height, width=width, subject_embeddings=cached[0] if cached is not None else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = {"edited": result.image, "source": result.source, "mask": result.mask_image(),
              "attention": result.attention_image()}
    for kind, path in paths.items():
        try:
            images[kind].save(path)
        except (OSError, ValueError) as exc:
            raise fail(f"{path}: cannot write the {kind} image ({exc})") from exc
        console.print(f"{kind} {images[kind].size[0]}x{images[kind].size[1]} -> {path}")
