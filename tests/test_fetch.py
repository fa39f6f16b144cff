"""Fetching photos over HTTP from a local server that misbehaves on purpose, and from files."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from subjectpairs.pipelines.config import FetchConfig
from subjectpairs.pipelines.fetch import PhotoFetcher
from subjectpairs.pipelines.rejections import PairRejected

BODY = b"\xff\xd8" + bytes(range(256)) * 40


class Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        Handler.hits[self.path] += 1
        count = Handler.hits[self.path]
        if self.path == "/good.jpg":
            self._send(200, BODY)
        elif self.path == "/missing.jpg":
            self._send(404, b"not here")
        elif self.path == "/forbidden.jpg":
            self._send(403, b"no")
        elif self.path == "/flaky.jpg":
            self._send(503) if count < 3 else self._send(200, BODY)
        elif self.path == "/broken.jpg":
            self._send(500, b"oops")
        elif self.path == "/slow.jpg":
            time.sleep(1.0)
            self._send(200, BODY)
        elif self.path == "/truncated.jpg":
            self._send(200, BODY[:100], length=len(BODY))
            self.close_connection = True
        elif self.path == "/truncated-once.jpg":
            if count == 1:
                self._send(200, BODY[:100], length=len(BODY))
                self.close_connection = True
            else:
                self._send(200, BODY)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture()
def fetcher():
    Handler.hits.clear()
    return PhotoFetcher(FetchConfig(connect_timeout=2, read_timeout=0.3, retries=2, backoff=0.01))


def rejected(fetcher, url) -> PairRejected:
    with pytest.raises(PairRejected) as raised:
        fetcher.fetch(url)
    assert raised.value.stage == "fetch"
    return raised.value


def test_good_response(server, fetcher):
    assert fetcher.fetch(f"{server}/good.jpg") == BODY


def test_404_is_rejected_at_once(server, fetcher):
    assert rejected(fetcher, f"{server}/missing.jpg").reason == "http_404"
    assert Handler.hits["/missing.jpg"] == 1


def test_other_4xx_is_not_retried(server, fetcher):
    error = rejected(fetcher, f"{server}/forbidden.jpg")
    assert error.reason == "http_error" and "403" in error.detail and Handler.hits["/forbidden.jpg"] == 1


def test_5xx_is_retried_then_succeeds(server, fetcher):
    assert fetcher.fetch(f"{server}/flaky.jpg") == BODY
    assert Handler.hits["/flaky.jpg"] == 3


def test_persistent_5xx_gives_up_after_the_retries(server, fetcher):
    error = rejected(fetcher, f"{server}/broken.jpg")
    assert error.reason == "http_error" and "after 3 tries" in error.detail
    assert Handler.hits["/broken.jpg"] == 3


def test_slow_server_times_out_with_bounded_retries(server, fetcher):
    started = time.monotonic()
    assert rejected(fetcher, f"{server}/slow.jpg").reason == "timeout"
    assert Handler.hits["/slow.jpg"] == 3 and time.monotonic() - started < 5


def test_truncated_body_is_detected_and_retried(server, fetcher):
    assert rejected(fetcher, f"{server}/truncated.jpg").reason == "truncated"
    assert Handler.hits["/truncated.jpg"] == 3
    assert fetcher.fetch(f"{server}/truncated-once.jpg") == BODY


def test_refused_connection_is_a_rejection(fetcher):
    error = rejected(fetcher, "http://127.0.0.1:9/none.jpg")
    assert error.reason == "connection_error"


def test_local_files(tmp_path, fetcher):
    (tmp_path / "a.jpg").write_bytes(BODY)
    assert fetcher.fetch(str(tmp_path / "a.jpg")) == BODY
    assert fetcher.fetch(f"file://{tmp_path / 'a.jpg'}") == BODY
    assert rejected(fetcher, str(tmp_path / "b.jpg")).reason == "not_found"
