"""Where checkpoints live: local paths, or fsspec URLs (``s3://``, ``gs://``, ``https://``, ``hf://``,
``memory://``) behind the ``[remote]`` extra.

A remote location is a :class:`RemotePath`: a ``pathlib.Path`` whose file-system methods (``stat``,
``is_dir``, ``iterdir``, ``open``...) go to the store, so readers that walk folders and join names
work unchanged, while anything that would open it as a *local* file (``open(path)``, ``os.stat``)
fails loudly (``__fspath__`` raises) instead of reading a local file of the same name. Readers
open files through :func:`open_read` and read ranges with :func:`pread`: for a remote file these
are HTTP range requests, each retried with backoff on transient errors, conditional on the object
being the one first seen (its ETag), and checked for length. Destinations are written locally and
uploaded (:func:`upload`), completed last: an S3 object appears whole or not at all.

fsspec is imported only when a URL is used: local conversions need none of it.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat as stat_module
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PosixPath
from typing import IO, Any, ClassVar, TypeVar

from .errors import ConverterError, MissingDependencyError, PathLike

REMOTE_EXTRA = "statedict-convert[remote]"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_USERINFO = re.compile(r"(://)[^/\s]*@")  # up to the last @ of the authority: a password may hold one
_QUERY = re.compile(r"\?[^\s'\"]*")  # a signed URL's query (X-Amz-Signature=..., token=...)

# Range requests: the first read of a file fetches at least FIRST_FETCH bytes (a header and the
# sniffing of the leading bytes fit in it); sequential small reads double it up to MAX_FETCH, so a
# reader parsing a big header by small reads makes a few requests, not one per field.
FIRST_FETCH = 64 << 10
MAX_FETCH = 8 << 20
# Transient errors (connection reset, timeout, HTTP 5xx/429) are retried this many times in all,
# waiting BACKOFF * 2**attempt seconds (with jitter) in between: bounded, about 4 s at worst.
ATTEMPTS = 4
BACKOFF = 0.25
READ_TIMEOUT = 60  # seconds without a byte from an HTTP server before the request fails (and is retried)
UPLOAD_PART = 8 << 20  # S3 multipart part size (S3's minimum is 5 MiB for all but the last)

T = TypeVar("T")


class RemoteError(ConverterError):
    """A remote object could not be read or written: missing, access denied, changed while being
    read, or the network failed after the retries. The message never holds credentials."""

    missing = False  # the object does not exist (``exists()`` is False rather than an error)


def is_url(text: object) -> bool:
    """Whether ``text`` is a URL this package reads through fsspec (``file://`` is a local path).

    >>> is_url("s3://bucket/model.safetensors"), is_url("model.safetensors"), is_url("file:///tmp/x")
    (True, False, False)
    """
    if isinstance(text, RemotePath):
        return True
    if not isinstance(text, str):
        return False
    match = _URL.match(text)
    return match is not None and match.group(1).lower() != "file"


def location(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> Path:
    """``path`` as this package handles it: a :class:`RemotePath` for a URL, else a local ``Path``.

    ``storage_options`` are the fsspec file system's arguments (``anon``, ``key``, ``secret``,
    ``endpoint_url``, ``token``...); credentials otherwise come from where the protocol's library
    looks (environment, profiles).
    """
    if isinstance(path, RemotePath):
        return path
    if isinstance(path, str) and is_url(path):
        return remote(path, storage_options)
    if isinstance(path, str) and path.lower().startswith("file://"):
        return _file_url(path)
    return Path(path)  # storage options are the URLs' (a conversion may go from a local file to a store)


def _file_url(url: str) -> Path:
    """``file:///abs/path`` (or ``file://localhost/abs/path``), escapes decoded."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ConverterError(f"a file:// URL names a file of this machine, not of {parts.netloc!r}", file=url)
    return Path(unquote(parts.path))


def remote(url: str, storage_options: Mapping[str, Any] | None = None) -> RemotePath:
    """The :class:`RemotePath` of ``url``, its file system made with ``storage_options``."""
    match = _URL.match(url)
    if match is None:
        raise ConverterError("not a URL (expected protocol://...)", file=_redacted(url, {}))
    protocol = match.group(1).lower()
    options = _for_protocol(storage_options or {}, protocol)
    query = ""
    if protocol in ("http", "https") and ("?" in url or "#" in url):
        # a signed or tokenised URL: its query belongs to this object only (not to the names
        # joined to it), never to its name (the suffix says the format), and is never shown
        url, _, fragment_free = url.partition("#")[0].partition("?")
        query = "?" + fragment_free if fragment_free else ""
    if protocol in ("s3", "s3a"):
        # s3fs retries each call 5 times and botocore again underneath: with ``retrying`` on top,
        # one unreachable endpoint cost 20 requests and 40 s per range. One layer retries: ours.
        config = dict(_mapping(options, "config_kwargs", url))
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config
    fsspec = _fsspec(url)
    for key in ("client_kwargs", "config_kwargs", "headers"):
        _mapping(options, key, url)
    if protocol in ("http", "https") and "timeout" not in _mapping(options, "client_kwargs", url):
        # a server that stops sending must not hold a conversion for aiohttp's default 5 minutes
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=READ_TIMEOUT, sock_read=READ_TIMEOUT)
        options["client_kwargs"] = {**_mapping(options, "client_kwargs", url), "timeout": timeout}
    try:
        filesystem = fsspec.filesystem(protocol, **options)
    except ImportError as exc:  # s3fs, gcsfs, huggingface_hub... missing
        # the extra brings S3, HTTP and the Hub; other stores need their own fsspec package,
        # which fsspec's message names ("Install gcsfs to access Google Storage")
        remedy = (
            f"install the extra: pip install '{REMOTE_EXTRA}'"
            if protocol in _IN_THE_EXTRA
            else f"install the fsspec package for {protocol}:// (fsspec says: {_redacted(str(exc), options)})"
        )
        raise MissingDependencyError(
            f"reading {protocol}:// URLs needs a package that is not installed; {remedy}",
            file=_redacted(url, options),
        ) from None
    except ValueError as exc:  # an unknown protocol
        raise ConverterError(
            f"cannot open this URL: {_redacted(str(exc), options)}", file=_redacted(url, options)
        ) from None
    except TypeError as exc:  # a storage option the file system does not take
        raise ConverterError(
            f"bad storage option for {protocol}://: {_redacted(str(exc), options)}", file=_redacted(url, options)
        ) from None
    if protocol in ("s3", "s3a") and hasattr(filesystem, "retries"):
        filesystem.retries = 1  # a class attribute of s3fs (5), not an argument: see above
    # fsspec shares one file system per set of options and caches its listings: a listing from
    # before this command (another conversion in this process) could be stale
    with suppress(Exception):
        filesystem.invalidate_cache()
    inner = url[match.end() :]
    kind = type(
        f"RemotePath[{protocol}]",
        (RemotePath,),
        {
            "_fs": filesystem,
            "_protocol": protocol,
            "_secrets": _secrets(options),
            "_infos": {},
            "_heads": {},
            "_queries": {},
            "_listings": {},
        },
    )
    made: RemotePath = kind(inner)
    if query:
        made._queries[PosixPath.__str__(made)] = query
    return made


def _for_protocol(options: Mapping[str, Any], protocol: str) -> dict[str, Any]:
    """The storage options for one URL's protocol: ``s3.endpoint_url`` goes to s3:// URLs only
    (a conversion from https:// to s3:// must not send S3 credentials to the web server);
    a key without such a prefix goes to every URL."""
    chosen: dict[str, Any] = {}
    for key, value in options.items():
        prefix, dot, name = key.partition(".")
        if dot and prefix.isidentifier() and prefix.lower() in _PROTOCOLS:
            if prefix.lower() == protocol or (prefix.lower(), protocol) in (("s3", "s3a"), ("http", "https")):
                chosen[name] = value
        else:
            chosen.setdefault(key, value)
    return chosen


_IN_THE_EXTRA = frozenset({"s3", "s3a", "http", "https", "hf", "memory"})
_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "http", "https", "hf", "memory", "az", "abfs", "file"})


def _mapping(options: Mapping[str, Any], key: str, url: str) -> Mapping[str, Any]:
    value = options.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConverterError(
            f"storage option {key} must be a JSON object ({key}='{{\"name\": ...}}'), got {type(value).__name__}",
            file=_redacted(url, {}),
        )
    return value


def _fsspec(url: str) -> Any:
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError(
            f"remote paths need fsspec, which is not installed; install the extra: pip install '{REMOTE_EXTRA}'",
            file=_redacted(url, {}),
        ) from None
    return fsspec


# ------------------------------------------------------------------------------- remote paths


@dataclass(frozen=True)
class RemoteStat:
    """What ``RemotePath.stat`` tells: enough of ``os.stat_result`` for the readers."""

    st_size: int
    st_mode: int
    etag: str | None


class RemotePath(PosixPath):
    """A file or folder in an fsspec store, with the ``pathlib.Path`` methods readers use.

    Each URL given to :func:`remote` makes its own subclass holding the file system, so paths
    derived from it (``parent``, ``/ "shard.safetensors"``) stay in the same store with the same
    credentials, and what was learnt about objects (size, ETag) is shared by them and only them.
    """

    _fs: ClassVar[Any] = None
    _protocol: ClassVar[str] = ""
    _secrets: ClassVar[tuple[str, ...]] = ()
    _infos: ClassVar[dict[str, dict[str, Any]]] = {}
    # The first block of each file read: sniffing the format and then parsing the header open the
    # file twice, and would fetch the same leading bytes twice.
    _heads: ClassVar[dict[str, bytes]] = {}
    _queries: ClassVar[dict[str, str]] = {}  # the query of a signed URL, by the path it was given for
    _listings: ClassVar[dict[str, list[dict[str, Any]]]] = {}

    @property
    def url(self) -> str:
        """The URL the file system is asked about (may hold credentials: never print it)."""
        inner = PosixPath.__str__(self)
        query = self._queries.get(inner, "")
        if self._protocol in ("http", "https") and inner.startswith("/"):
            inner = inner[1:]
        return f"{self._protocol}://{inner}{query}"

    @property
    def filesystem(self) -> Any:
        return self._fs

    def __str__(self) -> str:
        return _redacted(self.url, {}, self._secrets)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __fspath__(self) -> str:
        raise TypeError(
            f"{self} is a remote object: open it with converters.core.storage.open_read, not as a local path"
        )

    def __reduce__(self) -> Any:  # the file system is not pickled with it
        raise TypeError(f"{self}: a remote path cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other._fs is self._fs and other.url == self.url

    def __hash__(self) -> int:
        return hash((id(self._fs), self.url))

    # --- what is in the store

    def info(self) -> dict[str, Any]:
        """The store's description of the object (``size``, ``type``, ``ETag``...), asked once: the
        size and ETag first seen are the ones every later range request holds the object to."""
        cached = self._infos.get(self.url)
        if cached is None:
            cached = self._infos[self.url] = dict(self._call(lambda: self._fs.info(self.url), "read"))
        return cached

    def stat(self, *, follow_symlinks: bool = True) -> Any:
        details = self.info()
        folder = details.get("type") == "directory"
        size = details.get("size")
        if not folder and not isinstance(size, int):
            raise RemoteError("the server does not tell the object's size (needed to read ranges of it)", file=self)
        mode = (stat_module.S_IFDIR | 0o555) if folder else (stat_module.S_IFREG | 0o444)
        return RemoteStat(int(size or 0), mode, etag_of(details))

    def lstat(self) -> Any:
        return self.stat()

    def exists(self, *, follow_symlinks: bool = True) -> bool:
        try:
            self.info()
        except RemoteError as exc:
            if exc.missing:
                return False
            raise
        return True

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        try:
            return bool(self.info().get("type") == "directory")
        except RemoteError as exc:
            if exc.missing:
                return False
            raise

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        try:
            return bool(self.info().get("type") != "directory")
        except RemoteError as exc:
            if exc.missing:
                return False
            raise

    def is_symlink(self) -> bool:
        return False

    def is_fifo(self) -> bool:
        return False

    def is_socket(self) -> bool:
        return False

    def is_block_device(self) -> bool:
        return False

    def is_char_device(self) -> bool:
        return False

    def iterdir(self) -> Iterator[RemotePath]:  # type: ignore[override]
        entries = self._listings.get(self.url)
        if entries is None:  # listed once per command: readers look at a folder several times
            entries = self._listings[self.url] = self._call(lambda: self._fs.ls(self.url, detail=True), "list")
        prefix = self._fs._strip_protocol(self.url).rstrip("/")
        for entry in sorted(entries, key=lambda e: str(e["name"])):
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if not name or self._fs._strip_protocol(str(entry["name"])).rstrip("/") == prefix:
                continue
            child = self / name
            assert isinstance(child, RemotePath)
            self._infos.setdefault(child.url, dict(entry))
            yield child

    def resolve(self, strict: bool = False) -> Any:
        return self

    def absolute(self) -> Any:
        return self

    def samefile(self, other_path: Any) -> bool:
        return bool(self == other_path)

    def open(self, mode: str = "r", buffering: int = -1, *args: Any, **kwargs: Any) -> Any:
        if mode not in ("rb", "r"):
            raise TypeError(f"{self}: remote paths are opened for reading only here (mode {mode!r})")
        handle = RemoteFile(self)
        buffered = io.BufferedReader(handle, FIRST_FETCH)
        return buffered if mode == "rb" else io.TextIOWrapper(buffered, *args, **kwargs)

    def read_bytes(self) -> bytes:
        with open_read(self) as handle:
            return pread(handle, self.stat().st_size, 0)

    def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8", errors or "strict")

    def _call(self, action: Callable[[], T], verb: str) -> T:
        return retrying(action, self, verb)


def etag_of(details: Mapping[str, Any]) -> str | None:
    """The object's version tag as the store reports it (S3 ``ETag``, HTTP ``ETag``, GCS generation)."""
    for key in ("ETag", "etag", "generation", "md5Hash"):
        value = details.get(key)
        if value:
            return str(value)
    return None


# --------------------------------------------------------------------------- reading remote files


class RemoteFile(io.RawIOBase):
    """A remote object read by range requests: ``readinto``/``seek`` for readers that stream,
    :meth:`pread` for readers that jump. The object's size and ETag are the ones first seen; every
    request asks for that version (``If-Match`` where the store supports it), and a range that
    comes back short or from a changed object is an error naming the file, never short data.
    """

    def __init__(self, path: RemotePath) -> None:
        super().__init__()
        self.path = path
        details = path.info()
        if details.get("type") == "directory":
            raise RemoteError("is a folder, not a file", file=path)
        self.size: int = path.stat().st_size
        self.etag = etag_of(details)
        self._position = 0
        self._cache_start = 0
        self._cache = path._heads.get(path.url, b"")
        self._next_fetch = FIRST_FETCH
        self._handle: Any = None

    # --- io.RawIOBase

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), max(0, self.size - self._position))
        if count:
            view[:count] = self._read(self._position, count, readahead=count < FIRST_FETCH)
        self._position += count
        return count

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with suppress(Exception):  # a read handle: closing cannot lose data
                handle.close()
        self._cache = b""
        super().close()

    # --- ranges

    def pread(self, count: int, offset: int) -> bytes:
        """``count`` bytes at ``offset`` (fewer only at the end of the object)."""
        count = min(count, max(0, self.size - offset))
        return self._read(offset, count, readahead=count < FIRST_FETCH) if count > 0 else b""

    def _read(self, offset: int, count: int, *, readahead: bool) -> bytes:
        cached = self._cache
        if self._cache_start <= offset and offset + count <= self._cache_start + len(cached):
            start = offset - self._cache_start
            return cached[start : start + count]
        if not readahead:
            return self.fetch(offset, offset + count)
        # small reads: fetch a block from here, bigger each time reads go on sequentially
        sequential = offset == self._cache_start + len(cached)
        self._next_fetch = min(MAX_FETCH, self._next_fetch * 2) if sequential and cached else self._next_fetch
        end = min(self.size, offset + max(count, self._next_fetch))
        self._cache = self.fetch(offset, end)
        self._cache_start = offset
        if offset == 0 and len(self._cache) <= FIRST_FETCH:
            self.path._heads[self.path.url] = self._cache
        return self._cache[:count]

    def fetch(self, start: int, end: int) -> bytes:
        """The bytes ``[start, end)`` of the object, by one range request (retried)."""
        return bytes(self.fetch_chunk(start, end))

    def fetch_chunk(self, start: int, end: int) -> bytes | bytearray:
        """``fetch`` without a copy of what the request gave (a stream's chunks)."""
        if end <= start:
            return b""
        data = retrying(lambda: self._fetch_once(start, end), self.path, "read")
        if len(data) != end - start:
            raise RemoteError(
                f"asked for bytes {start}-{end - 1}, the server sent {len(data)}: the object is shorter than "
                f"the {self.size} bytes it had when opened (truncated or replaced while being read)",
                file=self.path,
            )
        return data

    def _fetch_once(self, start: int, end: int) -> bytes | bytearray:
        if self.path._protocol in ("http", "https"):
            return _http_range(self.path, start, end, self.etag)
        if self.path._protocol in ("s3", "s3a"):
            return _s3_range(self.path, start, end, self.etag)
        handle = self._open()
        fetch_range = getattr(handle, "_fetch_range", None)
        if fetch_range is not None:
            return bytes(fetch_range(start, end))
        handle.seek(start)  # a store whose files have no range fetch (memory://): plain reads
        return bytes(handle.read(end - start))

    def _open(self) -> Any:
        """The store's own file object, for stores read through it (memory://, gs://, hf://)."""
        if self._handle is None:
            filesystem, url = self.path._fs, self.path.url

            def open_it() -> Any:
                try:  # no cache (reads are ranges already), and the size known: no request for it
                    return filesystem.open(url, "rb", cache_type="none", size=self.size)
                except TypeError:  # a file system whose files take none of these options
                    return filesystem.open(url, "rb")

            self._handle = retrying(open_it, self.path, "read")
        return self._handle


def _too_long(path: RemotePath, start: int, end: int, got: int | str) -> RemoteError:
    if str(got).isdigit() and int(got) < end - start:
        why = "the object is shorter than when it was opened (truncated or replaced while being read)"
    else:
        why = "the object changed while being read, or the server does not honour Range requests"
    return RemoteError(f"asked for bytes {start}-{end - 1}, the server answered {got} bytes: {why}", file=path)


async def _read_exactly(read: Callable[[int], Any], path: RemotePath, start: int, end: int) -> bytearray:
    """The body of a range answer, into one buffer of the size asked (no growing, no copies: the
    memory of a chunk is the chunk), refusing a body longer than asked as soon as it shows."""
    expected = end - start
    data = bytearray(expected)
    view = memoryview(data)
    filled = 0
    while True:
        piece = await read(min(1 << 20, expected + 1 - filled))
        if not piece:
            break
        if filled + len(piece) > expected:
            raise _too_long(path, start, end, f"more than {expected}")
        view[filled : filled + len(piece)] = piece
        filled += len(piece)
    view.release()
    del data[filled:]  # a short answer: the caller reports it
    return data


def _http_range(path: RemotePath, start: int, end: int, etag: str | None) -> bytearray:
    """One HTTP range request, made here rather than through fsspec's file object: the answer
    must be a 206 for exactly these bytes, of the version first seen (``If-Match``), and is read
    no further than asked (a server announcing or sending more is refused, never buffered)."""
    from fsspec.asyn import sync

    filesystem = path._fs
    expected = end - start

    async def get() -> bytearray:
        session = await filesystem.set_session()
        options = dict(filesystem.kwargs)
        headers = dict(options.pop("headers", None) or {})  # the user's (Authorization...), kept
        headers["Range"] = f"bytes={start}-{end - 1}"
        if etag and not etag.startswith("W/"):  # If-Match compares strongly: a weak tag never matches
            headers["If-Match"] = etag
        async with session.get(filesystem.encode_url(path.url), headers=headers, **options) as response:
            whole = response.status == 200 and start == 0 and end == path.stat().st_size
            if response.status == 200 and not whole:
                raise RemoteError(
                    "the server ignores Range requests (it answered 200 with the whole object); "
                    "reading parts of a file needs a server that honours them",
                    file=path,
                )
            response.raise_for_status()
            announced = response.headers.get("Content-Length")
            if announced is not None and announced.strip() != str(expected):
                raise _too_long(path, start, end, announced)
            return await _read_exactly(response.content.read, path, start, end)

    result: bytearray = sync(filesystem.loop, get)
    return result


def _s3_range(path: RemotePath, start: int, end: int, etag: str | None) -> bytearray:
    """One S3 GET of a range, conditional on the ETag first seen (``IfMatch``: a replaced
    object answers 412), read no further than asked."""
    from fsspec.asyn import sync

    filesystem = path._fs
    bucket, key, version = filesystem.split_path(path.url)
    arguments: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
    if etag:
        arguments["IfMatch"] = etag
    if version:
        arguments["VersionId"] = version

    async def get() -> bytearray:
        try:
            response = await filesystem._call_s3("get_object", **arguments)
        except OSError as exc:  # s3fs's translation of 412 PreconditionFailed
            if exc.args and exc.args[0] == errno.EINVAL and "pre-conditions" in str(exc):
                raise _changed(path) from None
            raise
        body = response["Body"]
        try:
            announced = response.get("ContentLength")
            if announced is not None and announced != end - start:
                raise _too_long(path, start, end, announced)
            return await _read_exactly(body.read, path, start, end)
        finally:
            body.close()

    result: bytearray = sync(filesystem.loop, get)
    return result


STREAM_CHUNK = 8 << 20  # one range request of a conversion
# Chunks fetched and not yet used, across all the threads of a conversion (a folder written by
# several workers streams several tensors at once): memory stays bounded whatever the workers.
# Two: one being written, one on its way (more gained no speed on one stream and cost 8 MiB each,
# times the per-thread allocator arenas, with --workers 4: 54 MiB above start-up at 2, 72 at 4).
IN_FLIGHT = 2
_IN_FLIGHT = threading.BoundedSemaphore(IN_FLIGHT)
IN_FLIGHT_WAIT = 30.0


def stream_range(
    path: Path, offset: int, length: int, chunk: int = STREAM_CHUNK
) -> Generator[bytes | bytearray, None, None]:
    """The ``length`` bytes of the remote file ``path`` from ``offset``, in chunks, each fetched
    by a range request while the caller uses the one before (latency hidden, memory bounded)."""
    assert isinstance(path, RemotePath)
    handle = RemoteFile(path)
    if offset + length > handle.size:
        raise RemoteError(
            f"bytes {offset}-{offset + length - 1} are past the end of the object ({handle.size} bytes)", file=path
        )
    starts = list(range(offset, offset + length, chunk))

    def fetch(start: int) -> tuple[bytes | bytearray, bool]:
        # A slot is released once the chunk has been used. Waiting is bounded: a slot held by a
        # stream that failed and is not closed yet must not stop the others for good.
        held = _IN_FLIGHT.acquire(timeout=IN_FLIGHT_WAIT)
        try:
            return handle.fetch_chunk(start, min(start + chunk, offset + length)), held
        except BaseException:
            if held:
                _IN_FLIGHT.release()
            raise

    with handle:
        ahead: _Ahead | None = None
        try:
            for index, start in enumerate(starts):
                current, held = ahead.result() if ahead is not None else fetch(start)
                ahead = None
                if index + 1 < len(starts):
                    ahead = _Ahead(fetch, starts[index + 1])
                try:
                    yield current
                finally:
                    del current
                    if held:
                        _IN_FLIGHT.release()
        finally:
            if ahead is not None:  # stopped early (an error, Ctrl-C): never wait for the request
                ahead.abandon()


class _Ahead:
    """The next chunk, fetched on a daemon thread. Abandoned (the stream stopped early), it is not
    waited for: a stalled server must not hold up Ctrl-C or an error for the minutes its request
    may take; its slot is given back whenever it ends."""

    def __init__(self, fetch: Callable[[int], tuple[bytes | bytearray, bool]], start: int) -> None:
        self._fetch = fetch
        self._start = start
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self._value: tuple[bytes | bytearray, bool] | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name="sdconvert-fetch", daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._fetch(self._start)
        except BaseException as exc:  # given to the consumer by result()
            self._error = exc
        with self._lock:
            self._done.set()
            if self._abandoned:
                self._give_back()

    def result(self) -> tuple[bytes | bytearray, bool]:
        self._done.wait()  # interruptible: Ctrl-C in the main thread raises here
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._done.is_set():
                self._give_back()

    def _give_back(self) -> None:
        if self._value is not None and self._value[1]:
            _IN_FLIGHT.release()
        self._value = None


class RangeBuffer:
    """The bytes of a remote file, for the parsers that walk ``mmap`` in place (msgpack, ONNX's
    protobuf): indexing and slicing fetch blocks by range requests, so a parser that skips a payload
    by its length (a tensor's ``bin``, an initializer's ``raw_data``) never fetches it.

    Only what those parsers use: ``len``, ``buffer[i]``, ``buffer[a:b]`` (bytes), and
    ``unpack_from`` for ``struct``. A miss fetches one aligned block; misses that follow the last
    fetch (a parser reading a long run of small values: a big metadata tree) fetch runs twice as
    long each time, up to ``MAX_RUN``, so a header of megabytes costs a few requests, not one per
    block. Blocks are kept, least recently used dropped past ``CACHE`` bytes: readers come back to
    a tensor's header (the parse, then the tree built from it) and find it there. A slice larger
    than a quarter of the cache is fetched as one exact range and not kept.
    """

    BLOCK = 16 << 10
    MAX_RUN = 8 << 20
    CACHE = 32 << 20

    def __init__(self, handle: Any) -> None:
        self._handle = handle  # a storage.RemoteFile: fetch(start, end) is one checked range request
        self.size: int = handle.size
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._held = 0
        self._next = -1  # the block after the last run fetched
        self._run = 1  # blocks in the last run
        self._last: tuple[int, bytes] = (-1, b"")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int | slice) -> Any:
        if type(index) is int:
            if index < 0:
                index += self.size
            if not 0 <= index < self.size:
                raise IndexError("index out of range")
            number, offset = divmod(index, self.BLOCK)
            last = self._last
            block = last[1] if last[0] == number else self._block(number)
            return block[offset]
        if not isinstance(index, slice):
            raise TypeError(f"indices must be integers or slices, not {type(index).__name__}")
        start, stop, step = index.indices(self.size)
        if step != 1:
            raise ValueError("a RangeBuffer is sliced with a step of 1 only")
        if stop <= start:
            return b""
        if stop - start > self.CACHE // 4:
            return self._handle.fetch(start, stop)
        first, last_block = start // self.BLOCK, (stop - 1) // self.BLOCK
        base = first * self.BLOCK
        if first == last_block:
            return self._block(first)[start - base : stop - base]
        joined = b"".join(self._block(number) for number in range(first, last_block + 1))
        return joined[start - base : stop - base]

    def unpack_from(self, fmt: str, offset: int = 0) -> tuple[Any, ...]:
        return struct.unpack_from(fmt, self[offset : offset + struct.calcsize(fmt)])

    def _block(self, number: int) -> bytes:
        block = self._blocks.get(number)
        if block is not None:
            self._blocks.move_to_end(number)
            self._last = (number, block)
            return block
        run = min(self._run * 2, self.MAX_RUN // self.BLOCK) if number == self._next else 1
        start = number * self.BLOCK
        data = self._handle.fetch(start, min(self.size, start + run * self.BLOCK))
        for index in range(0, len(data), self.BLOCK):
            piece = data[index : index + self.BLOCK]
            self._blocks[number + index // self.BLOCK] = piece
            self._held += len(piece)
        while self._held > self.CACHE and len(self._blocks) > run:
            _, dropped = self._blocks.popitem(last=False)
            self._held -= len(dropped)
        self._run, self._next = run, number + run
        block = self._blocks[number]
        self._last = (number, block)
        return block


def open_read(path: Path) -> io.RawIOBase:
    """``path`` opened for reading, unbuffered: a local file, or a :class:`RemoteFile`. Use
    :func:`pread` and :func:`size_of` on it rather than ``os.pread``/``os.fstat``."""
    if isinstance(path, RemotePath):
        return RemoteFile(path)
    return open(path, "rb", buffering=0)


def pread(handle: io.RawIOBase | IO[bytes], count: int, offset: int) -> bytes:
    """``count`` bytes at ``offset`` of a handle from :func:`open_read` (fewer at the end of the
    file), without moving its position."""
    if isinstance(handle, RemoteFile):
        return handle.pread(count, offset)
    return os.pread(handle.fileno(), count, offset)


def size_of(handle: io.RawIOBase | IO[bytes]) -> int:
    """The size of the file behind a handle from :func:`open_read`."""
    if isinstance(handle, RemoteFile):
        return handle.size
    return os.fstat(handle.fileno()).st_size


def is_remote(path: object) -> bool:
    return isinstance(path, RemotePath)


# ------------------------------------------------------------------------------------- errors


def retrying(action: Callable[[], T], path: RemotePath, verb: str, *, attempts: int | None = None) -> T:
    """``action()``, retried on transient errors (bounded, with backoff: ``attempts`` in all,
    default ``ATTEMPTS``); any failure becomes one :class:`RemoteError` naming ``path`` (missing,
    access denied, changed, network)."""
    tries = ATTEMPTS if attempts is None else attempts
    for attempt in range(tries):
        try:
            return action()
        except ConverterError:
            raise
        except Exception as exc:
            if not _transient(exc) or attempt == tries - 1:
                raise _remote_error(exc, path, verb, attempt + 1) from None
        time.sleep(BACKOFF * (2**attempt) * (0.5 + (time.monotonic_ns() % 1000) / 1000))  # jittered
    raise AssertionError("unreachable")


def _changed(path: RemotePath) -> RemoteError:
    return RemoteError(
        "the object changed while being read (its ETag is not the one it had when opened); "
        "convert it again once it is stable",
        file=path,
    )


def _unreachable(exc: BaseException) -> BaseException | None:
    """The transport failure behind fsspec's ``FileNotFoundError`` (its HTTP ``info`` says "not
    found" for any failed request, a refused connection included), if there is one."""
    current = exc.__cause__ or exc.__context__
    while current is not None:
        if not isinstance(current, FileNotFoundError) and isinstance(current, (OSError, TimeoutError)):
            return current
        if type(current).__module__.startswith("aiohttp") and "Connect" in type(current).__name__:
            return current
        current = current.__cause__ or current.__context__
    return None


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind an error, also when fsspec re-raised it as another exception (its
    HTTP file system turns any failed HEAD/GET of ``info`` into ``FileNotFoundError``)."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        status = _own_status(current)
        if status is not None:
            return status
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def _own_status(exc: BaseException) -> int | None:
    for name in ("status", "status_code", "code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
    return None


def _transient(exc: BaseException) -> bool:
    status = _status(exc)
    if status is not None:
        return status in (408, 425, 429) or status >= 500
    if isinstance(exc, FileNotFoundError) and _unreachable(exc) is not None:
        return True
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if type(exc).__name__ in ("FileExpired", "NoCredentialsError", "PartialCredentialsError"):
        return False
    # else a connection reset, a timeout, DNS, an OSError from the transport; not a programming error
    return not isinstance(exc, (ValueError, TypeError, KeyError, AttributeError, NotImplementedError))


def _remote_error(exc: BaseException, path: RemotePath, verb: str, attempts: int) -> RemoteError:
    status = _status(exc)
    if status is None and isinstance(exc, FileNotFoundError):
        # fsspec's HTTP info says "not found" whatever failed: a missing object only when nothing
        # else is behind it (a refused connection, a bad option are not missing objects)
        exc = _unreachable(exc) or exc.__cause__ or exc
    name = type(exc).__name__
    text = _redacted(" ".join(str(exc).split()) or name, {}, path._secrets)
    if status == 404 or (status is None and isinstance(exc, FileNotFoundError)):
        error = RemoteError("no such object (HTTP 404 / not found)", file=path)
        error.missing = True
        return error
    if isinstance(exc, PermissionError) or status in (401, 403) or name in ("NoCredentialsError",):
        return RemoteError(
            f"access denied ({text}): check the credentials (environment, profile, --storage-option)", file=path
        )
    if name == "FileExpired" or status == 412:
        return _changed(path)
    if status == 416 or "range requests" in text:
        return RemoteError(f"the server refused a range request ({text}); it must support HTTP Range", file=path)
    tries = f" after {attempts} tries" if attempts > 1 else ""
    return RemoteError(f"cannot {verb} it{tries}: {name}: {text}", file=path)


SECRET_NAMES = re.compile(r"key|secret|token|password|passwd|credential|auth|signature", re.IGNORECASE)
_SECRET_ENVIRONMENT = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
)


def _secrets(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The values that must never appear in a message: credential-like storage options (nested
    ones too) and the usual credential variables of the environment."""
    found: list[str] = []

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, secret or bool(SECRET_NAMES.search(str(key))))
        elif secret and isinstance(value, (str, bytes)) and len(value) >= 4:
            found.append(value.decode(errors="replace") if isinstance(value, bytes) else value)

    walk(options, False)
    found.extend(os.environ[name] for name in _SECRET_ENVIRONMENT if len(os.environ.get(name, "")) >= 4)
    return tuple(sorted(set(found), key=len, reverse=True))


def _redacted(text: str, options: Mapping[str, Any], secrets: tuple[str, ...] = ()) -> str:
    """``text`` without credentials: user:password@ and queries in URLs, and any secret value."""
    text = _USERINFO.sub(r"\1***@", text)
    text = _QUERY.sub("?***", text)
    for secret in secrets or _secrets(options):
        text = text.replace(secret, "***")
    return text
