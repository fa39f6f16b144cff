"""What the tests of the streaming loaders share: reading a rank's epoch, resuming a reader part way and
comparing batches."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from subjectpairs.training.data import ShardBatchReader, ShardStream, StreamPosition


def read_epoch(batches: ShardBatchReader) -> list[dict]:
    read = []
    while (batch := batches.next_batch()) is not None:
        read.append(batch)
    return read


def assert_resumes_exactly(make_reader: Callable[..., ShardBatchReader], done: int = 3) -> None:
    """A reader resumed from the position (through JSON, as a checkpoint keeps it) of one that had read
    ``done`` batches gives what an uninterrupted epoch gives after its first ``done``, at least 5 batches.
    An odd ``done`` makes a resumed two-worker loader start on logical worker 1."""
    uninterrupted = read_epoch(make_reader())
    first = make_reader()
    for _ in range(done):
        first.next_batch()
    saved = json.loads(json.dumps(first.position.to_dict()))
    assert len(uninterrupted) >= done + 5
    resumed = read_epoch(make_reader(position=StreamPosition.from_dict(saved)))
    assert_same_batches(resumed, uninterrupted[done:])


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for got_batch, expected_batch in zip(got, expected):
        assert_same_fields(got_batch, expected_batch)


def assert_same_fields(got: dict, expected: dict) -> None:
    """The same batch or sample: every field equal, tensors to the bit."""
    assert got.keys() == expected.keys()
    for name, value in got.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, expected[name]), name
        else:
            assert value == expected[name], name


def samples_by_key(stream: ShardStream, fields: tuple[str, ...]) -> dict[str, dict]:
    """Every sample a stream yields (read in process), by key: its ``fields``."""
    return {key: {name: batch[name][i] for name in fields}
            for batch in stream if "end" not in batch for i, key in enumerate(batch["keys"])}


def assert_decoding_ignores_order(read: Callable[..., dict[str, dict]], at_least: int) -> dict[str, dict]:
    """``read(**stream_overrides)`` gives samples by key: read with another shuffle buffer and batch size
    (other positions, other batches), at least ``at_least`` of them come out the same. The default reading."""
    base = read()
    reordered = read(shuffle_buffer=1, batch_size=5)
    common = set(base) & set(reordered)
    assert len(common) >= at_least
    for key in common:
        assert_same_fields(reordered[key], base[key])
    return base
