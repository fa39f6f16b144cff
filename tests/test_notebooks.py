"""The notebooks run top to bottom on the demo corpus (as CI runs them) and show what they promise."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import requests
from conftest import free_port
from nbclient import NotebookClient
from subjectpairs.corpus.reader import read_shard
from subjectpairs.curation.review import SuspectThresholds

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REVIEW_NAME = "notebook-review"


@pytest.fixture
def demo_env(demo_shards: Path, monkeypatch) -> Path:
    """The notebooks' parameters pointed at the session's demo corpus (DIR/candidates, DIR/shards)."""
    monkeypatch.setenv("SUBJECTPAIRS_DEMO", str(demo_shards.parent))
    for name in ("SUBJECTPAIRS_CANDIDATES", "SUBJECTPAIRS_SHARDS", "SUBJECTPAIRS_WORST_METRIC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into outputs
    return demo_shards


def client_for(name: str) -> tuple[nbformat.NotebookNode, NotebookClient]:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # kernel "python3" is ipykernel's own spec, which jupyter_client starts with this interpreter (the venv's)
    client = NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    return notebook, client


def cells_by_tag(notebook: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    return {tag: cell for cell in notebook.cells for tag in cell.metadata.get("tags", [])}


def text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/plain", ""))
            parts.append(output.data.get("text/html", ""))
    return "\n".join(parts)


def figures(cell: nbformat.NotebookNode) -> int:
    return sum(1 for output in cell.outputs
               if output.output_type in ("execute_result", "display_data") and "image/png" in output.data)


def assert_no_errors(notebook: nbformat.NotebookNode) -> None:
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert not errors, errors
    skipped = [cell.id for cell in notebook.cells if cell.cell_type == "code" and not cell.execution_count]
    assert not skipped, f"cells that did not run: {skipped}"


def port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def demo_pairs(shards: Path) -> pd.DataFrame:
    rows = []
    for tar in sorted(shards.glob("pairs-*.tar")):
        for sample in read_shard(str(tar)):
            meta = json.loads(sample["json"])
            xmin, xmax, ymin, ymax = meta["box"]
            rows.append({**meta["metrics"], "box_area": (xmax - xmin) * (ymax - ymin)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("name", ["review.ipynb", "corpus-statistics.ipynb"])
def test_notebooks_are_stored_without_outputs_and_take_parameters(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert code[0].metadata.get("tags") == ["parameters"]
    assert 'os.environ.get("SUBJECTPAIRS_DEMO", "../demo")' in code[0].source
    assert notebook.metadata.kernelspec.name == "python3"


def test_review_notebook(demo_env, monkeypatch):
    shards = demo_env
    port = free_port()
    monkeypatch.setenv("SUBJECTPAIRS_APP_PORT", str(port))
    monkeypatch.setenv("SUBJECTPAIRS_REVIEW_NAME", REVIEW_NAME)
    notebook, client = client_for("review.ipynb")
    tagged = cells_by_tag(notebook)
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if cell is tagged["close"]:
                # the App is served while the notebook goes on
                assert requests.get(f"http://127.0.0.1:{port}/fiftyone", timeout=10).json()["version"]
            client.execute_cell(cell, index)
        # closed by the notebook itself, not by the kernel's shutdown
        deadline = time.monotonic() + 20
        while port_answers(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not port_answers(port), "the App still serves after the notebook closed it"
    assert_no_errors(notebook)

    funnel = json.loads((shards.parent / "candidates" / "funnel.json").read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    pairs = demo_pairs(shards)
    assert len(pairs) == manifest["pairs"]

    funnel_text = text(tagged["funnel"])
    assert f"{funnel['kept']} candidates kept" in funnel_text
    table = funnel_text.split("candidates kept", 1)[1]
    positions = [table.index(f"\n{rule} ") for rule in funnel["after"]]
    assert positions == sorted(positions), "the funnel table is not in the rules' order"
    # then the build's stages, the quality gate among them, each with what is left after it, down to the pairs
    stats = json.loads((shards / "stats.json").read_text())
    remaining = funnel["kept"]
    for stage, rejected in stats["rejects_by_stage"].items():
        remaining -= rejected
        assert re.search(rf"\nbuild: {stage} +{remaining} +{rejected} ", table), (stage, table)
    assert remaining == manifest["pairs"] and table.index("\nbuild: ") > positions[-1]
    assert figures(tagged["funnel"]) == 1
    assert f"{manifest['pairs']} pairs in {len(manifest['shards'])} shards" in text(tagged["metrics-table"])
    assert figures(tagged["histograms"]) == 1
    assert figures(tagged["worst-pairs"]) == 1
    assert f"{REVIEW_NAME}: {manifest['pairs']} pairs" in text(tagged["review-build"])

    limits = SuspectThresholds()
    expected = {
        "low-alpha-coverage": (pairs["alpha_in_box"] < limits.low_alpha_coverage).sum(),
        "alpha-outside-box": (pairs["alpha_outside_box"] > limits.alpha_outside_box).sum(),
        "large-unknown-band": (pairs["unknown_fraction"] > limits.large_unknown_band).sum(),
        "small-subjects": (pairs["box_area"] < limits.small_subject).sum(),
        "huge-subjects": (pairs["box_area"] > limits.huge_subject).sum(),
    }
    printed = text(tagged["saved-views"])
    for view, count in expected.items():
        assert f"saved view {view}: {count}\n" in printed, printed
    assert f"FiftyOne App at http://127.0.0.1:{port}/" in text(tagged["app"])
    assert "App closed" in text(tagged["close"])


def test_corpus_statistics_notebook(demo_env):
    shards = demo_env
    notebook, client = client_for("corpus-statistics.ipynb")
    client.execute()
    assert_no_errors(notebook)
    tagged = cells_by_tag(notebook)

    manifest = json.loads((shards / "manifest.json").read_text())
    stats = json.loads((shards / "stats.json").read_text())
    counts = text(tagged["counts"])
    assert f"candidates: {manifest['candidates']}\n" in counts
    assert f"pairs: {manifest['pairs']} in {len(manifest['shards'])} shards" in counts
    assert f"rejects: {manifest['rejects']} (" in counts
    assert stats["rejects"], "the demo corpus has rejects (a truncated and a missing photo)"
    assert all(reason in counts for reason in stats["rejects"])
    assert figures(tagged["rejects"]) == 1
    categories = {json.loads(s["json"])["category"] for tar in shards.glob("pairs-*.tar")
                  for s in read_shard(str(tar))}
    assert f"{len(categories)} categories" in text(tagged["categories"])
    for tag in ("categories", "boxes", "captions", "shards"):
        assert figures(tagged[tag]) == 1, tag
    assert f"{len(manifest['shards'])} shards, " in text(tagged["shards"])
    assert all(shard["name"] in text(tagged["shards"]) for shard in manifest["shards"])
