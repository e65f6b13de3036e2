"""Converting to and from an object store (S3 on moto) or an HTTP server, and inspecting remote files, in one run.

    python bench/remote.py                      # 1 GiB, 3 rounds
    python bench/remote.py --size 256M --rounds 2
    python bench/remote.py --size 256M --moto-as-is   # moto's own range GETs (see "moto" below)

Servers, all on 127.0.0.1 and started and stopped here: moto's S3 server (`ThreadedMotoServer`, in
this process) behind tests/remote_servers.py's `CountingProxy`, which counts the bytes and requests
every S3 command sends through it (response headers included), and a `RangeHTTPServer` serving a
folder (Range, strong ETags, If-Match) in a separate process (`python -c`, so that it does not share
this process's GIL with moto; it prints its port and answers "reset"/"count" on its stdin with its
body-byte and request counters). Every command is its own process (start-up and imports included)
that reaches S3 through the environment only: AWS_ENDPOINT_URL=<proxy>, AWS_ACCESS_KEY_ID/
AWS_SECRET_ACCESS_KEY=testing, AWS_DEFAULT_REGION=us-east-1, AWS_EC2_METADATA_DISABLED=true.

moto: moto 5.x answers a range GET by reading the whole object (`FakeKey.value`: the key's
SpooledTemporaryFile read from 0 to the end) and then slicing the range, so N range requests over an
object of S bytes cost the server N×S of reading and copying, which real S3 does not do; ours, which
reads by range requests of at most 8 MiB, would mostly measure that. So, by default, this process
patches moto before starting its server (`patch_moto`, nothing outside this process is touched): in a
GET object answer `FakeKey.value` stands for an `ObjectRange`, whose len() is the key's size and whose
slice [a:b] seeks the key's buffer to a and reads b - a bytes under the key's lock, so the range moto's
`_handle_range_header` cuts costs only its own bytes; an answer that is not a satisfiable single range
(no Range header, several ranges, partNumber) is turned back into the whole object's bytes, as moto
gives. Before measuring, range GETs (first/last bytes, open-ended, suffix, past the end, unsatisfiable,
several ranges) of the checkpoint and of a small object are made with the patch on and off and must
answer the same status, Content-Range, Content-Length, ETag and bytes (the bytes also equal to the
local file's). `--moto-as-is` runs without the patch (moto as released); the header line says which.

The checkpoint: 16 random float32 tensors [rows, 1024] of --size bytes in all, written by
safetensors.numpy, then converted by `cli.py convert` to our own safetensors file (which stores
the tensors' blake3 digests), uploaded once as s3://bench/ckpt.safetensors and served (a hard link)
as http://127.0.0.1:PORT/ckpt.safetensors. Measured:

1. remote → local: ours `cli.py convert s3://bench/ckpt.safetensors OUT.pt --quiet --no-fsync`
   (range requests) against "download then convert": a process doing
   `s3fs.S3FileSystem().get(URL, LOCAL)`, then `cli.py convert LOCAL OUT.pt --quiet --no-fsync`;
   the baseline's time is the two processes' times added ("get" alone is also reported).
   The same over HTTP: ours `cli.py convert http://127.0.0.1:PORT/ckpt.safetensors OUT.pt --quiet
   --no-fsync` against `fsspec.filesystem("http").get(URL, LOCAL)` + the same local convert.
2. local → remote: ours `cli.py convert LOCAL s3://bench/out.pt --quiet` (stages locally, then an
   S3 multipart upload completed last) against `cli.py convert LOCAL OUT.pt --quiet --no-fsync`
   then a process doing `s3fs.S3FileSystem().put(OUT.pt, "s3://bench/out2.pt")`.
3. remote → remote: ours `cli.py convert s3://bench/ckpt.safetensors s3://bench/rr.pt --quiet`
   against get + convert + put (to s3://bench/rr2.pt).
4. inspect: `cli.py inspect URL` of a 1 GiB sparse safetensors file (tests/remote_fixtures.py's
   `sparse_safetensors`, whatever --size is) on the HTTP server and of the S3 checkpoint, and
   `cli.py schema` of the S3 checkpoint (its stored digests make reading tensor data needless),
   each against the same command on the local file.

Each round runs every command of a group once, starting at the next command each round, so none
always follows the same one; each command writes a new destination (the file or object is deleted
first, untimed) and starts after an untimed `sync`. Medians over --rounds; "ratio" is against the
baseline of its group measured in the same run. After every round each output (local file, or
object read back from moto directly, not through the proxy) is compared byte for byte with a
reference `cli.py convert LOCAL ref.pt` made once at the start; a difference stops the benchmark.
Peak RSS is GNU time's %M; "above start-up" subtracts the median peak of the same interpreter doing
only its start-up: `cli.py --help` for our local commands, `cli.py --help` with s3fs imported
first for our S3 ones (the imports an s3:// URL costs), `cli.py --help` with fsspec's HTTP
filesystem made first for our HTTP ones, `import s3fs` for get/put, fsspec's HTTP filesystem made
for the HTTP get. A baseline made of several processes shows their largest peak, and their largest
peak above its own start-up. For every one of ours the peak above plain `cli.py --help` is also
printed: the requirement is ≤ 64 MiB above start-up at any size. Byte counts are the proxy's (S3:
headers included) or the HTTP server's (bodies only), for ours in the last round (they are the same
each round).
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import common
from remote_fixtures import sparse_safetensors
from remote_servers import CountingProxy

from bench import CLI

SIZES = {name: common.TARGET[name] for name in ("64M", "256M", "1G")}
TENSORS = 16
SPARSE = 1 << 30  # the HTTP inspect's sparse file, whatever --size is
BUCKET = "bench"
LIMIT_MIB = 64  # the requirement on ours, above start-up
TESTS = Path(__file__).resolve().parent.parent / "tests"
COMPARE_CHUNK = 8 << 20

MAKE_CHECKPOINT = """
import sys, numpy as np
from safetensors.numpy import save_file
total, count, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
rows = max(1, total // count // 4096)
save_file({f"layers.{i}.weight": rng.standard_normal((rows, 1024), dtype=np.float32) for i in range(count)}, path)
"""
GET = "import sys, s3fs; s3fs.S3FileSystem().get(sys.argv[1], sys.argv[2])"
PUT = "import sys, s3fs; s3fs.S3FileSystem().put(sys.argv[1], sys.argv[2])"
HTTP_GET = "import sys, fsspec; fsspec.filesystem('http').get(sys.argv[1], sys.argv[2])"
STARTUP_S3FS = "import s3fs"
STARTUP_FSSPEC_HTTP = "import fsspec; fsspec.filesystem('http')"
HELP = f"import sys, runpy; sys.argv = ['cli.py', '--help']; runpy.run_path({str(CLI)!r}, run_name='__main__')"
STARTUPS = {
    "ours": [sys.executable, str(CLI), "--help"],
    # cli.py --help in an interpreter that imported s3fs first: the start-up of our S3 commands
    "remote": [sys.executable, "-c", f"{STARTUP_S3FS}; {HELP}"],
    # cli.py --help after making fsspec's HTTP filesystem (aiohttp, its loop thread): our HTTP commands' start-up
    "http": [sys.executable, "-c", f"{STARTUP_FSSPEC_HTTP}; {HELP}"],
    "s3fs": [sys.executable, "-c", STARTUP_S3FS],
    "fsspec": [sys.executable, "-c", STARTUP_FSSPEC_HTTP],
}
# The HTTP server's process: argv[1] the folder served, argv[2] tests/; prints its port, then answers on stdin
HTTP_SERVER = """
import sys
sys.path.insert(0, sys.argv[2])
from remote_servers import RangeHTTPServer
server = RangeHTTPServer(sys.argv[1]).start()
print(server.port, flush=True)
for line in sys.stdin:
    if line.strip() == "reset":
        server.reset_counters()
        print("ok", flush=True)
    elif line.strip() == "count":
        print(server.bytes_sent, server.request_count, flush=True)
server.stop()
"""


class HTTPProcess:
    """tests/remote_servers.py's RangeHTTPServer serving ``root``, run in its own process (its own GIL)."""

    def __init__(self, root: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HTTP_SERVER, str(root), str(TESTS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        self.port = int(self.stdout.readline())

    def url_for(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def ask(self, command: str) -> str:
        self.stdin.write(command + "\n")
        self.stdin.flush()
        return self.stdout.readline().strip()

    def reset_counters(self) -> None:
        self.ask("reset")

    def counters(self) -> tuple[int, int]:
        """Body bytes sent and requests answered since the last reset."""
        sent, requests = self.ask("count").split()
        return int(sent), int(requests)

    def stop(self) -> None:
        self.stdin.close()  # the server stops at EOF
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- moto: range GETs that read only the requested bytes (see the module docstring) -------------------------------
MOTO_PATCH = {"on": False}  # patch_moto() installs the patch; this switch turns it on and off (verify_moto)


class ObjectRange:
    """Stands for ``FakeKey.value`` in a patched GET object answer: len() is the key's size, [a:b] reads b - a bytes
    of the key's buffer (seek and read under the key's lock, as ``FakeKey.value`` reads it whole)."""

    def __init__(self, key: Any) -> None:
        self.key = key

    def __len__(self) -> int:
        return int(self.key.size)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __getitem__(self, item: slice) -> bytes:
        if not isinstance(item, slice):
            raise TypeError("ObjectRange only slices")
        start, stop, step = item.indices(len(self))
        if step != 1:
            raise ValueError("ObjectRange only slices with step 1")
        with self.key.lock:
            self.key._value_buffer.seek(start)
            return bytes(self.key._value_buffer.read(max(0, stop - start)))


def patch_moto() -> None:
    """Make moto's GET object read only the range asked for: in S3Response.get_object (and only there, in the thread
    answering it) FakeKey.value is an ObjectRange, which moto's _handle_range_header measures and slices; an answer
    left with an ObjectRange (not a satisfiable single range) is made the whole object's bytes, as moto answers it."""
    from moto.s3 import models, responses

    value = models.FakeKey.value
    in_get = threading.local()

    def get_value(key: Any) -> Any:
        return ObjectRange(key) if getattr(in_get, "on", False) else value.fget(key)

    get_object = responses.S3Response.get_object
    key_response = responses.S3Response.key_response

    def patched_get_object(self: Any) -> Any:
        in_get.on = MOTO_PATCH["on"]
        try:
            return get_object(self)
        finally:
            in_get.on = False

    def patched_key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        status, response_headers, body = key_response(self, request, full_url, headers)
        if isinstance(body, ObjectRange):
            body = body[:]
        return status, response_headers, body

    models.FakeKey.value = property(get_value, value.fset)  # type: ignore[method-assign, assignment]
    responses.S3Response.get_object = patched_get_object  # type: ignore[method-assign]
    responses.S3Response.key_response = patched_key_response  # type: ignore[method-assign]
    MOTO_PATCH["on"] = True


def verify_moto(client: Any, local: Path) -> int:
    """Range GETs of the checkpoint and of a small object, patch on and off: same answers, and the local file's bytes.

    The number of GETs compared."""
    from botocore.exceptions import ClientError

    small = bytes(range(256)) * 40 + b"tail"
    client.put_object(Bucket=BUCKET, Key="verify.bin", Body=small)
    size = local.stat().st_size
    ranges = [("ckpt.safetensors", f"bytes=0-{r - 1}", None) for r in (1, 8, 65536)]
    ranges += [
        ("ckpt.safetensors", "bytes=12345-8400000", None),
        ("ckpt.safetensors", f"bytes={size // 2}-{size // 2 + (8 << 20) - 1}", None),
        ("ckpt.safetensors", f"bytes={size - 100}-", None),
        ("ckpt.safetensors", f"bytes={size - 10}-{size + 1000}", None),
        ("ckpt.safetensors", "bytes=-4096", None),
        ("ckpt.safetensors", f"bytes={size}-", None),  # unsatisfiable
        ("verify.bin", "bytes=0-0", small),
        ("verify.bin", "bytes=100-", small),
        ("verify.bin", "bytes=-7", small),
        ("verify.bin", "bytes=0-1,5-6", small),  # several ranges: the whole object
        ("verify.bin", "bytes=x-y", small),  # not parsed: the whole object
        ("verify.bin", "", small),  # no range
        ("verify.bin", "bytes=-0", small),  # unsatisfiable
    ]

    def get(key: str, byte_range: str) -> tuple[Any, ...]:
        try:
            answer = client.get_object(Bucket=BUCKET, Key=key, **({"Range": byte_range} if byte_range else {}))
        except ClientError as error:
            return ("error", error.response["Error"]["Code"], error.response["ResponseMetadata"]["HTTPStatusCode"])
        meta = answer["ResponseMetadata"]
        return (
            meta["HTTPStatusCode"],
            answer.get("ContentRange"),
            answer["ContentLength"],
            answer["ETag"],
            answer["Body"].read(),
        )

    with local.open("rb") as handle:
        for key, byte_range, content in ranges:
            MOTO_PATCH["on"] = True
            patched = get(key, byte_range)
            MOTO_PATCH["on"] = False
            as_is = get(key, byte_range)
            MOTO_PATCH["on"] = True
            if patched != as_is:
                raise SystemExit(f"moto patch: GET {key} {byte_range!r}: {patched[:4]} != as is {as_is[:4]}")
            if patched[0] == 206:
                first, last = (int(n) for n in patched[1].split()[1].split("/")[0].split("-"))
                expected = content[first : last + 1] if content else os.pread(handle.fileno(), last + 1 - first, first)
                if patched[4] != expected:
                    raise SystemExit(f"moto patch: GET {key} {byte_range!r}: not the file's bytes")
            elif patched[0] == 200 and patched[4] != content:
                raise SystemExit(f"moto patch: GET {key} {byte_range!r}: not the whole object")
    client.delete_object(Bucket=BUCKET, Key="verify.bin")
    return len(ranges)


class Bench:
    """The servers, the files and every sample; a command is (label, argv, start-up kind, destination)."""

    def __init__(self, folder: Path, proxy: CountingProxy, http: HTTPProcess, client: Any) -> None:
        self.folder, self.proxy, self.http, self.client = folder, proxy, http, client
        self.results: dict[str, common.Measured] = {}
        self.kind: dict[str, str] = {}  # label -> start-up kind
        self.traffic: dict[str, tuple[int, int, int]] = {}  # label -> (bytes down, bytes up, requests), last run
        self.parts: dict[str, list[str]] = {}  # a baseline made of several commands -> their labels

    def remove(self, destination: str | Path | None) -> None:
        if isinstance(destination, Path):
            destination.unlink(missing_ok=True)
        elif isinstance(destination, str):  # s3://bench/KEY
            self.client.delete_object(Bucket=BUCKET, Key=destination.removeprefix(f"s3://{BUCKET}/"))

    def one(
        self, label: str, command: list[str], kind: str, destination: str | Path | None
    ) -> tuple[float, int, float]:
        """Run one command (its destination deleted first, after a sync), record its sample and traffic."""
        self.remove(destination)
        os.sync()
        self.proxy.reset_counters()
        self.http.reset_counters()
        sample = common.run(command)
        sent, requests = self.http.counters()
        if requests:
            self.traffic[label] = (sent, 0, requests)
        else:
            self.traffic[label] = (self.proxy.bytes_to_client, self.proxy.bytes_to_server, self.proxy.request_count)
        self.results.setdefault(label, common.Measured()).record(*sample)
        self.kind[label] = kind
        return sample

    def job(self, label: str, steps: list[tuple[str, list[str], str, str | Path | None]]) -> None:
        """One command, or a baseline of several run back to back: their times and CPU added, their peak the largest."""
        samples = [self.one(*step) for step in steps]
        if len(steps) > 1:
            self.parts[label] = [step[0] for step in steps]
            self.results.setdefault(label, common.Measured()).record(
                sum(s[0] for s in samples), max(s[1] for s in samples), sum(s[2] for s in samples)
            )

    def startups(self) -> dict[str, float]:
        return {kind: statistics.median(self.results[f"startup {kind}"].rss_mib) for kind in STARTUPS}

    def above(self, label: str) -> float:
        start = self.startups()
        labels = self.parts.get(label, [label])
        return max(self.results[part].rss - start[self.kind[part]] for part in labels)

    def above_plain(self, label: str) -> float:
        """The peak above plain `cli.py --help`, whatever the command imports."""
        return self.results[label].rss - self.startups()["ours"]


def same_bytes(bench: Bench, reference: Path, output: str | Path) -> None:
    """Stop unless the local file or S3 object ``output`` holds exactly the bytes of ``reference``."""
    size = reference.stat().st_size
    if isinstance(output, Path):
        stream: Any = output.open("rb")
        length = output.stat().st_size
    else:
        body = bench.client.get_object(Bucket=BUCKET, Key=output.removeprefix(f"s3://{BUCKET}/"))
        stream, length = body["Body"], body["ContentLength"]
    if length != size:
        raise SystemExit(f"{output}: {length} bytes, the reference {reference} has {size}")
    with stream, reference.open("rb") as expected:
        offset = 0
        while offset < size:
            piece = expected.read(COMPARE_CHUNK)
            got = stream.read(len(piece))
            while len(got) < len(piece):  # a network body may return short reads
                more = stream.read(len(piece) - len(got))
                if not more:
                    raise SystemExit(f"{output}: short read at {offset + len(got)}")
                got += more
            if got != piece:
                raise SystemExit(f"{output} differs from {reference} in [{offset}, {offset + len(piece)})")
            offset += len(piece)


def measure(bench: Bench, local: Path, http_url: str, sparse_url: str, sparse: Path, rounds: int) -> None:
    py, cli = sys.executable, str(CLI)
    f = bench.folder
    src = f"s3://{BUCKET}/ckpt.safetensors"
    got, out_ours, out_naive, out_put, rr_got, rr_out = (
        f / "got.safetensors",
        f / "ours.pt",
        f / "naive.pt",
        f / "put.pt",
        f / "rr-got.safetensors",
        f / "rr.pt",
    )
    h_got, h_ours, h_naive = f / "http-got.safetensors", f / "http-ours.pt", f / "http-naive.pt"
    quiet = ["--quiet", "--no-fsync"]
    groups: list[list[tuple[str, list[tuple[str, list[str], str, str | Path | None]]]]] = [
        [  # 1. remote -> local
            ("r2l ours", [("r2l ours", [py, cli, "convert", src, str(out_ours), *quiet], "remote", out_ours)]),
            (
                "r2l naive",
                [
                    ("r2l get", [py, "-c", GET, src, str(got)], "s3fs", got),
                    ("r2l convert", [py, cli, "convert", str(got), str(out_naive), *quiet], "ours", out_naive),
                ],
            ),
        ],
        [  # 1b. http -> local
            ("h2l ours", [("h2l ours", [py, cli, "convert", http_url, str(h_ours), *quiet], "http", h_ours)]),
            (
                "h2l naive",
                [
                    ("h2l get", [py, "-c", HTTP_GET, http_url, str(h_got)], "fsspec", h_got),
                    ("h2l convert", [py, cli, "convert", str(h_got), str(h_naive), *quiet], "ours", h_naive),
                ],
            ),
        ],
        [  # 2. local -> remote
            (
                "l2r ours",
                [
                    (
                        "l2r ours",
                        [py, cli, "convert", str(local), f"s3://{BUCKET}/out.pt", "--quiet"],
                        "remote",
                        f"s3://{BUCKET}/out.pt",
                    )
                ],
            ),
            (
                "l2r naive",
                [
                    ("l2r convert", [py, cli, "convert", str(local), str(out_put), *quiet], "ours", out_put),
                    (
                        "l2r put",
                        [py, "-c", PUT, str(out_put), f"s3://{BUCKET}/out2.pt"],
                        "s3fs",
                        f"s3://{BUCKET}/out2.pt",
                    ),
                ],
            ),
        ],
        [  # 3. remote -> remote
            (
                "r2r ours",
                [
                    (
                        "r2r ours",
                        [py, cli, "convert", src, f"s3://{BUCKET}/rr.pt", "--quiet"],
                        "remote",
                        f"s3://{BUCKET}/rr.pt",
                    )
                ],
            ),
            (
                "r2r naive",
                [
                    ("r2r get", [py, "-c", GET, src, str(rr_got)], "s3fs", rr_got),
                    ("r2r convert", [py, cli, "convert", str(rr_got), str(rr_out), *quiet], "ours", rr_out),
                    ("r2r put", [py, "-c", PUT, str(rr_out), f"s3://{BUCKET}/rr2.pt"], "s3fs", f"s3://{BUCKET}/rr2.pt"),
                ],
            ),
        ],
        [  # 4. inspect and schema
            ("inspect http", [("inspect http", [py, cli, "inspect", sparse_url], "http", None)]),
            ("inspect http local", [("inspect http local", [py, cli, "inspect", str(sparse)], "ours", None)]),
            ("inspect s3", [("inspect s3", [py, cli, "inspect", src], "remote", None)]),
            ("inspect s3 local", [("inspect s3 local", [py, cli, "inspect", str(local)], "ours", None)]),
            ("schema s3", [("schema s3", [py, cli, "schema", src], "remote", None)]),
            ("schema s3 local", [("schema s3 local", [py, cli, "schema", str(local)], "ours", None)]),
        ],
    ]
    reference = f / "ref.pt"
    common.run([py, cli, "convert", str(local), str(reference), *quiet])
    outputs = [
        out_ours,
        out_naive,
        h_ours,
        h_naive,
        f"s3://{BUCKET}/out.pt",
        f"s3://{BUCKET}/out2.pt",
        f"s3://{BUCKET}/rr.pt",
        f"s3://{BUCKET}/rr2.pt",
    ]
    for round_index in range(rounds):
        print(f"  round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)
        for kind, command in STARTUPS.items():
            bench.results.setdefault(f"startup {kind}", common.Measured()).record(*common.run(command))
        for jobs in groups:
            shift = round_index % len(jobs)
            for label, steps in jobs[shift:] + jobs[:shift]:
                bench.job(label, steps)
        for output in outputs:
            same_bytes(bench, reference, output)
        print(
            f"  {len(outputs)} outputs identical to the reference ({reference.stat().st_size / 2**20:.0f} MiB each)",
            file=sys.stderr,
            flush=True,
        )


OURS = ("r2l ours", "h2l ours", "l2r ours", "r2r ours", "inspect http", "inspect s3", "schema s3")


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def table(bench: Bench, size: int, converted: int) -> list[str]:
    r = bench.results
    rows = [  # text, label, baseline label, bytes moved (for MiB/s)
        ("**1. s3 → local** ours: `convert s3://… OUT.pt --no-fsync`", "r2l ours", "r2l naive", size),
        ("baseline: `s3fs get` + `convert LOCAL OUT.pt --no-fsync`", "r2l naive", "r2l naive", size),
        ("  · `s3fs get` alone", "r2l get", "r2l naive", size),
        ("**1b. http → local** ours: `convert http://… OUT.pt --no-fsync`", "h2l ours", "h2l naive", size),
        ("baseline: fsspec http `get` + `convert LOCAL OUT.pt --no-fsync`", "h2l naive", "h2l naive", size),
        ("  · fsspec http `get` alone", "h2l get", "h2l naive", size),
        ("**2. local → s3** ours: `convert LOCAL s3://…/out.pt`", "l2r ours", "l2r naive", converted),
        ("baseline: `convert LOCAL OUT.pt --no-fsync` + `s3fs put`", "l2r naive", "l2r naive", converted),
        ("  · `s3fs put` alone", "l2r put", "l2r naive", converted),
        ("**3. s3 → s3** ours: `convert s3://… s3://…/rr.pt`", "r2r ours", "r2r naive", size),
        ("baseline: `s3fs get` + `convert` + `s3fs put`", "r2r naive", "r2r naive", size),
        (f"**4.** `inspect http://…` (sparse, {SPARSE >> 30} GiB)", "inspect http", "inspect http local", None),
        ("  `inspect` of the same local file", "inspect http local", "inspect http local", None),
        ("`inspect s3://…/ckpt.safetensors`", "inspect s3", "inspect s3 local", None),
        ("  `inspect` of the same local file", "inspect s3 local", "inspect s3 local", None),
        ("`schema s3://…/ckpt.safetensors`", "schema s3", "schema s3 local", None),
        ("  `schema` of the same local file", "schema s3 local", "schema s3 local", None),
    ]
    lines = [
        "| command | time (median) | range | MiB/s | ratio vs baseline | CPU | peak RSS | above start-up "
        "(ours: / above plain `--help`) | bytes down / up (requests) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for text, label, against, moved in rows:
        s = r[label]
        speed = f"{moved / 2**20 / s.time:.0f}" if moved else ""
        down, up, requests = bench.traffic.get(label, (0, 0, 0)) if label not in bench.parts else (0, 0, 0)
        if label in bench.parts:
            parts = [bench.traffic[p] for p in bench.parts[label]]
            down, up, requests = (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))
        traffic = f"{mib(down)} / {mib(up)} ({requests})" if requests else ""
        above = f"{bench.above(label):.0f} MiB"
        if label in OURS and bench.kind[label] != "ours":
            above += f" / {bench.above_plain(label):.0f} MiB"
        lines.append(
            f"| {text} | {s.time:.2f} s | {min(s.seconds):.2f}–{max(s.seconds):.2f} s | {speed} "
            f"| {s.time / r[against].time:.2f}× | {s.cpu_time:.2f} s | {s.rss:.0f} MiB | {above} | {traffic} |"
        )
    start = bench.startups()
    kinds = ("ours", "remote", "http", "s3fs", "fsspec")
    times = " / ".join(f"{r['startup ' + kind].time:.2f}" for kind in kinds)
    peaks = " / ".join(f"{start[kind]:.0f}" for kind in kinds)
    lines.append(
        "| (start-up alone: `cli.py --help` / with s3fs imported / with fsspec http made / `import s3fs` / "
        f"fsspec http made) | {times} s | | | | | {peaks} MiB | | |"
    )
    return lines


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # --moto-as-is is ours; common.session parses the rest (--size, --rounds, --folder)
    as_is = "--moto-as-is" in sys.argv
    sys.argv = [arg for arg in sys.argv if arg != "--moto-as-is"]
    if not as_is:
        patch_moto()
    with common.session(__doc__, SIZES, "remote") as (args, folder):
        import boto3
        from moto.server import ThreadedMotoServer

        raw, local = folder / "raw.safetensors", folder / "ckpt.safetensors"
        common.run([sys.executable, "-c", MAKE_CHECKPOINT, str(SIZES[args.size]), str(TENSORS), str(raw)])
        common.run([sys.executable, str(CLI), "convert", str(raw), str(local), "--quiet", "--no-fsync"])
        raw.unlink()
        size = local.stat().st_size
        http_root = folder / "http"
        http_root.mkdir()
        sparse = sparse_safetensors(http_root / "sparse.safetensors", SPARSE)
        os.link(local, http_root / "ckpt.safetensors")

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto.get_host_and_port()
        proxy = CountingProxy(host, port).start()
        http = HTTPProcess(http_root)
        try:
            os.environ.update(
                {
                    "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": proxy.url,
                    "AWS_EC2_METADATA_DISABLED": "true",
                }
            )
            client = boto3.session.Session().client("s3", endpoint_url=f"http://{host}:{port}")  # not counted
            client.create_bucket(Bucket=BUCKET)
            client.upload_file(str(local), BUCKET, "ckpt.safetensors")
            if as_is:
                mode = "moto AS IS (--moto-as-is): every range GET reads the whole object, then slices it"
            else:
                compared = verify_moto(client, local)
                mode = (
                    "moto PATCHED in this process: a range GET reads only its bytes from the object's buffer "
                    f"({compared} GETs answered identically with the patch on and off)"
                )
            bench = Bench(folder, proxy, http, client)
            print(
                f"checkpoint: {size / 2**20:.0f} MiB safetensors ({TENSORS} random float32 tensors, digests stored), "
                f"s3://{BUCKET}/ckpt.safetensors on moto {moto_version()} behind a counting proxy, and on a "
                f"RangeHTTPServer in its own process, all on 127.0.0.1; {args.rounds} rounds, medians; outputs "
                f"compared byte for byte each round\n{mode}\n",
                flush=True,
            )
            measure(
                bench,
                local,
                http.url_for("ckpt.safetensors"),
                http.url_for("sparse.safetensors"),
                sparse.path,
                args.rounds,
            )
        finally:
            http.stop()
            proxy.stop()
            moto.stop()
            if moto._server is not None:  # stop() leaves the listening socket open
                moto._server.server_close()
        converted = (folder / "ref.pt").stat().st_size
        print("\n".join(table(bench, size, converted)), flush=True)
        summary(bench, size, sparse, as_is)


def moto_version() -> str:
    import moto

    return str(moto.__version__)


def summary(bench: Bench, size: int, sparse: Any, as_is: bool) -> None:
    r = bench.results
    verdicts = []
    for label in OURS:
        above = bench.above(label)
        plain = "" if bench.kind[label] == "ours" else f" / {bench.above_plain(label):.0f} MiB"
        verdicts.append(f"{label} {above:.0f} MiB{'' if above <= LIMIT_MIB else ' (OVER)'}{plain}")
    worst = max(bench.above(label) for label in OURS)
    worst_plain = max(bench.above_plain(label) for label in OURS)
    down = bench.traffic["r2l ours"][0]
    h_down = bench.traffic["h2l ours"][0]
    schema_down, _, schema_requests = bench.traffic["schema s3"]
    with (bench.folder / "ckpt.safetensors").open("rb") as handle:
        header_end = 8 + int.from_bytes(handle.read(8), "little")
    # at most the header, or the first range request's minimum (storage.FIRST_FETCH), plus ~1 KiB of HTTP per request
    from converters.core.storage import FIRST_FETCH

    allowance = max(header_end, FIRST_FETCH) + 1024 * schema_requests
    moto = (
        "moto ran AS IS (--moto-as-is): it reads the WHOLE object for every GET and then slices the range "
        "(FakeKey.value), so each of ours' range requests costs it the object's size: ours' s3 reads are penalised "
        "in proportion to requests × size, which real S3 does not do."
        if as_is
        else "moto ran PATCHED by this benchmark (patch_moto): a range GET reads only its bytes from the object's "
        "buffer, as S3 serves it (moto as released reads the whole object per range GET; --moto-as-is runs it so)."
    )
    print(
        f"\n1. s3 → local: ours / (get + convert) {r['r2l ours'].time / r['r2l naive'].time:.2f}× the time; "
        f"ours alone / get alone {r['r2l ours'].time / r['r2l get'].time:.2f}×. "
        f"Proxy counted {mib(down)} down for a {mib(size)} object ({down / size:.3f}×)."
        f"\n1b. http → local: ours / (get + convert) {r['h2l ours'].time / r['h2l naive'].time:.2f}× the time; "
        f"ours alone / get alone {r['h2l ours'].time / r['h2l get'].time:.2f}×. "
        f"The server sent {mib(h_down)} of bodies for a {mib(size)} file ({h_down / size:.3f}×)."
        f"\n2. local → s3: ours / (convert + put) {r['l2r ours'].time / r['l2r naive'].time:.2f}×."
        f"\n3. s3 → s3: ours / (get + convert + put) {r['r2r ours'].time / r['r2r naive'].time:.2f}×."
        f"\n4. schema of the S3 file fetched {mib(schema_down)} in {schema_requests} requests (header ends at "
        f"{header_end} B; allowance {mib(allowance)}): tensor data "
        f"{'not fetched' if schema_down <= allowance else 'FETCHED'}; inspect of the {mib(sparse.size)} sparse file "
        f"over HTTP read {mib(bench.traffic['inspect http'][0])} of bodies in {bench.traffic['inspect http'][2]} "
        "requests."
        f"\nPeak RSS of ours above start-up (its own start-up / plain `cli.py --help`): {'; '.join(verdicts)}. "
        f"≤ {LIMIT_MIB} MiB above start-up {'HELD' if worst <= LIMIT_MIB else 'DID NOT HOLD'} for every one of ours "
        f"(largest {worst:.0f} MiB); above plain `cli.py --help`, which leaves the s3fs/aiohttp imports in the "
        f"figure, the largest is {worst_plain:.0f} MiB."
        "\n\nHow to read it: ratios below 1 mean ours is faster than the baseline of its group (measured in the same "
        "rounds); a baseline's time is the sum of its processes' and its peak is the largest of theirs. MiB/s is the "
        "source checkpoint's size (the converted .pt's for local → s3) over the median time. Byte counts are ours "
        "from the last round: S3 through the proxy (headers included; down = responses, up = requests with bodies), "
        "HTTP bodies as the server sent them. Everything is on loopback; moto is a Python server running in "
        "this process (the HTTP server in its own), sharing the CPU with the command measured: the absolute speeds "
        "are those servers', not a network's, and a slow or distant store would stretch the transfers (ours' range "
        "requests and multipart parts as much as the baseline's get/put) while the local conversion stays as it is. "
        + moto
    )


if __name__ == "__main__":
    main()
