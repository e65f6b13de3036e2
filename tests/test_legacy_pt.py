"""Legacy (non-zip) torch files (issue 14, part 1): what ``torch.save(obj, f,
_use_new_zipfile_serialization=False)`` writes and every checkpoint before torch 1.6.

The oracle is ``torch.load(f, weights_only=True)``: the same tree bit for bit (tensor bytes, dtypes,
shapes, exact Python types, key order), strides aside (views come back contiguous, as from the zip
reader). Hostile legacy files are refused with one line naming the file (and the tensor path when
one tensor is concerned), exit 2 at the command line.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import assert_bit_identical, tensor_bytes, within_resource_bounds

import converters
from converters.codecs.torch_legacy import MAGIC_NUMBER, is_legacy, is_legacy_tar
from converters.core.errors import ConverterError, CorruptFileError, UnsafeFileError, UnsupportedValueError
from converters.core.sources import BufferSource, FileRange

CLI = Path(__file__).resolve().parent.parent / "cli.py"
CLASSIC_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128,
]  # fmt: skip
# torch 2.13 legacy-saves these through an UntypedStorage and _rebuild_tensor_v3, but its own
# legacy loader cannot read them back (UntypedStorage has no .dtype); we read them all the same.
UNTYPED_DTYPES = [
    torch.uint16, torch.uint32, torch.uint64, torch.complex32, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
]  # fmt: skip


def legacy_save(obj: Any, path: Path, protocol: int = 2) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    return path


def contiguous(tree: Any) -> Any:
    """``tree`` with every tensor contiguous (strides are not kept, by design) and plain (no Parameter)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().contiguous()
    if isinstance(tree, dict):
        copied = type(tree)()
        for key, value in tree.items():
            copied[key] = contiguous(value)
        if hasattr(tree, "_metadata"):
            copied._metadata = tree._metadata  # type: ignore[attr-defined]
        return copied
    if isinstance(tree, (list, tuple)):
        return type(tree)(contiguous(value) for value in tree)
    return tree


def values(dtype: torch.dtype, count: int = 7) -> torch.Tensor:
    """``count`` elements of ``dtype`` with varied bits (every byte pattern a random one)."""
    generator = torch.Generator().manual_seed(count)
    width = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (count * width,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype)


def rich_tree() -> dict[Any, Any]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state: OrderedDict[str, Any] = OrderedDict(weight=torch.randn(3, 4), bias=torch.randn(3).to(torch.bfloat16))
    state._metadata = OrderedDict([("", {"version": 1}), ("sub", {"version": 2})])  # type: ignore[attr-defined]
    tree: dict[Any, Any] = {
        "state": state,
        "transposed": base.t(),  # non-contiguous: gathered into C order
        "slice": base[1:3, 2:5],  # a strided view with an offset into a shared storage
        "row": base[2],  # a contiguous view at an offset
        "every_other": base.reshape(-1)[1::2],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
        "same_a": base,
        "same_b": base.view(6, 4),
        "param": torch.nn.Parameter(torch.ones(3)),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        0: "int key",
        "0": "str key",
        "numbers": (1, -(2**40), 2**70, 1.5, -0.0, float("inf"), True, None),
        "nested": [[1, {"x": 4.0}], ()],
        "counter": Counter({"a": 2}),
    }
    for dtype in CLASSIC_DTYPES:
        tree[f"dtype_{dtype}"] = values(dtype)
    return tree


# ------------------------------------------------------------------------------ torch's own files


@pytest.mark.parametrize("protocol", [2, 3])
def test_legacy_file_reads_as_torch_load_gives_it(tmp_path: Path, protocol: int) -> None:
    path = legacy_save(rich_tree(), tmp_path / "legacy.pt", protocol)
    assert not path.read_bytes().startswith(b"PK")  # really the legacy layout
    expected = torch.load(path, weights_only=True)
    loaded = converters.load(path)
    assert_bit_identical(contiguous(expected), loaded)
    assert list(loaded) == list(expected)
    assert converters.read(path).format == "pt"


def test_protocol_4_legacy_file_reads(tmp_path: Path) -> None:
    # torch's weights_only loader refuses protocol 4's FRAME opcode; the file is ours, so the oracle
    # here is the full loader (it runs the pickle we just wrote).
    path = legacy_save(rich_tree(), tmp_path / "legacy4.pt", 4)
    assert is_legacy(path.read_bytes()[:64])
    expected = torch.load(path, weights_only=False)
    assert_bit_identical(contiguous(expected), converters.load(path))


@pytest.mark.parametrize("dtype", CLASSIC_DTYPES, ids=str)
def test_every_classic_dtype_round_trips_bit_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = values(dtype, 33)
    path = legacy_save({"t": tensor, "view": tensor[3:10]}, tmp_path / "d.pt")
    expected = torch.load(path, weights_only=True)
    loaded = converters.load(path)
    assert_bit_identical(contiguous(expected), loaded)
    assert tensor_bytes(loaded["t"]) == tensor_bytes(tensor)


@pytest.mark.parametrize("dtype", UNTYPED_DTYPES, ids=str)
def test_dtypes_torch_saves_untyped_are_read_too(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = values(dtype, 9)
    path = legacy_save({"t": tensor, "tail": tensor[4:]}, tmp_path / "u.pt")
    loaded = converters.load(path)
    for key, original in (("t", tensor), ("tail", tensor[4:])):
        assert loaded[key].dtype == dtype and loaded[key].shape == original.shape
        assert tensor_bytes(loaded[key]) == tensor_bytes(original)


def test_views_stream_from_the_file_and_strided_views_are_gathered(tmp_path: Path) -> None:
    base = torch.arange(40, dtype=torch.float64).reshape(5, 8)
    tree = {"base": base, "row": base[3], "block": base[1:3], "t": base.t(), "tied": base}
    path = legacy_save(tree, tmp_path / "v.pt")
    read = converters.read(path).tree
    data = path.read_bytes()
    # Contiguous views are byte ranges of the file (copied by the kernel, never loaded).
    for key in ("base", "row", "block"):
        source = read[key].source
        assert type(source) is FileRange and source.path == path
        assert data[source.offset : source.offset + source.length] == tensor_bytes(tree[key])
    assert read["row"].source.offset == read["base"].source.offset + 3 * 8 * 8
    assert type(read["t"].source) is BufferSource  # transposed: gathered into C order
    # The same view twice is one tensor (tied), stored once by every writer.
    assert read["base"] is read["tied"]
    assert_bit_identical(contiguous(torch.load(path, weights_only=True)), converters.load(path))


def test_recipe_checkpoint_converts_to_every_format_bit_exactly(tmp_path: Path, trained: Any) -> None:
    path = legacy_save(trained[2], tmp_path / "recipe-legacy.pth")
    expected = torch.load(path, weights_only=True)
    for suffix in (".safetensors", ".pt", ".msgpack"):
        destination = tmp_path / f"out{suffix}"
        converters.convert(path, destination)
        assert_bit_identical(contiguous(expected), converters.load(destination))
        assert converters.verify(path, destination) == []
    # Written as a zip that plain torch.load reads back the same.
    assert (tmp_path / "out.pt").read_bytes().startswith(b"PK")
    assert_bit_identical(contiguous(expected), torch.load(tmp_path / "out.pt"))
    # A state_dict alone loads through safetensors' own reader.
    converters.convert(path, tmp_path / "model.safetensors", select=["model_state_dict"])
    model = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert_bit_identical(dict(contiguous(expected["model_state_dict"])), model)


@pytest.mark.parametrize("name", ["x.bin", "x.ckpt", "x.pth.tar", "x.pth", "no_suffix"])
def test_legacy_and_zip_files_are_recognised_whatever_the_suffix(tmp_path: Path, name: str) -> None:
    tree = {"w": torch.randn(2, 3), "step": 4}
    legacy = legacy_save(tree, tmp_path / f"legacy-{name}")
    zipped = tmp_path / f"zip-{name}"
    torch.save(tree, zipped)
    for path in (legacy, zipped):
        assert converters.registry.resolve(path).name == "pt"
        assert_bit_identical(contiguous(torch.load(path, weights_only=True)), converters.load(path))


def test_a_legacy_file_named_as_another_format_gets_a_hint(tmp_path: Path) -> None:
    path = legacy_save({"w": torch.ones(2)}, tmp_path / "legacy.safetensors")
    with pytest.raises(converters.UnknownFormatError, match="the name says safetensors but the contents are pt"):
        converters.read(path)
    assert_bit_identical({"w": torch.ones(2)}, converters.load(path, "pt"))


def test_cli_converts_and_verifies_a_legacy_file(tmp_path: Path) -> None:
    path = legacy_save({"w": torch.randn(3, 3), "epoch": 2}, tmp_path / "old.pt")
    destination = tmp_path / "new.safetensors"
    run = [sys.executable, str(CLI)]
    done = subprocess.run([*run, "convert", str(path), str(destination)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*run, "verify", str(path), str(destination)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "bit-identical" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([*run, "inspect", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and re.search(r"^w +float32 +\[3, 3\]$", done.stdout, re.M), done.stdout


# ------------------------------------------------------------------------ hand-built legacy files


def text(value: str) -> bytes:
    encoded = value.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def small(value: int) -> bytes:
    return b"K" + bytes([value]) if value < 256 else b"J" + struct.pack("<i", value)


def ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(small(v) for v in values) + b"t"


def pid(key: str, numel: int, storage: bytes = b"ctorch\nFloatStorage\n", view: bytes = b"N") -> bytes:
    """A legacy persistent id ('storage', type, key, 'cpu', numel, view), as BINPERSID."""
    return b"(" + text("storage") + storage + text(key) + text("cpu") + small(numel) + view + b"tQ"


def tensor(
    key: str = "0",
    size: tuple[int, ...] = (4,),
    stride: tuple[int, ...] = (1,),
    offset: int = 0,
    numel: int = 4,
    *,
    storage: bytes = b"ctorch\nFloatStorage\n",
    view: bytes = b"N",
    v1: bool = False,
) -> bytes:
    """The opcodes of one tensor: torch's ``_rebuild_tensor_v2`` (``v1``: pre-0.4 ``_rebuild_tensor``)."""
    if v1:
        rebuild = b"ctorch._utils\n_rebuild_tensor\n("
        return rebuild + pid(key, numel, storage, view) + small(offset) + ints(size) + ints(stride) + b"tR"
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid(key, numel, storage, view)
        + small(offset)
        + ints(size)
        + ints(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def mapping(*pairs: tuple[str, bytes]) -> bytes:
    return b"}(" + b"".join(text(key) + value for key, value in pairs) + b"u"


MAGIC = b"\x80\x02\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little") + b"."
VERSION = b"\x80\x02M\xe9\x03."
SYS_INFO = pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4}}, 2)


def record(count: int, data: bytes) -> bytes:
    return struct.pack("<q", count) + data


def legacy_of(
    body: bytes,
    keys: list[str],
    records: list[bytes],
    *,
    magic: bytes = MAGIC,
    version: bytes = VERSION,
    sys_info: bytes = SYS_INFO,
) -> bytes:
    """A legacy file: the three header pickles, ``body`` as the object pickle, the key list, the records."""
    return magic + version + sys_info + b"\x80\x02" + body + b"." + pickle.dumps(keys, 2) + b"".join(records)


FLOATS = struct.pack("<8f", *range(8))


def hand_built(body: bytes) -> bytes:
    """One float storage '0' of 8 elements, the object pickle ``body``."""
    return legacy_of(body, ["0"], [record(8, FLOATS)])


@pytest.mark.parametrize(
    "body",
    [
        mapping(
            ("a", tensor(size=(2, 2), stride=(2, 1), offset=1, numel=8)),
            ("b", tensor(size=(3,), stride=(2,), numel=8)),
        ),
        # torch < 0.4: _rebuild_tensor, and storage views (a key, an offset and a size in the root)
        mapping(("old", tensor(size=(2,), stride=(1,), offset=0, numel=8, v1=True))),
        mapping(
            ("view", tensor(size=(3,), offset=1, numel=8, view=b"(" + text("v") + small(2) + small(5) + b"t")),
            ("root", tensor(size=(8,), numel=8)),
        ),
    ],
    ids=["views-v2", "rebuild-tensor-v1", "storage-view"],
)
def test_hand_built_legacy_files_read_as_torch_load_gives_them(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "hand.pt"
    path.write_bytes(hand_built(body))
    expected = torch.load(path, weights_only=True)
    assert_bit_identical(contiguous(expected), converters.load(path))


def test_old_tar_checkpoint_is_refused_naming_it(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in ("sys_info", "storages", "tensors", "pickle"):
            info = tarfile.TarInfo(name)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"\x80\x02N."))
    for name in ("old.pt", "old_without_suffix"):
        path = tmp_path / name
        path.write_bytes(buffer.getvalue())
        assert is_legacy_tar(path.read_bytes()[:64])
        with pytest.raises(UnsupportedValueError, match=rf"{path}: this is a tar checkpoint of torch before 0\.4"):
            converters.read(path)


# ----------------------------------------------------------------------------- hostile legacy files


def torch_file(tree: Any = None) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"w": torch.arange(6.0)} if tree is None else tree, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def cut(data: bytes, keep: int) -> bytes:
    return data[:keep]


MB = 1 << 20


def views_of_one_storage(count: int, *, view_metadata: bool) -> bytes:
    """``count`` tensors each viewing all of one 64 KiB storage, each at its own offset (distinct
    views) or through its own storage view (torch < 0.4): far more tensor bytes than the file holds."""
    numel = 16384
    pairs = []
    for index in range(count):
        if view_metadata:
            view = b"(" + text(f"v{index}") + small(0) + small(numel) + b"t"
            pairs.append((str(index), tensor(size=(numel,), numel=numel, view=view)))
        else:
            pairs.append((str(index), tensor(size=(numel - index,), offset=index, numel=numel)))
    return legacy_of(mapping(*pairs), ["0"], [record(numel, bytes(4 * numel))])


# A zip archive's storage id (5 fields) inside a legacy file.
FIVE_FIELDS = (
    b"ctorch._utils\n_rebuild_tensor_v2\n(("
    + text("storage")
    + b"ctorch\nFloatStorage\n"
    + text("0")
    + text("cpu")
    + small(8)
    + b"tQK\x00(K\x04t(K\x01t\x89ccollections\nOrderedDict\n)RtR"
)


CASES: list[tuple[str, Callable[[], bytes], type[Exception], str]] = [
    (
        "truncated-in-the-object-pickle",
        lambda: cut(torch_file(), 160),
        CorruptFileError,
        r"the object pickle \(from byte 137\) is truncated: the 160-byte file ends inside it",
    ),
    (
        "truncated-in-the-storage-bytes",
        lambda: torch_file()[:-5],
        CorruptFileError,
        r"at w: storage '\d+' \(torch.FloatStorage\) declares 6 elements at byte \d+, which do not fit in the \d+-byte",
    ),
    (
        "truncated-before-a-storage-count",
        lambda: hand_built(mapping(("w", tensor(numel=8))))[: -(8 + 32)] + b"\x00\x00",
        CorruptFileError,
        r"at w: the file ends at byte \d+, where the element count of storage '0' was expected",
    ),
    (
        "lying-numel",
        lambda: legacy_of(mapping(("w", tensor(numel=8))), ["0"], [record(7, FLOATS[:28])]),
        CorruptFileError,
        r"at w: storage '0' \(torch.FloatStorage\) holds 7 elements at byte \d+, but the object pickle says 8",
    ),
    (
        "count-past-file-end",
        lambda: legacy_of(mapping(("w", tensor(numel=8))), ["0"], [record(2**60, FLOATS)]),
        CorruptFileError,
        r"at w: storage '0' \(torch.FloatStorage\) declares 1152921504606846976 elements at byte \d+, which do not fit",
    ),
    (
        "negative-count",
        lambda: legacy_of(mapping(("w", tensor(numel=8))), ["0"], [record(-8, FLOATS)]),
        CorruptFileError,
        r"at w: storage '0' \(torch.FloatStorage\) declares a negative element count \(-8\) at byte \d+",
    ),
    (
        "storage-key-listed-twice",
        lambda: legacy_of(mapping(("w", tensor(numel=8))), ["0", "0"], [record(8, FLOATS), record(8, FLOATS)]),
        CorruptFileError,
        r"the storage-key pickle lists storage '0' twice",
    ),
    (
        "storage-key-never-referred-to",
        lambda: legacy_of(mapping(("w", tensor(numel=8))), ["0", "9"], [record(8, FLOATS), record(8, FLOATS)]),
        CorruptFileError,
        r"the storage-key pickle lists '9', a storage the object pickle never refers to",
    ),
    (
        "storage-bytes-missing",
        lambda: legacy_of(mapping(("w", tensor(numel=8)), ("v", tensor("1", numel=8))), ["0"], [record(8, FLOATS)]),
        CorruptFileError,
        r"at v: the object pickle refers to storage '1', whose bytes the file does not hold",
    ),
    (
        "bytes-after-the-last-storage",
        lambda: hand_built(mapping(("w", tensor(numel=8)))) + b"hidden",
        CorruptFileError,
        r"6 bytes follow the last storage \(at byte \d+\); the file should end there",
    ),
    (
        "view-offset-past-storage-end",
        lambda: hand_built(mapping(("w", tensor(size=(4,), offset=6, numel=8)))),
        CorruptFileError,
        r"at w: a float32\[4\] tensor needs 40 bytes of storage '0', which holds 32",
    ),
    (
        "strided-view-past-storage-end",
        lambda: hand_built(mapping(("w", tensor(size=(3, 2), stride=(4, 1), numel=8)))),
        CorruptFileError,
        r"at w: a float32\[3, 2\] tensor needs 40 bytes of storage '0', which holds 32",
    ),
    (
        "storage-view-past-its-root",
        lambda: hand_built(
            mapping(("w", tensor(size=(2,), numel=8, view=b"(" + text("v") + small(7) + small(2) + b"t")))
        ),
        CorruptFileError,
        r"storage view 'v' spans elements 7..9 of storage '0', which holds 8",
    ),
    (
        "unknown-storage-type",
        lambda: hand_built(mapping(("w", tensor(numel=8, storage=b"ctorch\nQInt8Storage\n")))),
        ConverterError,  # refused by the pre-scan, or recorded by it and refused as a storage type
        r"(asks for the global torch.QInt8Storage|storage '0' has .*QInt8Storage.* as its type; expected a torch "
        r"storage class)",
    ),
    (
        "storage-type-is-a-dtype",
        lambda: hand_built(mapping(("w", tensor(numel=8, storage=b"ctorch\nfloat32\n")))),
        UnsupportedValueError,
        r"storage '0' has .*torch.float32.* as its type; expected a torch storage class",
    ),
    (
        "storage-with-two-types",
        lambda: hand_built(mapping(("w", tensor(numel=8)), ("i", tensor(numel=8, storage=b"ctorch\nIntStorage\n")))),
        CorruptFileError,
        r"storage '0' is referred to as torch.FloatStorage of 8 elements and as torch.IntStorage of 8",
    ),
    (
        "zip-style-five-field-storage-id",
        lambda: hand_built(mapping(("w", FIVE_FIELDS))),
        CorruptFileError,
        r"the object pickle has a storage reference of 5 fields; a legacy one has 6",
    ),
    (
        "non-allowlisted-global",
        lambda: hand_built(b"cos\nsystem\n(" + text("echo pwned") + b"tR"),
        UnsafeFileError,
        r"the object pickle asks for the global os.system at byte \d+.*; refusing to run pickled code",
    ),
    (
        "global-in-the-sys-info-pickle",
        lambda: legacy_of(b"N", [], [], sys_info=b"\x80\x02cbuiltins\neval\n" + text("1") + b"\x85R."),
        UnsafeFileError,
        r"the sys_info pickle asks for the global builtins.eval at byte 2.*; refusing to run pickled code",
    ),
    (
        "build-on-a-tensor",
        lambda: hand_built(tensor(numel=8) + b"}" + text("x") + b"Ns" + b"b"),
        UnsafeFileError,
        r"the object pickle applies BUILD to a tensor",
    ),
    (
        "storage-in-the-key-pickle",
        lambda: MAGIC + VERSION + SYS_INFO + b"\x80\x02N." + b"\x80\x02" + pid("0", 8) + b"." + record(8, FLOATS),
        CorruptFileError,
        r"the storage-key pickle refers to a storage; only the object pickle does",
    ),
    (
        "big-endian",
        lambda: legacy_of(b"N", [], [], sys_info=pickle.dumps({"little_endian": False}, 2)),
        UnsupportedValueError,
        r"written on a big-endian machine",
    ),
    (
        "wrong-protocol-version",
        lambda: legacy_of(b"N", [], [], version=b"\x80\x02M\xea\x03."),
        UnsupportedValueError,
        r"the protocol-version pickle holds 1002, expected 1001",
    ),
    (
        "empty-dicts-2MB-in-the-object-pickle",
        lambda: legacy_of(b"(" + b"}" * (2 * MB) + b"l", [], []),
        CorruptFileError,
        r"would need more than \d+ MiB of memory to read \(pickle containers\)",
    ),
    (
        "overlapping-views-of-one-storage",
        lambda: views_of_one_storage(2000, view_metadata=False),
        CorruptFileError,
        r"at \d+: names \d+ bytes of tensor bytes viewed more than once in storage '0' from a \d+-byte input",
    ),
    (
        "storage-views-of-one-storage",
        lambda: views_of_one_storage(2000, view_metadata=True),
        CorruptFileError,
        r"names \d+ bytes of storage views of storage '0' from a \d+-byte input",
    ),
    (
        "global-name-without-end",
        lambda: legacy_of(b"c" + b"a" * 200_000, [], []),
        CorruptFileError,
        r"the object pickle has a newline-terminated argument longer than 65536 bytes at byte \d+",
    ),
    (
        "plain-pickle",
        lambda: pickle.dumps({"w": [1.0, 2.0]}, 2),
        CorruptFileError,
        r"starts with a pickle that is not torch's magic number: a plain Python pickle",
    ),
    (
        "keys-not-a-list",
        lambda: MAGIC + VERSION + SYS_INFO + b"\x80\x02N." + pickle.dumps({"0": 1}, 2),
        CorruptFileError,
        r"the storage-key pickle holds a dict, expected a list of storage keys",
    ),
    (
        "bytes-after-a-stop-are-the-next-pickle",
        lambda: MAGIC + VERSION + SYS_INFO + b"\x80\x02N." + b"\xffgarbage",
        CorruptFileError,
        r"the storage-key pickle is not a valid pickle: unknown opcode 0xff at byte 0",
    ),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile-legacy")
    paths = {}
    for name, build, _, _ in CASES:
        (folder / name).mkdir()
        paths[name] = folder / name / "x.pt"
        paths[name].write_bytes(build())
    return paths


@pytest.mark.parametrize(("name", "error", "message"), [(c[0], c[2], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_legacy_file_is_refused(
    built: dict[str, Path], name: str, error: type[Exception], message: str
) -> None:
    path = built[name]
    prefix = "^" + re.escape(str(path)) + (" " if message.startswith("at ") else ": .*")
    with pytest.raises(error, match=prefix + message) as caught, within_resource_bounds(path.stat().st_size):
        converters.convert(path, path.parent / "out.safetensors")
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt"]


def test_torch_refuses_what_we_refuse(built: dict[str, Path]) -> None:
    """The oracle agrees where it checks: torch.load fails on these rows too. (It loads others
    silently: a storage whose bytes are missing comes back as uninitialized memory, a key listed
    twice is read twice, bytes after the last storage are ignored.)"""
    refused_by_torch = [
        "truncated-in-the-storage-bytes", "lying-numel", "count-past-file-end", "negative-count",
        "storage-key-never-referred-to", "view-offset-past-storage-end", "non-allowlisted-global",
        "wrong-protocol-version", "plain-pickle",
    ]  # fmt: skip
    for name in refused_by_torch:
        with pytest.raises(Exception):  # noqa: B017  (torch raises RuntimeError, UnpicklingError, ...)
            torch.load(built[name], weights_only=True)


@pytest.mark.parametrize("name", ["lying-numel", "non-allowlisted-global", "truncated-in-the-object-pickle"])
def test_cli_exits_2_with_one_line(built: dict[str, Path], name: str) -> None:
    path = built[name]
    destination = path.parent / "cli-out.safetensors"
    for command in (["convert", str(path), str(destination)], ["inspect", str(path)]):
        done = subprocess.run([sys.executable, str(CLI), *command], capture_output=True, text=True, check=False)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and str(path) in done.stderr and "Traceback" not in done.stderr
    assert not destination.exists()


def test_a_legacy_file_cut_anywhere_is_refused_cleanly(tmp_path: Path) -> None:
    """A valid legacy file cut at every length is refused cleanly (never another exception)."""
    data = torch_file({"w": torch.arange(4.0), "v": torch.arange(3, dtype=torch.int16)})
    path = tmp_path / "cut.pt"
    for keep in range(len(data)):
        path.write_bytes(data[:keep])
        with pytest.raises(ConverterError):
            converters.read(path, "pt")
