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

import json
import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ...codecs import protowire as wire
from ...core import dtypes, manifests
from ...core.atomic import atomic_output
from ...core.budget import Budget
from ...core.contract import FormatBase, WriteContext, option
from ...core.errors import ConverterError, CorruptFileError, TreePath, UnsafeFileError, UnsupportedValueError
from ...core.sources import BufferSource, ByteSource, FileRange
from ...core.stored import loads_json_strict, read_digests
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
        metadata = _metadata(checkpoint.tree, names, planned, constants, digests)
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
        if external:
            outside = [p for p in planned if p.external_offset is not None]
            digests.update(_write_external_data(data_path, outside, tensors))
            # The data file is in place; remove the old model so no reader pairs it with new data.
            path.unlink(missing_ok=True)
        with atomic_output(path, fsync=context.fsync, overwrite=context.overwrite) as out:
            out.write(head)
            reserved = Reserved(out, lambda: _metadata(checkpoint.tree, names, planned, constants, digests))
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
        path = Path(path)
        size = path.stat().st_size
        if size == 0:
            raise CorruptFileError("the file is empty; an ONNX model is a non-empty protobuf message", file=path)
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            reader = _Reader(buffer, path, size)
            tensors, metadata = reader.scan()
        if TREE_KEY in metadata:
            tree = _tree_from_metadata(path, metadata, tensors)
        else:
            tree = {name: ref for name, (ref, _) in tensors.items()}
        return Checkpoint(tree, path)


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
    info = _Reader(proto, Path("<exported graph>"), len(proto)).tensor_info(0, len(proto))
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
) -> bytes:
    entries = {
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
    return b"".join(wire.bytes_field(14, wire.string_field(1, k) + wire.string_field(2, v)) for k, v in entries.items())


def _write_external_data(data_path: Path, items: list[_Planned], tensors: TensorWriter) -> dict[str, str]:
    """The external data file, written atomically: each tensor at its aligned offset."""
    digests = {}
    with atomic_output(data_path, fsync=tensors.context.fsync, overwrite=tensors.context.overwrite) as out:
        position = 0
        for item in items:
            assert item.external_offset is not None
            out.write(bytes(item.external_offset - position))
            digests[item.name] = tensors.copy(out, item.ref, item.path).digest
            position = item.external_offset + item.ref.nbytes
    return digests


# ----------------------------------------------------------------------------------- reading helpers


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    onnx_type: int
    dims: tuple[int, ...]


class _Reader:
    def __init__(self, buffer: Any, path: Path, size: int) -> None:
        self.buffer, self.path, self.size = buffer, path, size

    def scan(self) -> tuple[dict[str, tuple[TensorRef, bool]], dict[str, str]]:
        """Every initializer (name -> (tensor, in the main graph)) and the metadata_props."""
        graph: wire.Field | None = None
        training: list[wire.Field] = []
        metadata: dict[str, str] = {}
        for item in wire.fields(self.buffer, 0, self.size, self.path):
            if item.number == 7 and item.wire_type == wire.LEN:
                if graph is not None:
                    raise CorruptFileError("the model has two graph fields", file=self.path)
                graph = item
            elif item.number == 14 and item.wire_type == wire.LEN:
                key, value = self._entry(item, "a metadata_props entry")
                if key in metadata:
                    raise CorruptFileError(f"metadata_props has the key {key!r} twice", file=self.path)
                metadata[key] = value
            elif item.number == 20 and item.wire_type == wire.LEN:
                training.extend(f for f in self._fields(item) if f.number == 1 and f.wire_type == wire.LEN)
        if graph is None:
            raise CorruptFileError("not an ONNX model: no graph field", file=self.path)
        tensors: dict[str, tuple[TensorRef, bool]] = {}
        for part, in_main in [(graph, True), *((t, False) for t in training)]:
            for item in self._fields(part):
                if item.number == 15:
                    raise UnsupportedValueError("sparse initializers are not supported", file=self.path)
                if item.number == 5 and item.wire_type == wire.LEN:
                    name, ref = self._tensor(item)
                    if name in tensors:
                        raise CorruptFileError(f"two initializers are named {name!r}", file=self.path)
                    tensors[name] = (ref, in_main)
        return tensors, metadata

    def _fields(self, parent: wire.Field) -> Iterator[wire.Field]:
        return wire.fields(self.buffer, parent.offset, parent.end, self.path)

    def _entry(self, item: wire.Field, what: str) -> tuple[str, str]:
        key = value = ""
        for entry in self._fields(item):
            if entry.number == 1:
                key = wire.text(self.buffer, entry, self.path, what)
            elif entry.number == 2:
                value = wire.text(self.buffer, entry, self.path, what)
        return key, value

    def tensor_info(self, start: int, end: int) -> _TensorInfo:
        name, onnx_type, dims = "", 0, list[int]()
        for item in wire.fields(self.buffer, start, end, self.path):
            if item.number == NAME:
                name = wire.text(self.buffer, item, self.path, "an initializer name")
            elif item.number == DATA_TYPE and item.wire_type == wire.VARINT:
                onnx_type = item.value
            elif item.number == DIMS:
                values = (
                    wire.packed_varints(self.buffer, item, self.path) if item.wire_type == wire.LEN else [item.value]
                )
                dims.extend(values)
        if any(d >= 2**63 for d in dims):
            raise CorruptFileError(f"initializer {name!r} has a negative dimension", file=self.path)
        return _TensorInfo(name, onnx_type, tuple(dims))

    def _tensor(self, proto: wire.Field) -> tuple[str, TensorRef]:
        info = self.tensor_info(proto.offset, proto.end)
        dtype_name = BY_ONNX_TYPE.get(info.onnx_type)
        if dtype_name is None:
            raise UnsupportedValueError(
                f"initializer {info.name!r} has ONNX data type {info.onnx_type}, which has no torch dtype",
                file=self.path,
            )
        row = dtypes.DTYPES[dtype_name]
        expected = dtypes.numel(info.dims) * row.itemsize
        raw: wire.Field | None = None
        typed: list[wire.Field] = []
        external: dict[str, str] = {}
        location = 0
        for item in self._fields(proto):
            if item.number == RAW_DATA:
                raw = item
            elif item.number in TYPED_FIELDS:
                typed.append(item)
            elif item.number == EXTERNAL_DATA:
                key, value = self._entry(item, "an external_data entry")
                external[key] = value
            elif item.number == DATA_LOCATION:
                location = item.value
            elif item.number in (SEGMENT, STRING_DATA):
                raise UnsupportedValueError(
                    f"initializer {info.name!r} uses {'segments' if item.number == SEGMENT else 'string_data'}",
                    file=self.path,
                )
        if location == 1:
            source: ByteSource = self._external(info.name, external, expected)
        elif raw is not None:
            if raw.value != expected:
                raise CorruptFileError(
                    f"initializer {info.name!r}: {row.name}{list(info.dims)} needs {expected} bytes, "
                    f"raw_data holds {raw.value}",
                    file=self.path,
                )
            source = FileRange(self.path, raw.offset, raw.value)
        else:
            source = BufferSource.of(self._typed(info, row, typed))
        return info.name, TensorRef(row.name, info.dims, source)

    def _typed(self, info: _TensorInfo, row: dtypes.DType, typed: list[wire.Field]) -> bytes:
        """Values stored in float_data/int32_data/... turned into the element bytes, exactly."""
        count = dtypes.numel(info.dims)
        values: list[int] = []
        kinds = {TYPED_FIELDS[item.number] for item in typed}
        if len({item.number for item in typed}) > 1:
            raise CorruptFileError(f"initializer {info.name!r} mixes typed data fields", file=self.path)
        for item in typed:
            kind = TYPED_FIELDS[item.number]
            if kind == "varint":
                values.extend(
                    wire.packed_varints(self.buffer, item, self.path) if item.wire_type == wire.LEN else [item.value]
                )
            else:
                width = 4 if kind == "fixed32" else 8
                if item.wire_type == wire.LEN:
                    if item.value % width:
                        raise CorruptFileError(
                            f"initializer {info.name!r}: packed {kind} data of {item.value} bytes", file=self.path
                        )
                    chunk = bytes(self.buffer[item.offset : item.end])
                    values.extend(int.from_bytes(chunk[i : i + width], "little") for i in range(0, len(chunk), width))
                else:
                    values.append(item.value)
        per_element = 2 if row.name.startswith("complex") else 1
        if len(values) != count * per_element:
            raise CorruptFileError(
                f"initializer {info.name!r}: {row.name}{list(info.dims)} needs {count * per_element} values, "
                f"found {len(values)}",
                file=self.path,
            )
        kind = next(iter(kinds), "varint")
        width = row.itemsize // per_element
        if kind == "varint":
            # int32_data holds int8..int32, bool and the bits of 16/8-bit floats; int64/uint64_data 64-bit ints.
            import numpy as np  # only typed-field tensors need it; keeps start-up fast

            array = np.array(values, dtype=np.uint64)
            mask = np.uint64((1 << (8 * width)) - 1)
            return (array & mask).astype(f"<u{width}").tobytes()
        import numpy as np

        return np.array(values, dtype=np.uint64).astype(f"<u{width}").tobytes()

    def _external(self, name: str, entries: dict[str, str], expected: int) -> FileRange:
        unknown = set(entries) - EXTERNAL_KEYS
        if unknown:
            raise UnsafeFileError(
                f"initializer {name!r}: unknown external_data key {sorted(unknown)[0]!r}", file=self.path
            )
        location = entries.get("location", "")
        target = safe_external_path(self.path, location, name)
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries.get("length", str(expected)))
        except ValueError:
            raise CorruptFileError(
                f"initializer {name!r}: external offset/length must be integers", file=self.path
            ) from None
        size = target.stat().st_size
        if offset < 0 or length != expected or offset + length > size:
            raise CorruptFileError(
                f"initializer {name!r}: external data [{offset}, {offset + length}) of {location!r} must hold "
                f"exactly {expected} bytes inside its {size} bytes",
                file=self.path,
            )
        return FileRange(target, offset, length)


def safe_external_path(model_path: Path, location: str, name: str) -> Path:
    """The external data file, refused unless it is a regular file inside the model's folder."""
    folder = model_path.resolve().parent
    relative = Path(location)
    if (
        not location
        or relative.is_absolute()
        or location.startswith(("/", "\\"))
        or ".." in relative.parts
        or "\x00" in location
    ):
        raise UnsafeFileError(
            f"initializer {name!r}: external data location {location!r} must be a relative path "
            "inside the model's folder",
            file=model_path,
        )
    target = folder / relative
    current = folder
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise UnsafeFileError(
                f"initializer {name!r}: external data location {location!r} goes through a symlink", file=model_path
            )
    if not target.is_file():
        raise CorruptFileError(
            f"initializer {name!r}: external data file {location!r} does not exist beside the model", file=model_path
        )
    if os.path.commonpath([folder, target.resolve()]) != str(folder):
        raise UnsafeFileError(
            f"initializer {name!r}: external data location {location!r} leaves the model's folder", file=model_path
        )
    return target


def _tree_from_metadata(path: Path, metadata: dict[str, str], tensors: dict[str, tuple[TensorRef, bool]]) -> Any:
    node = loads_json_strict(metadata[TREE_KEY], path, f"metadata_props[{TREE_KEY!r}]")
    fallback = loads_json_strict(metadata.get(FALLBACK_KEY, "{}"), path, f"metadata_props[{FALLBACK_KEY!r}]")
    constants = set(loads_json_strict(metadata.get(CONSTANTS_KEY, "[]"), path, f"metadata_props[{CONSTANTS_KEY!r}]"))
    digests = read_digests(metadata.get(DIGESTS_KEY, "{}"), path, f"metadata_props[{DIGESTS_KEY!r}]")
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
            restored[key] = _from_fallback(path, key, ref, fallback[key], tree_path) if key in fallback else ref
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
