"""``dcp``: a ``torch.distributed.checkpoint`` folder (``.metadata`` + ``__<rank>_<n>.distcp`` files).

Reading needs no torch and runs no pickled code. ``.metadata`` is a pickle of DCP's dataclasses:
it is pre-scanned like ``.pt`` pickles and unpickled with inert stand-ins (each keeps only the
state it was given). Every tensor chunk and every non-tensor value is a small ``torch.save``
archive at an (offset, length) of a data file, read by the ``.pt`` reader in place. Chunks written
by several ranks are joined: row blocks (sharded along dim 0, as FSDP and ``Shard(0)`` write
them) as one byte stream without copying, other layouts gathered in memory. The tree is rebuilt
from the metadata's ``planner_data`` the way ``dcp.load`` rebuilds it: a string path segment is a
dict key, an integer one a list index (DCP flattens dict keys to strings).

Writing uses ``torch.distributed.checkpoint.save`` itself, in one process, into a staging folder
renamed into place, so ``dcp.load`` reads the result by construction. DCP keeps tensors bit for bit;
what it cannot keep is DCP's own limit: int dict keys come back as strings (or list indices),
``OrderedDict``/``_metadata`` as plain dicts.
"""

from __future__ import annotations

import io
import itertools
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..codecs.torch_archive import read_archive
from ..codecs.torch_pickle import ALLOWED_OPCODES, DTypeMarker, prescan
from ..core import dtypes
from ..core.atomic import atomic_folder
from ..core.budget import Budget
from ..core.contract import FormatBase, NoOptions, WriteContext
from ..core.errors import ConverterError, CorruptFileError, UnsafeFileError, UnsupportedValueError
from ..core.sources import BufferSource, ConcatSource
from ..core.tree import Checkpoint, TensorRef
from ..core.writing import TensorWriter

METADATA = ".metadata"
MAX_METADATA_BYTES = 1 << 30
DCP_MODULE = "torch.distributed.checkpoint.metadata"
RECORDS = {
    (DCP_MODULE, name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
    )
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
HELPERS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    (DCP_MODULE, "_MEM_FORMAT_ENCODING"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}
ALLOWED_GLOBALS = RECORDS | HELPERS | {("torch", name) for name in dtypes.DTYPES}
OPCODES = ALLOWED_OPCODES | {"NEWOBJ"}  # dataclasses pickle as NEWOBJ + BUILD


class _Record:
    """A DCP metadata object as data: its class name and the state pickle gave it. Runs nothing."""

    __slots__ = ("state",)
    name = "record"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def get(self, key: str) -> Any:
        state = getattr(self, "state", None)
        return state.get(key) if isinstance(state, dict) else None


_RECORD_TYPES = {key: type(key[1], (_Record,), {"__slots__": (), "name": key[1]}) for key in RECORDS}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, file: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._file = file

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _RECORD_TYPES:
            return _RECORD_TYPES[key]
        if key == ("torch", "Size"):
            return self._size
        if key in HELPERS:
            return self._opaque
        if module == "torch" and name in dtypes.DTYPES:
            return DTypeMarker(name)
        raise UnsafeFileError(
            f".metadata asks for the global {module}.{name}, which DCP metadata never needs; "
            "refusing to run pickled code",
            file=self._file,
        )

    def _size(self, dims: Any = ()) -> tuple[int, ...]:
        if not isinstance(dims, (list, tuple)) or not all(type(d) is int and d >= 0 for d in dims):
            raise CorruptFileError(f".metadata holds a malformed torch.Size {dims!r:.60}", file=self._file)
        return tuple(dims)

    def _opaque(self, *args: Any) -> tuple[Any, ...]:
        return args  # layouts, memory formats, paths: kept as their arguments, never interpreted


class DcpFormat(FormatBase):
    name = "dcp"
    suffixes: tuple[str, ...] = ()
    folder = True
    description = "torch.distributed.checkpoint folder (.metadata + .distcp): dcp.save / dcp.load"
    dtype_codes: ClassVar[Mapping[str, Any]] = {
        name: name for name in dtypes.DTYPES
    }  # torch writes them, so torch's names

    def reads_folder(self, path: Path) -> bool:
        return (Path(path) / METADATA).is_file()

    def sniff(self, head: bytes) -> bool:
        return False

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        folder = Path(path)
        metadata_path = folder / METADATA
        if not metadata_path.is_file():
            raise CorruptFileError(f"not a DCP checkpoint folder: no {METADATA}", file=folder)
        if metadata_path.stat().st_size > MAX_METADATA_BYTES:
            raise CorruptFileError(f"{METADATA} is larger than {MAX_METADATA_BYTES} bytes", file=metadata_path)
        data = metadata_path.read_bytes()
        prescan(data, metadata_path, opcodes=OPCODES, allowed_globals=ALLOWED_GLOBALS, what=METADATA)
        try:
            metadata = _MetadataUnpickler(data, metadata_path).load()
        except ConverterError:
            raise
        except Exception as exc:
            raise CorruptFileError(
                f"{METADATA} could not be read: {type(exc).__name__}: {exc}", file=metadata_path
            ) from None
        tree = _Assembler(folder, metadata_path, metadata).tree()
        return Checkpoint(tree, folder)

    def replaceable(self, path: Path) -> bool:
        return path.name.endswith((".distcp", METADATA)) and path.is_file()

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: NoOptions) -> None:
        # dcp.save writes the files, so the bytes go through torch: the context is honoured by
        # checking digests before handing the tensors over, reporting progress as each tensor is
        # handed over, and asking torch's writer to fsync (or not) before our atomic rename.
        if not isinstance(checkpoint.tree, dict) or not all(type(k) is str for k in checkpoint.tree):
            raise UnsupportedValueError("a DCP checkpoint's root must be a dict with str keys (FQNs)")
        from ..torch_bridge import dcp_save  # torch is reached only through the bridge

        tensor_writer = TensorWriter(context, checkpoint.origin)
        tensor_writer.check_sources(checkpoint)
        with atomic_folder(Path(path), self.replaceable, fsync=context.fsync, overwrite=context.overwrite) as staging:
            dcp_save(checkpoint, staging, fsync=context.fsync, progress=tensor_writer.progress)


class _Assembler:
    """Turns DCP metadata and its data files into the checkpoint tree."""

    def __init__(self, folder: Path, metadata_path: Path, metadata: Any) -> None:
        self.folder, self.file = folder, metadata_path
        if not isinstance(metadata, _Record) or metadata.name != "Metadata":
            raise CorruptFileError(f"{METADATA} does not hold DCP Metadata", file=metadata_path)
        self.entries = self._dict(metadata.get("state_dict_metadata"), "state_dict_metadata")
        self.planner = self._dict(metadata.get("planner_data") or {}, "planner_data")
        self.storage: dict[tuple[str, tuple[int, ...] | None], tuple[Path, int, int]] = {}
        for index, info in self._dict(metadata.get("storage_data"), "storage_data").items():
            if not isinstance(index, _Record) or not isinstance(info, _Record):
                raise CorruptFileError("storage_data must map MetadataIndex to _StorageInfo", file=metadata_path)
            if info.get("transform_descriptors"):
                raise UnsupportedValueError(
                    "DCP storage transforms (compression, ...) are not supported", file=metadata_path
                )
            offsets = index.get("offset")
            key = (index.get("fqn"), tuple(offsets) if offsets is not None else None)
            self.storage[key] = (
                self._data_file(info.get("relative_path")),
                self._int(info.get("offset")),
                self._int(info.get("length")),
            )

    def tree(self) -> Any:
        root: dict[str, Any] = {}
        for fqn, entry in self.entries.items():
            path = self.planner.get(fqn, (fqn,))
            if not isinstance(path, tuple) or not path or not all(type(p) in (str, int) for p in path):
                raise CorruptFileError(f"planner_data gives {fqn!r} the malformed path {path!r:.60}", file=self.file)
            _set_element(root, path, self._value(fqn, entry), self.file)
        return root

    def _value(self, fqn: str, entry: Any) -> Any:
        if isinstance(entry, _Record) and entry.name == "BytesStorageMetadata":
            return read_archive(*self._blob(fqn, None))
        if not isinstance(entry, _Record) or entry.name != "TensorStorageMetadata":
            raise CorruptFileError(f"{fqn!r} has unknown storage metadata", file=self.file)
        properties = entry.get("properties")
        state = getattr(properties, "state", None)
        dtype = state[0] if isinstance(state, tuple) and state else properties.get("dtype") if properties else None
        if not isinstance(dtype, DTypeMarker):
            raise CorruptFileError(f"{fqn!r} has no dtype in its TensorProperties", file=self.file)
        size = entry.get("size")
        chunks = entry.get("chunks")
        if not isinstance(size, tuple) or not isinstance(chunks, list) or not chunks:
            raise CorruptFileError(f"{fqn!r} needs a size and chunks", file=self.file)
        pieces = []
        for chunk in chunks:
            offsets, sizes = chunk.get("offsets"), chunk.get("sizes")
            if (
                not isinstance(offsets, tuple)
                or not isinstance(sizes, tuple)
                or not len(offsets) == len(sizes) == len(size)
            ):
                raise CorruptFileError(f"{fqn!r} has a malformed chunk", file=self.file)
            if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
                raise CorruptFileError(
                    f"{fqn!r}: chunk at {list(offsets)} of {list(sizes)} lies outside {list(size)}", file=self.file
                )
            ref = read_archive(*self._blob(fqn, offsets))
            if not isinstance(ref, TensorRef) or ref.dtype != dtype.name or ref.shape != sizes:
                raise CorruptFileError(
                    f"{fqn!r}: the chunk at {list(offsets)} is not a {dtype.name}{list(sizes)} tensor", file=self.file
                )
            pieces.append((offsets, ref))
        return _join(fqn, dtype.name, size, pieces, self.file)

    def _blob(self, fqn: str, offsets: tuple[int, ...] | None) -> tuple[Path, int, int]:
        key = (fqn, offsets)
        if key not in self.storage:
            raise CorruptFileError(f"storage_data has no entry for {fqn!r} at {offsets}", file=self.file)
        return self.storage[key]

    def _data_file(self, name: Any) -> Path:
        if type(name) is not str or Path(name).is_absolute() or len(Path(name).parts) != 1 or name in (".", ".."):
            raise UnsafeFileError(
                f"data file name {name!r} must be a plain file name in the checkpoint folder", file=self.file
            )
        target = self.folder / name
        if target.is_symlink() or not target.is_file():
            raise CorruptFileError(f"data file {name!r} is not a regular file in the checkpoint folder", file=self.file)
        return target

    def _dict(self, value: Any, what: str) -> dict[Any, Any]:
        if type(value) is not dict:
            raise CorruptFileError(f"{METADATA}: {what} must be a dict", file=self.file)
        return value

    def _int(self, value: Any) -> int:
        if type(value) is not int or value < 0:
            raise CorruptFileError(f"{METADATA}: a storage offset or length is {value!r:.40}", file=self.file)
        return value


def _join(
    fqn: str, dtype: str, size: tuple[int, ...], pieces: list[tuple[tuple[int, ...], TensorRef]], file: Path
) -> TensorRef:
    """One tensor from its chunks: row blocks without copying, any other tiling gathered."""
    count = dtypes.numel(size)
    if sum(dtypes.numel(ref.shape) for _, ref in pieces) != count:
        raise CorruptFileError(f"{fqn!r}: chunks hold a different number of elements than {list(size)}", file=file)
    if len(pieces) == 1:
        return TensorRef(dtype, size, pieces[0][1].source)
    rows = sorted(pieces, key=lambda piece: piece[0])
    if all(offsets[1:] == (0,) * (len(size) - 1) and ref.shape[1:] == size[1:] for offsets, ref in rows):
        position = 0
        for offsets, ref in rows:
            if offsets[0] != position:
                raise CorruptFileError(f"{fqn!r}: row chunks leave a gap or overlap at row {position}", file=file)
            position += ref.shape[0]
        return TensorRef(dtype, size, ConcatSource(tuple(ref.source for _, ref in rows)))
    import numpy as np  # only for chunkings other than row blocks

    itemsize = dtypes.DTYPES[dtype].itemsize
    whole = np.zeros(size, dtype=np.dtype(f"V{itemsize}"))
    filled = np.zeros(size, dtype=bool)
    for offsets, ref in pieces:
        data = bytearray(ref.nbytes)
        ref.source.readinto(memoryview(data))
        block = tuple(slice(o, o + s) for o, s in zip(offsets, ref.shape, strict=True))
        if filled[block].any():
            raise CorruptFileError(f"{fqn!r}: chunks overlap at {list(offsets)}", file=file)
        whole[block] = np.frombuffer(data, dtype=whole.dtype).reshape(ref.shape)
        filled[block] = True
    return TensorRef(dtype, size, BufferSource.of(whole.tobytes()))


def _set_element(root: dict[str, Any], path: tuple[str | int, ...], value: Any, file: Path) -> None:
    """Place ``value`` at ``path`` as torch's ``_traverse.set_element`` does for ``dcp.load``."""
    container: Any = root
    for key, following in itertools.pairwise(path):
        fresh: Any = {} if type(following) is str else []
        container = _child(container, key, fresh, file)
    last = path[-1]
    if isinstance(container, list):
        if type(last) is not int or last > 1_000_000:
            raise CorruptFileError(f"planner_data path {path!r:.60} indexes a list with {last!r}", file=file)
        container.extend([None] * (last + 1 - len(container)))
    elif type(last) is not str:
        raise CorruptFileError(f"planner_data path {path!r:.60} puts an index into a dict", file=file)
    container[last] = value


def _child(container: Any, key: str | int, fresh: Any, file: Path) -> Any:
    if isinstance(container, dict):
        if type(key) is not str:
            raise CorruptFileError(f"planner_data puts the index {key!r} into a dict", file=file)
        return container.setdefault(key, fresh)
    if type(key) is not int or key > 1_000_000:
        raise CorruptFileError(f"planner_data indexes a list with {key!r}", file=file)
    container.extend([None] * (key + 1 - len(container)))
    if container[key] is None:
        container[key] = fresh
    return container[key]


FORMAT = DcpFormat()
