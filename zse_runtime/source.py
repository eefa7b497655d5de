"""Where a `.zse` lives: a local path, any fsspec URL (`s3://`, `gs://`, ...), `https://` or
`hf://org/repo[@revision]/file.zse`, behind one interface of ranged reads.

    source = open_source("s3://bucket/model.zse")
    source.size, source.validator          # bytes; the ETag / commit that names this version
    source.read_into(offset, memoryview)   # fills the view; retries transient errors

Transient failures (dropped or refused connections, timeouts, 5xx, short reads) are retried with
exponential backoff; 403 and 404 are not, and become `RemoteAccessDenied` / `RemoteNotFound`.
Every message names the object by `describe()`, which drops URL user info and query strings
(pre-signed URLs carry their signature there), and this module quiets the HTTP client loggers
that would print request URLs and headers. Remote support is the `remote` extra; the base
install imports none of fsspec, s3fs or httpx.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.parse
from pathlib import Path

from .zsefile import ZseFile

log = logging.getLogger("zse")

INSTALL_HINT = "pip install 'zse[remote]'"
RETRY_ATTEMPTS = 5  # reads of one range; backoff 0.25, 0.5, 1, 2 s between them
RETRY_BACKOFF_S = 0.25
RETRY_BACKOFF_MAX_S = 8.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
# Loggers that print request URLs (with their query strings) or headers (with session tokens)
# at INFO or DEBUG: never let them below WARNING while a remote source is open.
_CHATTY_LOGGERS = ("httpx", "httpcore", "botocore", "aiobotocore", "s3fs", "urllib3", "fsspec")


class RemoteError(OSError):
    """A remote object could not be read. The message names it without secrets."""


class RemoteNotFound(RemoteError):
    pass


class RemoteAccessDenied(RemoteError):
    pass


class RemoteUnavailable(RemoteError):
    """A transient error persisted through every retry (server down, connection dropped)."""


class _Transient(Exception):
    """Raised by an implementation's single read for an error worth retrying."""


class _Permanent(Exception):
    """Raised by an implementation's single read for an error that retrying cannot fix."""


def redact(url: str) -> str:
    """The URL without user info, query string or fragment: safe to log."""
    if "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def is_url(location: str | os.PathLike) -> bool:
    return "://" in os.fspath(location)


class ByteSource:
    """A read-only object of `size` bytes; `validator` changes whenever its content does."""

    size: int
    validator: str | None
    local_path: Path | None = None  # set when the bytes are in a local file (mmap it instead)

    def __init__(self, url: str):
        self._url = url
        self.retries = 0  # transient failures retried so far (all threads)
        self.aborted = threading.Event()  # set to stop retrying: the load failed elsewhere
        self._lock = threading.Lock()

    def describe(self) -> str:
        return redact(self._url)

    def scrub(self, text: str) -> str:
        """`text` with the raw URL, and its query string, replaced by `describe()`."""
        text = text.replace(self._url, self.describe())
        query = urllib.parse.urlsplit(self._url).query if "://" in self._url else ""
        return text.replace(query, "<redacted>") if query else text

    # -- reads ------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill `view` with the bytes at [offset, offset + len(view)), retrying transient errors."""
        view = view.cast("B")
        if offset < 0 or offset + view.nbytes > self.size:
            raise RemoteError(f"{self.describe()}: read of {view.nbytes} bytes at {offset} is past "
                              f"the end of the {self.size}-byte object")
        self._with_retries(lambda: self._read_once(offset, view),
                           f"reading bytes {offset}..{offset + view.nbytes}")

    def _read_once(self, offset: int, view: memoryview) -> None:
        raise NotImplementedError

    def _with_retries(self, attempt, what: str):
        delay = RETRY_BACKOFF_S
        for number in range(1, RETRY_ATTEMPTS + 1):
            try:
                return attempt()
            except _Permanent as exc:
                raise self._permanent(exc.__cause__ or exc) from None
            except Exception as exc:  # noqa: BLE001 - classified below
                if isinstance(exc, (RemoteError, FileNotFoundError, PermissionError)):
                    raise self._permanent(exc) from None
                reason = self.scrub(f"{type(exc.__cause__ or exc).__name__}: {exc}")
                if number == RETRY_ATTEMPTS or self.aborted.is_set():
                    raise RemoteUnavailable(
                        f"{self.describe()}: {what} failed after {number} attempts: {reason}") from None
                with self._lock:
                    self.retries += 1
                log.warning("%s: %s failed (%s); retry %d of %d in %.2f s", self.describe(), what,
                            reason, number, RETRY_ATTEMPTS - 1, delay)
                if self.aborted.wait(delay):
                    raise RemoteUnavailable(f"{self.describe()}: {what} abandoned: {reason}") from None
                delay = min(delay * 2, RETRY_BACKOFF_MAX_S)

    def _permanent(self, exc: BaseException) -> RemoteError:
        if isinstance(exc, RemoteError):
            return exc
        detail = self.scrub(str(exc))
        if isinstance(exc, FileNotFoundError):
            return RemoteNotFound(f"{self.describe()}: not found ({detail})")
        if isinstance(exc, PermissionError):
            return RemoteAccessDenied(f"{self.describe()}: access denied ({detail}); check the "
                                      "credentials in the environment")
        return RemoteError(f"{self.describe()}: {type(exc).__name__}: {detail}")

    def close(self) -> None:
        pass


class LocalFile(ByteSource):
    def __init__(self, path: str | os.PathLike, url: str | None = None,
                 validator: str | None = None):
        super().__init__(url or os.fspath(path))
        self.local_path = Path(path)
        try:
            stat = os.stat(self.local_path)
        except FileNotFoundError:
            raise RemoteNotFound(f"{self.describe()}: no such file") from None
        self.size = stat.st_size
        self.validator = validator or f"{stat.st_mtime_ns}-{stat.st_size}"

    def _read_once(self, offset: int, view: memoryview) -> None:
        fd = os.open(self.local_path, os.O_RDONLY)
        try:
            while view.nbytes:
                got = os.preadv(fd, [view], offset)
                if got == 0:
                    raise _Transient(f"end of file at byte {offset}")
                view, offset = view[got:], offset + got
        finally:
            os.close(fd)


def _validator_from_info(info: dict) -> str | None:
    for key in ("ETag", "etag", "generation", "VersionId", "md5Hash", "LastModified", "mtime",
                "last_modified"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


class FsspecSource(ByteSource):
    """Any fsspec filesystem; ranges come from `cat_file(path, start=, end=)`."""

    def __init__(self, url: str, fs, path: str, size: int | None = None,
                 validator: str | None = None):
        super().__init__(url)
        self.fs, self.path = fs, path
        if size is None:
            info = self._with_retries(lambda: fs.info(path), "reading the object's metadata")
            if info.get("type", "file") != "file":
                raise RemoteNotFound(f"{self.describe()}: is a {info.get('type')}, not a file")
            size, validator = int(info["size"]), _validator_from_info(info)
        self.size, self.validator = size, validator

    def _read_once(self, offset: int, view: memoryview) -> None:
        data = self.fs.cat_file(self.path, start=offset, end=offset + view.nbytes)
        if len(data) != view.nbytes:
            raise _Transient(f"short read: {len(data)} of {view.nbytes} bytes (connection dropped?)")
        view[:] = data


class HttpSource(ByteSource):
    """`https://` (and `http://`) with Range requests, through httpx.

    httpx rather than fsspec's HTTP filesystem: every status code is ours to classify (403/404
    final, 5xx retried), a server that ignores Range is refused instead of silently sending the
    whole object per chunk, and only GET is used, so pre-signed GET URLs work (they refuse HEAD).
    """

    def __init__(self, url: str):
        super().__init__(url)
        httpx = _import("httpx", "https:// URLs")
        self.client = httpx.Client(follow_redirects=True, timeout=httpx.Timeout(
            READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S), limits=httpx.Limits(max_connections=32))
        self.size, self.validator = self._with_retries(self._probe, "reading the object's size")

    def _get(self, start: int, end: int):
        """GET bytes [start, end] inclusive; returns the response with its body read."""
        import httpx

        try:
            response = self.client.get(self._url, headers={"Range": f"bytes={start}-{end}"})
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _Transient(self.scrub(f"{type(exc).__name__}: {exc}")) from None
        status = response.status_code
        if status == 404 or status == 410:
            raise _Permanent() from FileNotFoundError(f"HTTP {status}")
        if status in (401, 403):
            raise _Permanent() from PermissionError(f"HTTP {status}")
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}")
        if status == 200:
            raise _Permanent() from RemoteError(
                f"{self.describe()}: the server ignored the Range header (HTTP 200); ranged reads "
                "are required")
        if status != 206:
            raise _Permanent() from RemoteError(f"{self.describe()}: unexpected HTTP {status}")
        return response

    def _probe(self) -> tuple[int, str | None]:
        response = self._get(0, 0)
        total = response.headers.get("content-range", "").rpartition("/")[2]
        if not total.isdigit():
            raise _Permanent() from RemoteError(
                f"{self.describe()}: no object size in Content-Range "
                f"{response.headers.get('content-range')!r}")
        validator = response.headers.get("etag") or response.headers.get("last-modified")
        return int(total), validator.strip('"') if validator else None

    def _read_once(self, offset: int, view: memoryview) -> None:
        response = self._get(offset, offset + view.nbytes - 1)
        first = response.headers.get("content-range", "").removeprefix("bytes ").partition("-")[0]
        if first != str(offset) or len(response.content) != view.nbytes:
            raise _Transient(f"short or misplaced range: {len(response.content)} of {view.nbytes} "
                             f"bytes at {first or '?'} (connection dropped?)")
        view[:] = response.content

    def close(self) -> None:
        self.client.close()


def _parse_hf(url: str) -> tuple[str, str, str | None, str]:
    """hf://[datasets/|spaces/]org/repo[@revision]/path -> (repo_type, repo_id, revision, path)."""
    rest = url.removeprefix("hf://")
    repo_type = "model"
    for prefix, kind in (("datasets/", "dataset"), ("spaces/", "space"), ("models/", "model")):
        if rest.startswith(prefix):
            repo_type, rest = kind, rest.removeprefix(prefix)
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{redact(url)}: expected hf://org/repo[@revision]/path/to/file.zse")
    repo_id, _, revision = f"{parts[0]}/{parts[1]}".partition("@")
    return repo_type, repo_id, revision or None, "/".join(parts[2:])


def _open_hf(url: str) -> ByteSource:
    """The local Hub cache first (works offline); otherwise ranged reads through HfFileSystem,
    pinned to the commit the revision resolves to (the commit is the validator)."""
    hub = _import("huggingface_hub", "hf:// URLs")
    from huggingface_hub import constants, errors

    repo_type, repo_id, revision, filename = _parse_hf(url)
    cached = hub.try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    if isinstance(cached, str):
        commit = Path(cached).parent
        while commit.parent.name != "snapshots" and commit != commit.parent:
            commit = commit.parent
        return LocalFile(cached, url, validator=commit.name)
    where = f"{repo_id}{'@' + revision if revision else ''}/{filename}"
    if constants.HF_HUB_OFFLINE:
        raise RemoteNotFound(f"{redact(url)}: {where} is not in the local Hub cache and "
                             "HF_HUB_OFFLINE is set")
    delay = RETRY_BACKOFF_S
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            meta = hub.get_hf_file_metadata(hub.hf_hub_url(
                repo_id, filename, repo_type=repo_type, revision=revision,
                endpoint=constants.ENDPOINT))
            break
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
                errors.EntryNotFoundError) as exc:
            raise RemoteNotFound(f"{redact(url)}: {type(exc).__name__} for {where}") from None
        except errors.GatedRepoError:
            raise RemoteAccessDenied(f"{redact(url)}: {repo_id} is gated; set HF_TOKEN") from None
        except Exception as exc:  # noqa: BLE001 - whichever HTTP client the hub uses
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise RemoteAccessDenied(f"{redact(url)}: HTTP {status} for {where}; set "
                                         "HF_TOKEN") from None
            if attempt == RETRY_ATTEMPTS or (status is not None and status < 500):
                raise RemoteUnavailable(
                    f"{redact(url)}: could not reach the Hub at {constants.ENDPOINT} after "
                    f"{attempt} attempts ({type(exc).__name__}: {exc})") from None
            log.warning("%s: Hub metadata request failed (%s); retry in %.2f s", redact(url),
                        type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    fs = hub.HfFileSystem()
    return FsspecSource(url, fs, f"{prefix}{repo_id}@{meta.commit_hash}/{filename}",
                        size=meta.size, validator=meta.commit_hash)


def _import(module: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} need the {module} package: {INSTALL_HINT} ({exc})") from None


def _open_fsspec(url: str) -> ByteSource:
    fsspec = _import("fsspec", f"{url.partition('://')[0]}:// URLs")
    protocol, path = fsspec.core.split_protocol(url)
    options = {}
    if protocol in ("s3", "s3a"):
        _import("s3fs", "s3:// URLs")
        # one retry layer (ours): botocore's and s3fs's own would multiply the wait on a dead
        # server; AWS_* variables, profiles and AWS_ENDPOINT_URL still apply through botocore
        options = dict(skip_instance_cache=True, config_kwargs=dict(
            retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S, max_pool_connections=32))
    try:
        fs = fsspec.filesystem(protocol, **options)
    except (ImportError, ValueError) as exc:
        raise ImportError(f"{redact(url)}: no filesystem for {protocol}:// ({exc}); "
                          f"{INSTALL_HINT} covers s3://") from None
    if protocol in ("s3", "s3a"):
        fs.retries = 1
    return FsspecSource(url, fs, path)


def open_source(location: str | os.PathLike) -> ByteSource:
    """A ByteSource for a local path or a URL. Raises RemoteNotFound, RemoteAccessDenied,
    RemoteUnavailable, or ImportError naming the extra to install."""
    location = os.fspath(location)
    if not is_url(location):
        return LocalFile(location)
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    scheme = location.partition("://")[0].lower()
    if scheme in ("http", "https"):
        return HttpSource(location)
    if scheme == "hf":
        return _open_hf(location)
    return _open_fsspec(location)


def open_zse(path: str | Path, cache_dir: str | Path | None) -> tuple[ZseFile, str]:
    """(ZseFile, name of the start-up stage) for a local path, or for a URL through a
    ByteSource: the `cache_dir` copy when it holds this version of the object, otherwise a
    remote ZseFile (manifest read and checked, tensor bytes not yet)."""
    if not is_url(path):
        return ZseFile(path), "manifest"
    source = open_source(str(path))
    if source.local_path is not None:  # hf:// found in the local Hub cache
        return ZseFile(source.local_path), "manifest (hub cache)"
    try:
        from .streaming import cache_path, remove_stale_copies

        cached = cache_path(cache_dir, source) if cache_dir else None
        if cache_dir and cached is None:
            log.warning("%s has no ETag or version: not caching it", source.describe())
        if cached is not None and cached.is_file():
            log.info("%s: using the cached copy %s", source.describe(), cached)
            source.close()
            return ZseFile(cached), "manifest (cache hit)"
        zse = ZseFile.from_source(source)
    except BaseException:
        source.close()
        raise
    if cached is not None:
        zse.mirror = cached
        removed = remove_stale_copies(cached)
        if removed:
            log.info("removed %d stale cached cop%s of %s", len(removed),
                     "y" if len(removed) == 1 else "ies", source.describe())
    return zse, "manifest (remote)"
