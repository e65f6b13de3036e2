"""Checking tensor bytes against the BLAKE3 digests a file stores for them.

A digest is computed once, where bytes enter our files (converting from another tool's file), in
the copy's data flow; from then on it travels with the bytes, which conversions never change. So
converting between our files only copies, and a corrupted source keeps its old digest, which then
no longer matches: ``verify --deep``, ``load(check=True)`` and ``convert(check=True)`` re-hash and
report the tensor.
"""

from __future__ import annotations

from .errors import CorruptFileError, TreePath, format_tree_path
from .transfer import blake3_hex
from .tree import Checkpoint, TensorRef


def mismatch(ref: TensorRef, actual: str | None) -> bool:
    return ref.digest is not None and actual is not None and actual != ref.digest


def mismatch_message(ref: TensorRef, actual: str) -> str:
    return f"tensor bytes do not match the stored BLAKE3 digest (stored {ref.digest}, bytes hash to {actual})"


def require_match(ref: TensorRef, actual: str | None, path: TreePath, file: object) -> None:
    """Raise, naming the tensor, when bytes just copied do not hash to the digest their file stores."""
    if actual is not None and mismatch(ref, actual):
        raise CorruptFileError(mismatch_message(ref, actual), file=str(file) if file else None, path=path)


def needs_hashing(ref: TensorRef, check: bool) -> bool:
    """Hash while copying when there is no digest to carry over, or when asked to check it."""
    return check or ref.digest is None


def settle(ref: TensorRef, computed: str | None, path: TreePath, file: object) -> str:
    """The digest to store for a copied tensor: the one computed (checked against the stored one)."""
    require_match(ref, computed, path, file)
    digest = computed or ref.digest
    assert digest is not None  # needs_hashing() made sure one of the two exists
    return digest


def check(checkpoint: Checkpoint) -> tuple[list[str], int]:
    """(problems, tensors without a stored digest): every stored digest re-computed from the bytes."""
    problems = []
    unchecked = 0
    for path, ref in checkpoint.unique_tensors():
        if ref.digest is None:
            unchecked += 1
            continue
        actual = blake3_hex(ref.source)
        if actual != ref.digest:
            problems.append(f"{format_tree_path(path)}: {mismatch_message(ref, actual)}")
    return problems, unchecked
