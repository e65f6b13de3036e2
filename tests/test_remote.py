"""Checkpoints in object stores and behind HTTP, against real servers on 127.0.0.1 (tests/remote_fixtures.py):
moto's S3 server behind a byte-counting proxy, and an HTTP file server with Range support.

What is measured here is what crossed the socket: ``inspect`` of a 1 GiB file fetches its header only,
a sharded folder read with ``--select`` fetches only the shards it needs, an upload appears whole or not
at all, and every failure is one line, exit 2, with no credentials in it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from remote_fixtures import sparse_safetensors

import converters
from converters.cli import main
from converters.core import storage, upload

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "BACKOFF", 0.01)  # the retry tests wait milliseconds, not seconds


def s3_options(server: Any) -> list[str]:
    """The CLI flags that point s3fs at the test server."""
    flags = []
    for key, value in server.storage_options.items():
        flags += ["--storage-option", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return flags


def make_checkpoint(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A safetensors file of ours (it stores BLAKE3 digests) holding ``tensors``."""
    from safetensors.numpy import save_file

    foreign = path.with_suffix(".foreign.safetensors")
    save_file(tensors, str(foreign))
    converters.convert(foreign, path)
    foreign.unlink()
    return path


def random_tensors(count: int, elements: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer{i}.weight": rng.standard_normal(elements).astype(np.float32) for i in range(count)}


def put(server: Any, bucket: str, local: Path, key: str) -> None:
    server.client(direct=True).upload_file(str(local), bucket, key)


def get(server: Any, bucket: str, key: str) -> bytes:
    return bytes(server.client(direct=True).get_object(Bucket=bucket, Key=key)["Body"].read())


def keys(server: Any, bucket: str) -> list[str]:
    listed = server.client(direct=True).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def pending_uploads(server: Any, bucket: str) -> list[Any]:
    return list(server.client(direct=True).list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def run_cli(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    code = main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------ fetching little


def test_inspect_of_a_1_gib_file_over_http_fetches_its_header_only(http_server: Any, capsys: Any) -> None:
    sparse = sparse_safetensors(http_server.root / "big.safetensors", 1 << 30)
    http_server.reset_counters()
    code, out, err = run_cli(capsys, "inspect", http_server.url + "/big.safetensors")
    assert code == 0, err
    assert "big.f32" in out and "1.0 GiB" in out
    assert http_server.bytes_sent < 1 * MiB, http_server.requests
    assert sparse.size == 1 << 30


def test_inspect_and_schema_over_s3_fetch_no_tensor_data(
    s3_server: Any, s3_bucket: str, tmp_path: Path, capsys: Any
) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(4, 4 * MiB // 4))  # 16 MiB, digests stored
    put(s3_server, s3_bucket, local, "ckpt.safetensors")
    url = f"s3://{s3_bucket}/ckpt.safetensors"
    for command in (["inspect", url], ["schema", url], ["inspect", "--json", url]):
        s3_server.proxy.reset_counters()
        code, out, err = run_cli(capsys, *command, *s3_options(s3_server))
        assert code == 0, err
        assert s3_server.proxy.bytes_to_client < 1 * MiB, (command, s3_server.proxy.requests)
    schema = json.loads(out)
    local_schema = converters.manifest(local)
    assert schema["tensors"] == local_schema["tensors"]


def test_sharded_select_fetches_only_the_shards_it_needs(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(6, MiB // 4))  # 6 tensors of 1 MiB
    folder = tmp_path / "sharded"
    converters.convert(local, folder, max_shard_size="1MiB")  # one tensor per shard
    for file in folder.iterdir():
        put(s3_server, s3_bucket, file, f"sharded/{file.name}")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    wanted_shard = index["weight_map"]["layer2.weight"]
    s3_server.proxy.reset_counters()
    out = tmp_path / "one.safetensors"
    code = main(["convert", f"s3://{s3_bucket}/sharded", str(out), "--select", "layer2.weight", *s3_options(s3_server)])
    assert code == 0
    fetched = [target for method, target, _ in s3_server.proxy.requests if method == "GET" and "sharded/" in target]
    touched = {target.split("sharded/")[1].split("?")[0] for target in fetched}
    assert wanted_shard in touched
    others = {name for name in index["weight_map"].values() if name != wanted_shard}
    assert not touched & others, f"fetched from shards it did not need: {sorted(touched & others)}"
    assert s3_server.proxy.bytes_to_client < 1.5 * MiB  # the one tensor of 1 MiB, headers and the index
    expected = tmp_path / "expected.safetensors"
    converters.convert(folder, expected, select="layer2.weight")
    assert out.read_bytes() == expected.read_bytes()


# ------------------------------------------------------------------------------------------ converting


def test_remote_to_local_local_to_remote_and_remote_to_remote_are_byte_identical(
    s3_server: Any, s3_bucket: str, http_server: Any, tmp_path: Path
) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(3, 10 * MiB // 4))  # 30 MiB: multipart
    expected_pt = tmp_path / "expected.pt"
    converters.convert(local, expected_pt)
    options = s3_server.storage_options

    converters.convert(local, f"s3://{s3_bucket}/a/ckpt.pt", storage_options=options)  # local -> S3 (2 parts)
    assert get(s3_server, s3_bucket, "a/ckpt.pt") == expected_pt.read_bytes()
    assert not pending_uploads(s3_server, s3_bucket)

    back = tmp_path / "back.safetensors"
    converters.convert(f"s3://{s3_bucket}/a/ckpt.pt", back, storage_options=options)  # S3 -> local
    assert back.read_bytes() == local.read_bytes()

    converters.convert(f"s3://{s3_bucket}/a/ckpt.pt", f"s3://{s3_bucket}/b/ckpt.npz", storage_options=options)
    expected_npz = tmp_path / "expected.npz"
    converters.convert(expected_pt, expected_npz)
    assert get(s3_server, s3_bucket, "b/ckpt.npz") == expected_npz.read_bytes()  # S3 -> S3

    (http_server.root / "ckpt.pt").write_bytes(expected_pt.read_bytes())
    over_http = tmp_path / "http.safetensors"
    converters.convert(http_server.url + "/ckpt.pt", over_http)  # HTTP -> local
    assert over_http.read_bytes() == local.read_bytes()
    assert main(["verify", "--deep", f"s3://{s3_bucket}/a/ckpt.pt", *s3_options(s3_server)]) == 0
    assert main(["verify", f"s3://{s3_bucket}/b/ckpt.npz", str(local), *s3_options(s3_server)]) == 0


def test_sharded_folder_to_s3_appears_with_its_index_and_reads_back(
    s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(4, MiB // 4))
    expected = tmp_path / "expected"
    converters.convert(local, expected, max_shard_size="2MiB")
    url = f"s3://{s3_bucket}/out"
    assert main(["convert", str(local), url, "--max-shard-size", "2MiB", *s3_options(s3_server)]) == 0
    assert keys(s3_server, s3_bucket) == sorted(f"out/{p.name}" for p in expected.iterdir())
    for file in expected.iterdir():
        assert get(s3_server, s3_bucket, f"out/{file.name}") == file.read_bytes(), file.name
    assert converters.verify(converters.read(url, storage_options=s3_server.storage_options), local) == []


def test_force_semantics_match_local_ones(s3_server: Any, s3_bucket: str, tmp_path: Path, capsys: Any) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 1000))
    url = f"s3://{s3_bucket}/ckpt.pt"
    code, _, err = run_cli(capsys, "convert", str(local), url, *s3_options(s3_server))
    assert code == 0, err
    before = get(s3_server, s3_bucket, "ckpt.pt")
    other = make_checkpoint(tmp_path / "other.safetensors", random_tensors(2, 1000, seed=1))
    code, _, err = run_cli(capsys, "convert", str(other), url, *s3_options(s3_server))
    assert code == 2 and err.count("\n") == 1 and "exists; pass --force" in err and "Traceback" not in err
    assert get(s3_server, s3_bucket, "ckpt.pt") == before
    code, _, err = run_cli(capsys, "convert", str(other), url, "--force", *s3_options(s3_server))
    assert code == 0, err
    assert get(s3_server, s3_bucket, "ckpt.pt") != before


def test_an_object_that_appears_during_the_upload_is_kept(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "data.bin"
    local.write_bytes(os.urandom(20 * MiB))  # multipart
    target = storage.location(f"s3://{s3_bucket}/x.bin", s3_server.storage_options)
    assert isinstance(target, storage.RemotePath)
    calls = []
    original = upload._S3Upload.call

    def racing(self: Any, method: str, **arguments: Any) -> Any:
        calls.append(method)
        if method == "complete_multipart_upload":  # someone else writes the object first
            s3_server.client(direct=True).put_object(Bucket=s3_bucket, Key="x.bin", Body=b"theirs")
        return original(self, method, **arguments)

    upload._S3Upload.call = racing  # type: ignore[method-assign]
    try:
        with pytest.raises(converters.DestinationError, match="exists"):
            upload.upload_file(local, target, overwrite=False)
    finally:
        upload._S3Upload.call = original  # type: ignore[method-assign]
    assert "complete_multipart_upload" in calls
    assert get(s3_server, s3_bucket, "x.bin") == b"theirs"
    assert not pending_uploads(s3_server, s3_bucket)


# ------------------------------------------------------------------------------------------ atomic uploads


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_a_failed_upload_leaves_no_object_and_no_pending_upload(
    s3_server: Any, s3_bucket: str, tmp_path: Path, failure: type[BaseException]
) -> None:
    local = tmp_path / "data.bin"
    local.write_bytes(os.urandom(40 * MiB))  # three parts
    target = storage.location(f"s3://{s3_bucket}/x.bin", s3_server.storage_options)
    assert isinstance(target, storage.RemotePath)
    original = upload._S3Upload.call
    parts = []

    def failing(self: Any, method: str, **arguments: Any) -> Any:
        if method == "upload_part":
            parts.append(arguments["PartNumber"])
            if len(parts) == 2:
                raise failure("stopped during the second part")
        return original(self, method, **arguments)

    upload._S3Upload.call = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(failure):
            upload.upload_file(local, target, overwrite=True)
    finally:
        upload._S3Upload.call = original  # type: ignore[method-assign]
    assert keys(s3_server, s3_bucket) == []
    assert pending_uploads(s3_server, s3_bucket) == []


def test_sigint_during_an_upload_leaves_nothing_behind(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    """A real process stopped by Ctrl-C while its multipart upload is under way."""
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(8, 16 * MiB // 4))  # 128 MiB
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "convert", str(local), f"s3://{s3_bucket}/ckpt.pt", "--quiet"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not pending_uploads(s3_server, s3_bucket):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, err
    assert err.strip().count("\n") == 0 and "interrupted" in err
    assert keys(s3_server, s3_bucket) == []
    assert pending_uploads(s3_server, s3_bucket) == []


# ------------------------------------------------------------------------------------------ credentials


def test_credentials_from_the_environment(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 1000))
    put(s3_server, s3_bucket, local, "ckpt.safetensors")
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "inspect", f"s3://{s3_bucket}/ckpt.safetensors"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "layer0.weight" in done.stdout


def test_access_denied_is_one_line_without_the_secret(http_server: Any, capsys: Any) -> None:
    (http_server.root / "x.safetensors").write_bytes(b"\0" * 64)
    http_server.require_auth = "right-token"
    secret = "wrong-token-s3cr3t-value"
    code, _, err = run_cli(
        capsys,
        "inspect",
        http_server.url + "/x.safetensors",
        "--storage-option",
        json.dumps({"Authorization": f"Bearer {secret}"}).join(["headers=", ""]),
    )
    assert code == 2
    assert err.count("\n") == 1 and "access denied" in err and "Traceback" not in err
    assert secret not in err


def test_credentials_in_a_url_are_never_printed(http_server: Any, capsys: Any) -> None:
    code, _, err = run_cli(capsys, "inspect", f"http://user:hunter2-password@127.0.0.1:{http_server.port}/none.pt")
    assert code == 2
    assert "hunter2" not in err and "***@" in err


# ------------------------------------------------------------------------------------------ failures


def test_missing_object_and_missing_bucket(s3_server: Any, s3_bucket: str, capsys: Any) -> None:
    for url in (f"s3://{s3_bucket}/nothing.safetensors", "s3://no-such-bucket-here/x.safetensors"):
        code, _, err = run_cli(capsys, "inspect", url, *s3_options(s3_server))
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "no such object" in err


def test_transient_errors_are_retried_a_bounded_number_of_times(http_server: Any, tmp_path: Path, capsys: Any) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 1000))
    (http_server.root / "ckpt.safetensors").write_bytes(local.read_bytes())
    url = http_server.url + "/ckpt.safetensors"
    http_server.fail_next(2, status=503)
    code, _, err = run_cli(capsys, "convert", url, str(tmp_path / "a.pt"))
    assert code == 0, err
    http_server.fail_next(1000, status=503)
    http_server.reset_counters()
    code, _, err = run_cli(capsys, "convert", url, str(tmp_path / "b.pt"))
    assert code == 2 and err.count("\n") == 1 and f"after {storage.ATTEMPTS} tries" in err, err
    assert http_server.request_count <= 2 * storage.ATTEMPTS  # HEAD falls back to GET in fsspec's info()
    assert not (tmp_path / "b.pt").exists()


def test_an_object_changed_while_being_read_is_an_error(http_server: Any, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 100_000))
    http_server.write_file("ckpt.safetensors", local.read_bytes())
    checkpoint = converters.read(http_server.url + "/ckpt.safetensors")  # header read, ETag recorded
    changed = make_checkpoint(tmp_path / "changed.safetensors", random_tensors(2, 100_000, seed=5))
    http_server.replace_file("ckpt.safetensors", changed.read_bytes())  # same size, new ETag
    with pytest.raises(storage.RemoteError, match="changed while being read"):
        converters.write(checkpoint, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_a_truncated_object_is_an_error(http_server: Any, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 100_000))
    http_server.write_file("ckpt.safetensors", local.read_bytes())
    checkpoint = converters.read(http_server.url + "/ckpt.safetensors")
    http_server.ignore_if_match = True  # a server that cannot tell: the short answer is what gives it away
    http_server.replace_file("ckpt.safetensors", local.read_bytes()[: local.stat().st_size // 2])
    with pytest.raises(converters.ConverterError, match=r"shorter|truncated|past the end"):
        converters.write(checkpoint, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_a_server_that_ignores_ranges_is_refused(http_server: Any, tmp_path: Path, capsys: Any) -> None:
    sparse_safetensors(http_server.root / "big.safetensors", 64 * MiB)
    http_server.ignore_ranges = True
    code, _, err = run_cli(capsys, "convert", http_server.url + "/big.safetensors", str(tmp_path / "x.pt"))
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert http_server.bytes_sent < 16 * MiB  # it stopped reading, it did not download the file


# ------------------------------------------------------------------------------------------ the extra


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_without_the_extra_a_url_names_the_extra_to_install() -> None:
    for blocked in ("fsspec", "s3fs"):
        done = run_python(
            f"import sys; sys.modules[{blocked!r}] = None\n"
            "from converters.cli import main\n"
            "sys.exit(main(['inspect', 's3://bucket/model.safetensors']))"
        )
        assert done.returncode == 2, done.stderr
        assert "pip install 'statedict-convert[remote]'" in done.stderr and done.stderr.count("\n") == 1


def test_local_use_does_not_import_fsspec(tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 100))
    done = run_python(
        "import sys\nfrom converters.cli import main\n"
        f"main(['convert', {str(local)!r}, {str(tmp_path / 'x.pt')!r}, '--quiet'])\n"
        f"main(['inspect', {str(tmp_path / 'x.pt')!r}])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fsspec', 's3fs', 'aiohttp', 'huggingface_hub')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_storage_options_need_a_url(tmp_path: Path, capsys: Any) -> None:
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "x.pt"), "--storage-option", "anon=true")
    assert code == 2 and "applies to URL paths" in err
    code, _, err = run_cli(capsys, "inspect", "memory://x.pt", "--storage-option", "novalue")
    assert code == 2 and "KEY=VALUE" in err


def test_hub_urls_go_through_huggingface_hub_and_fail_cleanly_offline(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "inspect", "hf://some-org/some-model/model.safetensors")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------ what a review found


def test_an_s3_object_replaced_while_being_read_is_an_error(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 100_000))
    put(s3_server, s3_bucket, local, "ckpt.safetensors")
    url = f"s3://{s3_bucket}/ckpt.safetensors"
    checkpoint = converters.read(url, storage_options=s3_server.storage_options)  # ETag recorded
    changed = make_checkpoint(tmp_path / "changed.safetensors", random_tensors(2, 100_000, seed=9))
    assert changed.stat().st_size == local.stat().st_size
    put(s3_server, s3_bucket, changed, "ckpt.safetensors")  # same size, other bytes: only the ETag tells
    with pytest.raises(storage.RemoteError, match="changed while being read"):
        converters.write(checkpoint, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_the_users_http_headers_are_sent_with_every_range_request(http_server: Any, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 100_000))
    http_server.write_file("ckpt.safetensors", local.read_bytes())
    http_server.require_auth = "right-token"
    out = tmp_path / "out.safetensors"
    options = {"headers": {"Authorization": "Bearer right-token"}}
    converters.convert(http_server.url + "/ckpt.safetensors", out, storage_options=options)
    assert out.read_bytes() == local.read_bytes()
    ranged = [i for i, (method, _, range_, _) in enumerate(http_server.requests) if method == "GET" and range_]
    assert ranged and all("If-Match" in http_server.request_headers[i] for i in ranged)


class LyingHandler:
    """An HTTP server that announces a small object and then answers range requests with far more."""

    @staticmethod
    def serve(announce_length: bool) -> Any:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.send_header("ETag", '"v1"')
                self.end_headers()

            def do_GET(self) -> None:
                self.send_response(206)
                self.send_header("Content-Range", "bytes 0-999/1000")
                if announce_length:
                    self.send_header("Content-Length", str(400 * MiB))
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for _ in range(400):
                        self.wfile.write(b"\0" * MiB)
                except OSError:
                    pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.mark.parametrize("announce_length", [True, False])
def test_a_server_sending_more_than_asked_is_refused_without_buffering_it(announce_length: bool) -> None:
    server = LyingHandler.serve(announce_length)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/x.safetensors"
        handle = storage.RemoteFile(storage.remote(url))
        with pytest.raises(storage.RemoteError, match="server answered"):
            handle.fetch(0, 1000)
    finally:
        server.shutdown()
        server.server_close()


def test_a_signed_url_keeps_its_query_out_of_the_name_and_the_messages(
    http_server: Any, tmp_path: Path, capsys: Any
) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 1000))
    http_server.write_file("ckpt.safetensors", local.read_bytes())
    signed = http_server.url + "/ckpt.safetensors?X-Amz-Credential=AKIA&X-Amz-Signature=SECRETSIGNATURE"
    code, out, err = run_cli(capsys, "inspect", signed)
    assert code == 0, err
    assert "SECRETSIGNATURE" not in out and "safetensors" in out
    targets = [headers[":target"] for headers in http_server.request_headers]
    assert targets and all(target.endswith("X-Amz-Signature=SECRETSIGNATURE") for target in targets), targets
    code, _, err = run_cli(capsys, "inspect", http_server.url + "/none.safetensors?token=SECRETTOKEN")
    assert code == 2 and "SECRETTOKEN" not in err and "no such object" in err


def test_an_unreachable_server_is_a_network_error_not_a_missing_object(tmp_path: Path, capsys: Any) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = run_cli(capsys, "inspect", f"http://127.0.0.1:{port}/ckpt.safetensors")
    assert code == 2 and err.count("\n") == 1
    assert f"after {storage.ATTEMPTS} tries" in err and "no such object" not in err, err
    code, _, err = run_cli(
        capsys,
        "inspect",
        "s3://bucket/ckpt.safetensors",
        *["--storage-option", f"endpoint_url=http://127.0.0.1:{port}", "--storage-option", "key=k"],
        *["--storage-option", "secret=s"],
    )
    assert code == 2 and err.count("\n") == 1 and f"after {storage.ATTEMPTS} tries" in err, err


def test_replacing_a_folder_never_leaves_old_and_new_shards_under_one_index(
    s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    old = make_checkpoint(tmp_path / "old.safetensors", random_tensors(4, MiB // 4, seed=1))
    new = make_checkpoint(tmp_path / "new.safetensors", random_tensors(4, MiB // 4, seed=2))
    url = f"s3://{s3_bucket}/folder"
    options = s3_server.storage_options
    converters.convert(old, url, max_shard_size="1MiB", storage_options=options)
    index = "folder/model.safetensors.index.json"
    assert index in keys(s3_server, s3_bucket)
    original = upload._S3Upload.call
    count = []

    def failing(self: Any, method: str, **arguments: Any) -> Any:
        if method == "put_object":
            count.append(self.target["Key"])
            if len(count) == 3:
                raise OSError("network down")
        return original(self, method, **arguments)

    upload._S3Upload.call = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(OSError, match="network down"):
            converters.convert(new, url, max_shard_size="1MiB", storage_options=options)
    finally:
        upload._S3Upload.call = original  # type: ignore[method-assign]
    assert index not in keys(s3_server, s3_bucket)  # removed first: nothing names a mix
    assert not pending_uploads(s3_server, s3_bucket)
    converters.convert(new, url, max_shard_size="1MiB", storage_options=options)
    assert converters.verify(converters.read(url, storage_options=options), new) == []


def test_a_folder_holding_other_files_is_not_replaced(
    s3_server: Any, s3_bucket: str, tmp_path: Path, capsys: Any
) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, MiB // 4))
    url = f"s3://{s3_bucket}/folder"
    assert main(["convert", str(local), url, "--max-shard-size", "1MiB", "--quiet", *s3_options(s3_server)]) == 0
    s3_server.client(direct=True).put_object(Bucket=s3_bucket, Key="folder/config.json", Body=b"{}")
    code, _, err = run_cli(
        capsys, "convert", str(local), url, "--max-shard-size", "1MiB", "--force", *s3_options(s3_server)
    )
    assert code == 2 and "holding other files ('config.json')" in err, err
    assert "folder/config.json" in keys(s3_server, s3_bucket)


def test_an_interrupted_upload_to_a_store_without_multipart_leaves_nothing(tmp_path: Path) -> None:
    import fsspec
    from fsspec.implementations.memory import MemoryFile

    store = fsspec.filesystem("memory")
    local = tmp_path / "data.bin"
    local.write_bytes(os.urandom(20 * MiB))
    target = storage.location("memory://interrupted/data.bin")
    assert isinstance(target, storage.RemotePath)
    original = MemoryFile.write
    writes = []

    def interrupted(self: Any, data: Any) -> Any:
        writes.append(len(data))
        if len(writes) == 2:
            raise KeyboardInterrupt
        return original(self, data)

    MemoryFile.write = interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            upload.upload_file(local, target, overwrite=True)
    finally:
        MemoryFile.write = original  # type: ignore[method-assign]
    assert not [path for path in store.store if path.startswith("/interrupted")]


def test_file_urls_are_local_paths(tmp_path: Path, capsys: Any) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 1000))
    code, out, err = run_cli(capsys, "inspect", f"file://{local}")
    assert code == 0, err
    assert "layer0.weight" in out


def test_fetch_slots_are_given_back_after_a_failed_conversion(http_server: Any, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 6 * MiB))  # 48 MiB: several chunks
    http_server.write_file("ckpt.safetensors", local.read_bytes())
    checkpoint = converters.read(http_server.url + "/ckpt.safetensors")
    http_server.truncate_after(MiB, times=1000)  # every answer cut short: the stream fails, retried, then gives up
    with pytest.raises(converters.ConverterError):
        converters.write(checkpoint, tmp_path / "out.pt")
    assert storage._IN_FLIGHT._value == storage.IN_FLIGHT  # type: ignore[attr-defined]  # every slot given back


def test_every_command_takes_urls(s3_server: Any, s3_bucket: str, tmp_path: Path, capsys: Any) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(3, 1000))
    put(s3_server, s3_bucket, local, "ckpt.safetensors")
    url = f"s3://{s3_bucket}/ckpt.safetensors"
    flags = s3_options(s3_server)
    code, out, err = run_cli(capsys, "schema", url, "-o", f"s3://{s3_bucket}/ckpt.schema.json", *flags)
    assert code == 0, err
    written = json.loads(get(s3_server, s3_bucket, "ckpt.schema.json"))
    assert written["tensors"] == converters.manifest(local)["tensors"]
    code, out, err = run_cli(capsys, "convert", url, str(tmp_path / "x.pt"), "--dry-run", "--select", "layer1*", *flags)
    assert code == 0 and "would write 1 tensor" in out, (out, err)
    code, out, err = run_cli(capsys, "verify", url, str(local), "--json", *flags)
    assert code == 0 and json.loads(out)["bit_identical"], (out, err)
    code, out, err = run_cli(capsys, "verify", "--deep", url, *flags)
    assert code == 0 and "intact" in out, (out, err)


@pytest.mark.parametrize("size", [MiB, 20 * MiB])  # one PUT; a multipart upload
def test_an_upload_whose_answer_was_lost_is_recognised_as_done(
    s3_server: Any, s3_bucket: str, tmp_path: Path, size: int
) -> None:
    """The request that makes the object visible succeeds, its answer is lost, the retry is
    refused (the object now exists, or the upload id is gone): the object is ours all the same."""
    local = tmp_path / "data.bin"
    local.write_bytes(os.urandom(size))
    target = storage.location(f"s3://{s3_bucket}/x.bin", s3_server.storage_options)
    assert isinstance(target, storage.RemotePath)
    filesystem = target.filesystem
    original = filesystem.call_s3
    lost = []

    def losing(method: str, *args: Any, **kwargs: Any) -> Any:
        answer = original(method, *args, **kwargs)
        if method in ("put_object", "complete_multipart_upload") and not lost:
            lost.append(method)
            raise ConnectionResetError("the answer was lost")
        return answer

    filesystem.call_s3 = losing
    try:
        upload.upload_file(local, target, overwrite=False)
    finally:
        del filesystem.call_s3
    assert lost
    assert get(s3_server, s3_bucket, "x.bin") == local.read_bytes()
    assert not pending_uploads(s3_server, s3_bucket)


# ------------------------------------------------------------------------------------------ a second review


class MiniServer:
    """A file served with Range by a server with one odd behaviour: ``weak`` gives a weak ETag
    and compares If-Match strongly (RFC 9110: a weak tag never matches); ``stall`` never answers
    a range starting past the first 8 MiB, so a stream's first chunk comes and the one fetched
    ahead of it hangs (``stalled`` counts those requests)."""

    def __init__(self, body: bytes, *, weak: bool = False, stall: bool = False) -> None:
        import http.server
        import threading

        owner = self
        self.stalled = 0
        self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _headers(self, status: int, length: int, extra: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.send_header("ETag", 'W/"v1"' if weak else '"v1"')
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()

            def do_HEAD(self) -> None:
                self._headers(200, len(body), {"Accept-Ranges": "bytes"})

            def do_GET(self) -> None:
                if weak and self.headers.get("If-Match"):
                    self._headers(412, 0, {})
                    return
                first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
                if stall and first >= 8 * MiB:
                    owner.stalled += 1
                    owner.release.wait(120)
                    return
                piece = body[first : last + 1]
                self._headers(206, len(piece), {"Content-Range": f"bytes {first}-{last}/{len(body)}"})
                self.wfile.write(piece)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stalled_server_does_not_hold_up_a_stop(tmp_path: Path, signum: int) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 6 * MiB))  # 48 MiB: several chunks
    server = MiniServer(local.read_bytes(), stall=True)
    try:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "convert", server.url + "/ckpt.safetensors", str(tmp_path / "o.pt")],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not server.stalled:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no range request stalled"
            time.sleep(0.01)
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)  # a hang would be the server's 120 s, times the retries
        assert process.returncode == 128 + signum, err
        assert err.strip().count("\n") == 0, err
        assert not (tmp_path / "o.pt").exists()
    finally:
        server.close()


def test_a_weak_etag_is_not_sent_as_if_match(tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 1000))
    server = MiniServer(local.read_bytes(), weak=True)
    try:
        out = tmp_path / "out.safetensors"
        converters.convert(server.url + "/ckpt.safetensors", out)
        assert out.read_bytes() == local.read_bytes()
    finally:
        server.close()


def test_a_bad_option_is_not_reported_as_a_missing_object(http_server: Any, tmp_path: Path, capsys: Any) -> None:
    (http_server.root / "x.safetensors").write_bytes(b"\0" * 64)
    url = http_server.url + "/x.safetensors"
    code, _, err = run_cli(capsys, "inspect", url, "--storage-option", "nonsense_option=1")
    assert code == 2 and err.count("\n") == 1 and "no such object" not in err and "nonsense_option" in err, err
    code, _, err = run_cli(capsys, "inspect", url, "--storage-option", "client_kwargs=abc")
    assert code == 2 and err.count("\n") == 1 and "must be a JSON object" in err, err


def test_options_prefixed_by_protocol_go_to_that_protocol_only(
    s3_server: Any, s3_bucket: str, http_server: Any, tmp_path: Path, capsys: Any
) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 1000))
    http_server.write_file("ckpt.safetensors", local.read_bytes())
    prefixed = [f if f == "--storage-option" else f"s3.{f}" for f in s3_options(s3_server)]
    code, _, err = run_cli(
        capsys, "convert", http_server.url + "/ckpt.safetensors", f"s3://{s3_bucket}/x.pt", *prefixed
    )
    assert code == 0, err
    expected = tmp_path / "x.pt"
    converters.convert(local, expected)
    assert get(s3_server, s3_bucket, "x.pt") == expected.read_bytes()


def test_file_urls_with_localhost_and_escapes(tmp_path: Path, capsys: Any) -> None:
    folder = tmp_path / "my models"
    folder.mkdir()
    local = make_checkpoint(folder / "ckpt.safetensors", random_tensors(2, 1000))
    escaped = str(local).replace(" ", "%20")
    for url in (f"file://localhost{escaped}", f"file://{escaped}"):
        code, out, err = run_cli(capsys, "inspect", url)
        assert code == 0 and "layer0.weight" in out, err
    code, _, err = run_cli(capsys, "inspect", f"file://otherhost{escaped}")
    assert code == 2 and "not of 'otherhost'" in err


def test_an_http_destination_is_refused_before_any_work(http_server: Any, tmp_path: Path, capsys: Any) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(2, 1000))
    code, _, err = run_cli(capsys, "convert", str(local), http_server.url + "/out.safetensors")
    assert code == 2 and "read-only" in err and err.count("\n") == 1, err
    assert all(method in ("HEAD", "GET") for method, _, _, _ in http_server.requests)  # nothing was sent


def test_a_store_outside_the_extra_names_its_own_package(capsys: Any) -> None:
    code, _, err = run_cli(capsys, "inspect", "gs://bucket/model.safetensors")
    assert code == 2 and err.count("\n") == 1
    assert "gcsfs" in err and "statedict-convert[remote]" not in err


def test_a_dcp_folder_to_s3_reads_back_and_its_metadata_came_last(
    s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    local = make_checkpoint(tmp_path / "ckpt.safetensors", random_tensors(3, MiB // 4))
    options = s3_server.storage_options
    original = upload._S3Upload.call
    order = []

    def recording(self: Any, method: str, **arguments: Any) -> Any:
        if method in ("put_object", "complete_multipart_upload"):
            order.append(self.target["Key"].rsplit("/", 1)[-1])
        return original(self, method, **arguments)

    upload._S3Upload.call = recording  # type: ignore[method-assign]
    try:
        converters.convert(local, f"s3://{s3_bucket}/dcp", dst_format="dcp", storage_options=options)
    finally:
        upload._S3Upload.call = original  # type: ignore[method-assign]
    assert ".metadata" in order and all(name.endswith(".distcp") for name in order[:-2]), order
    assert set(order[-2:]) == {".metadata", "sdconvert.json"}
    assert converters.verify(converters.read(f"s3://{s3_bucket}/dcp", storage_options=options), local) == []
