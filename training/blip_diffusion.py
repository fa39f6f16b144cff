"""BLIP-Diffusion, composed: the Q-Former, the context text encoder, SD-1.5's UNet and VAE, the tokenizers and
the noise schedule, loaded from and saved to the released ``Salesforce/blipdiffusion`` folder layout.

diffusers' own implementation is deprecated and does not run under transformers 5; this one is built from
transformers and diffusers parts, loads the released weights by their names, and saves folders that
diffusers' classes load (tests/test_diffusers_parity.py). Generation is
:class:`~subjectpairs.training.pipeline_blip_diffusion.BlipDiffusionPipeline`; the training objective is
:func:`~subjectpairs.training.loss.pretraining_loss`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import BertTokenizer, CLIPTokenizer

from .loss import DROP_SUBJECT_PROB, pretraining_loss
from .model_folders import (
    DECODER_BOS_TOKEN,
    EXPORT_QFORMER_TOKENIZER,
    check_tokenizes,
    load_component,
    load_qformer_tokenizer,
    qformer_subfolder,
    read_json_file,
    save_qformer_folder,
    save_vocabulary_files,
    write_weights_as_released,
)
from .presets import CLIP_MEAN, CLIP_STD, SD_SCHEDULER, ModelKind, model_configs
from .qformer import SubjectQFormer
from .schedulers import build_scheduler
from .text_encoder import ContextCLIPTextModel
from .tiny_tokenizers import tiny_bert_tokenizer, tiny_clip_tokenizer
from .trainable_weights import TrainableWeights

# The Q-Former reads at most this many tokens of the subject's category.
SUBJECT_TEXT_TOKENS = 16
# Where inference inserts the subject embeddings when a folder does not say (the released model_index.json's):
# after the start token and the "a" of "a {category} {prompt}".
CTX_BEGIN_POS = 2


class BlipDiffusion(TrainableWeights):
    """The whole model. Trainable: the Q-Former (without its image encoder), the text encoder and the
    UNet; frozen: the image encoder and the VAE (see ``freeze``)."""

    def __init__(self, qformer: SubjectQFormer, text_encoder: ContextCLIPTextModel, unet: UNet2DConditionModel,
                 vae: AutoencoderKL, tokenizer: CLIPTokenizer, qformer_tokenizer: BertTokenizer, scheduler_config: dict,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, drop_subject_prob: float = DROP_SUBJECT_PROB,
                 ctx_begin_pos: int = CTX_BEGIN_POS) -> None:
        super().__init__()
        self.qformer, self.text_encoder, self.unet, self.vae = qformer, text_encoder, unet, vae
        self.tokenizer, self.qformer_tokenizer = tokenizer, qformer_tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.drop_subject_prob = drop_subject_prob
        self.ctx_begin_pos = ctx_begin_pos
        self.freeze()

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, kind: ModelKind, seed: int = 0) -> "BlipDiffusion":
        """Random weights of the given size, with small locally built tokenizers (tests, the demo,
        benchmarks: a random full-size model costs the same per step as the released one)."""
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = tiny_clip_tokenizer(Path(scratch) / "clip")
            qformer_tokenizer = tiny_bert_tokenizer(Path(scratch) / "bert")
        qformer_tokenizer.add_special_tokens({"bos_token": DECODER_BOS_TOKEN})
        configs = model_configs(kind, len(tokenizer), len(qformer_tokenizer))
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
        diffusion, qformer = str(diffusion), str(qformer)
        subfolder = qformer_subfolder(qformer)
        bert = load_qformer_tokenizer(qformer, qformer_tokenizer)
        tokenizer = CLIPTokenizer.from_pretrained(diffusion, subfolder="tokenizer")
        check_tokenizes(tokenizer, f"{diffusion}: tokenizer/ (the CLIP tokenizer)",
                         "a folder with tokenizer/vocab.json and tokenizer/merges.txt")
        processor = read_json_file(qformer, "image_processor", "preprocessor_config.json") if subfolder else {}
        # where the subject embeddings go at inference; a Stable Diffusion folder has no such entry
        ctx_begin_pos = read_json_file(diffusion, "", "model_index.json").get("ctx_begin_pos", CTX_BEGIN_POS)
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
            ctx_begin_pos=int(ctx_begin_pos),
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """The released ``Salesforce/blipdiffusion`` layout, safetensors weights, that diffusers' own
        classes load: weight names as diffusers' modules have them, the tokenizers as vocabulary files (its
        slow tokenizer classes read no ``tokenizer.json``), and the Q-Former's tokenizer saved beside it and
        named in ``qformer/config.json`` (``"tokenizer": "qformer"``; see :func:`load_qformer_tokenizer`)."""
        folder = Path(folder)
        save_qformer_folder(self.qformer, self.qformer_tokenizer, folder / "qformer")
        config_file = folder / "qformer" / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer": EXPORT_QFORMER_TOKENIZER},
                                          indent=2, sort_keys=True))
        self.text_encoder.save_pretrained(folder / "text_encoder")
        write_weights_as_released(folder / "text_encoder", "text_model.", self.text_encoder.embeddings.position_ids)
        save_vocabulary_files(self.tokenizer, folder / "tokenizer")
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        scheduler = build_scheduler(self.scheduler_config)
        scheduler.save_pretrained(folder / "scheduler")
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
            "scheduler": ["diffusers", type(scheduler).__name__], "tokenizer": ["transformers", "CLIPTokenizer"],
            "image_processor": ["blip_diffusion", "BlipImageProcessor"], "ctx_begin_pos": self.ctx_begin_pos,
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
                          with_subject: torch.Tensor | None = None, ctx_at: int | None = None) -> torch.Tensor:
        """UNet conditioning (B, 77, H). With ``ctx`` (B, 16, H) every prompt keeps its first 61 tokens; rows
        with ``with_subject`` (default: all) get their 16 subject embeddings inserted before token ``ctx_at``
        (inference: ``ctx_begin_pos``) or, by default, just before the end-of-text token (training); the
        other rows the same tokens padded to 77: the authors' subject drop leaves the text as it is and only
        takes the embeddings out. Without ``ctx`` a prompt keeps 77 tokens."""
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
            rows = ids[subject_rows]
            if ctx_at is None:
                positions = (rows == self.tokenizer.eos_token_id).int().argmax(dim=1).tolist()
            else:
                positions = [ctx_at] * len(subject_rows)
            embeds[subject_rows] = self.text_encoder.token_embeddings(rows, ctx[subject_rows], positions)
        return self.text_encoder(embeds)

    def forward(self, pixel_values: torch.Tensor, captions: list[str], categories: list[str],
                target: torch.Tensor | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The pre-training loss (see :func:`pretraining_loss`); a module's ``forward`` so that DDP wraps it."""
        return pretraining_loss(self, pixel_values, captions, categories, target, latents)

    # -- inference -------------------------------------------------------------------------------------
    def subject_pixels(self, image: Image.Image) -> torch.Tensor:
        size = self.input_size
        array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)[None]
