"""pytest fixtures for the remote-storage tests: a real HTTP file server and a real (moto) S3 server.

Register with ``pytest_plugins = ["remote_fixtures"]`` in tests/conftest.py (tests/ is on sys.path there, like
``helpers``). Fixtures:

* ``http_server`` (function scope): a started ``RangeHTTPServer`` over a fresh ``tmp_path / "http_root"``; put files
  in ``http_server.root`` (or ``http_server.write_file(name, data)``) and read ``http_server.url + "/name"``. A server
  per test costs ~1 ms and gives each test clean counters, faults and files.
* ``s3_server`` (session scope): moto's S3 server behind a ``CountingProxy``; see ``S3Server``.
* ``s3_bucket`` (function scope): the name of a fresh, empty bucket on ``s3_server``; deleted (with its objects and
  multipart uploads) afterwards. Before the test it clears s3fs's instance cache and resets the proxy counters.

s3fs caches filesystem instances per set of arguments and caches listings in each instance; a test that writes
objects with boto3 (or the CLI) and then lists with s3fs must call ``fs.invalidate_cache()`` (or make the filesystem
with ``skip_instance_cache=True``, as ``S3Server.filesystem()`` does).

The moto server runs in THIS process with moto's global in-memory backends: a test using ``moto.mock_aws()`` at the
same time would reset/patch that state and intercept botocore calls; do not mix the two in one session.

PYTEST_DONT_REWRITE: this module has no asserts, and test modules may import its helpers before pytest loads it as a
plugin (pytest would then warn that it cannot rewrite an already-imported module).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from remote_servers import CountingProxy, RangeHTTPServer

REGION = "us-east-1"
KEY = "testing"
SECRET = "testing"


# ---------------------------------------------------------------------------------------------------------------------
# HTTP


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[RangeHTTPServer]:
    """A RangeHTTPServer on 127.0.0.1 serving a fresh, empty ``tmp_path / "http_root"``."""
    root = tmp_path / "http_root"
    root.mkdir()
    with RangeHTTPServer(root) as server:
        yield server


# ---------------------------------------------------------------------------------------------------------------------
# S3


@dataclass
class S3Server:
    """moto's S3 server (``direct_url``) behind a byte-counting proxy (``endpoint_url``, what clients should use)."""

    endpoint_url: str
    direct_url: str
    proxy: CountingProxy
    region: str = REGION
    key: str = KEY
    secret: str = SECRET
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options (a new dict each time). ``endpoint_url`` is a top-level S3FileSystem argument
        in s3fs 2026.9 and takes precedence over ``client_kwargs["endpoint_url"]``."""
        return {
            "key": self.key,
            "secret": self.secret,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self.region},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a subprocess (merge into ``os.environ.copy()``): botocore >= 1.31 reads
        AWS_ENDPOINT_URL, so s3fs/boto3 with no storage options reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",  # never probe 169.254.169.254 for credentials
        }

    def client(self, *, direct: bool = False) -> Any:
        """A boto3 S3 client at the proxy (or straight at moto with ``direct=True``, bypassing the counters)."""
        url = self.direct_url if direct else self.endpoint_url
        if url not in self._clients:
            import boto3
            from botocore.config import Config

            self._clients[url] = boto3.session.Session().client(
                "s3",
                endpoint_url=url,
                aws_access_key_id=self.key,
                aws_secret_access_key=self.secret,
                region_name=self.region,
                config=Config(retries={"max_attempts": 1}),
            )
        return self._clients[url]

    def filesystem(self, **kwargs: Any) -> Any:
        """A new (uncached) ``s3fs.S3FileSystem`` at the proxy."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **{**self.storage_options, **kwargs})


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO to stderr unless its logger already has a level
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()  # the port the OS chose
    proxy = CountingProxy(host, port).start()
    try:
        yield S3Server(endpoint_url=proxy.url, direct_url=f"http://{host}:{port}", proxy=proxy)
    finally:
        proxy.stop()  # first: closes the proxy's keep-alive connections to moto
        moto.stop()
        if moto._server is not None:  # ThreadedMotoServer.stop() does not close the listening socket
            moto._server.server_close()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh empty bucket's name; s3fs instance cache cleared and proxy counters reset before the test."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:20]}"
    client = s3_server.client(direct=True)
    client.create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server.proxy.reset_counters()
    yield name
    _delete_bucket(client, name)


def _delete_bucket(client: Any, name: str) -> None:
    """Best effort: empties the bucket (objects and pending multipart uploads) and deletes it, to free moto's memory."""
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
            for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                client.delete_object(Bucket=name, Key=item["Key"], VersionId=item["VersionId"])
        client.delete_bucket(Bucket=name)
    except Exception:  # cleanup must not mask the test's own outcome
        logging.getLogger(__name__).debug("could not delete bucket %s", name, exc_info=True)


# ---------------------------------------------------------------------------------------------------------------------
# fsspec's in-process store


@pytest.fixture
def store() -> Iterator[Any]:
    """fsspec's ``memory://`` file system, empty before and after the test (it is one per process)."""
    import fsspec

    fs = fsspec.filesystem("memory")

    def clear() -> None:
        fs.store.clear()
        fs.pseudo_dirs.clear()
        fs.pseudo_dirs.append("")

    clear()
    yield fs
    clear()


def put(fs: Any, local: Path, name: str, data: bytes | None = None) -> str:
    """``local`` (a file, or a folder's files; or ``data``) in the memory ``store`` at
    ``memory://bucket/<name>``; its URL."""
    if data is not None:
        fs.pipe_file(f"/bucket/{name}", data)
    elif local.is_dir():
        for child in sorted(local.iterdir()):
            fs.put_file(str(child), f"/bucket/{name}/{child.name}")
    else:
        fs.put_file(str(local), f"/bucket/{name}")
    return f"memory://bucket/{name}"


# ---------------------------------------------------------------------------------------------------------------------
# What a read fetched


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every range request of a remote read, as (object name, start, end), in order:
    ``RemoteFile.fetch_chunk`` is where all of them go (headers and streamed tensor bytes)."""
    from converters.core import storage

    ranges: list[tuple[str, int, int]] = []
    original = storage.RemoteFile.fetch_chunk

    def fetch_chunk(self: storage.RemoteFile, start: int, end: int) -> bytes | bytearray:
        ranges.append((self.path.name, start, end))
        return original(self, start, end)

    monkeypatch.setattr(storage.RemoteFile, "fetch_chunk", fetch_chunk)
    return ranges


# ---------------------------------------------------------------------------------------------------------------------
# Big files that cost nothing


class SparseSafetensors(NamedTuple):
    path: Path
    size: int  # file size in bytes
    data_start: int  # offset of the data region (8 + header length)
    header: dict[str, Any]  # the JSON header as written (tensor name -> dtype/shape/data_offsets, __metadata__)


MARKER = b"\xa5SPARSE\x5a"  # 8 non-zero bytes written at both ends of each tensor, so range reads can be checked


def sparse_safetensors(
    path: str | os.PathLike[str],
    total_bytes: int,
    *,
    metadata: dict[str, str] | None = None,
    markers: bool = True,
) -> SparseSafetensors:
    """Write a valid safetensors file of ``total_bytes`` (or a little more if that is too small for the header)
    whose tensor data is a sparse hole: a 1 GiB file takes a few KiB of disk and no time.

    Tensors: "big.f32" (F32, [rows, 1024]) and "big.u8" (U8, [rows, 4096]) take about half the data each, "tail.u8"
    (U8, [n]) the rest, so the file size is exact. With ``markers`` (default) ``MARKER`` is written at the start and
    end of each tensor's data (tensors shorter than 16 bytes are left zero), so a wrong byte range reads differently
    from a right one; compare against the local file itself. Reading the data back reads zeros from the hole.
    """
    path = Path(path)
    header: dict[str, Any] = {}
    data_len = 0
    for _ in range(8):  # the header length depends on the digits of the shapes: iterate to a fixed point
        header_len = _padded_len(_header_json(header, metadata))
        data_len = max(0, total_bytes - 8 - header_len)
        header = _layout(data_len)
        if _padded_len(_header_json(header, metadata)) == header_len:
            break
    raw = _header_json(header, metadata)
    raw += b" " * (_padded_len(raw) - len(raw))
    data_start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(data_start + data_len)  # the hole: no blocks allocated, reads as zeros
        if markers:
            for entry in header.values():
                if not isinstance(entry, dict) or "data_offsets" not in entry:
                    continue
                begin, end = entry["data_offsets"]
                if end - begin >= 2 * len(MARKER):
                    f.seek(data_start + begin)
                    f.write(MARKER)
                    f.seek(data_start + end - len(MARKER))
                    f.write(MARKER)
    full = json.loads(raw)
    return SparseSafetensors(path, data_start + data_len, data_start, full)


def _padded_len(raw: bytes) -> int:
    return (len(raw) + 7) // 8 * 8


def _header_json(tensors: dict[str, Any], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(tensors)
    return json.dumps(header, separators=(",", ":")).encode()


def _layout(data_len: int) -> dict[str, Any]:
    """Contiguous tensors covering exactly ``data_len`` bytes (safetensors rejects gaps)."""
    half = data_len // 2
    f32_rows = half // 4096  # a [rows, 1024] float32 tensor: 4 KiB per row
    u8_rows = (data_len - f32_rows * 4096) // 2 // 4096
    tensors: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape, nbytes in (
        ("big.f32", "F32", [f32_rows, 1024], f32_rows * 4096),
        ("big.u8", "U8", [u8_rows, 4096], u8_rows * 4096),
    ):
        if nbytes:
            tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    tensors["tail.u8"] = {"dtype": "U8", "shape": [data_len - offset], "data_offsets": [offset, data_len]}
    return tensors
