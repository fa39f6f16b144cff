"""DreamBench's metrics as DreamBooth defined them (Ruiz et al. 2023, section 4.1; BLIP-Diffusion A.4).

- DINO: cosine similarity of the CLS token of the last hidden state of a self-supervised ViT-S/16 (DINO,
  ``facebook/dino-vits16``) between a generated image and a real photo of the subject, averaged over the
  subject's real photos. Unlike CLIP it tells apart subjects of the same class.
- CLIP-I: the same with CLIP ViT-B/32's projected image features (``openai/clip-vit-base-patch32``).
- CLIP-T: cosine similarity of the generated image's and the prompt's projected CLIP features.
- The real-image oracle: DINO and CLIP-I of each real photo against the subject's other photos.

Both models load through ``from_pretrained`` (hub ids or local folders), with their own image processors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

from subjectpairs.errors import InputError

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"


@dataclass
class ImageFeatures:
    """Unit-length DINO and CLIP image features, one row per image."""

    dino: torch.Tensor
    clip: torch.Tensor


def _load(kind: str, source: str, loader):
    try:
        return loader(source)
    except (OSError, ValueError) as exc:
        raise InputError(f"{kind} {source}: cannot load it ({str(exc).splitlines()[0]})") from exc


def _load_model(flag: str, source: str, cls, model_type: str, **options):
    """``cls.from_pretrained`` that refuses a checkpoint of another architecture or with weights missing:
    transformers would load it with a warning and random weights, and every score would be noise."""
    model, info = _load(flag, source, lambda s: cls.from_pretrained(s, output_loading_info=True, **options))
    if model.config.model_type != model_type:
        raise InputError(f"{flag} {source}: a {model.config.model_type} model, not {model_type}")
    missing = [*info["missing_keys"], *(key if isinstance(key, str) else key[0] for key in info["mismatched_keys"])]
    if missing:
        raise InputError(f"{flag} {source}: weights missing or of other shapes for {cls.__name__} "
                         f"({', '.join(sorted(missing)[:5])}{', ...' if len(missing) > 5 else ''})")
    return model


class SubjectScorer:
    """The DINO and CLIP models of the metrics, on one device, in eval mode."""

    def __init__(self, clip_model: str = DEFAULT_CLIP_MODEL, dino_model: str = DEFAULT_DINO_MODEL,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.clip = _load_model("--clip-model", clip_model, CLIPModel, "clip").eval().to(self.device)
        self.clip_processor = _load("--clip-model", clip_model, CLIPProcessor.from_pretrained)
        # the CLS token of the last hidden state, not a pooler, as DreamBooth's DINO score reads it
        self.dino = _load_model("--dino-model", dino_model, ViTModel, "vit",
                                add_pooling_layer=False).eval().to(self.device)
        self.dino_processor = _load("--dino-model", dino_model, AutoImageProcessor.from_pretrained)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> ImageFeatures:
        rgb = [image.convert("RGB") for image in images]
        dino_pixels = self.dino_processor(images=rgb, return_tensors="pt").pixel_values.to(self.device)
        dino = self.dino(pixel_values=dino_pixels).last_hidden_state[:, 0]
        clip_pixels = self.clip_processor(images=rgb, return_tensors="pt").pixel_values.to(self.device)
        clip = self.clip.get_image_features(pixel_values=clip_pixels)
        clip = clip.pooler_output if hasattr(clip, "pooler_output") else clip  # transformers 5 returns an output
        return ImageFeatures(F.normalize(dino.float(), dim=-1).cpu(), F.normalize(clip.float(), dim=-1).cpu())

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.clip_processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        text = self.clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        text = text.pooler_output if hasattr(text, "pooler_output") else text
        return F.normalize(text.float(), dim=-1).cpu()


def subject_fidelity(generated: ImageFeatures, real: ImageFeatures) -> dict[str, torch.Tensor]:
    """Per generated image: ``dino`` and ``clip_i``, its mean cosine similarity to the subject's real photos."""
    return {"dino": (generated.dino @ real.dino.T).mean(dim=1), "clip_i": (generated.clip @ real.clip.T).mean(dim=1)}


def prompt_fidelity(generated: ImageFeatures, prompts: torch.Tensor) -> torch.Tensor:
    """Per generated image: ``clip_t``, the cosine similarity of its CLIP features and its prompt's (row-wise)."""
    return (generated.clip * prompts).sum(dim=1)


def real_image_oracle(real: ImageFeatures) -> dict[str, float]:
    """DINO and CLIP-I of every real photo against each of the subject's other photos, averaged over the
    ordered pairs (the upper bound a generator could reach by copying a photo of another view)."""
    count = real.dino.shape[0]
    if count < 2:
        raise InputError("the real-image oracle needs two photos of the subject or more")
    others = ~torch.eye(count, dtype=torch.bool)
    return {"dino": float((real.dino @ real.dino.T)[others].mean()),
            "clip_i": float((real.clip @ real.clip.T)[others].mean())}
