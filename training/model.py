"""BLIP-Diffusion's subject representation model, built from transformers and diffusers parts.

The layout and the weight names are those of the released ``Salesforce/blipdiffusion`` (diffusers folder
layout: ``qformer/``, ``text_encoder/``, ``unet/``, ``vae/``, ``scheduler/``, ``tokenizer/``,
``image_processor/``), so its weights load as they are for continued pre-training. diffusers' own
implementation is deprecated and does not run under transformers 5; the modules here reuse transformers'
BLIP-2 and CLIP layers and only add what BLIP-Diffusion changes:

- ``SubjectQFormer``: the multimodal Q-Former. A frozen CLIP ViT-L/14 image encoder (23 layers, in BLIP-2
  layout), 16 learned queries that self-attend together with the subject-text tokens and cross-attend to
  the image in every layer, and a projection (LayerNorm, Linear 768->3072, QuickGELU as released, Linear
  back, residual) to the text encoder's width.
- ``ContextCLIPTextModel``: CLIP's text encoder with the 16 subject embeddings inserted among the token
  embeddings (before positions are added), just before the end-of-text token of
  ``"{caption}, the {category} is"``.
- ``BlipDiffusion``: the above with SD-1.5's UNet, frozen VAE and a DDPM noise schedule; its ``forward``
  is the pre-training loss, ``generate`` samples zero-shot subject-driven images.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import BertTokenizer, Blip2Config, CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.activations import QuickGELUActivation
from transformers.conversion_mapping import PrefixChange, register_checkpoint_conversion_mapping
from transformers.masking_utils import create_causal_mask
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2Encoder,
    Blip2PreTrainedModel,
    Blip2QFormerEncoder,
)

from subjectpairs.errors import InputError

from .tiny_tokenizers import tiny_bert_tokenizer, tiny_clip_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_QUERY_TOKENS = 16
DROP_SUBJECT_PROB = 0.15
SUBJECT_TEXT_TOKENS = 16
ModelKind = Literal["tiny", "blip-diffusion"]
# diffusers' Q-Former loads the tokenizer its config names, else this one.
DEFAULT_QFORMER_TOKENIZER = "bert-base-uncased"
# What an export names: its own qformer/ folder, relative to the model folder (see load_qformer_tokenizer).
EXPORT_QFORMER_TOKENIZER = "qformer"
# Category words that every usable tokenizer has as tokens, the tiny test vocabularies included.
PROBE_WORDS = ("dog", "cup", "car")
QFORMER_TOKENIZER_HINT = ("pass a BERT tokenizer folder or hub id: --set qformer_tokenizer=FOLDER (train), "
                          "--qformer-tokenizer FOLDER (generate), or \"tokenizer\" in qformer/config.json")


def training_prompt(caption: str, category: str) -> str:
    return f"{caption.strip().rstrip('.')}, the {category.lower()} is"


class SubjectTextEmbeddings(nn.Module):
    """Queries followed by the subject-text tokens (with positions), layer-normed: the Q-Former's input."""

    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor, query_embeds: torch.Tensor) -> torch.Tensor:
        text = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, : input_ids.shape[1]])
        queries = query_embeds.expand(input_ids.shape[0], -1, -1).to(text.dtype)
        return self.dropout(self.LayerNorm(torch.cat([queries, text], dim=1)))


class ProjLayer(nn.Module):
    """Residual MLP from the Q-Former's outputs to subject embeddings (names as in the released weights)."""

    def __init__(self, width: int, eps: float = 1e-12, dropout: float = 0.1) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dense1 = nn.Linear(width, width * 4)
        self.act_fn = QuickGELUActivation()
        self.dense2 = nn.Linear(width * 4, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.dense2(self.act_fn(self.dense1(self.LayerNorm(x)))))


class ImageEmbeddings(nn.Module):
    """CLIP's patch embedding (no bias, unlike transformers' BLIP-2 one), class token and positions."""

    def __init__(self, config) -> None:
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Parameter(torch.randn(1, (config.image_size // patch) ** 2 + 1, width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype), patches], dim=1)
        return tokens + self.position_embedding.to(patches.dtype)


class ImageEncoder(nn.Module):
    """CLIP ViT in BLIP-2 layout (fused qkv), with CLIP's pre-LayerNorm; frozen during training."""

    def __init__(self, config) -> None:
        super().__init__()
        self.embeddings = ImageEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layernorm(self.embeddings(pixel_values))
        return self.post_layernorm(self.encoder(inputs_embeds=hidden).last_hidden_state)


class SubjectQFormer(Blip2PreTrainedModel):
    """The multimodal Q-Former: subject image + subject text -> ``num_query_tokens`` subject embeddings."""

    config_class = Blip2Config
    main_input_name = "pixel_values"
    _no_split_modules = ["Blip2QFormerLayer", "Blip2EncoderLayer"]

    def __init__(self, config: Blip2Config) -> None:
        # Released configs predate this flag; without it the text tokens get no feed-forward layers.
        config.qformer_config.use_qformer_text_input = True
        config.qformer_config._attn_implementation = "sdpa"
        config.vision_config._attn_implementation = "sdpa"
        super().__init__(config)
        width = config.qformer_config.hidden_size
        self.embeddings = SubjectTextEmbeddings(config.qformer_config)
        self.visual_encoder = ImageEncoder(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, width))
        self.proj_layer = ProjLayer(width)
        self.encoder = Blip2QFormerEncoder(config.qformer_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SubjectTextEmbeddings):
            # Non-persistent buffers are not in checkpoints; from_pretrained materializes them here.
            with torch.no_grad():
                module.position_ids.copy_(torch.arange(module.position_ids.shape[1])[None])
        elif isinstance(module, ImageEmbeddings):
            std = self.config.vision_config.initializer_range
            nn.init.trunc_normal_(module.class_embedding, std=std)
            nn.init.trunc_normal_(module.position_embedding, std=std)
        elif module is self:
            # Identical zero queries would stay identical under training; BLIP-2 starts them random.
            nn.init.normal_(self.query_tokens, std=self.config.qformer_config.initializer_range)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image = self.visual_encoder(pixel_values)
        hidden = self.embeddings(input_ids, self.query_tokens)
        queries = self.query_tokens.shape[1]
        keep = torch.cat([attention_mask.new_ones(attention_mask.shape[0], queries), attention_mask], dim=1).bool()
        hidden = self.encoder(hidden, attention_mask=keep[:, None, None, :], encoder_hidden_states=image,
                              query_length=queries).last_hidden_state
        return self.proj_layer(hidden[:, :queries])


class ContextCLIPTextModel(CLIPTextModel):
    """CLIP's text encoder taking token embeddings in which subject embeddings have been inserted."""

    def token_embeddings(self, input_ids: torch.Tensor, ctx_embeddings: torch.Tensor | None = None,
                         eot_token_id: int | None = None) -> torch.Tensor:
        """Token embeddings; with ``ctx_embeddings`` (B, Q, H), each row's are inserted just before its
        first end-of-text token (the sequence grows by Q)."""
        embeds = self.embeddings.token_embedding(input_ids)
        if ctx_embeddings is None:
            return embeds
        at = (input_ids == eot_token_id).int().argmax(dim=1).tolist()
        ctx_embeddings = ctx_embeddings.to(embeds.dtype)
        return torch.stack([torch.cat([embeds[i, :p], ctx_embeddings[i], embeds[i, p:]]) for i, p in enumerate(at)])

    def forward(self, inputs_embeds: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore[override]
        positions = self.embeddings.position_ids[:, : inputs_embeds.shape[1]]
        hidden = inputs_embeds + self.embeddings.position_embedding(positions)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return self.final_layer_norm(hidden)


# The released checkpoint nests the text encoder's weights under ``text_model.`` as transformers 4 did;
# transformers 5 maps that prefix for its own CLIPTextModel only, by class name.
register_checkpoint_conversion_mapping("ContextCLIPTextModel", [PrefixChange(prefix_to_remove="text_model")],
                                       overwrite=True)


def _model_configs(kind: ModelKind, clip_vocab: int, bert_vocab: int) -> dict:
    if kind == "blip-diffusion":  # SD-1.5 + CLIP ViT-L/14 (23 layers) + BERT-base Q-Former, as released
        text, vision, qformer_width = 768, 1024, 768
        return {
            "text": CLIPTextConfig(vocab_size=49408, hidden_size=text, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
            "qformer": Blip2Config(
                vision_config={"hidden_size": vision, "intermediate_size": 4096, "num_hidden_layers": 23,
                               "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "qkv_bias": True},
                qformer_config={"vocab_size": 30523, "hidden_size": qformer_width, "num_hidden_layers": 12,
                                "num_attention_heads": 12, "intermediate_size": 3072, "cross_attention_frequency": 1,
                                "encoder_hidden_size": vision},
                num_query_tokens=NUM_QUERY_TOKENS),
            "unet": {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
                     "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     "cross_attention_dim": text, "attention_head_dim": 8},
            "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512,
                    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4},
        }
    width = 32
    return {
        "text": CLIPTextConfig(vocab_size=clip_vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                               bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1),
        "qformer": Blip2Config(
            vision_config={"hidden_size": width, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu",
                           "layer_norm_eps": 1e-5, "qkv_bias": True},
            qformer_config={"vocab_size": bert_vocab, "hidden_size": width, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "intermediate_size": 64, "cross_attention_frequency": 1,
                            "encoder_hidden_size": width, "max_position_embeddings": 64},
            num_query_tokens=NUM_QUERY_TOKENS),
        "unet": {"sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
                 "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": width,
                 "attention_head_dim": 4},
        "vae": {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
                "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4},
    }


SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                "clip_sample": False}


class BlipDiffusion(nn.Module):
    """The whole model. Trainable: the Q-Former (without its image encoder), the text encoder and the
    UNet; frozen: the image encoder and the VAE (see ``freeze``)."""

    def __init__(self, qformer: SubjectQFormer, text_encoder: ContextCLIPTextModel, unet, vae,
                 tokenizer: CLIPTokenizer, qformer_tokenizer: BertTokenizer, scheduler_config: dict,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, drop_subject_prob: float = DROP_SUBJECT_PROB) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.qformer, self.text_encoder, self.unet, self.vae = qformer, text_encoder, unet, vae
        self.tokenizer, self.qformer_tokenizer = tokenizer, qformer_tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.drop_subject_prob = drop_subject_prob
        self.freeze()

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, kind: ModelKind, seed: int = 0) -> "BlipDiffusion":
        """Random weights of the given size, with small locally built tokenizers (tests, the demo,
        benchmarks: a random full-size model costs the same per step as the released one)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = tiny_clip_tokenizer(Path(scratch) / "clip")
            qformer_tokenizer = tiny_bert_tokenizer(Path(scratch) / "bert")
        qformer_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        configs = _model_configs(kind, len(tokenizer), len(qformer_tokenizer))
        with torch.random.fork_rng():  # seeded weights without touching the caller's random stream
            torch.manual_seed(seed)
            return cls(
                qformer=SubjectQFormer(configs["qformer"]),
                text_encoder=ContextCLIPTextModel(configs["text"]),
                unet=UNet2DConditionModel(**configs["unet"]),
                vae=AutoencoderKL(**configs["vae"]),
                tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                scheduler_config={"_class_name": "PNDMScheduler", **SD_SCHEDULER},
            )

    @classmethod
    def from_pretrained(cls, source: str | Path, qformer_tokenizer: str | None = None) -> "BlipDiffusion":
        """A diffusers BLIP-Diffusion folder or hub id (``Salesforce/blipdiffusion``, or an export)."""
        return cls.from_parts(source, source, qformer_tokenizer)

    @classmethod
    def from_parts(cls, diffusion: str | Path, qformer: str | Path,
                   qformer_tokenizer: str | None = None) -> "BlipDiffusion":
        """Text encoder, UNet, VAE, tokenizer and scheduler from ``diffusion`` (a BLIP-Diffusion or a
        Stable Diffusion 1.5 folder or hub id), the Q-Former from ``qformer`` (a BLIP-Diffusion folder,
        whose ``qformer/`` is used, or a Q-Former folder in that layout: a BLIP-2 Q-Former on a CLIP
        ViT-L/14, as the paper pre-trained it).

        The Q-Former tokenizer is found as :func:`load_qformer_tokenizer` says (``qformer_tokenizer``
        first). Every weight file must fit its module exactly (see :func:`load_component`)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        diffusion, qformer = str(diffusion), str(qformer)
        subfolder = _qformer_subfolder(qformer)
        bert = load_qformer_tokenizer(qformer, qformer_tokenizer)
        tokenizer = CLIPTokenizer.from_pretrained(diffusion, subfolder="tokenizer")
        _check_tokenizes(tokenizer, f"{diffusion}: tokenizer/ (the CLIP tokenizer)",
                         "a folder with tokenizer/vocab.json and tokenizer/merges.txt")
        processor = _read_image_processor(qformer) if subfolder else {}
        scheduler = dict(DDPMScheduler.load_config(diffusion, subfolder="scheduler"))
        return cls(
            qformer=load_component(SubjectQFormer, qformer, subfolder),
            text_encoder=load_component(ContextCLIPTextModel, diffusion, "text_encoder"),
            unet=load_component(UNet2DConditionModel, diffusion, "unet"),
            vae=load_component(AutoencoderKL, diffusion, "vae"),
            tokenizer=tokenizer,
            qformer_tokenizer=bert,
            scheduler_config=scheduler,
            image_mean=processor.get("image_mean", CLIP_MEAN), image_std=processor.get("image_std", CLIP_STD),
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """The released ``Salesforce/blipdiffusion`` layout, safetensors weights, that diffusers' own
        classes load: weight names as diffusers' modules have them, the tokenizers as vocabulary files (its
        slow tokenizer classes read no ``tokenizer.json``), and the Q-Former's tokenizer saved beside it and
        named in ``qformer/config.json`` (``"tokenizer": "qformer"``; see :func:`load_qformer_tokenizer`)."""
        import diffusers

        folder = Path(folder)
        self.qformer.save_pretrained(folder / "qformer")
        _rewrite_weights(folder / "qformer", "", self.qformer.embeddings.position_ids)
        config_file = folder / "qformer" / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer": EXPORT_QFORMER_TOKENIZER},
                                          indent=2, sort_keys=True))
        _save_vocabulary_files(self.qformer_tokenizer, folder / "qformer")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        _rewrite_weights(folder / "text_encoder", "text_model.", self.text_encoder.embeddings.position_ids)
        _save_vocabulary_files(self.tokenizer, folder / "tokenizer")
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        scheduler_class = getattr(diffusers, self.scheduler_config.get("_class_name", "PNDMScheduler"))
        scheduler_class.from_config(self.scheduler_config).save_pretrained(folder / "scheduler")
        (folder / "image_processor").mkdir(parents=True, exist_ok=True)
        (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "BlipImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": self.input_size, "width": self.input_size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.image_mean),
            "image_std": list(self.image_std)}, indent=2))
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "BlipDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "qformer": ["blip_diffusion", "Blip2QFormerModel"],
            "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", scheduler_class.__name__], "tokenizer": ["transformers", "CLIPTokenizer"],
            "image_processor": ["blip_diffusion", "BlipImageProcessor"], "ctx_begin_pos": 2,
            "mean": list(self.image_mean), "std": list(self.image_std)}, indent=2))
        return folder

    # -- training --------------------------------------------------------------------------------------
    def freeze(self) -> None:
        self.qformer.visual_encoder.requires_grad_(False).eval()
        self.vae.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "BlipDiffusion":
        super().train(mode)
        self.freeze()  # the frozen parts always run as at inference
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"trainable weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        self.load_state_dict(state, strict=False)

    @property
    def input_size(self) -> int:
        return int(self.qformer.config.vision_config.image_size)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def target_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def subject_embeddings(self, pixel_values: torch.Tensor, categories: list[str]) -> torch.Tensor:
        tokens = self.qformer_tokenizer([c.lower() for c in categories], padding="longest", truncation=True,
                                        max_length=SUBJECT_TEXT_TOKENS, return_tensors="pt").to(pixel_values.device)
        return self.qformer(pixel_values, tokens.input_ids, tokens.attention_mask)

    def _tokens(self, texts: list[str], length: int, device) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                              return_tensors="pt").input_ids.to(device)

    def text_conditioning(self, prompts: list[str], ctx: torch.Tensor | None,
                          with_subject: torch.Tensor | None = None) -> torch.Tensor:
        """UNet conditioning (B, 77, H). With ``ctx`` (B, 16, H) every prompt keeps its first 61 tokens; rows
        with ``with_subject`` (default: all) get their 16 subject embeddings just before the end-of-text
        token, the other rows the same tokens padded to 77: the authors' subject drop leaves the text as it
        is and only takes the embeddings out. Without ``ctx`` a prompt keeps 77 tokens."""
        device = self.text_encoder.device
        full = self.tokenizer.model_max_length
        if ctx is None:
            return self.text_encoder(self.text_encoder.token_embeddings(self._tokens(prompts, full, device)))
        slots = ctx.shape[1]
        ids = self._tokens(prompts, full - slots, device)
        embeds = self.text_encoder.token_embeddings(F.pad(ids, (0, slots), value=self.tokenizer.pad_token_id))
        with_subject = torch.ones(len(prompts), dtype=torch.bool) if with_subject is None else with_subject.cpu()
        subject_rows = with_subject.nonzero().flatten().tolist()
        if subject_rows:
            embeds[subject_rows] = self.text_encoder.token_embeddings(ids[subject_rows], ctx[subject_rows],
                                                                      self.tokenizer.eos_token_id)
        return self.text_encoder(embeds)

    def forward(self, pixel_values: torch.Tensor, captions: list[str], categories: list[str],
                target: torch.Tensor | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The pre-training loss: epsilon MSE at a uniform DDPM timestep. ``latents`` are cached VAE
        posteriors (mean and std stacked on channels), used instead of encoding ``target``."""
        if latents is not None:
            mean, std = latents.float().chunk(2, dim=1)
            clean = mean + std * torch.randn_like(mean)
        else:
            with torch.no_grad():
                clean = self.vae.encode(target).latent_dist.sample()
        clean = clean * self.latent_scale
        noise = torch.randn_like(clean)
        steps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                              device=clean.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, steps)
        ctx = self.subject_embeddings(pixel_values, categories)
        with_subject = torch.rand(len(captions)) >= self.drop_subject_prob
        hidden = self.text_conditioning([training_prompt(c, k) for c, k in zip(captions, categories)], ctx,
                                        with_subject)
        predicted = self.unet(noisy, steps, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(predicted.float(), noise.float())
        if not bool(with_subject.any()):
            # Under DDP every trainable parameter needs a gradient each step, the Q-Former's too.
            loss = loss + 0.0 * ctx.sum()
        return loss

    # -- inference -------------------------------------------------------------------------------------
    def subject_pixels(self, image: Image.Image) -> torch.Tensor:
        size = self.input_size
        array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)[None]

    @torch.no_grad()
    def generate(self, subject_image: Image.Image, category: str, prompt: str, steps: int = 50,
                 guidance: float = 7.5, seed: int = 0, negative_prompt: str = "") -> Image.Image:
        """Zero-shot subject-driven generation with classifier-free guidance (the unconditional branch
        sees ``negative_prompt`` alone, 77 tokens without subject embeddings, as diffusers' pipeline)."""
        import diffusers

        device = self.unet.device
        self.eval()
        scheduler_class = getattr(diffusers, self.scheduler_config.get("_class_name", "PNDMScheduler"))
        scheduler = scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        ctx = self.subject_embeddings(self.subject_pixels(subject_image).to(device), [category])
        hidden = torch.cat([self.text_conditioning([negative_prompt], None),  # unconditional first
                            self.text_conditioning([training_prompt(prompt, category)], ctx)])
        generator = torch.Generator().manual_seed(seed)
        side = self.unet.config.sample_size
        latents = torch.randn((1, self.unet.config.in_channels, side, side), generator=generator).to(device)
        latents = latents * scheduler.init_noise_sigma
        for step in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), step)
            unconditional, conditional = self.unet(model_input, step, encoder_hidden_states=hidden).sample.chunk(2)
            noise = unconditional + guidance * (conditional - unconditional)
            latents = scheduler.step(noise, step, latents).prev_sample
        image = self.vae.decode(latents / self.latent_scale).sample[0]
        array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)


def _read_image_processor(source: str) -> dict:
    local = Path(source) / "image_processor" / "preprocessor_config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(source, "preprocessor_config.json", subfolder="image_processor")).read_text())
    except Exception:  # no processor config published: CLIP's statistics, as the released model uses
        return {}


def _qformer_subfolder(source: str) -> str:
    """``qformer`` for a whole BLIP-Diffusion folder or hub repository, "" for a Q-Former folder."""
    local = Path(source)
    if local.is_dir():
        return "qformer" if (local / "qformer" / "config.json").is_file() else ""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(source, "config.json", subfolder="qformer")
        return "qformer"
    except Exception:  # not found, or offline: a Q-Former repository has its config at the root
        return ""


def _has_file(source: str, subfolder: str, name: str) -> bool:
    local = Path(source)
    if local.is_dir():
        return (local / subfolder / name).is_file()
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(source, name, subfolder=subfolder or None)
        return True
    except Exception:  # not published, or offline
        return False


def _tokenizer_beside_model(qformer: str, subfolder: str, named: str) -> str:
    """A relative folder named in the Q-Former's config, taken from the model folder (the one holding
    ``qformer/``), so that a moved or copied export still finds its own tokenizer; anything else (a hub
    id, an absolute path) as given, as diffusers passes it on."""
    root = Path(qformer)
    if not root.is_dir() or Path(named).is_absolute():
        return named
    if not subfolder and (root.parent / "model_index.json").is_file():
        root = root.parent  # the qformer/ folder of a whole model folder, given on its own
    return str(root / named) if (root / named).is_dir() else named


def _check_tokenizes(tokenizer, described: str, hint: str) -> None:
    """transformers 5 builds a tokenizer of special tokens only, without an error, from a folder without a
    vocabulary or from a hub id while offline; every word would become the unknown token."""
    for word in PROBE_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids or all(token == tokenizer.unk_token_id for token in ids):
            raise InputError(f"{described}: a vocabulary of {len(tokenizer)} tokens that cannot tokenize "
                             f"{word!r}; {hint}")


def load_qformer_tokenizer(qformer: str | Path, override: str | None = None) -> BertTokenizer:
    """The BERT tokenizer of the Q-Former in ``qformer`` (a BLIP-Diffusion or Q-Former folder or hub id),
    the first of: ``override``; the ``"tokenizer"`` that the Q-Former's ``config.json`` names, which
    diffusers' Q-Former loads (a relative folder is taken from the model folder); a vocabulary saved beside
    the Q-Former; ``bert-base-uncased``, diffusers' default. ``[DEC]`` is added as the beginning-of-sequence
    token, as diffusers does. A tokenizer that does not load or cannot tokenize common category words is an
    InputError naming what to pass."""
    qformer = str(qformer)
    subfolder = _qformer_subfolder(qformer)
    from transformers import PretrainedConfig

    named = PretrainedConfig.get_config_dict(qformer, subfolder=subfolder)[0].get("tokenizer")
    if override:
        source, inner, origin = override, "", "qformer_tokenizer"
    elif named:
        config = f"{qformer}/{subfolder}/config.json" if subfolder else f"{qformer}/config.json"
        source, inner, origin = _tokenizer_beside_model(qformer, subfolder, named), "", f'"tokenizer" in {config}'
    elif _has_file(qformer, subfolder, "vocab.txt") or _has_file(qformer, subfolder, "tokenizer.json"):
        source, inner, origin = qformer, subfolder, "saved beside the Q-Former"
    else:
        source, inner, origin = DEFAULT_QFORMER_TOKENIZER, "", f"none named or saved in {qformer}, so the default"
    described = f"Q-Former tokenizer {source}{f'/{inner}' if inner else ''} ({origin})"
    try:
        tokenizer = BertTokenizer.from_pretrained(source, subfolder=inner, truncation_side="right")
    except (OSError, ValueError) as exc:
        raise InputError(f"{described}: cannot load it ({str(exc).splitlines()[0]}); {QFORMER_TOKENIZER_HINT}") from exc
    _check_tokenizes(tokenizer, described, QFORMER_TOKENIZER_HINT)
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def load_component(cls, source: str, subfolder: str):
    """``cls.from_pretrained`` that stops on weights that do not fit the module exactly: transformers and
    diffusers leave a missing weight randomly initialised, with a log line at most, and a model on random
    weights must never pass for a trained one."""
    from transformers import PreTrainedModel

    where = f"{source}/{subfolder}" if subfolder else source
    # transformers raises on mismatched shapes without naming them; told to skip them, it lists them
    options = {"ignore_mismatched_sizes": True} if issubclass(cls, PreTrainedModel) else {}
    try:
        model, info = cls.from_pretrained(source, subfolder=subfolder, output_loading_info=True, **options)
    except ValueError as exc:  # diffusers refuses mismatched shapes itself, naming the first
        raise InputError(f"{where}: weights do not fit {cls.__name__} ({str(exc).splitlines()[0]})") from exc
    mismatched = [key if isinstance(key, str) else key[0] for key in info["mismatched_keys"]]
    problems = [f"{kind} {', '.join(sorted(keys)[:5])}{', ...' if len(keys) > 5 else ''}"
                for kind, keys in (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"]),
                                   ("mismatched", mismatched)) if keys]
    if problems:
        raise InputError(f"{where}: weights do not match {cls.__name__} ({'; '.join(problems)})")
    return model


def _rewrite_weights(folder: Path, prefix: str, position_ids: torch.Tensor) -> None:
    """Weight names as diffusers' module has them: under ``prefix``, and with the position ids that it
    keeps as a saved buffer. transformers 5 saves no such buffer, and puts the prefix back only on a
    module that it loaded through the prefix mapping, not on one built from a config."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    weights = {name if name.startswith(prefix) else prefix + name: tensor for name, tensor in load_file(file).items()}
    weights[f"{prefix}embeddings.position_ids"] = position_ids.detach().cpu().contiguous()
    save_file(weights, file, metadata={"format": "pt"})


def _save_vocabulary_files(tokenizer, folder: Path) -> None:
    """The tokenizer as the released repository holds it: vocabulary files (``vocab.json`` and
    ``merges.txt``, or ``vocab.txt``), ``special_tokens_map.json`` and ``tokenizer_config.json``, which
    diffusers' slow tokenizer classes read. No ``tokenizer.json``: transformers 5 builds the same tokenizer
    from the vocabulary files."""
    tokenizer.save_pretrained(folder)
    tokenizer.backend_tokenizer.model.save(str(folder))
    (folder / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map, indent=2))
    (folder / "tokenizer.json").unlink()
