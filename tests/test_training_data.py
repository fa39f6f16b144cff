from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pair_shards import BOX_COLOUR, FLAT_CATEGORY, SHARD_COUNTS, Dataset, jpeg, write_pair_shards
from shard_batches import assert_decoding_ignores_order, assert_resumes_exactly, read_epoch, samples_by_key
from subjectpairs.corpus.layout import LATENT_MEMBER, read_exclude
from subjectpairs.corpus.reader import ShardInfo, resolve_shards
from subjectpairs.corpus.writer import write_latent_member
from subjectpairs.training.data import (
    CLIP_MEAN,
    CLIP_STD,
    BatchReader,
    PairStream,
    StreamPosition,
    plan_streams,
    target_pixels,
)

INPUT_SIZE, TARGET_SIZE = 32, 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    return write_pair_shards(tmp_path_factory.mktemp("pairs"))


def reader(shards, **overrides) -> BatchReader:
    settings = {"rank": 0, "world_size": 1, "num_workers": 0, "batch_size": 3, "seed": 7,
                "input_size": INPUT_SIZE, "target_size": TARGET_SIZE, "exclude": frozenset(), "latents": None,
                "shuffle_buffer": 5, "position": StreamPosition(), **overrides}
    return BatchReader(shards, **settings)


def test_resolve_shards_from_manifest_folder_or_tar(dataset, tmp_path):
    shards = resolve_shards([str(dataset.folder)])
    assert [Path(s.uri).name for s in shards] == list(dataset.keys)
    assert [s.samples for s in shards] == list(SHARD_COUNTS)
    assert shards[1].first_key == dataset.keys["pairs-000001.tar"][0]

    single = resolve_shards([str(dataset.folder / "pairs-000002.tar")])
    assert single == [shards[2]]

    bare = tmp_path / "bare"
    (bare / "latents").mkdir(parents=True)
    for name in ("pairs-000000.tar", "pairs-000003.tar"):
        shutil.copy(dataset.folder / name, bare / name)
    shutil.copy(dataset.folder / "pairs-000001.tar", bare / "latents" / "pairs-000001.tar")
    found = resolve_shards([str(bare)])
    assert [(Path(s.uri).name, s.samples) for s in found] == [("pairs-000000.tar", None),
                                                             ("pairs-000003.tar", None)]

    (tmp_path / "empty").mkdir()
    for nothing in (tmp_path / "empty", tmp_path / "absent.tar"):
        with pytest.raises(ValueError, match=str(nothing.name)):
            resolve_shards([str(nothing)])
    with pytest.raises(ValueError, match="more than once"):
        resolve_shards([str(dataset.folder), str(dataset.folder / "pairs-000000.tar")])


def test_read_exclude_ignores_blank_lines_and_comments(tmp_path):
    listed = tmp_path / "exclude.txt"
    listed.write_text("# near-duplicates of eval images\n\na_01\n  b_02  # blurry\n\n")
    assert read_exclude(str(listed)) == {"a_01", "b_02"}
    assert read_exclude(None) == frozenset()


def synthetic_shards(counts: list[int]) -> list[ShardInfo]:
    return [ShardInfo(f"s3://bucket/pairs-{i:06d}.tar", count, f"{i:04d}_000", f"{i:04d}_999")
            for i, count in enumerate(counts)]


def all_streams(shards, world_size, num_workers, **kwargs) -> list[list[ShardInfo]]:
    return [stream for rank in range(world_size)
            for stream in plan_streams(shards, rank=rank, world_size=world_size, num_workers=num_workers,
                                       **kwargs)]


def test_plan_streams_deals_every_shard_once_balanced_and_reshuffled_by_epoch():
    counts = [int(n) for n in np.random.default_rng(0).integers(50, 150, size=40)]
    shards = synthetic_shards(counts)
    streams = all_streams(shards, 2, 3, seed=1, epoch=0)
    assert len(streams) == 6
    assert sorted(s.uri for stream in streams for s in stream) == sorted(s.uri for s in shards)
    loads = [sum(s.samples for s in stream) for stream in streams]
    assert max(loads) - min(loads) <= max(counts)

    assert streams == all_streams(shards, 2, 3, seed=1, epoch=0)
    assert streams != all_streams(shards, 2, 3, seed=1, epoch=1)
    assert streams != all_streams(shards, 2, 3, seed=2, epoch=0)


def test_plan_streams_counts_excluded_keys_and_leaves_extra_streams_empty():
    shards = synthetic_shards([100, 100, 100])
    exclude = frozenset(f"0000_{i:03d}" for i in range(100))  # all of shard 0
    for epoch in range(6):
        streams = all_streams(shards, 1, 2, seed=0, epoch=epoch, exclude=exclude)
        # shard 0 weighs nothing, so it joins one of the others instead of making one stream twice as long
        loads = [sum(s.samples for s in stream if s.uri != shards[0].uri) for stream in streams]
        assert sorted(loads) == [100, 100]

    streams = all_streams(shards, 2, 2, seed=0, epoch=0)
    assert sorted(len(stream) for stream in streams) == [0, 1, 1, 1]


def test_two_ranks_two_workers_read_disjoint_keys_without_repeats_or_exclusions(dataset):
    shards = resolve_shards([str(dataset.folder)])
    exclude = frozenset(dataset.all_keys[::9])
    seen: list[list[str]] = []
    for rank in range(2):
        batches = read_epoch(reader(shards, rank=rank, world_size=2, num_workers=2, batch_size=2,
                                    exclude=exclude))
        assert [b["worker"] for b in batches] == [i % 2 for i in range(len(batches))]
        assert len(batches) >= 6
        seen.append([key for batch in batches for key in batch["keys"]])
    assert not set(seen[0]) & set(seen[1])
    for keys in seen:
        assert len(keys) == len(set(keys))
        assert not set(keys) & exclude


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_from_a_position_gives_the_same_batches(dataset, num_workers):
    shards = resolve_shards([str(dataset.folder)])
    assert_resumes_exactly(functools.partial(reader, shards, num_workers=num_workers))


def test_next_epoch_reshuffles(dataset):
    shards = resolve_shards([str(dataset.folder)])
    batches = reader(shards, num_workers=0)
    epoch0 = [key for batch in read_epoch(batches) for key in batch["keys"]]
    batches.start_next_epoch()
    assert (batches.position.epoch, batches.position.batches, batches.position.raw) == (1, 0, [0])
    epoch1 = [key for batch in read_epoch(batches) for key in batch["keys"]]
    assert epoch1 and epoch1 != epoch0


def test_corrupt_samples_and_broken_shards_are_skipped_and_counted(tmp_path):
    broken = write_pair_shards(tmp_path / "broken", counts=(8, 8, 8, 8))
    names = list(broken.keys)
    corrupt_jpeg, no_json = broken.keys[names[0]][2], broken.keys[names[3]][5]
    rewrite_shard(broken.folder / names[0], replace={corrupt_jpeg: {"input.jpg": b"\xff\xd8 not a jpeg"}})
    rewrite_shard(broken.folder / names[3], replace={no_json: {"json": None}})
    truncated = broken.folder / names[1]
    data = truncated.read_bytes()
    truncated.write_bytes(data[:len(data) // 2 + 100])  # breaks off inside a member
    short = broken.folder / names[2]
    rewrite_shard(short, drop=broken.keys[names[2]][-1])  # a whole tar, one sample less than the manifest
    missing = ShardInfo(str(broken.folder / "pairs-000099.tar"), None, None, None)

    batches = reader(resolve_shards([str(broken.folder)]) + [missing], batch_size=1)
    keys = [key for batch in read_epoch(batches) for key in batch["keys"]]

    intact = set(broken.keys[names[0]] + broken.keys[names[3]] + broken.keys[names[2]][:-1])
    assert set(keys) & intact == intact - {corrupt_jpeg, no_json}
    arrived_from_truncated = set(keys) & set(broken.keys[names[1]])
    assert 0 < len(arrived_from_truncated) < 8
    assert batches.position.corrupt == 2
    assert batches.position.bad_shards == sorted([str(truncated), str(short), missing.uri])


def test_samples_skipped_after_a_streams_last_full_batch_are_counted(tmp_path):
    """8 samples, 3 corrupt, batches of 4: whichever order the shuffle gives, one batch of 4 arrives and
    every corrupt sample is read before the stream ends, after that batch or before it."""
    shards = write_pair_shards(tmp_path / "tail", counts=(8,))
    (name, keys), = shards.keys.items()
    rewrite_shard(shards.folder / name, replace={key: {"input.jpg": b"not a jpeg"} for key in keys[-3:]})
    for num_workers in (0, 1):
        batches = reader(resolve_shards([str(shards.folder)]), num_workers=num_workers, batch_size=4)
        assert len(read_epoch(batches)) == 1
        assert batches.position.corrupt == 3


def test_a_key_with_a_dot_is_a_counted_skip_named_in_the_log(tmp_path, caplog):
    """webdataset cuts member names at the first dot: ``x.y.input.jpg`` would be member ``y.input.jpg`` of a
    sample ``x``, which decoding never saw."""
    shards = write_pair_shards(tmp_path / "dotted", counts=(6,))
    (name, keys), = shards.keys.items()
    dotted = keys[1] + ".y"
    rewrite_shard(shards.folder / name, rename={keys[1]: dotted})
    batches = reader(resolve_shards([str(shards.folder)]), batch_size=1)
    with caplog.at_level("WARNING", logger="subjectpairs.training.data"):
        read = {key for batch in read_epoch(batches) for key in batch["keys"]}
    assert read == set(keys) - {keys[1]}
    assert batches.position.corrupt == 1
    assert dotted in caplog.text and "not valid" in caplog.text


def rewrite_shard(path: Path, replace: dict[str, dict] | None = None, drop: str | None = None,
                  rename: dict[str, str] | None = None) -> None:
    """Rewrite a shard with members replaced (None removes one), one sample left out or keys renamed."""
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            if sample["__key__"] == drop:
                continue
            members = {name: value for name, value in sample.items() if not name.startswith("__")}
            members.update((replace or {}).get(sample["__key__"], {}))
            writer.write({"__key__": (rename or {}).get(sample["__key__"], sample["__key__"]),
                          **{name: value for name, value in members.items() if value is not None}})


def latent_of(key: str) -> np.ndarray:
    value = int(key[8:16], 16) / 64  # the sample's index in its shard, exact in float16
    return np.full((8, TARGET_SIZE // 8, TARGET_SIZE // 8), value, dtype=np.float32)


def test_latents_side_car_merged_by_key_and_missing_latent_skipped(dataset, tmp_path):
    without = dataset.keys["pairs-000001.tar"][4]
    for name, keys in dataset.keys.items():
        with wds.TarWriter(str(tmp_path / name), encoder=False) as writer:
            for key in keys:
                if key != without:
                    write_latent_member(writer, key, latent_of(key))

    batches = reader(resolve_shards([str(dataset.folder)]), latents=resolve_shards([str(tmp_path)]),
                     batch_size=4)
    read = read_epoch(batches)
    for batch in read:
        assert "target" not in batch
        assert batch["latents"].shape == (4, 8, TARGET_SIZE // 8, TARGET_SIZE // 8)
        assert batch["latents"].dtype == torch.float32
        for key, latent in zip(batch["keys"], batch["latents"]):
            assert torch.equal(latent, torch.from_numpy(latent_of(key)))
    keys = {key for batch in read for key in batch["keys"]}
    assert without not in keys
    assert len(keys) >= len(dataset.all_keys) - 1 - 3  # a partial last batch is dropped
    assert batches.position.corrupt == 1
    assert LATENT_MEMBER == "latent.npy"


def stream_samples(shards, **overrides) -> dict[str, dict]:
    """Every sample a single in-process stream yields, by key."""
    settings = {"rank": 0, "world_size": 1, "num_workers": 0, "batch_size": 4, "seed": 7, "epoch": 0,
                "input_size": INPUT_SIZE, "target_size": TARGET_SIZE, "shuffle_buffer": 8, **overrides}
    fields = ("pixel_values", "target", "captions", "categories")
    return samples_by_key(PairStream(shards, **settings), fields)


def test_augmentation_depends_only_on_seed_epoch_and_key(dataset):
    shards = resolve_shards([str(dataset.folder)])
    base = assert_decoding_ignores_order(functools.partial(stream_samples, shards), at_least=40)

    # Tiny boxes leave the crop few choices (the rocket's is too elongated for any but the centred one),
    # so not every key changes; the flat photo looks the same under any crop.
    for other in (stream_samples(shards, epoch=1), stream_samples(shards, seed=8)):
        shared = [key for key in set(base) & set(other) if base[key]["categories"] != FLAT_CATEGORY]
        changed = [key for key in shared
                   if not torch.equal(base[key]["pixel_values"], other[key]["pixel_values"])]
        assert len(changed) > 0.5 * len(shared)


def test_pixel_values_are_the_normalized_box_crop_and_target_in_unit_range(dataset):
    samples = stream_samples(resolve_shards([str(dataset.folder)]))
    assert len(samples) >= 40
    expected_box_colour = (np.array(BOX_COLOUR, np.float32) / 255 - CLIP_MEAN) / CLIP_STD
    flat = [key for key, sample in samples.items() if sample["categories"] == FLAT_CATEGORY]
    assert flat
    for key, sample in samples.items():
        pixels, target = sample["pixel_values"], sample["target"]
        assert pixels.shape == (3, INPUT_SIZE, INPUT_SIZE) and pixels.dtype == torch.float32
        assert target.shape == (3, TARGET_SIZE, TARGET_SIZE) and target.dtype == torch.float32
        unit = pixels.numpy() * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]
        assert unit.min() > -0.05 and unit.max() < 1.05
        assert target.min() >= -1 and target.max() <= 1
        captions = dataset.meta[key]["captions"]
        assert sample["captions"] in captions if captions else sample["captions"] == sample["categories"]
    for key in flat:
        centre = samples[key]["pixel_values"][:, 8:24, 8:24].numpy()
        np.testing.assert_allclose(centre.mean(axis=(1, 2)), expected_box_colour, atol=0.05)
    spread = torch.stack([s["target"] for key, s in samples.items() if key not in flat])
    assert spread.min() < -0.5 and spread.max() > 0.5


def test_target_is_the_centred_square_resized_bicubic():
    """As the authors' target transform: the centred square, bicubic to the target size, in [-1, 1]."""
    import io

    from PIL import Image

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    encoded = io.BytesIO()
    photo.save(encoded, format="PNG")
    target = target_pixels(encoded.getvalue(), 16)

    def expected(resample) -> np.ndarray:
        square = photo.resize((16, 16), resample, box=(5, 0, 35, 30))
        return np.asarray(square, np.float32).transpose(2, 0, 1) / 127.5 - 1

    np.testing.assert_allclose(target, expected(Image.Resampling.BICUBIC), atol=1e-6)
    assert np.abs(target - expected(Image.Resampling.BILINEAR)).max() > 0.05
