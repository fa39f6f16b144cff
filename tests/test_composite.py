"""Background pools, deterministic choice and crop, blending."""

from __future__ import annotations

import numpy as np
import pytest

from subjectpairs.errors import InputError
from subjectpairs.pipelines.composite import PROCEDURAL, BackgroundPool, blend, cover_crop
from subjectpairs.pipelines.rejections import PairRejected


@pytest.fixture()
def pool_dir(tmp_path, photos):
    folder = tmp_path / "backgrounds"
    (folder / "nested").mkdir(parents=True)
    for name in ("brick", "grass", "gravel"):
        (folder / f"{name}.png").write_bytes(photos[name].read_bytes())
    (folder / "nested" / "rocket.JPG").write_bytes(photos["rocket"].read_bytes())
    (folder / "notes.md").write_text("not an image")
    return folder


def test_pool_from_folder_list_file_and_single_image(pool_dir, tmp_path, photos):
    from_folder = BackgroundPool.from_entries([str(pool_dir)])
    assert [p.rsplit("/", 1)[1] for p in from_folder.uris] == ["brick.png", "grass.png", "gravel.png", "rocket.JPG"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my backgrounds\nbackgrounds/brick.png\n\n{photos['coffee']}\n")
    from_list = BackgroundPool.from_entries([str(listing)])
    assert from_list.uris == tuple(sorted([str(pool_dir / "brick.png"), str(photos["coffee"])]))
    merged = BackgroundPool.from_entries([str(pool_dir), str(pool_dir / "brick.png")])
    assert merged.uris == from_folder.uris  # no duplicates


def test_bad_pool_entries_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        BackgroundPool.from_entries([str(tmp_path / "missing.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no background images"):
        BackgroundPool.from_entries([str(tmp_path / "empty")])


def test_a_list_file_or_pool_without_backgrounds_is_an_error_not_generated_backgrounds(tmp_path):
    import pandas as pd

    empty_list = tmp_path / "backgrounds.txt"
    empty_list.write_text("# nothing yet\n\n")
    with pytest.raises(InputError, match=f"{empty_list}: lists no backgrounds"):
        BackgroundPool.from_entries([str(empty_list)])
    binary_list = tmp_path / "photo.txt"
    binary_list.write_bytes(b"\xff\xd8\xff\xe0")
    with pytest.raises(InputError, match=f"{binary_list}: not a text file"):
        BackgroundPool.from_entries([str(binary_list)])
    pool = tmp_path / "pool"
    pool.mkdir()
    pd.DataFrame({"uri": pd.Series([], dtype=str)}).to_parquet(pool / "backgrounds.parquet")
    with pytest.raises(InputError, match=f"{pool}: the background pool has no backgrounds"):
        BackgroundPool.from_entries([str(pool)])


def test_choice_and_crop_are_fixed_by_seed_and_key(pool_dir):
    pool = BackgroundPool.from_entries([str(pool_dir)])
    first = pool.background_for(7, "000a_m-0bt9lr", (200, 300))
    again = BackgroundPool.from_entries([str(pool_dir)]).background_for(7, "000a_m-0bt9lr", (200, 300))
    assert first[0] == again[0] and np.array_equal(first[1], again[1])
    chosen = {pool.choose(7, f"key-{i}") for i in range(40)}
    assert len(chosen) == 4  # different keys spread over the whole pool
    assert {pool.choose(8, f"key-{i}") for i in range(40)} == chosen
    assert [pool.choose(8, f"key-{i}") for i in range(40)] != [pool.choose(7, f"key-{i}") for i in range(40)]


def test_cover_crop_fills_the_shape_from_inside_the_image():
    rng = np.random.default_rng(0)
    image = np.arange(100 * 50 * 3, dtype=np.uint32).reshape(100, 50, 3).astype(np.uint8)
    assert cover_crop(image, (300, 200), rng).shape == (300, 200, 3)  # upscaled to cover
    gradient = np.repeat(np.linspace(0, 255, 400)[None, :, None], 3, axis=2).repeat(100, axis=0).astype(np.uint8)
    crops = {cover_crop(gradient, (100, 100), np.random.default_rng(s))[0, 0, 0] for s in range(10)}
    assert len(crops) > 1  # the window moves with the generator


def test_undecodable_background_is_a_recorded_rejection(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    pool = BackgroundPool.from_entries([str(bad)])
    with pytest.raises(PairRejected) as raised:
        pool.background_for(0, "k", (64, 64))
    assert (raised.value.stage, raised.value.reason) == ("composite", "decode_error")
    assert str(bad) in raised.value.detail


def test_empty_pool_generates_backgrounds_deterministically():
    pool = BackgroundPool.from_entries([])
    name, a = pool.background_for(3, "k1", (64, 96))
    _, b = pool.background_for(3, "k1", (64, 96))
    _, c = pool.background_for(3, "k2", (64, 96))
    assert name == PROCEDURAL and a.shape == (64, 96, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_blend_is_the_alpha_weighted_mix():
    foreground = np.full((2, 2, 3), 200, np.uint8)
    background = np.full((2, 2, 3), 40, np.uint8)
    alpha = np.array([[0.0, 0.25], [0.5, 1.0]])
    out = blend(foreground, alpha, background)
    assert out.dtype == np.uint8
    assert out[:, :, 0].tolist() == [[40, 80], [120, 200]]
