"""manifest.json, typed: one reader and writer for builds, compactions and latents."""

from __future__ import annotations

import json

import pytest

from subjectpairs.corpus.manifest import LatentManifest, Manifest, ShardEntry
from subjectpairs.errors import InputError

SHARD = {"name": "pairs-000000.tar", "samples": 7, "bytes": 1566720, "sha256": "ab" * 32,
         "first_key": "00000000d0000000_02p5f1q", "last_key": "00000000e0000006_01yrx"}
BUILD = {"version": "0.1.0", "pipeline_version": "2", "config_hash": "cd" * 32, "candidates": 21, "pairs": 18,
         "rejects": 3, "shards": [SHARD]}


def file_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def test_a_build_manifest_reads_and_writes_back_byte_for_byte(tmp_path):
    (tmp_path / "manifest.json").write_bytes(file_bytes(BUILD))
    manifest = Manifest.read(str(tmp_path))
    assert manifest.pairs == 18 and manifest.shards == [ShardEntry(**SHARD)]
    assert manifest.to_bytes() == file_bytes(BUILD)
    assert Manifest(**{key: value for key, value in BUILD.items() if key != "shards"},
                    shards=[ShardEntry(**SHARD)]).to_bytes() == file_bytes(BUILD)
    assert Manifest.read(str(tmp_path / "nothing-here")) is None


def test_fields_a_file_lacks_or_another_tool_added_are_kept_as_they_are():
    hand_made = {"made_by": "a script", "shards": [{"name": "a.tar", "samples": 2, "note": "x"}]}
    manifest = Manifest.from_bytes(file_bytes(hand_made), "m.json")
    assert manifest.pairs is None
    assert json.loads(manifest.to_bytes()) == hand_made


def test_a_latent_manifest_keeps_its_order():
    latents = {"kind": "latent.npy", "vae": {"kind": "tiny", "init": None, "seed": 0, "sha256": "ef" * 32},
               "target_size": 64, "shards": [{"name": "pairs-000000.tar", "samples": 0, "first_key": None,
                                              "last_key": None, "skipped": [{"key": "k", "reason": "r"}]}]}
    assert LatentManifest.model_validate(latents).to_bytes() == file_bytes(latents)


@pytest.mark.parametrize(("shards", "problem"), [
    ([{"name": "../x.tar", "samples": 1}], "'../x.tar' is not a shard file name"),
    ([{"name": ".hidden.tar", "samples": 1}], "is not a shard file name"),
    ([{"name": "a.tar", "samples": 1}, {"name": "a.tar", "samples": 2}], "shards listed more than once: a.tar"),
    ([{"name": "a.tar"}], "shards.0.samples: Field required"),
    ([{"name": "a.tar", "samples": -1}], "greater than or equal to 0"),
    ("nope", "shards: Input should be a valid array"),
])
def test_a_manifest_that_does_not_check_is_one_line_naming_the_file(shards, problem):
    with pytest.raises(InputError) as error:
        Manifest.from_bytes(file_bytes({"shards": shards}), "/data/manifest.json")
    message = str(error.value)
    assert message.startswith("/data/manifest.json: not a shard manifest (") and problem in message
    assert "\n" not in message


def test_a_file_that_is_not_json_is_one_line_too():
    with pytest.raises(InputError, match=r"^m.json: not a shard manifest \(") as error:
        Manifest.from_bytes(b"{not json", "m.json")
    assert "\n" not in str(error.value)
