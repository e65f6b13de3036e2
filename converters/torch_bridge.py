"""The edge between torch objects and the neutral tree. The only core module that imports torch."""

from __future__ import annotations

import sys
from typing import Any

from .errors import MissingDependencyError, UnsupportedValueError
from .sources import BufferSource, read_all
from .tree import Checkpoint, TensorRef, map_leaves, validate


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
            return leaf
        view = _view_key(torch, leaf)
        if view is None:
            return tensor_ref(torch, leaf, path)
        if view not in views:  # the same view of the same storage again: a tied tensor
            views[view] = tensor_ref(torch, leaf, path)
        return views[view]

    tree = map_leaves(obj, convert)
    validate(tree)
    return Checkpoint(tree)


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


def to_torch(checkpoint: Checkpoint) -> Any:
    """The torch object a checkpoint stands for: containers kept, tensors as fresh CPU tensors."""
    torch = import_torch()

    made: dict[int, Any] = {}

    def convert(path: tuple[str | int, ...], leaf: Any) -> Any:
        if not isinstance(leaf, TensorRef):
            return leaf
        if id(leaf) not in made:  # a tied tensor comes back as one tensor at all its paths
            made[id(leaf)] = make_tensor(torch, leaf)
        return made[id(leaf)]

    return map_leaves(checkpoint.tree, convert)


def make_tensor(torch: Any, ref: TensorRef) -> Any:
    dtype = getattr(torch, ref.dtype, None)
    if dtype is None:
        raise UnsupportedValueError(f"this torch has no dtype {ref.dtype}")
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=dtype)
    raw = torch.frombuffer(read_all(ref.source), dtype=torch.uint8)
    return raw.view(dtype).reshape(ref.shape)
