"""``safetensors``: an 8-byte header length, a JSON header, then the tensors' bytes back to back.

Read and written by this module itself (the ``safetensors`` package is only used by the tests, as
the reference reader). Spec of what we add: ``schemas/safetensors.md``. In short:

- a bare ``state_dict`` is stored under its own keys, so ``safetensors.torch.load_file`` followed by
  ``Net().load_state_dict(...)`` works without this project;
- other trees store tensors under their path keys (``optimizer_state_dict/state/0/momentum_buffer``);
- ``__metadata__`` holds ``"format": "pt"`` and ``"sdconvert.tree"``, the manifest tree node (types,
  key order, non-tensor values), so one file round-trips alone.

Reading follows the rules of the reference implementation: header at most 100 MB and inside the
file, no duplicate keys, byte ranges contiguous from 0 without gaps or overlaps, each exactly
shape × itemsize, and nothing after the last tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ...core import manifests
from ...core.atomic import atomic_output
from ...core.budget import Budget
from ...core.contract import FormatBase, WriteContext, option
from ...core.dtypes import itemsize, numel
from ...core.errors import CorruptFileError, UnsupportedValueError
from ...core.sources import FileRange
from ...core.stored import loads_json_strict, read_digests, tree_from_stored
from ...core.tree import Checkpoint, TensorRef
from ...core.writing import DIGEST_PLACEHOLDER, Reserved, TensorWriter
from . import sharded

MAX_HEADER_BYTES = 100_000_000
TREE_KEY = "sdconvert.tree"
VERSION_KEY = "sdconvert.version"
DIGESTS_KEY = "sdconvert.blake3"
HEADER_ALIGN = 64  # the format needs 8; 64 starts the data where torch would align a tensor


# torch dtype name -> the safetensors header's "dtype" code.
DTYPE_CODES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0",
    "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "bool": "BOOL", "complex64": "C64",
}  # fmt: skip
BY_CODE = {code: name for name, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class SafetensorsOptions:
    max_shard_size: int | None = option(
        None,
        "write DST as a folder of shards + index, e.g. 5GB or 512MiB",
        metavar="SIZE",
    )

    def __post_init__(self) -> None:
        if self.max_shard_size is not None:
            object.__setattr__(self, "max_shard_size", sharded.parse_size(self.max_shard_size))


class SafetensorsFormat(FormatBase):
    name = "safetensors"
    suffixes: tuple[str, ...] = (".safetensors", sharded.INDEX_SUFFIX)
    description = "safetensors (Hugging Face): Python, Rust, JS, transformers, candle, MLX"
    dtype_codes: ClassVar[Mapping[str, Any]] = DTYPE_CODES
    Options = SafetensorsOptions

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self.max_header_bytes = max_header_bytes

    def reads_folder(self, path: Path) -> bool:
        return sharded.index_in(path) is not None

    def sniff(self, head: bytes) -> bool:
        if len(head) < 10:
            return False
        (length,) = struct.unpack("<Q", head[:8])
        return 2 <= length <= self.max_header_bytes and head[8:9] == b"{"

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        path = Path(path)
        index = sharded.index_in(path) if path.is_dir() else path if path.name.endswith(sharded.INDEX_SUFFIX) else None
        if index is not None:
            return sharded.read_sharded(self, index, budget)
        if path.is_dir():
            raise CorruptFileError(f"the folder holds no {sharded.INDEX_NAME}", file=path)
        header, data_start = self._read_header(path)
        metadata = header.pop("__metadata__", None)
        if metadata is not None and (type(metadata) is not dict or any(type(v) is not str for v in metadata.values())):
            raise CorruptFileError("__metadata__ must map strings to strings", file=path)
        refs = _tensor_refs(path, header, data_start)
        if metadata and DIGESTS_KEY in metadata:
            digests = read_digests(metadata[DIGESTS_KEY], path, f"__metadata__[{DIGESTS_KEY!r}]")
            refs = {key: ref.with_stored_digest(digests.get(key)) for key, ref in refs.items()}
        # Without our tree (a file from another tool) the tensors form a flat dict in header order.
        tree = _tree_from_metadata(path, metadata, refs) if metadata and TREE_KEY in metadata else dict(refs)
        return Checkpoint(tree, path)

    def _read_header(self, path: Path) -> tuple[dict[str, Any], int]:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CorruptFileError(
                    f"file is {size} bytes; a safetensors file starts with an 8-byte header length",
                    file=path,
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > self.max_header_bytes:
                raise CorruptFileError(
                    f"header length {length} exceeds the {self.max_header_bytes}-byte limit", file=path
                )
            if 8 + length > size:
                raise CorruptFileError(f"header length {length} runs past the end of the {size}-byte file", file=path)
            raw = handle.read(length)
        if not raw.startswith(b"{"):
            raise CorruptFileError("header does not start with '{'", file=path)
        header = loads_json_strict(raw.rstrip(b" "), path, "the safetensors header")
        if type(header) is not dict:
            raise CorruptFileError("header is not a JSON object", file=path)
        return header, 8 + length

    def replaceable(self, path: Path) -> bool:
        return sharded.replaceable(path)

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: SafetensorsOptions) -> None:
        if options.max_shard_size is not None:
            sharded.write_sharded(self, checkpoint, Path(path), options.max_shard_size, context)
            return
        keys = manifests.storage_keys(checkpoint.tree)
        tensors = checkpoint.unique_tensors()  # a tied tensor is stored once; the tree names it twice
        # Widest elements first keeps every tensor aligned to its element size (the header is
        # padded to 8), as the reference writer does; ties keep tree order.
        order = sorted(tensors, key=lambda item: -itemsize(item[1].dtype))
        metadata = {
            "format": "pt",
            VERSION_KEY: str(manifests.MANIFEST_VERSION),
            TREE_KEY: json.dumps(manifests.encode_tree(checkpoint.tree, keys), separators=(",", ":")),
        }
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for tensor_path, ref in order:
            header[keys[tensor_path]] = {
                "dtype": DTYPE_CODES[ref.dtype],
                "shape": list(ref.shape),
                "data_offsets": [offset, offset + ref.nbytes],
            }
            offset += ref.nbytes
        digests = {keys[tensor_path]: DIGEST_PLACEHOLDER for tensor_path, _ in order}

        def encode_header() -> bytes:
            metadata[DIGESTS_KEY] = json.dumps(digests, separators=(",", ":"))
            encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
            return encoded + b" " * (-(8 + len(encoded)) % HEADER_ALIGN)

        tensor_writer = TensorWriter(context, checkpoint.origin)
        with atomic_output(Path(path), fsync=context.fsync, overwrite=context.overwrite) as out:
            out.write(struct.pack("<Q", len(encode_header())))
            reserved = Reserved(out, encode_header)
            for tensor_path, ref in order:
                digests[keys[tensor_path]] = tensor_writer.copy(out, ref, tensor_path).digest
            reserved.rewrite()


def _tensor_refs(path: Path, header: dict[str, Any], data_start: int) -> dict[str, TensorRef]:
    size = path.stat().st_size
    spans = []
    for key, info in header.items():
        if type(info) is not dict or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CorruptFileError(
                f"tensor {key!r}: header entry must have exactly dtype, shape, data_offsets", file=path
            )
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        name = BY_CODE.get(code) if type(code) is str else None
        if name is None:
            raise UnsupportedValueError(f"tensor {key!r}: unknown safetensors dtype {code!r}", file=path)
        if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
            raise CorruptFileError(
                f"tensor {key!r}: shape must be a list of non-negative ints, found {shape!r:.60}", file=path
            )
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or any(type(o) is not int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CorruptFileError(
                f"tensor {key!r}: data_offsets must be [begin, end] with 0 <= begin <= end, found {offsets!r:.60}",
                file=path,
            )
        expected = numel(tuple(shape)) * itemsize(name)
        if offsets[1] - offsets[0] != expected:
            raise CorruptFileError(
                f"tensor {key!r}: {code}{shape} needs {expected} bytes, data_offsets span {offsets[1] - offsets[0]}",
                file=path,
            )
        spans.append((offsets[0], offsets[1], key, name, tuple(shape)))
    position = 0
    for begin, end, key, _, _ in sorted(spans, key=lambda s: (s[0], s[1])):
        if begin != position:
            kind = "a gap" if begin > position else "an overlap"
            raise CorruptFileError(
                f"tensor {key!r}: {kind} in the data (starts at {begin}, expected {position})", file=path
            )
        position = end
    if data_start + position != size:
        problem = "trailing bytes after" if data_start + position < size else "the file ends before"
        raise CorruptFileError(
            f"{problem} the tensor data (header says {data_start + position} bytes, file has {size})", file=path
        )
    return {
        key: TensorRef(name, shape, FileRange(path, data_start + begin, end - begin))
        for begin, end, key, name, shape in spans
    }


def _tree_from_metadata(path: Path, metadata: dict[str, str], refs: dict[str, TensorRef]) -> Any:
    what = f"__metadata__[{TREE_KEY!r}]"
    return tree_from_stored(metadata[TREE_KEY], refs, path, what, holder="the header", unused_name="header tensor")


FORMAT = SafetensorsFormat()
