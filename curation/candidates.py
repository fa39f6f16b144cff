"""The filter run: box file in, candidate table, funnel and config out."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from subjectpairs import __version__
from subjectpairs.configfile import CONFIG_FILE, config_yaml
from subjectpairs.curation.classes import read_class_list
from subjectpairs.curation.config import FilterConfig
from subjectpairs.curation.filter import FunnelStep, apply_rules, candidate_table
from subjectpairs.curation.openimages import check_columns, read_boxes, read_header
from subjectpairs.errors import InputError
from subjectpairs.guards import OutputLock, refuse_overlap
from subjectpairs.storage import StagedOutputs, exists, join, list_folder, reading

CANDIDATES_FILE = "candidates.parquet"
FUNNEL_FILE = "funnel.json"
BAD_ROWS_FILE = "bad_rows.csv"

CANDIDATE_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("label_mid", pa.string()),
    ("category", pa.string()),
    ("xmin", pa.float64()),
    ("xmax", pa.float64()),
    ("ymin", pa.float64()),
    ("ymax", pa.float64()),
    ("area", pa.float64()),
    ("aspect", pa.float64()),
    ("box_count", pa.int32()),
])


@dataclass
class FilterReport:
    out_dir: str
    candidates: pd.DataFrame
    funnel: dict
    files: list[str]


def run_filter(config: FilterConfig) -> FilterReport:
    """The filter, with local paths made absolute (the candidates' ``filepath`` is read by later commands
    from anywhere) and its output folder checked against the inputs and locked for the run."""
    config = config.with_absolute_paths()
    refuse_overlap(config.out, {"--bbox": config.bbox_uri(), "--classes": config.classes_uri(),
                                "--images": config.images_uri(), "--zoo-dir": config.zoo_dir})
    with OutputLock(config.out, "filter"):
        return _filter_locked(config)


def _filter_locked(config: FilterConfig) -> FilterReport:
    started = time.perf_counter()
    classes = read_class_list(config.classes_uri())
    # Resolve the exclusion names before the long read, so a typo fails at start-up.
    classes.mids_for_names(config.rules.excluded_classes)
    read = read_boxes(config.bbox_uri(), classes, config.on_bad_rows)
    result = apply_rules(read.boxes, classes, config.rules)
    table = candidate_table(result, classes)
    steps = list(result.steps)
    extra: dict = {}

    images_uri = config.images_uri()
    if images_uri is not None and (config.images is not None or exists(images_uri)):
        table, extra["images"] = attach_image_list(table, images_uri, config.split)
    image_dir = config.image_dir()
    if image_dir is not None and exists(image_dir):
        table, step = keep_downloaded_images(table, image_dir)
        steps.append(step)

    funnel = {
        "version": __version__,
        "bbox": config.bbox_uri(),
        "rows": read.rows,
        "bad_rows": len(read.bad_rows),
        "boxes": len(read.boxes),
        "after": {step.rule: step.remaining for step in steps},
        "dropped": {step.rule: step.dropped for step in steps[1:]},
        "kept": len(table),
        **extra,
        "per_category": {str(k): int(v) for k, v in table["category"].value_counts().items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    with StagedOutputs(config.out) as outputs:
        outputs.put(CANDIDATES_FILE, parquet_bytes(table))
        outputs.put(FUNNEL_FILE, (json.dumps(funnel, indent=2) + "\n").encode())
        outputs.put(CONFIG_FILE, config_yaml(config, "filter"))
        if config.on_bad_rows == "skip":
            outputs.put(BAD_ROWS_FILE, read.bad_rows.to_csv(index=False).encode())
    files = [join(config.out, name) for name in (CANDIDATES_FILE, FUNNEL_FILE, CONFIG_FILE)]
    return FilterReport(out_dir=config.out, candidates=table, funnel=funnel, files=files)


def parquet_bytes(table: pd.DataFrame) -> bytes:
    schema = CANDIDATE_SCHEMA
    for name, kind in (("url", pa.string()), ("rotation", pa.float64()), ("filepath", pa.string())):
        if name in table.columns:
            schema = schema.append(pa.field(name, kind))
    arrow = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(arrow, sink, compression="zstd")
    return sink.getvalue()


def attach_image_list(table: pd.DataFrame, uri: str, split: str) -> tuple[pd.DataFrame, dict]:
    """Add ``url`` and ``rotation`` from the official image list (one row per ImageID)."""
    header = read_header(uri)
    check_columns(uri, header.columns, ("ImageID", "OriginalURL"))
    column_types = {"ImageID": pa.string(), "Subset": pa.string(), "OriginalURL": pa.string(),
                    "Rotation": pa.float64()}
    wanted = [name for name in column_types if name in header.columns]
    if header.header_only:
        images = pa.schema([(name, column_types[name]) for name in wanted]).empty_table()
    else:
        try:
            with reading(uri) as stream:
                images = pacsv.read_csv(stream, convert_options=pacsv.ConvertOptions(
                    include_columns=wanted, column_types=column_types))
        except pa.ArrowInvalid as exc:  # a bad value or field count; pyarrow names the row
            raise InputError(f"{uri}: not a valid image list ({' '.join(str(exc).split())})") from exc
    if "Subset" in wanted:
        images = images.filter(pc.equal(images.column("Subset"), split))
    images = images.filter(pc.is_in(images.column("ImageID"), value_set=pa.array(table["image_id"].unique())))
    frame = images.to_pandas()
    duplicated = int(frame.duplicated("ImageID").sum())
    frame = frame.drop_duplicates("ImageID", keep="first")
    rotation = frame["Rotation"] if "Rotation" in frame else np.nan
    lookup = pd.DataFrame({"image_id": frame["ImageID"], "url": frame["OriginalURL"], "rotation": rotation})
    joined = table.merge(lookup, on="image_id", how="left", validate="many_to_one")
    missing = int(joined["url"].isna().sum())
    return joined, {"image_list": uri, "with_url": len(joined) - missing, "without_url": missing,
                    "duplicate_image_rows": duplicated}


def keep_downloaded_images(table: pd.DataFrame, image_dir: str) -> tuple[pd.DataFrame, FunnelStep]:
    """In a zoo folder, keep candidates whose ``data/<ImageID>.jpg`` was downloaded."""
    names = set(list_folder(image_dir))
    filenames = table["image_id"].astype(str) + ".jpg"
    present = filenames.isin(names).to_numpy()
    kept = table.loc[present].reset_index(drop=True)
    kept["filepath"] = [join(image_dir, name) for name in filenames[present]]
    return kept, FunnelStep("image_file", len(kept), len(table) - len(kept))
