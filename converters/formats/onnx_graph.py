"""A model's forward graph for the ONNX writer: exported with torch, taken apart with ``protowire``.

``torch.onnx.export`` runs with ``dynamo=False`` (the TorchScript exporter): it needs no extra
package and names initializers by ``state_dict`` keys. Constant folding is off so that every
parameter stays an initializer under its own name (folding would rename transposed weights). The
writer then replaces each parameter's bytes with the checkpoint's, so the graph always runs on the
weights in the file, whatever weights the module object had.
"""

from __future__ import annotations

import importlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConverterError, MissingDependencyError
from . import protowire as wire

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
    """Export ``model``'s forward pass on ``example_input`` and split the ModelProto apart."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        raise MissingDependencyError("exporting a model graph needs PyTorch") from None
    if not isinstance(model, torch.nn.Module):
        raise ConverterError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen on purpose
        try:
            torch.onnx.export(
                model,
                (example_input,),
                buffer,  # type: ignore[arg-type]  # a file object works; the stub says path only
                dynamo=False,
                do_constant_folding=False,
                export_params=True,
                opset_version=EXPORT_OPSET,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},  # any batch size at run time
            )
        except Exception as exc:  # the exporter raises many types; the user needs the message
            raise ConverterError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    data = buffer.getvalue()
    return _split(data, frozenset(model.state_dict()))


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


def resolve_model(spec: str) -> Any:
    """``recipe`` for the recipe Net, or ``package.module:Class`` built without arguments."""
    if spec == "recipe":
        from ..recipe import Net

        return Net()
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConverterError(f"--model takes 'recipe' or 'package.module:Class', got {spec!r}")
    try:
        target = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConverterError(f"cannot import the model class {spec!r}: {exc}") from None
    try:
        return target()
    except Exception as exc:  # a user's constructor may raise anything
        raise ConverterError(f"cannot build {spec!r} without arguments: {type(exc).__name__}: {exc}") from None


def example_input(shape: str | tuple[int, ...]) -> Any:
    """A zero float32 tensor of ``shape`` (``"1,3,32,32"`` or a tuple): the input traced by the export."""
    import torch

    if isinstance(shape, str):
        try:
            dims = tuple(int(part) for part in shape.split(",") if part.strip())
        except ValueError:
            raise ConverterError(f"--input-shape takes comma-separated sizes like 1,3,32,32, got {shape!r}") from None
    else:
        dims = tuple(shape)
    if not dims or any(d <= 0 for d in dims):
        raise ConverterError(f"--input-shape needs positive sizes, got {shape!r}")
    return torch.zeros(dims)
