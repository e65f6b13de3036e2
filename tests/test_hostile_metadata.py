"""Hostile metadata (issue 12): JSON headers, shard indexes, manifest trees, msgpack, DCP ``.metadata``
and tree types. Every case is refused with its exact error (library) and as one line with exit 2,
nothing written (CLI); the resource cases stay within the bar in a fresh process (peak RSS at most
2 x input + 100 MB, a few seconds); and a single-bit flip anywhere in the metadata of our files is
refused at read, or reported by ``verify --deep``, or leaves the tree as read identical."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

import converters
from converters.core.budget import Budget
from converters.core.errors import ConverterError, CorruptFileError, UnsafeFileError, UnsupportedValueError
from converters.core.sources import BufferSource
from converters.core.tree import Checkpoint, TensorRef, validate

CLI = Path(__file__).resolve().parent.parent / "cli.py"
MIB = 1 << 20

# ---------------------------------------------------------------- safetensors builders


def st_bytes(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def st_file(name: str, header: dict[str, Any] | bytes, data: bytes = b"") -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(st_bytes(header, data))
        return path

    return build


def st_of_items(item: bytes, count: int) -> bytes:
    """A header whose one entry holds ``count`` copies of ``item``: megabytes of tiny JSON values."""
    return b'{"a":[' + b",".join([item] * count) + b"]}"


def st_tree(tree: str, tensors: dict[str, Any] | None = None, data: bytes = b"", **extra: str) -> dict[str, Any]:
    return {"__metadata__": {"sdconvert.tree": tree, **extra}, **(tensors or {})}


W = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
BIG = "9" * 5000

# ---------------------------------------------------------------- sharded builders


def sharded(index: dict[str, Any] | bytes, shards: dict[str, bytes] | None = None) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        target = folder / "sharded"
        target.mkdir()
        raw = index if isinstance(index, bytes) else json.dumps(index).encode()
        (target / "model.safetensors.index.json").write_bytes(raw)
        for name, data in (shards or {}).items():
            (target / name).write_bytes(data)
        return target

    return build


SHARD = st_bytes(W, bytes(4))


def index_is_symlink(folder: Path) -> Path:
    outside = folder / "elsewhere.index.json"
    outside.write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    target = folder / "sharded"
    target.mkdir()
    (target / "a.safetensors").write_bytes(SHARD)
    (target / "model.safetensors.index.json").symlink_to(outside)
    return target


def index_path_is_symlink(folder: Path) -> Path:
    return index_is_symlink(folder) / "model.safetensors.index.json"


def shard_is_symlink(folder: Path) -> Path:
    (folder / "outside.safetensors").write_bytes(SHARD)
    target = folder / "sharded"
    target.mkdir()
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    (target / "a.safetensors").symlink_to(folder / "outside.safetensors")
    return target


# ---------------------------------------------------------------- msgpack builders


def mp_file(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return build


def ours(meta: dict[str, Any], **native: Any) -> bytes:
    """A msgpack file shaped like ours: the ext 80 metadata first, then the native tree."""
    return msgpack.packb({"__sdconvert__": msgpack.ExtType(80, msgpack.packb(meta)), **native})


def ndarray(shape: list[int], dtype: str = "float32", data: bytes = b"") -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([shape, dtype, data]))


PLAIN_TREE = {"dict": [["a", {"int": 1}]]}
HEX = "0" * 64

# ---------------------------------------------------------------- DCP builders


def torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def dcp_parts() -> dict[str, Any]:
    """The pieces of a valid one-rank DCP folder: w = arange(4), m = [[0, 1], [2, 3]] in two row
    chunks, step = 7 (a bytes value), each blob a torch.save archive in __0_0.distcp."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    parts: dict[str, Any] = {
        "blobs": {
            ("w", (0,)): torch_bytes(torch.arange(4, dtype=torch.float32)),
            ("m", (0, 0)): torch_bytes(torch.tensor([[0.0, 1.0]])),
            ("m", (1, 0)): torch_bytes(torch.tensor([[2.0, 3.0]])),
            ("step", None): torch_bytes(7),
        }
    }
    layout(parts)
    properties = TensorProperties(dtype=torch.float32)
    parts["entries"] = {
        "w": TensorStorageMetadata(
            properties, torch.Size([4]), [ChunkStorageMetadata(torch.Size([0]), torch.Size([4]))]
        ),
        "m": TensorStorageMetadata(
            properties,
            torch.Size([2, 2]),
            [
                ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([1, 2])),
                ChunkStorageMetadata(torch.Size([1, 0]), torch.Size([1, 2])),
            ],
        ),
        "step": BytesStorageMetadata(),
    }
    parts["planner"] = {"w": ("w",), "m": ("m",), "step": ("state", "step")}
    return parts


def layout(parts: dict[str, Any]) -> None:
    """The data file and storage_data for ``parts["blobs"]``, one after another."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    data, storage = b"", {}
    for (fqn, offsets), blob in parts["blobs"].items():
        index = MetadataIndex(fqn, torch.Size(offsets) if offsets is not None else None)
        storage[index] = _StorageInfo("__0_0.distcp", len(data), len(blob))
        data += blob
    parts["data"], parts["storage"] = data, storage


def dcp(change: Callable[[dict[str, Any]], None] | None = None) -> Callable[[Path], Path]:
    """A DCP folder from ``dcp_parts``, after ``change`` edits its pieces (DCP's own dataclasses
    take any value, so wrong types are pickled as they are)."""

    def build(folder: Path) -> Path:
        from torch.distributed.checkpoint.metadata import Metadata

        parts = dcp_parts()
        if change is not None:
            change(parts)
        target = folder / "dcp"
        target.mkdir()
        metadata = Metadata(parts["entries"], planner_data=parts["planner"], storage_data=parts["storage"])
        (target / ".metadata").write_bytes(parts.get("pickle") or _pickle(metadata))
        (target / "__0_0.distcp").write_bytes(parts["data"])
        return target

    return build


def _pickle(value: Any) -> bytes:
    import pickle

    return pickle.dumps(value, protocol=2)


def storage_info(parts: dict[str, Any], fqn: str) -> Any:
    return next(info for index, info in parts["storage"].items() if index.fqn == fqn)


def set_storage(fqn: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(parts: dict[str, Any]) -> None:
        info = storage_info(parts, fqn)
        for name, value in fields.items():
            setattr(info, name, value)

    return change


def set_entry(fqn: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(parts: dict[str, Any]) -> None:
        for name, value in fields.items():
            setattr(parts["entries"][fqn], name, value)

    return change


def set_chunk(fqn: str, number: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(parts: dict[str, Any]) -> None:
        for name, value in fields.items():
            setattr(parts["entries"][fqn].chunks[number], name, value)

    return change


def set_planner(**paths: Any) -> Callable[[dict[str, Any]], None]:
    def change(parts: dict[str, Any]) -> None:
        parts["planner"].update(paths)

    return change


def set_metadata(**fields: Any) -> Callable[[dict[str, Any]], None]:
    """Replace whole Metadata fields (the dicts themselves)."""

    def change(parts: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.metadata import Metadata

        values = {"state_dict_metadata": parts["entries"], "planner_data": parts["planner"]}
        values["storage_data"] = parts["storage"]
        values.update(fields)
        parts["pickle"] = _pickle(Metadata(**values))

    return change


def overlapping_ranges(parts: dict[str, Any]) -> None:
    storage_info(parts, "step").offset = storage_info(parts, "w").offset


def chunks_overlap(parts: dict[str, Any]) -> None:
    """m's chunks: column 0 (2 x 1) and row 1 (1 x 2). They hold 4 elements, as m needs, but
    overlap at (1, 0) and leave (0, 1) a hole."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    parts["entries"]["m"].chunks[0] = ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 1]))
    parts["blobs"][("m", (0, 0))] = torch_bytes(torch.tensor([[0.0], [2.0]]))
    layout(parts)


def remove_chunk(fqn: str, number: int) -> Callable[[dict[str, Any]], None]:
    def change(parts: dict[str, Any]) -> None:
        del parts["entries"][fqn].chunks[number]

    return change


def metadata_symlink(folder: Path) -> Path:
    target = dcp()(folder)
    outside = folder / "outside.metadata"
    (target / ".metadata").rename(outside)
    (target / ".metadata").symlink_to(outside)
    return target


def data_symlink(folder: Path) -> Path:
    target = dcp()(folder)
    outside = folder / "outside.distcp"
    (target / "__0_0.distcp").rename(outside)
    (target / "__0_0.distcp").symlink_to(outside)
    return target


# ---------------------------------------------------------------- tree-type builders


def tree_metadata_file(metadata: str) -> Callable[[Path], Path]:
    """A safetensors file whose stored tree gives an OrderedDict the ``metadata`` node given."""
    tree = '{"odict":[["w",{"tensor":"w"}]],"metadata":' + metadata + "}"
    return st_file("x.safetensors", st_tree(tree, W), bytes(4))


# ---------------------------------------------------------------- the table

Builder = Callable[[Path], Path]
BUDGET_REFUSAL = r"would need more than \d+ MiB of memory to read \({what}\); the limit for a \d+-byte input"

CASES: list[tuple[str, Builder, type[ConverterError], str]] = [
    # --- JSON: resource bounds (charged before json.loads), int limit, strictness
    (
        "st-header-of-empty-lists",
        st_file("x.safetensors", st_of_items(b"[]", 1_500_000)),
        CorruptFileError,
        BUDGET_REFUSAL.format(what="values in the safetensors header"),
    ),
    (
        "st-header-of-empty-dicts",
        st_file("x.safetensors", st_of_items(b"{}", 1_500_000)),
        CorruptFileError,
        BUDGET_REFUSAL.format(what="values in the safetensors header"),
    ),
    (
        "st-header-of-empty-strings",
        st_file("x.safetensors", st_of_items(b'""', 1_500_000)),
        CorruptFileError,
        BUDGET_REFUSAL.format(what="values in the safetensors header"),
    ),
    (
        "st-many-tiny-tensors",
        st_file(
            "x.safetensors",
            {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(60_000)},
            bytes(60_000),
        ),
        CorruptFileError,
        BUDGET_REFUSAL.format(what="(values in |the text of )?(the safetensors header|tensors)"),
    ),
    (
        "st-int-past-4300-digits",
        st_file("x.safetensors", b'{"a":{"dtype":"U8","shape":[' + BIG.encode() + b'],"data_offsets":[0,0]}}'),
        CorruptFileError,
        r"the safetensors header holds an integer of more than 4300 digits",
    ),
    (
        "st-tree-int-past-4300-digits",
        st_file("x.safetensors", st_tree('{"int":' + BIG + "}")),
        CorruptFileError,
        r"holds an integer of more than 4300 digits",
    ),
    (
        "st-digests-int-past-4300-digits",
        st_file("x.safetensors", st_tree('{"tensor":"w"}', W, **{"sdconvert.blake3": '{"w":' + BIG + "}"}), bytes(4)),
        CorruptFileError,
        r"__metadata__\['sdconvert.blake3'\] holds an integer of more than 4300 digits",
    ),
    (
        "st-nan-is-not-json",
        st_file("x.safetensors", b'{"__metadata__":{"a":"b"},"x":NaN}'),
        CorruptFileError,
        r"the safetensors header is not valid JSON: NaN is not a JSON value",
    ),
    (
        "st-tree-infinity-is-not-json",
        st_file("x.safetensors", st_tree('{"float":-Infinity}')),
        CorruptFileError,
        r"is not valid JSON: -Infinity is not a JSON value",
    ),
    (
        "st-digests-of-wrong-type",
        st_file("x.safetensors", st_tree('{"tensor":"w"}', W, **{"sdconvert.blake3": '{"w":[1,2]}'}), bytes(4)),
        CorruptFileError,
        r"must map str keys to 64-digit hex BLAKE3 digests",
    ),
    (
        "st-tree-digest-not-hex",
        st_file("x.safetensors", st_tree('{"tensor":"w"}', W, **{"sdconvert.tree_blake3": "Z" * 64}), bytes(4)),
        CorruptFileError,
        r"__metadata__\['sdconvert.tree_blake3'\] must be 64 lowercase hex digits",
    ),
    # --- tensor shapes: int64 dims, at most 64 of them
    (
        "st-shape-2**64",
        st_file("x.safetensors", {"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}),
        CorruptFileError,
        r"tensor 'a': shape must be a list of non-negative ints below 2\*\*63 \(int64\), "
        r"found \[0, 18446744073709551616\]",
    ),
    (
        "st-shape-65-dims",
        st_file("x.safetensors", {"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, bytes(4)),
        CorruptFileError,
        r"tensor 'a': shape has 65 dims, at most 64 are supported",
    ),
    # --- tree types: an OrderedDict's _metadata
    (
        "tree-metadata-holds-a-tensor",
        tree_metadata_file('{"dict":[["",{"tensor":"w"}]]}'),
        CorruptFileError,
        r"at _metadata/: an OrderedDict's _metadata holds a tensor; only plain values",
    ),
    (
        "tree-metadata-is-a-list",
        tree_metadata_file('{"list":[{"int":1}]}'),
        UnsupportedValueError,
        r"at _metadata: an OrderedDict's _metadata must be a dict with str keys \(module prefixes\), found list",
    ),
    (
        "tree-metadata-int-key",
        tree_metadata_file('{"dict":[[0,{"dict":[]}]]}'),
        UnsupportedValueError,
        r"at _metadata: an OrderedDict's _metadata must be a dict with str keys \(module prefixes\), found dict with",
    ),
    # --- sharded safetensors: indexes are never followed as shards; symlinks refused
    (
        "index-names-itself",
        sharded({"weight_map": {"w": "model.safetensors.index.json"}}),
        CorruptFileError,
        r"shard 'model.safetensors.index.json' names an index, not a safetensors file; indexes are not followed",
    ),
    (
        "index-names-another-index",
        sharded(
            {"weight_map": {"w": "b.safetensors.index.json"}},
            {"b.safetensors.index.json": json.dumps({"weight_map": {"w": "model.safetensors.index.json"}}).encode()},
        ),
        CorruptFileError,
        r"shard 'b.safetensors.index.json' names an index, not a safetensors file",
    ),
    (
        "shard-holding-an-index",
        sharded({"weight_map": {"w": "a.safetensors"}}, {"a.safetensors": b'{"weight_map":{"w":"a.safetensors"}}'}),
        CorruptFileError,
        r"a.safetensors: header length \d+ exceeds the 100000000-byte limit",
    ),
    (
        "index-of-empty-lists",
        sharded(b'{"weight_map":{},"metadata":{"x":[' + b",".join([b"[]"] * 1_500_000) + b"]}}"),
        CorruptFileError,
        BUDGET_REFUSAL.format(what="values in the shard index"),
    ),
    (
        "index-int-past-4300-digits",
        sharded(b'{"weight_map":{},"metadata":{"total_size":' + BIG.encode() + b"}}"),
        CorruptFileError,
        r"the shard index holds an integer of more than 4300 digits",
    ),
    (
        "index-tree-digest-not-hex",
        sharded(
            {"weight_map": {"w": "a.safetensors"}, "metadata": {"sdconvert.tree_blake3": 5}}, {"a.safetensors": SHARD}
        ),
        CorruptFileError,
        r"metadata\['sdconvert.tree_blake3'\] must be 64 lowercase hex digits",
    ),
    (
        "index-is-a-symlink",
        index_is_symlink,
        CorruptFileError,
        r"the shard index is a symbolic link, not a regular file in its folder; refusing to follow it",
    ),
    (
        "index-given-is-a-symlink",
        index_path_is_symlink,
        CorruptFileError,
        r"the shard index is a symbolic link, not a regular file in its folder; refusing to follow it",
    ),
    (
        "shard-is-a-symlink",
        shard_is_symlink,
        CorruptFileError,
        r"shard 'a.safetensors' is not a regular file beside the index",
    ),
    # --- msgpack: values charged before they are built; ext 81; digest maps; shapes
    (
        "mp-empty-maps",
        mp_file("x.msgpack", b"\xdd" + struct.pack(">I", 2_000_000) + b"\x80" * 2_000_000),
        CorruptFileError,
        BUDGET_REFUSAL.format(what="msgpack values"),
    ),
    (
        "mp-empty-arrays-in-a-map",
        mp_file("x.msgpack", msgpack.packb({"x": [[] for _ in range(1_000_000)]})),
        CorruptFileError,
        BUDGET_REFUSAL.format(what="msgpack values"),
    ),
    (
        "mp-bigint-two-minus-signs",
        mp_file("x.msgpack", msgpack.packb({"a": msgpack.ExtType(81, b"--5")})),
        CorruptFileError,
        r"at a: ext 81 must hold a decimal integer of at most 4000 digits",
    ),
    (
        "mp-bigint-not-digits",
        mp_file("x.msgpack", msgpack.packb({"a": msgpack.ExtType(81, b"12e4")})),
        CorruptFileError,
        r"at a: ext 81 must hold a decimal integer",
    ),
    (
        "mp-bigint-empty",
        mp_file("x.msgpack", msgpack.packb({"a": msgpack.ExtType(81, b"")})),
        CorruptFileError,
        r"at a: ext 81 must hold a decimal integer",
    ),
    (
        "mp-bigint-unicode-digits",
        mp_file("x.msgpack", msgpack.packb({"a": msgpack.ExtType(81, "١٢".encode())})),
        CorruptFileError,
        r"at a: ext 81 must hold a decimal integer",
    ),
    (
        "mp-digests-hold-bytes",
        mp_file(
            "x.msgpack",
            ours({"version": 1, "wrapped": False, "tree": PLAIN_TREE, "blake3": {"a": HEX.encode()}}, a=1),
        ),
        CorruptFileError,
        r"'__sdconvert__' blake3 must map str keys to 64-digit hex BLAKE3 digests",
    ),
    (
        "mp-digests-int-keys",
        mp_file("x.msgpack", ours({"version": 1, "wrapped": False, "tree": PLAIN_TREE, "blake3": {5: HEX}}, a=1)),
        CorruptFileError,
        r"'__sdconvert__' blake3 must map str keys to 64-digit hex BLAKE3 digests",
    ),
    (
        "mp-tree-digest-bytes",
        mp_file(
            "x.msgpack",
            ours({"version": 1, "wrapped": False, "tree": PLAIN_TREE, "tree_blake3": HEX.encode()}, a=1),
        ),
        CorruptFileError,
        r"'__sdconvert__' tree_blake3 must be 64 lowercase hex digits",
    ),
    (
        "mp-version-true",
        mp_file("x.msgpack", ours({"version": True, "wrapped": False, "tree": PLAIN_TREE}, a=1)),
        UnsupportedValueError,
        r"'__sdconvert__' version True is not one this reader knows \(1\)",
    ),
    (
        "mp-metadata-holds-a-tensor",
        mp_file(
            "x.msgpack",
            ours(
                {
                    "version": 1,
                    "wrapped": False,
                    "tree": {"odict": [["w", {"tensor": "w"}]], "metadata": {"dict": [["", {"tensor": "w"}]]}},
                },
                w=ndarray([1], data=bytes(4)),
            ),
        ),
        CorruptFileError,
        r"at _metadata/: an OrderedDict's _metadata holds a tensor",
    ),
    (
        "mp-shape-2**64",
        mp_file("x.msgpack", msgpack.packb({"w": ndarray([0, 2**64 - 1])})),
        CorruptFileError,
        r"at w: an ndarray ext's shape \[0, 18446744073709551615\] must have at most 64 dims, each below 2\*\*63",
    ),
    (
        "mp-shape-65-dims",
        mp_file("x.msgpack", msgpack.packb({"w": ndarray([1] * 65, data=bytes(4))})),
        CorruptFileError,
        r"at w: an ndarray ext's shape \[1, 1, .* must have at most 64 dims",
    ),
    # --- DCP .metadata: list indexes charged; every field's type and range; symlinks
    (
        "dcp-huge-list-index",
        dcp(set_planner(step=("state", 10**7))),
        CorruptFileError,
        BUDGET_REFUSAL.format(what="list slots asked for by planner_data paths"),
    ),
    (
        "dcp-huge-list-index-mid-path",
        dcp(set_planner(step=("state", 999_999, "x"))),
        CorruptFileError,
        BUDGET_REFUSAL.format(what="list slots asked for by planner_data paths"),
    ),
    (
        "dcp-negative-list-index",
        dcp(set_planner(step=("state", -1))),
        CorruptFileError,
        r"planner_data path \('state', -1\) indexes a list with -1",
    ),
    (
        "dcp-two-values-at-one-path",
        dcp(set_planner(step=("w",))),
        CorruptFileError,
        r"planner_data puts two values at \('w',\)",
    ),
    (
        "dcp-path-through-a-tensor",
        dcp(set_planner(step=("w", "x"))),
        CorruptFileError,
        r"planner_data path \('w', 'x'\) asks for a dict where another entry put something else",
    ),
    (
        "dcp-metadata-is-a-symlink",
        metadata_symlink,
        CorruptFileError,
        r"\.metadata is a symbolic link, not a regular file in the checkpoint folder; refusing to follow it",
    ),
    (
        "dcp-data-file-is-a-symlink",
        data_symlink,
        CorruptFileError,
        r"data file '__0_0.distcp' is not a regular file in the checkpoint folder",
    ),
    (
        "dcp-data-file-missing",
        dcp(set_storage("step", relative_path="__1_0.distcp")),
        CorruptFileError,
        r"data file '__1_0.distcp' is not a regular file in the checkpoint folder",
    ),
    (
        "dcp-data-file-outside",
        dcp(set_storage("step", relative_path="../x.distcp")),
        UnsafeFileError,
        r"data file name '../x.distcp' must be a plain file name in the checkpoint folder",
    ),
    (
        "dcp-offset-past-the-end",
        dcp(set_storage("step", offset=10**9)),
        CorruptFileError,
        r"storage_data puts 'step' at bytes \[1000000000, \d+\) of '__0_0.distcp', which has \d+ bytes",
    ),
    (
        "dcp-negative-offset",
        dcp(set_storage("step", offset=-1)),
        CorruptFileError,
        r"\.metadata: _StorageInfo.offset must be an int in \[0, 2\*\*63\), found -1",
    ),
    (
        "dcp-huge-length",
        dcp(set_storage("w", length=2**70)),
        CorruptFileError,
        r"\.metadata: _StorageInfo.length must be an int in \[0, 2\*\*63\), found 1180591620717411303424",
    ),
    (
        "dcp-overlapping-ranges",
        dcp(overlapping_ranges),
        CorruptFileError,
        r"storage_data gives '(w|step)' and '(w|step)' overlapping bytes of '__0_0.distcp'",
    ),
    (
        "dcp-chunks-overlap",
        dcp(chunks_overlap),
        CorruptFileError,
        r"'m': chunks overlap at \[1, 0\]",
    ),
    (
        "dcp-chunks-leave-a-hole",
        dcp(remove_chunk("m", 1)),
        CorruptFileError,
        r"'m': chunks hold a different number of elements than \[2, 2\]",
    ),
    (
        "dcp-chunk-outside",
        dcp(set_chunk("w", 0, offsets=torch.Size([1]))),
        CorruptFileError,
        r"'w': chunk at \[1\] of \[4\] lies outside \[4\]",
    ),
    (
        "dcp-two-chunks-at-one-place",
        dcp(set_chunk("m", 1, offsets=torch.Size([0, 0]))),
        CorruptFileError,
        r"'m': two chunks at \[0, 0\]",
    ),
    (
        "dcp-chunk-size-of-wrong-rank",
        dcp(set_chunk("m", 0, sizes=torch.Size([2]))),
        CorruptFileError,
        r"'m': a chunk's sizes must be a torch.Size of 2 ints in \[0, 2\*\*63\), found \(2,\)",
    ),
    (
        "dcp-size-2**64",
        dcp(set_entry("w", size=(2**64,))),
        CorruptFileError,
        r"'w': size must be a torch.Size of at most 64 ints in \[0, 2\*\*63\), found \(18446744073709551616,\)",
    ),
    (
        "dcp-properties-not-a-record",
        dcp(set_entry("w", properties=5)),
        CorruptFileError,
        r"'w': properties must be TensorProperties",
    ),
    (
        "dcp-chunks-not-a-list",
        dcp(set_entry("w", chunks="x")),
        CorruptFileError,
        r"'w': chunks must be a non-empty list",
    ),
    (
        "dcp-storage-data-not-a-dict",
        dcp(set_metadata(storage_data=[1, 2])),
        CorruptFileError,
        r"\.metadata: storage_data must be a dict",
    ),
    (
        "dcp-fqn-not-a-str",
        dcp(set_metadata(state_dict_metadata={5: None})),
        CorruptFileError,
        r"state_dict_metadata has the key 5; FQNs are str",
    ),
]


def case_ids() -> list[str]:
    return [case[0] for case in CASES]


def test_the_table_has_no_duplicate_names() -> None:
    assert len(set(case_ids())) == len(CASES)


@pytest.mark.parametrize(("name", "build", "error", "message"), CASES, ids=case_ids())
def test_library_refuses_with_the_exact_error(
    tmp_path: Path, name: str, build: Builder, error: type[ConverterError], message: str
) -> None:
    source = build(tmp_path)
    with pytest.raises(error, match=message):
        converters.read(source)


@pytest.mark.parametrize(("name", "build", "error", "message"), CASES, ids=case_ids())
def test_cli_refuses_with_exit_2_one_line_nothing_written(
    tmp_path: Path, name: str, build: Builder, error: type[ConverterError], message: str
) -> None:
    source = build(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", str(source), str(out / "x.msgpack"), "--from", _format_of(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


def _format_of(source: Path) -> str:
    if source.name.endswith(".msgpack"):
        return "msgpack"
    if (source / ".metadata").is_symlink() or (source / ".metadata").exists():
        return "dcp"
    return "safetensors"


# ---------------------------------------------------------------- wrong types in every DCP field

WRONG_VALUES = [None, "x", -1, 2**70, 1.5, [], {}, (), ("a",), (-1,), [0], True]
DCP_FIELDS: list[tuple[str, Callable[[Any], Callable[[dict[str, Any]], None]]]] = [
    ("Metadata.state_dict_metadata", lambda v: set_metadata(state_dict_metadata=v)),
    ("Metadata.planner_data", lambda v: set_metadata(planner_data=v)),
    ("Metadata.storage_data", lambda v: set_metadata(storage_data=v)),
    ("planner_data path", lambda v: set_planner(w=v)),
    ("TensorStorageMetadata.properties", lambda v: set_entry("w", properties=v)),
    ("TensorStorageMetadata.size", lambda v: set_entry("m", size=v)),
    ("TensorStorageMetadata.chunks", lambda v: set_entry("w", chunks=v)),
    ("ChunkStorageMetadata.offsets", lambda v: set_chunk("m", 1, offsets=v)),
    ("ChunkStorageMetadata.sizes", lambda v: set_chunk("m", 0, sizes=v)),
    ("_StorageInfo.relative_path", lambda v: set_storage("w", relative_path=v)),
    ("_StorageInfo.offset", lambda v: set_storage("m", offset=v)),
    ("_StorageInfo.length", lambda v: set_storage("step", length=v)),
    ("_StorageInfo.transform_descriptors", lambda v: set_storage("w", transform_descriptors=v or ["zlib"])),
    ("MetadataIndex.fqn", lambda v: _set_index("w", fqn=v)),
    ("MetadataIndex.offset", lambda v: _set_index("m", offset=v)),
    ("an entry", lambda v: _set_entry_value("w", v)),
    ("a chunk", lambda v: set_entry("w", chunks=[v])),
]


def _set_index(which: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(parts: dict[str, Any]) -> None:
        index = next(index for index in parts["storage"] if index.fqn == which)
        info = parts["storage"].pop(index)
        for name, value in fields.items():
            object.__setattr__(index, name, value)  # MetadataIndex is frozen
        parts["storage"][index] = info

    return change


def _set_entry_value(fqn: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(parts: dict[str, Any]) -> None:
        parts["entries"][fqn] = value

    return change


@pytest.mark.parametrize(("field", "change"), DCP_FIELDS, ids=[field for field, _ in DCP_FIELDS])
def test_wrong_types_in_every_dcp_field_are_corrupt_file_errors(
    tmp_path: Path, field: str, change: Callable[[Any], Callable[[dict[str, Any]], None]]
) -> None:
    """Each field of each DCP record, given each wrong value: refused as bad input (never another
    exception), or read when the value happens to be harmless (a missing planner path, ...)."""
    refused = 0
    for number, value in enumerate(WRONG_VALUES):
        folder = tmp_path / str(number)
        folder.mkdir()
        try:
            source = dcp(change(value))(folder)
        except TypeError as exc:  # a MetadataIndex with an unhashable field cannot be a dict key
            assert "unhashable" in str(exc)
            continue
        try:
            converters.read(source)
        except ConverterError:
            refused += 1
    assert refused >= len(WRONG_VALUES) // 2, field


# ---------------------------------------------------------------- the budget is one per read


def test_shards_share_the_one_budget_of_the_read(tmp_path: Path) -> None:
    tree = {f"t{i}": TensorRef("float32", (2,), BufferSource.of(bytes(8))) for i in range(6)}
    converters.write(Checkpoint(tree), tmp_path / "s", "safetensors", max_shard_size=16)
    assert len(list((tmp_path / "s").glob("*.safetensors"))) == 3
    budget = Budget.for_path(tmp_path / "s")
    fmt = converters.registry.get("safetensors")
    fmt.read(tmp_path / "s", budget)
    assert budget.tensor_count == 6  # every shard's tensors, once
    # Given the index file, the budget covers the shards it names too (sized for the index alone at first).
    index_budget = Budget.for_path(tmp_path / "s" / "model.safetensors.index.json")
    fmt.read(tmp_path / "s" / "model.safetensors.index.json", index_budget)
    assert index_budget.size == budget.size


def test_legitimate_headers_are_not_refused(tmp_path: Path) -> None:
    """The JSON charge is an upper bound, not a wall: 5,000 tensors of 1 KiB (a 0.7 MB header that
    holds the tree and the digests as JSON strings too) read, alone and as shards."""
    tree = {f"layer{i}.weight": TensorRef("float32", (256,), BufferSource.of(bytes(1024))) for i in range(5_000)}
    converters.write(Checkpoint(tree), tmp_path / "x.safetensors")
    assert len(converters.read(tmp_path / "x.safetensors").tree) == 5_000
    converters.write(Checkpoint(tree), tmp_path / "s", "safetensors", max_shard_size=1 << 20)
    assert len(converters.read(tmp_path / "s" / "model.safetensors.index.json").tree) == 5_000


# ---------------------------------------------------------------- resource bounds in a fresh process

MEMORY_CASES = [
    "st-header-of-empty-lists",
    "st-header-of-empty-strings",
    "st-many-tiny-tensors",
    "index-of-empty-lists",
    "index-names-itself",
    "mp-empty-maps",
    "dcp-huge-list-index",
]


@pytest.mark.parametrize("name", MEMORY_CASES)
def test_hostile_metadata_stays_within_the_memory_and_time_bar(tmp_path: Path, name: str) -> None:
    _, build, _, _ = next(case for case in CASES if case[0] == name)
    source = build(tmp_path)
    size = _input_size(source)
    started = time.perf_counter()
    command = [sys.executable, str(CLI), "convert", str(source), str(tmp_path / "out.msgpack")]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *command, "--from", _format_of(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    code, peak_kib = (int(word) for word in result.stdout.split())
    assert code == 2, result.stderr
    peak = peak_kib * 1024
    assert peak <= 2 * size + 100 * MIB, f"peak RSS {peak >> 20} MiB for a {size}-byte input"
    assert elapsed < 10, f"{elapsed:.1f} s"


# Runs a command and prints its exit code and peak RSS (KiB), like /usr/bin/time: a process forked
# from pytest (with torch imported) would report the parent's pages as its own peak.
PEAK_RSS = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n"
)


def _input_size(source: Path) -> int:
    if source.is_dir():
        return sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    return source.stat().st_size


# ---------------------------------------------------------------- tree types


def test_tensor_ref_refuses_dims_readers_would_refuse() -> None:
    empty = BufferSource.of(b"")
    for shape in [(0, 2**63), (0, 2**64), (-1,), (True,), (1.0,), (0,) * 65]:
        with pytest.raises(UnsupportedValueError, match=r"at most 64 dims, each an int in \[0, 2\*\*63\)"):
            TensorRef("float32", shape, empty)  # type: ignore[arg-type]
    assert TensorRef("float32", (0, 2**63 - 1), empty).nbytes == 0
    assert TensorRef("float32", (1,) * 64, BufferSource.of(bytes(4))).nbytes == 4


def test_a_writer_never_writes_a_shape_its_readers_refuse(tmp_path: Path) -> None:
    """[0, 2**64] was read (0 elements) and written; now no TensorRef holds it, so no writer can."""
    source = tmp_path / "x.safetensors"
    source.write_bytes(st_bytes({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}))
    with pytest.raises(CorruptFileError):
        converters.convert(source, tmp_path / "y.msgpack")
    assert not (tmp_path / "y.msgpack").exists()


def test_what_validate_accepts_in_metadata() -> None:
    """``_metadata``: a dict/OrderedDict of str keys (module prefixes) whose values are plain values."""
    ok: OrderedDict[str, Any] = OrderedDict()
    ok._metadata = OrderedDict([("", {"version": 1}), ("bn", {"version": 2, "note": ["x", 1.5, None]})])  # type: ignore[attr-defined]
    validate(ok)
    tensor = TensorRef("float32", (), BufferSource.of(bytes(4)))
    for metadata, message in [
        ({"": {"version": tensor}}, r"at _metadata//version: an OrderedDict's _metadata holds a tensor"),
        ({"": [tensor]}, r"at _metadata//0: an OrderedDict's _metadata holds a tensor"),
        ([1], r"at _metadata: an OrderedDict's _metadata must be a dict with str keys"),
        ({1: {}}, r"at _metadata: an OrderedDict's _metadata must be a dict with str keys .* non-str key"),
        (tensor, r"at _metadata: an OrderedDict's _metadata must be a dict with str keys .* found TensorRef"),
    ]:
        bad: OrderedDict[str, Any] = OrderedDict()
        bad._metadata = metadata  # type: ignore[attr-defined]
        with pytest.raises(UnsupportedValueError, match=message):
            validate(bad)


def test_a_pt_file_whose_metadata_holds_a_tensor_is_refused(tmp_path: Path) -> None:
    state: OrderedDict[str, Any] = OrderedDict(w=torch.ones(2))
    state._metadata = OrderedDict([("", {"version": torch.zeros(1)})])  # type: ignore[attr-defined]
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(ConverterError, match=r"_metadata.* holds a tensor"):
        converters.read(tmp_path / "x.pt")


# ---------------------------------------------------------------- the tree digest


def small_checkpoint() -> Checkpoint:
    """Every kind of value the stored tree says, with small tensors (one tied, one with 0 elements)."""
    w = TensorRef("float32", (2,), BufferSource.of(struct.pack("<2f", 1.5, -2.0)))
    state: OrderedDict[str, Any] = OrderedDict(w=w)
    state._metadata = OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
    tree = {
        "m": state,
        "t": w,
        "e": TensorRef("float16", (0, 3), BufferSource.of(b"")),
        "epoch": 3,
        "o": {0: {"lr": 0.1, "b": (0.9, None)}, "n": 2**70, "on": True, "s": "x"},
    }
    return Checkpoint(tree)


def metadata_spans(path: Path) -> list[tuple[Path, int, int]]:
    """The (file, start, end) byte ranges of our files that are not tensor bytes."""
    if path.is_dir():
        spans = [(path / "model.safetensors.index.json", 0, (path / "model.safetensors.index.json").stat().st_size)]
        for shard in sorted(path.glob("*.safetensors")):
            spans += metadata_spans(shard)
        return spans
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return [(path, 0, 8 + struct.unpack("<Q", data[:8])[0])]
    # msgpack: everything but the bin payloads of the ndarray exts (the tensor bytes).
    ranges, position = [], 0
    for _, ref in converters.read(path).unique_tensors():
        offset = ref.source.offset  # type: ignore[attr-defined]
        ranges.append((path, position, offset))
        position = offset + ref.nbytes
    ranges.append((path, position, len(data)))
    return ranges


def flip_outcome(path: Path, original: Path) -> str:
    try:
        problems = converters.verify(path, deep=True)
    except ConverterError:
        return "refused"
    if problems:
        return "reported"
    return "identical" if converters.verify(original, path) == [] else "MISSED"


@pytest.mark.parametrize("target", ["x.safetensors", "sharded", "x.msgpack"])
def test_every_single_bit_flip_in_the_metadata_is_caught_or_harmless(tmp_path: Path, target: str) -> None:
    original = tmp_path / "original" / target
    original.parent.mkdir()
    options = {"max_shard_size": 8} if target == "sharded" else {}
    converters.write(
        small_checkpoint(), original, "msgpack" if target.endswith(".msgpack") else "safetensors", **options
    )
    assert converters.verify(original, deep=True) == []
    assert converters.read(original).tree_digest is not None
    flipped = tmp_path / "flipped" / target
    shutil.copytree(original.parent, flipped.parent)
    outcomes: dict[str, int] = {}
    missed = []
    for file, start, end in metadata_spans(original):
        copy = flipped.parent / file.relative_to(original.parent)
        data = file.read_bytes()
        changed = bytearray(data)
        for position in range(start, end):
            bit = position % 8  # one bit per byte, each bit position in turn
            changed[position] ^= 1 << bit
            copy.write_bytes(changed)
            changed[position] ^= 1 << bit
            outcome = flip_outcome(flipped, original)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome == "MISSED":
                missed.append((copy.name, position, bit))
        copy.write_bytes(data)
    assert not missed, missed[:10]
    assert outcomes.get("reported", 0) > 0 and outcomes.get("refused", 0) > 0, outcomes


def test_a_changed_value_is_reported_by_verify_deep_in_every_format_that_stores_the_digest(tmp_path: Path) -> None:
    """epoch 3 -> 7 in the stored tree: the bytes of every tensor are intact, the tree is not."""
    for target, fmt, options in [
        ("x.safetensors", "safetensors", {}),
        ("s", "safetensors", {"max_shard_size": 8}),
        ("x.msgpack", "msgpack", {}),
    ]:
        path = tmp_path / target
        converters.write(small_checkpoint(), path, fmt, **options)
        edited = path / "model.safetensors.index.json" if path.is_dir() else path
        data = edited.read_bytes()
        if fmt == "msgpack":
            # the metadata tree and the native tree agree on 3; both say 7 now (a consistent edit)
            data = data.replace(b"\xa3int\x03", b"\xa3int\x07").replace(b"\xa5epoch\x03", b"\xa5epoch\x07")
        else:
            data = data.replace(b'{\\\\"int\\\\":3}', b'{\\\\"int\\\\":7}').replace(b'{\\"int\\":3}', b'{\\"int\\":7}')
        assert data != edited.read_bytes()
        edited.write_bytes(data)
        assert converters.read(path).tree["epoch"] == 7
        problems = converters.verify(path, deep=True)
        assert any("does not match its stored BLAKE3 digest" in p for p in problems), problems
        with pytest.raises(CorruptFileError, match=r"the tree .* does not match its stored BLAKE3 digest"):
            converters.load(path, check=True)
