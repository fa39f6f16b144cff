"""The build job: candidates in, WebDataset shards of pairs out, on Ray.

Ray Core, one task per chunk of sorted keys (see docs/architecture.md for why): a task fetches, decodes,
segments, mattes and composites its chunk in small batches on one core, writes the pairs into local
temporary tars and publishes them whole; the driver records each finished chunk under ``.progress/``.
A rerun skips every recorded chunk whose shards still hash the same and rebuilds the rest (and the chunks
holding a retryable reject, such as a photo server that was down, whole: see RETRYABLE_REASONS); a chunk that
was running when a worker (or the driver) died is simply built again, so a crash costs time, never
samples, and never duplicates one.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from subjectpairs import __version__, storage
from subjectpairs.corpus.layout import MANIFEST_FILE, REJECTS_FILE, STATS_FILE
from subjectpairs.corpus.manifest import Manifest
from subjectpairs.guards import OutputLock
from subjectpairs.pipelines.build_plan import (
    BuildPlan,
    progress_uri,
    plan_build,
    prepare_output,
    recorded_chunks,
    refuse_overwriting_inputs,
)
from subjectpairs.pipelines.chunks import ChunkBuilder, ChunkRecord
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.pipelines.model_actors import RemoteCaptioner, RemoteSegmenter, start_model_actors
from subjectpairs.pipelines.pairs import PIPELINE_VERSION
from subjectpairs.pipelines.progress import BuildCounter, BuildProgress
from subjectpairs.pipelines.rejections import Rejection, count_by_stage
from subjectpairs.pipelines.segmenters import SegmenterChoice, resolve_segmenter
from subjectpairs.pipelines.shards import ChunkPlan, rejects_parquet

log = logging.getLogger(__name__)


_BUILDERS: dict[str, ChunkBuilder] = {}


def build_chunk(config_json: str, segmenter: SegmenterChoice, plan: ChunkPlan, counter: Any = None,
                segmenter_actor: Any = None, captioner_actor: Any = None) -> str:
    """The Ray task: one chunk, on one core, in a worker that keeps its ChunkBuilder between tasks; the
    segmenter is the one the driver resolved."""
    key = f"{config_json}\n{segmenter}"
    if key not in _BUILDERS:
        _BUILDERS.clear()
        _BUILDERS[key] = ChunkBuilder(BuildConfig.model_validate_json(config_json), segmenter)
    builder = _BUILDERS[key]
    # Proxies live for this task only: a handle kept in the worker would keep its actor (and the GPU or
    # CPU it holds) alive after the build.
    if segmenter_actor is not None:
        builder.pairs.segmenter = RemoteSegmenter(segmenter_actor)
    if captioner_actor is not None:
        builder.captioner = RemoteCaptioner(captioner_actor)
    report = None if counter is None else (lambda p, r: counter.add.remote(p, r))
    try:
        return builder.build(plan, report).to_json()
    finally:
        if segmenter_actor is not None:
            builder.pairs.segmenter = None
        if captioner_actor is not None:
            builder.captioner = None


@dataclass
class BuildReport:
    out_dir: str
    manifest: dict  # manifest.json as written
    stats: dict
    rejects: pd.DataFrame


def _start_ray(address: str | None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start Ray in this process. True if we started it."""
    from subjectpairs.raycluster import start_ray

    # One thread per library in each worker: Ray gives every task one core, parallelism comes from tasks.
    threads = {name: "1" for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS")}
    return start_ray(address, include_dashboard=False, logging_level="WARNING",
                     runtime_env={"env_vars": threads})


def run_build(config: BuildConfig, *, overwrite: bool = False, show_progress: bool = True,
              warn: Callable[[str], None] = log.warning) -> BuildReport:
    """The build job (see the module docstring), with every local path made absolute, and its output folder
    checked against the inputs and locked for the whole run. The segmenter is resolved first, once: ``warn``
    gets the line saying that ``auto`` fell back to GrabCut, and ``require_clipseg`` makes that an
    InputError before anything is written."""
    started = time.perf_counter()
    config = config.with_absolute_paths()
    segmenter = resolve_segmenter(config.pair.segmenter)
    warning = segmenter.warning()
    if warning is not None:
        warn(warning)
    refuse_overwriting_inputs(config)
    # A given candidates table is read and checked before the output folder is touched, so bad input leaves
    # no folder behind; the filter stage writes inside the output folder, so it runs under the lock.
    planned = plan_build(config) if config.candidates is not None else None
    with OutputLock(config.out, "build"):
        return _build_locked(config, segmenter, planned or plan_build(config), overwrite, show_progress, started)


def _build_locked(config: BuildConfig, segmenter: SegmenterChoice, planned: BuildPlan, overwrite: bool,
                  show_progress: bool, started: float) -> BuildReport:
    import ray

    candidates, plans, to_build, excluded = planned.candidates, planned.plans, planned.to_build, planned.excluded
    prepare_output(config, overwrite)
    records, retried = recorded_chunks(config, to_build)
    resumed = len(records)
    todo = [plan for plan in to_build if plan.index not in records]

    if todo:
        owns_ray = _start_ray(config.address)
        try:
            # the counter only feeds the progress bar: without one, no extra actor process
            counter = ray.remote(num_cpus=0)(BuildCounter).remote() if show_progress else None
            segmenters, captioners = start_model_actors(config, segmenter)
            task = ray.remote(build_chunk).options(num_cpus=1, max_retries=3)
            limit = config.max_tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
            config_json = config.model_dump_json()
            # excluded candidates count as done (rejected) from the start
            done_before = (sum(r.pairs for r in records.values()),
                           sum(len(r.rejects) for r in records.values()) + len(excluded))
            with BuildProgress(len(candidates), done_before, enabled=show_progress) as progress:
                queue = list(todo)
                running: dict[Any, ChunkPlan] = {}
                while queue or running:
                    while queue and len(running) < limit:
                        plan = queue.pop(0)
                        segment_actor = segmenters[plan.index % len(segmenters)] if segmenters else None
                        captioner = captioners[plan.index % len(captioners)] if captioners else None
                        running[task.remote(config_json, segmenter, plan, counter, segment_actor, captioner)] = plan
                    finished, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                    for ref in finished:
                        plan = running.pop(ref)
                        record = ChunkRecord.from_json(ray.get(ref))
                        storage.publish_bytes(progress_uri(config.out, plan), record.to_json().encode())
                        records[plan.index] = record
                    if counter is not None:
                        progress.update(*ray.get(counter.totals.remote()))
        finally:
            if owns_ray:
                ray.shutdown()

    return _finish(config, segmenter, plans, records, resumed, time.perf_counter() - started, excluded, retried)


def _finish(config: BuildConfig, segmenter: SegmenterChoice, plans: list[ChunkPlan],
            records: dict[int, ChunkRecord], resumed: int, wall_seconds: float,
            excluded: list[Rejection] | None = None, retried: int = 0) -> BuildReport:
    """Manifest, rejects and stats of the whole build (stats name the segmenter that ran and why); ``plans``
    hold every candidate (excluded ones too), ``excluded`` the rejections of the candidates the exclude file
    kept out of the chunks, ``retried`` the candidates an earlier run rejected for a retryable reason and
    this one tried again."""
    ordered = [records[plan.index] for plan in plans]
    shards = [shard for record in ordered for shard in record.shards]
    rejects = sorted([*(r for record in ordered for r in record.rejects), *(excluded or [])], key=lambda r: r.key)
    pairs = sum(record.pairs for record in ordered)
    manifest = Manifest(version=__version__, pipeline_version=PIPELINE_VERSION, config_hash=config.config_hash(),
                        candidates=sum(len(plan.candidates) for plan in plans), pairs=pairs, rejects=len(rejects),
                        shards=shards)
    seconds: Counter[str] = Counter()
    for record in ordered:
        seconds.update(record.seconds)
    stats = {
        "pairs": pairs,
        "rejects": dict(sorted(Counter(r.reason for r in rejects).items())),
        "rejects_by_stage": count_by_stage(r.stage for r in rejects),
        "wall_seconds": round(wall_seconds, 3),
        "pairs_per_second": round(pairs / wall_seconds, 3) if wall_seconds > 0 else None,
        "stage_seconds": {name: round(value, 3) for name, value in sorted(seconds.items())},
        "chunks": len(plans),
        "chunks_resumed": resumed,
        "retried": retried,
        "segmenter": segmenter.record(),
    }
    reject_table, reject_bytes = rejects_parquet(rejects)
    with storage.StagedOutputs(config.out) as staged:
        staged.put(MANIFEST_FILE, manifest.to_bytes())
        staged.put(REJECTS_FILE, reject_bytes)
        staged.put(STATS_FILE, (json.dumps(stats, indent=2) + "\n").encode())
        staged.commit()
    return BuildReport(config.out, manifest.model_dump(mode="json"), stats, reject_table)
