"""``subjectpairs generate`` (subject-driven images: zero-shot, fine-tuned, interpolated between subjects,
structure-controlled with a ControlNet) and ``subjectpairs interpolate`` (a grid between four subjects)."""

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

CONTROL_KINDS = ("canny", "none")  # training/control_images.py's, here so that the command line starts without torch


def generated_image_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image, ``STEM-0.SUFFIX``, ``STEM-1.SUFFIX``, ... beside it for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{index}{out.suffix}") for index in range(count)]


def check_image_out(out: Path, written: list[Path], inputs: dict[str, list[Path]]) -> None:
    """``out`` is an image file name and none of the files written from it (``written``) is one of the
    ``inputs`` (named by what they are)."""
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():
        raise fail(f"--out {out}: not an image file name (PNG, JPEG, ...)")
    resolved = {path.resolve() for path in written}
    for what, given in inputs.items():
        for path in given:
            if path.resolve() in resolved:
                raise fail(f"--out {out}: would overwrite the {what} {path}")


def read_image(path: Path, what: str, flag: str | None = None):
    """The image at ``path``; one that cannot be read ends the command, naming ``flag`` and ``what``."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise fail(f"{f'{flag} ' if flag else ''}{path}: cannot read the {what} ({exc})") from exc
    return image


def cached_subject(model: str):
    """A fine-tuned folder's cached subject embedding and its category, for a command given no subject image;
    a model without one ends the command."""
    from subjectpairs.training.model_folders import load_subject_embedding

    with input_errors():
        cached = load_subject_embedding(model)
    if cached is None:
        raise fail(f"--subject-image is needed: {model} holds no cached subject embedding "
                   "(a folder made by `subjectpairs finetune` does)")
    return cached


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise fail(f"{flag} {text}: comma-separated numbers") from exc


def load_pipeline(model: str, scheduler: str | None, qformer_tokenizer: str | None, controlnet: str | None = None):
    from subjectpairs.devices import resolve_device
    from subjectpairs.training.pipeline_blip_diffusion import BlipDiffusionPipeline

    try:
        with input_errors():
            pipeline = BlipDiffusionPipeline.from_pretrained(model, scheduler=scheduler, progress=True,
                                                             qformer_tokenizer=qformer_tokenizer, controlnet=controlnet)
    except OSError as exc:
        raise fail(f"{model if controlnet is None else f'{model} or {controlnet}'}: cannot load ({exc})") from exc
    return pipeline.to(resolve_device())


def save_images(images, paths: list[Path]) -> None:
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        try:
            image.save(path)
        except (OSError, ValueError) as exc:
            raise fail(f"{path}: cannot write the image ({exc})") from exc
        console.print(f"{image.size[0]}x{image.size[1]} -> {path}")


def subject_categories(categories: list[str] | None, images: list[Path]) -> list[str]:
    """One category per subject image: as many as images, or one for all."""
    if not categories:
        raise fail("--category is needed with --subject-image")
    if len(categories) == 1:
        return categories * len(images)
    if len(categories) != len(images):
        raise fail(f"{len(categories)} --category for {len(images)} --subject-image: one per image, or one for all")
    return categories


def generate_command(
    model: Annotated[str, typer.Option(help="Diffusers BLIP-Diffusion folder or hub id.")],
    prompt: Annotated[str, typer.Option(help="What to show, after \"a {target category}\", e.g. \"on the beach\".")],
    out: Annotated[Path, typer.Option(help="Image to write (PNG, JPEG, ...); STEM-N.SUFFIX for several.")],
    subject_image: Annotated[Optional[list[Path]], typer.Option(
        help="Photo of the subject (cropped to it); repeat it to interpolate between subjects; optional for a "
             "fine-tuned folder, which has its subject's cached embedding.")] = None,
    category: Annotated[Optional[list[str]], typer.Option(
        help="The subject's category in the photo (the source), e.g. dog; one per --subject-image or one for "
             "all; a fine-tuned folder's by default.")] = None,
    subject_weights: Annotated[Optional[str], typer.Option(
        help="Interpolation weights of the subject images, e.g. 0.3,0.7 (sum 1; default: equal).")] = None,
    target_category: Annotated[Optional[str], typer.Option(
        help="The category the prompt names (default: the first --category), e.g. to render a dog's look as a "
             "cat, or a style subject's look on another object.")] = None,
    controlnet: Annotated[Optional[str], typer.Option(
        help="ControlNet for SD-1.5 (folder or hub id, e.g. lllyasviel/sd-controlnet-canny): the structure of "
             "--control-image.")] = None,
    control_image: Annotated[Optional[Path], typer.Option(help="Image whose structure the ControlNet follows.")] = None,
    control_kind: Annotated[str, typer.Option(
        help="canny: OpenCV Canny edges as LAVIS makes them; none: the image is a ready map (edges, depth, "
             "pose).")] = "canny",
    controlnet_scale: Annotated[float, typer.Option(help="Scale of the ControlNet's residuals.")] = 1.0,
    canny_thresholds: Annotated[str, typer.Option(help="Canny's low,high thresholds (LAVIS's).")] = "30,70",
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
    subject photo, from a fine-tuned folder's cached embedding, between several subjects, or following a
    structure with a ControlNet (with a style subject: subject-driven style transfer)."""
    import torch

    from subjectpairs.training.control_images import control_map
    from subjectpairs.training.model_folders import check_model_source
    from subjectpairs.training.pipeline_blip_diffusion import build_prompt
    from subjectpairs.training.pipeline_blip_diffusion import subject_weights as check_subject_weights
    from subjectpairs.training.schedulers import scheduler_class_name

    images_in = list(subject_image or [])
    paths = generated_image_paths(out, num_images)
    check_image_out(out, paths, {"subject image": images_in, "control image": [control_image] if control_image else []})
    weights = parse_floats(subject_weights, "--subject-weights")
    if weights is not None:
        with input_errors():
            check_subject_weights(weights, len(images_in))
    if (controlnet is None) != (control_image is None):
        raise fail("--controlnet and --control-image go together")
    if control_kind not in CONTROL_KINDS:
        raise fail(f"--control-kind {control_kind}: one of {', '.join(CONTROL_KINDS)}")
    thresholds = parse_floats(canny_thresholds, "--canny-thresholds")
    if len(thresholds) != 2:
        raise fail(f"--canny-thresholds {canny_thresholds}: two numbers, low,high")
    cached = None
    if not images_in:
        cached = cached_subject(model)
        categories = list(category or [cached[1]])
    else:
        categories = subject_categories(category, images_in)
    with input_errors():
        build_prompt(prompt, target_category or categories[0], prompt_strength, prompt_reps)
        if scheduler:
            scheduler_class_name(scheduler)
        if controlnet:
            check_model_source("--controlnet", controlnet, "config.json")
    subjects = [read_image(path, "subject image") for path in images_in]
    control = None
    if control_image is not None:
        with input_errors():
            control = control_map(read_image(control_image, "control image"), control_kind,
                                  int(thresholds[0]), int(thresholds[1]))
    pipeline = load_pipeline(model, scheduler, qformer_tokenizer, controlnet)
    with input_errors():
        embeddings = cached[0] if cached is not None else None
        reference = subjects[0] if len(subjects) == 1 else None
        if len(subjects) > 1:
            embeddings = pipeline.mixed_subject_embedding(subjects, categories, weights)
        images = pipeline([prompt] * num_images, reference, categories[0], target_category, guidance_scale=guidance,
                          height=height, width=width, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(seed), neg_prompt=negative_prompt,
                          prompt_strength=prompt_strength, prompt_reps=prompt_reps, subject_embeddings=embeddings,
                          control_image=control, controlnet_conditioning_scale=controlnet_scale)
    save_images(images, paths)


def interpolate_command(
    model: Annotated[str, typer.Option(help="Diffusers BLIP-Diffusion folder or hub id.")],
    subject_image: Annotated[list[Path], typer.Option(
        help="The four corner subjects, in order top-left, top-right, bottom-left, bottom-right.")],
    category: Annotated[list[str], typer.Option(help="One per subject image, or one for all.")],
    prompt: Annotated[str, typer.Option(help="What to show, after \"a {target category}\".")],
    out: Annotated[Path, typer.Option(help="The grid image to write.")],
    target_category: Annotated[Optional[str], typer.Option(help="Default: the first --category.")] = None,
    grid_size: Annotated[int, typer.Option(min=2, help="Cells per side; 2 gives the four subjects alone.")] = 4,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = NUM_INFERENCE_STEPS,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = GUIDANCE_SCALE,
    seed: Annotated[int, typer.Option(help="Seed of every cell's initial noise (the same for all).")] = 0,
    negative_prompt: Annotated[str, typer.Option(help="Text of the unconditional branch.")] = "",
    scheduler: Annotated[Optional[str], typer.Option(help="Sampler (default: the folder's).")] = None,
    qformer_tokenizer: Annotated[Optional[str], typer.Option(help="BERT tokenizer of the Q-Former.")] = None,
) -> None:
    """Subject interpolation on a grid (the paper's Figure 9): each cell's subject embedding is the bilinear
    mix of the four corner subjects', all cells drawn from the same noise."""
    import torch
    from PIL import Image

    from subjectpairs.training.pipeline_blip_diffusion import build_prompt, grid_weights

    if len(subject_image) != 4:
        raise fail(f"{len(subject_image)} --subject-image: the grid takes four corner subjects")
    check_image_out(out, [out], {"subject image": subject_image})
    categories = subject_categories(category, subject_image)
    with input_errors():
        build_prompt(prompt, target_category or categories[0])
    subjects = [read_image(path, "subject image") for path in subject_image]
    pipeline = load_pipeline(model, scheduler, qformer_tokenizer)
    cells = []
    with input_errors():
        for weights in grid_weights(grid_size):
            embedding = pipeline.mixed_subject_embedding(subjects, categories, weights)
            cells.extend(pipeline(prompt, None, categories[0], target_category, guidance_scale=guidance,
                                  num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                                  neg_prompt=negative_prompt, subject_embeddings=embedding))
    side = cells[0].size[0]
    grid = Image.new("RGB", (side * grid_size, cells[0].size[1] * grid_size))
    for index, cell in enumerate(cells):
        grid.paste(cell, ((index % grid_size) * side, (index // grid_size) * cell.size[1]))
    save_images([grid], [out])
