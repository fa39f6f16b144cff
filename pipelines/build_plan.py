"""Planning a build and its output folder: the chunks, the candidate filter as the first stage, the exclude
list, what an earlier run of the same build finished (``.progress/`` records) and what may be replaced.

Everything here runs in the driver, before Ray starts, so a mistake fails at once in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from subjectpairs import storage
from subjectpairs.configfile import CONFIG_FILE, config_yaml, read_config
from subjectpairs.corpus.layout import (
    MANIFEST_FILE,
    REJECTS_FILE,
    SHARD_PREFIX,
    STATS_FILE,
    is_shard_name,
    read_exclude,
)
from subjectpairs.corpus.writer import file_sha256
from subjectpairs.curation.candidates import CANDIDATES_FILE, run_filter
from subjectpairs.curation.config import FilterConfig
from subjectpairs.errors import InputError
from subjectpairs.guards import contains, output_entries, refuse_overlap
from subjectpairs.pipelines.chunks import ChunkRecord, plan_sha256
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.pipelines.rejections import Rejection
from subjectpairs.pipelines.shards import (
    Candidate,
    ChunkPlan,
    excluded_rejection,
    load_candidates,
    plan_chunks,
)


PROGRESS_DIR = ".progress"


OWN_FILES = (MANIFEST_FILE, REJECTS_FILE, STATS_FILE, CONFIG_FILE)  # besides shards and .progress/


class OutputInUse(InputError):
    """The output folder holds a build with another configuration, or files that are not a build's."""


def progress_uri(out: str, plan: ChunkPlan) -> str:
    return storage.join(out, PROGRESS_DIR, f"{plan.name}.json")


def _earlier_build(out: str) -> BuildConfig | None:
    """The configuration of the build in ``out``: None when it holds no config.yaml, OutputInUse when its
    config.yaml is not a build's (another command's folder)."""
    uri = storage.join(out, CONFIG_FILE)
    if not storage.exists(uri):
        return None
    try:
        return read_config(BuildConfig, uri)
    except InputError as exc:
        raise OutputInUse(f"{out}: its {CONFIG_FILE} is not a build's ({exc}); choose an empty or new --out "
                          "(--overwrite only replaces a build)") from exc


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
        uri = progress_uri(config.out, plan)
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
