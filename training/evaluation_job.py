"""``subjectpairs evaluate``: the DreamBench evaluation spread over a Ray cluster, one model per GPU.

The driver checks everything it can before Ray starts (the benchmark's layout, the subjects, the model and
metric-model folders, the output folder), then hands units to :class:`EvaluationWorker` actors and writes:

- ``OUT/images/<subject>/PP-seedS-I.png``: the generated images;
- ``OUT/records/<subject>/*.json``: each unit's rows and each subject's oracle, written after its images, so a
  rerun skips what is done and a run killed halfway ends with the same summary;
- ``OUT/metrics.parquet``: one row per image (``subject``, ``class``, ``prompt``, ``seed``, ``index``,
  ``image`` relative to OUT, ``dino``, ``clip_i``, ``clip_t``, and ``prompt_index``);
- ``OUT/summary.json``: the means, per-subject figures, the real-image oracle, the paper's row, the config
  and the model's hash;
- ``OUT/report.png``: each subject's figures beside the paper's Table 1;
- ``OUT/finetuned/<subject>/``: with ``--finetune-steps``, each subject's fine-tuned model folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from subjectpairs import storage
from subjectpairs.configfile import CONFIG_FILE, config_yaml, hashed_settings, read_config
from subjectpairs.errors import InputError
from subjectpairs.guards import OutputLock, output_entries, refuse_overlap

from .config import EvaluateConfig
from .dreambench import BenchSubject, DreamBench, read_dreambench
from .evaluation import (
    ORACLE_RECORD,
    RECORDS_FOLDER,
    EvalUnit,
    EvaluationWorker,
    decode_photos,
    mean_scores,
    plan_units,
    read_photos,
)
from .model_folders import check_model_source
from .paper_figures import FINETUNE_STEPS_MEAN, TABLE1

METRICS_FILE = "metrics.parquet"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.png"
METRICS = ("dino", "clip_i", "clip_t")


@dataclass
class EvaluationReport:
    out: str
    summary: dict
    generated: int  # images made by this run (the rest were there already)
    seconds: float


def finetune_steps_of(config: EvaluateConfig) -> int | None:
    """Steps per subject: none (zero-shot), the given number, or the paper's average (see paper_figures)."""
    if config.finetune_steps == "paper":
        return FINETUNE_STEPS_MEAN
    return config.finetune_steps or None


def folder_hash(folder: Path) -> str:
    """SHA-256 over every file of a model folder (relative name and content), in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as stream:
            while block := stream.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def model_hash(source: str) -> str:
    local = Path(source).expanduser()
    if local.is_dir():
        return folder_hash(local)
    from huggingface_hub import snapshot_download  # a hub id: the files from_pretrained reads, cached

    return folder_hash(Path(snapshot_download(source)))


def _local_dreambench(uri: str, scratch: str) -> str:
    if not storage.is_remote(uri):
        return str(storage.local_path(uri))
    storage.download_folder(uri, scratch)
    return scratch


def check_evaluation(config: EvaluateConfig, dreambench_folder: str) -> tuple[DreamBench, list[BenchSubject]]:
    """Everything the driver can check before Ray starts; bad input is one InputError."""
    check_model_source("--model", config.model, "model_index.json")
    check_model_source("--clip-model", config.clip_model, "config.json")
    check_model_source("--dino-model", config.dino_model, "config.json")
    local_model = config.model if Path(config.model).expanduser().exists() else None
    refuse_overlap(config.out, {"--model": local_model, "--dreambench": config.dreambench})
    bench = read_dreambench(dreambench_folder)
    subjects = bench.subjects(config.subjects)
    for subject in subjects:
        if config.reference_image >= len(subject.photos):
            raise InputError(f"--reference-image {config.reference_image}: subject {subject.name} has "
                             f"{len(subject.photos)} photos")
        if len(subject.photos) < 2:
            raise InputError(f"{subject.name}: one photo; DINO and CLIP-I average over the subject's photos and "
                             "the oracle needs two or more")
        for photo in subject.photos:  # here, not in a worker once the cluster is up
            try:
                decode_photos([photo.read_bytes()])
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                raise InputError(f"{photo}: cannot read the photo ({exc})") from exc
    config_uri = storage.join(config.out, CONFIG_FILE)
    if storage.exists(config_uri):
        earlier = read_config(EvaluateConfig, config_uri)
        if hashed_settings(earlier) != hashed_settings(config):
            changed = sorted(key for key, value in hashed_settings(config).items()
                             if hashed_settings(earlier).get(key) != value)
            raise InputError(f"--out {config.out} holds an evaluation with other settings ({', '.join(changed)}); "
                             "choose a new folder to compare, or rerun with its settings to resume")
    elif storage.exists(config.out) and output_entries(config.out):
        raise InputError(f"--out {config.out}: not empty and not an evaluation folder")
    return bench, subjects


def _records_done(out: str) -> set[str]:
    """Relative paths of the records already written (one listing per subject folder)."""
    root = storage.join(out, RECORDS_FOLDER)
    if not storage.exists(root):
        return set()
    done = set()
    for subject in storage.list_folder(root):
        for name in storage.list_folder(storage.join(root, subject)):
            done.add(f"{RECORDS_FOLDER}/{subject}/{name}")
    return done


def with_absolute_paths(config: EvaluateConfig) -> EvaluateConfig:
    """Local paths made absolute (Ray's workers may run elsewhere); hub ids and URIs as they are."""

    def source(value: str) -> str:
        return storage.absolute(value) if Path(value).expanduser().exists() else value

    return config.model_copy(update={
        "out": storage.absolute(config.out), "dreambench": storage.absolute(config.dreambench),
        "model": source(config.model), "clip_model": source(config.clip_model), "dino_model": source(config.dino_model),
        "qformer_tokenizer": source(config.qformer_tokenizer) if config.qformer_tokenizer else None})


def run_evaluation(config: EvaluateConfig, progress: bool = True) -> EvaluationReport:
    started = time.perf_counter()
    config = with_absolute_paths(config)
    with tempfile.TemporaryDirectory(prefix="dreambench-") as scratch:
        bench, subjects = check_evaluation(config, _local_dreambench(config.dreambench, scratch))
        units = plan_units(bench, subjects, config.seeds)
        with OutputLock(config.out, "evaluate"):
            storage.publish_bytes(storage.join(config.out, CONFIG_FILE), config_yaml(config, "evaluate"))
            done = _records_done(config.out)
            generated = _run_missing(config, subjects, units, done, progress)
            summary = _write_outputs(config, subjects, units)
    return EvaluationReport(config.out, summary, generated, time.perf_counter() - started)


def _tasks(config: EvaluateConfig, subjects: list[BenchSubject], units: list[EvalUnit],
           done: set[str]) -> list[tuple[BenchSubject, list[EvalUnit], bool]]:
    """(subject, units, with its oracle) still to run: a task per unit zero-shot, per subject when each subject
    is fine-tuned first (once, by the worker that runs it)."""
    tasks = []
    for subject in subjects:
        missing = [unit for unit in units if unit.subject == subject.name and unit.record_path not in done]
        oracle = f"{RECORDS_FOLDER}/{subject.name}/{ORACLE_RECORD}" not in done
        if finetune_steps_of(config) or len(missing) <= 1:
            if missing or oracle:
                tasks.append((subject, missing, oracle))
        else:
            tasks.extend((subject, [unit], oracle and index == 0) for index, unit in enumerate(missing))
    return tasks


def _run_missing(config: EvaluateConfig, subjects: list[BenchSubject], units: list[EvalUnit], done: set[str],
                 progress: bool) -> int:
    import ray
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    from subjectpairs.raycluster import start_ray

    tasks = _tasks(config, subjects, units, done)
    if not tasks:
        return 0
    photos = {subject.name: read_photos(subject) for subject in subjects}
    owns_ray = start_ray(config.address, include_dashboard=False, logging_level="WARNING")
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        worker = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(EvaluationWorker)
        actors = [worker.remote(config) for _ in range(max(1, min(gpus, len(tasks))))]
        pool = ActorPool(actors)
        steps = finetune_steps_of(config)
        total = sum(len(task_units) for _, task_units, _ in tasks) * config.images_per_prompt
        generated = 0
        with tqdm(total=total, desc="DreamBench images", unit="img", disable=not progress) as bar:
            results = pool.map_unordered(
                lambda actor, task: actor.run.remote(task[0], photos[task[0].name], task[1], config.out, steps,
                                                     task[2]), tasks)
            for result in results:
                bar.update(len(result["rows"]))
                generated += len(result["rows"])
        return generated
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, InputError):
            raise exc.cause from None
        raise
    finally:
        if owns_ray:
            ray.shutdown()


def _read_json(out: str, relative: str):
    return json.loads(storage.read_bytes(storage.join(out, relative)))


def _write_outputs(config: EvaluateConfig, subjects: list[BenchSubject], units: list[EvalUnit]) -> dict:
    rows = [row for unit in units for row in _read_json(config.out, unit.record_path)]
    oracle = {s.name: _read_json(config.out, f"{RECORDS_FOLDER}/{s.name}/{ORACLE_RECORD}") for s in subjects}
    table = pd.DataFrame(rows, columns=["subject", "class", "prompt", "prompt_index", "seed", "index", "image",
                                        *METRICS])
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.publish_bytes(storage.join(config.out, METRICS_FILE), buffer.getvalue())
    summary = summarise(config, table, oracle)
    storage.publish_bytes(storage.join(config.out, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    storage.publish_bytes(storage.join(config.out, REPORT_FILE), report_png(summary))
    return summary


def summarise(config: EvaluateConfig, table: pd.DataFrame, oracle: dict[str, dict]) -> dict:
    mode = "fine-tuned" if finetune_steps_of(config) else "zero-shot"
    per_subject = {}
    for name, group in table.groupby("subject", sort=False):
        per_subject[name] = {"class": group["class"].iloc[0], "images": len(group),
                             **mean_scores(group.to_dict("records"))}
    oracle_means = {metric: sum(o[metric] for o in oracle.values()) / len(oracle) for metric in ("dino", "clip_i")}
    return {
        "mode": mode,
        "images": len(table),
        **mean_scores(table.to_dict("records")),
        "subjects": per_subject,
        "oracle": {**oracle_means, "subjects": {name: {k: o[k] for k in ("dino", "clip_i", "photos")}
                                                for name, o in oracle.items()}},
        "finetune_steps": finetune_steps_of(config),
        "paper": {"table1": TABLE1[mode], "real images": TABLE1["real images"]},
        "model_hash": model_hash(config.model),
        "config": hashed_settings(config),
    }


def report_png(summary: dict) -> bytes:
    """Per subject, our DINO, CLIP-I and CLIP-T with the oracle, and the overall figures against the paper's
    Table 1 row of the same mode."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(summary["subjects"])
    figure, axes = plt.subplots(1, 3, figsize=(max(9, 0.45 * len(names) * 3), 4.2), constrained_layout=True)
    paper = summary["paper"]["table1"]
    for axis, metric, label in zip(axes, METRICS, ("DINO", "CLIP-I", "CLIP-T")):
        values = [summary["subjects"][name][metric] for name in names]
        axis.bar(range(len(names)), values, color="tab:blue", label="ours")
        if metric in ("dino", "clip_i"):
            axis.scatter(range(len(names)), [summary["oracle"]["subjects"][n][metric] for n in names],
                         color="black", marker="_", s=200, label="real images (oracle)")
        axis.axhline(summary[metric], color="tab:blue", linestyle="--", label=f"ours overall {summary[metric]:.3f}")
        if paper.get(metric) is not None:
            axis.axhline(paper[metric], color="tab:red", linestyle=":",
                         label=f"paper Table 1, {summary['mode']} {paper[metric]:.3f}")
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        axis.set_title(label)
        axis.legend(fontsize=7, loc="lower right")
    figure.suptitle(f"DreamBench, {summary['mode']}: {summary['images']} images of {len(names)} subjects")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
