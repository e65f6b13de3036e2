"""``safetensors``: an 8-byte header length, a JSON header, then the tensors' bytes back to back.

Read and written by this module itself (the ``safetensors`` package is only used by the tests, as
the reference reader). Spec of what we add: ``schemas/safetensors.md``. In short:

- a bare ``state_dict`` is stored under its own keys, so ``safetensors.torch.load_file`` followed by
  ``Net().load_state_dict(...)`` works without this project;
- other trees store tensors under their path keys (``optimizer_state_dict/state/0/momentum_buffer``);
- ``__metadata__`` holds ``"format": "pt"`` and ``"sdconvert.tree"``, the manifest tree node (types,
  key order, non-tensor values), so one file round-trips alone; ``"sdconvert.blake3"``, every
  tensor's digest, and ``"sdconvert.tree_blake3"``, the digest of everything else;
  ``"sdconvert.casts"`` (only when a tensor was made by a dtype cast) what each was cast from.

Reading follows the rules of the reference implementation: header at most 100 MB and inside the
file, no duplicate keys, byte ranges contiguous from 0 without gaps or overlaps, each exactly
shape × itemsize, and nothing after the last tensor. The header's bytes, the values its JSON
creates and every tensor are charged to the read's budget before they are created.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...core import folders, manifests
from ...core.atomic import atomic_output
from ...core.budget import Budget
from ...core.contract import FormatBase, WriteContext, option
from ...core.dtypes import itemsize
from ...core.errors import CorruptFileError, DestinationError, UnsupportedValueError
from ...core.sizes import parse_size
from ...core.sources import FileRange
from ...core.storage import location, open_read, pread, size_of
from ...core.stored import (
    check_tree_digest,
    loads_json_strict,
    paused_gc,
    read_casts,
    read_digests,
    tree_from_stored,
)
from ...core.tree import MAX_DIM, MAX_NDIM, Checkpoint, TensorRef
from . import sharded

if TYPE_CHECKING:
    from ...core.writing import TensorWriter

MAX_HEADER_BYTES = 100_000_000
TREE_KEY = "sdconvert.tree"
VERSION_KEY = "sdconvert.version"
DIGESTS_KEY = "sdconvert.blake3"
TREE_DIGEST_KEY = "sdconvert.tree_blake3"  # manifests.tree_digest: keys, types, values, dtypes, shapes, digests
CASTS_KEY = "sdconvert.casts"  # manifests.cast_records: {key: {"from": dtype, "blake3": source digest}}
OWN_PREFIX = "sdconvert."  # our __metadata__ keys; the others are the file's own (inspect shows them)
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
            object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size, "a shard size"))


class SafetensorsFormat(FormatBase):
    name = "safetensors"
    suffixes: tuple[str, ...] = (".safetensors", sharded.INDEX_SUFFIX)
    description = "safetensors (Hugging Face): Python, Rust, JS, transformers, candle, MLX"
    dtype_codes: ClassVar[Mapping[str, Any]] = DTYPE_CODES
    Options = SafetensorsOptions

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self.max_header_bytes = max_header_bytes

    def reads_folder(self, path: Path) -> bool:
        # A save_pretrained folder of safetensors weights (core/folders.py: one file or an index).
        family = folders.default_family(path)
        return family is not None and family.suffix == ".safetensors"

    def sniff(self, head: bytes) -> bool:
        if len(head) < 10:
            return False
        (length,) = struct.unpack("<Q", head[:8])
        return 2 <= length <= self.max_header_bytes and head[8:9] == b"{"

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        return self.read_selected(path, budget, None)

    def read_selected(self, path: Path, budget: Budget, wanted: sharded.Wanted | None) -> Checkpoint:
        """``read``, leaving out of a shard folder the shards without a ``wanted`` tensor
        (``core/contract.py``); one file is read whole (its header holds every tensor anyway)."""
        path = location(path)  # not Path(): a remote path stays remote
        if path.is_dir():
            weights, notes = folders.weights_for(path, ".safetensors", self.name)
            if weights.name.endswith(sharded.INDEX_SUFFIX):
                checkpoint = sharded.read_sharded(self, weights, budget, wanted)
                return dataclasses.replace(checkpoint, notes=checkpoint.notes + notes)
            checkpoint = self.read_file(folders.regular_part(weights), budget)
            kind = f"{folders.MODEL_KIND}: {weights.name}"
            return dataclasses.replace(checkpoint, kind=kind, notes=checkpoint.notes + notes)
        if path.name.endswith(sharded.INDEX_SUFFIX):
            return sharded.read_sharded(self, path, budget, wanted)
        if path.name.endswith(folders.INDEX_SUFFIX):  # another kind's index (pytorch_model.bin.index.json)
            raise folders.wrong_index(path, self.name)
        return self.read_file(path, budget)

    def read_file(self, path: Path, budget: Budget) -> Checkpoint:
        """One safetensors file, never an index (shards are read with this)."""
        header, data_start, size = self._read_header(path, budget)
        metadata = header.pop("__metadata__", None)
        if metadata is not None and (type(metadata) is not dict or any(type(v) is not str for v in metadata.values())):
            raise CorruptFileError("__metadata__ must map strings to strings", file=path)
        with paused_gc():
            refs = _tensor_refs(path, header, data_start, size, budget)
        del header
        tree_digest = None
        if metadata:
            if DIGESTS_KEY in metadata:
                digests = read_digests(metadata[DIGESTS_KEY], path, f"__metadata__[{DIGESTS_KEY!r}]", budget)
                for key, ref in refs.items():
                    digest = digests.get(key)
                    if digest is not None:
                        refs[key] = ref.with_stored_digest(digest)
            if TREE_DIGEST_KEY in metadata:
                tree_digest = check_tree_digest(metadata[TREE_DIGEST_KEY], path, f"__metadata__[{TREE_DIGEST_KEY!r}]")
            if CASTS_KEY in metadata:
                what = f"__metadata__[{CASTS_KEY!r}]"
                read_casts(loads_json_strict(metadata[CASTS_KEY], path, what, budget), refs, path, what)
        # Without our tree (a file from another tool) the tensors form a flat dict in header order.
        if metadata and TREE_KEY in metadata:
            what = f"__metadata__[{TREE_KEY!r}]"
            tree = tree_from_stored(
                metadata[TREE_KEY], refs, path, what, holder="the header", unused_name="header tensor", budget=budget
            )
        else:
            tree = refs
        own = {key: value for key, value in (metadata or {}).items() if not key.startswith(OWN_PREFIX)}
        ours = metadata is not None and DIGESTS_KEY in metadata
        return Checkpoint(tree, path, tree_digest=tree_digest, file_metadata=own or None, expects_tree_digest=ours)

    def _read_header(self, path: Path, budget: Budget) -> tuple[dict[str, Any], int, int]:
        # By positioned reads: a local file by os.pread, a remote one by range requests (the first
        # fetch, 64 KiB, usually holds the length and the whole header: one request).
        with open_read(path) as handle:
            size = size_of(handle)
            prefix = pread(handle, 8, 0)
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
            budget.materialize(length, "the safetensors header")
            raw = pread(handle, length, 8)
        if len(raw) != length:
            raise CorruptFileError(f"the file ended inside the {length}-byte header", file=path)
        if not raw.startswith(b"{"):
            raise CorruptFileError("header does not start with '{'", file=path)
        # JSON allows the trailing spaces of the padding: no stripped copy of the header is made.
        header = loads_json_strict(raw, path, "the safetensors header", budget)
        if type(header) is not dict:
            raise CorruptFileError("header is not a JSON object", file=path)
        return header, 8 + length, size

    def replaceable(self, path: Path) -> bool:
        return sharded.replaceable(path)

    def written_last(self, name: str) -> bool:
        """The index: a store without rename gets it after the shards it names."""
        return name.endswith(".index.json")

    def writes_in_parallel(self, options: SafetensorsOptions) -> bool:
        return options.max_shard_size is not None

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: SafetensorsOptions) -> None:
        if options.max_shard_size is not None:
            path = Path(path)
            suffix = next((sfx for sfx in self.suffixes if path.name.lower().endswith(sfx)), None)
            if suffix is not None:  # a folder named like a file would mislead every tool after us
                folder = path.with_name(path.name[: -len(suffix)] or "shards")
                raise DestinationError(
                    f"--max-shard-size writes a folder of shards; name it without the {suffix} suffix (e.g. {folder})",
                    file=path,
                )
            sharded.write_sharded(self, checkpoint, path, options.max_shard_size, context)
            return
        from ...core.writing import TensorWriter  # the copy and hashing machinery: writes only

        tensor_writer = TensorWriter(context, checkpoint.origin)
        self.write_file(checkpoint, Path(path), tensor_writer, fsync=context.fsync, overwrite=context.overwrite)

    def write_file(
        self, checkpoint: Checkpoint, path: Path, tensor_writer: TensorWriter, *, fsync: bool, overwrite: bool
    ) -> None:
        """One safetensors file (a shard too: the shards of a folder share one ``tensor_writer``, so
        the index can store the digest of the whole tree)."""
        from ...core.writing import DIGEST_PLACEHOLDER, Reserved

        keys = manifests.storage_keys(checkpoint.tree)
        tensors = checkpoint.unique_tensors()  # a tied tensor is stored once; the tree names it twice
        # Widest elements first keeps every tensor aligned to its element size (the header is
        # padded to 8), as the reference writer does; ties keep tree order.
        order = sorted(tensors, key=lambda item: -itemsize(item[1].dtype))
        metadata = {
            "format": "pt",
            # what the source file said about itself (a LoRA trainer's ss_* keys...), carried over
            **manifests.metadata_strings(checkpoint.carried_metadata()),
            VERSION_KEY: str(manifests.MANIFEST_VERSION),
            TREE_KEY: json.dumps(manifests.encode_tree(checkpoint.tree, keys), separators=(",", ":")),
            TREE_DIGEST_KEY: DIGEST_PLACEHOLDER,  # known once every tensor's digest is: rewritten then
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
        casts = manifests.cast_records(order, keys, final=False)

        def encode_header() -> bytes:
            metadata[DIGESTS_KEY] = json.dumps(digests, separators=(",", ":"))
            if casts:
                metadata[CASTS_KEY] = json.dumps(casts, separators=(",", ":"))
            encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
            return encoded + b" " * (-(8 + len(encoded)) % HEADER_ALIGN)

        with atomic_output(path, fsync=fsync, overwrite=overwrite) as out:
            first = [encode_header()]  # encoded once for its length and its placeholder
            out.write(struct.pack("<Q", len(first[0])))
            reserved = Reserved(out, lambda: first.pop() if first else encode_header())
            for tensor_path, ref in order:
                digests[keys[tensor_path]] = tensor_writer.copy(out, ref, tensor_path).digest
            metadata[TREE_DIGEST_KEY] = tensor_writer.tree_digest(checkpoint)
            casts.update(manifests.cast_records(order, keys, final=True))
            reserved.rewrite()


_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_ITEMSIZES = {code: itemsize(name) for name, code in DTYPE_CODES.items()}


def _tensor_refs(
    path: Path, header: dict[str, Any], data_start: int, size: int, budget: Budget
) -> dict[str, TensorRef]:
    """The header's tensors (``__metadata__`` removed), checked as the reference reader checks them."""
    budget.tensors(len(header))  # before any is created: a TensorRef, its source, shape and key
    spans = []
    refs = {}
    for key, info in header.items():
        if type(info) is not dict or info.keys() != _ENTRY_FIELDS:
            raise CorruptFileError(
                f"tensor {key!r}: header entry must have exactly dtype, shape, data_offsets", file=path
            )
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        width = _ITEMSIZES.get(code) if type(code) is str else None
        if width is None:
            raise UnsupportedValueError(f"tensor {key!r}: unknown safetensors dtype {code!r:.60}", file=path)
        if type(shape) is not list:
            _bad_shape(key, shape, path)
        if len(shape) > MAX_NDIM:
            raise CorruptFileError(
                f"tensor {key!r}: shape has {len(shape)} dims, at most {MAX_NDIM} are supported", file=path
            )
        expected = width
        for dim in shape:
            if type(dim) is not int or dim < 0 or dim > MAX_DIM:
                _bad_shape(key, shape, path)
            expected *= dim
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CorruptFileError(
                f"tensor {key!r}: data_offsets must be [begin, end] with 0 <= begin <= end, found {_short(offsets)}",
                file=path,
            )
        begin, end = offsets
        if end - begin != expected:
            raise CorruptFileError(
                f"tensor {key!r}: {code}{shape} needs {expected} bytes, data_offsets span {end - begin}",
                file=path,
            )
        spans.append((begin, end, key))
        refs[key] = TensorRef(BY_CODE[code], tuple(shape), FileRange(path, data_start + begin, expected))
    position = 0
    for begin, end, key in sorted(spans):
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
    return refs


def _bad_shape(key: str, shape: Any, path: Path) -> None:
    raise CorruptFileError(
        f"tensor {key!r}: shape must be a list of non-negative ints{_below(shape)}, found {_short(shape)}", file=path
    )


def _below(shape: Any) -> str:
    """The int64 bound, named when a dim is an int past it."""
    too_big = type(shape) is list and any(type(d) is int and d > MAX_DIM for d in shape)
    return " below 2**63 (int64)" if too_big else ""


def _short(value: Any) -> str:
    """A value from the header in a message: its repr, cut short (a huge int has no repr)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= 60 else text[:57] + "..."


FORMAT = SafetensorsFormat()
