"""Subject-driven editing with prompt-to-prompt (BLIP-Diffusion paper, A.7), as the authors do it: LAVIS's
``generate_then_edit`` for a generated source image and ``edit`` for a real photo.

The source prompt is the whole sentence and the edit word one of its words: ``"a cat sitting on a sofa"`` and
``"cat"`` (LAVIS's ``src_subject`` and ``prompt``, ``"a {src_subject} {prompt}"``, written out). The target
prompt is the sentence with the edit word replaced by 16 placeholder words and the target category,
``"a sks ... sks dog sitting on a sofa"`` (LAVIS ``_build_prompts_edit``), and the subject's 16 embeddings are
inserted before the placeholders: in LAVIS's sentences, where the edit word follows ``"a"``, that is the
model's ``ctx_begin_pos`` (2). The source prompt has no subject embeddings.

- Without a photo, both prompts start from one draw of noise from the generator and are denoised with the
  model's scheduler (PNDM for the released model), both with classifier-free guidance; the source image is
  the source prompt's image.
- With a photo (``image=``), it is resized and centre-cropped to the output size, encoded by the VAE and
  DDIM-inverted on the source prompt without guidance (LAVIS ``_inversion_transform``, ``_ddim_inverse``);
  both prompts then start from the inverted latents and are denoised with DDIM on the model's noise schedule,
  the source without guidance, so that it retraces the photo, and the target with it (LAVIS's
  ``use_inversion``). The source image is that reconstruction.

At every step :class:`~subjectpairs.training.attention_control.AttentionRefine` edits the target's attention
and the local blend keeps the target's latents only where the source attends to the edit word.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from tqdm.auto import tqdm

from subjectpairs.errors import InputError

from .attention_control import (
    SUBJECT_SLOT,
    AttentionRefine,
    AttentionStore,
    LocalBlend,
    attention_control,
    refinement_mapper,
    word_token_indices,
)
from .blip_diffusion import BlipDiffusion
from .inference_defaults import (
    CROSS_REPLACE_STEPS,
    GUIDANCE_SCALE,
    LB_THRESHOLD,
    NUM_INFERENCE_STEPS,
    SELF_REPLACE_STEPS,
)
from .pipeline_blip_diffusion import BlipDiffusionPipeline
from .qformer import NUM_QUERY_TOKENS
from .schedulers import build_scheduler

# The word that stands for each subject embedding in the target prompt (LAVIS's).
PLACEHOLDER = "sks"


@dataclass(frozen=True)
class EditResult:
    """``image``: the edited image; ``source``: the source prompt's image (generated, or the photo's DDIM
    reconstruction); ``mask`` (H, W) in [0, 1]: where the edit was kept, the local blend's last mask at the
    image's size (all ones with the blend off); ``attention`` (rows, columns): the edit word's cross-attention
    in the source, averaged over heads, layers and steps, at the local blend's resolution (the latent's
    aspect; 16 x 16 for SD at 512 pixels)."""

    image: Image.Image
    source: Image.Image
    mask: np.ndarray
    attention: np.ndarray

    def mask_image(self) -> Image.Image:
        """The mask as an 8-bit grey image (255 where the edit was kept)."""
        return Image.fromarray(np.round(self.mask * 255).astype(np.uint8))

    def attention_image(self) -> Image.Image:
        """The edit word's attention map as an 8-bit grey image of the edited image's size: upsampled
        bilinearly and divided by its maximum, as prompt-to-prompt shows it."""
        upsampled = np.asarray(Image.fromarray(self.attention.astype(np.float32)).resize(self.image.size,
                                                                                        Image.BILINEAR))
        grey = upsampled / max(float(upsampled.max()), np.finfo(np.float32).tiny)
        return Image.fromarray(np.round(np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8))


def edit_word_span(source_prompt: str, edit_word: str) -> tuple[int, int]:
    """Where the edit word stands in the source prompt (character span), as a whole word, any case; an
    InputError naming it unless it is one word that occurs exactly once."""
    word = edit_word.strip()
    if not word or any(char.isspace() for char in word):
        raise InputError(f"edit word {edit_word!r}: one word of the source prompt is needed")
    spans = [match.span() for match in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", source_prompt, re.IGNORECASE)]
    if not spans:
        raise InputError(f"edit word {word!r} is not a word of the source prompt {source_prompt!r}")
    if len(spans) > 1:
        raise InputError(f"edit word {word!r} occurs {len(spans)} times in the source prompt {source_prompt!r}; "
                         "the subject replaces one word")
    return spans[0]


@dataclass(frozen=True)
class EditPrompts:
    """The source prompt (the sentence), the target prompt, and where the edit word stands in the source and
    the subject (placeholders and target category) in the target, as character spans."""

    source: str
    target: str
    edit_span: tuple[int, int]
    subject_span: tuple[int, int]


def build_edit_prompts(source_prompt: str, edit_word: str, target_category: str,
                       slots: int = NUM_QUERY_TOKENS) -> EditPrompts:
    """The sentence, and the sentence with the edit word replaced by ``slots`` placeholder words and the target
    category (LAVIS ``_build_prompts_edit``); an InputError for an edit word that is not one of its words."""
    source = " ".join(source_prompt.split())
    category = " ".join(target_category.split())
    if not category:
        raise InputError("the target category is empty")
    start, end = edit_word_span(source, edit_word)
    subject = f"{' '.join([PLACEHOLDER] * slots)} {category}"
    return EditPrompts(source, source[:start] + subject + source[end:], (start, end), (start, start + len(subject)))


def check_edit_options(num_inference_steps: int, num_inversion_steps: int, cross_replace_steps: float,
                       self_replace_steps: float, lb_threshold: float) -> None:
    """The step counts and prompt-to-prompt fractions; an InputError naming the first bad one."""
    for name, steps in (("inference steps", num_inference_steps), ("inversion steps", num_inversion_steps)):
        if steps < 1:
            raise InputError(f"{steps} {name}: at least 1 is needed")
    for name, fraction in (("cross-attention replacement", cross_replace_steps),
                           ("self-attention replacement", self_replace_steps)):
        if not 0.0 <= fraction <= 1.0:
            raise InputError(f"{name} {fraction}: a fraction of the steps, from 0 to 1")
    if not 0.0 <= lb_threshold < 1.0:
        raise InputError(f"local blend threshold {lb_threshold}: from 0 (blend off) to below 1")


def inversion_pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """A photo as LAVIS's ``_inversion_transform`` prepares it for the VAE, at any output size: scaled to cover
    (height, width), centre-cropped to it, in [-1, 1], (1, 3, height, width)."""
    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = round((size[0] - width) / 2), round((size[1] - height) / 2)
    array = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


class BlipDiffusionEditPipeline:
    """Editing with a :class:`BlipDiffusion` model: ``pipeline(subject_image, subject_category, source_prompt,
    edit_word, ...)`` puts the subject in place of the edit word of a generated image or of a photo; see the
    module's description."""

    def __init__(self, model: BlipDiffusion, scheduler: SchedulerMixin | None = None, progress: bool = False) -> None:
        self.generation = BlipDiffusionPipeline(model, scheduler, progress)
        self.model = self.generation.model
        # a photo is inverted and edited with DDIM on the model's noise schedule, as LAVIS's ddim_scheduler
        self.ddim = build_scheduler(model.scheduler_config, "DDIM")
        self.progress = progress

    @classmethod
    def from_pretrained(cls, source: str | Path, scheduler: str | None = None, qformer_tokenizer: str | None = None,
                        progress: bool = False) -> "BlipDiffusionEditPipeline":
        """A BLIP-Diffusion folder or hub id; ``scheduler`` names another of diffusers' schedulers to generate
        the source with (a photo is always inverted and edited with DDIM)."""
        model = BlipDiffusion.from_pretrained(source, qformer_tokenizer=qformer_tokenizer)
        return cls(model, build_scheduler(model.scheduler_config, scheduler), progress=progress)

    def to(self, device: str | torch.device) -> "BlipDiffusionEditPipeline":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.unet.device

    def _subject_embeddings(self, subject_image: Image.Image | None, subject_category: str,
                            subject_embeddings: torch.Tensor | None) -> torch.Tensor:
        if subject_embeddings is None:
            if subject_image is None:
                raise InputError("no subject image and no subject embedding to edit with")
            return self.generation.subject_embeddings([subject_image], [subject_category])
        if subject_image is not None:
            raise InputError("give a subject image or subject embeddings, not both")
        return subject_embeddings.to(self.device, self.model.text_encoder.dtype)

    def _controller(self, prompts: EditPrompts, slots: int, latent_size: tuple[int, int], num_steps: int,
                    cross_replace_steps: float, self_replace_steps: float,
                    lb_threshold: float) -> tuple[AttentionRefine, list[int], int]:
        """The attention controller for the two prompts, the edit word's token positions in the source and
        the position before which the subject embeddings go in the target."""
        tokenizer, length = self.model.tokenizer, self.model.tokenizer.model_max_length
        edit_tokens = word_token_indices(tokenizer, prompts.source, prompts.edit_span)
        # the source keeps its first length - 1 tokens and the end-of-text token
        if not edit_tokens or edit_tokens[-1] >= length - 1:
            edit_word = prompts.source[slice(*prompts.edit_span)]
            raise InputError(f"edit word {edit_word!r} falls past the {length} tokens the text encoder reads")
        subject_tokens = word_token_indices(tokenizer, prompts.target, prompts.subject_span)
        # the target is cut to length - slots tokens before the subject embeddings go in; its subject must stay
        if subject_tokens[-1] >= length - slots - 1:
            raise InputError(f"the source prompt is too long to edit: the subject does not fit in the "
                             f"{length - slots} tokens the target prompt keeps beside its subject embeddings")
        subject_at = subject_tokens[0]
        source_ids = tokenizer(prompts.source, truncation=True, max_length=length).input_ids
        target_ids = tokenizer(prompts.target, truncation=True, max_length=length - slots).input_ids
        target_ids = target_ids[:subject_at] + [SUBJECT_SLOT] * slots + target_ids[subject_at:]
        mapper, alphas = refinement_mapper(source_ids, target_ids, length)
        local_blend = LocalBlend(edit_tokens, lb_threshold) if lb_threshold > 0 else None
        controller = AttentionRefine(mapper.to(self.device), alphas.to(self.device, self.model.unet.dtype),
                                     num_steps, cross_replace_steps, self_replace_steps, AttentionStore(latent_size),
                                     local_blend)
        return controller, edit_tokens, subject_at

    def _encode_image(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        pixels = inversion_pixels(image, height, width).to(self.device, self.model.vae.dtype)
        # the posterior's mean: LAVIS samples it from the unseeded global generator, around the same mean
        return self.model.vae.encode(pixels).latent_dist.mode().float() * self.model.latent_scale

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, states: torch.Tensor, num_steps: int) -> torch.Tensor:
        """DDIM inversion without guidance (LAVIS ``_ddim_inverse``, ``_noise_latent_step``): from clean
        ``latents`` up the DDIM timesteps, each step predicting the noise at the next timestep from the
        current latents and moving them to that noise level."""
        self.ddim.set_timesteps(num_steps, device=self.device)
        stride = self.ddim.config.num_train_timesteps // self.ddim.num_inference_steps
        alphas = self.ddim.alphas_cumprod
        latents = latents.float()
        for step in tqdm(self.ddim.timesteps.flip(0), desc="inverting", disable=not self.progress):
            noise = self.model.unet(latents.to(self.model.unet.dtype), step, encoder_hidden_states=states).sample
            noise = noise.float()
            current = int(step) - stride
            alpha_now = alphas[current] if current >= 0 else self.ddim.final_alpha_cumprod
            alpha_next = alphas[int(step)]
            clean = (latents - (1 - alpha_now).sqrt() * noise) / alpha_now.sqrt()
            latents = alpha_next.sqrt() * clean + (1 - alpha_next).sqrt() * noise
        return latents

    @torch.no_grad()
    def __call__(self, subject_image: Image.Image | None, subject_category: str, source_prompt: str, edit_word: str,
                 *, target_category: str | None = None, image: Image.Image | None = None,
                 guidance_scale: float = GUIDANCE_SCALE, num_inference_steps: int = NUM_INFERENCE_STEPS,
                 num_inversion_steps: int = NUM_INFERENCE_STEPS, generator: torch.Generator | None = None,
                 neg_prompt: str = "", cross_replace_steps: float = CROSS_REPLACE_STEPS,
                 self_replace_steps: float = SELF_REPLACE_STEPS, lb_threshold: float = LB_THRESHOLD,
                 height: int | None = None, width: int | None = None,
                 subject_embeddings: torch.Tensor | None = None) -> EditResult:
        """Put the subject (``subject_image`` of ``subject_category``, or a fine-tuned folder's cached
        ``subject_embeddings``) in place of ``edit_word`` in ``source_prompt`` (the whole sentence), rendered
        as ``target_category`` (default: ``subject_category``); in the photo ``image`` if given, else in an
        image generated from the ``generator``'s noise. ``lb_threshold`` 0 switches the local blend off.
        ``height``/``width`` default to the model's training size."""
        check_edit_options(num_inference_steps, num_inversion_steps, cross_replace_steps, self_replace_steps,
                           lb_threshold)
        height, width = height or self.model.target_size, width or self.model.target_size
        self.generation._check_size(height, width)
        if subject_embeddings is not None and (subject_embeddings.ndim != 3 or len(subject_embeddings) != 1):
            raise InputError(f"subject embeddings of shape {tuple(subject_embeddings.shape)}: (1, queries, width) "
                             "is needed")
        # a placeholder word for each subject embedding: the Q-Former's queries, or the cached embedding's
        slots = subject_embeddings.shape[1] if subject_embeddings is not None else \
            self.model.qformer.config.num_query_tokens
        prompts = build_edit_prompts(source_prompt, edit_word, target_category or subject_category, slots)
        factor = self.model.vae_scale_factor
        controller, edit_tokens, subject_at = self._controller(
            prompts, slots, (height // factor, width // factor), num_inference_steps, cross_replace_steps,
            self_replace_steps, lb_threshold)
        ctx = self._subject_embeddings(subject_image, subject_category, subject_embeddings)

        source_states = self.model.text_conditioning([prompts.source], None)
        states = torch.cat([source_states, self.model.text_conditioning([prompts.target], ctx, ctx_at=subject_at)])
        guided = guidance_scale > 1.0
        if guided:  # the unconditional branch first, as for generation
            states = torch.cat([self.model.text_conditioning([neg_prompt] * 2, None), states])
        states = states.to(self.model.unet.dtype)
        if image is None:
            scheduler = self.generation.scheduler
            latents = self.generation.prepare_latents(1, height, width, generator)
        else:
            scheduler = self.ddim
            clean = self._encode_image(image, height, width)
            latents = self.invert(clean, source_states.to(self.model.unet.dtype), num_inversion_steps)
            latents = latents.to(self.model.unet.dtype)
        latents = latents.expand(2, -1, -1, -1)

        scheduler.set_timesteps(num_inference_steps, device=self.device)
        step_options = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        with attention_control(self.model.unet, controller):
            for step in tqdm(scheduler.timesteps, desc="editing", disable=not self.progress):
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = scheduler.scale_model_input(model_input, step)
                noise = self.model.unet(model_input, step, encoder_hidden_states=states).sample
                if guided:
                    unconditional, conditional = noise.chunk(2)
                    noise = unconditional + guidance_scale * (conditional - unconditional)
                    if image is not None:  # the source retraces the inversion, which ran without guidance
                        noise = torch.cat([conditional[:1], noise[1:]])
                latents = scheduler.step(noise, step, latents, **step_options).prev_sample
                latents = controller.step_callback(latents)

        decoded = self.model.vae.decode(latents.to(self.model.vae.dtype) / self.model.latent_scale).sample
        source_image, edited = self.generation.image_processor.postprocess(decoded.float(), output_type="pil")
        if controller.local_blend is None:
            mask = torch.ones(height, width)
        else:
            mask = F.interpolate(controller.local_blend.mask[None, None].float(), size=(height, width))[0, 0]
        attention = controller.store.word_map(edit_tokens)
        return EditResult(image=edited, source=source_image, mask=mask.cpu().numpy(),
                          attention=attention.cpu().numpy())
