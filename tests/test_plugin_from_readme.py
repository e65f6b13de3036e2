"""A third-party format plugin written from the README's "Adding a format" section, and every
command and option of the converter exercised with it, through the library and the CLI.

The plugin is a tiny real format, "raw": one header line (``RAW1`` + JSON: the tree, and per tensor
its dtype code, shape, offset, length and BLAKE3 digest), then the tensors' bytes, each at an
offset that is a multiple of the ``align`` write option (``--align N``). Its folder variant,
"rawdir", writes one file per tensor plus ``rawdir.index.json`` and is found by its layout.

Where the README was not enough to write it, the code says so in a "README gap" comment: those
places use what the code actually requires or offers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from helpers import assert_bit_identical

import converters
from converters import cli, recipe
from converters.core.atomic import atomic_folder, atomic_output

# README gap: the README says nothing about how a format keeps the non-tensor tree exactly
# (OrderedDict and its _metadata, int keys, tuples, NaN payloads, big ints, tied tensors). The
# manifest's tree encoding (schemas/manifest.md) does all of it; its functions are in
# converters.core.manifests, which "Adding a format" does not mention.
from converters.core.manifests import decode_tree, encode_tree, storage_keys
from converters.core.sources import FileRange

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# The plugin.

MAGIC = b"RAW1"
MAX_HEADER_BYTES = 1 << 24
INDEX_NAME = "rawdir.index.json"
TENSOR_FILE = re.compile(r"t\d{5}\.bin")
# torch dtype name -> (our code, bytes per element). complex64 is deliberately absent.
CODES: dict[str, tuple[str, int]] = {
    "float64": ("f8", 8),
    "float32": ("f4", 4),
    "float16": ("f2", 2),
    "bfloat16": ("bf2", 2),
    "int64": ("i8", 8),
    "int32": ("i4", 4),
    "int8": ("i1", 1),
    "uint8": ("u1", 1),
    "bool": ("b1", 1),
}
BY_CODE = {code: (name, size) for name, (code, size) in CODES.items()}


@dataclass(frozen=True)
class RawOptions:  # as the README shows it
    align: int = converters.option(8, "align each tensor to this many bytes", kind="int", metavar="N")

    def __post_init__(self) -> None:
        # The library passes keyword values as given, so the options check their own values.
        if type(self.align) is not int or self.align < 1 or self.align & (self.align - 1):
            raise converters.ConverterError(f"align must be a power of two, got {self.align!r}")


def _tensor_ref(file: Path, key: str, entry: Any, start: int, available: int, where: Path) -> converters.TensorRef:
    """A header entry checked against the bytes that exist; every lie is a CorruptFileError."""
    if type(entry) is not dict or set(entry) != {"dtype", "shape", "offset", "length", "blake3"}:
        raise converters.CorruptFileError(f"tensor {key!r}: needs dtype, shape, offset, length, blake3", file=where)
    code, shape, offset, length, digest = (entry[k] for k in ("dtype", "shape", "offset", "length", "blake3"))
    if type(code) is not str or code not in BY_CODE:
        raise converters.CorruptFileError(f"tensor {key!r}: unknown dtype code {code!r}", file=where)
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise converters.CorruptFileError(f"tensor {key!r}: bad shape {shape!r:.40}", file=where)
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise converters.CorruptFileError(f"tensor {key!r}: bad offset/length", file=where)
    name, itemsize = BY_CODE[code]
    if length != math.prod(shape) * itemsize:
        raise converters.CorruptFileError(f"tensor {key!r}: {length} bytes cannot hold {name}{shape}", file=where)
    if start + offset + length > available:
        raise converters.CorruptFileError(
            f"tensor {key!r}: bytes [{start + offset}, {start + offset + length}) run past the end ({available})",
            file=where,
        )
    if type(digest) is not str or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise converters.CorruptFileError(f"tensor {key!r}: blake3 must be 64 hex digits", file=where)
    ref = converters.TensorRef(name, tuple(shape), FileRange(file, start + offset, length))
    return ref.with_stored_digest(digest)  # README: "a stored digest: ref.with_stored_digest(hex)"


def _load_header(text: bytes, where: Path, budget: converters.Budget) -> dict[str, Any]:
    # README: "charge the budget before creating what the file asks for". A JSON text holds at
    # most one value per ',', '[' and '{' plus one, so that is charged before parsing it.
    budget.nodes(text.count(b",") + text.count(b"[") + text.count(b"{") + 1, "header values")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise converters.CorruptFileError(f"header is not JSON: {exc}", file=where) from None
    if type(header) is not dict or type(header.get("tensors")) is not dict or "tree" not in header:
        raise converters.CorruptFileError("header needs 'tensors' and 'tree'", file=where)
    budget.tensors(len(header["tensors"]))
    return header


def _tree(node: Any, refs: dict[str, converters.TensorRef], where: Path) -> Any:
    def tensor(key: str, tree_path: Any) -> converters.TensorRef:
        if key not in refs:
            raise converters.CorruptFileError(f"the tree names tensor {key!r}, which is not stored", file=where)
        return refs[key]  # the same object at every path that names it: ties survive

    return decode_tree(node, tensor, file=where)


def _entries(checkpoint: converters.Checkpoint) -> tuple[dict[Any, str], dict[str, Any]]:
    keys = storage_keys(checkpoint.tree)  # a tied tensor gets one key
    entries = {
        keys[tensor_path]: {"dtype": CODES[ref.dtype][0], "shape": list(ref.shape), "length": ref.nbytes}
        for tensor_path, ref in checkpoint.unique_tensors()
    }
    return keys, entries


class RawFormat(converters.FormatBase):
    name = "raw"
    suffixes = (".raw",)
    description = "toy plugin: a JSON header line, then aligned tensor bytes"
    dtype_codes: ClassVar[dict[str, Any]] = {name: code for name, (code, _) in CODES.items()}
    Options = RawOptions

    def sniff(self, head: bytes) -> bool:
        return head.startswith(MAGIC + b"{")

    def read(self, path: Path, budget: converters.Budget) -> converters.Checkpoint:
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as handle:
            line = handle.readline(MAX_HEADER_BYTES)
        if not line.startswith(MAGIC) or not line.endswith(b"\n"):
            raise converters.CorruptFileError(f"no {MAGIC.decode()} header line within the file", file=path)
        header = _load_header(line[len(MAGIC) :], path, budget)
        start = len(line)  # offsets count from the end of the header line
        refs = {key: _tensor_ref(path, key, entry, start, size, path) for key, entry in header["tensors"].items()}
        spans = sorted((ref.source.offset, ref.source.offset + ref.nbytes) for ref in refs.values() if ref.nbytes)
        if any(end > begin for (_, end), (begin, _) in itertools.pairwise(spans)):
            raise converters.CorruptFileError("two tensors' byte ranges overlap", file=path)
        return converters.Checkpoint(_tree(header["tree"], refs, path), path)

    def write(self, checkpoint: Any, path: Path, context: converters.WriteContext, options: RawOptions) -> None:
        keys, entries = _entries(checkpoint)
        offset = 0
        for entry in entries.values():
            offset += -offset % options.align
            entry.update(offset=offset, blake3="0" * 64)  # digests are known once the bytes went by
            offset += entry["length"]
        header = {"align": options.align, "tree": encode_tree(checkpoint.tree, keys), "tensors": entries}

        def header_line() -> bytes:  # padded so that the data area starts aligned too
            text = MAGIC + json.dumps(header, separators=(",", ":")).encode()
            return text + b" " * (-(len(text) + 1) % options.align) + b"\n"

        tensors = converters.TensorWriter(context, checkpoint.origin)
        with atomic_output(Path(path), fsync=context.fsync, overwrite=context.overwrite) as out:
            out.write(header_line())
            start = out.tell()
            for tensor_path, ref in checkpoint.unique_tensors():  # a tied tensor once
                entry = entries[keys[tensor_path]]
                out.write(bytes(start + entry["offset"] - out.tell()))
                entry["blake3"] = tensors.copy(out, ref, tensor_path).digest
            # README gap: how to store digests that are known only after the copy is not said
            # (the built-ins use converters.core.writing.Reserved); a same-length rewrite here.
            out.seek(0)
            out.write(header_line())


class RawFolderFormat(converters.FormatBase):
    name = "rawdir"
    suffixes = ()  # found by its layout (reads_folder), written with --to rawdir
    folder = True
    description = "toy plugin: a folder of one file per tensor + rawdir.index.json"
    dtype_codes = RawFormat.dtype_codes

    def reads_folder(self, path: Path) -> bool:
        return (Path(path) / INDEX_NAME).is_file()

    def replaceable(self, path: Path) -> bool:
        # Only what this format writes; anything else in a destination folder is someone's data.
        return path.is_file() and (path.name == INDEX_NAME or TENSOR_FILE.fullmatch(path.name) is not None)

    def read(self, path: Path, budget: converters.Budget) -> converters.Checkpoint:
        folder = Path(path)
        index_path = folder / INDEX_NAME
        if not index_path.is_file() or index_path.stat().st_size > MAX_HEADER_BYTES:
            raise converters.CorruptFileError(f"no readable {INDEX_NAME}", file=folder)
        index = _load_header(index_path.read_bytes(), index_path, budget)
        refs = {}
        for key, entry in index["tensors"].items():
            name = entry.pop("file", None) if type(entry) is dict else None
            if type(name) is not str or not TENSOR_FILE.fullmatch(name):  # never a path out of the folder
                raise converters.UnsafeFileError(f"tensor {key!r}: file must be tNNNNN.bin", file=index_path)
            file = folder / name
            if not file.is_file():
                raise converters.CorruptFileError(f"tensor {key!r}: {name} is missing", file=index_path)
            size = file.stat().st_size
            refs[key] = _tensor_ref(file, key, {**entry, "offset": 0}, 0, size, index_path)
            if size != refs[key].nbytes:
                raise converters.CorruptFileError(f"{name} has {size} bytes, not {refs[key].nbytes}", file=index_path)
        return converters.Checkpoint(_tree(index["tree"], refs, index_path), folder)

    def write(self, checkpoint: Any, path: Path, context: converters.WriteContext, options: Any) -> None:
        keys, entries = _entries(checkpoint)
        tensors = converters.TensorWriter(context, checkpoint.origin)
        destination = Path(path)
        with atomic_folder(destination, self.replaceable, fsync=context.fsync, overwrite=context.overwrite) as staging:
            for number, (tensor_path, ref) in enumerate(checkpoint.unique_tensors()):
                entry = entries[keys[tensor_path]]
                entry["file"] = f"t{number:05d}.bin"
                # README gap: atomic_folder fsyncs the folder, not the files in it; each file is
                # written with atomic_output so that fsync=True makes its bytes durable too.
                with atomic_output(staging / entry["file"], fsync=context.fsync) as out:
                    entry["blake3"] = tensors.copy(out, ref, tensor_path).digest
            with atomic_output(staging / INDEX_NAME, fsync=context.fsync) as out:
                out.write(json.dumps({"tree": encode_tree(checkpoint.tree, keys), "tensors": entries}).encode())


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture
def plugins() -> Iterator[tuple[RawFormat, RawFolderFormat]]:
    raw, rawdir = RawFormat(), RawFolderFormat()
    converters.registry.register(raw)
    converters.registry.register(rawdir)
    try:
        yield raw, rawdir
    finally:
        converters.registry.unregister("raw")
        converters.registry.unregister("rawdir")


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The recipe checkpoint (Net + SGD after 2 steps) plus the dtypes the plugin must hold, a
    tied tensor and awkward non-tensor values, written by plain torch.save; and what torch reads."""
    _net, _optimizer, checkpoint = recipe.trained_checkpoint(2)
    checkpoint["extra"] = {
        "half": torch.linspace(-2, 2, 7, dtype=torch.float16),
        "steps": torch.tensor([1, -(2**62), 3], dtype=torch.int64),
        "mask": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "tied": checkpoint["model_state_dict"]["fc3.bias"],  # one tensor at two paths
        0: ("tuple", -0.0, float("nan"), 2**70, None, True),
    }
    path = tmp_path_factory.mktemp("original") / "source.pt"
    torch.save(checkpoint, path)
    return path, torch.load(path)


def sdconvert(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """The CLI in this process (the plugins registered here are visible to it)."""
    code = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def raw_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(where the data area starts, the header), parsed independently of the plugin's reader."""
    line = path.read_bytes().split(b"\n", 1)[0] + b"\n"
    return len(line), json.loads(line[len(MAGIC) :])


def assert_same_as_torch(path: Path, expected: Any) -> None:
    """Bit-identical by torch's own account (helpers.assert_bit_identical: exact Python types,
    key order and types, float bits, tensor dtypes, shapes and bytes via view(torch.uint8))."""
    loaded = converters.load(path)
    assert_bit_identical(expected, loaded)
    if isinstance(expected, dict) and "extra" in expected:  # the tie came back as one tensor
        assert loaded["extra"]["tied"] is loaded["model_state_dict"]["fc3.bias"]


def flip_a_tensor_byte(path: Path, tensor_path: tuple[Any, ...]) -> None:
    ref = dict(converters.read(path).unique_tensors())[tensor_path]
    source = ref.source
    assert isinstance(source, FileRange)
    data = bytearray(source.path.read_bytes())
    data[source.offset] ^= 0xFF
    source.path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# Converting, through the library and the CLI.


def test_pt_to_raw_to_safetensors_is_bit_identical(
    plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, expected = original
    raw = converters.convert(source, tmp_path / "c.raw")
    assert raw.read_bytes().startswith(MAGIC + b"{")  # our writer wrote it
    assert converters.read(raw).format == "raw"
    back = converters.convert(raw, tmp_path / "c.safetensors")
    assert converters.verify(source, raw) == [] and converters.verify(source, back) == []
    assert_same_as_torch(raw, expected)
    assert_same_as_torch(back, expected)
    # The CLI writes the same bytes (the writer is deterministic) and reads what it wrote.
    assert sdconvert(capsys, "convert", source, tmp_path / "cli.raw") == (0, f"wrote {tmp_path / 'cli.raw'}\n", "")
    assert (tmp_path / "cli.raw").read_bytes() == raw.read_bytes()
    assert sdconvert(capsys, "convert", tmp_path / "cli.raw", tmp_path / "cli.safetensors")[0] == 0
    assert (tmp_path / "cli.safetensors").read_bytes() == back.read_bytes()
    # With no suffix to go by, sniff finds it.
    shutil.copy(raw, tmp_path / "noname")
    assert converters.read(tmp_path / "noname").format == "raw"


def test_align_lays_out_the_file(plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any) -> None:
    source, expected = original
    default = converters.convert(source, tmp_path / "default.raw")
    by_library = converters.convert(source, tmp_path / "lib.raw", align=64)
    assert sdconvert(capsys, "convert", source, tmp_path / "cli.raw", "--align", "64")[0] == 0
    assert (tmp_path / "cli.raw").read_bytes() == by_library.read_bytes()
    start, header = raw_header(by_library)
    offsets = [entry["offset"] for entry in header["tensors"].values()]
    assert header["align"] == 64 and start % 64 == 0 and all(offset % 64 == 0 for offset in offsets)
    # ... and the reader's byte ranges are where the header says (absolute offsets aligned).
    assert all(ref.source.offset % 64 == 0 for _, ref in converters.read(by_library).unique_tensors())
    assert_same_as_torch(by_library, expected)
    # The default (8) packs tighter, so the option did change the layout.
    _, default_header = raw_header(default)
    assert any(entry["offset"] % 64 for entry in default_header["tensors"].values())
    assert default.stat().st_size < by_library.stat().st_size


def test_bad_align_values_are_refused(plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any) -> None:
    source, _ = original
    code, out, err = sdconvert(capsys, "convert", source, tmp_path / "a.raw", "--align", "48")
    assert code == 2 and out == "" and one_line(err) == "sdconvert: align must be a power of two, got 48"
    code, out, err = sdconvert(capsys, "convert", source, tmp_path / "a.raw", "--align", "many")
    assert code == 2 and one_line(err) == "sdconvert convert: --align takes a number, got 'many'"
    with pytest.raises(converters.ConverterError, match="align must be a power of two, got '64'"):
        converters.convert(source, tmp_path / "a.raw", align="64")
    assert not (tmp_path / "a.raw").exists()


def test_an_unknown_option_gets_the_one_wording(plugins: Any, original: tuple[Path, Any], tmp_path: Path) -> None:
    source, expected = original
    message = "the raw writer has no option 'x'; its options are align"
    with pytest.raises(converters.ConverterError, match=f"^{re.escape(message)}$"):
        converters.convert(source, tmp_path / "a.raw", x=1)
    with pytest.raises(converters.ConverterError, match=f"^{re.escape(message)}$"):
        converters.save(expected, tmp_path / "a.raw", x=1)
    with pytest.raises(converters.ConverterError, match=f"^{re.escape(message)}$"):
        converters.write(converters.read(source), tmp_path / "a.raw", x=1)
    folder_message = "the rawdir writer has no option 'align'; it takes no options"
    with pytest.raises(converters.ConverterError, match=f"^{re.escape(folder_message)}$"):
        converters.convert(source, tmp_path / "d", dst_format="rawdir", align=64)
    assert sorted(tmp_path.iterdir()) == []


def test_align_for_a_safetensors_destination_is_refused(
    plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any
) -> None:
    code, out, err = sdconvert(capsys, "convert", original[0], tmp_path / "a.safetensors", "--align", "64")
    assert (code, out) == (2, "")
    assert one_line(err) == "sdconvert convert: --align is not an option of the safetensors writer"
    assert sorted(tmp_path.iterdir()) == []


def test_select_keeps_one_subtree(plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any) -> None:
    source, expected = original
    converters.convert(source, tmp_path / "model.raw", select="model_state_dict")
    assert_same_as_torch(tmp_path / "model.raw", expected["model_state_dict"])
    assert sdconvert(capsys, "convert", source, tmp_path / "cli.raw", "--select", "model_state_dict")[0] == 0
    assert_same_as_torch(tmp_path / "cli.raw", expected["model_state_dict"])
    # A deeper path, and from the plugin's file rather than to it.
    bias = tmp_path / "bias.safetensors"
    assert sdconvert(capsys, "convert", tmp_path / "cli.raw", bias, "--select", "fc1.bias")[0] == 0
    assert_same_as_torch(bias, expected["model_state_dict"]["fc1.bias"])


def test_no_fsync_force_quiet(
    plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = original
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    dst = tmp_path / "a.raw"
    assert sdconvert(capsys, "convert", source, dst, "--no-fsync", "--quiet") == (0, "", "")
    assert fsyncs == []  # the plugin passed context.fsync on, so nothing was fsynced
    before = dst.read_bytes()
    code, out, err = sdconvert(capsys, "convert", source, dst, "--align", "64")
    assert (code, out, one_line(err)) == (2, "", f"sdconvert: {dst}: exists; pass --force to replace it")
    assert dst.read_bytes() == before
    assert sdconvert(capsys, "convert", source, dst, "--align", "64", "--force") == (0, f"wrote {dst}\n", "")
    assert fsyncs != [] and dst.read_bytes() != before and raw_header(dst)[1]["align"] == 64
    assert [p.name for p in tmp_path.iterdir()] == ["a.raw"]  # no temporary file left behind


def test_check_refuses_a_source_whose_bytes_no_longer_match(
    plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any
) -> None:
    source, _ = original
    bad = converters.convert(source, tmp_path / "bad.raw")
    flip_a_tensor_byte(bad, ("model_state_dict", "conv2.weight"))
    # Without --check the bytes are copied and their stored digest travels with them.
    assert sdconvert(capsys, "convert", bad, tmp_path / "copy.safetensors", "--quiet")[0] == 0
    code, out, err = sdconvert(capsys, "convert", bad, tmp_path / "checked.safetensors", "--check")
    assert (code, out) == (2, "")
    assert one_line(err).startswith(f"sdconvert: {bad} at model_state_dict/conv2.weight: tensor bytes do not match")
    assert not (tmp_path / "checked.safetensors").exists()
    with pytest.raises(converters.CorruptFileError, match=r"at model_state_dict/conv2\.weight"):
        converters.convert(bad, tmp_path / "checked.raw", check=True)


def test_progress_counts_every_tensor_byte(plugins: Any, original: tuple[Path, Any], tmp_path: Path) -> None:
    source, _ = original
    total = sum(ref.nbytes for _, ref in converters.read(source).unique_tensors())
    for dst, options in ((tmp_path / "p.raw", {}), (tmp_path / "dir", {"dst_format": "rawdir"})):
        seen: list[tuple[int, int]] = []
        converters.convert(source, dst, progress=lambda done, whole, seen=seen: seen.append((done, whole)), **options)
        assert sum(done for done, _ in seen) == total and {whole for _, whole in seen} == {total}
    told: list[int] = []
    converters.write(converters.read(tmp_path / "dir"), tmp_path / "w.raw", progress=told.append)
    assert sum(told) == total


def test_a_dtype_the_plugin_cannot_hold_is_refused_before_writing(
    plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any
) -> None:
    state = {"w": torch.ones(2), "extra": {"z": torch.ones(3, dtype=torch.complex64)}}
    with pytest.raises(converters.UnsupportedValueError, match=r"^at extra/z: raw cannot hold dtype complex64;"):
        converters.save(state, tmp_path / "c.raw")
    converters.save(state, tmp_path / "c.safetensors")  # safetensors holds complex64
    code, out, err = sdconvert(capsys, "convert", tmp_path / "c.safetensors", tmp_path / "c.raw")
    assert (code, out) == (2, "") and "at extra/z: raw cannot hold dtype complex64" in one_line(err)
    code, _, err = sdconvert(capsys, "convert", tmp_path / "c.safetensors", tmp_path / "d", "--to", "rawdir")
    assert code == 2 and "at extra/z: rawdir cannot hold dtype complex64" in one_line(err)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # nothing written, not even a temp file


def test_a_raw_name_on_safetensors_bytes(plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any) -> None:
    source, _ = original
    converters.convert(source, tmp_path / "real.safetensors")
    shutil.copy(tmp_path / "real.safetensors", tmp_path / "liar.raw")
    message = "the name says raw but the contents are safetensors"
    with pytest.raises(converters.UnknownFormatError, match=f"liar.raw: {message}"):
        converters.read(tmp_path / "liar.raw")
    code, _, err = sdconvert(capsys, "inspect", tmp_path / "liar.raw")
    assert code == 2 and message in one_line(err)
    # The other way round: the plugin's sniff is asked too.
    converters.convert(source, tmp_path / "real.raw")
    shutil.copy(tmp_path / "real.raw", tmp_path / "liar.safetensors")
    with pytest.raises(converters.UnknownFormatError, match="the name says safetensors but the contents are raw"):
        converters.read(tmp_path / "liar.safetensors")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda data: data[:-1], "run past the end"),  # truncated: the last tensor is short
        (lambda data: data.replace(b'"offset":0,', b'"offset":99999999,', 1), "run past the end"),
        (lambda data: data.replace(b'"length":24,', b'"length":28,', 1), "bytes cannot hold float32[6]"),
        (lambda data: data.replace(b'"shape":[6]', b'"shape":[-6]', 1), "bad shape"),
        (lambda data: data.replace(b'"dtype":"f4"', b'"dtype":"c8"', 1), "unknown dtype code 'c8'"),
        (lambda data: b"RAW2" + data[4:], "no RAW1 header line"),
        (lambda data: data.replace(b'"tensor":"conv1.weight"', b'"tensor":"conv1.weighT"', 1), "not stored"),
        (lambda data: data[:5] + b"\x00" + data[6:], "header is not JSON"),
    ],
)
def test_bad_raw_files_are_refused_naming_the_file(
    plugins: Any, original: tuple[Path, Any], tmp_path: Path, damage: Callable[[bytes], bytes], expected: str
) -> None:
    good = converters.convert(original[0], tmp_path / "good.raw", select="model_state_dict")
    bad = tmp_path / "bad.raw"
    bad.write_bytes(damage(good.read_bytes()))
    assert bad.read_bytes() != good.read_bytes()
    with pytest.raises(converters.CorruptFileError, match=re.escape(str(bad)) + ".*" + re.escape(expected)):
        converters.read(bad)


# ---------------------------------------------------------------------------------------------
# The read-only commands on plugin files.


def test_inspect_schema_verify(plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any) -> None:
    source, _ = original
    raw = converters.convert(source, tmp_path / "c.raw")
    # inspect: the same listing as for the .pt, under a first line naming the plugin.
    code, out, err = sdconvert(capsys, "inspect", raw)
    _, pt_out, _ = sdconvert(capsys, "inspect", source)
    count = len(converters.read(source).unique_tensors())
    assert code == 0 and err == "" and out.startswith(f"{raw}: raw, ") and f", {count} tensors (" in out
    assert "1 more paths tied to them" in out and "conv1.weight  float32   [6, 3, 5, 5]" in out
    assert out.splitlines()[1:] == pt_out.splitlines()[1:]
    # inspect --json and schema: the manifest, with the digests the plugin stored.
    code, out, _ = sdconvert(capsys, "inspect", "--json", raw)
    manifest = json.loads(out)
    assert code == 0 and manifest == converters.manifest(raw) and manifest["file"]["format"] == "raw"
    assert manifest["tensors"] == converters.manifest(source)["tensors"]
    assert manifest["tree"] == converters.manifest(source)["tree"]
    assert sdconvert(capsys, "schema", raw) == (0, json.dumps(manifest, indent=2) + "\n", "")
    assert sdconvert(capsys, "schema", raw, "-o", tmp_path / "s.json") == (0, f"wrote {tmp_path / 's.json'}\n", "")
    assert json.loads((tmp_path / "s.json").read_text()) == manifest
    # verify, verify --deep (one file, and two).
    assert sdconvert(capsys, "verify", source, raw) == (0, f"bit-identical: {source} and {raw}\n", "")
    intact = f"intact: every stored digest of {raw} matches its tensor bytes\n"
    assert sdconvert(capsys, "verify", "--deep", raw) == (0, intact, "")
    # torch.save stores no digests: a deep check including it says so rather than "identical".
    code, out, _ = sdconvert(capsys, "verify", "--deep", source, raw)
    assert code == 1 and f"{source}: no stored digests for " in out and "cannot check them" in out
    # ... and what they say when a bit flips.
    flip_a_tensor_byte(raw, ("optimizer_state_dict", "state", 1, "momentum_buffer"))
    code, out, _ = sdconvert(capsys, "verify", "--deep", raw)
    assert code == 1 and f"{raw}: optimizer_state_dict/state/1/momentum_buffer: tensor bytes do not match" in out
    code, out, _ = sdconvert(capsys, "verify", source, raw)
    assert code == 1 and "optimizer_state_dict/state/1/momentum_buffer: 1 of 6 elements differ" in out


def test_formats_lists_the_plugin_and_its_option(plugins: Any, capsys: Any) -> None:
    code, out, err = sdconvert(capsys, "formats")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert any(re.fullmatch(r"raw +\.raw +toy plugin: a JSON header line, then aligned tensor bytes", x) for x in lines)
    assert any(re.fullmatch(r"rawdir +\(a folder\) +toy plugin: .*", line) for line in lines)
    assert any(re.fullmatch(r" +raw +--align +align +align each tensor to this many bytes", x) for x in lines)
    start = next(number for number, line in enumerate(lines) if line.startswith("dtype "))
    header = lines[start].split()
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 1 :] if line.strip()}
    assert header[-2:] == ["raw", "rawdir"]
    assert rows["float16"][-2:] == ["yes", "yes"] and rows["complex64"][-2:] == ["-", "-"]
    # convert --help shows the flag under the plugin's own heading.
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    assert re.search(r"raw output:\n +--align N +align each tensor to this many bytes", capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------
# The folder variant.


def test_the_folder_variant_converts_both_ways(
    plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any
) -> None:
    source, expected = original
    folder = converters.convert(source, tmp_path / "ckpt", dst_format="rawdir")
    names = sorted(p.name for p in folder.iterdir())
    assert INDEX_NAME in names and all(TENSOR_FILE.fullmatch(name) for name in names if name != INDEX_NAME)
    assert len(names) - 1 == len(converters.read(source).unique_tensors())  # a tied tensor once
    # Passed a folder, the converter finds the format by its layout.
    assert converters.read(folder).format == "rawdir" and converters.verify(source, folder) == []
    assert_same_as_torch(folder, expected)
    back = converters.convert(folder, tmp_path / "back.safetensors")
    assert converters.verify(source, back) == [] and converters.verify(folder, deep=True) == []
    assert_same_as_torch(back, expected)
    # The CLI: to the folder, from it (by content), to the other plugin, and inspect/verify of it.
    wrote = f"wrote {tmp_path / 'cli'}\n"
    assert sdconvert(capsys, "convert", back, tmp_path / "cli", "--to", "rawdir") == (0, wrote, "")
    assert sdconvert(capsys, "convert", tmp_path / "cli", tmp_path / "cli.raw", "--align", "16")[0] == 0
    assert_same_as_torch(tmp_path / "cli.raw", expected)
    code, out, _ = sdconvert(capsys, "inspect", tmp_path / "cli")
    assert code == 0 and out.startswith(f"{tmp_path / 'cli'}: rawdir, ")
    assert sdconvert(capsys, "verify", source, tmp_path / "cli")[0] == 0
    assert sdconvert(capsys, "verify", "--deep", tmp_path / "cli")[0] == 0
    # --select and --no-fsync into a folder.
    args = ("--to", "rawdir", "--select", "model_state_dict", "--no-fsync", "--quiet")
    assert sdconvert(capsys, "convert", source, tmp_path / "model", *args) == (0, "", "")
    assert_same_as_torch(tmp_path / "model", expected["model_state_dict"])


def test_the_folder_variant_replaces_only_its_own_folders(
    plugins: Any, original: tuple[Path, Any], tmp_path: Path, capsys: Any
) -> None:
    source, expected = original
    folder = tmp_path / "ckpt"
    assert sdconvert(capsys, "convert", source, folder, "--to", "rawdir", "--select", "model_state_dict")[0] == 0
    code, _, err = sdconvert(capsys, "convert", source, folder, "--to", "rawdir")
    assert code == 2 and one_line(err) == f"sdconvert: {folder}: exists; pass --force to replace it"
    # A folder holding only what the format writes is replaced with --force ...
    assert sdconvert(capsys, "convert", source, folder, "--to", "rawdir", "--force")[0] == 0
    assert_same_as_torch(folder, expected)
    # ... but not one holding a stranger's file: refused, and the folder left as it was.
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, _, err = sdconvert(capsys, "convert", source, folder, "--to", "rawdir", "--force", "--select", "epoch")
    assert code == 2
    refusal = f"sdconvert: {folder}: is a folder holding other files ('notes.txt'); refusing to replace it"
    assert one_line(err) == refusal
    with pytest.raises(converters.DestinationError, match="holding other files"):
        converters.convert(source, folder, dst_format="rawdir")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the staging folder was removed


def test_bad_rawdir_folders_are_refused(plugins: Any, original: tuple[Path, Any], tmp_path: Path) -> None:
    folder = converters.convert(original[0], tmp_path / "ckpt", dst_format="rawdir", select="model_state_dict")
    index = folder / INDEX_NAME
    good = index.read_text()
    index.write_text(good.replace('"file": "t00000.bin"', '"file": "../t00000.bin"'))
    with pytest.raises(converters.UnsafeFileError, match=f"{re.escape(str(index))}: tensor 'conv1.weight'"):
        converters.read(folder)
    index.write_text(good)
    (folder / "t00001.bin").unlink()
    with pytest.raises(converters.CorruptFileError, match=r"tensor 'conv1.bias': t00001\.bin is missing"):
        converters.read(folder)
    (folder / "t00001.bin").write_bytes(bytes(20))
    with pytest.raises(converters.CorruptFileError, match=r"'conv1\.bias': bytes \[0, 24\) run past the end \(20\)"):
        converters.read(folder)
    (folder / "t00001.bin").write_bytes(bytes(28))  # trailing bytes are refused too
    with pytest.raises(converters.CorruptFileError, match=r"t00001\.bin has 28 bytes, not 24"):
        converters.read(folder)


# ---------------------------------------------------------------------------------------------
# The README's other way to ship a plugin: the entry-point group, in a fresh process.


def test_an_entry_point_plugin_works_in_the_installed_cli(original: tuple[Path, Any], tmp_path: Path) -> None:
    # A minimal installed distribution whose entry point names the class (the README's
    # `raw = "mypkg.raw:RawFormat"`), found through PYTHONPATH by importlib.metadata.
    dist = tmp_path / "site" / "rawplugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rawplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[statedict_convert.formats]\nraw = test_plugin_from_readme:RawFormat\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(Path(__file__).parent)])}

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(ROOT / "cli.py"), *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    listed = run("formats")
    assert listed.returncode == 0 and re.search(r"^ +raw +--align", listed.stdout, re.M), listed.stderr
    made = run("convert", original[0], tmp_path / "c.raw", "--align", "32")
    assert (made.returncode, made.stderr) == (0, ""), made.stderr
    assert raw_header(tmp_path / "c.raw")[1]["align"] == 32
    checked = run("verify", "--deep", tmp_path / "c.raw")
    assert checked.returncode == 0, checked.stdout + checked.stderr
