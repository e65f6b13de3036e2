"""What every transformation shares: the type, chaining, and the one tensor-mapping helper."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..core.errors import TreePath
from ..core.tree import Checkpoint, TensorRef, map_leaves

Transform = Callable[[Checkpoint], Checkpoint]


def apply(checkpoint: Checkpoint, transforms: Iterable[Transform]) -> Checkpoint:
    """``checkpoint`` through each transformation in order."""
    for transform in transforms:
        checkpoint = transform(checkpoint)
    return checkpoint


def map_tensors(checkpoint: Checkpoint, fn: Callable[[TreePath, TensorRef], TensorRef]) -> Checkpoint:
    """A copy of ``checkpoint`` with every tensor replaced by ``fn(first_path, tensor)``.

    ``fn`` is called once per tensor object (with the first path that holds it), and its result is
    placed at every path that held that object: tied tensors stay tied through any chain.

    >>> from converters.core.sources import BufferSource
    >>> shared = TensorRef("float32", (1,), BufferSource.of(bytes(4)))
    >>> out = map_tensors(Checkpoint({"a": shared, "b": shared}), lambda path, ref: ref.derive(shape=()))
    >>> out.tree["a"] is out.tree["b"], out.tree["a"].shape
    (True, ())
    """
    made: dict[int, TensorRef] = {}

    def convert(path: TreePath, leaf: Any) -> Any:
        if type(leaf) is not TensorRef:
            return leaf
        if id(leaf) not in made:
            made[id(leaf)] = fn(path, leaf)
        return made[id(leaf)]

    return Checkpoint(map_leaves(checkpoint.tree, convert), checkpoint.origin, checkpoint.format)
