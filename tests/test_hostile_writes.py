"""Issue 12, classes 3 and 6 (and ONNX's class 1 bounds): writes that are atomic, never clobber,
survive signals, full disks and hostile sources, with safe paths and safe messages — every format,
the DCP folder included (its writer copies tensors as every other writer does).

Every CLI case: exit 2 (128 + N for signal N), exactly one line on stderr, no traceback, and no
temporary file (``*.partial``) left beside the destination.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import converters
from converters.core import atomic
from converters.core.errors import ConverterError, DestinationError, UnsafeFileError, shown

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "cli.py"

# A child process running the CLI with os.copy_file_range instrumented (every tensor byte range
# goes through it; os.pwrite too, the fallback where it fails): MODE=slow copies the first range,
# signals READY, then sleeps (the conversion is under way, its temporary file exists);
# MODE=truncate truncates SOURCE before the first copy; MODE=full/efbig fails the copy with
# ENOSPC/EFBIG; MODE=appear creates APPEAR before the first copy. Every writer (DCP's too: it no
# longer goes through torch's FileSystemWriter) copies tensors this way.
DRIVER = """
import errno, os, sys, time
sys.path.insert(0, {root!r})
mode = os.environ["MODE"]
real = os.copy_file_range
calls = []
def instrumented(*args):
    calls.append(1)
    if mode == "slow":
        copied = real(*args)
        open(os.environ["READY"], "w").close()
        time.sleep(120)
        return copied
    if mode == "truncate" and len(calls) == 1:
        os.truncate(os.environ["SOURCE"], 10)
    if mode in ("full", "efbig"):
        raise OSError(FAILURES[mode], os.strerror(FAILURES[mode]))
    if mode == "appear" and len(calls) == 1:
        with open(os.environ["APPEAR"], "w") as other:
            other.write("theirs")
    return real(*args)
os.copy_file_range = instrumented
FAILURES = {{"full": errno.ENOSPC, "efbig": errno.EFBIG}}
real_pwrite = os.pwrite
def pwrite(*args):  # where copy_file_range fails, bytes are copied through a buffer: a full disk fails that too
    if mode in FAILURES:
        raise OSError(FAILURES[mode], os.strerror(FAILURES[mode]))
    return real_pwrite(*args)
os.pwrite = pwrite
from converters.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER.format(root=str(ROOT)))
    return path


def run_cli(
    *args: object, driver: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    program = [sys.executable, str(driver if driver is not None else CLI)]
    environment = {k: v for k, v in os.environ.items() if k != "SDCONVERT_DEBUG"} | (env or {})
    return subprocess.run([*program, *map(str, args)], capture_output=True, text=True, env=environment, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess[str], message: str, code: int = 2) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small checkpoint with a tensor big enough for external data, and for the kernel copy the
    driver instruments (ranges under transfer.INLINE_COPY are copied inline), in our safetensors."""
    path = tmp_path / "src" / "source.safetensors"
    path.parent.mkdir()
    converters.save({"w": torch.arange(1 << 19, dtype=torch.float32), "b": torch.ones(3), "epoch": 3}, path)
    return path


# ------------------------------------------------------------------------------ no-clobber


SINGLE_FILE = [".pt", ".safetensors", ".msgpack", ".onnx"]


@pytest.mark.parametrize("suffix", SINGLE_FILE)
@pytest.mark.parametrize("appears", ["file", "dangling symlink"])
def test_a_destination_that_appears_during_the_write_is_kept(
    tmp_path: Path, source: Path, suffix: str, appears: str
) -> None:
    destination = tmp_path / f"out{suffix}"

    def meanwhile(done: int, total: int) -> None:
        if not os.path.lexists(destination):
            if appears == "file":
                destination.write_bytes(b"theirs")
            else:
                destination.symlink_to(tmp_path / "nowhere")

    with pytest.raises(DestinationError, match="appeared while it was being written and was not replaced"):
        converters.convert(source, destination, overwrite=False, progress=meanwhile)
    if appears == "file":
        assert destination.read_bytes() == b"theirs"
    else:
        assert destination.is_symlink() and not destination.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["safetensors", "dcp"])
@pytest.mark.parametrize("appears", ["empty folder", "file"])
def test_a_folder_destination_that_appears_during_the_write_is_kept(
    tmp_path: Path, source: Path, kind: str, appears: str
) -> None:
    destination = tmp_path / "out"
    options: dict[str, Any] = {"max_shard_size": 10_000} if kind == "safetensors" else {}

    def meanwhile(done: int, total: int) -> None:
        if not os.path.lexists(destination):
            if appears == "file":
                destination.write_bytes(b"theirs")
            else:
                destination.mkdir()  # rename(2) would silently replace an empty folder

    with pytest.raises(DestinationError, match="appeared while it was being written"):
        converters.convert(source, destination, dst_format=kind, overwrite=False, progress=meanwhile, **options)
    assert destination.read_bytes() == b"theirs" if appears == "file" else list(destination.iterdir()) == []
    assert leftovers(tmp_path) == []


def test_cli_without_force_refuses_a_destination_that_appears(tmp_path: Path, source: Path, driver: Path) -> None:
    destination = tmp_path / "out.safetensors"
    result = run_cli("convert", source, destination, driver=driver, env={"MODE": "appear", "APPEAR": str(destination)})
    assert_one_line(result, f"{destination}: appeared while it was being written and was not replaced")
    assert destination.read_text() == "theirs"
    assert leftovers(tmp_path) == []


def test_cli_refuses_a_dangling_symlink_as_destination(tmp_path: Path, source: Path) -> None:
    destination = tmp_path / "out.pt"
    destination.symlink_to(tmp_path / "nowhere")
    assert_one_line(run_cli("convert", source, destination), "exists; pass --force to replace it")
    assert destination.is_symlink()


@pytest.mark.parametrize("fallback", ["link", "look then rename"])
def test_no_replace_publishing_without_renameat2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    if fallback == "look then rename":

        def no_links(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.EPERM, "hard links not supported here")

        monkeypatch.setattr(os, "link", no_links)
    destination = tmp_path / "out.bin"
    with atomic.atomic_output(destination, overwrite=False) as out:
        out.write(b"new")
    assert destination.read_bytes() == b"new"
    with (
        pytest.raises(DestinationError, match="appeared while it was being written"),
        atomic.atomic_output(tmp_path / "other.bin", overwrite=False) as out,
    ):
        (tmp_path / "other.bin").symlink_to("nowhere")
        out.write(b"new")
    assert (tmp_path / "other.bin").is_symlink()
    assert leftovers(tmp_path) == []


def test_library_default_still_replaces_atomically(tmp_path: Path, source: Path) -> None:
    destination = tmp_path / "out.safetensors"
    destination.write_bytes(b"old")
    converters.convert(source, destination)
    assert converters.verify(source, destination) == []
    with pytest.raises(DestinationError, match="exists; pass --force"):
        converters.convert(source, destination, overwrite=False)
    with pytest.raises(DestinationError, match="exists; pass --force"):
        converters.save({"w": torch.ones(1)}, destination, overwrite=False)


# ------------------------------------------------------------------------------ the source is never deleted


def test_force_onto_a_folder_holding_the_source_is_refused(tmp_path: Path, source: Path) -> None:
    shards = tmp_path / "shards"
    converters.convert(source, shards, dst_format="safetensors", max_shard_size=10_000)
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    shard = sorted(shards.glob("*.safetensors"))[0]
    cases = [
        (shards / "model.safetensors.index.json", shards, "is a folder holding the source"),
        (shard, shards, "is a folder holding the source"),
        (shards, shards, "the destination is the source folder"),
    ]
    for src, dst, message in cases:
        result = run_cli("convert", src, dst, "--to", "safetensors", "--max-shard-size", "10KB", "--force")
        assert_one_line(result, message)
    dcp = tmp_path / "dcp"
    converters.convert(source, dcp, dst_format="dcp")
    assert_one_line(run_cli("convert", dcp, dcp, "--to", "dcp", "--force"), "the destination is the source folder")
    link = tmp_path / "link"
    link.symlink_to(shards)
    assert_one_line(run_cli("convert", shard, link, "--to", "dcp", "--force"), "is a folder holding the source")
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    assert (dcp / ".metadata").is_file()


# ------------------------------------------------------------------------------ ONNX model + data as one


def _onnx_pair(folder: Path, value: float) -> tuple[Path, bytes, bytes]:
    model = folder / "m.onnx"
    converters.save({"w": torch.full((4096,), value)}, model, external_data=True)
    return model, model.read_bytes(), Path(str(model) + ".data").read_bytes()


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError, SystemExit])
def test_onnx_pair_failing_between_its_renames_keeps_the_old_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: type[BaseException]
) -> None:
    model, old_model, old_data = _onnx_pair(tmp_path, 1.0)
    os.chmod(str(model) + ".data", 0o600)
    real_replace = os.replace

    def replace(source: Any, target: Any) -> None:
        real_replace(source, target)
        if str(target).endswith(".onnx.data"):  # the data file is in place, the model not yet
            raise interruption()

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(interruption):
        converters.save({"w": torch.full((4096,), 2.0)}, model, external_data=True)
    monkeypatch.undo()
    assert model.read_bytes() == old_model and Path(str(model) + ".data").read_bytes() == old_data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert converters.load(model)["w"][0].item() == 1.0
    # And when it goes through, both are new, the data file keeps its mode.
    converters.save({"w": torch.full((4096,), 3.0)}, model, external_data=True)
    assert converters.load(model)["w"][0].item() == 3.0
    assert stat.S_IMODE(os.stat(str(model) + ".data").st_mode) == 0o600


def test_onnx_pair_without_overwrite_refuses_an_existing_data_file(tmp_path: Path, source: Path) -> None:
    model = tmp_path / "m.onnx"
    data = tmp_path / "m.onnx.data"
    data.write_bytes(b"someone's data")
    result = run_cli("convert", source, model, "--external-data")
    assert_one_line(result, f"{data}: exists")
    with pytest.raises(DestinationError, match=r"m\.onnx\.data: exists"):
        converters.convert(source, model, external_data=True, overwrite=False)
    assert data.read_bytes() == b"someone's data" and not model.exists()
    assert leftovers(tmp_path) == []
    assert run_cli("convert", source, model, "--external-data", "--force").returncode == 0
    assert converters.verify(source, model) == []


def test_onnx_pair_whose_model_appears_removes_its_new_data_file(tmp_path: Path, source: Path) -> None:
    model = tmp_path / "m.onnx"

    def meanwhile(done: int, total: int) -> None:
        if not model.exists():
            model.write_bytes(b"theirs")

    with pytest.raises(DestinationError, match=r"m\.onnx: appeared while it was being written"):
        converters.convert(source, model, external_data=True, overwrite=False, progress=meanwhile)
    assert model.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "src"]


# ------------------------------------------------------------------------------ signals


SIGNALLED = [
    ("SIGTERM", "out.safetensors", ()),
    ("SIGHUP", "out.pt", ()),
    ("SIGINT", "out.msgpack", ()),
    ("SIGTERM", "out.onnx", ("--external-data",)),
    ("SIGTERM", "shards", ("--to", "safetensors", "--max-shard-size", "10KB")),
    ("SIGTERM", "dcp", ("--to", "dcp")),
    ("SIGINT", "dcp-files", ("--to", "dcp", "--max-file-size", "10KB")),  # several data files, side by side
    ("SIGTERM", "dcp-files-1", ("--to", "dcp", "--max-file-size", "10KB", "--workers", "1")),
]


@pytest.mark.parametrize(("name", "output", "flags"), SIGNALLED, ids=[f"{s[0]}-{s[1]}" for s in SIGNALLED])
def test_a_signal_mid_copy_removes_the_temporary_output(
    tmp_path: Path, source: Path, driver: Path, name: str, output: str, flags: tuple[str, ...]
) -> None:
    number = getattr(signal, name)
    destination = tmp_path / output
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, str(driver), "convert", str(source), str(destination), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "SDCONVERT_DEBUG"} | {"MODE": "slow", "READY": str(ready)},
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert leftovers(tmp_path), "the conversion should be under way"
    process.send_signal(number)
    stdout, stderr = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert_one_line(result, name, code=128 + number)
    assert leftovers(tmp_path) == []
    assert not os.path.lexists(destination) and not os.path.lexists(str(destination) + ".data")


# ------------------------------------------------------------------------------ hostile sources and disks


@pytest.mark.parametrize("writer", ["torch.save", "ours"])
def test_source_truncated_mid_copy_is_one_line_not_sigbus(tmp_path: Path, driver: Path, writer: str) -> None:
    # torch.save stores no digests, so a second thread hashes the range while the kernel copies it
    # (it used to read through mmap: SIGBUS); our files carry digests, so only the copy reads.
    tensors = {f"w{i}": torch.randn(256, 1024) for i in range(4)}
    src = tmp_path / ("big.pt" if writer == "torch.save" else "big.safetensors")
    if writer == "torch.save":
        torch.save(tensors, src)
    else:
        converters.save(tensors, src)
    destination = tmp_path / "out.msgpack"
    result = run_cli("convert", src, destination, driver=driver, env={"MODE": "truncate", "SOURCE": str(src)})
    assert_one_line(result, f"sdconvert: {src}")
    assert not destination.exists()
    assert leftovers(tmp_path) == []


def test_load_refuses_a_file_truncated_after_it_was_read(tmp_path: Path) -> None:
    # In a child: if the check failed, touching the mapping would kill the process with SIGBUS.
    path = tmp_path / "ckpt.safetensors"
    converters.save({"w": torch.ones(1 << 16)}, path)
    code = (
        f"import sys, os; sys.path.insert(0, {str(ROOT)!r}); import converters\n"
        f"from converters.torch_bridge import to_torch\n"
        f"checkpoint = converters.read({str(path)!r}); os.truncate({str(path)!r}, 100)\n"
        f"try:\n    to_torch(checkpoint)\nexcept converters.CorruptFileError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result
    assert "the file has only 100 bytes" in result.stdout


DISK_ERRORS = [
    ("full", "out.safetensors", (), "no space left on the device"),
    ("efbig", "out.onnx", ("--external-data",), "file too large"),
    ("full", "shards", ("--to", "safetensors", "--max-shard-size", "10KB"), "no space left on the device"),
    ("full", "dcp", ("--to", "dcp"), "no space left on the device"),
    ("efbig", "dcp-files", ("--to", "dcp", "--max-file-size", "10KB"), "file too large"),
]


@pytest.mark.parametrize(
    ("mode", "output", "flags", "message"), DISK_ERRORS, ids=[c[0] + "-" + c[1] for c in DISK_ERRORS]
)
def test_a_full_disk_names_the_destination(
    tmp_path: Path, source: Path, driver: Path, mode: str, output: str, flags: tuple[str, ...], message: str
) -> None:
    destination = tmp_path / output
    result = run_cli("convert", source, destination, *flags, driver=driver, env={"MODE": mode})
    named = destination.with_name(destination.name + ".data") if output.endswith(".onnx") else destination
    assert_one_line(result, f"sdconvert: {named}: {message}")
    assert ".partial" not in result.stderr
    assert leftovers(tmp_path) == [] and not destination.exists()


def test_a_real_file_size_limit_names_the_destination(tmp_path: Path, source: Path) -> None:
    def limit() -> None:  # runs in the child: EFBIG past 8 KiB instead of being killed by SIGXFSZ
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    destination = tmp_path / "out.msgpack"
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", str(source), str(destination)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert_one_line(result, f"{destination}: file too large")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("output", "options"),
    [
        ("out.safetensors", {}),
        ("shards", {"dst_format": "safetensors", "max_shard_size": 10_000}),
        ("dcp", {"dst_format": "dcp"}),
        ("dcp-files", {"dst_format": "dcp", "max_file_size": 10_000}),
    ],
)
def test_a_full_disk_in_the_library_is_a_destination_error(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, output: str, options: dict[str, Any]
) -> None:
    """The driver's full disk, in this process: every tensor copy (kernel or buffered) fails."""

    def full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    monkeypatch.setattr(os, "pwrite", full)
    destination = tmp_path / output
    with pytest.raises(DestinationError, match="no space left on the device") as caught:
        converters.convert(source, destination, **options)
    assert caught.value.file == str(destination) and caught.value.errno == errno.ENOSPC
    assert leftovers(tmp_path) == [] and not destination.exists()


@pytest.mark.parametrize("where", ["missing folder", "folder is a file"])
def test_an_unusable_destination_folder_is_named_as_itself(tmp_path: Path, source: Path, where: str) -> None:
    folder = tmp_path / "x" / "y"
    if where == "folder is a file":
        folder.parent.mkdir()
        folder.write_text("a file")
    destination = folder / "out.pt"
    message = f"no such folder: {folder}" if where == "missing folder" else f"not a folder: {folder}"
    assert_one_line(run_cli("convert", source, destination), f"{destination}: {message}")
    assert ".partial" not in run_cli("convert", source, destination).stderr


@pytest.mark.parametrize("kind", ["fifo", "socket", "char device"])
def test_a_non_regular_source_is_refused_without_hanging(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        path = tmp_path / "in.pt"
        os.mkfifo(path)
    elif kind == "socket":
        import socket

        path = tmp_path / "in.safetensors"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        path = Path("/dev/zero")
    for command in (("inspect", path), ("convert", path, tmp_path / "out.msgpack"), ("verify", "--deep", path)):
        assert_one_line(run_cli(*command), "not a regular file or folder; refusing to read it")
    with pytest.raises(ConverterError, match="refusing to read it"):
        converters.read(path, "onnx")


# ------------------------------------------------------------------------------ permissions


@pytest.fixture
def umask_027() -> Iterator[None]:
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("umask_027")
@pytest.mark.parametrize(
    ("output", "options", "new_mode"),
    [
        ("out.safetensors", {}, 0o640),
        ("out.onnx", {"external_data": True}, 0o640),
        ("shards", {"dst_format": "safetensors", "max_shard_size": 10_000}, 0o750),
        ("dcp", {"dst_format": "dcp"}, 0o750),
    ],
)
def test_outputs_follow_the_umask_and_keep_a_replaced_mode(
    tmp_path: Path, source: Path, output: str, options: dict[str, Any], new_mode: int
) -> None:
    destination = tmp_path / output
    converters.convert(source, destination, **options)
    written = [destination, *(destination.iterdir() if destination.is_dir() else [])]
    if output.endswith(".onnx"):
        written.append(Path(str(destination) + ".data"))
    for path in written:
        expected = new_mode if path == destination or path.is_dir() else 0o640
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    kept = 0o600 if not destination.is_dir() else 0o700
    os.chmod(destination, kept)
    converters.convert(source, destination, **options)  # replaced: its mode is kept, as cp keeps it
    assert stat.S_IMODE(destination.stat().st_mode) == kept


# ------------------------------------------------------------------------------ ONNX external data paths


def _external(tmp_path: Path) -> Path:
    model = tmp_path / "model" / "m.onnx"
    model.parent.mkdir()
    converters.save({"w": torch.arange(4096, dtype=torch.float32)}, model, external_data=True)
    return model


@pytest.mark.parametrize("swap", ["symlink to outside", "other file renamed over it"])
def test_external_data_is_read_from_the_file_that_was_checked(tmp_path: Path, swap: str) -> None:
    model = _external(tmp_path)
    data = Path(str(model) + ".data")
    checkpoint = converters.read(model)
    # Between the read (checks) and the copy, the data file is replaced by hostile bytes.
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\xff" * data.stat().st_size)
    data.rename(tmp_path / "original.data")
    if swap == "symlink to outside":
        data.symlink_to(outside)
    else:
        (tmp_path / "model" / "other").write_bytes(outside.read_bytes())
        (tmp_path / "model" / "other").rename(data)
    out = tmp_path / "out.safetensors"
    converters.write(checkpoint, out)
    assert converters.load(out)["w"].tolist() == list(range(4096))


@pytest.mark.parametrize("kind", ["fifo", "symlinked folder", "folder"])
def test_external_data_must_be_a_regular_file_reached_without_symlinks(tmp_path: Path, kind: str) -> None:
    import onnx

    model = _external(tmp_path)
    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "sub/w.bin" if kind == "symlinked folder" else "w.bin"
    onnx.save(proto, str(model))
    folder = model.parent
    if kind == "fifo":
        os.mkfifo(folder / "w.bin")
        message = "is not a regular file"
    elif kind == "folder":
        (folder / "w.bin").mkdir()
        message = "is not a regular file"
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "w.bin").write_bytes(Path(str(model) + ".data").read_bytes())
        (folder / "sub").symlink_to(tmp_path / "elsewhere")
        message = "goes through a symlink"
    with pytest.raises(UnsafeFileError, match=message):
        converters.read(model)
    assert_one_line(run_cli("inspect", model), message)


# ------------------------------------------------------------------------------ ONNX reader bounds


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _len(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


SIZE = 2_000_000
HEAD = _int(1, 10) + _len(8, _len(1, b"") + _int(2, 21))


def _model(graph: bytes, extra: bytes = b"") -> bytes:
    return HEAD + extra + _len(7, graph)


def _many(make: Callable[[int], bytes]) -> bytes:
    parts, total, index = [], 0, 0
    while total < SIZE:
        part = make(index)
        parts.append(part)
        total += len(part)
        index += 1
    return b"".join(parts)


HOSTILE_ONNX: dict[str, Callable[[], bytes]] = {
    "unknown top-level fields": lambda: _model(_len(2, b"g")) + _int(15, 0) * (SIZE // 2),
    "unknown graph fields": lambda: _model(_len(2, b"g") + _int(6, 0) * (SIZE // 2)),
    "unknown tensor fields": lambda: _model(
        _len(5, _int(2, 1) + _len(8, b"t") + _len(9, bytes(4)) + _int(15, 0) * (SIZE // 2))
    ),
    "packed int32_data": lambda: _model(_len(5, _int(1, SIZE) + _int(2, 6) + _len(8, b"t") + _len(5, b"\x01" * SIZE))),
    "packed 10-byte int64_data": lambda: _model(
        _len(5, _int(1, SIZE // 10) + _int(2, 7) + _len(8, b"t") + _len(7, (b"\xff" * 9 + b"\x01") * (SIZE // 10)))
    ),
    "unpacked float_data": lambda: _model(
        _len(5, _int(1, SIZE // 5) + _int(2, 1) + _len(8, b"t") + (_varint(4 << 3 | 5) + bytes(4)) * (SIZE // 5))
    ),
    "packed dims": lambda: _model(_len(5, _len(1, b"\x01" * SIZE) + _int(2, 1) + _len(8, b"t") + _len(9, bytes(4)))),
    "dims of 2 (2**1000000 elements)": lambda: _model(_len(5, _len(1, b"\x02" * 100_000) + _int(2, 1) + _len(8, b"t"))),
    "many tiny initializers": lambda: _model(
        _many(lambda i: _len(5, _int(2, 2) + _len(8, b"%x" % i) + _len(9, b"\0")))
    ),
    "many training graphs": lambda: _model(_len(2, b"g")) + _len(20, _len(1, b"") * (SIZE // 2)),
    "many metadata_props": lambda: _model(_len(2, b"g"), _many(lambda i: _len(14, _len(1, b"%x" % i) + _len(2, b"")))),
}


# Run from a small launcher: a child forked from pytest (torch imported) would count pytest's
# pages in its peak RSS.
LAUNCHER = """
import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
stderr = child.stderr.read().decode(errors="replace")
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), stderr, usage.ru_utime + usage.ru_stime, usage.ru_maxrss]))
"""


def measured(*command: object) -> tuple[int, str, Any]:
    """(exit code, stderr, usage with .cpu seconds and .peak bytes) of a command run alone."""
    import json
    import types

    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *map(str, command)], capture_output=True, text=True, timeout=600
    )
    code, stderr, cpu, peak = json.loads(result.stdout)
    return code, stderr, types.SimpleNamespace(cpu=cpu, peak=peak * 1024)


@pytest.mark.parametrize("name", list(HOSTILE_ONNX))
def test_hostile_onnx_reads_in_bounded_time_and_memory(tmp_path: Path, name: str) -> None:
    path = tmp_path / "x.onnx"
    path.write_bytes(HOSTILE_ONNX[name]())
    size = path.stat().st_size
    returncode, stderr, usage = measured(sys.executable, CLI, "inspect", path)
    assert returncode in (0, 2), stderr
    if returncode == 2:
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert usage.cpu < 2 + 2 * size / 1e6, f"{name}: {usage.cpu:.1f} s of CPU"
    assert usage.peak <= 2 * size + 100 * 2**20, f"{name}: {usage.peak / 2**20:.0f} MiB peak"


def test_typed_fields_decode_exactly(tmp_path: Path) -> None:
    # Packed and unpacked values of one field, kept in order; a 10-byte varint keeps its low 64 bits.
    values = [0, 1, 127, 128, 2**31 - 1, 2**63, 2**64 - 1]
    packed = b"".join(_varint(v) for v in values[:4])
    unpacked = b"".join(_int(11, v) for v in values[4:6])
    too_wide = b"\xff" * 9 + b"\x03"  # 2**70 - 1: protobuf keeps 2**64 - 1
    tensor = _int(1, len(values)) + _int(2, 13) + _len(8, b"t") + _len(11, packed) + unpacked + _len(11, too_wide)
    path = tmp_path / "typed.onnx"
    path.write_bytes(_model(_len(5, tensor)))
    loaded = converters.load(path)["t"]
    assert loaded.dtype == torch.uint64
    assert [v % 2**64 for v in loaded.view(torch.int64).tolist()] == values


# ------------------------------------------------------------------------------ messages


def test_shown_escapes_and_shortens() -> None:
    assert shown("conv1.weight") == "conv1.weight"
    assert shown("a\n/tmp/x.pt: pt, 1 GiB") == "a\\n/tmp/x.pt: pt, 1 GiB"
    assert shown("\x1b[2J\u202e\r\t") == "\\x1b[2J\\u202e\\r\\t"
    long = shown("k" * 10**6 + "\n", limit=50)
    assert len(long) <= 50 and long.endswith("\\n") and "\u2026" in long
    assert shown(10**5000).startswith("<int")


HOSTILE_KEYS = ["a\n/tmp/x.pt: pt, 1 GiB", "\x1b[2J\x1b[31mred", "bidi\u202eevil", "k" * 5000]


def test_inspect_escapes_and_shortens_keys_and_values(tmp_path: Path) -> None:
    path = tmp_path / "keys.safetensors"
    converters.save(
        {"model_state_dict": {key: torch.ones(1) for key in HOSTILE_KEYS}, "note": "x\n\x1b]0;title\x07" * 1000},
        path,
    )
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # header, file metadata (format: pt), model_state_dict:, each key, note: + value, totals
    assert len(lines) == 1 + 1 + 1 + len(HOSTILE_KEYS) + 2 + 1
    assert not any(ch in result.stdout for ch in "\x1b\x07\r\u202e")
    assert max(map(len, lines)) < 400
    assert any(line.strip().startswith("a\\n/tmp/x.pt: pt, 1 GiB") for line in lines)


def test_error_messages_escape_untrusted_text(tmp_path: Path) -> None:
    path = tmp_path / "keys.safetensors"
    converters.save({key: torch.ones(1) for key in HOSTILE_KEYS}, path)
    for key in HOSTILE_KEYS:
        result = run_cli("convert", path, tmp_path / "out.pt", "--select", key + "/deeper")
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr and "\u202e" not in result.stderr
        assert len(result.stderr) < 2500
    error = ConverterError("bad value " + repr("\x1b[2J"), file="f\nx.pt", path=["a\nb", 3])
    assert str(error) == "f\\nx.pt at a\\nb/3: bad value '\\x1b[2J'"
