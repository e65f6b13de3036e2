"""Real local servers for the remote-storage tests (no mocks of the client libraries, no internet).

* ``RangeHTTPServer``: a static file server with the parts of HTTP that fsspec's ``HTTPFileSystem`` and a careful
  remote reader rely on (HEAD, single byte ranges, strong ETags, ``If-Match``/``If-None-Match``/``If-Range``, folder
  indexes), byte counters, and fault injection (error statuses, dropped connections, truncated bodies, servers that
  ignore ranges or preconditions, auth).
* ``CountingProxy``: a TCP relay that counts the bytes going through it, put in front of moto's S3 server so a test
  can assert how much an S3 read fetched.

Everything binds to 127.0.0.1 on a port chosen by the OS and runs in daemon threads; ``stop()`` closes every socket
so no thread is left blocked on an idle keep-alive connection.

Keep-alive: the HTTP server speaks HTTP/1.1 with a correct Content-Length on every response (error responses have an
empty body), so clients may reuse connections. Every response after which the connection is in an undefined state
(a dropped request, a truncated body, a method whose request body we do not read) is sent with the connection closed
by the server. aiohttp copes with that: it notices the EOF of a pooled connection, and it retries an idempotent
request ONCE on ``ServerDisconnectedError`` (aiohttp >= 3.10), which is why ``drop_next(1)`` alone is invisible to a
GET made through aiohttp: use ``drop_next(2)`` to make a GET fail.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import email.utils
import hmac
import html
import http.server
import logging
import os
import posixpath
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # body chunk; small so a client that hangs up mid-body leaves the byte counters close to the truth


class RequestRecord(NamedTuple):
    """One request as the HTTP server saw it; compares equal to a plain 4-tuple.

    ``status`` is 0 for a request dropped without an answer.
    """

    method: str
    path: str
    range: str | None
    status: int


class ByteRange(NamedTuple):
    start: int
    stop: int  # exclusive


def parse_range(header: str | None, size: int) -> ByteRange | str | None:
    """The single range a ``Range`` header asks for, clamped to ``size``.

    Returns None when the header is absent, malformed, not in bytes, or holds several ranges (RFC 9110 lets a server
    ignore such a header and answer 200 with the whole body), and the string "unsatisfiable" for a well-formed range
    that lies entirely outside the file (answer 416).
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    try:
        if not first:  # bytes=-n: the last n bytes
            suffix = int(last)
            if suffix < 0 or not last.isdigit():
                return None
            if suffix == 0 or size == 0:
                return "unsatisfiable"
            return ByteRange(max(0, size - suffix), size)
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if last and end < start:
        return None  # syntactically invalid: ignored, like nginx and Apache do
    if start >= size:
        return "unsatisfiable"
    return ByteRange(start, min(end, size - 1) + 1)


def etag_for(stat: os.stat_result) -> str:
    """A strong, quoted ETag from size, mtime_ns and inode.

    Rewriting a file in place with the same size within the kernel's timestamp granularity (a few ms on some
    filesystems) can keep the same ETag: tests that need a new ETag should write a new file and ``os.replace`` it
    (new inode), or use ``RangeHTTPServer.replace_file``.
    """
    return f'"{stat.st_size:x}-{stat.st_mtime_ns:x}-{stat.st_ino:x}"'


def _etag_list_matches(header: str, etag: str | None, *, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match list matches; strong comparison unless ``weak``."""
    if header.strip() == "*":
        return etag is not None
    if etag is None:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            if not weak:
                continue  # a weak tag never matches in a strong comparison (If-Match, If-Range)
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


class _Fault(NamedTuple):
    kind: str  # "fail" or "drop"
    status: int
    reset: bool


class RangeHTTPServer:
    """Serves the files under ``root`` on ``http://127.0.0.1:PORT``; see the module docstring.

    Fault injection and flags may be changed while the server runs (they are read per request):

    * ``fail_next(n, status)``: the next n requests (any method) answer ``status`` with an empty body.
    * ``drop_next(n)``: the next n requests get no answer; the connection is closed (EOF, or RST with reset=True).
    * ``truncate_after(nbytes)``: the next response with a body declares its full Content-Length, sends ``nbytes``
      bytes of body and closes the connection (aiohttp raises ``ClientPayloadError``).
    * ``ignore_ranges``: answer 200 with the whole body to Range requests (a server without range support).
    * ``ignore_if_match``: do not evaluate If-Match (a server or cache that ignores preconditions).
    * ``require_auth``: ``("user", "pass")`` for Basic auth or a string for a Bearer token; no Authorization header
      answers 401 (with WWW-Authenticate), a wrong one 403.

    Counters (read them after the client has the response: they are updated before the bytes are sent):
    ``bytes_sent`` (body bytes, all paths), ``bytes_by_path`` (body bytes per URL path, e.g. "/a/b.bin"),
    ``request_count``, ``connection_count``, ``requests`` (``RequestRecord`` list) and ``request_headers`` (the
    headers of each request, same index as ``requests``).
    """

    def __init__(self, root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root)
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._httpd: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None
        self.ignore_ranges = False
        self.ignore_if_match = False
        self.require_auth: tuple[str, str] | str | None = None
        self._faults: collections.deque[_Fault] = collections.deque()
        self._truncations: collections.deque[int] = collections.deque()
        self.reset_counters()

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> RangeHTTPServer:
        if self._httpd is not None:
            return self
        httpd = _ThreadingServer((self._host, self._port), _RangeHandler)
        httpd.owner = self
        self._httpd = httpd
        # a short poll interval: shutdown() waits up to one interval, once per test
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(0.05,), name=f"RangeHTTPServer:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()  # stops serve_forever; handler threads may still sit on idle keep-alive connections
        httpd.close_all_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> RangeHTTPServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def url_for(self, name: str) -> str:
        """The URL of ``root / name`` (``name`` is a relative posix path; it is percent-quoted here)."""
        return f"{self.url}/{urllib.parse.quote(name.lstrip('/'))}"

    # -- test helpers ----------------------------------------------------------------------------------------------

    def write_file(self, name: str, data: bytes) -> Path:
        """Write ``root / name`` (creating folders) and return its path."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def replace_file(self, name: str, data: bytes) -> Path:
        """Atomically replace ``root / name`` with a new file; its ETag is guaranteed to change (new inode)."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".replacing")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def etag(self, name: str) -> str:
        """The ETag the server currently sends for ``root / name``."""
        return etag_for(os.stat(self.root / name))

    # -- faults ----------------------------------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        with self._lock:
            self._faults.extend([_Fault("fail", status, False)] * n)

    def drop_next(self, n: int = 1, *, reset: bool = False) -> None:
        with self._lock:
            self._faults.extend([_Fault("drop", 0, reset)] * n)

    def truncate_after(self, nbytes: int, times: int = 1) -> None:
        with self._lock:
            self._truncations.extend([nbytes] * times)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._truncations.clear()
        self.ignore_ranges = False
        self.ignore_if_match = False
        self.require_auth = None

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _take_truncation(self) -> int | None:
        with self._lock:
            return self._truncations.popleft() if self._truncations else None

    # -- counters --------------------------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent = 0
            self.bytes_by_path: dict[str, int] = collections.defaultdict(int)
            self.request_count = 0
            self.connection_count = 0  # TCP connections accepted: fewer than requests when clients reuse them
            self.requests: list[RequestRecord] = []
            self.request_headers: list[dict[str, str]] = []

    def bytes_for(self, name: str) -> int:
        """Body bytes sent for ``root / name`` since the last reset."""
        with self._lock:
            return self.bytes_by_path.get("/" + name.lstrip("/"), 0)

    def _record(self, record: RequestRecord, headers: dict[str, str]) -> None:
        with self._lock:
            self.request_count += 1
            self.requests.append(record)
            self.request_headers.append(headers)

    def _count_connection(self) -> None:
        with self._lock:
            self.connection_count += 1

    def _count(self, path: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes
            self.bytes_by_path[path] += nbytes


class _ThreadingServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers its open connections so stop() can close idle keep-alive ones."""

    daemon_threads = True
    block_on_close = False  # server_close() would otherwise join handler threads blocked on idle connections
    owner: RangeHTTPServer

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._connections_lock:
            self._connections.add(request)
        self.owner._count_connection()
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler thread blocked in readline()

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver prints tracebacks to stderr; clients hanging up are normal here, anything else is logged
        log.debug("RangeHTTPServer handler error", exc_info=True)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server_version = "RangeHTTPServer/1"
    server: _ThreadingServer

    # -- plumbing --------------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: object) -> None:  # quiet: no stderr noise in test output
        log.debug("%s " + format, self.address_string(), *args)

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # the client hung up or reset: nothing to answer
            self.close_connection = True

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        # the request body (if any) is not read, so the connection cannot be reused
        self._record(405)
        self._send_empty(405, {"Allow": "GET, HEAD"}, close=True)

    do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    @property
    def owner(self) -> RangeHTTPServer:
        return self.server.owner

    @property
    def _url_path(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)

    def _record(self, status: int) -> None:
        self.owner._record(
            RequestRecord(self.command, self._url_path, self.headers.get("Range"), status),
            {**dict(self.headers.items()), ":target": self.path},  # the raw request target, query included
        )

    def _send_empty(self, status: int, headers: dict[str, str] | None = None, *, close: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 304:  # a 304 must not carry a Content-Length of its (empty) body
            self.send_header("Content-Length", "0")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def _send_body(self, data_source: Callable[[int, int], bytes], start: int, stop: int, limit: int | None) -> None:
        """Send body bytes [start, stop) in chunks, counting them before each send; stop early at ``limit`` bytes."""
        path = self._url_path
        end = stop if limit is None else min(stop, start + limit)
        pos = start
        while pos < end:
            chunk = data_source(pos, min(CHUNK, end - pos))
            if not chunk:
                break  # the file shrank under us: the client sees a short body
            pending = memoryview(chunk)
            self.owner._count(path, len(pending))  # counted before sending so a client never sees uncounted bytes
            try:
                while pending:
                    sent = self.connection.send(pending)
                    pending = pending[sent:]
            except OSError:
                self.owner._count(path, -len(pending))
                self.close_connection = True
                return
            pos += len(chunk)

    # -- the request -----------------------------------------------------------------------------------------------

    def _serve(self, head: bool) -> None:
        owner = self.owner
        fault = owner._take_fault()
        if fault is not None and fault.kind == "drop":
            self._record(0)
            self.close_connection = True
            if fault.reset:  # SO_LINGER 0 and close() now: the client gets an RST instead of a FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            return
        if fault is not None:
            self._record(fault.status)
            self._send_empty(fault.status)
            return

        auth_status = self._check_auth()
        if auth_status is not None:
            self._record(auth_status)
            headers = {"WWW-Authenticate": 'Basic realm="test"'} if auth_status == 401 else {}
            if auth_status == 401 and isinstance(owner.require_auth, str):
                headers = {"WWW-Authenticate": 'Bearer realm="test"'}
            self._send_empty(auth_status, headers)
            return

        target = self._resolve()
        if target is None or not target.exists():
            self._record(404)
            self._send_empty(404)
            return
        if target.is_dir():
            self._serve_index(target, head)
            return
        self._serve_file(target, head)

    def _check_auth(self) -> int | None:
        required = self.owner.require_auth
        if required is None:
            return None
        given = self.headers.get("Authorization")
        if not given:
            return 401
        if isinstance(required, str):
            expected = f"Bearer {required}"
        else:
            expected = "Basic " + base64.b64encode(f"{required[0]}:{required[1]}".encode()).decode("ascii")
        return None if hmac.compare_digest(given.strip().encode(), expected.encode()) else 403

    def _resolve(self) -> Path | None:
        rel = posixpath.normpath(self._url_path).lstrip("/")
        if rel in ("", "."):
            return self.owner.root
        if rel == ".." or rel.startswith("../"):
            return None
        candidate = self.owner.root / rel
        root = os.path.realpath(self.owner.root)
        if os.path.commonpath([root, os.path.realpath(candidate)]) != root:
            return None  # a symlink out of the root
        return candidate

    def _serve_index(self, folder: Path, head: bool) -> None:
        url_path = urllib.parse.urlsplit(self.path).path
        if not url_path.endswith("/"):
            # like http.server and nginx: relative links in the index only resolve against a URL ending in "/"
            self._record(301)
            self._send_empty(301, {"Location": url_path + "/"})
            return
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        lines = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>Index</title></head><body><ul>"]
        for entry in entries:
            name = entry.name + ("/" if entry.is_dir() else "")
            lines.append(f'<li><a href="{urllib.parse.quote(name)}">{html.escape(name)}</a></li>')
        lines.append("</ul></body></html>")
        body = "\n".join(lines).encode()
        self._record(200)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self._send_body(lambda pos, n: body[pos : pos + n], 0, len(body), None)

    def _serve_file(self, path: Path, head: bool) -> None:
        owner = self.owner
        try:
            handle = open(path, "rb")  # noqa: SIM115 (kept open while streaming)
        except OSError:
            self._record(404)
            self._send_empty(404)
            return
        with handle:
            stat = os.fstat(handle.fileno())  # of the opened file: ETag and bytes agree even if it is replaced now
            size = stat.st_size
            etag = etag_for(stat)
            validators = {
                "ETag": etag,
                "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
                "Accept-Ranges": "bytes",
            }
            if_match = self.headers.get("If-Match")
            if (
                if_match is not None
                and not owner.ignore_if_match
                and not _etag_list_matches(if_match, etag, weak=False)
            ):
                self._record(412)
                self._send_empty(412, validators)
                return
            if_none_match = self.headers.get("If-None-Match")
            if if_none_match is not None and _etag_list_matches(if_none_match, etag, weak=True):
                self._record(304)
                self._send_empty(304, validators)
                return

            byte_range: ByteRange | str | None = None
            if not head and not owner.ignore_ranges:  # RFC 9110: Range is defined for GET only
                byte_range = parse_range(self.headers.get("Range"), size)
                if_range = self.headers.get("If-Range")
                if byte_range is not None and if_range is not None and if_range.strip() != etag:
                    byte_range = None  # the client's copy is stale: send the whole current file
            if byte_range == "unsatisfiable":
                self._record(416)
                self._send_empty(416, {**validators, "Content-Range": f"bytes */{size}"})
                return

            if isinstance(byte_range, ByteRange):
                status, start, stop = 206, byte_range.start, byte_range.stop
            else:
                status, start, stop = 200, 0, size
            limit = None if head else owner._take_truncation()
            self._record(status)
            self.send_response(status)
            for name, value in validators.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/octet-stream")  # fsspec's ls() reads untyped bodies as HTML
            self.send_header("Content-Length", str(stop - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            if limit is not None:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if head:
                return

            def read_at(pos: int, n: int) -> bytes:
                return os.pread(handle.fileno(), n, pos)

            self._send_body(read_at, start, stop, limit)


# ---------------------------------------------------------------------------------------------------------------------
# Counting TCP proxy


class ProxyRequest(NamedTuple):
    """One HTTP request seen by the proxy on the client side; ``target`` is the raw request target (path?query)."""

    method: str
    target: str
    range: str | None


class _HTTPRequestScanner:
    """Finds request boundaries in a client->server HTTP/1.1 byte stream, to count and log requests.

    Only observes: forwarding never waits on it. Handles Content-Length and chunked bodies; on anything it does not
    understand it stops logging for that connection (the bytes are still relayed and counted).
    """

    MAX_HEAD = 256 * 1024

    def __init__(self, on_request: Callable[[ProxyRequest], None]) -> None:
        self._on_request = on_request
        self._buf = bytearray()
        self._state = "head"  # head | body | chunk_size | chunk_data | trailer | lost
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        if self._state == "lost":
            return
        if self._state in ("body", "chunk_data") and not self._buf and len(data) <= self._remaining:
            self._remaining -= len(data)  # fast path for big uploads: no copying
            if self._remaining == 0:
                self._state = "head" if self._state == "body" else "chunk_size"
            return
        self._buf += data
        pos = 0
        buf = self._buf
        while True:
            if self._state in ("body", "chunk_data"):
                take = min(self._remaining, len(buf) - pos)
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._state = "head" if self._state == "body" else "chunk_size"
                continue
            if self._state == "head":
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if len(buf) - pos > self.MAX_HEAD:
                        self._state = "lost"
                    break
                if not self._parse_head(bytes(buf[pos:end])):
                    self._state = "lost"
                    break
                pos = end + 4
                continue
            if self._state in ("chunk_size", "trailer"):
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                line = bytes(buf[pos:end])
                pos = end + 2
                if self._state == "trailer":
                    if not line:
                        self._state = "head"
                    continue
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    self._state = "lost"
                    break
                if size == 0:
                    self._state = "trailer"
                else:
                    self._state, self._remaining = "chunk_data", size + 2  # data + CRLF
                continue
            break
        del buf[:pos]

    def _parse_head(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        while lines and not lines[0]:
            lines.pop(0)  # tolerate stray CRLFs between requests
        if not lines:
            return True
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        self._on_request(ProxyRequest(parts[0], parts[1], headers.get("range")))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = "chunk_size"
        elif int(headers.get("content-length", "0") or 0) > 0:
            self._state, self._remaining = "body", int(headers["content-length"])
        return True


class CountingProxy:
    """Relays TCP connections from 127.0.0.1:PORT to ``target_host:target_port`` and counts what goes through.

    ``bytes_to_client`` counts everything the upstream sent back, response status lines and headers included
    (typically 300-600 bytes per S3 response), so assert "about N bytes" with a margin per request.
    ``bytes_to_server``, ``connections`` (accepted), ``request_count`` and ``requests`` (``ProxyRequest`` list: method,
    target, Range header) come from the client side. Counters are updated before the bytes are forwarded.
    """

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.2)  # accept() polls so stop() never waits on a blocked accept
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._accept_thread: threading.Thread | None = None
        self.reset_counters()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_to_client = 0
            self.bytes_to_server = 0
            self.connections = 0
            self.request_count = 0
            self.requests: list[ProxyRequest] = []

    def start(self) -> CountingProxy:
        if self._accept_thread is None:
            self._accept_thread = threading.Thread(target=self._accept_loop, name="CountingProxy", daemon=True)
            self._accept_thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump threads blocked in recv()
        for thread in threads:
            thread.join(timeout=5)
        for sock in sockets:
            sock.close()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _on_request(self, request: ProxyRequest) -> None:
        with self._lock:
            self.request_count += 1
            self.requests.append(request)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._sockets.update((client, upstream))
            scanner = _HTTPRequestScanner(self._on_request)
            state = {"open_directions": 2}
            for src, dst, to_client in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(
                    target=self._pump,
                    args=(src, dst, to_client, None if to_client else scanner, state, (client, upstream)),
                    name="CountingProxy-pump",
                    daemon=True,
                )
                with self._lock:
                    self._threads.add(thread)
                thread.start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        to_client: bool,
        scanner: _HTTPRequestScanner | None,
        state: dict[str, int],
        pair: tuple[socket.socket, socket.socket],
    ) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # half-close: pass the EOF on, keep relaying the other way
                    break
                if scanner is not None:
                    scanner.feed(data)
                with self._lock:
                    if to_client:
                        self.bytes_to_client += len(data)
                    else:
                        self.bytes_to_server += len(data)
                dst.sendall(data)
        except OSError:
            # a reset on one side: tear down both so the other pump ends too
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        finally:
            with self._lock:
                state["open_directions"] -= 1
                done = state["open_directions"] == 0
                self._threads.discard(threading.current_thread())
                if done:
                    self._sockets.difference_update(pair)
            if done:
                for sock in pair:
                    sock.close()
