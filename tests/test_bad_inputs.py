"""A table of bad inputs with the exact error each gives; nothing half-written, nothing executed."""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import converters
from converters.core.errors import CorruptFileError, UnknownFormatError, UnsafeFileError, UnsupportedValueError

# ---------------------------------------------------------------- builders of hostile files


def safetensors_bytes(header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def torch_zip(entries: dict[str, bytes], *, duplicate: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if duplicate:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                archive.writestr(duplicate, b"again")
    return buffer.getvalue()


def pickle_zip(pickled: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    entries = {"archive/data.pkl": pickled, "archive/byteorder": b"little"}
    entries.update({f"archive/data/{key}": data for key, data in (storages or {}).items()})
    return torch_zip(entries)


def tensor_pickle(numel_in_record: int, size: tuple[int, ...], storage_key: str = "0") -> bytes:
    """A hand-written pickle of {'w': float32 tensor} in the exact shape torch.save writes."""
    dims = b"".join(b"K" + bytes([d]) for d in size)
    strides, step = [], 1
    for dim in reversed(size):
        strides.append(step)
        step *= dim
    stride = b"".join(b"K" + bytes([s]) for s in reversed(strides))
    return (
        b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
        b"ctorch\nFloatStorage\nX"
        + struct.pack("<I", len(storage_key))
        + storage_key.encode()
        + b"X\x03\x00\x00\x00cpuK"
        + bytes([numel_in_record])
        + b"tQK\x00("
        + dims
        + b"t("
        + stride
        + b"t\x89ccollections\nOrderedDict\n)RtRu."
    )


def forge_record_size(archive: bytes) -> bytes:
    """The central directory says data/0 holds nearly 4 GiB; the file is a few hundred bytes."""
    name = b"archive/data/0"
    entry = archive.rindex(b"PK\x01\x02", 0, archive.rindex(name))
    forged = struct.pack("<II", 0xFFFFFF00, 0xFFFFFF00)  # compressed and uncompressed sizes
    return archive[: entry + 20] + forged + archive[entry + 28 :]


GLOBAL_OS_SYSTEM = b"\x80\x02cos\nsystem\nX\x0a\x00\x00\x00echo pwned\x85R."
STACK_GLOBAL_EVAL = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x8c\x051 + 1\x85R."
INST_OPCODE = b"(ibuiltins\nlist\n."
HUGE_MEMO_INDEX = b"\x80\x02}r\xff\xff\xff\xff."
NESTED_ATTRIBUTE_GLOBAL = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2.__globals__\n."

# ---------------------------------------------------------------- the table

CASES: list[tuple[str, str, Callable[[], bytes], type[Exception], str]] = [
    # id, file name, bytes, error type, message (regex, after the file name)
    (
        "junk-pt",
        "x.pt",
        lambda: b"\x13\x37junk" * 50,
        CorruptFileError,
        "not a readable zip archive: File is not a zip file",
    ),
    ("empty-pt", "x.pt", lambda: b"", CorruptFileError, "not a readable zip archive"),
    (
        "os-system",
        "x.pt",
        lambda: pickle_zip(GLOBAL_OS_SYSTEM),
        UnsafeFileError,
        r"data.pkl asks for the global os.system at byte 2, which can run code; refusing to run pickled code",
    ),
    (
        "stack-global-eval",
        "x.pt",
        lambda: pickle_zip(STACK_GLOBAL_EVAL),
        UnsafeFileError,
        r"data.pkl asks for the global builtins.eval, which can run code; refusing to run pickled code",
    ),
    (
        "dunder-attribute",
        "x.pt",
        lambda: pickle_zip(NESTED_ATTRIBUTE_GLOBAL),
        UnsafeFileError,
        r"data.pkl asks for the global torch._utils._rebuild_tensor_v2.__globals__ at byte 2, which can run code",
    ),
    (
        "inst-opcode",
        "x.pt",
        lambda: pickle_zip(INST_OPCODE),
        UnsafeFileError,
        r"data.pkl uses the pickle opcode INST at byte 1, which plain tensor data never needs",
    ),
    (
        "huge-memo",
        "x.pt",
        lambda: pickle_zip(HUGE_MEMO_INDEX),
        CorruptFileError,
        r"data.pkl has a memo index 4294967295 at byte 3",
    ),
    (
        "pickle-garbage",
        "x.pt",
        lambda: pickle_zip(b"\x80\x02}q\x00(X\xff\xff"),
        CorruptFileError,
        r"data.pkl is not a valid pickle",
    ),
    (
        "missing-storage",
        "x.pt",
        lambda: pickle_zip(tensor_pickle(4, (2, 2))),
        CorruptFileError,
        r"data.pkl refers to storage '0', but there is no record data/0",
    ),
    (
        "storage-too-small",
        "x.pt",
        lambda: pickle_zip(tensor_pickle(4, (2, 2)), {"0": b"\x00" * 8}),
        CorruptFileError,
        r"a float32\[2, 2\] tensor needs 16 bytes of storage '0', which holds 8",
    ),
    (
        "two-data-pkl",
        "x.pt",
        lambda: torch_zip({"a/data.pkl": b"\x80\x02N.", "b/data.pkl": b"\x80\x02N."}),
        CorruptFileError,
        r"expected one <archive>/data.pkl record in the zip, found 2",
    ),
    (
        "record-outside-archive",
        "x.pt",
        lambda: torch_zip({"archive/data.pkl": b"\x80\x02N.", "../evil": b"x"}),
        CorruptFileError,
        r"zip record '../evil' lies outside the archive folder 'archive/'",
    ),
    (
        "duplicate-record",
        "x.pt",
        lambda: torch_zip({"archive/data.pkl": b"\x80\x02N."}, duplicate="archive/data.pkl"),
        CorruptFileError,
        r"zip entry 'archive/data.pkl' appears twice",
    ),
    (
        "subprocess-popen",
        "x.pt",
        lambda: pickle_zip(b"\x80\x02csubprocess\nPopen\nX\x02\x00\x00\x00ls\x85R."),
        UnsafeFileError,
        r"data.pkl asks for the global subprocess.Popen at byte 2, which can run code; refusing to run pickled code",
    ),
    (
        "getattr-chain",
        "x.pt",
        lambda: pickle_zip(b"\x80\x02cbuiltins\ngetattr\nccollections\nOrderedDict\nX\x08\x00\x00\x00__init__\x86R."),
        UnsafeFileError,
        r"data.pkl asks for the global builtins.getattr at byte 2, which can run code; refusing to run pickled code",
    ),
    (
        "rebuild-wrong-args",
        "x.pt",
        lambda: pickle_zip(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(X\x01\x00\x00\x00aK\x00K\x00K\x00\x89NtR."),
        CorruptFileError,
        r"_rebuild_tensor_v2 needs a typed storage",
    ),
    (
        "forged-record-size",
        "x.pt",
        lambda: forge_record_size(pickle_zip(tensor_pickle(4, (2, 2)), {"0": b"\x00" * 16})),
        CorruptFileError,
        r"zip entry 'archive/data/0' declares 4294967040 bytes at offset \d+, beyond the file's \d+ bytes",
    ),
    (
        "json-depth-bomb",
        "x.safetensors",
        lambda: safetensors_bytes(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        CorruptFileError,
        r"the safetensors header is nested too deeply",
    ),
    (
        "overflowing-dims",
        "x.safetensors",
        lambda: safetensors_bytes({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 0]}}),
        CorruptFileError,
        r"tensor 'a': F32\[4611686018427387904, 4611686018427387904\] needs 85070591730234615865843651857942052864 bytes, data_offsets span 0",
    ),
    (
        "tiny-safetensors",
        "x.safetensors",
        lambda: b"abc",
        CorruptFileError,
        r"file is 3 bytes; a safetensors file starts with an 8-byte header length",
    ),
    (
        "header-too-long",
        "x.safetensors",
        lambda: safetensors_bytes(b"{}", length=2**40),
        CorruptFileError,
        r"header length 1099511627776 exceeds the 100000000-byte limit",
    ),
    (
        "header-past-end",
        "x.safetensors",
        lambda: safetensors_bytes(b"{}", length=1000),
        CorruptFileError,
        r"header length 1000 runs past the end of the 10-byte file",
    ),
    (
        "header-not-json",
        "x.safetensors",
        lambda: safetensors_bytes(b"{nope"),
        CorruptFileError,
        r"the safetensors header is not valid JSON: Expecting property name enclosed in double quotes at char 1",
    ),
    (
        "header-bad-utf8",
        "x.safetensors",
        lambda: safetensors_bytes(b'{"\xff": 1}'),
        CorruptFileError,
        r"the safetensors header is not valid UTF-8 \(invalid start byte at byte 2\)",
    ),
    (
        "header-duplicate-key",
        "x.safetensors",
        lambda: safetensors_bytes(
            b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            b"x",
        ),
        CorruptFileError,
        r"the safetensors header has the key 'a' twice",
    ),
    (
        "overlap",
        "x.safetensors",
        lambda: safetensors_bytes(
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            b"xyz",
        ),
        CorruptFileError,
        r"tensor 'b': an overlap in the data \(starts at 1, expected 2\)",
    ),
    (
        "gap",
        "x.safetensors",
        lambda: safetensors_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"xy"),
        CorruptFileError,
        r"tensor 'a': a gap in the data \(starts at 1, expected 0\)",
    ),
    (
        "size-mismatch",
        "x.safetensors",
        lambda: safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"abcd"),
        CorruptFileError,
        r"tensor 'a': F32\[2\] needs 8 bytes, data_offsets span 4",
    ),
    (
        "trailing-bytes",
        "x.safetensors",
        lambda: safetensors_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"xEXTRA"),
        CorruptFileError,
        r"trailing bytes after the tensor data \(header says \d+ bytes, file has \d+\)",
    ),
    (
        "truncated-data",
        "x.safetensors",
        lambda: safetensors_bytes({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"xy"),
        CorruptFileError,
        r"the file ends before the tensor data",
    ),
    (
        "unknown-dtype",
        "x.safetensors",
        lambda: safetensors_bytes({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"x" * 16),
        UnsupportedValueError,
        r"tensor 'a': unknown safetensors dtype 'F128'",
    ),
    (
        "negative-dim",
        "x.safetensors",
        lambda: safetensors_bytes({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}),
        CorruptFileError,
        r"tensor 'a': shape must be a list of non-negative ints, found \[-1\]",
    ),
    (
        "tree-names-missing-tensor",
        "x.safetensors",
        lambda: safetensors_bytes({"__metadata__": {"sdconvert.tree": '{"dict":[["w",{"tensor":"nope"}]]}'}}),
        CorruptFileError,
        r"at w: the tree refers to tensor 'nope', which the header lacks",
    ),
    (
        "tensor-outside-tree",
        "x.safetensors",
        lambda: safetensors_bytes(
            {
                "__metadata__": {"sdconvert.tree": '{"dict":[]}'},
                "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            },
            b"x",
        ),
        CorruptFileError,
        r"header tensor 'a' is not part of the stored tree",
    ),
    (
        "tree-bad-node",
        "x.safetensors",
        lambda: safetensors_bytes({"__metadata__": {"sdconvert.tree": '{"dict":[["x",{"float":1}]]}'}}),
        CorruptFileError,
        r"at x: 'float' node must hold a JSON float or '0x' \+ 16 hex digits, found 1",
    ),
    (
        "wrong-suffix",
        "x.pt",
        lambda: safetensors_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x"),
        UnknownFormatError,
        r"the name says pt but the contents are safetensors; pass --from safetensors",
    ),
    (
        "unknown-suffix",
        "x.weights",
        lambda: b"nothing we know",
        UnknownFormatError,
        r"cannot recognise the format from the name or contents; pass a format explicitly "
        r"\(known: safetensors \(.safetensors .safetensors.index.json\), pt \(.pt .pth .bin .ckpt .pth.tar .bin.index.json\), msgpack \(.msgpack\), onnx \(.onnx\), dcp \(a folder\), gguf \(.gguf\), npz \(.npz .npy\)\)",
    ),
]


@pytest.mark.parametrize(("name", "data", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_its_exact_error(
    tmp_path: Path, name: str, data: Callable[[], bytes], error: type[Exception], message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data())
    where = re.escape(str(path)) + (" " if message.startswith("at ") else ": ")
    with pytest.raises(error, match=where + message):
        converters.read(path)
    # Conversions stop at the same point and leave nothing behind.
    with pytest.raises(error):
        converters.convert(path, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(converters.ConverterError, match=r"nothing\.pt: no such file"):
        converters.read(tmp_path / "nothing.pt")


def test_unknown_format_name(tmp_path: Path) -> None:
    with pytest.raises(
        UnknownFormatError, match="unknown format 'xyz'; known formats: safetensors, pt, msgpack, onnx, dcp, gguf"
    ):
        converters.save({"a": torch.ones(1)}, tmp_path / "a.bin", format="xyz")


def test_write_refuses_dtype_the_format_cannot_hold(tmp_path: Path) -> None:
    destination = tmp_path / "c.safetensors"
    with pytest.raises(UnsupportedValueError, match=r"at z/1: safetensors cannot hold dtype complex128"):
        converters.save({"z": [torch.ones(1), torch.ones(2, dtype=torch.complex128)]}, destination)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"a": object()}, r"at a: cannot represent a value of type builtins.object"),
        ({"a": [range(3)]}, r"at a/0: cannot represent a value of type builtins.range"),
        ({(1, 2): 3}, r"at <root>: dict keys must be str or int, found tuple key \(1, 2\)"),
        ({True: 3}, r"dict keys must be str or int, found bool key True"),
        ({"b": [1j, Exception()]}, r"at b/1: cannot represent a value of type builtins.Exception"),
    ],
)
def test_unrepresentable_values_are_refused_with_their_path(tmp_path: Path, tree: object, message: str) -> None:
    with pytest.raises(UnsupportedValueError, match=message):
        converters.save(tree, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_sparse_tensor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError, match=r"at s: only dense strided tensors can be converted"):
        converters.save({"s": torch.eye(2).to_sparse()}, tmp_path / "x.pt")


def test_pickle_global_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("os.system", lambda command: calls.append(command))
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle_zip(GLOBAL_OS_SYSTEM))
    with pytest.raises(UnsafeFileError):
        converters.read(path)
    assert calls == []
    # ... while the same bytes do call os.system under a plain unpickler: the case is real.
    pickle.loads(GLOBAL_OS_SYSTEM)
    assert calls == ["echo pwned"]
