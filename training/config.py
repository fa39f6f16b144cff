"""Typed configuration of a training run, validated at start-up and written to ``RUN/config.yaml``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from subjectpairs import storage
from subjectpairs.configfile import RUN_ONLY, hashed_settings


class RayTrainRunConfig(BaseModel):
    """What every Ray Train run (``train``, ``pretrain-qformer``) shares: the run folder, the workers, the
    batch plan, checkpoints and resumption. Fields marked RUN_ONLY may change between a run and its
    resumption: where and how long it runs, not what it computes; the others make the run hash."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field(json_schema_extra=RUN_ONLY)
    workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU)")
    gpus_per_worker: float | None = Field(None, ge=0, description="None: 1 when the cluster has GPUs, else 0")
    cpus_per_worker: float = Field(1, gt=0, json_schema_extra=RUN_ONLY)
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per worker (0: in the training process)")
    max_steps: int = Field(1000, ge=0, json_schema_extra=RUN_ONLY)
    seed: int = 0
    shuffle_buffer: int = Field(1000, ge=1)
    mixed_precision: Literal["auto", "bf16", "no"] = Field("auto", description="auto: bf16 autocast on GPU only")
    checkpoint_every: int = Field(500, ge=1, json_schema_extra=RUN_ONLY)
    keep_checkpoints: int = Field(3, ge=1, json_schema_extra=RUN_ONLY)
    log_every: int = Field(1, ge=1, json_schema_extra=RUN_ONLY)
    max_failures: int = Field(0, ge=0, description="worker failures to recover from the last checkpoint",
                              json_schema_extra=RUN_ONLY)
    address: str | None = Field(None, json_schema_extra=RUN_ONLY)
    resume: bool = Field(False, json_schema_extra=RUN_ONLY)

    def run_hash(self) -> str:
        """SHA-256 of the settings that decide the run's numbers; a resumption must match it."""
        return hashlib.sha256(json.dumps(hashed_settings(self), sort_keys=True).encode()).hexdigest()


def _source(value: str | None) -> str | None:
    """A model source made absolute when it is a local path; a hub id as it is."""
    return storage.absolute(value) if value is not None and Path(value).expanduser().exists() else value


def _path(value: str | None) -> str | None:
    return None if value is None else storage.absolute(value)


def _comma_separated(value):
    if isinstance(value, str):
        return [part for part in value.split(",") if part]
    return value


class TrainConfig(RayTrainRunConfig):
    """One run of ``train``: subject-representation learning (stage 2) on pair shards."""

    shards: list[str] = Field(min_length=1, description="pair shard folders/prefixes (with manifest.json) or .tar URIs")
    model: Literal["tiny", "blip-diffusion"] = "blip-diffusion"
    init: str | None = Field(None, description="diffusers BLIP-Diffusion folder or hub id to start from")
    stable_diffusion: str | None = Field(None, description="instead of init: SD-1.5 folder or hub id (text encoder, UNet, VAE)")
    qformer: str | None = Field(None, description="with stable_diffusion: Q-Former folder (BLIP-Diffusion layout)")
    qformer_tokenizer: str | None = Field(None, description="BERT tokenizer for an --init without one")
    batch_size: int = Field(16, ge=1, description="per worker")
    lr: float = Field(2e-6, gt=0, description="not scaled by the trainer: the paper's 2e-6 is for a total batch "
                                          "(workers x batch_size) of 16; scale it with the total batch")
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    drop_subject_prob: float = Field(0.15, ge=0, le=1)
    exclude: str | None = Field(None, description="file of pair keys to leave out, one per line")
    latents: list[str] | None = Field(None, description="side-car latent shard folders (subjectpairs latents)")
    compile: bool = Field(False, description="torch.compile the UNet and the text encoder",
                          json_schema_extra=RUN_ONLY)
    record_keys: bool = Field(False, description="write RUN/keys/rank-N.txt: the keys each rank trained on",
                              json_schema_extra=RUN_ONLY)
    # a small fixed DreamBench evaluation during training, logged to metrics.jsonl; it does not change the run
    eval_every: int | None = Field(None, ge=1, description="steps between DreamBench evaluations (with "
                                                           "eval_dreambench)", json_schema_extra=RUN_ONLY)
    eval_dreambench: str | None = Field(None, description="DreamBench folder of the evaluations during training",
                                        json_schema_extra=RUN_ONLY)
    eval_subjects: list[str] | None = Field(None, description="subjects of the evaluations (default: every one "
                                                              "with photos)", json_schema_extra=RUN_ONLY)
    eval_prompts: int = Field(5, ge=1, description="prompts per subject, one image each (seed 0)",
                              json_schema_extra=RUN_ONLY)
    eval_inference_steps: int = Field(25, ge=1, description="denoising steps of the evaluation images",
                                      json_schema_extra=RUN_ONLY)
    eval_clip_model: str = Field("openai/clip-vit-base-patch32", description="CLIP model of CLIP-I and CLIP-T",
                                 json_schema_extra=RUN_ONLY)
    eval_dino_model: str = Field("facebook/dino-vits16", description="DINO model of the DINO score",
                                 json_schema_extra=RUN_ONLY)

    _split_commas = field_validator("shards", "latents", "eval_subjects", mode="before")(_comma_separated)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.latents is not None and len(self.latents) != len(self.shards):
            raise ValueError("--latents needs one latent folder per --shards entry, in the same order")
        if self.init and (self.stable_diffusion or self.qformer):
            raise ValueError("give either init, or stable_diffusion with qformer, not both")
        if self.record_keys and "://" in self.out and not self.out.startswith("file://"):
            raise ValueError("record_keys writes local files; use a local --out for it")
        if bool(self.eval_every) != bool(self.eval_dreambench):
            raise ValueError("eval_every and eval_dreambench go together")
        if bool(self.stable_diffusion) != bool(self.qformer):
            raise ValueError("stable_diffusion and qformer go together (a random Q-Former on a random image "
                             "encoder would learn nothing)")
        return self

    def with_absolute_paths(self) -> "TrainConfig":
        """Local paths made absolute: Ray Train runs each worker in its own working directory, so a
        relative ``demo/run`` would point somewhere else there. URIs stay as they are, and so do model
        sources that are not local folders (hub ids)."""
        return self.model_copy(update={
            "out": _path(self.out), "shards": [_path(s) for s in self.shards],
            "latents": [_path(s) for s in self.latents] if self.latents else None, "exclude": _path(self.exclude),
            "init": _source(self.init), "stable_diffusion": _source(self.stable_diffusion),
            "qformer": _source(self.qformer), "qformer_tokenizer": _source(self.qformer_tokenizer),
            "eval_dreambench": _path(self.eval_dreambench), "eval_clip_model": _source(self.eval_clip_model),
            "eval_dino_model": _source(self.eval_dino_model),
        })


# LAVIS checkpoint files, which --init converts (a folder is a Q-Former folder).
LAVIS_CHECKPOINT_SUFFIXES = (".pth", ".pt")


def is_lavis_checkpoint(source: str | None) -> bool:
    return source is not None and source.endswith(LAVIS_CHECKPOINT_SUFFIXES)


class PretrainQFormerConfig(RayTrainRunConfig):
    """One run of ``pretrain-qformer``: stage 1, BLIP-2's representation learning of the Q-Former on
    image-text shards. The defaults are LAVIS's (``blip2/train/pretrain_stage1.yaml`` and ``Blip2Qformer``)."""

    shards: list[str] = Field(min_length=1, description="img2dataset image-text shard folders/prefixes or .tar URIs")
    model: Literal["tiny", "blip-diffusion"] = Field(
        "blip-diffusion", description="size of a random model (without clip and bert, or init)")
    clip: str | None = Field(None, description="CLIP model (folder or hub id) whose vision tower, without its "
                                               "last layer, is the frozen image encoder (with bert, or with a "
                                               "LAVIS init that holds no image encoder)")
    bert: str | None = Field(None, description="with clip: BERT (folder or hub id) the Q-Former starts from, "
                                               "and its tokenizer")
    init: str | None = Field(None, description="instead of clip and bert: a Q-Former folder to start from "
                                               "(a stage-1 RUN/qformer, a BLIP-Diffusion folder), or LAVIS's "
                                               "blip2_pretrain_vitL .pth, converted: its first 16 queries as a "
                                               "warm start")
    qformer_tokenizer: str | None = Field(None, description="BERT tokenizer for an --init without one")
    batch_size: int = Field(100, ge=1, description="per worker (LAVIS: 100 per GPU)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate, reached after the warm-up")
    warmup_lr: float = Field(1e-6, gt=0, description="learning rate of the first step")
    warmup_steps: int = Field(5000, ge=0, description="steps of the linear warm-up")
    min_lr: float = Field(1e-5, ge=0, description="learning rate at the end of the cosine decay")
    lr_decay_steps: int | None = Field(
        None, ge=1, description="step at which the cosine decay reaches min_lr (default: max_steps at the run's "
                                "start; a resumed run keeps its own)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay of the weight matrices")
    max_grad_norm: float | None = Field(None, gt=0, description="gradient clipping (LAVIS: none)")
    embed_dim: int = Field(256, ge=1, description="width of the contrastive features")
    max_txt_len: int = Field(32, ge=3, description="caption tokens, [CLS] and [SEP] included")

    _split_commas = field_validator("shards", mode="before")(_comma_separated)

    @model_validator(mode="after")
    def _consistent(self) -> "PretrainQFormerConfig":
        if self.bert and (not self.clip or self.init):
            raise ValueError("bert goes with clip and without init (the start from scratch)")
        if self.clip and not (self.bert or is_lavis_checkpoint(self.init)):
            raise ValueError("clip goes with bert (the start from scratch) or with a LAVIS .pth init (the "
                             "image encoder that its checkpoint lacks)")
        if self.warmup_lr > self.lr or self.min_lr > self.lr:
            raise ValueError("warmup_lr and min_lr are at most lr")
        return self

    def with_absolute_paths(self) -> "PretrainQFormerConfig":
        """Local paths made absolute (see :meth:`TrainConfig.with_absolute_paths`)."""
        return self.model_copy(update={
            "out": _path(self.out), "shards": [_path(s) for s in self.shards], "clip": _source(self.clip),
            "bert": _source(self.bert), "init": _source(self.init),
            "qformer_tokenizer": _source(self.qformer_tokenizer),
        })


class LatentsConfig(BaseModel):
    """``subjectpairs latents``: the targets' VAE latents as side-car shards, for ``train --latents``; written
    to ``OUT/config.yaml``."""

    model_config = ConfigDict(extra="forbid")

    shards: list[str] = Field(min_length=1, description="pair shard folders/prefixes or .tar URIs")
    out: str = Field(description="folder or URI for the latent shards", json_schema_extra=RUN_ONLY)
    model: Literal["tiny", "blip-diffusion"] = Field(
        "blip-diffusion", description="tiny or blip-diffusion: the run's --model (the size of a random model)")
    init: str | None = Field(None, description="the run's --init (its VAE encodes)")
    seed: int = Field(0, description="the run's --seed (random models)")
    batch_size: int = Field(32, ge=1, description="targets per VAE call", json_schema_extra=RUN_ONLY)
    address: str | None = Field(None, description="Ray cluster address (default: local, or RAY_ADDRESS)",
                                json_schema_extra=RUN_ONLY)


class FinetuneConfig(BaseModel):
    """``subjectpairs finetune``: subject-specific fine-tuning (paper 3.3 and A.6, LAVIS's
    ``finetune-db-template.yaml``); written to ``OUT/config.yaml``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="diffusers BLIP-Diffusion folder or hub id to fine-tune")
    subject_dir: str = Field(description="folder of the subject's photos (.jpg, .jpeg, .png, .webp)")
    category: str = Field(min_length=1, description="the subject's category, e.g. dog")
    out: str = Field(description="model folder to write", json_schema_extra=RUN_ONLY)
    steps: int = Field(80, ge=1, description="optimizer steps (the paper: 40-120 per subject, mean 76)")
    batch_size: int = Field(3, ge=1, description="photos per step (LAVIS: 3)")
    lr: float = Field(5e-6, gt=0, description="AdamW learning rate, constant, no warm-up (LAVIS and A.6: 5e-6)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of the weight matrices")
    seed: int = Field(0, description="seed of the photo order, the noise and the timesteps")
    train_embedding: bool = Field(True, description="train the cached subject embedding with the UNet, as LAVIS "
                                                    "does (its cache is a parameter with gradients)")
    mixed_precision: Literal["auto", "bf16", "no"] = Field("auto", description="auto: bf16 autocast on GPU only")
    validation_prompts: str | None = Field(None, description="file of prompts, one per line, drawn as a contact "
                                                             "sheet every validation_every steps",
                                           json_schema_extra=RUN_ONLY)
    validation_every: int = Field(20, ge=1, description="steps between contact sheets", json_schema_extra=RUN_ONLY)
    validation_steps: int = Field(50, ge=1, description="denoising steps of the contact sheets",
                                  json_schema_extra=RUN_ONLY)
    qformer_tokenizer: str | None = Field(None, description="BERT tokenizer for a model folder without one")


class EvaluateConfig(BaseModel):
    """``subjectpairs evaluate``: the DreamBench evaluation of the paper's Table 1; written to
    ``OUT/config.yaml``. A rerun with the same settings resumes."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="diffusers BLIP-Diffusion folder or hub id")
    dreambench: str = Field(description="DreamBench folder in the official layout (prompts_and_classes.txt, "
                                        "<subject>/NN.jpg)")
    out: str = Field(description="evaluation folder", json_schema_extra=RUN_ONLY)
    subjects: list[str] | None = Field(None, description="subjects to evaluate (default: every one with photos)")
    images_per_prompt: int = Field(4, ge=1, description="images per prompt and seed (the paper: 4)")
    seeds: list[int] = Field([0], min_length=1, description="one batch of images_per_prompt images of every prompt "
                                                            "per seed (the paper: 10 seed sets)")
    steps: int = Field(100, ge=1, description="denoising steps (the paper: 100)")
    guidance: float = Field(7.5, description="classifier-free guidance scale (the paper: 7.5)")
    scheduler: str | None = Field(None, description="sampler (default: the model folder's, PNDM as released)")
    reference_image: int = Field(0, ge=0, description="which photo of a subject is the subject image (its index "
                                                      "in name order; 0: 00.jpg)")
    finetune_steps: int | Literal["paper"] | None = Field(
        None, description="fine-tune on each subject's photos for N steps first, or 'paper' (see README); "
                          "default: zero-shot")
    clip_model: str = Field("openai/clip-vit-base-patch32", description="CLIP model of CLIP-I and CLIP-T")
    dino_model: str = Field("facebook/dino-vits16", description="DINO model of the DINO score")
    qformer_tokenizer: str | None = Field(None, description="BERT tokenizer for a model folder without one")
    address: str | None = Field(None, description="Ray cluster address (default: local, or RAY_ADDRESS)",
                                json_schema_extra=RUN_ONLY)

    @field_validator("subjects", "seeds", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("finetune_steps")
    @classmethod
    def _positive_steps(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("fine-tuning needs 1 step or more (leave it out for zero-shot)")
        return value

    @field_validator("seeds", "subjects")
    @classmethod
    def _distinct(cls, value: list | None) -> list | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"{sorted({v for v in value if value.count(v) > 1})} named twice")
        return value
