"""Fetching photos: local folders, object-store prefixes (fsspec) and HTTP URLs.

Every failure ends as a :class:`PairRejected` with a reason (``http_404``, ``http_error``, ``timeout``,
``truncated``, ``not_found``, ``read_error``) after a bounded number of retries, never an endless loop.
Retried: timeouts, connection errors, 5xx and 429, and bodies shorter than their Content-Length.
Not retried: 404 and other 4xx, which will not change.
"""

from __future__ import annotations

import time
import fsspec
import requests

from subjectpairs import __version__, storage
from subjectpairs.pipelines.config import FetchConfig
from subjectpairs.pipelines.rejections import PairRejected

USER_AGENT = f"subjectpairs/{__version__}"


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class PhotoFetcher:
    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self._session: requests.Session | None = None
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
            self._session.headers["User-Agent"] = USER_AGENT
        return self._session

    def fetch(self, uri: str) -> bytes:
        """The bytes at a path, an fsspec URI or an HTTP(S) URL."""
        if uri.startswith(("http://", "https://")):
            return self._with_retries(lambda: self._http_get(uri), uri)
        return self._with_retries(lambda: self._read(uri), uri)

    def _with_retries(self, attempt, uri: str) -> bytes:
        for number in range(self.config.retries + 1):
            try:
                return attempt()
            except _Retryable as exc:
                if number == self.config.retries:
                    raise PairRejected("fetch", exc.reason, f"{uri}: {exc.detail} (after {number + 1} tries)")
                time.sleep(self.config.backoff * 2**number)
        raise AssertionError("unreachable")

    def _http_get(self, url: str) -> bytes:
        timeout = (self.config.connect_timeout, self.config.read_timeout)
        try:
            response = self.session.get(url, timeout=timeout)
            body = response.content
        except requests.Timeout as exc:
            raise _Retryable("timeout", f"{type(exc).__name__}") from exc
        except requests.exceptions.ChunkedEncodingError as exc:
            raise _Retryable("truncated", f"connection closed mid-body ({exc})") from exc
        except requests.ConnectionError as exc:
            raise _Retryable("connection_error", f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status == 404:
            raise PairRejected("fetch", "http_404", f"{url}: HTTP {status}")
        if status >= 500 or status == 429:
            raise _Retryable("http_error", f"HTTP {status}")
        if status >= 400:
            raise PairRejected("fetch", "http_error", f"{url}: HTTP {status}")
        expected = response.headers.get("Content-Length")
        if expected is not None and expected.isdigit() and int(expected) != len(body):
            raise _Retryable("truncated", f"{len(body)} of {expected} bytes")
        return body

    def _filesystem(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = uri.split("://", 1)[0] if storage.is_remote(uri) else "file"
        if protocol not in self._filesystems:
            options = {"anon": True} if protocol == "s3" and self._anonymous_s3() else {}
            self._filesystems[protocol] = fsspec.filesystem(protocol, **options)
        fs = self._filesystems[protocol]
        return fs, fs._strip_protocol(uri) if storage.is_remote(uri) else str(storage.local_path(uri))

    def _anonymous_s3(self) -> bool:
        """Public buckets (OpenImages' own) need no account; private ones need the configured one."""
        if self.config.anonymous != "auto":
            return bool(self.config.anonymous)
        import botocore.session

        return botocore.session.Session().get_credentials() is None

    def _read(self, uri: str) -> bytes:
        fs, path = self._filesystem(uri)
        try:
            return fs.cat_file(path)
        except FileNotFoundError as exc:
            raise PairRejected("fetch", "not_found", f"{uri}: no such file") from exc
        except (TimeoutError, ConnectionError) as exc:
            raise _Retryable("timeout", f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise PairRejected("fetch", "read_error", f"{uri}: {exc}") from exc
