"""The FiftyOne App on a review dataset, served by ``subjectpairs review app`` and looked at in a real
headless browser (Debian's chromium, driven by Playwright; the network stays closed).

The screenshot is kept as ``tests/artifacts/review-app.png`` (git-ignored) for a look at what the App drew.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import free_port
from subjectpairs.curation.review import ReviewConfig, build_review, fiftyone

CHROMIUM = shutil.which("chromium")
ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "review-app.png"
# what a browser on a machine without network needs: no sandbox (containers), no GPU, and none of the
# background fetches (updates, sync, QUIC probes) that would only time out
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 150  # the App server imports a lot; generous for loaded CI machines
PAGE_S = 90

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; "
                                                "CI's .ci/run installs it)"),
]


def _database_uri() -> str:
    """The MongoDB this process uses, for the App's process: FiftyOne would otherwise attach it to whichever
    FiftyOne database service of this user it finds first, not necessarily the one holding the dataset."""
    fo = fiftyone()
    if fo.config.database_uri:
        return fo.config.database_uri
    from fiftyone.core.odm.database import get_db_client

    host, port = get_db_client().address
    return f"mongodb://{host}:{port}"


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def _wait_for_server(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`subjectpairs review app` exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/fiftyone", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"the App did not answer on port {port} within {SERVER_START_S} s:\n{_tail(log)}")


def _stop(proc: subprocess.Popen, descendants: dict[int, psutil.Process]) -> None:
    """Ctrl-C for the CLI; its FiftyOne service shuts the server down once the CLI is gone. Anything this
    test started that is still there afterwards is killed by its id."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    try:  # the server and its service watcher, found while the CLI ran
        descendants.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
    except psutil.Error:
        pass
    _, alive = psutil.wait_procs(list(descendants.values()), timeout=30)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def _page_state(page) -> str:
    """The page's text plus the values of its inputs (the dataset selector shows the name in one)."""
    return page.evaluate(
        "() => document.body.innerText + '\\n' + "
        "Array.from(document.querySelectorAll('input')).map(i => 'input: ' + i.value).join('\\n')"
    )


def test_app_serves_the_review_dataset_grid(demo_shards, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    fo = fiftyone()
    name = f"review-app-{os.getpid()}"  # unique: other runs may share the MongoDB (see _database_uri)
    report = build_review(ReviewConfig(shards=str(demo_shards), name=name, media_dir=str(tmp_path / "media")),
                          overwrite=True, progress=False)
    dataset = fo.load_dataset(name)
    groups, samples = len(dataset), dataset.select_group_slices().count()
    assert groups == report.pairs > 0 and samples == 2 * groups
    # FiftyOne 1.22 counts every slice's samples ("14 samples" for 7 pairs) beside the slice selector while the
    # grid shows the default slice, one thumbnail per group; a count of groups would be as exact
    counts = [f"{samples:,} samples", f"{groups:,} groups"]

    port = free_port()
    log = tmp_path / "review-app.log"
    env = {**os.environ, "FIFTYONE_DATABASE_URI": _database_uri(), "PYTHONUNBUFFERED": "1"}
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    for stale in (ARTIFACT, ARTIFACT.with_suffix(".txt")):
        stale.unlink(missing_ok=True)
    descendants: dict[int, psutil.Process] = {}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "subjectpairs.cli", "review", "app", "--name", name,
             "--port", str(port), "--address", "127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        _wait_for_server(proc, port, log)
        descendants.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
        shown, media = _look(sync_api, port, name, counts, thumbnails=min(groups, 6))
        state = ARTIFACT.with_suffix(".txt").read_text()
    finally:
        _stop(proc, descendants)
        if fo.dataset_exists(name):
            fo.delete_dataset(name)
    assert shown, (f"the App did not show {name!r} with {' or '.join(map(repr, counts))} within {PAGE_S} s "
                   f"(screenshot: {ARTIFACT}); the page:\n{state[:3000]}\nserver log:\n{_tail(log)}")
    assert len(media) >= min(groups, 6), (f"the grid fetched {len(media)} images from the App, not "
                                         f"{min(groups, 6)} (screenshot: {ARTIFACT}):\n" + "\n".join(media))
    assert ARTIFACT.stat().st_size > 10_000, f"the screenshot looks empty: {ARTIFACT}"
    assert _refused(port), f"the App still answers on port {port} after the CLI was stopped"


def _look(sync_api, port: int, name: str, counts: list[str], thumbnails: int) -> tuple[bool, set[str]]:
    """Opens the dataset page; waits for the dataset selector to hold ``name``, the entry counts to read
    one of ``counts`` and ``thumbnails`` grid cells with their images; screenshots whatever it got to."""
    media: set[str] = set()  # images the grid fetched from the App server
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("response", lambda r: media.add(r.url) if "/media?" in r.url and r.ok else None)
            page.goto(f"http://127.0.0.1:{port}/datasets/{name}", wait_until="domcontentloaded")
            try:
                page.wait_for_function(
                    r"""([name, counts]) => {
                        const dataset = document.querySelector('[data-cy="selector-dataset"]');
                        const shown = document.querySelector('[data-cy="entry-counts"]')?.innerText ?? '';
                        return dataset?.value === name
                            && counts.some(count => new RegExp('(^|[^\\d,])' + count + '\\b').test(shown));
                    }""",
                    arg=[name, counts], timeout=PAGE_S * 1000,
                )
                page.wait_for_function("n => document.querySelectorAll('[data-cy=\"looker\"] canvas').length >= n",
                                       arg=thumbnails, timeout=PAGE_S * 1000)
                shown = True
            except sync_api.TimeoutError:
                shown = False
            deadline = time.monotonic() + 30
            while shown and len(media) < thumbnails and time.monotonic() < deadline:
                page.wait_for_timeout(250)
            dismiss = page.get_by_role("button", name="Dismiss")  # the App's upsell popover, over the grid
            if dismiss.count():
                dismiss.first.click()
            page.wait_for_timeout(1000)  # let the thumbnails finish drawing
            page.screenshot(path=str(ARTIFACT))
            ARTIFACT.with_suffix(".txt").write_text(_page_state(page))
        finally:
            browser.close()
    return shown, media


def _refused(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/fiftyone", timeout=2)
    except requests.RequestException:
        return True
    return False
