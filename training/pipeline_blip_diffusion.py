"""Zero-shot subject-driven generation, as the authors (LAVIS) and diffusers' ``BlipDiffusionPipeline`` do it.

Same weights, subject image, categories, prompt and generator give diffusers' image (to a grey level;
tests/test_diffusers_parity.py):

- the prompt is ``"a {target category} {prompt}"`` repeated ``int(prompt_strength * prompt_reps)`` times
  (1.0 and 20) and joined by ``", "``, cut to 77 - 16 tokens; the 16 subject embeddings, from the subject
  image and its *source* category, are inserted at ``ctx_begin_pos`` (the folder's ``model_index.json``: 2);
- classifier-free guidance runs only above 1, its unconditional branch on the negative prompt alone;
- initial latents are ``randn_tensor`` of (B, 4, H/8, W/8) from the caller's generator, in the UNet's dtype,
  scaled by the scheduler's initial sigma; the scheduler is the folder's (PNDM for the released model) or any
  of diffusers' Stable Diffusion schedulers by name, built on the folder's noise schedule.

diffusers' pipeline computes the latent size from the UNet's block count; this one from the VAE's, which is
what the VAE decodes (the two agree for every Stable Diffusion 1.x model).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from subjectpairs.errors import InputError

from .blip_diffusion import BlipDiffusion
from .control_images import control_tensor
from .inference_defaults import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, PROMPT_REPS, PROMPT_STRENGTH
from .model_folders import load_component
from .schedulers import build_scheduler



def build_prompt(prompt: str, target_category: str, prompt_strength: float = PROMPT_STRENGTH,
                 prompt_reps: int = PROMPT_REPS) -> str:
    """``"a {target_category} {prompt}"``, repeated to amplify it, as the authors prompt at inference."""
    repeats = int(prompt_strength * prompt_reps)
    if repeats < 1:
        raise InputError(f"prompt strength {prompt_strength} x {prompt_reps} repetitions leaves no prompt")
    return ", ".join([f"a {target_category} {prompt.strip()}"] * repeats)


def subject_weights(weights: list[float] | None, count: int) -> list[float]:
    """Interpolation weights of ``count`` subjects: equal shares by default; else one each, non-negative,
    summing to 1 (LAVIS asserts the sum)."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise InputError(f"{len(weights)} subject weights for {count} subject images")
    if any(weight < 0 for weight in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise InputError(f"subject weights {list(weights)}: non-negative and summing to 1")
    return list(weights)


def grid_weights(size: int) -> list[list[float]]:
    """Row by row, the bilinear weights of four corner subjects (top-left, top-right, bottom-left,
    bottom-right) at each cell of a ``size`` x ``size`` grid; the corners are the subjects alone."""
    cells = []
    for row in range(size):
        for column in range(size):
            across, down = column / (size - 1), row / (size - 1)
            cells.append([(1 - across) * (1 - down), across * (1 - down), (1 - across) * down, across * down])
    return cells


def _as_list(value, size: int, name: str) -> list:
    values = [value] if isinstance(value, (str, Image.Image)) else list(value)
    if len(values) == 1:
        values = values * size
    if len(values) != size:
        raise InputError(f"{len(values)} {name} for {size} prompts")
    return values


class BlipDiffusionPipeline:
    """Generation with a :class:`BlipDiffusion` model: ``pipeline(prompt, reference_image, source_category,
    target_category, ...)`` with the arguments and defaults of diffusers' pipeline; fine-tuning, evaluation
    and controlled generation build on it."""

    def __init__(self, model: BlipDiffusion, scheduler: SchedulerMixin | None = None, progress: bool = False,
                 controlnet: ControlNetModel | None = None) -> None:
        self.model = model.eval()
        self.scheduler = scheduler if scheduler is not None else build_scheduler(model.scheduler_config)
        self.progress = progress
        self.image_processor = VaeImageProcessor(vae_scale_factor=model.vae_scale_factor)
        self.controlnet = controlnet.eval() if controlnet is not None else None

    @classmethod
    def from_pretrained(cls, source: str | Path, scheduler: str | None = None, qformer_tokenizer: str | None = None,
                        progress: bool = False, controlnet: str | Path | None = None) -> "BlipDiffusionPipeline":
        """A BLIP-Diffusion folder or hub id; ``scheduler`` names another of diffusers' schedulers (``DDIM``)
        to sample with on the folder's noise schedule; ``controlnet`` a ControlNet for Stable Diffusion 1.5
        (folder or hub id, e.g. ``lllyasviel/sd-controlnet-canny``), loaded strictly."""
        model = BlipDiffusion.from_pretrained(source, qformer_tokenizer=qformer_tokenizer)
        control = load_component(ControlNetModel, str(controlnet), "") if controlnet is not None else None
        return cls(model, build_scheduler(model.scheduler_config, scheduler), progress=progress, controlnet=control)

    def to(self, device: str | torch.device) -> "BlipDiffusionPipeline":
        self.model.to(device)
        if self.controlnet is not None:
            self.controlnet.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.unet.device

    def subject_embeddings(self, reference_images: list[Image.Image], source_categories: list[str]) -> torch.Tensor:
        """The Q-Former's 16 embeddings (B, 16, H) of each subject image with its category."""
        pixels = torch.cat([self.model.subject_pixels(image) for image in reference_images]).to(self.device)
        return self.model.subject_embeddings(pixels.to(self.model.qformer.dtype), source_categories)

    def mixed_subject_embedding(self, reference_images: list[Image.Image], source_categories: list[str],
                                weights: list[float] | None = None) -> torch.Tensor:
        """Subject interpolation (LAVIS ``forward_ctx_embeddings`` with ``ratio``): the weighted sum (1, 16, H)
        of the subjects' embeddings; weights default to equal shares and must sum to 1."""
        if not reference_images or len(reference_images) != len(source_categories):
            raise InputError(f"{len(reference_images)} subject images for {len(source_categories)} categories")
        weights = subject_weights(weights, len(reference_images))
        # one subject at a time, as LAVIS: weights 1 and 0 then give exactly the first subject's embedding
        embeddings = [self.subject_embeddings([image], [category])
                      for image, category in zip(reference_images, source_categories)]
        mixed = torch.zeros_like(embeddings[0])
        for weight, embedding in zip(weights, embeddings):
            mixed += weight * embedding
        return mixed

    def encode_prompt(self, prompts: list[str], subject_embeddings: torch.Tensor) -> torch.Tensor:
        """Text-encoder states (B, 77, H) of already built prompts with the subject embeddings inserted at
        the model's ``ctx_begin_pos``."""
        return self.model.text_conditioning(prompts, subject_embeddings, ctx_at=self.model.ctx_begin_pos)

    def prepare_latents(self, batch_size: int, height: int, width: int,
                        generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        shape = (batch_size, self.model.unet.config.in_channels, height // self.model.vae_scale_factor,
                 width // self.model.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise InputError(f"{len(generator)} generators for {batch_size} images")
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.model.unet.dtype)
        return latents * self.scheduler.init_noise_sigma

    def _control(self, control_image: Image.Image | None, batch: int, height: int, width: int,
                 guided: bool) -> torch.Tensor | None:
        """The control map as the ControlNet takes it: (B, 3, H, W) in [0, 1], twice over with guidance."""
        if (control_image is None) != (self.controlnet is None):
            raise InputError("a control image goes with a ControlNet: give both or neither")
        if control_image is None:
            return None
        control = control_tensor(control_image, height, width).repeat(batch, 1, 1, 1)
        control = torch.cat([control] * 2) if guided else control
        return control.to(self.device, self.controlnet.dtype)

    def _check_size(self, height: int, width: int) -> None:
        factor = self.model.vae_scale_factor
        for name, side in (("height", height), ("width", width)):
            if side < factor or side % factor:
                raise InputError(f"{name} {side}: must be a positive multiple of {factor} (the VAE's downscale)")

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], reference_image: Image.Image | list[Image.Image] | None,
                 source_subject_category: str | list[str], target_subject_category: str | list[str] | None = None,
                 *, guidance_scale: float = GUIDANCE_SCALE, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = NUM_INFERENCE_STEPS,
                 generator: torch.Generator | list[torch.Generator] | None = None, neg_prompt: str = "",
                 prompt_strength: float = PROMPT_STRENGTH, prompt_reps: int = PROMPT_REPS,
                 output_type: str = "pil", subject_embeddings: torch.Tensor | None = None,
                 control_image: Image.Image | None = None, controlnet_conditioning_scale: float = 1.0,
                 ) -> list[Image.Image] | np.ndarray:
        """One image per prompt (repeat a prompt for several images of it). ``target_subject_category``
        defaults to the source one; ``height``/``width`` to the model's training size (512 for SD-1.5).
        ``output_type``: ``pil`` (a list of images) or ``np`` (B, H, W, 3 in [0, 1]).

        ``subject_embeddings`` (1 or B, 16, H), such as a fine-tuned folder's cached one, stand in for the
        Q-Former's embeddings of ``reference_image`` (then None), as LAVIS generates after fine-tuning.

        With the pipeline's ControlNet, ``control_image`` (a prepared map, see ``control_images``) steers the
        structure: the ControlNet's residuals, times ``controlnet_conditioning_scale``, go into the UNet's down
        and mid blocks at every step, in both guidance branches, as LAVIS's ``_predict_noise``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("no prompt to generate")
        if num_inference_steps < 1:
            raise InputError(f"{num_inference_steps} inference steps: at least 1 is needed")
        if output_type not in ("pil", "np"):
            raise InputError(f"output type {output_type!r}: pil or np")
        height, width = height or self.model.target_size, width or self.model.target_size
        self._check_size(height, width)
        batch = len(prompts)
        sources = _as_list(source_subject_category, batch, "source categories")
        targets = sources if target_subject_category is None else _as_list(target_subject_category, batch,
                                                                           "target categories")
        built = [build_prompt(p, t, prompt_strength, prompt_reps) for p, t in zip(prompts, targets)]
        if subject_embeddings is None:
            if reference_image is None:
                raise InputError("no subject image and no subject embedding to generate from")
            subject_embeddings = self.subject_embeddings(_as_list(reference_image, batch, "subject images"), sources)
        elif reference_image is not None:
            raise InputError("give a subject image or subject embeddings, not both")
        else:
            subject_embeddings = subject_embeddings.to(self.device, self.model.text_encoder.dtype)
            subject_embeddings = subject_embeddings.expand(batch, -1, -1) if len(subject_embeddings) == 1 \
                else subject_embeddings
            if len(subject_embeddings) != batch:
                raise InputError(f"{len(subject_embeddings)} subject embeddings for {batch} prompts")

        states = self.encode_prompt(built, subject_embeddings)
        guided = guidance_scale > 1.0
        if guided:  # the unconditional branch first, as diffusers concatenates them
            states = torch.cat([self.model.text_conditioning([neg_prompt] * batch, None), states])
        states = states.to(self.model.unet.dtype)
        control = self._control(control_image, batch, height, width, guided)
        latents = self.prepare_latents(batch, height, width, generator)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        # ancestral and SDE samplers draw noise at each step, from the caller's generator as in diffusers' SD
        step_options = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for step in tqdm(self.scheduler.timesteps, desc="denoising", disable=not self.progress):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, step)
            residuals = {}
            if control is not None:
                down, mid = self.controlnet(model_input, step, encoder_hidden_states=states, controlnet_cond=control,
                                            conditioning_scale=controlnet_conditioning_scale, return_dict=False)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            noise = self.model.unet(model_input, step, encoder_hidden_states=states, **residuals).sample
            if guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise, step, latents, **step_options).prev_sample
        decoded = self.model.vae.decode(latents.to(self.model.vae.dtype) / self.model.latent_scale).sample
        return self.image_processor.postprocess(decoded.float(), output_type=output_type)
