from __future__ import annotations

import csv
import io
import os
import socket
import tempfile
from pathlib import Path

import pytest

# FiftyOne keeps its MongoDB files and datasets under these folders; tests get their own, set before
# anything imports fiftyone (it reads them once, at import).
_FIFTYONE_HOME = Path(tempfile.mkdtemp(prefix="subjectpairs-fiftyone-"))
os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(_FIFTYONE_HOME / "db"))
os.environ.setdefault("FIFTYONE_DEFAULT_DATASET_DIR", str(_FIFTYONE_HOME / "datasets"))

from subjectpairs.curation.classes import ClassList, read_class_list
from subjectpairs.curation.synthetic import EVAL_COLUMNS, TRAIN_COLUMNS

REPO = Path(__file__).resolve().parents[1]
SHARED_CLASSES = REPO.parent / "shared" / "data" / "openimages" / "class-descriptions-boxable.csv"


BUNDLED_CLASSES = REPO / "subjectpairs" / "data" / "class-descriptions-boxable.csv"


@pytest.fixture(scope="session")
def classes_csv() -> Path:
    """The official class list: the shared reference copy beside the checkout, else the bundled one."""
    return SHARED_CLASSES if SHARED_CLASSES.exists() else BUNDLED_CLASSES


@pytest.fixture(scope="session")
def class_list(classes_csv: Path) -> ClassList:
    return read_class_list(str(classes_csv))


@pytest.fixture(scope="session")
def mid(class_list: ClassList):
    by_name = dict(zip(class_list.names, class_list.mids))
    return by_name.__getitem__


def box_row(image: str, label: str, xmin=0.1, xmax=0.8, ymin=0.1, ymax=0.8, group=0, inside=0, **extra) -> dict:
    row = {"ImageID": image, "Source": "xclick", "LabelName": label, "Confidence": "1", "XMin": xmin,
           "XMax": xmax, "YMin": ymin, "YMax": ymax, "IsOccluded": 0, "IsTruncated": 0, "IsGroupOf": group,
           "IsDepiction": 0, "IsInside": inside}
    row.update({f"XClick{k}{axis}": -1 for axis in "XY" for k in range(1, 5)})
    row.update(extra)
    return row


def write_boxes(path: Path, rows: list[dict], train_format: bool = True) -> Path:
    columns = TRAIN_COLUMNS if train_format else EVAL_COLUMNS
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())
    return path


@pytest.fixture(scope="session")
def tiny_clipseg(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_clipseg

    return save_tiny_clipseg(tmp_path_factory.mktemp("clipseg") / "tiny-clipseg")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty local hub cache in place of the machine's, so what ``auto`` finds does not depend on it."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photos that ship with scikit-image, written as JPEG (and one PNG texture)."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    written = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).save(path, quality=95)
        written[name] = path
    for name in ("brick", "grass", "gravel"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
        written[name] = path
    return written


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """A local S3-compatible server (moto) on 127.0.0.1, with a bucket ``corpus``."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import requests

    # moto keeps its buckets per process, not per server: start each test from an empty store
    requests.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=10).raise_for_status()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients would still talk to an earlier test's server
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("corpus")
    yield fs
    server.stop()




@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_blip2

    return save_tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny-blip2")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_dino

    return save_tiny_dino(tmp_path_factory.mktemp("dino") / "tiny-dino")


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The demo's shards (real photos and generated scenes, GrabCut, local Ray), built once per session."""
    from subjectpairs.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(out, scenes=6, show_progress=False, train=False, review=False)
    return out / "shards"
