"""The edge between torch objects and the neutral tree. The only core module that imports torch."""

from __future__ import annotations

import mmap
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .core import dtypes
from .core.errors import (
    ConverterError,
    CorruptFileError,
    MissingDependencyError,
    UnsupportedValueError,
)
from .core.objects import NUMPY_DESCR, TORCH_DTYPE, NumpyScalar, ObjectRecord, torch_dtype, torch_safe
from .core.sources import BufferSource, FileRange, read_all
from .core.storage import is_remote
from .core.tree import Checkpoint, TensorRef, map_leaves, validate


def import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a hard dependency of these paths
        raise MissingDependencyError("this operation needs PyTorch: pip install 'statedict-convert[torch]'") from exc
    return torch


def from_torch(obj: Any) -> Checkpoint:
    """The neutral tree of a torch object (a state_dict, an optimizer state_dict, a checkpoint).

    Tensors are not copied: each ``TensorRef`` views the tensor's (contiguous) memory.
    """
    torch = import_torch()
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise UnsupportedValueError("tensor bytes are little-endian; this host is big-endian")

    views: dict[tuple[Any, ...], TensorRef] = {}

    def convert(path: tuple[str | int, ...], leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return plain_value(torch, leaf, path)
        view = _view_key(torch, leaf)
        if view is None:
            return tensor_ref(torch, leaf, path)
        if view not in views:  # the same view of the same storage again: a tied tensor
            views[view] = tensor_ref(torch, leaf, path)
        return views[view]

    tree = map_leaves(obj, convert)
    validate(tree)
    return Checkpoint(tree)


def plain_value(torch: Any, value: Any, path: tuple[str | int, ...]) -> Any:
    """A non-tensor leaf of a torch object as the tree keeps it: numpy arrays and scalars exactly,
    and the values torch's safe loader accepts (dtype, device, Size, set, complex...) as records."""
    kind = type(value)
    if kind.__module__ == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray):
            descr = value.dtype.str
            if descr not in TORCH_DTYPE:
                raise UnsupportedValueError(f"a numpy array of dtype {descr} cannot be kept exactly", path=path)
            array = np.ascontiguousarray(value)
            data: Any = array.reshape(-1).view(np.uint8) if array.size else b""  # a view: no copy
            return TensorRef(TORCH_DTYPE[descr], tuple(array.shape), BufferSource.of(data, owner=array)).as_numpy()
        if isinstance(value, np.generic) and value.dtype.kind in "fiucb":
            return NumpyScalar(value.dtype.str, value.tobytes())
    if isinstance(value, torch.dtype):
        return ObjectRecord(str(value), "global")
    if kind is torch.Size:
        return ObjectRecord("torch.Size", "call", (tuple(value),))
    if kind is torch.device:
        return ObjectRecord("torch.device", "call", tuple(value.__reduce__()[1]))
    if kind in (set, frozenset):
        return ObjectRecord(f"builtins.{kind.__name__}", "call", (list(value),))
    if kind is complex:
        return ObjectRecord("builtins.complex", "call", (value.real, value.imag))
    if kind is bytearray:
        return ObjectRecord("builtins.bytearray", "call", (bytes(value),))
    return value


def _view_key(torch: Any, tensor: Any) -> tuple[Any, ...] | None:
    """What makes two tensors the same data: storage, offset, shape, strides, dtype (None: no storage)."""
    if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized:
        return None
    if tensor.numel() == 0:  # no bytes, so no address to compare: only the same object is the same tensor
        return ("empty", id(tensor))
    address = tensor.untyped_storage().data_ptr()
    return (tensor.device, address, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def tensor_ref(torch: Any, tensor: Any, path: tuple[str | int, ...]) -> TensorRef:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        raise UnsupportedValueError(
            f"only dense strided tensors can be converted, found layout {tensor.layout}"
            + (" (quantized)" if tensor.is_quantized else "")
            + (" (meta: no data)" if tensor.is_meta else ""),
            path=path,
        )
    dense = tensor.detach().to("cpu").contiguous()
    if type(dense) is not torch.Tensor:
        dense = dense.as_subclass(torch.Tensor)  # nn.Parameter and other subclasses: plain data
    dtype = str(dense.dtype).removeprefix("torch.")
    flat = dense.reshape(-1)
    # A uint8 view's numpy() shares the tensor's memory: no copy of the bytes here.
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return TensorRef(dtype, tuple(dense.shape), BufferSource.of(data, owner=dense))


# torch's own allocations are 64-byte aligned. A tensor mapped at another alignment holds the same
# bytes, but vectorized reductions over it (dot, sum) may round differently, so training resumed
# from it can differ in the last bit (the LBFGS zoo test found this). Only aligned bytes are mapped
# by default.
MAP_ALIGNMENT = 64


def to_torch(checkpoint: Checkpoint, *, mmap_any: bool = False, progress: Callable[[int], None] | None = None) -> Any:
    """The torch object a checkpoint stands for: containers kept, tensors as CPU tensors.

    Tensors whose bytes sit 64-byte aligned in a file are mapped, not copied; with ``mmap_any`` every
    tensor at a multiple of its element size is (as ``safetensors.torch.load_file`` does).
    ``progress(n)`` is told the bytes of each tensor as it is made."""
    torch = import_torch()

    made: dict[int, Any] = {}
    mappings: dict[Path, mmap.mmap] = {}

    def convert(path: tuple[str | int, ...], leaf: Any) -> Any:
        kind = type(leaf)
        if kind is NumpyScalar:
            return numpy_scalar(leaf)
        if kind is ObjectRecord:
            return torch_value(torch, leaf)
        if kind is not TensorRef:
            return leaf
        if id(leaf) not in made:  # a tied tensor comes back as one tensor at all its paths
            made[id(leaf)] = numpy_array(leaf) if leaf.numpy else make_tensor(torch, leaf, mappings, mmap_any=mmap_any)
            if progress is not None and leaf.nbytes:
                progress(leaf.nbytes)
        return made[id(leaf)]

    return map_leaves(checkpoint.tree, convert)


def numpy_array(ref: TensorRef) -> Any:
    """The ``ndarray`` a checkpoint held: same dtype, shape and bytes (a fresh, writable copy)."""
    import numpy as np

    data = read_all(ref.source)
    return np.frombuffer(data, dtype=NUMPY_DESCR[ref.dtype]).reshape(ref.shape)


def numpy_scalar(scalar: NumpyScalar) -> Any:
    """The numpy scalar of the same numpy type and bits (``np.float64(0.75)``)."""
    import numpy as np

    return np.frombuffer(scalar.data, dtype=np.dtype(scalar.dtype))[0]


def torch_value(torch: Any, record: ObjectRecord) -> Any:
    """The value torch's safe loader would give for ``record`` (a dtype, a ``torch.Size``, a set...),
    made here from its recorded arguments; any other record is given back as it is (inert)."""
    if not torch_safe(record, dtypes.DTYPES):
        return record
    name, args = record.name, record.args
    dtype = torch_dtype(record, dtypes.DTYPES)
    if dtype is not None:
        return getattr(torch, dtype)
    makers = {
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "builtins.set": set,
        "builtins.bytearray": bytearray,
        "builtins.complex": complex,
    }
    try:
        return makers[name](*args)
    except (TypeError, ValueError, RuntimeError):  # arguments these classes refuse: keep the record
        return record


def make_tensor(
    torch: Any, ref: TensorRef, mappings: dict[Path, mmap.mmap] | None = None, *, mmap_any: bool = False
) -> Any:
    """A CPU tensor of ``ref``'s bytes.

    Bytes at an aligned place of a file are not copied: the tensor views a private (copy-on-write)
    ``mmap`` of the file, as ``safetensors.torch.load_file`` does; writing to it never touches the
    file. Other bytes are read into fresh memory, as are a remote file's (``core/storage.py``: it
    cannot be mapped; its tensors are fetched by range requests, so ``load(mmap=True)`` of a URL
    copies them all into memory).

    A range past the end of the file (truncated since it was read) is refused before anything is
    mapped, with a ``CorruptFileError``. What no check can prevent, as with any mapped file
    (``torch.load(mmap=True)``, ``safetensors``): truncating the file *while* a tensor maps it makes
    reading the lost pages raise SIGBUS; files are re-checked each time a tensor is made from them.
    """
    dtype = getattr(torch, ref.dtype, None)
    if dtype is None:
        raise UnsupportedValueError(f"this torch has no dtype {ref.dtype}")
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=dtype)
    source = ref.source
    alignment = dtypes.DTYPES[ref.dtype].itemsize if mmap_any else MAP_ALIGNMENT
    if (
        mappings is not None
        and isinstance(source, FileRange)
        and not is_remote(source.path)  # a remote file cannot be mapped: its bytes are read below
        and source.offset % alignment == 0
    ):
        end = source.offset + source.length
        if source.path not in mappings:
            fd = _open_regular(source.path)
            try:
                _require_extent(source, os.fstat(fd).st_size)
                mappings[source.path] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
        else:
            _require_extent(source, os.stat(source.path).st_size)  # truncated since it was mapped?
        mapped = mappings[source.path]
        if end <= len(mapped):
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=source.length, offset=source.offset)
            return raw.view(dtype).reshape(ref.shape)
    raw = torch.empty(ref.nbytes, dtype=torch.uint8)  # torch's allocator: aligned as torch expects
    source.readinto(memoryview(raw.numpy()))
    return raw.view(dtype).reshape(ref.shape)


def _open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, without blocking, refused unless it is a regular file
    (a FIFO swapped in for a checkpoint's file since it was read would hang the mapping)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptFileError("is no longer a regular file; refusing to map it", file=path)
    return fd


def _require_extent(source: FileRange, size: int) -> None:
    if source.offset + source.length > size:
        raise CorruptFileError(
            f"expected {source.length} bytes at offset {source.offset}, the file has only {size} bytes "
            "(truncated since it was read?)",
            file=source.path,
        )


def export_onnx(model: Any, example_input: Any, *, opset: int) -> tuple[bytes, frozenset[str]]:
    """``model``'s forward pass on ``example_input`` (a tensor, or a shape for a zero float32 input)
    as a serialized ONNX ModelProto, and the model's state_dict keys.

    ``torch.onnx.export`` runs with ``dynamo=False`` (the TorchScript exporter): unlike the default
    dynamo exporter it needs no ``onnxscript`` (only ``onnx``, a dependency of this package), and it
    names initializers by ``state_dict`` keys. Constant folding is off so that every parameter stays
    an initializer under its own name (folding would rename transposed weights).
    """
    import io
    import warnings

    torch = import_torch()
    try:
        import onnx  # noqa: F401  torch's exporter imports it; say so before a confusing export error
    except ImportError:
        raise MissingDependencyError("exporting a model's graph needs the onnx package: pip install onnx") from None
    if not isinstance(model, torch.nn.Module):
        raise ConverterError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        example_input = torch.zeros(tuple(example_input))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen on purpose
        try:
            torch.onnx.export(
                model,
                (example_input,),
                buffer,  # a file object works; the stub says path only
                dynamo=False,
                do_constant_folding=False,
                export_params=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},  # any batch size at run time
            )
        except Exception as exc:  # the exporter raises many types; the user needs the message
            raise ConverterError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    return buffer.getvalue(), frozenset(model.state_dict())


def model_parameters(model: Any) -> tuple[list[tuple[str, tuple[int, ...]]], list[tuple[str, tuple[int, ...]]]]:
    """A module's parameters in ``named_parameters()`` order (the order an optimizer built over
    ``model.parameters()`` numbers them 0, 1, 2...) and its ``state_dict()`` tensors (parameters and
    buffers), each as (name, shape): what the DCP writer needs to name numbered optimizer state."""
    torch = import_torch()
    if not isinstance(model, torch.nn.Module):
        raise ConverterError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    parameters = [(name, tuple(parameter.shape)) for name, parameter in model.named_parameters()]
    state = [(key, tuple(value.shape)) for key, value in model.state_dict().items() if isinstance(value, torch.Tensor)]
    return parameters, state
