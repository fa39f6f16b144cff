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

import hashlib
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pandas as pd
import yaml

from subjectpairs import __version__, storage
from subjectpairs.configfile import CONFIG_FILE, config_yaml
from subjectpairs.corpus.layout import (
    MANIFEST_FILE,
    REJECTS_FILE,
    SHARD_PREFIX,
    STATS_FILE,
    is_shard_name,
    read_exclude,
)
from subjectpairs.corpus.writer import ChunkWriter, ShardFile, file_sha256
from subjectpairs.curation.candidates import CANDIDATES_FILE, run_filter
from subjectpairs.curation.config import FilterConfig
from subjectpairs.errors import InputError
from subjectpairs.guards import OutputLock, contains, output_entries, refuse_overlap
from subjectpairs.pipelines.captions import Blip2Captioner, Captions, template_caption
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.pipelines.fetch import PhotoFetcher
from subjectpairs.pipelines.pairs import PIPELINE_VERSION, Pair, PairBuilder, PairRequest
from subjectpairs.pipelines.progress import BuildCounter, BuildProgress
from subjectpairs.pipelines.rejections import PairRejected, Rejection, count_by_stage, isolate_failures
from subjectpairs.pipelines.segmentation import shrink_for_model, upsample_maps
from subjectpairs.pipelines.segmenters import SEGMENTERS, SegmenterChoice, build_segmenter, resolve_segmenter
from subjectpairs.pipelines.shards import (
    Candidate,
    ChunkPlan,
    excluded_rejection,
    load_candidates,
    plan_chunks,
    rejects_parquet,
)

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
# Threads fetching one batch's photos at once, so slow servers overlap instead of idling the core.
FETCH_THREADS = 8


@dataclass
class ChunkRecord:
    chunk: int
    plan_sha256: str  # the chunk's keys: a record only counts for the same plan
    shards: list[ShardFile]
    pairs: int
    rejects: list[Rejection]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ChunkRecord":
        data = json.loads(text)
        return cls(
            chunk=data["chunk"], plan_sha256=data["plan_sha256"],
            shards=[ShardFile(**s) for s in data["shards"]], pairs=data["pairs"],
            rejects=[Rejection(**r) for r in data["rejects"]], seconds=data.get("seconds", {}),
        )


def plan_sha256(plan: ChunkPlan) -> str:
    text = "\n".join(f"{c.key}\t{c.photo_uri}\t{c.box.as_list()}\t{c.category}" for c in plan.candidates)
    return hashlib.sha256(text.encode()).hexdigest()


def sample_json(pair: Pair, candidate: Candidate, captions: list[str], caption_source: str, config_hash: str) -> bytes:
    meta = pair.meta()
    meta.pop("seconds")  # timings vary run to run; shards must not
    meta.update(
        image_id=candidate.image_id, label_mid=candidate.label_mid, captions=captions,
        caption_source=caption_source, config_hash=config_hash, source=candidate.photo_uri,
    )
    return json.dumps(meta, sort_keys=True).encode()


class ChunkBuilder:
    """Builds chunks in one worker process; the segmenter, backgrounds and captions load once."""

    def __init__(self, config: BuildConfig, segmenter: SegmenterChoice | None = None) -> None:
        import cv2

        cv2.setNumThreads(1)  # one core per task; parallelism comes from Ray
        self.config = config
        self.config_hash = config.config_hash()
        self.pairs = PairBuilder(config.pair, choice=segmenter)
        self.fetcher = PhotoFetcher(config.fetch)
        self.captions = Captions.from_jsonl(config.captions) if config.captions else Captions()
        self._captioner: Any = None

    @property
    def captioner(self) -> Any:
        """The captioning stage: an actor's proxy when one was given, else BLIP-2 loaded here on first use."""
        if self._captioner is None and self.config.captioner.model is not None:
            self._captioner = load_captioner(self.config)
        return self._captioner

    @captioner.setter
    def captioner(self, captioner: Any) -> None:
        self._captioner = captioner

    def _captions(self, done: list[tuple[Candidate, Pair]]) -> list[tuple[list[str], str] | Rejection]:
        """Per pair: the captions file's, else the captioner's (one batch), else the template; a pair the
        captioner fails on alone is rejected, the others keep their captions."""
        from_file = [self.captions.from_file(c.image_id, c.category) for c, _ in done]
        found: list[tuple[list[str], str] | Rejection] = [(captions, "captions.jsonl") for captions in from_file]
        missing = [i for i, captions in enumerate(from_file) if not captions]
        if self.captioner is not None and missing:
            captioner = self.captioner

            def caption(indices: list[int]) -> list[list[str]]:
                return captioner.caption(
                    [done[i][1].target for i in indices], [done[i][0].category for i in indices],
                    [done[i][0].key for i in indices],
                )

            generated = isolate_failures(caption, missing, [done[i][0].key for i in missing], "caption")
            for index, captions in zip(missing, generated):
                found[index] = captions if isinstance(captions, Rejection) else (captions, captioner.name)
        return [
            item if isinstance(item, Rejection) or item[0] else (template_caption(candidate.category), "template")
            for item, (candidate, _) in zip(found, done)
        ]

    def _fetch_batch(self, batch: tuple[Candidate, ...]) -> list[PairRequest | Rejection]:
        def fetch(candidate: Candidate) -> PairRequest | Rejection:
            try:
                photo = self.fetcher.fetch(candidate.photo_uri, local=not candidate.photo_from_url)
            except PairRejected as exc:
                return Rejection.from_error(candidate.key, exc)
            return PairRequest(candidate.key, candidate.category, photo, candidate.box, source=candidate.photo_uri)

        with ThreadPoolExecutor(min(FETCH_THREADS, len(batch))) as pool:
            return list(pool.map(fetch, batch))

    def build(self, plan: ChunkPlan, report: Callable[[int, int], None] | None = None) -> ChunkRecord:
        writer = ChunkWriter(self.config.out, plan.index, self.config.shards.max_bytes)
        rejects: list[Rejection] = []
        seconds: Counter[str] = Counter()
        pairs = 0
        try:
            size = self.config.batch_size
            for start in range(0, len(plan.candidates), size):
                batch = plan.candidates[start:start + size]
                started = time.perf_counter()
                fetched = self._fetch_batch(batch)
                seconds["fetch"] += time.perf_counter() - started
                requests = [item for item in fetched if isinstance(item, PairRequest)]
                built = iter(self.pairs.build(requests))
                done: list[tuple[Candidate, Pair]] = []
                for candidate, item in zip(batch, fetched):
                    result = item if isinstance(item, Rejection) else next(built)
                    if isinstance(result, Rejection):
                        rejects.append(result)
                    else:
                        done.append((candidate, result))
                started = time.perf_counter()
                captions = self._captions(done)
                seconds["caption"] += time.perf_counter() - started
                for (candidate, pair), captioned in zip(done, captions):
                    if isinstance(captioned, Rejection):
                        rejects.append(captioned)
                        continue
                    texts, source = captioned
                    encode_started = time.perf_counter()
                    members = pair.members()
                    members["json"] = sample_json(pair, candidate, texts, source, self.config_hash)
                    writer.write(candidate.key, members)
                    seconds.update(pair.seconds)
                    seconds["encode"] += time.perf_counter() - encode_started
                    pairs += 1
                if report is not None:
                    written = sum(not isinstance(c, Rejection) for c in captions)
                    report(written, len(batch) - written)
            started = time.perf_counter()
            shards = writer.publish()
            seconds["publish"] += time.perf_counter() - started
        finally:
            writer.close()
        return ChunkRecord(plan.index, plan_sha256(plan), shards, pairs, rejects, dict(seconds))


def load_captioner(config: BuildConfig) -> Blip2Captioner:
    settings = config.captioner
    assert settings.model is not None
    return Blip2Captioner.from_pretrained(
        settings.model, ranker=settings.ranker, device=settings.device, keep=settings.keep,
        label_match=settings.label_match, samples=settings.samples, top_p=settings.top_p,
        min_length=settings.min_length, max_new_tokens=settings.max_new_tokens, seed=config.pair.seed,
    )


class CaptionerActor:
    """BLIP-2 and its CLIP ranker loaded once (on a GPU when there is one), captioning the batches of many
    CPU tasks."""

    def __init__(self, config_json: str) -> None:
        self.captioner = load_captioner(BuildConfig.model_validate_json(config_json))

    def describe(self) -> tuple[str, tuple[int, int]]:
        return self.captioner.name, self.captioner.input_size

    def caption(self, shrunk: list, labels: list[str], keys: list[str]) -> list[list[str]]:
        return self.captioner.caption(shrunk, labels, keys)


class RemoteCaptioner:
    """The captioner inside a task, backed by a :class:`CaptionerActor`; photos travel shrunk."""

    def __init__(self, actor: Any) -> None:
        import ray

        self.actor = actor
        self.name, self._input_size = ray.get(actor.describe.remote())

    def caption(self, images: Any, labels: Any, keys: Any) -> list[list[str]]:
        import ray

        shrunk = shrink_for_model(images, self._input_size)
        return ray.get(self.actor.caption.remote(shrunk, list(labels), list(keys)))


class SegmenterActor:
    """A segmentation model (a segmenter that ``runs_model``, CLIPSeg for the paper) loaded once, on one GPU
    when there is one, serving the batches of many CPU tasks."""

    def __init__(self, config_json: str, choice: SegmenterChoice) -> None:
        self.segmenter = build_segmenter(BuildConfig.model_validate_json(config_json).pair.segmenter, choice)

    def describe(self) -> tuple[dict[str, Any], tuple[int, int]]:
        return self.segmenter.describe(), self.segmenter.input_size

    def probabilities(self, shrunk: list, prompts: list[str]) -> Any:
        return self.segmenter.probabilities(shrunk, prompts)


class RemoteSegmenter:
    """The segmenter interface inside a task, backed by a :class:`SegmenterActor`: images are shrunk to
    the model's input size here, maps are brought back to full size here; only small arrays travel."""

    def __init__(self, actor: Any) -> None:
        import ray

        self.actor = actor
        self._description, self._input_size = ray.get(actor.describe.remote())
        self.name = self._description["name"]

    def describe(self) -> dict[str, Any]:
        return self._description

    def segment(self, images: Any, prompts: Any, boxes: Any) -> list:
        import ray

        shrunk = shrink_for_model(images, self._input_size)
        return upsample_maps(images, ray.get(self.actor.probabilities.remote(shrunk, list(prompts))))


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


def start_model_actors(config: BuildConfig, segmenter: SegmenterChoice) -> tuple[list[Any], list[Any]]:
    """Segmentation-model and BLIP-2 actors: by default one of each per GPU (sharing it when both run),
    none without GPUs; ``segment_actors`` / ``caption_actors`` set the counts (on CPUs when there are no
    GPUs)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    runs_model = SEGMENTERS[segmenter.name].runs_model
    segmenters = config.segment_actors
    if segmenters is None:
        segmenters = gpus if runs_model else 0
    captioners = config.caption_actors
    if captioners is None:
        captioners = gpus if config.captioner.model is not None else 0
    if segmenters and not runs_model:
        raise InputError(f"segment_actors serve a segmentation model and this build runs {segmenter.name}, "
                         f"which has none ({segmenter.reason}): set pair.segmenter.kind=clipseg (or a model)")
    if captioners and config.captioner.model is None:
        raise InputError("caption_actors serve BLIP-2: set captioner.model")
    share = 0.5 if segmenters and captioners else 1.0
    resources = {"num_gpus": share} if gpus else {"num_cpus": 1}
    config_json = config.model_dump_json()

    def start(actor: type, count: int, *args: Any) -> list[Any]:
        remote = ray.remote(actor).options(max_restarts=3, max_task_retries=3, **resources)
        return [remote.remote(config_json, *args) for _ in range(count)]

    return start(SegmenterActor, segmenters, segmenter), start(CaptionerActor, captioners)


@dataclass
class BuildReport:
    out_dir: str
    manifest: dict
    stats: dict
    rejects: pd.DataFrame


class OutputInUse(InputError):
    """The output folder holds a build with another configuration, or files that are not a build's."""


OWN_FILES = (MANIFEST_FILE, REJECTS_FILE, STATS_FILE, CONFIG_FILE)  # besides shards and .progress/


def _progress_uri(out: str, plan: ChunkPlan) -> str:
    return storage.join(out, PROGRESS_DIR, f"{plan.name}.json")


def _earlier_build(out: str) -> BuildConfig | None:
    """The configuration of the build in ``out``: None when it holds no config.yaml, OutputInUse when its
    config.yaml is not a build's (another command's folder)."""
    uri = storage.join(out, CONFIG_FILE)
    if not storage.exists(uri):
        return None
    try:
        return BuildConfig.model_validate(yaml.safe_load(storage.read_bytes(uri)))
    except Exception as exc:  # yaml and pydantic raise many types; any of them means "not a build"
        raise OutputInUse(f"{out}: its {CONFIG_FILE} is not a build's ({type(exc).__name__}); choose an empty "
                          "or new --out (--overwrite only replaces a build)") from exc


def _is_build_entry(name: str, config: BuildConfig, started: bool) -> bool:
    """Whether ``name`` in the output folder is what a build writes there: the filter stage's folder, and
    once a build has started (written its config.yaml) its files, shards and progress records, also as
    storage's staged copies (``.NAME.tmp-...``, ``.NAME.partial``) that a killed run leaves."""
    if name == storage.local_path(config.filter_out()).name or name == PROGRESS_DIR and started:
        return True
    staged = storage.unstaged_name(name)
    if not started:
        return staged == CONFIG_FILE and staged != name  # the first build's config.yaml, being written
    return staged in OWN_FILES or staged.startswith(SHARD_PREFIX)


def _recorded_shards(out: str) -> set[str]:
    """The shard names an earlier build's manifest.json and .progress/ records list."""
    names: set[str] = set()
    try:
        names.update(entry["name"] for entry in json.loads(storage.read_bytes(storage.join(out, MANIFEST_FILE)))["shards"])
    except (InputError, ValueError, KeyError, TypeError):
        pass  # no manifest yet (an interrupted build), or a torn one: the progress records name its shards
    progress = storage.join(out, PROGRESS_DIR)
    for uri in storage.list_files(progress, (".json",)) if storage.is_dir(progress) else []:
        try:
            names.update(shard.name for shard in ChunkRecord.from_json(storage.read_bytes(uri).decode()).shards)
        except (InputError, ValueError, KeyError, TypeError):
            continue  # a torn record: its chunk's shards were never listed, so are not ours to delete
    return {name for name in names if is_shard_name(name)}


def _clear_output(out: str) -> None:
    """Remove an earlier build: the shards its manifest or progress records name, then its own files. Nothing
    else in the folder is touched (a shard no record names may be someone else's)."""
    for name in [*sorted(_recorded_shards(out)), *OWN_FILES, PROGRESS_DIR]:
        storage.remove(storage.join(out, name))


def prepare_output(config: BuildConfig, overwrite: bool) -> None:
    """Check the output folder and write config.yaml: the folder must be new, empty, or a build (resumed when
    its configuration is this one, replaced with ``overwrite`` when it is another); anything else is
    refused, with or without ``overwrite``."""
    previous = _earlier_build(config.out)
    foreign = [name for name in output_entries(config.out)
               if not _is_build_entry(name, config, started=previous is not None)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputInUse(f"{config.out} holds files that are not a build's ({shown}); choose an empty or new "
                          "--out (--overwrite only replaces a build)")
    if previous is not None and previous.config_hash() != config.config_hash():
        if not overwrite:
            raise OutputInUse(
                f"{config.out} holds a build with another configuration; rerun with --overwrite to replace it, "
                "or choose another --out"
            )
        _clear_output(config.out)
    storage.publish_bytes(storage.join(config.out, CONFIG_FILE), config_yaml(config, "build"))


def recorded_chunks(config: BuildConfig, plans: list[ChunkPlan]) -> tuple[dict[int, ChunkRecord], int]:
    """Chunks a previous run finished whose shards are still there, whole and unchanged, and the number of
    candidates to try again: a chunk with a retryable reject (a server that was down, busy or slow) is
    built again whole, so its shards come out as those of a build that never saw the outage."""
    done = {}
    retried = 0
    for plan in plans:
        uri = _progress_uri(config.out, plan)
        if not storage.exists(uri):
            continue
        try:
            record = ChunkRecord.from_json(storage.read_bytes(uri).decode())
        except (ValueError, KeyError, TypeError):
            continue  # a torn record: rebuild the chunk
        if record.plan_sha256 != plan_sha256(plan):
            continue
        if all(
            storage.exists(storage.join(config.out, shard.name))
            and file_sha256(storage.join(config.out, shard.name)) == shard.sha256
            for shard in record.shards
        ):
            retryable = sum(reject.retryable for reject in record.rejects)
            if retryable:
                retried += retryable
            else:
                done[plan.index] = record
    return done, retried


def exclude_candidates(config: BuildConfig, plans: list[ChunkPlan]) -> tuple[list[ChunkPlan], list[Rejection]]:
    """The plans less the candidates ``config.exclude`` lists, and a review/excluded rejection for each.

    Chunks keep their numbers and the other candidates their chunk, so a key lands in the shard it
    would have had without the exclude file (the shards ``shards compact`` would leave)."""
    excluded = read_exclude(config.exclude)
    if not excluded:
        return plans, []
    assert config.exclude is not None
    kept = [ChunkPlan(plan.index, tuple(c for c in plan.candidates if c.key not in excluded)) for plan in plans]
    rejects = [excluded_rejection(c.key, config.exclude) for plan in plans for c in plan.candidates
               if c.key in excluded]
    return kept, rejects


def run_candidate_filter(config: BuildConfig) -> str:
    """The filter as the build's first stage; returns its candidates.parquet."""
    report = run_filter(FilterConfig.model_validate({**(config.filter or {}), "out": config.filter_out()}))
    return storage.join(report.out_dir, CANDIDATES_FILE)


def _start_ray(address: str | None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start Ray in this process. True if we started it."""
    from subjectpairs.raycluster import start_ray

    # One thread per library in each worker: Ray gives every task one core, parallelism comes from tasks.
    threads = {name: "1" for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS")}
    return start_ray(address, include_dashboard=False, logging_level="WARNING",
                     runtime_env={"env_vars": threads})


def refuse_overwriting_inputs(config: BuildConfig) -> None:
    """Stop a build whose --out is, lies inside or holds one of its inputs, before anything is written."""
    # candidates the build's own filter stage wrote earlier: a build with --candidates neither rewrites nor
    # deletes that folder
    own_candidates = config.candidates is not None and contains(config.filter_out(), config.candidates)
    inputs = {"--candidates": None if own_candidates else config.candidates, "--images": config.images,
              "--captions": config.captions, "--exclude": config.exclude}
    if config.filter is not None:
        settings = FilterConfig.model_validate({"out": config.filter_out(), **config.filter})
        inputs.update({"--bbox": settings.bbox_uri(), "--classes": settings.classes_uri(),
                       "filter.images": settings.images_uri(), "filter.zoo_dir": settings.zoo_dir})
    refuse_overlap(config.out, inputs)
    for entry in config.pair.composite.backgrounds:
        refuse_overlap(config.out, {"--backgrounds": entry})


@dataclass
class BuildPlan:
    candidates: list[Candidate]
    plans: list[ChunkPlan]  # every candidate, excluded ones too
    to_build: list[ChunkPlan]  # the plans less the excluded candidates
    excluded: list[Rejection]


def plan_build(config: BuildConfig) -> BuildPlan:
    """The candidates (from the table, or from the filter stage), their chunks and the exclusions."""
    candidates = load_candidates(config.candidates or run_candidate_filter(config), config.images, config.limit)
    plans = plan_chunks(candidates, config.shards.samples)
    to_build, excluded = exclude_candidates(config, plans)
    return BuildPlan(candidates, plans, to_build, excluded)


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
                        storage.publish_bytes(_progress_uri(config.out, plan), record.to_json().encode())
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
    shards = [asdict(shard) for record in ordered for shard in record.shards]
    rejects = sorted([*(r for record in ordered for r in record.rejects), *(excluded or [])], key=lambda r: r.key)
    pairs = sum(record.pairs for record in ordered)
    manifest = {
        "version": __version__,
        "pipeline_version": PIPELINE_VERSION,
        "config_hash": config.config_hash(),
        "candidates": sum(len(plan.candidates) for plan in plans),
        "pairs": pairs,
        "rejects": len(rejects),
        "shards": shards,
    }
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
        staged.put(MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
        staged.put(REJECTS_FILE, reject_bytes)
        staged.put(STATS_FILE, (json.dumps(stats, indent=2) + "\n").encode())
        staged.commit()
    return BuildReport(config.out, manifest, stats, reject_table)
