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
        elif self.path == "/busy.jpg":
            self._send(429)
        elif self.path == "/drip.jpg":  # a byte every 0.1 s: never a read timeout, never done
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._stream(b"x", pause=0.1, limit=1000)
        elif self.path == "/endless.jpg":  # no Content-Length, a body that never ends
            self.send_response(200)
            self.end_headers()
            self._stream(BODY, pause=0.0, limit=1 << 30)
        elif self.path == "/huge.jpg":
            self._send(200, b"", length=10**9)
            self.close_connection = True
        elif self.path == "/loop.jpg":
            self._redirect("/loop.jpg")
        elif self.path == "/to-file.jpg":
            self._redirect("file:///etc/passwd")
        elif self.path == "/to-good.jpg":
            self._redirect("/good.jpg")
        elif self.path == "/bad-gzip.jpg":
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, piece: bytes, pause: float, limit: int) -> None:
        sent = 0
        try:
            while sent < limit:
                self.wfile.write(piece)
                self.wfile.flush()
                sent += len(piece)
                time.sleep(pause)
        except OSError:  # the client hung up, as it should
            pass
        self.close_connection = True


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
    assert error.reason == "http_4xx" and "403" in error.detail and Handler.hits["/forbidden.jpg"] == 1


def test_5xx_is_retried_then_succeeds(server, fetcher):
    assert fetcher.fetch(f"{server}/flaky.jpg") == BODY
    assert Handler.hits["/flaky.jpg"] == 3


def test_persistent_5xx_gives_up_after_the_retries(server, fetcher):
    error = rejected(fetcher, f"{server}/broken.jpg")
    assert error.reason == "http_5xx" and "after 3 tries" in error.detail
    assert Handler.hits["/broken.jpg"] == 3


def test_429_is_retried_under_its_own_reason(server, fetcher):
    error = rejected(fetcher, f"{server}/busy.jpg")
    assert error.reason == "http_429" and Handler.hits["/busy.jpg"] == 3


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


def test_a_drip_fed_body_ends_at_the_deadline(server):
    fetcher = PhotoFetcher(FetchConfig(read_timeout=0.3, retries=1, backoff=0.01, deadline=0.5))
    started = time.monotonic()
    error = rejected(fetcher, f"{server}/drip.jpg")
    assert error.reason == "deadline" and "after 2 tries" in error.detail
    assert time.monotonic() - started < 2.5


def test_an_endless_body_stops_at_the_byte_cap(server):
    fetcher = PhotoFetcher(FetchConfig(max_bytes=1 << 20, retries=2, backoff=0.01))
    error = rejected(fetcher, f"{server}/endless.jpg")
    assert error.reason == "too_large" and str(1 << 20) in error.detail
    assert Handler.hits["/endless.jpg"] == 1  # the same photo will be as large tomorrow


def test_a_content_length_over_the_cap_is_refused_before_reading(server, fetcher):
    started = time.monotonic()
    error = rejected(fetcher, f"{server}/huge.jpg")
    assert error.reason == "too_large" and "Content-Length 1000000000" in error.detail
    assert time.monotonic() - started < 1 and Handler.hits["/huge.jpg"] == 1


def test_redirects_go_only_to_http_and_loops_end(server, fetcher):
    assert fetcher.fetch(f"{server}/to-good.jpg") == BODY
    error = rejected(fetcher, f"{server}/to-file.jpg")
    assert error.reason == "bad_redirect" and "file:///etc/passwd" in error.detail
    assert Handler.hits["/to-file.jpg"] == 1
    looping = PhotoFetcher(FetchConfig(max_redirects=3, retries=2, backoff=0.01))
    error = rejected(looping, f"{server}/loop.jpg")
    assert error.reason == "too_many_redirects" and Handler.hits["/loop.jpg"] == 4


@pytest.mark.parametrize("kind", ["path", "file", "ftp", "relative"])
def test_a_url_column_photo_must_be_http_or_an_object_store(server, fetcher, tmp_path, kind):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(BODY)
    uri = {"path": str(photo), "file": f"file://{photo}", "ftp": "ftp://127.0.0.1/a.jpg", "relative": "a.jpg"}[kind]
    error = rejected_url(fetcher, uri)
    assert error.reason == "bad_url" and uri in error.detail and "--images" in error.detail
    assert fetcher.fetch(f"{server}/good.jpg", local=False) == BODY


def rejected_url(fetcher, uri) -> PairRejected:
    with pytest.raises(PairRejected) as raised:
        fetcher.fetch(uri, local=False)
    assert raised.value.stage == "fetch"
    return raised.value


def test_ssl_errors_are_not_retried(server, fetcher, monkeypatch):
    calls = []
    get = fetcher.session.get
    monkeypatch.setattr(fetcher.session, "get", lambda *a, **k: calls.append(a) or get(*a, **k))
    # TLS spoken to a plain-HTTP server: an SSLError (a ConnectionError subclass in requests)
    error = rejected(fetcher, server.replace("http://", "https://") + "/good.jpg")
    assert error.reason == "ssl_error" and "SSLError" in error.detail and len(calls) == 1


def test_unexpected_exceptions_become_a_named_rejection(server, fetcher, monkeypatch):
    error = rejected(fetcher, f"{server}/bad-gzip.jpg")
    assert error.reason == "unexpected_error" and "ContentDecodingError" in error.detail
    assert Handler.hits["/bad-gzip.jpg"] == 1

    def odd(*args, **kwargs):
        raise TypeError("an odd failure")

    monkeypatch.setattr(fetcher.session, "get", odd)
    error = rejected(fetcher, f"{server}/good.jpg")
    assert error.reason == "unexpected_error" and error.detail.endswith("TypeError: an odd failure")


def test_retryability_follows_the_reason_including_the_reason_older_builds_recorded():
    from subjectpairs.pipelines.rejections import Rejection

    assert Rejection("k", "fetch", "http_5xx", "HTTP 503").retryable
    assert Rejection("k", "fetch", "http_error", "HTTP 503 (after 4 tries)").retryable  # before the split
    assert not Rejection("k", "fetch", "http_404", "HTTP 404").retryable
    assert not Rejection("k", "decode", "decode_error", "cannot identify image file").retryable
