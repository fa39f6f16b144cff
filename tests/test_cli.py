"""The command line: help for every command, the filter, clear errors, the demo."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import box_row, write_boxes
from subjectpairs.cli import app

runner = CliRunner()
COMMANDS = ["filter", "pair", "build", "train", "export", "generate", "latents", "review", "backgrounds", "demo", "version"]


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "subjectpairs"
    done = subprocess.run([str(script), "filter", "--help"], capture_output=True, text=True, check=True)
    assert "--zoo-dir" in done.stdout and "--duplicates" in done.stdout


def test_filter_command(tmp_path, classes_csv, mid):
    bbox = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat")), box_row("b", mid("Man"))])
    result = runner.invoke(app, ["filter", "--bbox", str(bbox), "--classes", str(classes_csv),
                                 "--out", str(tmp_path / "out"), "--duplicates", "keep-first"])
    assert result.exit_code == 0, result.output
    assert "excluded_class" in result.output
    funnel = json.loads((tmp_path / "out" / "funnel.json").read_text())
    assert funnel["kept"] == 1


def test_config_file_with_flag_override(tmp_path, classes_csv, mid):
    bbox = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat"), xmax=0.3, ymax=0.3)])  # area 0.04
    config = tmp_path / "filter.yaml"
    config.write_text(f"bbox: {bbox}\nclasses: {classes_csv}\nout: {tmp_path / 'out'}\nrules:\n  min_area: 0.5\n")
    result = runner.invoke(app, ["filter", "--config", str(config), "--min-area", "0.01"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "funnel.json").read_text())["kept"] == 1


def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, classes_csv, mid):
    bbox = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat"), XMax="oops")])
    result = runner.invoke(app, ["filter", "--bbox", str(bbox), "--classes", str(classes_csv),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "line 2: non-numeric XMax 'oops'" in result.output
    assert "Traceback" not in result.output


def test_invalid_option_value(tmp_path, classes_csv):
    result = runner.invoke(app, ["filter", "--bbox", "b.csv", "--classes", str(classes_csv),
                                 "--out", str(tmp_path), "--duplicates", "all"])
    assert result.exit_code == 2
    assert "rules.duplicates" in result.output


@pytest.mark.slow
def test_demo(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--scenes", "6", "--train-steps", "3"])
    assert result.exit_code == 0, result.output
    funnel = json.loads((tmp_path / "demo" / "candidates" / "funnel.json").read_text())
    # the astronaut (Person), the rocket (aspect), groups, repeats and small boxes are all filtered out
    assert all(funnel["dropped"][rule] > 0 for rule in ("excluded_class", "group", "aspect", "area"))
    manifest = json.loads((tmp_path / "demo" / "shards" / "manifest.json").read_text())
    assert manifest["candidates"] == funnel["kept"] == manifest["pairs"] + manifest["rejects"]
    rejects = pd.read_parquet(tmp_path / "demo" / "shards" / "rejects.parquet")
    # a corrupt photo and a missing one; the others are pairs the quality gate rejected
    assert manifest["pairs"] >= 5 and (rejects["stage"] != "quality").sum() == 2
    assert (tmp_path / "demo" / "contact-sheet.png").stat().st_size > 10_000
    assert "contact sheet" in result.output
    # the demo chooses GrabCut: the summary says so, without a warning
    assert "segmenter: grabcut (configured as kind grabcut)" in result.output and "fell back" not in result.output
    assert all(reason in result.output for reason in ("decode_error", "not_found", *rejects["reason"]))
    steps = [json.loads(line)["step"] for line in (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (tmp_path / "demo" / "model" / "model_index.json").is_file()
    assert Image.open(tmp_path / "demo" / "generated.png").size == (64, 64)
    assert "subjectpairs review app --name subjectpairs-demo" in result.output


def test_build_flags_and_settings_are_validated_before_anything_runs(tmp_path):
    base = ["build", "--out", str(tmp_path / "out"), "--candidates", str(tmp_path / "missing.parquet")]
    result = runner.invoke(app, [*base, "--set", "nonsense"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output
    result = runner.invoke(app, [*base, "--set", "pair.trimap.low=0.9"])
    assert result.exit_code == 2 and "must be below high" in result.output
    result = runner.invoke(app, [*base, "--set", "pair.colour=red"])
    assert result.exit_code == 2 and "pair.colour" in result.output
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "missing.parquet" in result.output
    assert not (tmp_path / "out").exists()


def test_latents_settings_are_a_typed_config_checked_before_anything_runs(tmp_path):
    out = tmp_path / "latents"
    result = runner.invoke(app, ["latents", "--shards", str(tmp_path), "--out", str(out), "--model", "huge"])
    assert result.exit_code == 2 and "model: Input should be 'tiny' or 'blip-diffusion'" in result.output
    result = runner.invoke(app, ["latents", "--out", str(out)])
    assert result.exit_code == 2 and "shards: Field required" in result.output
    config = tmp_path / "latents.yaml"
    config.write_text(f"shards: [{tmp_path / 'no-shards'}]\nout: {out}\nmodel: tiny\nbatch_size: 0\n")
    result = runner.invoke(app, ["latents", "--config", str(config)])
    assert result.exit_code == 2 and "batch_size: Input should be greater than or equal to 1" in result.output
    assert not out.exists()


def test_build_with_require_clipseg_stops_at_start_up_when_auto_would_fall_back(tmp_path, hub_cache):
    result = runner.invoke(app, ["build", "--out", str(tmp_path / "out"), "--candidates",
                                 str(tmp_path / "missing.parquet"), "--require-clipseg"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()  # resolved before the candidates are read
    assert line.startswith("error: CLIPSeg is required (--require-clipseg)")
    assert not (tmp_path / "out").exists()


def test_paths_with_rich_markup_print_verbatim(tmp_path, classes_csv, mid):
    folder = tmp_path / "[red]x[/bold]"  # a closing tag with no opening one: rich markup would raise
    folder.mkdir(parents=True)
    missing = folder / "in.csv"
    result = runner.invoke(app, ["filter", "--bbox", str(missing), "--classes", str(classes_csv),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {missing}: file not found"

    bbox = write_boxes(missing, [box_row("a", mid("Cat"))])
    out = tmp_path / "[bold]out:smile:"
    result = runner.invoke(app, ["filter", "--bbox", str(bbox), "--classes", str(classes_csv),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"->{out}" in "".join(result.output.split())  # the console may wrap the line


def _gzip_in_name_only(folder: Path, source: Path) -> Path:
    path = folder / f"fake-{source.name}.gz"
    path.write_bytes(source.read_bytes())
    return path


def _truncated_gzip(folder: Path, source: Path) -> Path:
    path = folder / f"cut-{source.name}.gz"
    path.write_bytes(gzip.compress(source.read_bytes() * 50)[:-40])
    return path


def _a_file(folder: Path, source: Path) -> Path:
    path = folder / "a-file.txt"
    path.write_text("not a folder\n")
    return path


def _latin1_image_id(folder: Path, source: Path) -> Path:
    path = folder / f"latin1-{source.name}"
    path.write_bytes(source.read_bytes().replace(b"0123456789abcdef", b"0123456789abcd\xe9f", 1))
    return path


INPUT_MISTAKES = {  # name: (flag, the mistake made of a good file of that flag, words of the message)
    "bbox not utf-8": ("--bbox", _latin1_image_id, "line 2: ImageID is not UTF-8 text"),
    "bbox fake gz": ("--bbox", _gzip_in_name_only, "cannot decompress as gzip"),
    "bbox truncated gz": ("--bbox", _truncated_gzip, "cannot decompress as gzip"),
    "bbox folder": ("--bbox", lambda folder, source: folder, "is a directory, expected a file"),
    "classes fake gz": ("--classes", _gzip_in_name_only, "cannot decompress as gzip"),
    "classes folder": ("--classes", lambda folder, source: folder, "is a directory, expected a file"),
    "images not utf-8": ("--images", _latin1_image_id, "not a valid image list"),
    "images truncated gz": ("--images", _truncated_gzip, "cannot decompress as gzip"),
    "out is a file": ("--out", _a_file, "is a file, expected an output folder"),
    "out under a file": ("--out", lambda folder, source: _a_file(folder, source) / "x", "lies under a file"),
}


@pytest.mark.parametrize("mistake", INPUT_MISTAKES)
def test_input_mistakes_are_one_line_naming_the_file(tmp_path, classes_csv, mid, mistake):
    from subjectpairs.curation.synthetic import write_images_csv

    good = {"--bbox": write_boxes(tmp_path / "boxes.csv", [box_row("0123456789abcdef", mid("Cat"))]),
            "--classes": tmp_path / "classes.csv", "--out": tmp_path / "out",
            "--images": tmp_path / "images.csv"}
    good["--classes"].write_bytes(classes_csv.read_bytes())
    write_images_csv(good["--images"], ["0123456789abcdef"])
    flag, make, words = INPUT_MISTAKES[mistake]
    folder = tmp_path / "mistakes"
    folder.mkdir()
    wrong = make(folder, good[flag])
    arguments = {**good, flag: wrong}
    result = runner.invoke(app, ["filter", *[str(part) for item in arguments.items() for part in item]])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {wrong}") and words in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_unwritable_out_is_one_line(tmp_path, classes_csv, mid):
    bbox = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat"))])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = runner.invoke(app, ["filter", "--bbox", str(bbox), "--classes", str(classes_csv),
                                 "--out", str(locked / "out")])
    assert result.exit_code == 2 and "Permission denied" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
