"""torch's zip archive (what ``torch.save`` writes): ``<archive>/data.pkl`` plus one record per
storage, read without torch and without running pickled code.

Shared by the ``pt`` format (one archive per file) and ``dcp`` (one archive per tensor or value
inside its data files). Stored records only: a tensor is a plain byte range of the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core import dtypes
from ..core.errors import CorruptFileError, UnsafeFileError, UnsupportedValueError
from ..core.sources import BufferSource, FileRange
from ..core.stored import read_digests
from ..core.tree import TensorRef
from .torch_pickle import SafeUnpickler, Storage, contiguous_strides, prescan, unpickle
from .zip import StoredEntry, stored_entries

# Our extra record: {storage key: BLAKE3 of its bytes}. torch.load reads records by name and
# ignores it; the manifest takes its digests from it instead of reading every byte.
DIGESTS_RECORD = "sdconvert/blake3.json"
# A strided view is gathered into memory; refuse views that would expand far beyond the file.
GATHER_LIMIT_FACTOR = 4


def read_archive(path: Path, base: int = 0, length: int | None = None) -> Any:
    """The tree of the torch zip archive in ``length`` bytes of ``path`` from ``base``.

    The whole file by default; a DCP data file holds one such archive per tensor or value.
    """
    size = path.stat().st_size - base if length is None else length
    with open(path, "rb") as handle:
        handle.seek(base)
        head = handle.read(4)
    if head[:1] == b"\x80":
        raise UnsafeFileError(
            "this is a legacy (pre-1.6, non-zip) torch file; it is read only by unpickling "
            "arbitrary code, so it is refused. Re-save it with a current torch.save",
            file=path,
        )
    entries = stored_entries(path, size, base)
    prefix = _archive_prefix(entries, path)
    if prefix + "constants.pkl" in entries:
        raise UnsupportedValueError(
            "this is a TorchScript archive (torch.jit.save), not a checkpoint; "
            "save its state_dict() with torch.save instead",
            file=path,
        )
    byteorder = entries.get(prefix + "byteorder")
    if byteorder is not None and _read(path, byteorder) != b"little":
        raise UnsupportedValueError("big-endian torch checkpoints are not supported", file=path)
    data = _read(path, entries[prefix + "data.pkl"])
    prescan(data, path)
    record = entries.get(prefix + DIGESTS_RECORD)
    digests = read_digests(_read(path, record), path, DIGESTS_RECORD) if record else {}

    def storage_for_key(key: str) -> tuple[int, int]:
        entry = entries.get(f"{prefix}data/{key}")
        if entry is None:
            raise CorruptFileError(f"data.pkl refers to storage {key!r}, but there is no record data/{key}", file=path)
        return entry.data_offset, entry.size

    def gather(
        storage: Storage, row: dtypes.DType, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> TensorRef:
        ref = _tensor_from_storage(path, size, storage, row, offset, shape, stride)
        whole = offset == 0 and ref.nbytes == storage.nbytes and isinstance(ref.source, FileRange)
        return ref.with_stored_digest(digests.get(storage.key)) if whole else ref

    return unpickle(SafeUnpickler(data, path, storage_for_key, gather), path)


def _archive_prefix(entries: dict[str, StoredEntry], path: Path) -> str:
    pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise CorruptFileError(f"expected one <archive>/data.pkl record in the zip, found {len(pickles)}", file=path)
    prefix = pickles[0][: -len("data.pkl")]
    stray = [name for name in entries if not name.startswith(prefix)]
    if stray:
        raise CorruptFileError(f"zip record {stray[0]!r} lies outside the archive folder {prefix!r}", file=path)
    return prefix


def _require_stored(entry: StoredEntry, path: Path) -> None:
    if entry.compressed:
        raise CorruptFileError(f"zip record {entry.name!r} is compressed; torch stores records uncompressed", file=path)


def _read(path: Path, entry: StoredEntry) -> bytes:
    _require_stored(entry, path)
    with open(path, "rb") as handle:
        handle.seek(entry.data_offset)
        data = handle.read(entry.size)
    if len(data) != entry.size:
        raise CorruptFileError(f"record {entry.name!r} is truncated", file=path)
    return data


def _tensor_from_storage(
    path: Path,
    file_size: int,
    storage: Storage,
    row: dtypes.DType,
    offset: int,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
) -> TensorRef:
    count = dtypes.numel(shape)
    if count == 0:
        return TensorRef(row.name, shape, BufferSource.of(b""))
    last = offset + sum((dim - 1) * step for dim, step in zip(shape, stride, strict=True))
    needed = (last + 1) * row.itemsize
    if needed > storage.nbytes:
        raise CorruptFileError(
            f"a {row.name}{list(shape)} tensor needs {needed} bytes of storage {storage.key!r}, "
            f"which holds {storage.nbytes}",
            file=path,
        )
    if _is_contiguous(shape, stride):
        return TensorRef(row.name, shape, FileRange(path, storage.offset + offset * row.itemsize, count * row.itemsize))
    # A strided view (a transposed or sliced tensor saved as is): copy its elements into C order.
    if count * row.itemsize > GATHER_LIMIT_FACTOR * file_size + (1 << 20):
        raise CorruptFileError(
            f"a strided {row.name}{list(shape)} tensor would expand to {count * row.itemsize} bytes "
            f"from a {file_size}-byte file",
            file=path,
        )
    span = FileRange(path, storage.offset + offset * row.itemsize, (last - offset + 1) * row.itemsize)
    buffer = bytearray(span.nbytes)
    span.readinto(memoryview(buffer))
    import numpy as np  # only strided views need it; keeps start-up fast

    elements = np.frombuffer(buffer, dtype=np.dtype(f"V{row.itemsize}"))
    view = np.lib.stride_tricks.as_strided(
        elements, shape=shape, strides=tuple(step * row.itemsize for step in stride), writeable=False
    )
    return TensorRef(row.name, shape, BufferSource.of(np.ascontiguousarray(view).tobytes()))


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = contiguous_strides(shape)
    return all(dim == 1 or step == want for dim, step, want in zip(shape, stride, expected, strict=True))
