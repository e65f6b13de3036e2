"""Hostile ``.pt`` files (issue 12): one row per case, each refused with a ``ConverterError`` (exit 2
at the command line: one line on stderr, no traceback, nothing written), within the memory bar
(peak RSS <= 2 x the input's size + 100 MB), plus the integrity of real ``torch.save`` files.

Classes: inert stand-ins (BUILD/SETITEM(S)/APPEND(S) act on plain containers only), big integers,
resource bounds (pickle objects, zip entries, gathered and overlapping views, inflated bytes),
integrity (zip CRC-32 of every record, deflated records, appended or hidden bytes).
"""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bit_identical, tensor_bytes

import converters
from converters.codecs.torch_archive import read_archive
from converters.core.errors import ConverterError, CorruptFileError, UnsafeFileError, UnsupportedValueError

CLI = Path(__file__).resolve().parent.parent / "cli.py"
MB = 1 << 20

# ------------------------------------------------------------------------------ pickle builders

PROTO = b"\x80\x02"


def text(value: str) -> bytes:
    """BINUNICODE."""
    encoded = value.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def small(value: int) -> bytes:
    """BININT1 / BININT (non-negative)."""
    return b"K" + bytes([value]) if value < 256 else b"J" + struct.pack("<i", value)


def ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(small(v) for v in values) + b"t"


def tensor(
    key: str = "0",
    size: tuple[int, ...] = (4,),
    stride: tuple[int, ...] = (1,),
    offset: int = 0,
    storage: str = "FloatStorage",
    numel: int = 4,
) -> bytes:
    """The opcodes torch.save writes for one tensor (``_rebuild_tensor_v2``), leaving it on the stack."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + text("storage")
        + b"ctorch\n"
        + storage.encode()
        + b"\n"
        + text(key)
        + text("cpu")
        + small(numel)
        + b"tQ"
        + small(offset)
        + ints(size)
        + ints(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def mapping(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}(" + b"".join(key + value for key, value in pairs) + b"u"


def pickled(body: bytes) -> bytes:
    return PROTO + body + b"."


# --------------------------------------------------------------------------------- zip builders


def zip_of(entries: dict[str, bytes], *, method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def pt_of(pickle_bytes: bytes, storages: dict[str, bytes] | None = None, *, method: int = zipfile.ZIP_STORED) -> bytes:
    entries = {"archive/data.pkl": pickle_bytes, "archive/byteorder": b"little"}
    entries.update({f"archive/data/{key}": data for key, data in (storages or {}).items()})
    return zip_of(entries, method=method)


def one_tensor(body: bytes, nbytes: int = 16) -> bytes:
    """A .pt whose pickle is ``body`` and whose storage '0' holds ``nbytes`` bytes."""
    return pt_of(pickled(body), {"0": bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256)})


def many_entries(count: int) -> bytes:
    """A zip of ``count`` empty stored entries (and a data.pkl), built by hand: zipfile takes seconds."""
    local, central, offset = [], [], 0
    names = [b"archive/data.pkl"] + [b"archive/e%d" % i for i in range(count)]
    for index, name in enumerate(names):
        data = b"\x80\x02N." if index == 0 else b""
        crc = zlib.crc32(data)
        local.append(
            struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 33, crc, len(data), len(data), len(name), 0)
        )
        local.append(name + data)
        central.append(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                *(b"PK\x01\x02", 20, 20, 0, 0, 0, 33, crc, len(data), len(data), len(name), 0, 0, 0, 0, 0, offset),
            )
            + name
        )
        offset += 30 + len(name) + len(data)
    directory = b"".join(central)
    total = len(names)
    z64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, total, total, len(directory), offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, offset + len(directory), 1)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, len(directory), offset, 0)
    return b"".join(local) + directory + z64 + locator + end


def with_eocd_count(archive: bytes, count: int) -> bytes:
    """The end record claims ``count`` entries (the central directory is unchanged)."""
    at = archive.rindex(b"PK\x05\x06")
    return archive[: at + 8] + struct.pack("<HH", count, count) + archive[at + 12 :]


def shared_levels(levels: int) -> bytes:
    """[L, L] where L = [M, M], M = [...]: 2**levels leaves as walked, a few bytes per level."""
    body = b"]q\x00K\x01a"  # memo 0: [1]
    for level in range(1, levels + 1):
        body += b"](h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"eq" + bytes([level])
    return pickled(body)


def views_of_one_storage(count: int, storage_bytes: int, *, step: int, stride0: bool = False) -> bytes:
    """{i: view i} where every view is a distinct (offset) view of one storage: contiguous views of
    nearly all of it, or (stride0) a stride-0 expansion of each element to ``step`` copies."""
    numel = storage_bytes // 4
    pairs = []
    for index in range(count):
        if stride0:
            view = tensor(size=(step, 1), stride=(0, 1), offset=index % numel, numel=numel)
        else:
            view = tensor(size=(numel - index,), offset=index, numel=numel)
        pairs.append((small(index), view))
    return pt_of(pickled(mapping(*pairs)), {"0": os.urandom(storage_bytes)})


def appended(data: bytes, extra: bytes = b"garbage") -> bytes:
    return data + extra


def deflated_bomb(size: int, name: str = "archive/data/0") -> bytes:
    """A record declaring ``size`` inflated bytes (zeros) in a deflate stream of a few hundred KB;
    the pickle views it whole when it is the storage."""
    body = mapping((text("w"), tensor(size=(size // 4,), numel=size // 4))) if name.endswith("/0") else b"N"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickled(body))
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as record:
            chunk = bytes(MB)
            for _ in range(size // MB):
                record.write(chunk)
    return buffer.getvalue()


def overlapping_entries() -> bytes:
    """Two central directory entries naming the same local header and bytes."""
    archive = pt_of(pickled(b"N"), {"0": b"x" * 64})
    directory = archive.index(b"PK\x01\x02")
    entries = [m.start() for m in re.finditer(b"PK\x01\x02", archive)]
    end = archive.rindex(b"PK\x05\x06")
    last = archive[entries[-1] : end]
    # a copy of the last entry, renamed, pointing at the same local header
    renamed = last.replace(b"archive/data/0", b"archive/data/1")
    new_directory = archive[directory:end] + renamed
    eocd = bytearray(archive[end:])
    count = struct.unpack_from("<H", eocd, 8)[0] + 1
    struct.pack_into("<HHI", eocd, 8, count, count, len(new_directory))
    return archive[:directory] + new_directory + bytes(eocd)


def hidden_bytes_between_entries() -> bytes:
    """Bytes inserted between two entries, offsets in the central directory shifted to match."""
    archive = pt_of(pickled(b"N"))
    second = archive.index(b"PK\x03\x04", 1)
    hidden = b"HIDDEN" * 10
    data = archive[:second] + hidden + archive[second:]
    directory = data.index(b"PK\x01\x02")
    out = bytearray(data)
    for match in re.finditer(b"PK\x01\x02", data):
        offset = struct.unpack_from("<I", out, match.start() + 42)[0]
        if offset >= second:
            struct.pack_into("<I", out, match.start() + 42, offset + len(hidden))
    end = data.rindex(b"PK\x05\x06")
    struct.pack_into("<I", out, end + 16, directory)
    return bytes(out)


def method(data: bytes, name: bytes, new_method: int) -> bytes:
    """Rewrite the compression method of an entry (central and local headers)."""
    out = bytearray(data)
    for match in re.finditer(b"PK\x01\x02", data):
        if data[match.start() + 46 : match.start() + 46 + len(name)] == name:
            struct.pack_into("<H", out, match.start() + 10, new_method)
    for match in re.finditer(b"PK\x03\x04", data):
        if data[match.start() + 30 : match.start() + 30 + len(name)] == name:
            struct.pack_into("<H", out, match.start() + 8, new_method)
    return bytes(out)


def flip_in_record(data: bytes, name: bytes) -> bytes:
    """Flip one bit in the middle of a stored record's bytes."""
    header = next(
        match.start()
        for match in re.finditer(b"PK\x03\x04", data)
        if data[match.start() + 30 : match.start() + 30 + len(name)] == name
    )
    name_len, extra_len = struct.unpack_from("<HH", data, header + 26)
    size = struct.unpack_from("<I", data, header + 18)[0]
    position = header + 30 + name_len + extra_len + size // 2
    out = bytearray(data)
    out[position] ^= 0x10
    return bytes(out)


# ---------------------------------------------------------------------------------- the table

TENSOR_W = tensor()
Case = tuple[str, Callable[[], bytes], type[ConverterError], str]

CASES: list[Case] = [
    # -- class 5: the opcodes that mutate act on plain containers only
    (
        "build-on-tensor",
        lambda: one_tensor(mapping((text("w"), TENSOR_W + mapping((text("shape"), ints((1,)))) + b"b"))),
        UnsafeFileError,
        "data.pkl applies BUILD to a tensor; only an OrderedDict's _metadata may be set that way",
    ),
    (
        "build-on-rebuild-function",
        lambda: one_tensor(b"ctorch._utils\n_rebuild_tensor_v2\n" + mapping((text("__code__"), small(1))) + b"b"),
        UnsafeFileError,
        "data.pkl applies BUILD to the stand-in for torch._utils._rebuild_tensor_v2",
    ),
    (
        "build-on-ordereddict-class",
        lambda: one_tensor(b"ccollections\nOrderedDict\n" + mapping((text("x"), small(1))) + b"b"),
        UnsafeFileError,
        "data.pkl applies BUILD to the stand-in for collections.OrderedDict",
    ),
    (
        "build-on-storage",
        lambda: one_tensor(
            b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + small(4) + b"tQ"
            b"(" + text("x") + small(1) + b"d" + b"b"
        ),
        UnsafeFileError,
        "data.pkl applies BUILD to a storage",
    ),
    (
        "build-on-storage-type",
        lambda: one_tensor(b"ctorch\nFloatStorage\n" + mapping((text("dtype"), b"N")) + b"b"),
        UnsafeFileError,
        "data.pkl applies BUILD to a storage type",
    ),
    (
        "build-on-dtype",
        lambda: one_tensor(b"ctorch\nfloat32\n(" + text("float64") + b"tb"),
        UnsafeFileError,
        "data.pkl applies BUILD to the global torch.float32",
    ),
    (
        "build-on-dict",
        lambda: one_tensor(b"}" + mapping((text("x"), small(1))) + b"b"),
        UnsafeFileError,
        "data.pkl applies BUILD to a dict",
    ),
    (
        "build-ordereddict-other-attribute",
        lambda: one_tensor(b"ccollections\nOrderedDict\n)R" + mapping((text("extend"), small(1))) + b"b"),
        UnsupportedValueError,
        "data.pkl's BUILD gives an OrderedDict a dict of attributes; only _metadata is kept",
    ),
    (
        "build-ordereddict-slot-state",
        lambda: one_tensor(b"ccollections\nOrderedDict\n)RN" + mapping((text("_metadata"), b"}")) + b"\x86b"),
        UnsupportedValueError,
        "data.pkl's BUILD gives an OrderedDict a tuple of attributes",
    ),
    (
        "metadata-holds-tensor",
        lambda: one_tensor(b"ccollections\nOrderedDict\n)R" + mapping((text("_metadata"), TENSOR_W)) + b"b"),
        UnsupportedValueError,
        "data.pkl gives an OrderedDict a _metadata that holds a tensor",
    ),
    (
        "setitems-on-tensor",
        lambda: one_tensor(TENSOR_W + b"(" + text("shape") + small(1) + b"u"),
        UnsafeFileError,
        "data.pkl applies SETITEMS to a tensor; only a dict, OrderedDict or Counter takes items",
    ),
    (
        "setitems-on-list",
        lambda: one_tensor(b"](" + small(0) + small(1) + b"u"),
        UnsafeFileError,
        "data.pkl applies SETITEMS to a list",
    ),
    (
        "setitem-on-tuple",
        lambda: one_tensor(b")" + small(0) + small(1) + b"s"),
        UnsafeFileError,
        "data.pkl applies SETITEM to a tuple",
    ),
    (
        "setitem-on-stand-in",
        lambda: one_tensor(b"ctorch._utils\n_rebuild_tensor_v2\n" + text("__call__") + small(1) + b"s"),
        UnsafeFileError,
        "data.pkl applies SETITEM to the stand-in for torch._utils._rebuild_tensor_v2",
    ),
    (
        "appends-on-tuple",
        lambda: one_tensor(b")(" + small(1) + b"e"),
        UnsafeFileError,
        "data.pkl applies APPENDS to a tuple; only a list takes appended items",
    ),
    (
        "append-on-tensor",
        lambda: one_tensor(TENSOR_W + small(1) + b"a"),
        UnsafeFileError,
        "data.pkl applies APPEND to a tensor",
    ),
    (
        "appends-on-ordereddict",
        lambda: one_tensor(b"ccollections\nOrderedDict\n)R(" + small(1) + b"e"),
        UnsafeFileError,
        "data.pkl applies APPENDS to an OrderedDict",
    ),
    (
        "reduce-on-dict",
        lambda: one_tensor(b"})R"),
        UnsafeFileError,
        "data.pkl calls a dict; only rebuild functions and the classes GLOBAL names are called",
    ),
    (
        "tuple-dict-key",
        lambda: one_tensor(b"}" + ints((1, 2)) + small(1) + b"s"),
        UnsupportedValueError,
        "data.pkl uses a tuple as a dict key; keys must be str or int",
    ),
    # -- class 4: integers past Python's int-to-str limit are refused at once (exit 2, not 3)
    (
        "long4-10MB",
        lambda: pt_of(PROTO + b"\x8b" + struct.pack("<i", 10 * MB) + b"\x01" * (10 * MB) + b"."),
        UnsupportedValueError,
        "data.pkl holds an integer of more than 4300 decimal digits at byte 2",
    ),
    (
        "long4-just-past-the-limit",
        lambda: pt_of(pickled(b"\x8b" + struct.pack("<i", 1786) + b"\xff" * 1785 + b"\x7f")),
        UnsupportedValueError,
        "holds an integer of more than 4300 decimal digits",
    ),
    (
        "long-text-hex",
        lambda: pt_of(pickled(b"L0x" + b"f" * 4000 + b"L\n")),
        UnsupportedValueError,
        "holds an integer of more than 4300 decimal digits",
    ),
    (
        "int-text-5000-digits",
        lambda: pt_of(pickled(b"I" + b"9" * 5000 + b"\n")),
        UnsupportedValueError,
        "holds an integer of more than 4300 decimal digits",
    ),
    (
        "long4-negative-length",
        lambda: pt_of(pickled(b"\x8b" + struct.pack("<i", -5))),
        CorruptFileError,
        "data.pkl has a negative length at byte 2",
    ),
    # -- class 1: what the pickle asks for is charged before it is built
    (
        "empty-dicts-2MB",
        lambda: pt_of(PROTO + b"(" + b"}" * (2 * MB) + b"l."),
        CorruptFileError,
        r"would need more than \d+ MiB of memory to read \(pickle containers\)",
    ),
    (
        "dup-references-8MB",
        lambda: pt_of(PROTO + b"(}" + b"2" * (8 * MB) + b"l."),
        CorruptFileError,
        r"would need more than \d+ MiB of memory to read \(pickle references\)",
    ),
    (
        "marks-2MB",
        lambda: pt_of(PROTO + b"(" * (2 * MB) + b"N."),
        CorruptFileError,
        r"would need more than \d+ MiB of memory to read \(pickle values\)",
    ),
    (
        "memoize-2MB",
        lambda: pt_of(b"\x80\x04N" + b"\x94" * (2 * MB) + b"."),
        CorruptFileError,
        r"would need more than \d+ MiB of memory to read \(pickle values\)",
    ),
    (
        "shared-containers-2**60",
        lambda: pt_of(shared_levels(60)),
        CorruptFileError,
        r"holds more than 50000000 values repeated by reference \(shared containers\)",
    ),
    (
        "list-contains-itself",
        lambda: pt_of(pickled(b"]q\x00h\x00a")),
        CorruptFileError,
        "data.pkl builds a container that contains itself",
    ),
    (
        "nested-300-deep",
        lambda: pt_of(pickled(b"]" * 300 + b"a" * 299)),
        CorruptFileError,
        "data.pkl nests containers deeper than 256 levels",
    ),
    (
        "rank-65-tensor",
        lambda: one_tensor(tensor(size=(1,) * 65, stride=(1,) * 65)),
        CorruptFileError,
        "tensor in storage '0' has malformed size/stride/offset",
    ),
    (
        "zip-300k-entries",
        lambda: many_entries(300_000),
        CorruptFileError,
        r"would need more than \d+ MiB of memory to read \(zip central directory\)",
    ),
    (
        "zip-count-lies",
        lambda: with_eocd_count(pt_of(pickled(b"N")), 60000),
        CorruptFileError,
        r"the zip archive declares 60000 entries in a \d+-byte central directory, which has room for 2",
    ),
    (
        "stride0-views-add-up",
        # 300 views, each a stride-0 expansion to 256 KiB (under the old per-view cap of 4x the
        # file + 1 MiB), of one 4 KiB storage: 75 MiB gathered in total.
        lambda: views_of_one_storage(300, 4096, step=64 * 1024, stride0=True),
        CorruptFileError,
        r"would need more than \d+ MiB of memory to read \(tensor bytes gathered into memory \(strided views\)\)",
    ),
    (
        "overlapping-views-200MB",
        lambda: views_of_one_storage(200, MB, step=1),
        CorruptFileError,
        r"names \d+ bytes of tensor bytes viewed more than once in storage '0' from a \d+-byte input",
    ),
    (
        "deflated-bomb-96MB",
        lambda: deflated_bomb(96 * MB),
        CorruptFileError,
        r"names \d+ bytes of data inflated from zip record 'archive/data/0'",
    ),
    (
        "deflated-bomb-in-another-record",
        lambda: deflated_bomb(96 * MB, "archive/extra"),
        CorruptFileError,
        r"names \d+ bytes of data inflated from zip record 'archive/extra'",
    ),
    # -- class 2: integrity of the zip itself
    (
        "appended-garbage",
        lambda: appended(one_tensor(mapping((text("w"), TENSOR_W)))),
        CorruptFileError,
        r"7 bytes follow the end of the zip archive \(its end-of-central-directory record and comment\)",
    ),
    (
        "appended-zip",
        lambda: appended(one_tensor(b"N"), pt_of(pickled(b"N"))),
        CorruptFileError,
        r"does not end where the end records start",
    ),
    (
        "prefixed-bytes",
        lambda: b"MZ-stub-" + one_tensor(b"N"),
        CorruptFileError,
        "does not end where the end records start",
    ),
    (
        "hidden-bytes-between-entries",
        hidden_bytes_between_entries,
        CorruptFileError,
        "60 unaccounted bytes lie between zip entry 'archive/data.pkl' and zip entry 'archive/byteorder'",
    ),
    (
        "overlapping-entries",
        overlapping_entries,
        CorruptFileError,
        "overlaps zip entry 'archive/data/0'",
    ),
    (
        "flipped-bit-in-data-pkl",
        lambda: flip_in_record(one_tensor(mapping((text("weight"), TENSOR_W))), b"archive/data.pkl"),
        CorruptFileError,
        r"zip record 'archive/data.pkl' does not match its CRC-32 \(stored [0-9a-f]{8}, bytes give [0-9a-f]{8}\)",
    ),
    (
        "flipped-bit-in-byteorder",
        lambda: flip_in_record(one_tensor(b"N"), b"archive/byteorder"),
        CorruptFileError,
        r"zip record 'archive/byteorder' does not match its CRC-32",
    ),
    (
        "bzip2-record",
        lambda: method(one_tensor(mapping((text("w"), TENSOR_W))), b"archive/data/0", 12),
        UnsupportedValueError,
        "zip record 'archive/data/0' uses compression method 12; only stored and deflated records are read",
    ),
    (
        "deflated-record-lies-about-size",
        lambda: method_size(
            pt_of(pickled(mapping((text("w"), TENSOR_W))), {"0": bytes(16)}, method=zipfile.ZIP_DEFLATED)
        ),
        CorruptFileError,
        r"zip record 'archive/data/0' \(deflated\): it inflates to more than the 8 bytes it declares",
    ),
]


def method_size(data: bytes) -> bytes:
    """The central directory says archive/data/0 inflates to 8 bytes (it holds 16); the pickle asks for 8."""
    out = bytearray(data.replace(small(4) + b"tQ", small(2) + b"tQ").replace(b"(K\x04t(K\x01t", b"(K\x02t(K\x01t"))
    name = b"archive/data/0"
    for match in re.finditer(b"PK\x01\x02", bytes(out)):
        if out[match.start() + 46 : match.start() + 46 + len(name)] == name:
            struct.pack_into("<I", out, match.start() + 24, 8)
    # data.pkl changed: its CRC-32 too (central and local headers)
    return _fix_crc(bytes(out), b"archive/data.pkl")


def _fix_crc(data: bytes, name: bytes) -> bytes:
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(name.decode())
        content = (
            zlib.decompress(
                data[info.header_offset + 30 + len(name) : info.header_offset + 30 + len(name) + info.compress_size],
                -15,
            )
            if info.compress_type == zipfile.ZIP_DEFLATED
            else None
        )
    assert content is not None
    crc = zlib.crc32(content)
    for signature, crc_at, name_at in ((b"PK\x01\x02", 16, 46), (b"PK\x03\x04", 14, 30)):
        for match in re.finditer(signature, data):
            if data[match.start() + name_at : match.start() + name_at + len(name)] == name:
                struct.pack_into("<I", out, match.start() + crc_at, crc)
    return bytes(out)


class Built:
    """Each case's file, built the first time a test asks for it (some take a second to build)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._builders = {name: build for name, build, _, _ in CASES}

    def __getitem__(self, name: str) -> Path:
        path = self._folder / name / "x.pt"
        if not path.exists():
            path.parent.mkdir()
            path.write_bytes(self._builders[name]())
        return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize(("name", "error", "message"), [(c[0], c[2], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_file_is_refused(built: Built, name: str, error: type[Exception], message: str) -> None:
    path = built[name]
    # A conversion reads first: it stops with the reader's error and leaves nothing behind.
    with pytest.raises(error, match=re.escape(str(path)) + ": .*" + message) as caught:
        converters.convert(path, path.parent / "out.safetensors")
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt"]


TIME = Path("/usr/bin/time")


def run_cli(*args: str | Path) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of the command line run in its own process.

    The peak comes from ``/usr/bin/time`` (the CLI's own peak). A child's ``ru_maxrss`` read in
    this process would not do: the child starts as a copy of this one (torch loaded, hundreds of
    MB), and Linux keeps that high-water mark across ``exec``.
    """
    with tempfile.TemporaryDirectory() as folder:
        measured = Path(folder) / "rss"
        command = [sys.executable, str(CLI), *map(str, args)]
        if TIME.exists():
            command = [str(TIME), "-f", "%M", "-o", str(measured), *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        peak = int(measured.read_text().split()[-1]) * 1024 if measured.exists() else 0
    return done.returncode, done.stdout, done.stderr, peak


CLI_CASES = [
    "build-on-tensor",
    "build-on-rebuild-function",
    "setitems-on-list",
    "appends-on-tuple",
    "long4-10MB",
    "empty-dicts-2MB",
    "dup-references-8MB",
    "shared-containers-2**60",
    "zip-300k-entries",
    "stride0-views-add-up",
    "overlapping-views-200MB",
    "deflated-bomb-96MB",
    "appended-garbage",
]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_exits_2_with_one_line_within_the_memory_bar(built: Built, name: str) -> None:
    path = built[name]
    destination = path.parent / "out.safetensors"
    code, out, err, peak = run_cli("convert", path, destination)
    assert code == 2, err
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"sdconvert: {path}: "), err
    assert "Traceback" not in err
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt"]
    bar = 2 * path.stat().st_size + 100 * MB
    assert peak <= bar, f"peak RSS {peak / MB:.0f} MiB over the bar {bar / MB:.0f} MiB"


# ------------------------------------------------------------------ real torch.save files


def state_dict_file(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))
    state = model.state_dict()
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path, state


def raw_bytes_of(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), tensor_bytes(value))
    if isinstance(value, dict):
        return {key: raw_bytes_of(item) for key, item in value.items()}
    return value


def test_torch_save_state_dict_converts_bit_exactly_with_its_metadata(tmp_path: Path) -> None:
    path, state = state_dict_file(tmp_path)
    loaded = converters.load(path)
    reference = torch.load(path)  # weights_only=True
    assert type(loaded) is OrderedDict and loaded._metadata == reference._metadata  # type: ignore[attr-defined]
    assert_bit_identical(reference, loaded)
    assert_bit_identical(state, loaded)
    out = converters.convert(path, tmp_path / "model.safetensors")
    again = converters.convert(out, tmp_path / "again.pt")
    assert_bit_identical(reference, torch.load(again))
    assert converters.verify(path, again) == []


def test_flipped_bit_in_a_torch_save_record_is_named(tmp_path: Path) -> None:
    path, _ = state_dict_file(tmp_path)
    with zipfile.ZipFile(path) as archive:
        record = next(name for name in archive.namelist() if name.endswith("/data/0"))
    path.write_bytes(flip_in_record(path.read_bytes(), record.encode()))
    destination = tmp_path / "out" / "model.safetensors"
    destination.parent.mkdir()
    code, out, err, _ = run_cli("convert", path, destination)
    assert code == 2 and out == ""
    assert re.fullmatch(
        rf"sdconvert: {re.escape(str(path))} at \S+: zip record '{record}' does not match its CRC-32 "
        r"\(stored [0-9a-f]{8}, bytes give [0-9a-f]{8}\)\n",
        err,
    ), err
    assert list(destination.parent.iterdir()) == []
    code, out, err, _ = run_cli("verify", "--deep", path)
    assert code == 1, err
    assert f"zip record '{record}' does not match its CRC-32" in out


def redeflate(path: Path, destination: Path) -> None:
    """Every record rewritten with ZIP_DEFLATED, as a zip tool would (torch.load reads the result)."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))


def test_redeflated_torch_save_file_converts_bit_exactly(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tree = {
        "state": state_dict_file(tmp_path)[1],
        "transposed": base.t(),  # gathered from a deflated record
        "row": base[2],  # a window of one
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "uint16": torch.arange(7, dtype=torch.int32).to(torch.uint16),
    }
    original = tmp_path / "plain.pt"
    torch.save(tree, original)
    path = tmp_path / "deflated.pt"
    redeflate(original, path)
    with zipfile.ZipFile(path) as archive:
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())
    reference = torch.load(path)
    out = converters.convert(path, tmp_path / "out.safetensors")
    assert raw_bytes_of(converters.load(out)) == raw_bytes_of(
        {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in reference.items()}
    )
    assert_bit_identical(converters.load(path), converters.load(original))
    assert converters.verify(path, original) == []


def test_redeflated_record_with_a_flipped_bit_is_refused(tmp_path: Path) -> None:
    original, _ = state_dict_file(tmp_path)
    path = tmp_path / "deflated.pt"
    redeflate(original, path)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data = bytearray(path.read_bytes())
    data[start + info.compress_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=rf"zip record '{re.escape(info.filename)}' \(deflated\): "):
        converters.read(path)


def test_archives_back_to_back_in_one_file_read_by_range(tmp_path: Path) -> None:
    # DCP data files hold one torch.save archive per value at (offset, length).
    first, second = io.BytesIO(), io.BytesIO()
    torch.save({"a": torch.ones(3)}, first)
    torch.save([torch.arange(4, dtype=torch.int64), "x"], second)
    path = tmp_path / "__0_0.distcp"
    path.write_bytes(first.getvalue() + second.getvalue())
    tree_a = read_archive(path, 0, len(first.getvalue()))
    tree_b = read_archive(path, len(first.getvalue()), len(second.getvalue()))
    assert list(tree_a) == ["a"] and tree_b[1] == "x"
    assert tree_b[0].source.offset >= len(first.getvalue())
    # A range that cuts an archive short (or includes the next one) is refused.
    with pytest.raises(CorruptFileError):
        read_archive(path, 0, len(first.getvalue()) + 10)


def test_torch_save_to_a_stream_with_data_descriptors_reads(tmp_path: Path) -> None:
    # torch.save into a write-only stream puts a data descriptor after each record (flag bit 3):
    # the only bytes allowed between entries.
    class WriteOnly:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, chunk: bytes) -> int:
            self.data += chunk
            return len(chunk)

        def flush(self) -> None:
            pass

    stream = WriteOnly()
    tree = {"a": torch.arange(10.0), "b": [1, 2.5, "x"]}
    torch.save(tree, stream)  # type: ignore[arg-type]
    path = tmp_path / "streamed.pt"
    path.write_bytes(bytes(stream.data))
    with zipfile.ZipFile(path) as archive:
        assert all(info.flag_bits & 0x08 for info in archive.infolist())
    assert_bit_identical(torch.load(path), converters.load(path))


def test_protocol_4_and_shared_containers_still_read(tmp_path: Path) -> None:
    shared = {"lr": 0.1}
    tree = {"groups": [shared, shared], "w": torch.ones(2)}
    path = tmp_path / "p4.pt"
    torch.save(tree, path, pickle_protocol=4)  # FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL
    loaded = converters.load(path)
    assert_bit_identical(torch.load(path, weights_only=False), loaded)  # our own file: trusted
    tree = converters.read(path).tree
    assert tree["groups"][0] is tree["groups"][1]  # one dict at two places, as pickle gives it
