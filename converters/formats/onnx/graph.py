"""A model's forward graph for the ONNX writer: exported with torch, taken apart with ``protowire``.

The export itself is ``torch_bridge.export_onnx`` (``torch.onnx.export`` with ``dynamo=False``,
which needs ``onnx`` but not ``onnxscript``, and names initializers by ``state_dict`` keys; constant
folding off, so every parameter stays an initializer under its own name). The writer then replaces
each parameter's bytes with the checkpoint's, so the graph always runs on the weights in the file,
whatever weights the module object had.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...codecs import protowire as wire
from ...core.errors import ConverterError

GRAPH_FIELD, METADATA_FIELD, TRAINING_INFO_FIELD = 7, 14, 20
PRODUCER_NAME_FIELD, PRODUCER_VERSION_FIELD = 2, 3
INITIALIZER_FIELD = 5
EXPORT_OPSET = 17


@dataclass(frozen=True)
class ExportedGraph:
    model_fields: bytes  # ModelProto fields to keep (ir_version, opset_import, ...), no graph
    graph_fields: bytes  # GraphProto fields (nodes, inputs, outputs, ...), no initializers
    initializers: dict[str, bytes]  # the exported TensorProtos by name, in graph order
    state_names: frozenset[str]  # the module's state_dict keys (parameters and persistent buffers)


def export(model: Any, example_input: Any) -> ExportedGraph:
    """Export ``model``'s forward pass on ``example_input`` (a tensor or a shape) and split it apart."""
    from ...torch_bridge import export_onnx  # torch is reached only through the bridge

    data, state_names = export_onnx(model, example_input, opset=EXPORT_OPSET)
    return _split(data, state_names)


def _split(data: bytes, state_names: frozenset[str]) -> ExportedGraph:
    where = Path("<torch.onnx.export output>")
    model_fields = bytearray()
    graph: wire.Field | None = None
    for field in wire.fields(data, 0, len(data), where):
        if field.number == GRAPH_FIELD:
            graph = field
        elif field.number not in (METADATA_FIELD, TRAINING_INFO_FIELD, PRODUCER_NAME_FIELD, PRODUCER_VERSION_FIELD):
            model_fields += _field_bytes(data, field)
    if graph is None:
        raise ConverterError("torch.onnx.export produced a model without a graph")
    graph_fields = bytearray()
    initializers: dict[str, bytes] = {}
    for field in wire.fields(data, graph.offset, graph.end, where):
        if field.number == INITIALIZER_FIELD:
            payload = bytes(data[field.offset : field.end])
            initializers[_tensor_name(payload, where)] = payload
        else:
            graph_fields += _field_bytes(data, field)
    return ExportedGraph(bytes(model_fields), bytes(graph_fields), initializers, state_names)


def _field_bytes(data: bytes, field: wire.Field) -> bytes:
    """A field re-encoded exactly: key, then its value or length-prefixed payload."""
    key = wire.varint(field.number << 3 | field.wire_type)
    if field.wire_type == wire.LEN:
        return key + wire.varint(field.value) + data[field.offset : field.end]
    if field.wire_type == wire.VARINT:
        return key + wire.varint(field.value)
    size = 8 if field.wire_type == wire.I64 else 4
    return key + data[field.offset : field.offset + size]


def _tensor_name(payload: bytes, where: Path) -> str:
    for field in wire.fields(payload, 0, len(payload), where):
        if field.number == 8:
            return wire.text(payload, field, where, "an initializer name")
    raise ConverterError("torch.onnx.export wrote an initializer without a name")
