"""``onnx``: every tensor as an ONNX initializer (exact bytes in ``raw_data``), optionally with a graph.

Spec: ``schemas/onnx.md``. In short:

- Initializer names: a model ``state_dict``'s tensors keep their keys (``conv1.weight``), others use
  their path keys (``optimizer_state_dict/state/0/momentum_buffer``).
- With a model (``model=net, example_input=x``), the main graph is the model's forward pass exported
  by torch, over the checkpoint's own tensors. Without one, the main graph holds the model tensors
  as initializers that are also its outputs: a valid model that returns its weights.
- Every other tensor (optimizer state, ...) is an initializer of ``training_info[0].initialization``,
  which inference ignores, so it rides along without disturbing it.
- ``metadata_props`` hold ``sdconvert.version`` and ``sdconvert.tree`` (the manifest tree), so the
  file round-trips alone.
- Big checkpoints go to external data (``<name>.onnx.data``), tensor offsets aligned for mmap.

Written by streaming (protobuf fields spliced by hand around the tensor bytes); read by walking
the protobuf in place, so tensor bytes are never copied; ``onnx`` itself is not imported.
"""

from __future__ import annotations

import array
import errno
import itertools
import json
import mmap
import os
import stat
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ...codecs import protowire as wire
from ...core import dtypes, manifests
from ...core.atomic import atomic_outputs
from ...core.budget import Budget
from ...core.contract import FormatBase, WriteContext, option
from ...core.errors import ConverterError, CorruptFileError, TreePath, UnsafeFileError, UnsupportedValueError
from ...core.integrity import read_tree_digest
from ...core.sources import BufferSource, ByteSource, FileRange
from ...core.storage import RangeBuffer, RemoteError, RemotePath, open_read, size_of
from ...core.storage import location as place
from ...core.stored import check_casts, loads_json_strict, read_digests
from ...core.tree import Checkpoint, TensorRef, walk
from ...core.writing import DIGEST_PLACEHOLDER, Reserved, TensorWriter
from .graph import ExportedGraph, export

IR_VERSION = 10
OPSET = 21
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # smaller tensors stay inline, as onnx's own converter does
EXTERNAL_ALIGN = 4096
MODEL_KEYS = ("model_state_dict", "model", "state_dict", "net")
TREE_KEY, VERSION_KEY = "sdconvert.tree", "sdconvert.version"
CONSTANTS_KEY, FALLBACK_KEY = "sdconvert.graph_constants", "sdconvert.fallback"
DIGESTS_KEY = "sdconvert.blake3"
CONSTANTS_NOTE = "the model has no initializers: its weights were read from its Constant nodes, named by their outputs"
CASTS_KEY = "sdconvert.casts"  # manifests.cast_records: what each cast tensor was cast from
TREE_DIGEST_KEY = "sdconvert.tree_blake3"  # manifests.tree_digest: keys, types, values, dtypes, shapes
EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})

# TensorProto fields
DIMS, DATA_TYPE, SEGMENT, FLOAT_DATA, INT32_DATA, STRING_DATA, INT64_DATA = 1, 2, 3, 4, 5, 6, 7
NAME, RAW_DATA, DOUBLE_DATA, UINT64_DATA, EXTERNAL_DATA, DATA_LOCATION = 8, 9, 10, 11, 13, 14
# typed field -> (element width in the field, how its values are stored)
TYPED_FIELDS = {
    FLOAT_DATA: "fixed32",
    DOUBLE_DATA: "fixed64",
    INT32_DATA: "varint",
    INT64_DATA: "varint",
    UINT64_DATA: "varint",
}


# torch dtype name -> onnx.TensorProto.DataType. complex32 has none: it is written as its bytes
# (uint8) with the real dtype in metadata (the documented fallback), so ONNX holds every dtype.
ONNX_TYPES: dict[str, int] = {
    "float64": 11, "float32": 1, "float16": 10, "bfloat16": 16,
    "float8_e4m3fn": 17, "float8_e5m2": 19, "float8_e4m3fnuz": 18, "float8_e5m2fnuz": 20, "float8_e8m0fnu": 24,
    "int8": 3, "int16": 5, "int32": 6, "int64": 7, "uint8": 2, "uint16": 4, "uint32": 12, "uint64": 13,
    "bool": 9, "complex64": 14, "complex128": 15,
}  # fmt: skip
FALLBACK_TYPE = ONNX_TYPES["uint8"]
BY_ONNX_TYPE = {code: name for name, code in ONNX_TYPES.items()}


@dataclass(frozen=True)
class OnnxOptions:
    model: Any = option(
        None,
        "add the model's forward graph: 'recipe' or 'package.module:Class' (no-arg ctor)",
        kind="model",
        metavar="SPEC",
    )
    example_input: Any = option(
        None,
        "example input shape traced by the export (a tensor, or a shape in the library)",
        kind="shape",
        metavar="N,C,H,W",
        flag="--input-shape",
    )
    external_data: bool | None = option(None, "store tensors in DST.data (automatic past 2 GB)", kind="flag")

    def __post_init__(self) -> None:
        if (self.model is None) != (self.example_input is None):
            raise ConverterError("the onnx writer needs model and example_input together")


@dataclass
class _Planned:
    """A tensor as it will be written: its TensorProto fields except the data, and where the data goes."""

    name: str
    ref: TensorRef
    onnx_type: int
    dims: tuple[int, ...]
    path: tuple[str | int, ...] = ()
    external_offset: int | None = None
    header: bytes = field(default=b"")

    @property
    def length(self) -> int:
        inline = (
            0 if self.external_offset is not None else len(wire.len_header(RAW_DATA, self.ref.nbytes)) + self.ref.nbytes
        )
        return len(self.header) + inline


class OnnxFormat(FormatBase):
    name = "onnx"
    suffixes: tuple[str, ...] = (".onnx",)
    description = "ONNX initializers (+ the model's graph with --model): onnx, onnxruntime, every ONNX tool"
    dtype_codes: ClassVar[Mapping[str, Any]] = {name: ONNX_TYPES.get(name, FALLBACK_TYPE) for name in dtypes.DTYPES}
    Options = OnnxOptions

    def __init__(
        self,
        protobuf_limit: int = PROTOBUF_LIMIT,
        external_threshold: int = EXTERNAL_THRESHOLD,
        external_align: int = EXTERNAL_ALIGN,
    ) -> None:
        self.protobuf_limit = protobuf_limit
        self.external_threshold = external_threshold
        self.external_align = external_align

    def sniff(self, head: bytes) -> bool:
        # ModelProto starts with ir_version (field 1, varint) followed by another top-level field.
        return (
            len(head) >= 3
            and head[0] == 0x08
            and 3 <= head[1] <= 30
            and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)
        )

    # ------------------------------------------------------------------------------- writing

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: OnnxOptions) -> None:
        path = Path(path)
        names = initializer_names(checkpoint.tree)
        graph = export(options.model, options.example_input) if options.model is not None else None
        planned = [_plan(names[tensor_path], ref, tensor_path) for tensor_path, ref in checkpoint.unique_tensors()]
        main, rest, constants = _partition(planned, graph, checkpoint.tree, names)
        external = options.external_data
        total = sum(p.ref.nbytes for p in planned)
        if external is None:
            external = total + (1 << 20) > self.protobuf_limit  # leave room for the graph and headers
        data_path = path.with_name(path.name + ".data")
        if external:
            offset = 0
            for item in planned:
                if item.ref.nbytes >= self.external_threshold:
                    offset += -offset % self.external_align
                    item.external_offset = offset
                    offset += item.ref.nbytes
        for item in planned:
            item.header = _tensor_header(item, data_path.name)
        # Digests are known once the bytes went by: the metadata is written with placeholders of
        # the same length and rewritten in place at the end.
        digests = {item.name: DIGEST_PLACEHOLDER for item in planned}
        model_fields = graph.model_fields if graph is not None else _plain_model_fields()
        graph_fields = graph.graph_fields if graph is not None else _weights_graph_fields(main)
        constant_protos = [graph.initializers[name] for name in constants] if graph is not None else []
        head = model_fields + wire.string_field(2, "statedict-convert") + wire.string_field(3, "1")
        own = manifests.metadata_strings(checkpoint.carried_metadata())
        metadata = _metadata(
            checkpoint.tree, names, planned, constants, digests, DIGEST_PLACEHOLDER, final=False, own_metadata=own
        )
        graph_length = (
            len(graph_fields) + sum(_embedded(len(p)) for p in constant_protos) + sum(_embedded(p.length) for p in main)
        )
        if (
            not external
            and len(head) + len(metadata) + _embedded(graph_length) + _training_length(rest) > self.protobuf_limit
        ):
            raise ConverterError(
                f"{total} bytes of tensors exceed protobuf's 2 GB limit; write with external data "
                "(external_data=True / --external-data)"
            )
        tensors = TensorWriter(context, checkpoint.origin)
        # The model and its data file are published together or not at all (atomic_outputs: the
        # data file first, so a model is never visible before its data; any failure or interruption
        # between the two renames puts the old pair back). Without overwrite, an existing data file
        # is refused like an existing model.
        destinations = [data_path, path] if external else [path]
        with atomic_outputs(destinations, fsync=context.fsync, overwrite=context.overwrite) as handles:
            out = handles[-1]
            if external:
                outside = [p for p in planned if p.external_offset is not None]
                digests.update(_write_external_data(handles[0], outside, tensors))
            out.write(head)
            reserved = Reserved(
                out,
                lambda: _metadata(
                    checkpoint.tree,
                    names,
                    planned,
                    constants,
                    digests,
                    tensors.tree_digest(checkpoint),
                    final=True,
                    own_metadata=own,
                ),
            )
            out.write(wire.len_header(7, graph_length) + graph_fields)
            for proto in constant_protos:
                out.write(wire.len_header(5, len(proto)) + proto)
            for item in main:
                _write_tensor(out, item, digests, tensors)
            if rest:
                init_length = len(wire.string_field(2, "sdconvert_state")) + sum(_embedded(p.length) for p in rest)
                out.write(wire.len_header(20, _embedded(init_length)) + wire.len_header(1, init_length))
                out.write(wire.string_field(2, "sdconvert_state"))
                for item in rest:
                    _write_tensor(out, item, digests, tensors)
            reserved.rewrite()

    # ------------------------------------------------------------------------------- reading

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        path = place(path)  # not Path(): a remote path stays remote
        empty = "the file is empty; an ONNX model is a non-empty protobuf message"
        if isinstance(path, RemotePath):
            # The protobuf is walked in place as over mmap, through blocks fetched on demand: a
            # raw_data field is skipped by its length, never fetched (nor is external data).
            with open_read(path) as handle:  # a folder is refused by it; a store has no FIFOs
                size = size_of(handle)
                if size == 0:
                    raise CorruptFileError(empty, file=path)
                reader = _Reader(RangeBuffer(handle), path, size, budget, _ExternalFiles(path))
                tensors, metadata = reader.scan()
        else:
            fd = open_regular(path)  # a FIFO or a device would block: refused before any read
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    raise CorruptFileError(empty, file=path)
                with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buffer:
                    reader = _Reader(buffer, path, size, budget, _ExternalFiles(path))
                    tensors, metadata = reader.scan()
            finally:
                os.close(fd)
        tree_digest = None
        if TREE_KEY in metadata:
            tree = _tree_from_metadata(path, metadata, tensors, budget)
            if TREE_DIGEST_KEY in metadata:
                tree_digest = read_tree_digest(metadata[TREE_DIGEST_KEY], path, f"metadata_props[{TREE_DIGEST_KEY!r}]")
        else:
            tree = {name: ref for name, (ref, _) in tensors.items()}
        if not tensors and TREE_KEY not in metadata:  # never a 0-tensor "checkpoint" of another tool's model
            raise UnsupportedValueError(
                "the model has no initializers and no Constant nodes holding tensors: no weights to read "
                "(weights in other node attributes or in a subgraph are not read)",
                file=path,
            )
        own = {key: value for key, value in metadata.items() if not key.startswith("sdconvert.")}
        notes = (CONSTANTS_NOTE,) if reader.from_constants else ()
        return Checkpoint(
            tree,
            path,
            tree_digest=tree_digest,
            file_metadata=own or None,
            notes=notes,
            expects_tree_digest=DIGESTS_KEY in metadata,
        )


# ----------------------------------------------------------------------------------- naming


def model_part(tree: Any) -> tuple[tuple[str | int, ...], dict[str, Any]] | None:
    """Where the model's state_dict is: the root itself, or the value of a ``model_state_dict``-like key."""
    if _is_state_dict(tree):
        return (), tree
    if isinstance(tree, dict):
        for key in MODEL_KEYS:
            if key in tree and _is_state_dict(tree[key]):
                return (key,), tree[key]
    return None


def _is_state_dict(node: Any) -> bool:
    return (
        isinstance(node, dict) and bool(node) and all(type(k) is str and type(v) is TensorRef for k, v in node.items())
    )


def initializer_names(tree: Any) -> dict[tuple[str | int, ...], str]:
    """Model tensors are named by their state_dict key, all others by their path key; no name twice.

    A tied tensor has one name at all its paths: its first path's (torch.onnx.export names a
    shared parameter the same way).
    """
    keys = manifests.storage_keys(tree)
    refs = {path: leaf for path, leaf in walk(tree) if type(leaf) is TensorRef}
    names: dict[tuple[str | int, ...], str] = {}
    by_identity: dict[int, str] = {}
    taken: set[str] = set()
    part = model_part(tree)
    if part is not None:
        prefix, state = part
        for key, ref in state.items():
            names[(*prefix, key)] = by_identity.setdefault(id(ref), key)
            taken.add(key)
    for tensor_path, key in keys.items():
        if tensor_path in names:
            continue
        if id(refs[tensor_path]) in by_identity:
            names[tensor_path] = by_identity[id(refs[tensor_path])]
            continue
        candidate, n = key, 1
        while candidate in taken:
            n += 1
            candidate = f"{key}#{n}"
        taken.add(candidate)
        names[tensor_path] = by_identity[id(refs[tensor_path])] = candidate
    return {tensor_path: names[tensor_path] for tensor_path in keys}


# ----------------------------------------------------------------------------------- writing helpers


def _plan(name: str, ref: TensorRef, tensor_path: tuple[str | int, ...]) -> _Planned:
    onnx_type = ONNX_TYPES.get(ref.dtype)
    if onnx_type is None:  # the documented fallback: the bytes as uint8, the real dtype in metadata
        return _Planned(name, ref, FALLBACK_TYPE, (ref.nbytes,), tensor_path)
    return _Planned(name, ref, onnx_type, ref.shape, tensor_path)


def _partition(
    planned: list[_Planned], graph: ExportedGraph | None, tree: Any, names: dict[tuple[str | int, ...], str]
) -> tuple[list[_Planned], list[_Planned], list[str]]:
    """(main-graph initializers, training-info initializers, exported constants kept as they are)."""
    if graph is None:
        part = model_part(tree)
        model_names = {names[(*part[0], key)] for key in part[1]} if part else {p.name for p in planned}
        main = [p for p in planned if p.name in model_names]
        return main, [p for p in planned if p.name not in model_names], []
    by_name = {p.name: p for p in planned}
    for name, proto in graph.initializers.items():
        if name in graph.state_names and name not in by_name:
            raise ConverterError(f"the model's graph uses {name!r}, which the checkpoint does not hold")
        if name in by_name:
            _check_matches(name, proto, by_name[name])
    main = [p for p in planned if p.name in graph.initializers]
    rest = [p for p in planned if p.name not in graph.initializers]
    constants = [name for name in graph.initializers if name not in by_name]
    return main, rest, constants


def _check_matches(name: str, proto: bytes, item: _Planned) -> None:
    where = Path("<exported graph>")
    info = _Reader(proto, where, len(proto), Budget(where, len(proto)), None).tensor_info(0, len(proto))
    if (info.onnx_type, info.dims) != (item.onnx_type, item.dims):
        expected = BY_ONNX_TYPE.get(info.onnx_type, info.onnx_type)
        raise ConverterError(
            f"the model's graph expects {name!r} as {expected}{list(info.dims)}, "
            f"the checkpoint holds {item.ref.dtype}{list(item.ref.shape)}"
        )


def _tensor_header(item: _Planned, data_name: str) -> bytes:
    header = b"".join(wire.varint_field(DIMS, d) for d in item.dims)
    header += wire.varint_field(DATA_TYPE, item.onnx_type) + wire.string_field(NAME, item.name)
    if item.external_offset is not None:
        for key, value in (
            ("location", data_name),
            ("offset", str(item.external_offset)),
            ("length", str(item.ref.nbytes)),
        ):
            header += wire.bytes_field(EXTERNAL_DATA, wire.string_field(1, key) + wire.string_field(2, value))
        header += wire.varint_field(DATA_LOCATION, 1)
    return header


def _write_tensor(out: BinaryIO, item: _Planned, digests: dict[str, str], tensors: TensorWriter) -> None:
    out.write(wire.len_header(5, item.length) + item.header)
    if item.external_offset is None:
        out.write(wire.len_header(RAW_DATA, item.ref.nbytes))
        digests[item.name] = tensors.copy(out, item.ref, item.path).digest


def _embedded(length: int) -> int:
    """Bytes a length-delimited field of ``length`` takes in its parent (field numbers < 16)."""
    return 1 + len(wire.varint(length)) + length


def _training_length(rest: list[_Planned]) -> int:
    if not rest:
        return 0
    init_length = len(wire.string_field(2, "sdconvert_state")) + sum(_embedded(p.length) for p in rest)
    return 2 + len(wire.varint(_embedded(init_length))) + _embedded(init_length)


def _plain_model_fields() -> bytes:
    opset = wire.string_field(1, "") + wire.varint_field(2, OPSET)
    return wire.varint_field(1, IR_VERSION) + wire.bytes_field(8, opset)


def _weights_graph_fields(main: list[_Planned]) -> bytes:
    """A graph with no nodes whose outputs are the weights themselves (valid, and loadable by onnxruntime)."""
    fields = wire.string_field(2, "sdconvert_weights")
    for item in main:
        shape = b"".join(wire.bytes_field(1, wire.varint_field(1, d)) for d in item.dims)
        tensor_type = wire.varint_field(1, item.onnx_type) + wire.bytes_field(2, shape)
        value_info = wire.string_field(1, item.name) + wire.bytes_field(2, wire.bytes_field(1, tensor_type))
        fields += wire.bytes_field(12, value_info)
    return fields


def _metadata(
    tree: Any,
    names: dict[tuple[str | int, ...], str],
    planned: list[_Planned],
    constants: list[str],
    digests: dict[str, str],
    tree_digest: str,
    *,
    final: bool,
    own_metadata: dict[str, str],
) -> bytes:
    entries = {
        **own_metadata,  # what the source said about itself (another ONNX file's metadata_props...)
        VERSION_KEY: str(manifests.MANIFEST_VERSION),
        TREE_KEY: json.dumps(manifests.encode_tree(tree, names), separators=(",", ":")),
    }
    fallback = {
        p.name: {"dtype": p.ref.dtype, "shape": list(p.ref.shape)} for p in planned if p.ref.dtype not in ONNX_TYPES
    }
    if fallback:
        entries[FALLBACK_KEY] = json.dumps(fallback, separators=(",", ":"))
    if constants:
        entries[CONSTANTS_KEY] = json.dumps(constants, separators=(",", ":"))
    entries[DIGESTS_KEY] = json.dumps(digests, separators=(",", ":"))
    entries[TREE_DIGEST_KEY] = tree_digest
    casts = manifests.cast_records(((p.path, p.ref) for p in planned), names, final=final)
    if casts:
        entries[CASTS_KEY] = json.dumps(casts, separators=(",", ":"))
    return b"".join(wire.bytes_field(14, wire.string_field(1, k) + wire.string_field(2, v)) for k, v in entries.items())


def _write_external_data(out: BinaryIO, items: list[_Planned], tensors: TensorWriter) -> dict[str, str]:
    """The external data file's bytes: each tensor at its aligned offset."""
    digests = {}
    position = 0
    for item in items:
        assert item.external_offset is not None
        out.write(bytes(item.external_offset - position))
        digests[item.name] = tensors.copy(out, item.ref, item.path).digest
        position = item.external_offset + item.ref.nbytes
    return digests


# ----------------------------------------------------------------------------------- reading helpers

# The reader walks the protobuf itself, in place (over ``mmap``). Its bounds, all charged to the
# read's ``Budget`` before the work or memory is spent:
# - every field walked, at every level, is one node (``budget.nodes``), kept or skipped: skipping an
#   unknown field is O(1) Python work (its key and length, never its payload), so a file of a million
#   tiny unknown fields is refused after about 0.7 M of them instead of taking seconds per MB;
# - every initializer is one tensor (``budget.tensors``), its dims one node each (counted before
#   they are decoded), its name and the metadata_props strings their bytes (``budget.materialize``);
# - typed fields (``float_data`` ...) are decoded with numpy, a bounded piece at a time, after their
#   value count (known from lengths alone) matched the tensor's and the bytes to be made were charged.
Fields = Iterator[tuple[int, int, int, int]]  # (field number, wire type, value or length, payload offset)
CHARGE_EVERY = 1024  # fields walked between two charges of the budget
DECODE_PIECE = 1 << 16  # bytes of a packed field decoded at a time
DECODE_MEMORY = 64 * DECODE_PIECE  # what decoding one piece may hold at once (numpy temporaries)
MAX_ELEMENTS = 1 << 62  # no file holds more elements than this: refuse dims that multiply past it


def _walk(buffer: Any, start: int, end: int, file: Path, budget: Budget) -> Fields:
    """The fields of the message in ``buffer[start:end]``, each checked to lie inside it (the checks
    of ``protowire.fields``, with one-byte keys and values read inline: most fields have them)."""
    position = start
    walked = 0
    read_varint = wire.read_varint
    while position < end:
        key = buffer[position]
        if key < 0x80:
            position += 1
        else:
            key, position = read_varint(buffer, position, end, file)
        number, kind = key >> 3, key & 7
        if number == 0:
            raise CorruptFileError(f"protobuf field number 0 at byte {position}", file=file)
        if kind == wire.LEN or kind == wire.VARINT:
            if position < end and buffer[position] < 0x80:
                value, after = buffer[position], position + 1
            else:
                value, after = read_varint(buffer, position, end, file)
            if kind == wire.LEN:
                if value > end - after:
                    raise CorruptFileError(
                        f"protobuf field {number} at byte {after} declares {value} bytes, "
                        f"its message has {end - after} left",
                        file=file,
                    )
                yield number, kind, value, after
                position = after + value
            else:
                yield number, kind, value, position
                position = after
        elif kind == wire.I64 or kind == wire.I32:
            size = 8 if kind == wire.I64 else 4
            if position + size > end:
                raise CorruptFileError(f"protobuf fixed field at byte {position} runs past its message", file=file)
            yield number, kind, int.from_bytes(buffer[position : position + size], "little"), position
            position += size
        else:
            raise CorruptFileError(
                f"protobuf wire type {kind} (field {number}) at byte {position} is not supported", file=file
            )
        walked += 1
        if walked == CHARGE_EVERY:
            budget.nodes(walked, "protobuf fields")
            walked = 0
    if walked:
        budget.nodes(walked, "protobuf fields")


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    onnx_type: int
    dims: tuple[int, ...]


@dataclass
class _TensorFields:
    """One TensorProto's fields, gathered in one walk."""

    name: str = ""
    onnx_type: int = 0
    dims: list[tuple[int, int, int]] = field(default_factory=list)  # (wire type, value or length, offset)
    raw: tuple[int, int] | None = None  # (offset, length)
    typed_numbers: set[int] = field(default_factory=set)  # which typed fields (float_data, ...) appear
    typed_scalars: array.array[int] = field(default_factory=lambda: array.array("Q"))  # unpacked values
    typed_packed: list[tuple[int, int, int]] = field(default_factory=list)  # (scalars before it, offset, length)
    external: dict[str, str] = field(default_factory=dict)
    location: int = 0
    unsupported: int = 0  # SEGMENT or STRING_DATA, refused once the type is known


class _Reader:
    def __init__(self, buffer: Any, path: Path, size: int, budget: Budget, external: _ExternalFiles | None) -> None:
        self.buffer, self.path, self.size, self.budget = buffer, path, size, budget
        self.external_files = external
        self.from_constants = False  # the weights came from Constant nodes (no initializers)

    def _walk(self, start: int, end: int) -> Fields:
        return _walk(self.buffer, start, end, self.path, self.budget)

    def scan(self) -> tuple[dict[str, tuple[TensorRef, bool]], dict[str, str]]:
        """Every initializer (name -> (tensor, in the main graph)) and the metadata_props."""
        graph: tuple[int, int] | None = None
        training = array.array("Q")  # (start, end) of each training_info graph, 16 bytes each
        metadata: dict[str, str] = {}
        for number, kind, value, offset in self._walk(0, self.size):
            if kind != wire.LEN:
                continue
            if number == 7:
                if graph is not None:
                    raise CorruptFileError("the model has two graph fields", file=self.path)
                graph = (offset, offset + value)
            elif number == 14:
                key, text = self._entry(offset, offset + value, "a metadata_props entry")
                if key in metadata:
                    raise CorruptFileError(f"metadata_props has the key {key!r} twice", file=self.path)
                metadata[key] = text
            elif number == 20:
                for inner, inner_kind, length, start in self._walk(offset, offset + value):
                    if inner == 1 and inner_kind == wire.LEN:
                        training.extend((start, start + length))
        if graph is None:
            raise CorruptFileError("not an ONNX model: no graph field", file=self.path)
        tensors: dict[str, tuple[TensorRef, bool]] = {}
        parts = [(*graph, True)]
        parts_of_training = ((training[i], training[i + 1], False) for i in range(0, len(training), 2))
        nodes: list[tuple[int, int]] = []  # the main graph's nodes, for a model without initializers
        for start, end, in_main in itertools.chain(parts, parts_of_training):
            for number, kind, value, offset in self._walk(start, end):
                if number == 15:
                    raise UnsupportedValueError("sparse initializers are not supported", file=self.path)
                if number == 5 and kind == wire.LEN:
                    name, ref = self._tensor(offset, offset + value)
                    if name in tensors:
                        raise CorruptFileError(f"two initializers are named {name!r}", file=self.path)
                    tensors[name] = (ref, in_main)
                elif number == 1 and kind == wire.LEN and in_main:
                    nodes.append((offset, offset + value))
        if not tensors and nodes:
            tensors = self._constants(nodes)
            self.from_constants = bool(tensors)
        return tensors, metadata

    def _constants(self, nodes: list[tuple[int, int]]) -> dict[str, tuple[TensorRef, bool]]:
        """A model without initializers keeps its weights in ``Constant`` nodes (``value``, a
        TensorProto): those tensors, named by the node's output, in graph order."""
        found: dict[str, tuple[TensorRef, bool]] = {}
        for start, end in nodes:
            op_type = domain = ""
            outputs: list[str] = []
            value: tuple[int, int] | None = None
            for number, kind, length, offset in self._walk(start, end):
                if number == 4:
                    op_type = self._text(kind, offset, length, "a node's op_type")
                elif number == 7:
                    domain = self._text(kind, offset, length, "a node's domain")
                elif number == 2:
                    outputs.append(self._text(kind, offset, length, "a node's output"))
                elif number == 5 and kind == wire.LEN:
                    attribute_name, tensor = "", None
                    for inner, inner_kind, inner_length, inner_offset in self._walk(offset, offset + length):
                        if inner == 1:
                            attribute_name = self._text(inner_kind, inner_offset, inner_length, "an attribute name")
                        elif inner == 5 and inner_kind == wire.LEN:
                            tensor = (inner_offset, inner_offset + inner_length)
                    if attribute_name == "value" and tensor is not None:
                        value = tensor
            if op_type != "Constant" or domain not in ("", "ai.onnx") or value is None or len(outputs) != 1:
                continue
            _, ref = self._tensor(*value)
            if outputs[0] in found:
                raise CorruptFileError(f"two Constant nodes output {outputs[0]!r}", file=self.path)
            found[outputs[0]] = (ref, True)
        return found

    def _text(self, kind: int, offset: int, length: int, what: str) -> str:
        if kind != wire.LEN:
            raise CorruptFileError(f"{what} must be a length-delimited string", file=self.path)
        self.budget.materialize(length + 64, "strings")
        try:
            return bytes(self.buffer[offset : offset + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(f"{what} at byte {offset} is not valid UTF-8", file=self.path) from None

    def _entry(self, start: int, end: int, what: str) -> tuple[str, str]:
        key = value = ""
        for number, kind, length, offset in self._walk(start, end):
            if number == 1:
                key = self._text(kind, offset, length, what)
            elif number == 2:
                value = self._text(kind, offset, length, what)
        return key, value

    def _fields_of(self, start: int, end: int) -> _TensorFields:
        found = _TensorFields()
        for number, kind, value, offset in self._walk(start, end):
            if number == NAME:
                found.name = self._text(kind, offset, value, "an initializer name")
            elif number == DATA_TYPE and kind == wire.VARINT:
                found.onnx_type = value
            elif number == DIMS:
                found.dims.append((kind, value, offset))
            elif number == RAW_DATA and kind == wire.LEN:
                found.raw = (offset, value)
            elif number in TYPED_FIELDS:
                found.typed_numbers.add(number)
                if kind == wire.LEN:
                    found.typed_packed.append((len(found.typed_scalars), offset, value))
                else:  # 8 bytes kept per value (a varint may carry 70 bits: protobuf keeps 64)
                    found.typed_scalars.append(value & 0xFFFF_FFFF_FFFF_FFFF)
            elif number == EXTERNAL_DATA and kind == wire.LEN:
                key, text = self._entry(offset, offset + value, "an external_data entry")
                found.external[key] = text
            elif number == DATA_LOCATION and kind == wire.VARINT:
                found.location = value
            elif number in (SEGMENT, STRING_DATA):
                found.unsupported = found.unsupported or number
        return found

    def tensor_info(self, start: int, end: int) -> _TensorInfo:
        found = self._fields_of(start, end)
        return _TensorInfo(found.name, found.onnx_type, self._dims(found))

    def _dims(self, found: _TensorFields) -> tuple[int, ...]:
        dims: list[int] = []
        for kind, value, offset in found.dims:
            if kind == wire.LEN:
                dims.extend(self._packed_varints(offset, value, "dims of initializer " + repr(found.name)))
            else:
                dims.append(value)
        if any(d >= 2**63 for d in dims):
            raise CorruptFileError(f"initializer {found.name!r} has a negative dimension", file=self.path)
        if 0 not in dims:
            count = 1
            for d in dims:
                count *= d
                if count > MAX_ELEMENTS:
                    raise CorruptFileError(
                        f"initializer {found.name!r} has dims whose product exceeds 2**62 elements", file=self.path
                    )
        return tuple(dims)

    def _packed_varints(self, offset: int, length: int, what: str) -> list[int]:
        """A packed repeated varint field as Python ints; one node each, counted before they exist."""
        self.budget.nodes(_count_varints(self.buffer, offset, length), what)
        return [value for piece in _varint_pieces(self.buffer, offset, length, self.path) for value in piece.tolist()]

    def _tensor(self, start: int, end: int) -> tuple[str, TensorRef]:
        found = self._fields_of(start, end)
        dims = self._dims(found)
        name = found.name
        dtype_name = BY_ONNX_TYPE.get(found.onnx_type)
        if dtype_name is None:
            raise UnsupportedValueError(
                f"initializer {name!r} has ONNX data type {found.onnx_type}, which has no torch dtype",
                file=self.path,
            )
        if found.unsupported:
            raise UnsupportedValueError(
                f"initializer {name!r} uses {'segments' if found.unsupported == SEGMENT else 'string_data'}",
                file=self.path,
            )
        self.budget.tensors(1)
        row = dtypes.DTYPES[dtype_name]
        expected = dtypes.numel(dims) * row.itemsize
        if found.location == 1:
            source: ByteSource = self._external(name, found.external, expected)
        elif found.raw is not None:
            offset, length = found.raw
            if length != expected:
                raise CorruptFileError(
                    f"initializer {name!r}: {row.name}{list(dims)} needs {expected} bytes, raw_data holds {length}",
                    file=self.path,
                )
            source = FileRange(self.path, offset, length)
        else:
            data = self._typed(name, dims, row, found)
            source = BufferSource.of(data, owner=data)
        return name, TensorRef(row.name, dims, source)

    def _typed(self, name: str, dims: tuple[int, ...], row: dtypes.DType, found: _TensorFields) -> Any:
        """Values stored in float_data/int32_data/... turned into the element bytes, exactly: a
        numpy array filled a bounded piece at a time (O(1) Python work per piece, not per value)."""
        import numpy as np  # only typed-field tensors need it; keeps start-up fast

        if len(found.typed_numbers) > 1:
            raise CorruptFileError(f"initializer {name!r} mixes typed data fields", file=self.path)
        kind = TYPED_FIELDS[next(iter(found.typed_numbers))] if found.typed_numbers else "varint"
        per_element = 2 if row.name.startswith("complex") else 1
        wanted = dtypes.numel(dims) * per_element
        width = 4 if kind == "fixed32" else 8
        # How many values the fields hold, from their lengths alone (in packed varints one byte
        # below 0x80 ends each value), before any memory is spent on them.
        count = len(found.typed_scalars)
        for _, offset, length in found.typed_packed:
            if kind == "varint":
                count += _count_varints(self.buffer, offset, length)
            elif length % width:
                raise CorruptFileError(f"initializer {name!r}: packed {kind} data of {length} bytes", file=self.path)
            else:
                count += length // width
        if count != wanted:
            raise CorruptFileError(
                f"initializer {name!r}: {row.name}{list(dims)} needs {wanted} values, found {count}", file=self.path
            )
        out_width = row.itemsize // per_element
        self.budget.materialize(wanted * out_width + DECODE_MEMORY, "typed tensor data")
        # int32_data holds int8..int32, bool and the bits of 16/8-bit floats; int64/uint64_data
        # 64-bit ints: each value's low bytes are the element (numpy's unsafe cast keeps them).
        out = np.empty(wanted, dtype=f"<u{out_width}")
        position = 0
        scalars = np.frombuffer(found.typed_scalars, dtype=np.uint64) if count else np.zeros(0, np.uint64)
        taken = 0

        def put(values: Any) -> None:
            nonlocal position
            np.copyto(out[position : position + len(values)], values, casting="unsafe")
            position += len(values)

        for before, offset, length in found.typed_packed:
            put(scalars[taken:before])
            taken = before
            if kind == "varint":
                for values in _varint_pieces(self.buffer, offset, length, self.path):
                    put(values)
            else:
                step = DECODE_PIECE - DECODE_PIECE % width
                for begin in range(offset, offset + length, step):
                    piece = self.buffer[begin : min(begin + step, offset + length)]
                    put(np.frombuffer(piece, dtype=f"<u{width}"))
        put(scalars[taken:])
        return out

    def _external(self, name: str, entries: dict[str, str], expected: int) -> FileRange:
        unknown = set(entries) - EXTERNAL_KEYS
        if unknown:
            raise UnsafeFileError(
                f"initializer {name!r}: unknown external_data key {sorted(unknown)[0]!r}", file=self.path
            )
        location = entries.get("location", "")
        if self.external_files is None:
            raise UnsafeFileError(f"initializer {name!r}: external data is not allowed here", file=self.path)
        target, size = self.external_files.open(location, name)
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries.get("length", str(expected)))
        except ValueError:
            raise CorruptFileError(
                f"initializer {name!r}: external offset/length must be integers", file=self.path
            ) from None
        if offset < 0 or length != expected or offset + length > size:
            raise CorruptFileError(
                f"initializer {name!r}: external data [{offset}, {offset + length}) of {location!r} must hold "
                f"exactly {expected} bytes inside its {size} bytes",
                file=self.path,
            )
        return FileRange(target, offset, length)


_LOW_BYTES = bytes(range(0x80))  # deleted from packed varints, what is left counts their continuation bytes


def _count_varints(buffer: Any, offset: int, length: int) -> int:
    """How many varints a packed field holds (its bytes below 0x80), read a bounded piece at a time."""
    count = 0
    for begin in range(offset, offset + length, DECODE_PIECE):
        piece = buffer[begin : min(begin + DECODE_PIECE, offset + length)]
        count += len(piece) - len(piece.translate(None, _LOW_BYTES))
    return count


def _varint_pieces(buffer: Any, offset: int, length: int, file: Path) -> Iterator[Any]:
    """The varints of a packed field as numpy uint64 arrays (protobuf keeps the low 64 bits of
    each), one bounded piece of whole varints at a time."""
    import numpy as np

    end = offset + length
    if length and buffer[end - 1] >= 0x80:
        raise CorruptFileError(f"a packed varint at byte {end - 1} runs past its field", file=file)
    begin = offset
    while begin < end:
        data = np.frombuffer(buffer[begin : min(begin + DECODE_PIECE, end)], dtype=np.uint8)
        ends = np.flatnonzero(data < 0x80)
        if not len(ends):
            raise CorruptFileError(f"a packed varint at byte {begin} is longer than 10 bytes", file=file)
        data = data[: ends[-1] + 1]  # whole varints only; the rest starts the next piece
        lengths = np.diff(ends, prepend=-1)
        if int(lengths.max()) > 10:
            raise CorruptFileError(f"a packed varint in the field at byte {offset} is longer than 10 bytes", file=file)
        if len(ends) == len(data):  # one byte each: the common case for small values
            yield data.astype(np.uint64)
        else:
            starts = ends - lengths + 1
            shifts = (np.arange(len(data)) - np.repeat(starts, lengths)).astype(np.uint64) * np.uint64(7)
            yield np.add.reduceat((data & 0x7F).astype(np.uint64) << shifts, starts)
        begin += len(data)


class _PinnedPath(type(Path())):  # type: ignore[misc]
    """The name of a file this process holds open, for ``FileRange``: ``str()`` is the file's name
    (for messages), while opening it (``os.fspath``: ``open``, ``os.open``, ``mmap``) opens the very
    file that was checked, through ``/proc/self/fd/N``, whatever was renamed, swapped or symlinked
    under its name since. The descriptor is closed when the last range referring to it is gone."""

    _opened: str | None = None

    def __fspath__(self) -> str:
        return self._opened or str(self)


def _pin(path: Path, fd: int) -> Path:
    """``path`` bound to the open ``fd`` (owned from now on), where the platform can reopen an fd."""
    through = f"/proc/self/fd/{fd}"
    if not os.path.exists(through):  # no /proc (not Linux): by name, after the checks that were made
        os.close(fd)
        return path
    pinned = _PinnedPath(str(path))
    pinned._opened = through
    weakref.finalize(pinned, os.close, fd)
    return pinned


class _ExternalFiles:
    """The external data files of one model, each opened once (no symlink followed anywhere on its
    way, regular files only), checked, and then read only through that descriptor."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.folder = model_path.resolve().parent  # a RemotePath resolves to itself: its folder is remote too
        self.opened: dict[tuple[str, ...], tuple[Path, int]] = {}

    def open(self, location: str, name: str) -> tuple[Path, int]:
        """The (pinned) path of the data file ``location`` names, and its size."""
        parts = safe_external_parts(self.model_path, location, name)
        if parts not in self.opened and isinstance(self.folder, RemotePath):
            self.opened[parts] = self._remote(parts, location, name)
        if parts not in self.opened:
            fd = self._open_beneath(parts, location, name)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                raise UnsafeFileError(
                    f"initializer {name!r}: external data location {location!r} is not a regular file",
                    file=self.model_path,
                )
            self.opened[parts] = (_pin(self.folder.joinpath(*parts), fd), info.st_size)
        return self.opened[parts]

    def _remote(self, parts: tuple[str, ...], location: str, name: str) -> tuple[Path, int]:
        """The data file of a remote model: the object at ``parts`` under the model's folder. A
        store has no symlinks to refuse; what keeps it inside the folder is ``safe_external_parts``
        (no absolute location, no ``..``). Its size is the one first seen, and every range of it is
        read from that version (``storage.RemoteFile``)."""
        target = self.folder.joinpath(*parts)
        try:
            info = target.stat()
        except RemoteError as exc:
            if exc.missing:
                raise CorruptFileError(
                    f"initializer {name!r}: external data file {location!r} does not exist beside the model",
                    file=self.model_path,
                ) from None
            raise
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(
                f"initializer {name!r}: external data location {location!r} is not a regular file",
                file=self.model_path,
            )
        return target, info.st_size

    def _open_beneath(self, parts: tuple[str, ...], location: str, name: str) -> int:
        """``openat`` one component at a time from the model's folder, each with ``O_NOFOLLOW``: a
        symlink anywhere (planted before the read or swapped in during it) is refused, not followed."""
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        directory = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                flags = os.O_RDONLY | nofollow | getattr(os, "O_NOCTTY", 0)
                flags |= getattr(os, "O_NONBLOCK", 0) if last else getattr(os, "O_DIRECTORY", 0)
                try:
                    fd = os.open(part, flags, dir_fd=directory)
                except OSError as exc:
                    raise self._refusal(exc, directory, part, location, name) from None
                os.close(directory)
                directory = fd
                if last:
                    os.set_blocking(fd, True)
                    return fd
        except BaseException:
            os.close(directory)
            raise
        raise AssertionError("unreachable: a location has at least one part")  # pragma: no cover

    def _refusal(self, exc: OSError, directory: int, part: str, location: str, name: str) -> ConverterError:
        try:
            is_link = stat.S_ISLNK(os.lstat(part, dir_fd=directory).st_mode)
        except OSError:
            is_link = False
        if is_link or exc.errno == errno.ELOOP:
            return UnsafeFileError(
                f"initializer {name!r}: external data location {location!r} goes through a symlink",
                file=self.model_path,
            )
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return CorruptFileError(
                f"initializer {name!r}: external data file {location!r} does not exist beside the model",
                file=self.model_path,
            )
        return CorruptFileError(
            f"initializer {name!r}: cannot open external data file {location!r}: {exc.strerror}",
            file=self.model_path,
        )


def safe_external_parts(model_path: Path, location: str, name: str) -> tuple[str, ...]:
    """The components of an external data location, refused unless it is a relative path that
    stays inside the model's folder (no absolute path, no ``..``, no NUL)."""
    relative = Path(location)
    if (
        not location
        or relative.is_absolute()
        or location.startswith(("/", "\\"))
        or ".." in relative.parts
        or "\x00" in location
        or not relative.parts
    ):
        raise UnsafeFileError(
            f"initializer {name!r}: external data location {location!r} must be a relative path "
            "inside the model's folder",
            file=model_path,
        )
    return relative.parts


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, refused (without blocking) unless it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise CorruptFileError("no such file", file=path) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnsafeFileError("is not a regular file; refusing to read it", file=path)
    os.set_blocking(fd, True)
    return fd


def _tree_from_metadata(
    path: Path, metadata: dict[str, str], tensors: dict[str, tuple[TensorRef, bool]], budget: Budget
) -> Any:
    node = loads_json_strict(metadata[TREE_KEY], path, f"metadata_props[{TREE_KEY!r}]", budget)
    fallback = loads_json_strict(metadata.get(FALLBACK_KEY, "{}"), path, f"metadata_props[{FALLBACK_KEY!r}]", budget)
    constants = set(
        loads_json_strict(metadata.get(CONSTANTS_KEY, "[]"), path, f"metadata_props[{CONSTANTS_KEY!r}]", budget)
    )
    digests = read_digests(metadata.get(DIGESTS_KEY, "{}"), path, f"metadata_props[{DIGESTS_KEY!r}]", budget)
    what = f"metadata_props[{CASTS_KEY!r}]"
    casts = check_casts(loads_json_strict(metadata.get(CASTS_KEY, "{}"), path, what, budget), path, what)
    stray = next((key for key in casts if key not in tensors), None)
    if stray is not None:
        raise CorruptFileError(f"{what} names {stray!r}, which is not an initializer", file=path)
    used: set[str] = set()
    restored: dict[str, TensorRef] = {}

    def tensor(key: str, tree_path: TreePath) -> TensorRef:
        if key not in tensors:
            raise CorruptFileError(
                f"the tree refers to initializer {key!r}, which the file lacks", file=path, path=tree_path
            )
        used.add(key)
        if key not in restored:  # once per key, so a tied tensor stays one tensor
            ref = tensors[key][0].with_stored_digest(digests.get(key))
            ref = _from_fallback(path, key, ref, fallback[key], tree_path) if key in fallback else ref
            restored[key] = ref.with_cast_from(casts.get(key))
        return restored[key]

    tree = manifests.decode_tree(node, tensor, file=path)
    unused = set(tensors) - used - constants
    if unused:
        raise CorruptFileError(f"initializer {sorted(unused)[0]!r} is not part of the stored tree", file=path)
    return tree


def _from_fallback(path: Path, key: str, ref: TensorRef, spec: Any, tree_path: TreePath) -> TensorRef:
    if type(spec) is not dict or type(spec.get("dtype")) is not str or type(spec.get("shape")) is not list:
        raise CorruptFileError(f"{FALLBACK_KEY} entry for {key!r} must give dtype and shape", file=path, path=tree_path)
    row = dtypes.DTYPES.get(spec["dtype"])
    shape = tuple(spec["shape"])
    if row is None or any(type(d) is not int or d < 0 for d in shape) or ref.dtype != "uint8":
        raise CorruptFileError(
            f"{FALLBACK_KEY} entry for {key!r} is not a valid uint8 fallback", file=path, path=tree_path
        )
    if dtypes.numel(shape) * row.itemsize != ref.nbytes:
        raise CorruptFileError(
            f"{FALLBACK_KEY} entry for {key!r} does not match its {ref.nbytes} bytes", file=path, path=tree_path
        )
    return TensorRef(row.name, shape, ref.source).with_stored_digest(ref.digest)


FORMAT = OnnxFormat()
