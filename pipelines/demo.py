"""The offline demo: generated OpenImages-format data through the pipeline on this machine."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pyarrow.csv as pacsv

from subjectpairs.curation.candidates import FilterReport, run_filter
from subjectpairs.curation.classes import bundled_class_list
from subjectpairs.curation.config import FilterConfig
from subjectpairs.curation.synthetic import write_bbox_csv, write_images_csv

BBOX_FILE = "train-annotations-bbox.csv"
CLASSES_FILE = "class-descriptions-boxable.csv"
IMAGES_FILE = "train-images-boxable-with-rotation.csv"


def write_demo_annotations(folder: Path, rows: int, seed: int) -> FilterConfig:
    """Generated annotations in the official file names, and the filter config that reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = bundled_class_list()
    with resources.as_file(resources.files("subjectpairs.data").joinpath(CLASSES_FILE)) as source:
        shutil.copyfile(source, folder / CLASSES_FILE)
    write_bbox_csv(folder / BBOX_FILE, rows, classes, seed=seed)
    image_ids = pacsv.read_csv(
        folder / BBOX_FILE, convert_options=pacsv.ConvertOptions(include_columns=["ImageID"])
    ).column("ImageID").unique()
    write_images_csv(folder / IMAGES_FILE, image_ids.to_numpy(zero_copy_only=False))
    return FilterConfig(
        out=str(folder.parent / "candidates"),
        bbox=str(folder / BBOX_FILE),
        classes=str(folder / CLASSES_FILE),
        images=str(folder / IMAGES_FILE),
    )


def run_demo(out: Path, rows: int = 200_000, seed: int = 0) -> FilterReport:
    config = write_demo_annotations(Path(out) / "openimages", rows, seed)
    return run_filter(config)
