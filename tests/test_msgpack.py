"""msgpack: flax compatibility, chunking, streaming writes, the native tree, hostile files."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# flax is the reference reader and writer of this encoding: `make` installs it (with JAX, CPU).
import flax.serialization as flax_serialization
import msgpack
import numpy as np
import pytest
import torch
from helpers import assert_bit_identical, exotic_tree, tensor_bytes

import converters
from converters.core.contract import NoOptions, WriteContext
from converters.core.errors import CorruptFileError, UnsupportedValueError
from converters.core.tree import Checkpoint, TensorRef
from converters.formats.msgpack import MsgpackFormat
from converters.torch_bridge import from_torch


def flax_style_bytes(tree: Any) -> bytes:
    """What flax.serialization.msgpack_serialize writes for a tree of numpy arrays, via plain msgpack."""

    def pack_array(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            payload = msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")), use_bin_type=True)
            return msgpack.ExtType(1, payload)
        return value

    return msgpack.packb(tree, default=pack_array, strict_types=True)


def numpy_tree() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    return {
        "params": {
            "Dense_0": {"kernel": rng.standard_normal((3, 4), dtype=np.float32), "bias": np.zeros(4, np.float32)},
            "counts": np.arange(5, dtype=np.int64),
            "mask": np.array([True, False]),
        },
        "step": 7,
        "lr": 0.5,
        "name": "adam",
        "history": [1.0, 2.0],
    }


# ------------------------------------------------------------------------------ flax interop


def test_flax_msgpack_restore_reads_our_recipe_file(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    path = converters.convert(recipe_pt, tmp_path / "recipe.msgpack")
    restored = flax_serialization.msgpack_restore(path.read_bytes())
    checkpoint = trained[2]
    for key, tensor in checkpoint["model_state_dict"].items():
        array = restored["model_state_dict"][key]
        assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == tuple(tensor.shape)
        assert array.tobytes() == tensor_bytes(tensor)
    for index, state in checkpoint["optimizer_state_dict"]["state"].items():
        array = restored["optimizer_state_dict"]["state"][str(index)]["momentum_buffer"]
        assert array.tobytes() == tensor_bytes(state["momentum_buffer"])
    assert restored["epoch"] == 3 and restored["loss"] == checkpoint["loss"]


@pytest.mark.parametrize(
    "dtype", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "uint16", "bool", "complex64"]
)
def test_flax_reads_ml_dtypes(tmp_path: Path, dtype: str) -> None:
    tensor = torch.randint(0, 256, (24,), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(3, -1)
    if dtype == "bool":
        tensor = tensor.view(torch.uint8).remainder(2).view(torch.bool)
    path = tmp_path / "t.msgpack"
    converters.save({"t": tensor}, path)
    array = flax_serialization.msgpack_restore(path.read_bytes())["t"]
    assert array.dtype.name == dtype and array.shape == tuple(tensor.shape)
    assert array.tobytes() == tensor_bytes(tensor)


@pytest.mark.parametrize("writer", ["msgpack_serialize", "to_bytes"])
def test_we_read_files_flax_writes(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "flax.msgpack"
    path.write_bytes(getattr(flax_serialization, writer)(numpy_tree()))
    # What we load is what flax itself restores, with numpy arrays as torch tensors.
    restored = flax_serialization.msgpack_restore(path.read_bytes())
    assert_bit_identical(_numpy_to_torch(restored), converters.load(path))


def _numpy_to_torch(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _numpy_to_torch(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_numpy_to_torch(value) for value in node]
    return torch.from_numpy(np.array(node)) if isinstance(node, np.ndarray) else node


def test_we_read_flax_layout_written_by_plain_msgpack(tmp_path: Path) -> None:
    tree = numpy_tree()
    path = tmp_path / "flax-style.msgpack"
    path.write_bytes(flax_style_bytes(tree))
    _assert_matches_numpy_tree(converters.load(path), tree)


def _assert_matches_numpy_tree(loaded: Any, tree: dict[str, Any]) -> None:
    expected = {
        "params": {
            "Dense_0": {key: torch.from_numpy(value) for key, value in tree["params"]["Dense_0"].items()},
            "counts": torch.from_numpy(tree["params"]["counts"]),
            "mask": torch.from_numpy(tree["params"]["mask"]),
        },
        "step": 7,
        "lr": 0.5,
        "name": "adam",
        "history": [1.0, 2.0],
    }
    assert_bit_identical(expected, loaded)


# ------------------------------------------------------------------------------ chunking


@pytest.mark.parametrize("nbytes", [64, 65, 1000])
def test_big_leaves_are_chunked_like_flax_and_read_back(tmp_path: Path, nbytes: int) -> None:
    small = MsgpackFormat(max_leaf_bytes=64)
    tensor = torch.arange(nbytes // 4 + 1, dtype=torch.float32)[: nbytes // 4].reshape(-1, 1)
    tree = {"big": tensor, "small": torch.ones(2)}
    path = tmp_path / "chunked.msgpack"
    small.write(from_torch(tree), path, WriteContext(), NoOptions())
    assert_bit_identical(tree, converters.load(path))
    raw = msgpack.unpackb(path.read_bytes(), raw=False)
    chunked = tensor.numel() * 4 > 64
    assert ("__msgpack_chunked_array__" in raw["big"]) == chunked
    if chunked:
        assert raw["big"]["shape"] == {"0": tensor.shape[0], "1": 1}
        assert list(raw["big"]["chunks"]) == [str(i) for i in range(-(-tensor.numel() // 16))]


def test_flax_unchunks_our_chunked_leaves(tmp_path: Path) -> None:
    tensor = torch.randn(50, 3)
    path = tmp_path / "chunked.msgpack"
    MsgpackFormat(max_leaf_bytes=100).write(from_torch({"w": tensor}), path, WriteContext(), NoOptions())
    restored = flax_serialization.msgpack_restore(path.read_bytes())
    assert restored["w"].shape == (50, 3) and restored["w"].tobytes() == tensor_bytes(tensor)


# ------------------------------------------------------------------------------ tied tensors


def _tied_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(4)
    embed = torch.randn(32, 8)  # 1 KiB
    return {"embed.weight": embed, "fc.bias": torch.randn(8), "lm_head.weight": embed}


@pytest.mark.parametrize("big", [False, True])
def test_flax_reads_an_array_at_every_tied_path_and_we_tie_them_back(tmp_path: Path, big: bool) -> None:
    """flax has no references: a tied tensor is an array at each of its paths (its bytes again),
    and the metadata tree names one storage key at both, so our reader gives one tensor back
    (``big``: chunked like flax's leaves over MAX_CHUNK_SIZE, here 100 bytes)."""
    state = _tied_state()
    path = tmp_path / "tied.msgpack"
    MsgpackFormat(max_leaf_bytes=100 if big else 2**30).write(from_torch(state), path, WriteContext(), NoOptions())
    restored = flax_serialization.msgpack_restore(path.read_bytes())
    for key in ("embed.weight", "lm_head.weight"):
        assert isinstance(restored[key], np.ndarray) and restored[key].tobytes() == tensor_bytes(state[key]), key
    tree = converters.read(path).tree
    assert tree["embed.weight"] is tree["lm_head.weight"]  # one tensor again
    assert converters.verify(path, path, deep=True) == []
    loaded = converters.load(path)
    assert loaded["embed.weight"].untyped_storage().data_ptr() == loaded["lm_head.weight"].untyped_storage().data_ptr()


def test_the_copy_costs_its_bytes_and_drop_aliases_avoids_it(tmp_path: Path) -> None:
    source = tmp_path / "tied.pt"
    torch.save(_tied_state(), source)
    keep, dropped = tmp_path / "keep.msgpack", tmp_path / "dropped.msgpack"
    converters.convert(source, keep)
    converters.convert(source, dropped, ties="drop-aliases")
    extra = keep.stat().st_size - dropped.stat().st_size
    # the alias's array (1 KiB + ext and array headers), its key, its metadata tree node and digest-free
    assert 1024 < extra < 1024 + 100, extra
    assert "lm_head.weight" not in flax_serialization.msgpack_restore(dropped.read_bytes())


def _handmade(path: Path, alias: Any) -> Path:
    """An older file's layout (or a hostile one): "a" an array, "b" what ``alias`` says, and a
    metadata tree that names the storage key "a" at both."""
    meta = {"version": 1, "wrapped": False, "tree": {"dict": [["a", {"tensor": "a"}], ["b", {"tensor": "a"}]]}}
    array = msgpack.ExtType(1, msgpack.packb([[2], "float32", struct.pack("<2f", 1.5, -2.0)]))
    root = {"__sdconvert__": msgpack.ExtType(80, msgpack.packb(meta)), "a": array, "b": alias}
    path.write_bytes(msgpack.packb(root))
    return path


def test_older_files_with_ext_82_references_are_still_read(tmp_path: Path) -> None:
    tree = converters.read(_handmade(tmp_path / "old.msgpack", msgpack.ExtType(82, b"a"))).tree
    assert tree["a"] is tree["b"] and tensor_bytes(converters.load(tmp_path / "old.msgpack")["b"]) == struct.pack(
        "<2f", 1.5, -2.0
    )


def test_a_tied_copy_of_another_shape_is_refused(tmp_path: Path) -> None:
    other = msgpack.ExtType(1, msgpack.packb([[1, 2], "float32", bytes(8)]))
    with pytest.raises(CorruptFileError, match=r"at b: .* a tensor disagrees .* the tensor 'a' again \(float32\[2\]\)"):
        converters.read(_handmade(tmp_path / "bad.msgpack", other))


# ------------------------------------------------------------------------------ the native tree


def test_plain_msgpack_decoders_can_walk_our_files(tmp_path: Path, recipe_pt: Path) -> None:
    path = converters.convert(recipe_pt, tmp_path / "r.msgpack")
    # strict_map_key=True is what flax uses: every map key must be a string.
    raw = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=True)
    assert list(raw) == ["__sdconvert__", "epoch", "model_state_dict", "optimizer_state_dict", "loss"]
    assert isinstance(raw["__sdconvert__"], msgpack.ExtType) and raw["__sdconvert__"].code == 80
    weight = raw["model_state_dict"]["conv1.weight"]
    assert isinstance(weight, msgpack.ExtType) and weight.code == 1
    shape, dtype, data = msgpack.unpackb(weight.data)
    assert (shape, dtype, len(data)) == ([6, 3, 5, 5], "float32", 6 * 3 * 5 * 5 * 4)
    assert raw["optimizer_state_dict"]["param_groups"][0]["params"] == list(range(10))


def test_int_keys_colliding_with_str_keys_round_trip(tmp_path: Path) -> None:
    tree = {"x": {0: "int", "0": "str", "0#2": "taken", 1: "one"}}
    path = tmp_path / "keys.msgpack"
    converters.save(tree, path)
    assert_bit_identical(tree, converters.load(path))
    assert list(msgpack.unpackb(path.read_bytes())["x"]) == ["0#3", "0", "0#2", "1"]


def test_non_dict_roots_are_wrapped(tmp_path: Path) -> None:
    tree = [torch.ones(2), (1, 2.5, None)]
    path = tmp_path / "list.msgpack"
    converters.save(tree, path)
    assert_bit_identical(tree, converters.load(path))
    assert list(msgpack.unpackb(path.read_bytes())) == ["__sdconvert__", "__sdconvert_root__"]


def test_big_ints_survive_as_ext_81(tmp_path: Path) -> None:
    tree = {"big": [2**64, -(2**63) - 1, 10**50], "edge": [2**64 - 1, -(2**63)]}
    path = tmp_path / "ints.msgpack"
    converters.save(tree, path)
    assert_bit_identical(tree, converters.load(path))
    raw = msgpack.unpackb(path.read_bytes())
    assert raw["big"][0] == msgpack.ExtType(81, b"18446744073709551616")
    assert raw["edge"] == [2**64 - 1, -(2**63)]


def test_reserved_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError, match="the key '__sdconvert__' is reserved"):
        converters.save({"__sdconvert__": 1}, tmp_path / "a.msgpack")
    with pytest.raises(UnsupportedValueError, match="at a: the key '__msgpack_chunked_array__' marks flax"):
        converters.save({"a": {"__msgpack_chunked_array__": True}}, tmp_path / "b.msgpack")
    with pytest.raises(UnsupportedValueError, match=r"at s/1: msgpack strings are UTF-8"):
        converters.save({"s": ["ok", "\udcff"]}, tmp_path / "c.msgpack")
    assert list(tmp_path.iterdir()) == []


def test_writing_streams_tensor_bytes(tmp_path: Path) -> None:
    class StreamOnly:
        """A source that can only be streamed: the writer must never ask for all bytes at once."""

        nbytes = 3 * 1024 * 1024

        def readinto(self, buffer: memoryview) -> None:
            raise AssertionError("the msgpack writer read a whole tensor into memory")

        def chunks(self, chunk_size: int = 1 << 20) -> Iterator[memoryview]:
            for _ in range(3):
                yield memoryview(b"\x01" * (1 << 20))

    checkpoint = Checkpoint({"w": TensorRef("uint8", (3 * 1024 * 1024,), StreamOnly())})
    path = tmp_path / "stream.msgpack"
    converters.write(checkpoint, path)
    MsgpackFormat(max_leaf_bytes=1 << 20).write(checkpoint, tmp_path / "chunked.msgpack", WriteContext(), NoOptions())
    for written in (path, tmp_path / "chunked.msgpack"):
        assert converters.load(written)["w"].sum().item() == 3 * 1024 * 1024


def test_exotic_tree_through_msgpack_only(tmp_path: Path) -> None:
    tree = exotic_tree()
    path = tmp_path / "e.msgpack"
    converters.save(tree, path)
    assert_bit_identical(tree, converters.load(path))


# ------------------------------------------------------------------------------ hostile files


def ndarray_ext(shape: list[int], dtype: str, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([shape, dtype, data], use_bin_type=True))


def ours_with_native_edit(tmp_path: Path) -> bytes:
    path = tmp_path / "src.msgpack"
    converters.save({"epoch": 3, "w": torch.ones(1)}, path)
    raw = msgpack.unpackb(path.read_bytes(), raw=False)
    raw["epoch"] = 4
    return msgpack.packb(raw, use_bin_type=True)


HOSTILE: list[tuple[str, Callable[[Path], bytes], type[Exception], str]] = [
    ("empty", lambda _: b"", CorruptFileError, r"the file is empty"),
    ("huge-array", lambda _: b"\xdd\xff\xff\xff\xff", CorruptFileError,
     r"a msgpack array of that many items at byte 5 declares 4294967295 bytes, only 0 remain"),
    ("huge-map", lambda _: b"\xdf\x7f\xff\xff\xff\xc0", CorruptFileError,
     r"a msgpack map of that many entries at byte 5 declares 4294967294 bytes, only 1 remain"),
    ("str-past-end", lambda _: b"\xdb\x00\x00\x10\x00abc", CorruptFileError,
     r"a msgpack str at byte 5 declares 4096 bytes, only 3 remain"),
    ("bin-past-end", lambda _: b"\x81\xa1a\xc6\x7f\xff\xff\xffxx", CorruptFileError,
     r"a msgpack bin at byte 8 declares 2147483647 bytes, only 2 remain"),
    ("deep-nesting", lambda _: b"\x91" * 300 + b"\xc0", CorruptFileError, r"msgpack nesting deeper than 256 levels at byte 257"),
    ("duplicate-key", lambda _: b"\x82\xa1a\x01\xa1a\x02", CorruptFileError, r"msgpack map has the key 'a' twice \(byte 4\)"),
    ("never-used-byte", lambda _: b"\xc1", CorruptFileError, r"byte 0xc1 at 0 is not a msgpack type"),
    ("trailing", lambda _: b"\xc0\xc0", CorruptFileError, r"1 trailing bytes after the msgpack value of the file \(at byte 1\)"),
    ("bad-utf8", lambda _: b"\x81\xa2\xff\xfe\x01", CorruptFileError, r"msgpack str at byte 2 is not valid UTF-8"),
    ("float-key", lambda _: b"\x81\xcb" + struct.pack(">d", 1.5) + b"\x01", UnsupportedValueError,
     r"msgpack map key at byte 1 is float; only str and int keys are supported"),
    ("short-ndarray", lambda _: msgpack.packb({"w": ndarray_ext([2], "float32", b"abcd")}), CorruptFileError,
     r"at w: float32\[2\] needs 8 bytes, the ndarray ext holds 4"),
    ("unknown-dtype", lambda _: msgpack.packb({"w": ndarray_ext([1], "float128", b"x" * 16)}), UnsupportedValueError,
     r"at w: unknown dtype 'float128' in an ndarray ext"),
    ("negative-dim", lambda _: msgpack.packb({"w": ndarray_ext([-1], "uint8", b"")}), CorruptFileError,
     r"at w: an ndarray ext must hold \[shape \(non-negative ints\), dtype name, bin\]"),
    ("complex-scalar", lambda _: msgpack.packb({"c": msgpack.ExtType(2, msgpack.packb((1.0, 2.0)))}), UnsupportedValueError,
     r"at c: msgpack ext type 2 \(flax: a Python complex scalar\) is not supported here"),
    ("bigint-too-long", lambda _: msgpack.packb({"n": msgpack.ExtType(81, b"9" * 5000)}), CorruptFileError,
     r"at n: ext 81 must hold a decimal integer of at most 4000 digits"),
    ("chunk-mismatch", lambda _: msgpack.packb({"w": {"__msgpack_chunked_array__": True, "shape": {"0": 5},
                                                      "chunks": {"0": ndarray_ext([2], "uint8", b"ab")}}}),
     CorruptFileError, r"at w: chunks hold 2 elements, the shape \[5\] needs 5"),
    ("native-edited", ours_with_native_edit, CorruptFileError,
     r"at epoch: the native msgpack value 4 disagrees with the metadata tree, which says 3"),
    ("meta-not-first", lambda _: msgpack.packb({"a": 1, "__sdconvert__": msgpack.ExtType(80, b"\x80")}), CorruptFileError,
     r"'__sdconvert__' must be the first key of the root map"),
    ("meta-version", lambda _: msgpack.packb({"__sdconvert__": msgpack.ExtType(80, msgpack.packb(
        {"version": 9, "wrapped": False, "tree": {"dict": []}}))}), UnsupportedValueError,
     r"'__sdconvert__' version 9 is not one this reader knows \(1\)"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "error", "message"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_msgpack_gives_its_exact_error(
    tmp_path: Path, data: Callable[[Path], bytes], error: type[Exception], message: str
) -> None:
    path = tmp_path / "x.msgpack"
    path.write_bytes(data(tmp_path))
    where = re.escape(str(path)) + (" " if message.startswith("at ") else ": ")
    with pytest.raises(error, match=where + message):
        converters.read(path)
