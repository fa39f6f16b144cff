"""Whole pairs: the ``pair`` command and the builder on real photos, determinism, bad input."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from subjectpairs.cli import app
from subjectpairs.pipelines.boxes import Box
from subjectpairs.pipelines.config import PairConfig
from subjectpairs.pipelines.pairs import MEMBERS, PairBuilder, PairRequest, photo_key
from subjectpairs.pipelines.rejections import Rejection

runner = CliRunner()
ASTRONAUT_BOX = "0.04,0.72,0.02,1.0"


def run_pair(*args: str):
    return runner.invoke(app, ["pair", *args])


def read_image(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_pair_command_writes_every_member(tmp_path, photos):
    out = tmp_path / "pair"
    result = run_pair(str(photos["astronaut"]), "--category", "Person", "--box", ASTRONAUT_BOX,
                      "--segmenter", "grabcut", "--background", str(photos["brick"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([*MEMBERS, "foreground.png", "meta.json", "config.yaml"])
    target, composite = read_image(out / "target.jpg"), read_image(out / "input.jpg")
    alpha, trimap, foreground = (read_image(out / n) for n in ("alpha.png", "trimap.png", "foreground.png"))
    assert target.shape == composite.shape == (512, 512, 3)  # the astronaut is 512x512 already
    assert alpha.shape == trimap.shape == (512, 512) and alpha.dtype == np.uint8
    assert foreground.shape == (512, 512, 4) and np.array_equal(foreground[:, :, 3], alpha)
    assert set(np.unique(trimap)) == {0, 128, 255}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["category"] == "Person" and meta["box"] == [0.04, 0.72, 0.02, 1.0]
    assert meta["segmenter"]["name"] == "grabcut" and meta["background"] == str(photos["brick"])
    assert set(meta["metrics"]) == {"alpha_in_box", "alpha_outside_box", "unknown_fraction", "map_box_iou",
                                    "matting_residual"}
    assert meta["metrics"]["alpha_in_box"] > 0.4 and meta["metrics"]["alpha_outside_box"] < 0.05
    assert {"decode", "segment", "trimap", "matting", "composite", "encode"} <= set(meta["seconds"])
    # the composite shows the subject where alpha is 1 and the background where it is 0
    sure = trimap == 255
    assert np.abs(composite[sure].astype(int) - target[sure].astype(int)).mean() < 4
    assert np.abs(composite[trimap == 0].astype(int) - target[trimap == 0].astype(int)).mean() > 20
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["segmenter"]["kind"] == "grabcut" and config["composite"]["backgrounds"] == [str(photos["brick"])]


def test_same_inputs_and_seed_give_identical_files(tmp_path, photos):
    def build(out, seed):
        result = run_pair(str(photos["astronaut"]), "--category", "Person", "--box", ASTRONAUT_BOX,
                          "--segmenter", "grabcut", "--seed", str(seed), "--out", str(out))
        assert result.exit_code == 0, result.output
        return {name: (out / name).read_bytes() for name in MEMBERS}

    first, second = build(tmp_path / "a", 1), build(tmp_path / "b", 1)
    assert first == second
    other_seed = build(tmp_path / "c", 2)
    assert other_seed["input.jpg"] != first["input.jpg"] and other_seed["target.jpg"] == first["target.jpg"]
    meta_a = json.loads((tmp_path / "a" / "meta.json").read_text())
    meta_b = json.loads((tmp_path / "b" / "meta.json").read_text())
    meta_a.pop("seconds"), meta_b.pop("seconds")
    assert meta_a == meta_b


def test_given_trimap_skips_segmentation(tmp_path, photos):
    drawn = np.zeros((300, 451), np.uint8)
    cv2.ellipse(drawn, (225, 160), (150, 130), 0, 0, 360, 128, -1)
    cv2.ellipse(drawn, (225, 160), (110, 95), 0, 0, 360, 255, -1)
    trimap_file = tmp_path / "trimap.png"
    Image.fromarray(drawn).save(trimap_file)
    out = tmp_path / "pair"
    # the drawn ellipse covers a third of the whole-image box, below the gate's min_alpha_in_box
    result = run_pair(str(photos["chelsea"]), "--category", "Cat", "--trimap", str(trimap_file), "--no-quality-gate",
                      "--out", str(out))
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["segmenter"] == {"name": "given-trimap"} and "segment" not in meta["seconds"]
    assert meta["metrics"]["map_box_iou"] is None
    assert np.array_equal(read_image(out / "trimap.png"), drawn)


def test_pair_command_says_loudly_when_auto_falls_back_and_require_clipseg_stops_it(tmp_path, photos, hub_cache):
    args = [str(photos["astronaut"]), "--category", "Person", "--box", ASTRONAUT_BOX, "--background",
            str(photos["brick"])]
    result = run_pair(*args, "--out", str(tmp_path / "fallback"))
    assert result.exit_code == 0, result.output
    assert "WARNING: segmenter auto fell back to GrabCut" in result.output
    meta = json.loads((tmp_path / "fallback" / "meta.json").read_text())
    assert meta["segmenter"]["name"] == "grabcut" and "not on disk" in meta["segmenter"]["why"]
    chosen = run_pair(*args, "--segmenter", "grabcut", "--out", str(tmp_path / "chosen"))
    assert chosen.exit_code == 0 and "WARNING" not in chosen.output
    required = run_pair(*args, "--require-clipseg", "--out", str(tmp_path / "required"))
    assert required.exit_code == 2 and len(required.output.strip().splitlines()) == 1
    assert "--require-clipseg" in required.output and not (tmp_path / "required").exists()


def test_clipseg_model_folder_from_the_command_line(tmp_path, photos, tiny_clipseg):
    out = tmp_path / "pair"
    # an untrained model's faint map makes a poor matte, which the quality gate would reject
    result = run_pair(str(photos["coffee"]), "--category", "Coffee cup", "--model", str(tiny_clipseg),
                      "--device", "cpu", "--box-gate", "--box", "0.28,0.7,0.03,0.77", "--no-quality-gate",
                      "--out", str(out))
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["segmenter"]["name"] == "clipseg" and meta["segmenter"]["model"] == str(tiny_clipseg)
    trimap = read_image(out / "trimap.png")
    # gated: left of the padded box (x < 143) nothing is subject, and the unknown band is at most 6 px wide
    assert (trimap[:, :136] == 0).all() and (trimap[:, :143] != 255).all()


def test_size_option_sets_the_short_side(tmp_path, photos):
    out = tmp_path / "pair"
    result = run_pair(str(photos["coffee"]), "--category", "Coffee cup", "--segmenter", "grabcut",
                      "--size", "200", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert read_image(out / "target.jpg").shape == (200, 300, 3)
    assert read_image(out / "alpha.png").shape == (200, 300)


def _bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_odd_photos_build_pairs_and_bad_ones_are_rejected_with_a_reason(photos):
    coffee = Image.fromarray(data.coffee())
    sixteen = cv2.imencode(".png", data.coffee().astype(np.uint16)[:, :, ::-1] * 257)[1].tobytes()
    good = photos["coffee"].read_bytes()
    requests = [
        PairRequest("gray", "Coffee cup", _bytes(coffee.convert("L"), "JPEG")),
        PairRequest("cmyk", "Coffee cup", _bytes(coffee.convert("CMYK"), "JPEG")),
        PairRequest("sixteen", "Coffee cup", sixteen),
        PairRequest("corrupt", "Coffee cup", good[:2000]),
        PairRequest("tiny", "Coffee cup", _bytes(coffee.resize((30, 20)), "PNG")),
        PairRequest("outside", "Coffee cup", good, box=Box(1.2, 1.5, 0.1, 0.5)),
        PairRequest("gray", "Coffee cup", good),  # the same key again
        PairRequest("fine", "Coffee cup", good, box=Box(0.28, 0.7, 0.03, 0.77)),
    ]
    # the photo formats are under test here, not the mattes: GrabCut finds less of the cup in the grey
    # photo, which the quality gate would reject
    builder = PairBuilder(PairConfig(segmenter={"kind": "grabcut"}, quality={"enabled": False}))
    results = builder.build(requests)
    assert len(results) == len(requests)
    outcome = {(r.key, r.reason if isinstance(r, Rejection) else "pair") for r in results}
    assert outcome == {
        ("gray", "pair"), ("cmyk", "pair"), ("sixteen", "pair"), ("corrupt", "decode_error"),
        ("tiny", "too_small"), ("outside", "bad_box"), ("gray", "duplicate_key"), ("fine", "pair"),
    }
    for result in results:
        if not isinstance(result, Rejection):
            assert result.target.shape == (400, 600, 3) and result.alpha.shape == (400, 600)


def test_rejections_and_bad_arguments_are_one_line_errors(tmp_path, photos):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(photos["coffee"].read_bytes()[:1500])
    result = run_pair(str(corrupt), "--category", "Cup", "--out", str(tmp_path / "x"), "--segmenter", "grabcut")
    assert result.exit_code == 2 and "decode_error" in result.output
    assert not (tmp_path / "x").exists()
    result = run_pair(str(photos["coffee"]), "--category", "Cup", "--box", "0.1,0.2", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "XMIN,XMAX,YMIN,YMAX" in result.output
    result = run_pair(str(tmp_path / "missing.jpg"), "--category", "Cup", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "not found" in result.output
    result = run_pair(str(photos["coffee"]), "--category", "Cup", "--out", str(tmp_path / "x"), "--low", "0.9")
    assert result.exit_code == 2 and "must be below high" in result.output


def test_photo_keys_have_no_dots():
    assert photo_key("000a1b2c.d", "Coffee cup") == "000a1b2c-d_Coffee-cup"


def test_an_unexpected_error_rejects_only_the_sample_it_comes_from(photos, monkeypatch):
    import subjectpairs.pipelines.pairs as pairs
    from subjectpairs.pipelines.segmenters import SegmenterConfig
    from subjectpairs.pipelines.segmenters import build_segmenter

    class ChokesOnOdd:
        """A segmenter that fails on any batch holding an "odd" prompt."""

        name = "grabcut"

        def __init__(self) -> None:
            self.inner = build_segmenter(SegmenterConfig(kind="grabcut"))
            self.batches: list[list[str]] = []

        def segment(self, images, prompts, boxes):
            self.batches.append(list(prompts))
            if "odd" in prompts:
                raise RuntimeError("the model chokes on this one")
            return self.inner.segment(images, prompts, boxes)

        def describe(self):
            return self.inner.describe()

    decode = pairs.decode_image

    def decode_or_fail(data, *args, **kwargs):
        if data == b"odd photo":
            raise cv2.error("OpenCV cannot handle this photo")
        return decode(data, *args, **kwargs)

    monkeypatch.setattr(pairs, "decode_image", decode_or_fail)
    good = photos["coffee"].read_bytes()
    box = Box(0.28, 0.7, 0.03, 0.77)
    segmenter = ChokesOnOdd()
    builder = PairBuilder(PairConfig(size=128), segmenter=segmenter)
    fine, odd, broken = builder.build([
        PairRequest("fine", "Coffee cup", good, box), PairRequest("odd", "Odd", good, box),
        PairRequest("broken", "Coffee cup", b"odd photo", box),
    ])
    assert not isinstance(fine, Rejection) and fine.key == "fine"
    assert (odd.stage, odd.reason, odd.detail) == ("segment", "unexpected_error",
                                                    "RuntimeError: the model chokes on this one")
    assert (broken.stage, broken.reason) == ("prepare", "unexpected_error") and broken.detail.startswith("error:")
    assert "OpenCV cannot handle this photo" in broken.detail
    assert segmenter.batches == [["coffee cup", "odd"], ["coffee cup"], ["odd"]]  # retried one by one


def test_a_box_that_is_not_numbers_is_a_clear_error(tmp_path, photos):
    with pytest.raises(ValueError, match="four finite numbers"):
        Box.parse("nan,0.5,0.1,0.9")
    result = run_pair(str(photos["coffee"]), "--category", "Cup", "--box", "nan,0.5,0.1,0.9",
                      "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "four finite numbers XMIN,XMAX,YMIN,YMAX, got 'nan,0.5,0.1,0.9'" in result.output
    # a candidates table with a null coordinate gives a NaN box: its rejection says so, values and all
    (rejection,) = PairBuilder(PairConfig(segmenter={"kind": "grabcut"})).build(
        [PairRequest("k", "Cup", photos["coffee"].read_bytes(), Box(float("nan"), 0.5, 0.1, 0.9))]
    )
    assert (rejection.reason, rejection.detail) == (
        "bad_box", "box nan,0.5,0.1,0.9 (XMIN,XMAX,YMIN,YMAX) has a coordinate that is not a number"
    )
