"""Tests of the local test servers themselves (tests/remote_servers.py, tests/remote_fixtures.py), and of the moto
and fsspec behaviour the remote-storage code relies on. Nothing here touches the internet."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions
import fsspec
import numpy as np
import pytest
import safetensors
from remote_fixtures import MARKER, S3Server, sparse_safetensors
from remote_servers import ProxyRequest, RangeHTTPServer, RequestRecord, _HTTPRequestScanner, parse_range

# Registers the fixtures for this module whether or not tests/conftest.py already does (a second registration of
# the same plugin name is a no-op).
pytest_plugins = ["remote_fixtures"]

DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable


@pytest.fixture
def http_fs() -> Iterator[Any]:
    """A fresh fsspec HTTPFileSystem (no instance cache: its aiohttp session belongs to this test)."""
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    yield fs


def _raw(server: RangeHTTPServer, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, dict(resp.getheaders()), body
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------------
# RangeHTTPServer: HTTP semantics


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 10)),
        ("bytes=10-", (10, 100)),
        ("bytes=-5", (95, 100)),
        ("bytes=-500", (0, 100)),
        ("bytes=90-200", (90, 100)),
        ("bytes=100-", "unsatisfiable"),
        ("bytes=100-120", "unsatisfiable"),
        ("bytes=-0", "unsatisfiable"),
        ("bytes=5-2", None),  # invalid: ignored
        ("bytes=0-1,5-6", None),  # multi-range: ignored (200 whole body)
        ("items=0-1", None),
        ("bytes=a-b", None),
    ],
)
def test_parse_range(header: str | None, expected: object) -> None:
    got = parse_range(header, 100)
    assert (tuple(got) if isinstance(got, tuple) else got) == expected


def test_get_head_and_validators(http_server: RangeHTTPServer) -> None:
    http_server.write_file("a.bin", DATA)
    status, headers, body = _raw(http_server, "GET", "/a.bin")
    assert (status, body) == (200, DATA)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["ETag"] == http_server.etag("a.bin")
    assert headers["ETag"].startswith('"') and not headers["ETag"].startswith("W/")
    assert "GMT" in headers["Last-Modified"]
    status, head_headers, body = _raw(http_server, "HEAD", "/a.bin", {"Range": "bytes=0-1"})
    assert (status, body) == (200, b"")  # Range is ignored on HEAD (RFC 9110)
    assert head_headers["Content-Length"] == str(len(DATA))
    assert head_headers["ETag"] == headers["ETag"]


@pytest.mark.parametrize(
    ("range_header", "start", "stop"),
    [
        ("bytes=100-199", 100, 200),
        ("bytes=10000-", 10000, 10240),
        ("bytes=-7", 10233, 10240),
        ("bytes=0-99999", 0, 10240),
    ],
)
def test_single_ranges(http_server: RangeHTTPServer, range_header: str, start: int, stop: int) -> None:
    http_server.write_file("a.bin", DATA)
    status, headers, body = _raw(http_server, "GET", "/a.bin", {"Range": range_header})
    assert status == 206
    assert body == DATA[start:stop]
    assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(DATA)}"
    assert headers["Content-Length"] == str(stop - start)


def test_unsatisfiable_and_ignored_ranges(http_server: RangeHTTPServer) -> None:
    http_server.write_file("a.bin", DATA)
    http_server.write_file("empty.bin", b"")
    status, headers, body = _raw(http_server, "GET", "/a.bin", {"Range": f"bytes={len(DATA)}-"})
    assert (status, body, headers["Content-Range"]) == (416, b"", f"bytes */{len(DATA)}")
    assert _raw(http_server, "GET", "/empty.bin", {"Range": "bytes=0-"})[0] == 416
    assert _raw(http_server, "GET", "/a.bin", {"Range": "bytes=0-1,4-5"})[::2] == (200, DATA)


def test_preconditions(http_server: RangeHTTPServer) -> None:
    http_server.write_file("a.bin", DATA)
    etag = http_server.etag("a.bin")
    assert _raw(http_server, "GET", "/a.bin", {"If-Match": '"nope"'})[0] == 412
    assert _raw(http_server, "GET", "/a.bin", {"If-Match": f'"nope", {etag}', "Range": "bytes=0-0"})[::2] == (
        206,
        b"\0",
    )
    assert _raw(http_server, "GET", "/a.bin", {"If-Match": "*"})[0] == 200
    assert _raw(http_server, "GET", "/a.bin", {"If-Match": "W/" + etag})[0] == 412  # strong comparison
    status, headers, body = _raw(http_server, "GET", "/a.bin", {"If-None-Match": etag})
    assert (status, body, headers["ETag"]) == (304, b"", etag)
    assert _raw(http_server, "GET", "/a.bin", {"If-None-Match": '"other"'})[0] == 200
    # If-Range: a stale validator turns the range request into a full 200
    assert _raw(http_server, "GET", "/a.bin", {"Range": "bytes=0-0", "If-Range": etag})[0] == 206
    assert _raw(http_server, "GET", "/a.bin", {"Range": "bytes=0-0", "If-Range": '"old"'})[::2] == (200, DATA)
    http_server.ignore_if_match = True
    assert _raw(http_server, "GET", "/a.bin", {"If-Match": '"nope"'})[0] == 200


def test_etag_changes_when_the_file_is_rewritten(http_server: RangeHTTPServer) -> None:
    path = http_server.write_file("a.bin", DATA)
    before = http_server.etag("a.bin")
    http_server.replace_file("a.bin", DATA)  # same size and bytes, new inode
    assert http_server.etag("a.bin") != before
    again = http_server.etag("a.bin")
    os.utime(path, ns=(1, 1))
    assert http_server.etag("a.bin") != again


def test_missing_and_outside_paths_are_404(http_server: RangeHTTPServer, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("no")
    assert _raw(http_server, "GET", "/missing.bin")[0] == 404
    assert _raw(http_server, "GET", "/../secret.txt")[0] == 404
    assert _raw(http_server, "GET", "/%2e%2e/secret.txt")[0] == 404
    os.symlink(tmp_path / "secret.txt", http_server.root / "link.txt")
    assert _raw(http_server, "GET", "/link.txt")[0] == 404


def test_directory_index(http_server: RangeHTTPServer) -> None:
    http_server.write_file("d/x.bin", b"x")
    http_server.write_file("d/sub/y z.bin", b"y")
    status, headers, _ = _raw(http_server, "GET", "/d")
    assert (status, headers["Location"]) == (301, "/d/")
    status, headers, body = _raw(http_server, "GET", "/d/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<a href="x.bin">' in body and b'<a href="sub/">' in body


def test_keep_alive_reuses_one_connection(http_server: RangeHTTPServer) -> None:
    http_server.write_file("a.bin", DATA)
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=10)
    try:
        for start in (0, 100, 200):
            conn.request("GET", "/a.bin", headers={"Range": f"bytes={start}-{start + 9}"})
            resp = conn.getresponse()
            assert resp.read() == DATA[start : start + 10]
        conn.request("GET", "/missing")  # error responses keep the connection too (empty body, Content-Length: 0)
        assert conn.getresponse().read() == b""
        conn.request("GET", "/a.bin")
        assert conn.getresponse().read() == DATA
    finally:
        conn.close()
    assert http_server.connection_count == 1


def test_counters(http_server: RangeHTTPServer) -> None:
    http_server.write_file("a.bin", DATA)
    http_server.write_file("b.bin", b"12345")
    _raw(http_server, "GET", "/a.bin", {"Range": "bytes=0-99"})
    _raw(http_server, "HEAD", "/b.bin")
    _raw(http_server, "GET", "/b.bin")
    assert http_server.bytes_sent == 105
    assert (http_server.bytes_for("a.bin"), http_server.bytes_for("/b.bin")) == (100, 5)
    assert http_server.request_count == 3
    assert http_server.requests == [
        ("GET", "/a.bin", "bytes=0-99", 206),
        ("HEAD", "/b.bin", None, 200),
        ("GET", "/b.bin", None, 200),
    ]
    assert isinstance(http_server.requests[0], RequestRecord)
    assert http_server.request_headers[0]["Range"] == "bytes=0-99"
    http_server.reset_counters()
    assert (http_server.bytes_sent, http_server.request_count, http_server.requests) == (0, 0, [])


def test_auth(http_server: RangeHTTPServer, http_fs: Any) -> None:
    http_server.write_file("a.bin", DATA)
    http_server.require_auth = ("user", "pass")
    status, headers, _ = _raw(http_server, "GET", "/a.bin")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert _raw(http_server, "GET", "/a.bin", {"Authorization": "Basic d3Jvbmc6d3Jvbmc="})[0] == 403
    basic = "Basic " + base64.b64encode(b"user:pass").decode()  # aiohttp.BasicAuth is deprecated in aiohttp 3.14
    fs = fsspec.filesystem("http", skip_instance_cache=True, headers={"Authorization": basic})
    assert fs.cat_file(http_server.url_for("a.bin"), start=0, end=4) == DATA[:4]
    http_server.require_auth = "tok"
    assert _raw(http_server, "GET", "/a.bin")[1]["WWW-Authenticate"].startswith("Bearer")
    assert _raw(http_server, "GET", "/a.bin", {"Authorization": "Bearer tok"})[0] == 200
    with pytest.raises(aiohttp.ClientResponseError) as info:
        http_fs.cat_file(http_server.url_for("a.bin"), headers={"Authorization": "Bearer bad"})
    assert info.value.status == 403


# ---------------------------------------------------------------------------------------------------------------------
# RangeHTTPServer: fault injection


def test_fail_next(http_server: RangeHTTPServer) -> None:
    http_server.write_file("a.bin", DATA)
    http_server.fail_next(2, status=503)
    assert _raw(http_server, "GET", "/a.bin")[0] == 503
    assert _raw(http_server, "HEAD", "/a.bin")[0] == 503
    assert _raw(http_server, "GET", "/a.bin")[0] == 200
    assert [r.status for r in http_server.requests] == [503, 503, 200]


def test_drop_next_raw_client_sees_a_disconnect(http_server: RangeHTTPServer) -> None:
    http_server.write_file("a.bin", DATA)
    http_server.drop_next(1)
    with pytest.raises(http.client.RemoteDisconnected):
        _raw(http_server, "GET", "/a.bin")
    http_server.drop_next(1, reset=True)
    with pytest.raises(ConnectionResetError):
        _raw(http_server, "GET", "/a.bin")
    assert _raw(http_server, "GET", "/a.bin")[0] == 200
    assert [r.status for r in http_server.requests] == [0, 0, 200]


def test_drop_next_aiohttp_retries_a_get_once(http_server: RangeHTTPServer, http_fs: Any) -> None:
    """aiohttp (>= 3.10) silently retries an idempotent request once after ServerDisconnectedError."""
    http_server.write_file("a.bin", DATA)
    url = http_server.url_for("a.bin")
    http_server.drop_next(1)
    assert http_fs.cat_file(url, start=0, end=10) == DATA[:10]
    assert [r.status for r in http_server.requests] == [0, 206]
    http_server.drop_next(2)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        http_fs.cat_file(url, start=0, end=10)
    assert http_fs.cat_file(url, start=0, end=10) == DATA[:10]


def test_truncate_after(http_server: RangeHTTPServer, http_fs: Any) -> None:
    http_server.write_file("a.bin", DATA)
    url = http_server.url_for("a.bin")
    http_server.truncate_after(100)
    with pytest.raises(aiohttp.ClientPayloadError):
        http_fs.cat_file(url, start=0, end=1000)
    assert http_server.bytes_sent == 100
    assert http_fs.cat_file(url, start=0, end=1000) == DATA[:1000]  # the next request gets a working connection


def test_ignore_ranges(http_server: RangeHTTPServer, http_fs: Any) -> None:
    http_server.write_file("a.bin", DATA)
    http_server.ignore_ranges = True
    assert _raw(http_server, "GET", "/a.bin", {"Range": "bytes=5-9"})[::2] == (200, DATA)
    with http_fs.open(http_server.url_for("a.bin"), "rb", cache_type="none", size=len(DATA)) as f:
        assert f._fetch_range(0, 10) == DATA[:10]  # fsspec copes from offset 0 only...
        with pytest.raises(ValueError, match="support range requests"):
            f._fetch_range(5, 10)  # ...and refuses a later offset


# ---------------------------------------------------------------------------------------------------------------------
# RangeHTTPServer with fsspec's HTTPFileSystem


def test_fsspec_info_and_ranged_reads_with_if_match(http_server: RangeHTTPServer, http_fs: Any) -> None:
    http_server.write_file("a.bin", DATA)
    url = http_server.url_for("a.bin")
    info = http_fs.info(url)
    assert info["size"] == len(DATA)
    assert info["ETag"] == http_server.etag("a.bin")
    assert info["mimetype"] == "application/octet-stream"
    http_server.reset_counters()
    with http_fs.open(url, "rb", cache_type="none", size=len(DATA), headers={"If-Match": info["ETag"]}) as f:
        assert f._fetch_range(1000, 1100) == DATA[1000:1100]
        assert f._fetch_range(10200, 10240) == DATA[10200:]
        assert http_server.requests == [
            ("GET", "/a.bin", "bytes=1000-1099", 206),
            ("GET", "/a.bin", "bytes=10200-10239", 206),
        ]
        assert http_server.request_headers[0]["If-Match"] == info["ETag"]
        assert http_server.bytes_sent == 140
        http_server.replace_file("a.bin", DATA[::-1])
        with pytest.raises(aiohttp.ClientResponseError) as error:
            f._fetch_range(0, 10)
        assert error.value.status == 412


def test_fsspec_keeps_working_across_server_side_closes(http_server: RangeHTTPServer, http_fs: Any) -> None:
    http_server.write_file("a.bin", DATA)
    url = http_server.url_for("a.bin")
    for _ in range(5):
        assert http_fs.cat_file(url, start=0, end=10) == DATA[:10]
    assert http_server.connection_count == 1  # aiohttp pooled the connection (HTTP/1.1 keep-alive)
    http_server.truncate_after(1)  # closes after a partial body
    with pytest.raises(aiohttp.ClientPayloadError):
        http_fs.cat_file(url, start=0, end=10)
    for _ in range(3):
        assert http_fs.cat_file(url, start=0, end=10) == DATA[:10]


def test_stop_with_idle_keep_alive_connections_does_not_hang(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(DATA)
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    server = RangeHTTPServer(tmp_path).start()
    url = server.url_for("a.bin")
    assert fs.cat_file(url) == DATA
    server.stop()  # aiohttp still holds the pooled connection: stop() must close it, not join on it
    with pytest.raises(aiohttp.ClientConnectorError):
        fs.cat_file(url)


def test_fsspec_listing(http_server: RangeHTTPServer, http_fs: Any) -> None:
    http_server.write_file("d/x.bin", b"x")
    http_server.write_file("d/sub/y.bin", b"yy")
    base = http_server.url + "/d"
    assert http_fs.ls(base, detail=False) == [f"{base}/sub/", f"{base}/x.bin"]
    assert http_fs.ls(base + "/", detail=False) == [f"{base}/sub/", f"{base}/x.bin"]
    assert http_fs.isdir(base) and http_fs.isdir(base + "/sub")
    assert sorted(http_fs.find(base)) == [f"{base}/sub/y.bin", f"{base}/x.bin"]
    assert http_fs.info(f"{base}/sub/y.bin")["size"] == 2


def test_fsspec_missing_file(http_server: RangeHTTPServer, http_fs: Any) -> None:
    with pytest.raises(FileNotFoundError):
        http_fs.info(http_server.url_for("missing.bin"))
    # info() tries HEAD then GET
    assert [(r.method, r.status) for r in http_server.requests] == [("HEAD", 404), ("GET", 404)]


def test_big_sparse_file_over_http(http_server: RangeHTTPServer, http_fs: Any) -> None:
    """A 1 GiB sparse file: ranged reads send only the range; fsspec's exists()/isdir() GET the whole body
    (aiohttp hangs up after the headers, so only what fits in the socket buffers is sent)."""
    sparse = sparse_safetensors(http_server.root / "big.safetensors", 2**30)
    url = http_server.url_for("big.safetensors")
    assert http_fs.info(url)["size"] == 2**30
    header_len = int.from_bytes(http_fs.cat_file(url, start=0, end=8), "little")
    assert header_len == sparse.data_start - 8
    assert json.loads(http_fs.cat_file(url, start=8, end=8 + header_len)) == sparse.header
    assert http_fs.cat_file(url, start=2**30 - len(MARKER), end=2**30) == MARKER
    assert http_server.bytes_sent == 8 + header_len + len(MARKER)
    http_server.reset_counters()
    assert http_fs.exists(url)
    assert http_server.requests == [("GET", "/big.safetensors", None, 200)]
    # the client hung up after the headers; the server notices at its next send and stops streaming
    deadline = time.monotonic() + 5
    seen = -1
    while http_server.bytes_sent != seen and time.monotonic() < deadline:
        seen = http_server.bytes_sent
        time.sleep(0.2)
    assert http_server.bytes_sent < 64 * 2**20


# ---------------------------------------------------------------------------------------------------------------------
# S3 (moto behind the counting proxy)


def test_s3_fixture_shape(s3_server: S3Server, s3_bucket: str) -> None:
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    assert s3_server.direct_url.startswith("http://127.0.0.1:")
    assert s3_server.endpoint_url != s3_server.direct_url
    assert s3_server.storage_options["endpoint_url"] == s3_server.endpoint_url
    assert set(s3_server.env) >= {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
    }
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert s3_bucket in names


def test_proxy_counts_s3_range_reads(s3_server: S3Server, s3_bucket: str) -> None:
    payload = os.urandom(2**20)
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="obj.bin", Body=payload)
    proxy = s3_server.proxy
    assert proxy.bytes_to_server > 2**20
    proxy.reset_counters()
    body = client.get_object(Bucket=s3_bucket, Key="obj.bin", Range="bytes=1000-1999")["Body"].read()
    assert body == payload[1000:2000]
    assert proxy.requests == [ProxyRequest("GET", f"/{s3_bucket}/obj.bin", "bytes=1000-1999")]
    assert 1000 < proxy.bytes_to_client < 1000 + 2048  # body + status line and headers
    assert proxy.connections == 1  # moto's werkzeug server closes every connection after one response


def test_s3fs_through_the_proxy(s3_server: S3Server, s3_bucket: str) -> None:
    payload = os.urandom(300_000)
    s3_server.client().put_object(Bucket=s3_bucket, Key="dir/obj.bin", Body=payload)
    fs = s3_server.filesystem()
    s3_server.proxy.reset_counters()
    assert fs.info(f"{s3_bucket}/dir/obj.bin")["size"] == len(payload)
    assert fs.cat_file(f"s3://{s3_bucket}/dir/obj.bin", start=5000, end=6000) == payload[5000:6000]
    assert fs.ls(f"{s3_bucket}/dir", detail=False) == [f"{s3_bucket}/dir/obj.bin"]
    gets = [r for r in s3_server.proxy.requests if r.method == "GET" and r.range]
    assert gets == [ProxyRequest("GET", f"/{s3_bucket}/dir/obj.bin", "bytes=5000-5999")]
    assert s3_server.proxy.bytes_to_client < 1000 + 3 * 2048
    with fsspec.open(f"s3://{s3_bucket}/dir/obj.bin", "rb", **s3_server.storage_options) as f:
        f.seek(299_990)
        assert f.read() == payload[-10:]


def test_proxy_many_concurrent_connections(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    for i in range(8):
        client.put_object(Bucket=s3_bucket, Key=f"k{i}", Body=bytes([i]) * 1000)
    s3_server.proxy.reset_counters()

    def get(i: int) -> bytes:
        return bytes(client.get_object(Bucket=s3_bucket, Key=f"k{i % 8}")["Body"].read())

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(get, range(64)))
    assert results == [bytes([i % 8]) * 1000 for i in range(64)]
    assert s3_server.proxy.request_count == 64
    assert s3_server.proxy.connections == 64


def test_aws_endpoint_url_from_the_environment(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """s3fs/aiobotocore with NO storage options reach the server through AWS_ENDPOINT_URL (subprocess CLI runs)."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="x.bin", Body=b"hello")
    script = (
        "import fsspec, sys; fs = fsspec.filesystem('s3'); "
        "print(fs.ls(sys.argv[1], detail=False)); print(fs.cat_file(sys.argv[1] + '/x.bin').decode())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env)
    env["HOME"] = str(tmp_path)  # no ~/.aws config can interfere
    out = subprocess.run(
        [sys.executable, "-c", script, s3_bucket], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.splitlines() == [str([f"{s3_bucket}/x.bin"]), "hello"]


class TestMotoConditionalRequests:
    """The moto (5.2.5) behaviour the S3 writer and reader rely on."""

    def test_put_if_none_match(self, s3_server: S3Server, s3_bucket: str) -> None:
        client = s3_server.client()
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"first", IfNoneMatch="*")
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.put_object(Bucket=s3_bucket, Key="k", Body=b"second", IfNoneMatch="*")
        assert info.value.response["Error"]["Code"] == "PreconditionFailed"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"first"

    def test_put_if_match(self, s3_server: S3Server, s3_bucket: str) -> None:
        client = s3_server.client()
        etag = client.put_object(Bucket=s3_bucket, Key="k", Body=b"first")["ETag"]
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.put_object(Bucket=s3_bucket, Key="k", Body=b"x", IfMatch='"0123"')
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"second", IfMatch=etag)

    def _multipart(self, client: Any, bucket: str, key: str) -> tuple[str, list[dict[str, Any]]]:
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        parts = []
        for number, body in ((1, b"a" * 5 * 2**20), (2, b"tail")):
            etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        return upload_id, parts

    def test_complete_multipart_if_none_match(self, s3_server: S3Server, s3_bucket: str) -> None:
        client = s3_server.client(direct=True)
        upload_id, parts = self._multipart(client, s3_bucket, "k")
        client.complete_multipart_upload(
            Bucket=s3_bucket, Key="k", UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
        )
        upload_id, parts = self._multipart(client, s3_bucket, "k")
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.complete_multipart_upload(
                Bucket=s3_bucket, Key="k", UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
            )
        assert info.value.response["Error"]["Code"] == "PreconditionFailed"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        # like S3, the refused upload stays pending: the writer must abort it
        uploads = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        assert [u["UploadId"] for u in uploads] == [upload_id]
        client.abort_multipart_upload(Bucket=s3_bucket, Key="k", UploadId=upload_id)
        assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    def test_complete_multipart_ignores_if_match(self, s3_server: S3Server, s3_bucket: str) -> None:
        """Moto does NOT evaluate If-Match on CompleteMultipartUpload (real S3 does): do not rely on it in tests."""
        client = s3_server.client(direct=True)
        upload_id, parts = self._multipart(client, s3_bucket, "k")
        client.complete_multipart_upload(
            Bucket=s3_bucket, Key="k", UploadId=upload_id, MultipartUpload={"Parts": parts}, IfMatch='"wrong"'
        )

    def test_get_if_match_and_ranges(self, s3_server: S3Server, s3_bucket: str) -> None:
        client = s3_server.client()
        etag = client.put_object(Bucket=s3_bucket, Key="k", Body=b"hello world")["ETag"]
        for call in (client.get_object, client.head_object):
            with pytest.raises(botocore.exceptions.ClientError) as info:
                call(Bucket=s3_bucket, Key="k", IfMatch='"0123"')
            assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        got = client.get_object(Bucket=s3_bucket, Key="k", IfMatch=etag, Range="bytes=2-4")
        assert (got["Body"].read(), got["ContentRange"], got["ResponseMetadata"]["HTTPStatusCode"]) == (
            b"llo",
            "bytes 2-4/11",
            206,
        )
        assert client.get_object(Bucket=s3_bucket, Key="k", Range="bytes=-3")["Body"].read() == b"rld"
        assert client.get_object(Bucket=s3_bucket, Key="k", Range="bytes=8-")["Body"].read() == b"rld"
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.get_object(Bucket=s3_bucket, Key="k", Range="bytes=11-20")
        assert info.value.response["Error"]["Code"] == "InvalidRange"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.get_object(Bucket=s3_bucket, Key="k", IfNoneMatch=etag)
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304


# ---------------------------------------------------------------------------------------------------------------------
# Proxy request scanner and the sparse safetensors helper


def test_request_scanner_handles_bodies_and_pipelining() -> None:
    seen: list[ProxyRequest] = []
    scanner = _HTTPRequestScanner(seen.append)
    stream = (
        b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nGET / HTTP"  # a body that looks like a request
        b"POST /b/k?uploads HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        b"GET /b/k HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n"
    )
    for i in range(0, len(stream), 7):  # arbitrary packet boundaries
        scanner.feed(stream[i : i + 7])
    assert seen == [
        ProxyRequest("PUT", "/b/k", None),
        ProxyRequest("POST", "/b/k?uploads", None),
        ProxyRequest("GET", "/b/k", "bytes=0-1"),
    ]


@pytest.mark.parametrize("total", [2**30, 100_000, 1000, 10])
def test_sparse_safetensors(tmp_path: Path, total: int) -> None:
    path = tmp_path / "big.safetensors"
    sparse = sparse_safetensors(path, total, metadata={"format": "pt"})
    size = path.stat().st_size
    assert size == sparse.size
    assert size == total or (total < 1000 and size > total)  # too small for the header: a little bigger
    if total == 2**30:
        assert path.stat().st_blocks * 512 < 2**20  # a hole, not a GiB of zeros on disk
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    assert shapes == {name: entry["shape"] for name, entry in sparse.header.items() if name != "__metadata__"}
    nbytes = {"F32": 4, "U8": 1}
    total_data = sum(
        int(np.prod(e["shape"])) * nbytes[e["dtype"]] for n, e in sparse.header.items() if n != "__metadata__"
    )
    assert sparse.data_start + total_data == size
    with open(path, "rb") as f:
        for name, entry in sparse.header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if end - begin >= 16:
                f.seek(sparse.data_start + begin)
                assert f.read(8) == MARKER
                f.seek(sparse.data_start + end - 8)
                assert f.read(8) == MARKER


def test_server_sockets_are_loopback_only(http_server: RangeHTTPServer) -> None:
    assert http_server.url.startswith("http://127.0.0.1:")
    with pytest.raises(OSError):
        # nothing listens on the wildcard address for these ports from another interface's point of view
        socket.create_connection(("127.0.0.2", http_server.port), timeout=1).close()
