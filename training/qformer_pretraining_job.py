"""``pretrain-qformer``: stage 1 of BLIP-Diffusion with Ray Train (DDP), on img2dataset image-text shards.

The run folder is that of stage 2 (:mod:`.trainer`, whose machinery it shares: checkpoints that resume
exactly, ``metrics.jsonl``, ``config.yaml``, the driver's lock and checks) with, in place of stage 2's
diffusers folder, the starting model as a stage-1 folder in ``RUN/base/`` (a Q-Former folder in the
released layout with the stage-1 heads beside it; see
:meth:`~.qformer_pretraining.QFormerPretraining.save_pretrained`), written once by the driver so that
every rank, every resumption and the export share it. At the end of a run the newest checkpoint is
written as ``RUN/qformer/``, the folder that ``train --qformer`` takes.

The starting model is one of: a CLIP model's vision tower and a BERT (``clip`` and ``bert``, as the paper
and LAVIS start: :func:`~.qformer_init.qformer_from_clip_and_bert`); ``init``, a Q-Former folder (a
previous stage 1, a BLIP-Diffusion folder) or LAVIS's ``blip2_pretrain_vitL`` checkpoint file (``.pth``,
converted by :func:`~.qformer_init.qformer_from_lavis`, its image encoder from ``clip`` where the file has
none); else random weights of the ``model`` preset.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from subjectpairs import storage
from subjectpairs.configfile import CONFIG_FILE, read_config
from subjectpairs.errors import InputError
from subjectpairs.guards import refuse_overlap

from .config import PretrainQFormerConfig, is_lavis_checkpoint
from .rank_trainer import TRAINABLE_FILE
from .trainer import (
    BASE_DIR,
    TrainReport,
    _is_folder_uri,
    _local_folder,
    check_batch_plan,
    distribute,
    latest_checkpoint,
    restore_rank,
    run_locked,
    run_steps,
    seed_rank,
    this_worker,
)

QFORMER_DIR = "qformer"  # RUN/qformer: the stage-1 result, for train --qformer
COMMAND = "pretrain-qformer"
log = logging.getLogger(__name__)


def pretraining_settings(config: PretrainQFormerConfig):
    from .qformer_pretraining import QFormerPretrainingConfig

    return QFormerPretrainingConfig(embed_dim=config.embed_dim, max_txt_len=config.max_txt_len)


def starting_model(config: PretrainQFormerConfig, scratch: str):
    """The run's starting :class:`~.qformer_pretraining.QFormerPretraining`, its new weights drawn from
    ``config.seed``; a start whose heads are of another width than ``embed_dim`` is refused."""
    model = _starting_model(config, scratch)
    if model.config.embed_dim != config.embed_dim:
        raise InputError(f"--init {config.init}: its contrastive heads are {model.config.embed_dim} wide; "
                         f"set embed_dim={model.config.embed_dim} (--set) to continue from them")
    return model


def _starting_model(config: PretrainQFormerConfig, scratch: str):
    import torch

    from .qformer_init import qformer_from_clip_and_bert, qformer_from_lavis
    from .qformer_pretraining import QFormerPretraining

    settings = pretraining_settings(config)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        if is_lavis_checkpoint(config.init):
            local = config.init if not storage.is_remote(config.init) else _download(config.init, scratch)
            qformer, heads, tokenizer = qformer_from_lavis(local, clip=config.clip, tokenizer=config.qformer_tokenizer)
            return QFormerPretraining(qformer, tokenizer, settings, heads)
        if config.init:
            source = _local_folder(config.init, scratch) if _is_folder_uri(config.init) else config.init
            return QFormerPretraining.from_pretrained(source, config.qformer_tokenizer, settings)
        if config.clip:
            qformer, heads, tokenizer = qformer_from_clip_and_bert(config.clip, config.bert, config=settings)
            return QFormerPretraining(qformer, tokenizer, settings, heads)
        return random_model(config, scratch)


def random_model(config: PretrainQFormerConfig, scratch: str):
    """A random Q-Former of the ``model`` preset on a random image encoder, with the small locally built
    BERT tokenizer (tests, the demo, throughput benchmarks: a random full-size model costs the same per
    step as a real one)."""
    from .presets import model_configs
    from .qformer import SubjectQFormer
    from .model_folders import DECODER_BOS_TOKEN
    from .qformer_pretraining import QFormerPretraining
    from .tiny_tokenizers import tiny_bert_tokenizer

    tokenizer = tiny_bert_tokenizer(Path(scratch) / "bert")
    tokenizer.add_special_tokens({"bos_token": DECODER_BOS_TOKEN})
    qformer = SubjectQFormer(model_configs(config.model, clip_vocab=len(tokenizer),
                                           bert_vocab=len(tokenizer))["qformer"])
    return QFormerPretraining(qformer, tokenizer, pretraining_settings(config))


def _download(uri: str, scratch: str) -> str:
    target = Path(scratch) / Path(uri).name
    target.write_bytes(storage.read_bytes(uri))
    return str(target)


def save_base(config: PretrainQFormerConfig) -> None:
    """``RUN/base/``: the starting model, saved once (a resumed run finds it there)."""
    base = storage.join(config.out, BASE_DIR)
    if storage.exists(storage.join(base, "config.json")):
        return
    with tempfile.TemporaryDirectory() as scratch:
        model = starting_model(config, scratch)
        folder = model.save_pretrained(Path(scratch) / "base")
        storage.publish_folder(folder, base)


def load_base(config: PretrainQFormerConfig, scratch: str):
    from .qformer_pretraining import QFormerPretraining

    base = _local_folder(storage.join(config.out, BASE_DIR), scratch)
    return QFormerPretraining.from_pretrained(base, config=pretraining_settings(config))


def pretrain_loop(config_dict: dict) -> None:
    """Runs on every Ray Train worker."""
    from subjectpairs.seeds import stable_seed

    from .image_text_data import ImageTextBatchReader, resolve_image_text_shards
    from .qformer_pretraining import process_group_gather
    from .rank_trainer import QFormerTrainer

    config = PretrainQFormerConfig.model_validate(config_dict)
    worker = this_worker("subjectpairs-pretrain-")
    rank, scratch = worker.rank, worker.scratch

    model = load_base(config, scratch).to(worker.device).train()
    trainer = QFormerTrainer(config, model, worker.device, seed=stable_seed(config.seed, "hard-negatives", rank),
                             gather=process_group_gather() if worker.ranks.distributed else None)
    seed_rank(config.seed, rank)
    position = restore_rank(trainer, config.out, rank, scratch)
    distribute(trainer)
    reader = ImageTextBatchReader(
        resolve_image_text_shards(config.shards), rank=rank, world_size=worker.world,
        num_workers=config.loader_workers, batch_size=config.batch_size, seed=config.seed,
        image_size=model.qformer.config.vision_config.image_size, shuffle_buffer=config.shuffle_buffer,
        position=position,
    )
    run_steps(config, trainer, reader, worker.ranks, rank=rank, scratch=scratch)
    shutil.rmtree(scratch, ignore_errors=True)


def export_qformer(config: PretrainQFormerConfig) -> str | None:
    """``RUN/qformer/``: the starting model with the newest checkpoint's weights, as a stage-1 folder
    (what ``train --qformer`` and ``pretrain-qformer --init`` take); returns the checkpoint used."""
    from safetensors.torch import load

    checkpoint = latest_checkpoint(config.out)
    if checkpoint is None:
        return None
    with tempfile.TemporaryDirectory() as scratch:
        model = load_base(config, scratch)
        model.load_trainable_state_dict(load(storage.read_bytes(storage.join(checkpoint, TRAINABLE_FILE))))
        folder = model.save_pretrained(Path(scratch) / QFORMER_DIR)
        storage.publish_folder(folder, storage.join(config.out, QFORMER_DIR))
    return checkpoint


# -- the driver ----------------------------------------------------------------------------------------

def check_sources(config: PretrainQFormerConfig) -> None:
    """The model flags, checked in the driver before Ray starts."""
    from .model_folders import check_model_source, load_qformer_tokenizer, qformer_subfolder

    for flag, source in (("--clip", config.clip), ("--bert", config.bert)):
        if source:
            check_model_source(flag, source, "config.json")
    if is_lavis_checkpoint(config.init):
        if not storage.exists(config.init) or storage.is_dir(config.init):
            raise InputError(f"--init {config.init}: no such checkpoint file")
    elif config.init:
        check_model_source("--init", config.init, "config.json")
        if Path(config.init).is_dir():
            if not Path(config.init, qformer_subfolder(config.init), "config.json").is_file():
                raise InputError(f"--init {config.init}: not a Q-Former folder (no config.json)")
            load_qformer_tokenizer(config.init, config.qformer_tokenizer)


def check_shards(config: PretrainQFormerConfig) -> None:
    from .image_text_data import resolve_image_text_shards

    try:
        shards = resolve_image_text_shards(config.shards)
    except ValueError as exc:
        raise InputError(f"--shards: {exc}") from exc
    check_batch_plan(config, shards)


def with_decay_steps(config: PretrainQFormerConfig) -> PretrainQFormerConfig:
    """``lr_decay_steps`` fixed for the run: the one given, else the one the run was started with (a resumed
    run that trains longer keeps its schedule), else ``max_steps``."""
    if config.lr_decay_steps is not None:
        return config
    previous = storage.join(config.out, CONFIG_FILE)
    steps = config.max_steps
    if config.resume and storage.exists(previous):
        steps = read_config(PretrainQFormerConfig, previous).lr_decay_steps or steps
    return config.model_copy(update={"lr_decay_steps": max(steps, 1)})


def run_qformer_pretraining(config: PretrainQFormerConfig, progress: bool = True) -> TrainReport:
    """Stage 1, its run folder checked against the inputs and locked by the driver for the whole run; the
    sources and shards are checked first, so a mistake leaves no run folder behind."""
    for uri in config.shards:
        refuse_overlap(config.out, {"--shards": uri})
    refuse_overlap(config.out, {f"--{name.replace('_', '-')}": value
                                for name in ("init", "clip", "bert", "qformer_tokenizer")
                                if (value := getattr(config, name)) is not None and _is_folder_uri(value)})
    check_sources(config)
    config = with_decay_steps(config.with_absolute_paths())
    if config.warmup_steps >= config.lr_decay_steps:
        log.warning("warmup_steps %d reach past lr_decay_steps %d: the whole run warms up, its learning rate "
                    "stays below lr %g (set warmup_steps for a short run)", config.warmup_steps,
                    config.lr_decay_steps, config.lr)
    check_shards(config)
    return run_locked(config, COMMAND, pretrain_loop, save_base, progress, finish=export_qformer)
