"""Fetching photos: local folders, object-store prefixes (fsspec) and HTTP URLs.

Every failure ends as a :class:`PairRejected`, in bounded time and after a bounded number of tries, never
an endless loop nor an exception that stops the job. The reasons of :data:`RETRYABLE_REASONS` (``timeout``,
``deadline``, ``connection_error``, ``truncated``, ``http_5xx``, ``http_429``) are retried here, and again
by a rerun; the others will not change and are not: ``http_404``, ``http_4xx``, ``too_large``,
``bad_url``, ``bad_redirect``, ``too_many_redirects``, ``ssl_error``, ``not_found``, ``read_error``,
``unexpected_error`` (any other exception, named in the detail).

An HTTP body is streamed under a byte cap (``max_bytes``; a larger Content-Length is refused before any
read) and one try's deadline (``deadline``, from connect to the last read), so an endless or drip-fed
body ends. Redirects are followed only to HTTP(S), at most ``max_redirects`` times. A photo from a
candidates table's ``url`` column is read only over HTTP(S) or from an object store: local files come
only through ``--images`` or a zoo's ``filepath``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable
from urllib.parse import urljoin, urlsplit

import requests

from subjectpairs import __version__, storage
from subjectpairs.pipelines.config import FetchConfig
from subjectpairs.pipelines.rejections import RETRYABLE_REASONS, UNEXPECTED_ERROR, PairRejected, describe_error

USER_AGENT = f"subjectpairs/{__version__}"
HTTP_SCHEMES = ("http", "https")
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss")
_CHUNK_BYTES = 1 << 16


def uri_scheme(uri: str) -> str:
    """``https``, ``s3``, ``file``, ...; empty for a bare path."""
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


class _HttpOnlySession(requests.Session):
    """Follows a redirect only to an HTTP(S) URL: ``file://`` and the like are refused, not attempted."""

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is not None and urlsplit(urljoin(resp.url, target)).scheme.lower() not in HTTP_SCHEMES:
            resp.close()
            raise PairRejected("fetch", "bad_redirect", f"redirected to {target}, which is not HTTP(S)")
        return target


class PhotoFetcher:
    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self._session: requests.Session | None = None
        self._readers: dict[str, storage.FileReader] = {}

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = _HttpOnlySession()
            self._session.headers["User-Agent"] = USER_AGENT
            self._session.max_redirects = self.config.max_redirects
        return self._session

    def fetch(self, uri: str, *, local: bool = True) -> bytes:
        """The bytes at a path, an fsspec URI or an HTTP(S) URL. With ``local=False`` (a photo from a
        ``url`` column) only HTTP(S) and object-store URIs are read."""
        scheme = uri_scheme(uri)
        if not local and scheme not in HTTP_SCHEMES + OBJECT_STORE_SCHEMES:
            raise PairRejected(
                "fetch", "bad_url",
                f"{uri}: a url must be HTTP(S) or an object-store URI (local files only through --images or "
                "a filepath column)",
            )
        if scheme in HTTP_SCHEMES:
            return self._with_retries(lambda: self._http_get(uri), uri)
        return self._with_retries(lambda: self._read(uri), uri)

    def _with_retries(self, attempt: Callable[[], bytes], uri: str) -> bytes:
        tries = self.config.retries + 1
        for number in range(tries):
            try:
                return attempt()
            except PairRejected as exc:
                if exc.reason not in RETRYABLE_REASONS:
                    raise PairRejected("fetch", exc.reason, f"{uri}: {exc.detail}") from exc
                if number + 1 == tries:
                    raise PairRejected("fetch", exc.reason, f"{uri}: {exc.detail} (after {tries} tries)") from exc
            except Exception as exc:  # one odd photo must not stop the job: it is this photo's rejection
                raise PairRejected("fetch", UNEXPECTED_ERROR, f"{uri}: {describe_error(exc)}") from exc
            time.sleep(self.config.backoff * 2**number)
        raise AssertionError("unreachable")

    def _http_get(self, url: str) -> bytes:
        """One try: status, then the body under the byte cap and the deadline."""
        config = self.config
        deadline = time.monotonic() + config.deadline
        timeout = (min(config.connect_timeout, config.deadline), min(config.read_timeout, config.deadline))
        try:
            with self.session.get(url, timeout=timeout, stream=True) as response:
                _check_status(response.status_code)
                return self._body(response, deadline)
        except requests.exceptions.TooManyRedirects as exc:
            raise PairRejected("fetch", "too_many_redirects", f"more than {config.max_redirects} redirects") from exc
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                requests.exceptions.MissingSchema) as exc:
            raise PairRejected("fetch", "bad_url", describe_error(exc)) from exc
        except requests.exceptions.SSLError as exc:  # a bad certificate stays bad: not retried
            raise PairRejected("fetch", "ssl_error", describe_error(exc)) from exc
        except requests.Timeout as exc:
            raise PairRejected("fetch", "timeout", type(exc).__name__) from exc
        except requests.exceptions.ChunkedEncodingError as exc:
            raise PairRejected("fetch", "truncated", f"connection closed mid-body ({describe_error(exc)})") from exc
        except requests.ConnectionError as exc:
            raise PairRejected("fetch", "connection_error", describe_error(exc)) from exc

    def _body(self, response: requests.Response, deadline: float) -> bytes:
        cap = self.config.max_bytes
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > cap:
            raise PairRejected("fetch", "too_large", f"Content-Length {length} is over fetch.max_bytes ({cap})")
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            with contextlib.suppress(Exception):  # the body may have ended and its connection gone back
                response.raw.shutdown()  # wakes a read blocked on a drip-fed body

        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), expire)
        watchdog.daemon = True
        watchdog.start()
        body = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK_BYTES):
                body += chunk
                if len(body) > cap:
                    raise PairRejected("fetch", "too_large", f"body over fetch.max_bytes ({cap})")
        except requests.RequestException:
            if not expired.is_set():
                raise
        finally:
            watchdog.cancel()
        if expired.is_set():
            raise PairRejected("fetch", "deadline", f"no whole body within fetch.deadline ({self.config.deadline} s)")
        return bytes(body)

    def _reader(self, uri: str) -> storage.FileReader:
        protocol = uri.split("://", 1)[0] if storage.is_remote(uri) else "file"
        if protocol not in self._readers:
            options = {"anon": True} if protocol == "s3" and self._anonymous_s3() else {}
            self._readers[protocol] = storage.FileReader(protocol, **options)
        return self._readers[protocol]

    def _anonymous_s3(self) -> bool:
        """Public buckets (OpenImages' own) need no account; private ones need the configured one."""
        if self.config.anonymous != "auto":
            return bool(self.config.anonymous)
        import botocore.session

        return botocore.session.Session().get_credentials() is None

    def _read(self, uri: str) -> bytes:
        reader = self._reader(uri)
        try:
            return reader.read(uri)
        except FileNotFoundError as exc:
            raise PairRejected("fetch", "not_found", "no such file") from exc
        except (TimeoutError, ConnectionError) as exc:
            raise PairRejected("fetch", "timeout", describe_error(exc)) from exc
        except OSError as exc:
            raise PairRejected("fetch", "read_error", describe_error(exc)) from exc


def _check_status(status: int) -> None:
    if status == 404:
        raise PairRejected("fetch", "http_404", f"HTTP {status}")
    if status == 429:
        raise PairRejected("fetch", "http_429", f"HTTP {status}")
    if status >= 500:
        raise PairRejected("fetch", "http_5xx", f"HTTP {status}")
    if status >= 400:
        raise PairRejected("fetch", "http_4xx", f"HTTP {status}")
