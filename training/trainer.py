"""Distributed subject-representation pre-training with Ray Train (``TorchTrainer``, DDP).

Every rank builds the same model, streams its own shards (``data.BatchReader``), and steps in lockstep:
a one-int all-reduce per step tells every rank whether all of them still have a batch, so uneven shards
end an epoch everywhere at once instead of hanging DDP. A checkpoint (``RUN/step-XXXXXXXX/``) holds the
trainable weights and the optimizer (rank 0) and, per rank, the RNG states and the data position, so a
resumed run continues with the very batches, noise and dropout an uninterrupted run would have used.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from subjectpairs import storage
from subjectpairs.configfile import CONFIG_FILE, config_yaml, hashed_settings, read_config
from subjectpairs.errors import InputError
from subjectpairs.guards import OutputLock, output_entries, refuse_overlap
from subjectpairs.raycluster import start_ray
from subjectpairs.seeds import stable_seed

from .config import RayTrainRunConfig, TrainConfig
from .rank_trainer import STATE_FILE

METRICS_FILE = "metrics.jsonl"
BASE_DIR = "base"  # the starting weights of a run built from random configs
CHECKPOINT_PREFIX = "step-"
# Written last, once every rank's files are stored: the checkpoint's files and their sizes. A checkpoint
# is whole when it is there and every file it lists has that size; anything else is a checkpoint the run
# stopped writing (or that was cut short or deleted in part since), and resuming passes it by.
COMPLETE_FILE = "complete.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's own list of the run's checkpoints

log = logging.getLogger(__name__)


class RunInUse(InputError):
    """The run folder already holds checkpoints and --resume was not given, or they are incompatible."""


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


@dataclass(frozen=True)
class CheckpointScan:
    """A run's checkpoint folders: the whole ones, oldest first, and why each other one is not whole."""

    whole: list[str]
    broken: dict[str, str]


def scan_checkpoints(run: str) -> CheckpointScan:
    folders = [name for name in storage.list_folder(run) if name.startswith(CHECKPOINT_PREFIX)]
    snapshot = storage.join(run, RAY_SNAPSHOT_FILE)
    ray_listed = storage.read_bytes(snapshot).decode("utf-8", "replace") if storage.exists(snapshot) else ""
    problems = {name: _checkpoint_problem(storage.join(run, name), name in ray_listed) for name in folders}
    return CheckpointScan([storage.join(run, name) for name, problem in problems.items() if problem is None],
                          {storage.join(run, name): problem for name, problem in problems.items() if problem})


def _checkpoint_problem(folder: str, ray_listed: bool) -> str | None:
    """Why a checkpoint folder is not whole, None when it is.

    Runs made before checkpoints carried ``COMPLETE_FILE`` counted a checkpoint once Ray Train's snapshot
    listed it (Ray writes that after the checkpoint is stored): such a folder is whole as it was then."""
    complete = storage.join(folder, COMPLETE_FILE)
    try:
        written = json.loads(storage.read_bytes(complete))["files"]
    except InputError:
        if storage.exists(complete):
            raise  # there, but it cannot be read
        if ray_listed and storage.exists(storage.join(folder, STATE_FILE)):
            return None
        return f"no {COMPLETE_FILE}: it was never finished"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{COMPLETE_FILE} does not read ({exc})"
    sizes = storage.file_sizes(folder)
    for name, size in written.items():
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} has {sizes[name]} bytes of {size}"
    return None


def mark_complete(folder: str) -> None:
    """Records a checkpoint's files and sizes in ``COMPLETE_FILE``, written last and atomically."""
    files = {name: size for name, size in storage.file_sizes(folder).items() if name != COMPLETE_FILE}
    storage.publish_bytes(storage.join(folder, COMPLETE_FILE), json.dumps({"files": files}).encode())


def latest_checkpoint(run: str) -> str | None:
    """The newest whole checkpoint folder of a run."""
    whole = scan_checkpoints(run).whole
    return whole[-1] if whole else None


def base_source(config: TrainConfig) -> str:
    """Where a run's starting weights live: ``--init``, or the random model saved in ``RUN/base``."""
    return config.init or storage.join(config.out, BASE_DIR)


def _starts_from_parts(config: TrainConfig) -> bool:
    return config.stable_diffusion is not None


def _local_folder(uri: str, scratch: str) -> str:
    """A local copy of a folder URI (models load from local folders or hub ids)."""
    if not storage.is_remote(uri):
        return str(storage.local_path(uri))
    target = os.path.join(scratch, Path(uri).name)
    storage.download_folder(uri, target)
    return target


def _is_folder_uri(source: str) -> bool:
    return storage.is_remote(source) or Path(source).exists()


def load_run_model(config: TrainConfig, scratch: str):
    from .blip_diffusion import BlipDiffusion

    def local(source: str) -> str:
        return _local_folder(source, scratch) if _is_folder_uri(source) else source

    if _starts_from_parts(config):
        model = BlipDiffusion.from_parts(local(config.stable_diffusion), local(config.qformer),
                                         qformer_tokenizer=config.qformer_tokenizer)
    else:
        model = BlipDiffusion.from_pretrained(local(base_source(config)), qformer_tokenizer=config.qformer_tokenizer)
    model.drop_subject_prob = config.drop_subject_prob
    return model


# -- the per-rank training loop ------------------------------------------------------------------------

class MetricsLog:
    """``RUN/metrics.jsonl``, written by rank 0. Appended in place on local disks; for object stores a
    local copy is appended and uploaded at every checkpoint and at the end."""

    def __init__(self, run: str, keep_through_step: int) -> None:
        self.uri = storage.join(run, METRICS_FILE)
        self.remote = storage.is_remote(run)
        self.path = (Path(tempfile.mkdtemp()) / METRICS_FILE) if self.remote else storage.local_path(self.uri)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        if storage.exists(self.uri):
            # A resumed run drops what the interrupted one logged after its last checkpoint.
            lines = [line for line in storage.read_bytes(self.uri).decode().splitlines()
                     if line.strip() and json.loads(line)["step"] <= keep_through_step]
        self.path.write_text("".join(line + "\n" for line in lines))
        self.file = self.path.open("a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def sync(self) -> None:
        if self.remote:
            storage.publish_bytes(self.uri, self.path.read_bytes())

    def close(self) -> None:
        self.file.close()
        self.sync()


def seed_rank(seed: int, rank: int) -> None:
    """The global random streams of a rank (torch's, Python's, NumPy's), seeded by the run's seed and rank."""
    import torch

    torch.manual_seed(stable_seed(seed, "rank", rank))
    random.seed(stable_seed(seed, "python", rank))
    np.random.seed(stable_seed(seed, "numpy", rank) % 2**32)


def restore_rank(trainer, run: str, rank: int, scratch: str):
    """The rank's data position, with the trainer's state and random streams restored from the run's
    newest whole checkpoint when it has one. The run folder, not Ray's own list, says where to start: at a
    start the checkpoint the driver named (and printed), after a worker failure the newest one this run
    finished."""
    from .data import StreamPosition

    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        return StreamPosition()
    return StreamPosition.from_dict(trainer.restore(_local_folder(checkpoint, scratch), rank=rank))


def _start_rank(config: TrainConfig, rank: int, device, scratch: str):
    """This rank's Trainer on ``device`` and its data position: the run's model, its random streams seeded by
    rank, then, when the run folder has a checkpoint, everything restored from it."""
    from .latents import check_latents
    from .rank_trainer import Trainer

    model = load_run_model(config, scratch)
    if config.latents:
        check_latents(config.latents, model.vae, model.target_size)
    model = model.to(device)
    if config.compile:  # in place: parameter names (and so checkpoints) stay those of the eager model
        model.unet.compile()
        model.text_encoder.compile()
    trainer = Trainer(config, model, device)
    seed_rank(config.seed, rank)
    return trainer, restore_rank(trainer, config.out, rank, scratch)


@dataclass(frozen=True)
class Worker:
    """A Ray Train worker's place: its ``rank`` among ``world`` workers, its ``device``, the collectives
    over the workers (``ranks``) and a ``scratch`` folder of its own."""

    rank: int
    world: int
    device: object
    ranks: object
    scratch: str


def this_worker(scratch_prefix: str) -> Worker:
    """The calling Ray Train worker's :class:`Worker`."""
    import ray.train
    import ray.train.torch

    from .rank_trainer import Collectives

    context = ray.train.get_context()
    world, device = context.get_world_size(), ray.train.torch.get_device()
    return Worker(rank=context.get_world_rank(), world=world, device=device, ranks=Collectives(world, device),
                  scratch=tempfile.mkdtemp(prefix=scratch_prefix))


def distribute(trainer) -> None:
    """The trainer's forward passes through DDP from here on (its model already on the worker's device)."""
    import ray.train.torch

    trainer.network = ray.train.torch.prepare_model(trainer.model, move_to_device=False,
                                                    parallel_strategy_kwargs={"broadcast_buffers": False})
    trainer.network.train()


def train_loop(config_dict: dict) -> None:
    """Runs on every Ray Train worker."""
    from subjectpairs.corpus.layout import read_exclude
    from subjectpairs.corpus.reader import resolve_shards

    from .data import BatchReader

    config = TrainConfig.model_validate(config_dict)
    worker = this_worker("subjectpairs-train-")
    rank, device, scratch = worker.rank, worker.device, worker.scratch

    trainer, position = _start_rank(config, rank, device, scratch)
    model = trainer.model
    distribute(trainer)

    reader = BatchReader(
        resolve_shards(config.shards), rank=rank, world_size=worker.world, num_workers=config.loader_workers,
        batch_size=config.batch_size, seed=config.seed, input_size=model.input_size,
        target_size=model.target_size, exclude=read_exclude(config.exclude),
        latents=resolve_shards(config.latents) if config.latents else None,
        shuffle_buffer=config.shuffle_buffer, position=position,
    )
    keys_log = _keys_log(config, rank, trainer.step) if config.record_keys else None
    # rank 0 evaluates while the others wait at the next step's all-reduce
    evaluation = _training_evaluation(config, device) if rank == 0 and config.eval_every else None

    def after_step(step: int, batch: dict, metrics: MetricsLog | None) -> None:
        if keys_log is not None:
            keys_log.write("".join(f"{step}\t{key}\n" for key in batch["keys"]))
            keys_log.flush()
        if evaluation is not None and step % config.eval_every == 0:
            metrics.write({"step": step, "eval": evaluation(model)})
            trainer.network.train()

    run_steps(config, trainer, reader, worker.ranks, rank=rank, scratch=scratch, after_step=after_step)
    if keys_log is not None:
        keys_log.close()
    shutil.rmtree(scratch, ignore_errors=True)


def run_steps(config, trainer, reader, ranks, *, rank: int, scratch: str, after_step=None) -> None:
    """A rank's steps up to ``config.max_steps``, in lockstep with the other ranks: a one-int all-reduce
    per step says whether every rank still has a batch, so uneven shards end an epoch everywhere at once.
    Each loss is averaged over the ranks and logged by rank 0 to ``metrics.jsonl``, with the learning rate,
    the throughput and the corrupt samples and shards met; checkpoints every ``checkpoint_every`` steps and
    at the end. ``after_step(step, batch, metrics)`` runs after each step (``metrics`` on rank 0 only)."""
    import ray.train

    world = ranks.world_size
    metrics = MetricsLog(config.out, keep_through_step=trainer.step) if rank == 0 else None
    progress = _progress_actor() if rank == 0 else None

    def save_checkpoint(record: dict) -> None:
        folder = tempfile.mkdtemp(prefix="checkpoint-", dir=scratch)
        step = trainer.step
        trainer.save(folder, rank=rank, position=reader.position.to_dict(), epoch=reader.position.epoch,
                     run_hash=config.run_hash())
        if rank == 0:
            metrics.sync()
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=checkpoint_name(step))
        shutil.rmtree(folder, ignore_errors=True)
        ranks.barrier()  # every rank's files are stored
        if rank == 0:
            mark_complete(storage.join(config.out, checkpoint_name(step)))

    # A checkpoint taken at an epoch's end resumes with that epoch's steps done, as the run went on.
    epoch_steps = reader.position.batches
    bad_shard_reports, corrupt_shards = 0.0, []
    while trainer.step < config.max_steps:
        started = time.perf_counter()
        batch = reader.next_batch()
        waited = time.perf_counter() - started
        if not ranks.all(batch is not None):
            if epoch_steps == 0:
                raise RuntimeError(
                    f"the shards give no full batch of {config.batch_size} to each of {world} workers "
                    f"({max(config.loader_workers, 1)} loader streams each); use fewer workers, loader "
                    "workers or a smaller batch")
            reader.start_next_epoch()
            epoch_steps = 0
            continue
        lr = trainer.learning_rate(trainer.step)
        losses = {name: ranks.sum(float(value)) / world for name, value in trainer.train_step(batch).items()}
        step = trainer.step
        epoch_steps += 1
        corrupt = ranks.sum(float(reader.position.corrupt))
        reports = ranks.sum(float(len(reader.position.bad_shards)))
        if reports != bad_shard_reports:  # the names are gathered only when a rank met another broken shard
            bad_shard_reports, corrupt_shards = reports, ranks.union(reader.position.bad_shards)
        seconds = time.perf_counter() - started
        # the lr goes with the total batch (DDP averages the workers' gradients)
        total_batch = config.batch_size * world
        record = {"step": step, **losses, "lr": lr, "total_batch": total_batch,
                  "samples_per_s": total_batch / seconds, "data_wait": waited / seconds,
                  "epoch": reader.position.epoch, "corrupt_samples": int(corrupt), "corrupt_shards": corrupt_shards}
        if rank == 0:
            if step % config.log_every == 0 or step == config.max_steps:
                metrics.write(record)
            progress.update.remote(step, losses["loss"], record["samples_per_s"])
        if after_step is not None:
            after_step(step, batch, metrics)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            save_checkpoint(record)
    if metrics is not None:
        metrics.close()


def _training_evaluation(config: TrainConfig, device):
    """``model -> {dino, clip_i, clip_t, images}``: the run's small fixed DreamBench evaluation, its metric
    models loaded once."""
    from .dreambench import read_dreambench
    from .evaluation import quick_evaluation
    from .inference_defaults import GUIDANCE_SCALE
    from .subject_metrics import SubjectScorer

    bench = read_dreambench(config.eval_dreambench)
    subjects = bench.subjects(config.eval_subjects)
    scorer = SubjectScorer(config.eval_clip_model, config.eval_dino_model, device)
    return lambda model: quick_evaluation(model, scorer, bench, subjects, config.eval_prompts,
                                          config.eval_inference_steps, GUIDANCE_SCALE)


def _keys_log(config: TrainConfig, rank: int, step: int):
    """``RUN/keys/rank-N.txt`` (local runs only): ``step<TAB>key`` for every sample a rank trained on."""
    path = storage.local_path(storage.join(config.out, "keys", f"rank-{rank:05d}.txt"))
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if int(line.split("\t", 1)[0]) <= step] if path.exists() else []
    path.write_text("".join(kept))
    return path.open("a")


# -- the driver ----------------------------------------------------------------------------------------

PROGRESS_ACTOR = "subjectpairs-train-progress"


class TrainCounter:
    """The latest step reported by rank 0, read by the driver's progress bar."""

    def __init__(self) -> None:
        self.latest = (0, float("nan"), 0.0)

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        self.latest = (step, loss, samples_per_s)

    def read(self) -> tuple[int, float, float]:
        return self.latest


def _progress_actor():
    import ray

    return ray.get_actor(PROGRESS_ACTOR)


def prepare_run(config: RayTrainRunConfig, command: str = "train") -> int:
    """Checks the run folder against --resume and writes config.yaml; returns the step to resume from: that
    of the newest whole checkpoint, the one the workers load.

    Checkpoints that are not whole are named in a warning and removed (the resumed run writes those steps
    again), the whole ones beyond ``keep_checkpoints`` too, and so is Ray Train's own list of checkpoints,
    which may name removed ones: Ray keeps only those of the coming run.
    """
    scan = scan_checkpoints(config.out)
    names = [Path(uri).name for uri in [*scan.whole, *scan.broken]]
    if not names:
        if storage.exists(storage.join(config.out, CONFIG_FILE)) and not config.resume:
            raise RunInUse(f"{config.out} holds another run's files; pass --resume to continue it or choose "
                           "another --out")
        storage.remove(storage.join(config.out, RAY_SNAPSHOT_FILE))
        storage.publish_bytes(storage.join(config.out, CONFIG_FILE), config_yaml(config, command))
        return 0
    if not config.resume:
        raise RunInUse(f"{config.out} already holds checkpoints (latest {max(names)}); pass --resume "
                       "to continue the run, or choose another --out")
    if not scan.whole:
        raise InputError(f"{config.out}: no whole checkpoint to resume from ("
                         + "; ".join(f"{Path(uri).name}: {why}" for uri, why in scan.broken.items())
                         + "); remove the run folder to start over, or choose another --out")
    previous = read_config(type(config), storage.join(config.out, CONFIG_FILE))
    if previous.run_hash() != config.run_hash():
        ours, theirs = hashed_settings(config), hashed_settings(previous)
        changed = sorted(key for key, value in ours.items() if theirs[key] != value)
        raise RunInUse(f"--resume with settings that change the run's numbers: {', '.join(changed)}")
    latest = scan.whole[-1]
    for uri in scan.whole:  # an older run's checkpoints, whole by Ray's snapshot, which is removed below
        if not storage.exists(storage.join(uri, COMPLETE_FILE)):
            mark_complete(uri)
    for uri, why in scan.broken.items():
        log.warning("%s is not a whole checkpoint (%s): removed; the run resumes from %s", uri, why,
                    Path(latest).name)
    for uri in [*scan.broken, *scan.whole[:-config.keep_checkpoints], storage.join(config.out, RAY_SNAPSHOT_FILE)]:
        storage.remove(uri)
    state = json.loads(storage.read_bytes(storage.join(latest, STATE_FILE)))
    storage.publish_bytes(storage.join(config.out, CONFIG_FILE), config_yaml(config, command))
    return int(state["step"])


def check_data(config: TrainConfig) -> None:
    """The data flags and the batch plan, checked in the driver before Ray starts: a mistake fails at once
    in one line instead of in every worker once the cluster is up."""
    from subjectpairs.corpus.layout import read_exclude
    from subjectpairs.corpus.reader import resolve_shards

    if config.exclude is not None and (not storage.exists(config.exclude) or storage.is_dir(config.exclude)):
        raise InputError(f"--exclude {config.exclude}: no such file")
    exclude = read_exclude(config.exclude)
    resolved = {}
    for flag, specs in (("--shards", config.shards), ("--latents", config.latents)):
        try:
            resolved[flag] = resolve_shards(specs) if specs else []
        except ValueError as exc:
            raise InputError(f"{flag}: {exc}") from exc
    check_batch_plan(config, resolved["--shards"], exclude)


def check_batch_plan(config: RayTrainRunConfig, shards: list, exclude: frozenset[str] = frozenset()) -> None:
    """Every loader stream of every worker must hold a whole batch in the first epoch, as far as the shards'
    counts tell."""
    from .data import smallest_stream

    fewest = smallest_stream(shards, world_size=config.workers, num_workers=config.loader_workers,
                             seed=config.seed, exclude=exclude)
    if fewest is not None and fewest < config.batch_size:
        streams = config.workers * max(config.loader_workers, 1)
        raise InputError(
            f"--shards: {len(shards)} shards dealt to {streams} loader streams ({config.workers} workers x "
            f"{max(config.loader_workers, 1)} loader streams) leave one with {int(fewest)} samples, less than "
            f"a batch of {config.batch_size}; use fewer workers or loader workers, or a smaller batch")


def check_evaluation_inputs(config: TrainConfig) -> None:
    """``--eval-dreambench``'s layout and subjects and the metric models, checked before Ray starts."""
    if not config.eval_dreambench:
        return
    from .dreambench import read_dreambench
    from .model_folders import check_model_source

    read_dreambench(config.eval_dreambench).subjects(config.eval_subjects)
    check_model_source("--set eval_clip_model", config.eval_clip_model, "config.json")
    check_model_source("--set eval_dino_model", config.eval_dino_model, "config.json")


def check_model_sources(config: TrainConfig) -> None:
    """Local model folders are checked in the driver, so a wrong path fails at once with its name
    instead of in every worker (where an unknown local path would be taken for a hub id)."""
    expected = {"init": ("model_index.json", "qformer/config.json", "unet/config.json"),
                "stable_diffusion": ("text_encoder/config.json", "unet/config.json", "vae/config.json"),
                "qformer": ("config.json",)}
    for field, files in expected.items():
        source = getattr(config, field)
        if source is None or storage.is_remote(source):
            continue
        folder = Path(source)
        if folder.is_dir():
            if field == "qformer" and (folder / "qformer").is_dir():
                folder = folder / "qformer"
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise InputError(f"--{field.replace('_', '-')} {source}: not a model folder (missing "
                                 f"{', '.join(missing)})")
        elif (source.startswith((".", "/", "~")) or source.count("/") > 1
              or (folder.parent.name and folder.parent.is_dir())):  # demo/model where demo/ is a folder here
            raise InputError(f"--{field.replace('_', '-')} {source}: no such folder (and not a hub id)")
    qformer = config.init or config.qformer
    if qformer is not None and not storage.is_remote(qformer) and Path(qformer).is_dir():
        from .model_folders import load_qformer_tokenizer

        load_qformer_tokenizer(qformer, config.qformer_tokenizer)  # a degenerate one fails here, not in every worker


def _save_base(config: TrainConfig) -> None:
    """A run from random weights saves them once, so export, resumption and every rank share them."""
    if config.init or _starts_from_parts(config) or storage.exists(storage.join(config.out, BASE_DIR, "model_index.json")):
        return
    from .blip_diffusion import BlipDiffusion

    model = BlipDiffusion.from_config(config.model, seed=config.seed)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        storage.publish_folder(scratch, storage.join(config.out, BASE_DIR))


def _storage(run: str) -> dict:
    """RunConfig storage arguments: Ray writes checkpoints straight into the run folder."""
    if not storage.is_remote(run):
        path = storage.local_path(run).resolve()
        return {"storage_path": str(path.parent), "name": path.name}
    filesystem, path = storage.arrow_filesystem(run)
    parent, name = path.rstrip("/").rsplit("/", 1)
    return {"storage_path": parent, "name": name, "storage_filesystem": filesystem}


@dataclass
class TrainReport:
    out: str
    steps: int
    resumed_from: int
    last: dict | None


def run_training(config: TrainConfig, progress: bool = True) -> TrainReport:
    """Training, its run folder checked against the inputs and locked by the driver for the whole run (the
    Ray Train workers write checkpoints into it under that lock). Model sources and data are checked
    first, so a mistake leaves no run folder behind."""
    for flag, inputs in (("--shards", config.shards), ("--latents", config.latents or [])):
        for uri in inputs:
            refuse_overlap(config.out, {flag: uri})
    refuse_overlap(config.out, {"--exclude": config.exclude, **{  # hub ids are no folders of ours
        f"--{name.replace('_', '-')}": value for name in ("init", "stable_diffusion", "qformer")
        if (value := getattr(config, name)) is not None and _is_folder_uri(value)}})
    check_model_sources(config)
    config = config.with_absolute_paths()
    check_data(config)
    check_evaluation_inputs(config)
    return run_locked(config, "train", train_loop, _save_base, progress)


def run_locked(config: RayTrainRunConfig, command: str, loop: Callable[[dict], None],
               save_base: Callable[[RayTrainRunConfig], None], progress: bool,
               finish: Callable[[RayTrainRunConfig], None] | None = None) -> TrainReport:
    """A Ray Train run of ``loop`` on every worker, its run folder locked by the driver for the whole run
    (the workers write checkpoints into it under that lock) and checked against --resume; ``save_base``
    writes the run's starting weights into it first, once, and ``finish`` runs after the workers, still
    under the lock."""
    with OutputLock(config.out, command):
        found = set(output_entries(config.out))
        resumed_from = prepare_run(config, command)
        try:
            save_base(config)
            report = _fit(config, loop, resumed_from, progress)
        except BaseException:
            scan = scan_checkpoints(config.out)
            if not scan.whole and not scan.broken:
                # A start that failed before its first checkpoint leaves the folder as it found it, so the
                # corrected command is not refused for the files it wrote.
                for name in set(output_entries(config.out)) - found:
                    storage.remove(storage.join(config.out, name))
            raise
        if finish is not None:
            finish(config)
        return report


def _fit(config: RayTrainRunConfig, loop: Callable[[dict], None], resumed_from: int, progress: bool) -> TrainReport:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    owns_ray = start_ray(config.address, include_dashboard=False,
                         runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    gpus = config.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    resources = {"CPU": config.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    counter = ray.remote(num_cpus=0)(TrainCounter).options(name=PROGRESS_ACTOR, lifetime="detached",
                                                           get_if_exists=True).remote()
    trainer = TorchTrainer(
        loop, train_loop_config=config.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=bool(gpus), resources_per_worker=resources),
        run_config=RunConfig(**_storage(config.out),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
    )
    stop = threading.Event()
    bar = threading.Thread(target=_draw_progress, args=(counter, config.max_steps, resumed_from, stop),
                           daemon=True) if progress else None
    if bar:
        bar.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if bar:
            bar.join()
        ray.kill(counter)
        if owns_ray:
            ray.shutdown()
    return TrainReport(config.out, config.max_steps, resumed_from, result.metrics)


def _draw_progress(counter, total: int, start: int, stop: threading.Event) -> None:
    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task("train", total=total, completed=start, info="")
        while not stop.wait(0.5):
            step, loss, rate = ray.get(counter.read.remote())
            if step:
                bar.update(task, completed=step, info=f"loss {loss:.4f}, {rate:.1f} samples/s")
