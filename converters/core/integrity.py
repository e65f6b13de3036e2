"""Checking tensor bytes against the BLAKE3 digests a file stores for them.

A digest is computed once, where bytes enter our files (converting from another tool's file), in
the copy's data flow; from then on it travels with the bytes, which conversions never change. So
converting between our files only copies, and a corrupted source keeps its old digest, which then
no longer matches: ``verify --deep``, ``load(check=True)`` and ``convert(check=True)`` re-hash and
report the tensor.
"""

from __future__ import annotations

from .errors import CorruptFileError, format_tree_path
from .sources import ByteSource, ConcatSource, FileRange, Record
from .tree import Checkpoint, TensorRef


def mismatch_message(ref: TensorRef, actual: str) -> str:
    return f"tensor bytes do not match the stored BLAKE3 digest (stored {ref.digest}, bytes hash to {actual})"


def check(checkpoint: Checkpoint) -> tuple[list[str], int]:
    """(problems, tensors without a stored digest): every stored digest re-computed from the bytes,
    and every container checksum (zip CRC-32) the tensors' bytes lie in."""
    problems = []
    unchecked = 0
    checked: set[Record] = set()
    stored = checkpoint.unique_tensors()
    for path, ref in stored:
        for record in records_of(ref.source):
            problem = record_problem(record, checked)
            if problem is not None:
                problems.append(f"{format_tree_path(path)}: {problem}")
        if ref.digest is None:
            unchecked += 1
            continue
        actual = _blake3_hex(ref.source)
        if actual != ref.digest:
            problems.append(f"{format_tree_path(path)}: {mismatch_message(ref, actual)}")
    problem = tree_problem(checkpoint)
    if problem is not None:
        problems.append(problem)
    elif checkpoint.tree_digest is None and checkpoint.expects_tree_digest:
        # Our writers store both; digests without a tree digest mean it was lost (a flipped bit in
        # its key), and with it the check of every key, type and value.
        problems.append(
            "the file stores tensor digests but no tree digest: its keys, types and values cannot be checked"
        )
    return problems, unchecked


def tree_problem(checkpoint: Checkpoint) -> str | None:
    """A message when the tree as read does not match the tree digest its file stores."""
    if checkpoint.tree_digest is None:
        return None
    from .manifests import recomputed_tree_digest

    actual = recomputed_tree_digest(checkpoint)
    if actual != checkpoint.tree_digest:
        return (
            "the tree (keys, types, values, dtypes, shapes, digests) does not match its stored BLAKE3 digest "
            f"(stored {checkpoint.tree_digest}, the tree as read gives {actual})"
        )
    return None


def verify_bytes(checkpoint: Checkpoint, origin: object = None) -> None:
    """Raise ``CorruptFileError`` naming the first tensor whose bytes do not match their stored digest."""
    checked: set[Record] = set()
    for path, ref in checkpoint.unique_tensors():
        for record in records_of(ref.source):
            verify_record(record, checked)
        if ref.digest is not None:
            actual = _blake3_hex(ref.source)
            if actual != ref.digest:
                raise CorruptFileError(mismatch_message(ref, actual), file=str(origin) if origin else None, path=path)
    problem = tree_problem(checkpoint)
    if problem is not None:
        raise CorruptFileError(problem, file=str(origin) if origin else None)


def records_of(source: ByteSource) -> list[Record]:
    """The checksummed records a source's bytes lie in."""
    if isinstance(source, ConcatSource):
        return [record for part in source.parts for record in records_of(part)]
    if isinstance(source, FileRange) and source.record is not None:
        return [source.record]
    return []


def verify_record(record: Record, checked: set[Record] | None = None) -> None:
    """Raise ``CorruptFileError`` when a record's bytes do not match the CRC-32 its container stores.

    ``checked``: records this operation already found intact (several views of one record are
    read once); the caller owns it, so a file changed between two operations is read again.
    """
    problem = record_problem(record, checked)
    if problem is not None:
        raise CorruptFileError(problem, file=record.path)


def record_problem(record: Record, checked: set[Record] | None = None) -> str | None:
    if checked is not None and record in checked:
        return None
    from .transfer import crc32_of  # the hashing libraries: loaded when something is checked

    actual = crc32_of(FileRange(record.path, record.offset, record.length))
    if actual != record.crc32:
        return crc_message(record, actual)
    if checked is not None:
        checked.add(record)
    return None


def crc_message(record: Record, actual: int) -> str:
    return f"{record.name} does not match its CRC-32 (stored {record.crc32:08x}, bytes give {actual:08x})"


def read_tree_digest(value: object, file: object, what: str) -> str:
    """A stored tree digest, checked for shape: 64 lowercase hex digits."""
    if type(value) is not str or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise CorruptFileError(f"{what} must be a 64-digit hex BLAKE3 digest", file=str(file))
    return value


def _blake3_hex(source: ByteSource) -> str:
    from .transfer import blake3_hex  # the hashing libraries: loaded when something is checked

    return blake3_hex(source)
