"""The filter submitted as a Ray job to a real (local, multi-process) Ray cluster."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import box_row, write_boxes

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_filter_runs_as_a_ray_job(tmp_path, classes_csv, mid):
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobStatus, JobSubmissionClient

    bbox = write_boxes(tmp_path / "boxes.csv", [box_row("a", mid("Cat")), box_row("b", mid("Woman"))])
    out = tmp_path / "out"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 0,
    })
    try:
        client = JobSubmissionClient(f"http://{cluster.head_node.address_info['webui_url']}")
        script = Path(sys.executable).parent / "subjectpairs"
        entrypoint = f"{script} filter --bbox {bbox} --classes {classes_csv} --out {out}"
        deadline = time.monotonic() + 240
        while True:
            try:
                job = client.submit_job(entrypoint=entrypoint)
                break
            except RuntimeError as exc:  # the head's job agent registers a while after the cluster is up
                assert "No available agent" in str(exc) and time.monotonic() < deadline, exc
                time.sleep(1)
        while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(1)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
        assert "excluded_class" in logs
    finally:
        cluster.shutdown()
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel["kept"] == 1 and funnel["dropped"]["excluded_class"] == 1
