"""Checking tensor bytes against the BLAKE3 digests a file stores for them.

A digest is computed once, where bytes enter our files (converting from another tool's file), in
the copy's data flow; from then on it travels with the bytes, which conversions never change. So
converting between our files only copies, and a corrupted source keeps its old digest, which then
no longer matches: ``verify --deep``, ``load(check=True)`` and ``convert(check=True)`` re-hash and
report the tensor.
"""

from __future__ import annotations

from .errors import CorruptFileError, format_tree_path
from .transfer import blake3_hex
from .tree import Checkpoint, TensorRef


def mismatch_message(ref: TensorRef, actual: str) -> str:
    return f"tensor bytes do not match the stored BLAKE3 digest (stored {ref.digest}, bytes hash to {actual})"


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


def verify_bytes(checkpoint: Checkpoint, origin: object = None) -> None:
    """Raise ``CorruptFileError`` naming the first tensor whose bytes do not match their stored digest."""
    for path, ref in checkpoint.unique_tensors():
        if ref.digest is not None:
            actual = blake3_hex(ref.source)
            if actual != ref.digest:
                raise CorruptFileError(mismatch_message(ref, actual), file=str(origin) if origin else None, path=path)
