"""``subjectpairs shards compact``: a build's shards less the pairs that reviewers rejected.

Every shard the source's ``manifest.json`` lists is streamed (one sample in memory at a time) and checked
against the manifest's SHA-256 and sample count as it is read. Its kept samples go, in their order and with
their member bytes, into a shard of the same name written by the build's own tar writer, so the headers
are the build's and the same inputs always give the same bytes; a shard left with no samples is dropped.
The new manifest keeps the source's fields with new counts and shard entries; ``rejects.parquet`` gains
one ``review``/``excluded`` row per removed pair; ``stats.json`` and ``config.yaml`` are copied as they are.

A shard is published as soon as it is written and checked; the manifest comes last, and an output
folder's earlier manifest is removed first, so a compaction that fails part way never looks whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


from subjectpairs import storage
from subjectpairs.configfile import CONFIG_FILE
from subjectpairs.corpus.layout import MANIFEST_FILE, REJECTS_FILE, STATS_FILE, is_shard_name, read_exclude
from subjectpairs.corpus.reader import iter_shard
from subjectpairs.corpus.manifest import Manifest, ShardEntry
from subjectpairs.corpus.writer import file_sha256, shard_tar_writer
from subjectpairs.errors import InputError
from subjectpairs.guards import OutputLock, output_entries, refuse_overlap
from subjectpairs.pipelines.rejections import Rejection
from subjectpairs.pipelines.shards import REJECT_SCHEMA, excluded_rejection, rejects_parquet

COUNT_KEYS = ("candidates", "pairs", "rejects")
COPIED_FILES = (STATS_FILE, CONFIG_FILE)  # copied byte for byte when the source has them
# in the output folder while a compaction runs: the build it compacts and every shard it may replace
RECORD_FILE = ".compaction.json"


@dataclass
class CompactReport:
    out_dir: str
    manifest: dict[str, Any]
    removed: list[str]  # pairs taken out, sorted
    not_found: list[str]  # listed keys that are neither a pair nor a reject of the source, sorted
    already_rejected: list[str]  # listed keys the source had already rejected, sorted
    dropped_shards: list[str] = field(default_factory=list)  # shards left empty, not written




def _read_manifest(source: str) -> dict[str, Any]:
    """The source's manifest, checked (shard file names, each listed once), as the fields it has."""
    manifest = Manifest.read(source)
    if manifest is None:
        raise InputError(f"{source}: no {MANIFEST_FILE}: not a build's or a compaction's output folder")
    return manifest.model_dump(mode="json", exclude_unset=True)


def _read_rejects(source: str) -> list[Rejection]:
    uri = storage.join(source, REJECTS_FILE)
    if not storage.exists(uri):
        return []
    table = storage.read_parquet(uri, "rejects table")
    missing = [name for name in REJECT_SCHEMA.names if name not in table.columns]
    if missing:
        raise InputError(f"{uri}: not a rejects table, missing columns {', '.join(missing)}")
    return [Rejection(row.key, row.stage, row.reason, row.detail)
            for row in table[REJECT_SCHEMA.names].itertuples(index=False)]




def _shard_samples(uri: str, entry: dict[str, Any], manifest_uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A listed shard's samples; raises :class:`InputError` naming the shard when it cannot be read whole
    or does not match its manifest entry (checked once it has been read to the end)."""
    count = 0
    try:
        for sample in iter_shard(uri, sha256=entry.get("sha256")):
            count += 1
            key = sample.pop("__key__")
            yield key, sample
    except Exception as exc:  # tarfile, pyarrow and fsspec raise many types for a broken or missing file
        raise InputError(
            f"{uri}: cannot read this shard of {manifest_uri} ({type(exc).__name__}: {exc}); "
            "restore or rebuild it, then compact again"
        ) from exc
    if entry.get("samples") is not None and count != entry["samples"]:
        raise InputError(f"{uri}: holds {count} samples, {manifest_uri} says {entry['samples']}")


def _build_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields that say which build a manifest describes (a compaction keeps them): all but the counts
    and the shards. Equal for a build and every compaction of it, different for another build."""
    return {key: value for key, value in manifest.items() if key not in (*COUNT_KEYS, "shards")}


def _listed_shards(uri: str, out: str) -> tuple[dict[str, Any], set[str]] | None:
    """(build identity, shard names) of a manifest or compaction record in ``out``; None when absent."""
    if not storage.exists(uri):
        return None
    try:
        listed = json.loads(storage.read_bytes(uri))
        names = {entry["name"] if isinstance(entry, dict) else entry for entry in listed["shards"]}
        identity = listed["build"] if uri.endswith(RECORD_FILE) else _build_identity(listed)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{out} holds a {uri.rsplit('/', 1)[-1]} that is not a compaction's ({exc}); choose an "
                         "empty or new --out") from exc
    return identity, {name for name in names if is_shard_name(name)}


def _is_compaction_entry(name: str) -> bool:
    """What a compaction writes into its output folder, also as storage's staged copies that a killed run
    leaves (``.NAME.tmp-...``, ``.NAME.partial``)."""
    staged = storage.unstaged_name(name)
    return name == RECORD_FILE or staged in (MANIFEST_FILE, REJECTS_FILE, *COPIED_FILES) or is_shard_name(staged)


def _claim_output(out: str, manifest: dict[str, Any]) -> set[str]:
    """Make ``out`` this run's: it must be empty or new, or hold an earlier compaction of the same build and
    nothing else. Records the run in ``out`` (a compaction stopped half way is recognised and replaced by the
    next), removes the earlier manifest (the shards it describes are about to change), and returns the shard
    names the run may delete: those an earlier manifest or record of ``out`` lists."""
    entries = output_entries(out)
    earlier = [found for name in (MANIFEST_FILE, RECORD_FILE)
               if (found := _listed_shards(storage.join(out, name), out)) is not None]
    foreign = [name for name in entries if not _is_compaction_entry(name)]
    if entries and (foreign or not earlier):
        shown = ", ".join((foreign or entries)[:3]) + (", ..." if len(foreign or entries) > 3 else "")
        raise InputError(f"{out} holds files that are not a compaction's ({shown}); choose an empty or new --out")
    identity = _build_identity(manifest)
    if any(found != identity for found, _ in earlier):
        raise InputError(f"{out} holds a compaction of another build (its manifest's config_hash or version "
                         "differ from the source's); choose an empty or new --out")
    replaceable = set().union(*(names for _, names in earlier))
    record = {"build": identity, "shards": sorted(replaceable | {entry["name"] for entry in manifest["shards"]})}
    storage.publish_bytes(storage.join(out, RECORD_FILE), json.dumps(record).encode())
    if storage.exists(storage.join(out, MANIFEST_FILE)):
        storage.remove(storage.join(out, MANIFEST_FILE))
    return replaceable


def compact_shards(source: str, exclude: str, out: str) -> CompactReport:
    """Write ``source``'s shards less the pairs ``exclude`` lists to ``out`` (see the module docstring).

    The inputs are read and ``out`` is checked against them before anything is written; ``out`` is locked
    for the run."""
    refuse_overlap(out, {"the source folder": source, "--exclude": exclude})
    excluded = read_exclude(exclude)
    manifest = _read_manifest(source)
    rejects = _read_rejects(source)
    if "rejects" in manifest and manifest["rejects"] != len(rejects):
        raise InputError(f"{storage.join(source, REJECTS_FILE)}: holds {len(rejects)} rejects, "
                         f"{storage.join(source, MANIFEST_FILE)} says {manifest['rejects']}")
    with OutputLock(out, "shards compact"):
        return _compact_locked(source, exclude, out, excluded, manifest, rejects)


def _compact_locked(source: str, exclude: str, out: str, excluded: frozenset[str], manifest: dict[str, Any],
                    rejects: list[Rejection]) -> CompactReport:
    manifest_uri = storage.join(source, MANIFEST_FILE)
    rejected = {r.key for r in rejects}
    replaceable = _claim_output(out, manifest)
    entries: list[dict[str, Any]] = []
    removed: list[str] = []
    dropped: list[str] = []
    where: dict[str, str] = {}  # every pair of the source -> its shard
    with tempfile.TemporaryDirectory(prefix="subjectpairs-compact-") as scratch:
        for entry in manifest["shards"]:
            name = entry["name"]
            local = os.path.join(scratch, name)
            writer = None
            kept: list[str] = []
            try:
                for key, members in _shard_samples(storage.join(source, name), entry, manifest_uri):
                    if key in where:
                        raise InputError(f"{manifest_uri}: pair {key} is in both {where[key]} and {name}")
                    where[key] = name
                    if key in excluded:
                        removed.append(key)
                        continue
                    if writer is None:
                        writer = shard_tar_writer(local)
                    writer.write({"__key__": key, **members})
                    kept.append(key)
            finally:
                if writer is not None:
                    writer.close()
            if not kept:
                dropped.append(name)
                continue
            shard = ShardEntry(name=name, samples=len(kept), bytes=os.path.getsize(local), sha256=file_sha256(local),
                               first_key=kept[0], last_key=kept[-1])
            storage.publish_file(local, storage.join(out, name))
            os.remove(local)
            entries.append(shard.model_dump())

    pairs_before = len(where)
    if "pairs" in manifest and manifest["pairs"] != pairs_before:
        raise InputError(f"{manifest_uri}: says {manifest['pairs']} pairs, its shards hold {pairs_before}")
    rejects += [excluded_rejection(key, exclude) for key in removed]
    _, reject_bytes = rejects_parquet(rejects)
    pairs = pairs_before - len(removed)
    compacted = {key: value for key, value in manifest.items() if key not in (*COUNT_KEYS, "shards")}
    compacted.update(
        candidates=manifest.get("candidates", pairs + len(rejects)), pairs=pairs, rejects=len(rejects),
        shards=entries,
    )
    for name in sorted(replaceable - {entry["name"] for entry in entries}):  # an earlier run's, now stale
        storage.remove(storage.join(out, name))
    with storage.StagedOutputs(out) as staged:
        for name in COPIED_FILES:
            if storage.exists(storage.join(source, name)):
                staged.put(name, storage.read_bytes(storage.join(source, name)))
        staged.put(REJECTS_FILE, reject_bytes)
        staged.put(MANIFEST_FILE, Manifest.model_validate(compacted).to_bytes())
    storage.remove(storage.join(out, RECORD_FILE))  # the manifest now says what out holds
    return CompactReport(
        out_dir=out, manifest=compacted, removed=sorted(removed),
        not_found=sorted(excluded - where.keys() - rejected),
        already_rejected=sorted((excluded & rejected) - where.keys()),
        dropped_shards=dropped,
    )
