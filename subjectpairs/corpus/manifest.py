"""``manifest.json``, typed: what a folder of shards holds (docs/FORMAT.md).

A build writes one beside its pair shards, a compaction beside the shards it wrote, ``subjectpairs latents``
beside the latent shards; training, review and compaction read them. Fields that another tool added are
kept as they are, and a field the file does not have is not written back.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from subjectpairs import storage
from subjectpairs.errors import InputError, validation_problems

from .layout import MANIFEST_FILE


class ShardEntry(BaseModel):
    """One shard as a manifest lists it; what the corpus writer reports for a shard it published."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    samples: int = Field(ge=0)
    bytes: int | None = None
    sha256: str | None = None
    first_key: str | None = None
    last_key: str | None = None

    @field_validator("name")
    @classmethod
    def _shard_file_name(cls, name: str) -> str:
        # a name read from a file becomes a path beside it: nothing that leaves the folder or hides in it
        if not name.endswith(".tar") or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a shard file name")
        return name


class _ManifestFile(BaseModel):
    """What every manifest file has: its shards (each kind declares them last, where the file has them),
    listed once each, read and written one way."""

    model_config = ConfigDict(extra="allow")

    @field_validator("shards", check_fields=False)
    @classmethod
    def _listed_once(cls, shards: list[ShardEntry]) -> list[ShardEntry]:
        names = [shard.name for shard in shards]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"shards listed more than once: {', '.join(repeated[:5])}")
        return shards

    def to_bytes(self) -> bytes:
        """The file's bytes: the fields in their order, those it was made without left out."""
        return (json.dumps(self.model_dump(mode="json", exclude_unset=True), indent=2) + "\n").encode()

    @classmethod
    def read(cls, folder: str):
        """The manifest of ``folder`` (a path or URI), None when it has none; InputError, naming the file,
        when it is not a readable manifest of this kind."""
        uri = storage.join(folder, MANIFEST_FILE)
        if not storage.exists(uri):
            return None
        return cls.from_bytes(storage.read_bytes(uri), uri)

    @classmethod
    def from_bytes(cls, data: bytes, uri: str):
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise InputError(f"{uri}: not a shard manifest ({validation_problems(exc, 'file', 3)})") from exc


class Manifest(_ManifestFile):
    """A build's (or a compaction's) manifest: counts, the configuration's hash, the shards in name order."""

    version: str | None = None
    pipeline_version: str | int | None = None  # kept as the file has it (other writers use numbers)
    config_hash: str | None = None
    candidates: int | None = None
    pairs: int | None = None
    rejects: int | None = None
    shards: list[ShardEntry]


class LatentManifest(_ManifestFile):
    """``subjectpairs latents``' manifest: which VAE made the latents, for which target size; its shards
    carry the same names as the pair shards, each with the ``skipped`` pairs whose target did not decode."""

    kind: str
    vae: dict
    target_size: int
    shards: list[ShardEntry]
