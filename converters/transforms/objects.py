"""``DropObjects`` (``--drop-objects``): remove the recorded objects, keep the weights and plain values.

The values torch's own safe loader accepts (a ``torch.dtype``, ``torch.Size``, ``torch.device``,
``set``, ``complex``: :data:`~converters.core.objects.TORCH_SAFE_CALLS`) are plain values, and stay.

A checkpoint's ``argparse.Namespace``, trainer hyper-parameters or omegaconf configuration are
kept as inert records (see :mod:`converters.core.objects`); users who share weights only, or who
write a ``.pt`` that must load with ``torch.load(weights_only=True)``, drop them. Every record in
the tree goes (a dict loses the key, a list or tuple closes up over the item), and the report
lists each path with its class.
"""

from __future__ import annotations

from ..core.dtypes import DTYPES
from ..core.objects import ObjectRecord, torch_safe
from ..core.tree import Checkpoint, walk
from .base import RawPath, Reporting, drop_paths, replace_tree


class DropObjects(Reporting):
    """Drop every recorded object (:class:`~converters.core.objects.ObjectRecord`) of the tree.

    >>> from converters.core.objects import ObjectRecord
    >>> tree = {"w": 1, "args": ObjectRecord("argparse.Namespace", "new", (), state={"lr": 0.1}, built=True)}
    >>> DropObjects()(Checkpoint(tree)).tree
    {'w': 1}
    """

    kind = "drop-objects"

    def __init__(self, *, option: str = "--drop-objects") -> None:
        self.option = option
        self.arguments = ()
        self._report = None

    def __call__(self, checkpoint: Checkpoint) -> Checkpoint:
        found = [
            (path, leaf.name)
            for path, leaf in walk(checkpoint.tree)
            if type(leaf) is ObjectRecord and not torch_safe(leaf, DTYPES)
        ]
        self._report = {
            "dropped": [{"path": RawPath(path), "class": name, "tensors": 0, "bytes": 0} for path, name in found]
        }
        if not found:
            return checkpoint
        if () in {path for path, _ in found}:  # the whole checkpoint is one object: nothing would be left
            return replace_tree(checkpoint, {})
        return replace_tree(checkpoint, drop_paths(checkpoint.tree, {path for path, _ in found}))

    def summary(self) -> str:
        text = super().summary()
        if self._report is None:
            return text
        dropped = self._report["dropped"]
        if not dropped:
            return f"{text}: no recorded objects"
        classes = sorted({item["class"] for item in dropped})
        return f"{text}: dropped {len(dropped)} recorded object(s) ({', '.join(classes)})"
