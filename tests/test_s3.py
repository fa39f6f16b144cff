"""Object-store inputs and outputs, against a local S3-compatible server."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import box_row, write_boxes

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("corpus")
    yield fs
    server.stop()


@pytest.mark.slow
def test_filter_reads_and_writes_s3(tmp_path, classes_csv, mid, s3):
    local = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat")), box_row("b", mid("Cat"), group=1)])
    s3.put(str(local), "corpus/in/boxes.csv")
    s3.put(str(classes_csv), "corpus/in/classes.csv")
    from subjectpairs.curation.candidates import run_filter
    from subjectpairs.curation.config import FilterConfig

    s3.invalidate_cache()
    report = run_filter(FilterConfig(out="s3://corpus/out", bbox="s3://corpus/in/boxes.csv",
                                     classes="s3://corpus/in/classes.csv"))
    assert report.candidates.image_id.tolist() == ["a"]
    s3.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls("corpus/out")) == [
        "candidates.parquet", "config.yaml", "funnel.json"]
    assert json.loads(s3.cat("corpus/out/funnel.json"))["kept"] == 1
