"""``Ties`` (``--ties keep|materialize|drop-aliases``): what to do with a tensor held at several paths.

A tied tensor (an embedding shared with the output layer) is one ``TensorRef`` object at several
paths; writers store it once and readers give one tensor back for every path.

- ``keep`` (the default): nothing changes.
- ``materialize``: every path gets its own tensor: the same bytes (and stored digest), a separate
  ``TensorRef``, written once per path. For consumers that require every key to have its own data.
- ``drop-aliases``: the first path in tree order keeps the tensor; every other path is removed from
  its container (a list or tuple closes up over it), as ``save_pretrained`` leaves tied weights out.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import TreePath
from ..core.tree import Checkpoint, TensorRef, map_leaves
from .base import InvalidOptionError, RawPath, Reporting, TracksOrigins, drop_paths, paths_by_tensor, replace_tree

MODES = ("keep", "materialize", "drop-aliases")


class Ties(TracksOrigins, Reporting):
    """Keep, materialize or drop the aliases of tied tensors (see the module docstring).

    >>> from converters.core.sources import BufferSource
    >>> w = TensorRef("float32", (), BufferSource.of(bytes(4)))
    >>> out = Ties("materialize")(Checkpoint({"a": w, "b": w})).tree
    >>> out["a"] is w, out["b"] is w, out["b"].source is w.source
    (True, False, True)
    >>> list(Ties("drop-aliases")(Checkpoint({"a": w, "b": w})).tree)
    ['a']
    """

    kind = "ties"

    def __init__(self, mode: str = "keep", *, option: str = "--ties") -> None:
        if mode not in MODES:
            raise InvalidOptionError(option, str(mode), f"expected one of {', '.join(MODES)}")
        self.option = option
        self.mode = mode
        self.arguments = (mode,)
        self._report = None

    def __call__(self, checkpoint: Checkpoint) -> Checkpoint:
        paths_of, refs = paths_by_tensor(checkpoint)
        tied = {key: paths for key, paths in paths_of.items() if len(paths) > 1}
        groups = [
            {
                "path": RawPath(paths[0]),
                "aliases": [RawPath(path) for path in paths[1:]],
                "bytes": refs[key].nbytes,
            }
            for key, paths in tied.items()
        ]
        result = checkpoint
        self._forget_origins()
        if self.mode == "materialize" and tied:
            seen: set[int] = set()

            def separate(path: TreePath, leaf: Any) -> Any:
                if type(leaf) is not TensorRef or id(leaf) not in tied:
                    return leaf
                if id(leaf) not in seen:
                    seen.add(id(leaf))
                    return leaf
                copy = leaf.with_stored_digest(leaf.digest)  # same bytes, its own object
                self._made_from(copy, leaf)
                return copy

            result = replace_tree(checkpoint, map_leaves(checkpoint.tree, separate))
        elif self.mode == "drop-aliases" and tied:
            drop = {path for paths in tied.values() for path in paths[1:]}
            result = replace_tree(checkpoint, drop_paths(checkpoint.tree, drop))
        self._report = {"mode": self.mode, "tied": groups}
        return result

    def summary(self) -> str:
        text = super().summary()
        if self._report is None:
            return text
        groups = self._report["tied"]
        aliases = sum(len(group["aliases"]) for group in groups)
        if not groups:
            return f"{text}: no tied tensors"
        done = {
            "keep": "kept tied (stored once)",
            "materialize": "materialized (stored once per path)",
            "drop-aliases": "dropped (the first path keeps each tensor)",
        }[self.mode]
        return f"{text}: {len(groups)} tied tensor(s), {aliases} alias path(s) {done}"
