from __future__ import annotations

import functools
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from img2dataset_shards import Img2DatasetFolder, photo_jpegs, write_img2dataset_shards
from shard_batches import (
    assert_decoding_ignores_order,
    assert_resumes_exactly,
    assert_same_batches,
    read_epoch,
    samples_by_key,
)
from subjectpairs.seeds import stable_seed
from subjectpairs.training.data import CLIP_MEAN, CLIP_STD, StreamPosition
from subjectpairs.training.image_text_data import (
    ImageTextBatchReader,
    ImageTextStream,
    blip_caption,
    image_text_pixels,
    resolve_image_text_shards,
)

IMAGE_SIZE = 32
UNEVEN_COUNTS = (7, 5, 9, 6, 8)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Img2DatasetFolder:
    return write_img2dataset_shards(tmp_path_factory.mktemp("uneven"), UNEVEN_COUNTS)


def reader(shards, **overrides) -> ImageTextBatchReader:
    settings = {"rank": 0, "world_size": 1, "num_workers": 0, "batch_size": 2, "seed": 3,
                "image_size": IMAGE_SIZE, "shuffle_buffer": 4, "position": StreamPosition(), **overrides}
    return ImageTextBatchReader(shards, **settings)


def read_in_lockstep(readers: list[ImageTextBatchReader]) -> list[list[dict]]:
    """Steps as the trainer takes them: while every rank has a batch (its all-reduce)."""
    steps: list[list[dict]] = [[] for _ in readers]
    while True:
        batches = [r.next_batch() for r in readers]
        if any(batch is None for batch in batches):
            return steps
        for taken, batch in zip(steps, batches):
            taken.append(batch)


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def test_resolve_reads_the_sample_counts_from_the_stats_files(uneven, tmp_path):
    shards = resolve_image_text_shards([str(uneven.folder)])
    assert [Path(s.uri).name for s in shards] == list(uneven.keys)
    assert [s.samples for s in shards] == list(UNEVEN_COUNTS)
    assert resolve_image_text_shards([str(uneven.folder / "00002.tar")]) == [shards[2]]

    bare = write_img2dataset_shards(tmp_path / "bare", (3, 4))
    (bare.folder / "00001_stats.json").unlink()
    assert [s.samples for s in resolve_image_text_shards([str(bare.folder)])] == [3, None]
    (bare.folder / "00000_stats.json").write_text("{}")
    with pytest.raises(ValueError, match="00000_stats.json"):
        resolve_image_text_shards([str(bare.folder)])


def test_two_ranks_two_streams_read_every_sample_once_in_equal_batches(tmp_path):
    balanced = write_img2dataset_shards(tmp_path / "balanced", (6, 6, 6, 6))
    shards = resolve_image_text_shards([str(balanced.folder)])
    ranks = [read_epoch(reader(shards, rank=rank, world_size=2, num_workers=2, batch_size=3))
             for rank in range(2)]
    assert [len(batches) for batches in ranks] == [4, 4]
    for batches in ranks:
        assert [b["worker"] for b in batches] == [0, 1, 0, 1]
    keys = keys_of(ranks[0]) + keys_of(ranks[1])
    assert sorted(keys) == sorted(balanced.images)
    for batch in ranks[0] + ranks[1]:
        assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["captions"] == [blip_caption(balanced.captions[key]) for key in batch["keys"]]


def test_uneven_shards_end_an_epoch_on_every_rank_at_once(uneven):
    shards = resolve_image_text_shards([str(uneven.folder)])
    readers = [reader(shards, rank=rank, world_size=2, num_workers=2) for rank in range(2)]
    for epoch in range(2):
        ranks = read_in_lockstep(readers)
        assert len(ranks[0]) == len(ranks[1]) >= 2
        keys = keys_of(ranks[0]) + keys_of(ranks[1])
        assert len(keys) == len(set(keys))
        for batches in readers:
            batches.start_next_epoch()
            assert batches.position.epoch == epoch + 1


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    bad_jpeg, truncated_jpeg, no_caption, latin1 = "000000001", "000000004", "000010002", "000010005"
    broken = write_img2dataset_shards(tmp_path / "broken", (6, 7), members={
        bad_jpeg: {"jpg": b"\xff\xd8 not a jpeg"},
        truncated_jpeg: {"jpg": photo_jpegs()[0][:200]},
        no_caption: {"txt": None},
        latin1: {"txt": "Caf\xe9 au lait".encode("latin-1")},
    })
    batches = reader(resolve_image_text_shards([str(broken.folder)]), batch_size=1)
    read = keys_of(read_epoch(batches))
    assert sorted(read) == sorted(set(broken.images) - {bad_jpeg, truncated_jpeg, no_caption, latin1})
    assert batches.position.corrupt == 4
    assert batches.position.bad_shards == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_from_a_position_gives_the_same_batches(uneven, num_workers):
    shards = resolve_image_text_shards([str(uneven.folder)])
    assert_resumes_exactly(functools.partial(reader, shards, num_workers=num_workers))


def test_blip_caption_cleans_as_lavis_does():
    assert blip_caption('A Dog, running: on the "Beach"!!  (Sunset) ~ #happy.\n') == \
        "a dog, running on the beach sunset happy"
    assert blip_caption("  Tabs\tstay;  single  ") == "tabs\tstay single"
    long = " ".join(f"Word{i}" for i in range(60))
    assert blip_caption(long) == " ".join(f"word{i}" for i in range(50))
    assert blip_caption(long, max_words=3) == "word0 word1 word2"


def stream_samples(shards, **overrides) -> dict[str, dict]:
    """Every sample a single in-process stream yields, by key: its pixel values."""
    settings = {"rank": 0, "world_size": 1, "num_workers": 0, "batch_size": 2, "seed": 3, "epoch": 0,
                "image_size": IMAGE_SIZE, "shuffle_buffer": 4, **overrides}
    return samples_by_key(ImageTextStream(shards, **settings), ("pixel_values",))


def test_augmentation_depends_only_on_seed_epoch_and_key(uneven):
    shards = resolve_image_text_shards([str(uneven.folder)])
    base = assert_decoding_ignores_order(functools.partial(stream_samples, shards), at_least=25)
    for key, sample in base.items():
        pixels = sample["pixel_values"].numpy()
        rng = np.random.default_rng(stable_seed("sample", 3, 0, key))
        np.testing.assert_array_equal(pixels, image_text_pixels(uneven.images[key], IMAGE_SIZE, rng))
        unit = pixels * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]
        assert unit.min() > -0.05 and unit.max() < 1.05

    next_epoch = stream_samples(shards, epoch=1)
    for key in set(base) & set(next_epoch):
        assert not torch.equal(base[key]["pixel_values"], next_epoch[key]["pixel_values"])


def test_shards_read_from_memory_uri_as_from_disk(uneven):
    memory = fsspec.filesystem("memory")
    for path in uneven.folder.iterdir():
        memory.pipe(f"/img2dataset-test/{path.name}", path.read_bytes())
    try:
        remote = resolve_image_text_shards(["memory://img2dataset-test"])
        assert [s.samples for s in remote] == list(UNEVEN_COUNTS)
        from_memory = read_epoch(reader(remote))
        from_disk = read_epoch(reader(resolve_image_text_shards([str(uneven.folder)])))
    finally:
        memory.rm("/img2dataset-test", recursive=True)
    assert len(from_disk) >= 8
    assert_same_batches(from_memory, from_disk)
