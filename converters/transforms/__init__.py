"""Transformations: ``Checkpoint -> Checkpoint`` functions applied between reader and writer.

A transformation never reads or writes files. It may restructure the tree (keep a sub-tree, drop
keys, rename) or derive tensors with new bytes; for the latter it maps tensors with
:func:`map_tensors`, which calls the function once per tensor *object*, so tied tensors stay tied,
and ``TensorRef.derive``, which drops the digest of the bytes it replaces.

Example::

    from converters.transforms import Select
    api.convert("ckpt.pt", "weights.safetensors", transforms=[Select("model_state_dict")])
"""

from __future__ import annotations

from .base import Transform, apply, map_tensors
from .select import Select

__all__ = ["Select", "Transform", "apply", "map_tensors"]
