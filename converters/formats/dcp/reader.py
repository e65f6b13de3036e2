"""Reading a ``torch.distributed.checkpoint`` folder: no torch, no pickled code run.

``.metadata`` is pre-scanned like ``.pt`` pickles and unpickled with inert stand-ins (each keeps
only the state it was given). Every tensor chunk and every non-tensor value is a small
``torch.save`` archive at an (offset, length) of a data file, read by the ``.pt`` reader in place.
Chunks written by several ranks are joined: row blocks (sharded along dim 0, as FSDP and
``Shard(0)`` write them) as one byte stream without copying, other layouts gathered in memory.
Entries that name the very same range of a data file (a tie) are one tensor. The tree is rebuilt
from ``planner_data`` the way ``dcp.load`` rebuilds it: a string path segment is a dict key, an
integer one a list index (DCP flattens dict keys to strings).

A folder we wrote also holds ``sdconvert.json`` (see ``formats/dcp/__init__.py``): our tree, read
back exactly, after checking that it describes this very ``.metadata`` and that DCP's entries are
exactly the view of that tree ``dcp.load`` is to give.
"""

from __future__ import annotations

import io
import itertools
import json
import pickle
import stat
from pathlib import Path
from typing import Any

from blake3 import blake3

from ...codecs.dcp_metadata import ALLOWED_GLOBALS, HELPERS, RECORDS
from ...codecs.torch_archive import NUMPY_IMPORT_BYTES, read_archive
from ...codecs.torch_pickle import ALLOWED_OPCODES, DTypeMarker, prescan
from ...core import dtypes, manifests
from ...core.budget import Budget
from ...core.errors import ConverterError, CorruptFileError, UnsafeFileError, UnsupportedValueError
from ...core.sources import BufferSource, ConcatSource
from ...core.storage import RemoteError
from ...core.stored import check_tree_digest, loads_json_strict, read_folder_file, tree_from_stored
from ...core.tree import MAX_DIM, MAX_NDIM, Checkpoint, TensorRef, map_leaves, walk
from . import optimizers, view

METADATA = ".metadata"
SIDECAR = "sdconvert.json"  # our tree, digests and optimizer names beside DCP's files (__init__.py)
SIDECAR_VERSION = 1
MAX_METADATA_BYTES = 1 << 30
MAX_SIDECAR_BYTES = 1 << 30
KIND = "torch.distributed.checkpoint folder"
OPCODES = ALLOWED_OPCODES | {"NEWOBJ"}  # dataclasses pickle as NEWOBJ + BUILD


class _Record:
    """A DCP metadata object as data: its class name and the state pickle gave it. Runs nothing."""

    __slots__ = ("_state",)
    name = "record"

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def state(self) -> Any:
        return getattr(self, "_state", None)

    def get(self, key: str) -> Any:
        state = self.state()
        return state.get(key) if type(state) is dict else None


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


def read_folder(folder: Path, budget: Budget) -> Checkpoint:
    """The checkpoint of a DCP folder: torch's view of it, or our exact tree when we wrote it."""
    metadata_path = folder / METADATA
    data = _read_metadata(folder, metadata_path, budget)
    prescan(data, metadata_path, opcodes=OPCODES, allowed_globals=ALLOWED_GLOBALS, what=METADATA, budget=budget)
    try:
        metadata = _MetadataUnpickler(data, metadata_path).load()
    except ConverterError:
        raise
    except Exception as exc:
        raise CorruptFileError(
            f"{METADATA} could not be read: {type(exc).__name__}: {exc}", file=metadata_path
        ) from None
    metadata_digest = str(blake3(data).hexdigest())
    del data
    assembler = _Assembler(folder, metadata_path, metadata, budget)
    sidecar = _read_sidecar(folder, metadata_digest, budget)
    if sidecar is None:
        return Checkpoint(assembler.tree(assembler.entries()), folder, kind=KIND)
    return _ours(assembler, sidecar, folder / SIDECAR, budget)


def _read_metadata(folder: Path, metadata_path: Path, budget: Budget) -> bytes:
    """``.metadata``'s bytes: a regular file of the folder (a symlink is refused, as data files are)."""
    try:
        return read_folder_file(metadata_path, METADATA, "the checkpoint folder", MAX_METADATA_BYTES, budget)
    except FileNotFoundError:
        raise CorruptFileError(f"not a DCP checkpoint folder: no {METADATA}", file=folder) from None


class _Assembler:
    """Turns DCP metadata and its data files into the checkpoint tree.

    Every field of DCP's records is checked for its type and range before it is used (anything
    else is ``CorruptFileError``); data files are regular files of the folder and the byte ranges of
    ``storage_data`` lie inside them without overlapping — but for tensor chunks that name the very
    same range (a tied tensor, stored once), read once as one tensor — so each stored byte is read
    once; every value placed in the tree, every list slot the planner's paths ask for and every
    chunk is charged to the read's budget first.
    """

    def __init__(self, folder: Path, metadata_path: Path, metadata: Any, budget: Budget) -> None:
        self.folder, self.file, self.budget = folder, metadata_path, budget
        if not isinstance(metadata, _Record) or metadata.name != "Metadata" or type(metadata.state()) is not dict:
            raise CorruptFileError(f"{METADATA} does not hold DCP Metadata", file=metadata_path)
        self.metadata = self._dict(metadata.get("state_dict_metadata"), "state_dict_metadata")
        planner = metadata.get("planner_data")
        self.planner = {} if planner is None else self._dict(planner, "planner_data")
        storage_data = self._dict(metadata.get("storage_data"), "storage_data")
        budget.nodes(len(self.metadata) + len(self.planner) + len(storage_data), f"{METADATA} entries")
        self.files: dict[str, tuple[Path, int]] = {}  # data file name -> (path, size)
        self.storage: dict[tuple[str, tuple[int, ...] | None], tuple[Path, int, int]] = {}
        self.chunks: dict[tuple[Path, int, int], TensorRef] = {}  # a range read as a chunk, by range
        ranges: dict[Path, list[tuple[int, int, str, bool]]] = {}
        for index, info in storage_data.items():
            fqn, offsets = self._index(index)
            relative_path = self._field(info, "_StorageInfo", "relative_path")
            offset = self._int(self._field(info, "_StorageInfo", "offset"), "_StorageInfo.offset")
            length = self._int(self._field(info, "_StorageInfo", "length"), "_StorageInfo.length")
            if info.get("transform_descriptors"):
                raise UnsupportedValueError(
                    "DCP storage transforms (compression, ...) are not supported", file=metadata_path
                )
            target, size = self._data_file(relative_path)
            if offset + length > size:
                raise CorruptFileError(
                    f"storage_data puts {fqn!r} at bytes [{offset}, {offset + length}) of {relative_path!r}, "
                    f"which has {size} bytes",
                    file=metadata_path,
                )
            self.storage[(fqn, offsets)] = (target, offset, length)
            ranges.setdefault(target, []).append((offset, offset + length, fqn, offsets is not None))
        for target, spans in ranges.items():  # each byte stored once: no range read twice
            spans.sort()
            for (start, end, first, chunk), (begin, stop, second, other) in itertools.pairwise(spans):
                shared = (start, end) == (begin, stop) and chunk and other and end > start
                if begin < end and not shared:
                    raise CorruptFileError(
                        f"storage_data gives {first!r} and {second!r} overlapping bytes of {target.name!r}",
                        file=metadata_path,
                    )

    def entries(self) -> list[tuple[str, tuple[str | int, ...], Any]]:
        """Each entry of ``state_dict_metadata`` in order: (FQN, planner path, value read)."""
        found = []
        for fqn, entry in self.metadata.items():
            if type(fqn) is not str:
                raise CorruptFileError(f"state_dict_metadata has the key {fqn!r:.60}; FQNs are str", file=self.file)
            path = self.planner.get(fqn, (fqn,))
            if type(path) is not tuple or not path or not all(type(p) in (str, int) for p in path):
                raise CorruptFileError(f"planner_data gives {fqn!r} the malformed path {path!r:.60}", file=self.file)
            found.append((fqn, path, self._value(fqn, entry)))
        return found

    def tree(self, entries: list[tuple[str, tuple[str | int, ...], Any]]) -> dict[str, Any]:
        """The tree ``dcp.load`` builds from ``entries`` (paths checked as they are placed)."""
        root: dict[str, Any] = {}
        for _, path, value in entries:
            self.budget.nodes(len(path), "containers of planner_data paths")  # at most one per step
            _set_element(root, path, value, self.file, self.budget)
        return root

    def _value(self, fqn: str, entry: Any) -> Any:
        if isinstance(entry, _Record) and entry.name == "BytesStorageMetadata":
            return read_archive(*self._blob(fqn, None), budget=self.budget)
        if not isinstance(entry, _Record) or entry.name != "TensorStorageMetadata":
            raise CorruptFileError(f"{fqn!r} has unknown storage metadata", file=self.file)
        dtype = self._dtype(fqn, self._field(entry, "TensorStorageMetadata", "properties"))
        size = self._shape(self._field(entry, "TensorStorageMetadata", "size"), f"{fqn!r}: size", dims=None)
        chunks = self._field(entry, "TensorStorageMetadata", "chunks")
        if type(chunks) is not list or not chunks:
            raise CorruptFileError(f"{fqn!r}: chunks must be a non-empty list", file=self.file)
        self.budget.tensors(len(chunks))
        pieces = []
        seen: set[tuple[int, ...]] = set()
        for chunk in chunks:
            if not isinstance(chunk, _Record) or chunk.name != "ChunkStorageMetadata":
                raise CorruptFileError(f"{fqn!r}: a chunk is not a ChunkStorageMetadata", file=self.file)
            offsets = self._shape(chunk.get("offsets"), f"{fqn!r}: a chunk's offsets", dims=len(size))
            sizes = self._shape(chunk.get("sizes"), f"{fqn!r}: a chunk's sizes", dims=len(size))
            if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
                raise CorruptFileError(
                    f"{fqn!r}: chunk at {list(offsets)} of {list(sizes)} lies outside {list(size)}", file=self.file
                )
            if offsets in seen:
                raise CorruptFileError(f"{fqn!r}: two chunks at {list(offsets)}", file=self.file)
            seen.add(offsets)
            blob = self._blob(fqn, offsets)
            ref = self.chunks.get(blob)
            if ref is None:
                ref = self.chunks[blob] = read_archive(*blob, budget=self.budget)
            if not isinstance(ref, TensorRef) or ref.numpy or ref.dtype != dtype or ref.shape != sizes:
                raise CorruptFileError(
                    f"{fqn!r}: the chunk at {list(offsets)} is not a {dtype}{list(sizes)} tensor", file=self.file
                )
            self.budget.output(ref.nbytes, "tensor bytes of .metadata chunks")
            pieces.append((offsets, ref))
        return _join(fqn, dtype, size, pieces, self.file, self.budget)

    def _dtype(self, fqn: str, properties: Any) -> str:
        if not isinstance(properties, _Record) or properties.name != "TensorProperties":
            raise CorruptFileError(f"{fqn!r}: properties must be TensorProperties", file=self.file)
        state = properties.state()
        # torch pickles TensorProperties as a tuple (dtype, layout, ...); a dict state is older.
        dtype = state[0] if type(state) is tuple and state else properties.get("dtype")
        if not isinstance(dtype, DTypeMarker):
            raise CorruptFileError(f"{fqn!r} has no dtype in its TensorProperties", file=self.file)
        return dtype.name

    def _shape(self, value: Any, what: str, *, dims: int | None) -> tuple[int, ...]:
        """A torch.Size of DCP (sizes and offsets): ints in [0, 2**63), at most MAX_NDIM of them."""
        if (
            type(value) is not tuple
            or len(value) > MAX_NDIM
            or (dims is not None and len(value) != dims)
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in value)
        ):
            rank = f"{dims} " if dims is not None else f"at most {MAX_NDIM} "
            raise CorruptFileError(
                f"{what} must be a torch.Size of {rank}ints in [0, 2**63), found {value!r:.60}", file=self.file
            )
        return value

    def _index(self, index: Any) -> tuple[str, tuple[int, ...] | None]:
        if not isinstance(index, _Record) or index.name != "MetadataIndex":
            raise CorruptFileError("storage_data must map MetadataIndex to _StorageInfo", file=self.file)
        fqn = self._field(index, "MetadataIndex", "fqn")
        if type(fqn) is not str:
            raise CorruptFileError(f"MetadataIndex.fqn must be a str, found {fqn!r:.60}", file=self.file)
        offset = index.get("offset")
        return fqn, None if offset is None else self._shape(offset, f"{fqn!r}: MetadataIndex.offset", dims=None)

    def _field(self, record: Any, name: str, key: str) -> Any:
        if not isinstance(record, _Record) or record.name != name or type(record.state()) is not dict:
            kind = record.name if isinstance(record, _Record) else type(record).__name__
            raise CorruptFileError(f"{METADATA} has a {kind} where a {name} belongs", file=self.file)
        return record.get(key)

    def _blob(self, fqn: str, offsets: tuple[int, ...] | None) -> tuple[Path, int, int]:
        key = (fqn, offsets)
        if key not in self.storage:
            raise CorruptFileError(f"storage_data has no entry for {fqn!r} at {offsets}", file=self.file)
        return self.storage[key]

    def _data_file(self, name: Any) -> tuple[Path, int]:
        if type(name) is str and name in self.files:
            return self.files[name]
        if type(name) is not str or Path(name).is_absolute() or len(Path(name).parts) != 1 or name in (".", ".."):
            raise UnsafeFileError(
                f"data file name {name!r:.60} must be a plain file name in the checkpoint folder", file=self.file
            )
        target = self.folder / name
        try:
            info = target.lstat()  # a remote object's: a store has no symlinks, FIFOs or devices
        except OSError:
            info = None
        except RemoteError as exc:  # missing is said below; access denied or the network is not
            if not exc.missing:
                raise
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):  # a symlink, a folder, a FIFO, or missing
            raise CorruptFileError(f"data file {name!r} is not a regular file in the checkpoint folder", file=self.file)
        self.files[name] = (target, info.st_size)
        return self.files[name]

    def _dict(self, value: Any, what: str) -> dict[Any, Any]:
        if type(value) is not dict:
            raise CorruptFileError(f"{METADATA}: {what} must be a dict", file=self.file)
        return value

    def _int(self, value: Any, what: str) -> int:
        if type(value) is not int or not 0 <= value <= MAX_DIM:
            raise CorruptFileError(
                f"{METADATA}: {what} must be an int in [0, 2**63), found {value!r:.40}", file=self.file
            )
        return value


def _join(
    fqn: str,
    dtype: str,
    size: tuple[int, ...],
    pieces: list[tuple[tuple[int, ...], TensorRef]],
    file: Path,
    budget: Budget,
) -> TensorRef:
    """One tensor from its chunks: row blocks without copying, any other tiling gathered (charged).

    The chunks must tile the tensor exactly: no overlap, no hole (their element counts add up to
    the tensor's and no element is covered twice)."""
    count = dtypes.numel(size)
    if sum(dtypes.numel(ref.shape) for _, ref in pieces) != count:
        raise CorruptFileError(f"{fqn!r}: chunks hold a different number of elements than {list(size)}", file=file)
    if len(pieces) == 1:
        return pieces[0][1]  # the whole tensor: as its archive gives it (with the digest ours store)
    rows = sorted(pieces, key=lambda piece: piece[0])
    if all(offsets[1:] == (0,) * (len(size) - 1) and ref.shape[1:] == size[1:] for offsets, ref in rows):
        position = 0
        for offsets, ref in rows:
            if offsets[0] != position:
                raise CorruptFileError(f"{fqn!r}: row chunks leave a gap or overlap at row {position}", file=file)
            position += ref.shape[0]
        return TensorRef(dtype, size, ConcatSource(tuple(ref.source for _, ref in rows)))
    itemsize = dtypes.DTYPES[dtype].itemsize
    # The whole tensor, a mask of the elements filled, and one chunk's bytes at a time.
    largest = max(ref.nbytes for _, ref in pieces)
    budget.materialize(NUMPY_IMPORT_BYTES + count * itemsize + count + largest, "DCP chunks gathered into memory")
    import numpy as np  # only for chunkings other than row blocks

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


def _set_element(root: dict[str, Any], path: tuple[str | int, ...], value: Any, file: Path, budget: Budget) -> None:
    """Place ``value`` at ``path`` as torch's ``_traverse.set_element`` does for ``dcp.load``.

    A list grows to the index a path asks for, each new slot charged to ``budget`` first (a list
    of N Nones costs N nodes); two values at one place are refused."""
    container: Any = root
    for key, following in itertools.pairwise(path):
        container = _child(container, key, type(following) is str, path, file, budget)
    last = path[-1]
    if type(container) is list:
        if type(last) is not int:
            raise CorruptFileError(f"planner_data path {path!r:.60} indexes a list with {last!r:.40}", file=file)
        _grow(container, last, path, file, budget)
        occupied = container[last] is not None
    elif type(container) is dict:
        if type(last) is not str:
            raise CorruptFileError(f"planner_data path {path!r:.60} puts an index into a dict", file=file)
        occupied = last in container
    else:
        raise CorruptFileError(
            f"planner_data path {path!r:.60} goes through a value that is not a container", file=file
        )
    if occupied:
        raise CorruptFileError(f"planner_data puts two values at {path!r:.60}", file=file)
    container[last] = value


def _child(container: Any, key: str | int, dict_next: bool, path: tuple[Any, ...], file: Path, budget: Budget) -> Any:
    if type(container) is dict:
        if type(key) is not str:
            raise CorruptFileError(f"planner_data path {path!r:.60} puts the index {key!r:.40} into a dict", file=file)
        if key not in container:
            container[key] = {} if dict_next else []
        child = container[key]
    elif type(container) is list:
        if type(key) is not int:
            raise CorruptFileError(f"planner_data path {path!r:.60} indexes a list with {key!r:.40}", file=file)
        _grow(container, key, path, file, budget)
        child = container[key]
        if child is None:
            child = container[key] = {} if dict_next else []
    else:
        raise CorruptFileError(
            f"planner_data path {path!r:.60} goes through a value that is not a container", file=file
        )
    if type(child) is not (dict if dict_next else list):
        raise CorruptFileError(
            f"planner_data path {path!r:.60} asks for a {'dict' if dict_next else 'list'} where another "
            "entry put something else",
            file=file,
        )
    return child


def _grow(container: list[Any], index: int, path: tuple[Any, ...], file: Path, budget: Budget) -> None:
    if index < 0:
        raise CorruptFileError(f"planner_data path {path!r:.60} indexes a list with {index}", file=file)
    if index >= len(container):
        budget.nodes(index + 1 - len(container), "list slots asked for by planner_data paths")
        container.extend([None] * (index + 1 - len(container)))


# ----------------------------------------------------------------------------- folders we wrote


def _read_sidecar(folder: Path, metadata_digest: str, budget: Budget) -> dict[str, Any] | None:
    """``sdconvert.json``, checked for its shape and for describing this very ``.metadata``; None
    when the folder has none (another writer's folder: read as torch reads it)."""
    path = folder / SIDECAR
    try:
        raw = read_folder_file(path, SIDECAR, "the checkpoint folder", MAX_SIDECAR_BYTES, budget)
    except FileNotFoundError:
        return None
    sidecar = loads_json_strict(raw, path, SIDECAR, budget)
    fields = {"sdconvert_dcp", "metadata_blake3", "tree", "tree_blake3", "optimizers", "copies", "metadata"}
    if type(sidecar) is not dict or not set(sidecar) <= fields or not fields - {"metadata"} <= set(sidecar):
        raise CorruptFileError(f"{SIDECAR} must be an object with the fields {sorted(fields)}", file=path)
    if sidecar["sdconvert_dcp"] != SIDECAR_VERSION:
        raise UnsupportedValueError(
            f"{SIDECAR} is of version {sidecar['sdconvert_dcp']!r:.20}; this reader knows {SIDECAR_VERSION}",
            file=path,
        )
    if check_tree_digest(sidecar["metadata_blake3"], path, "metadata_blake3") != metadata_digest:
        raise CorruptFileError(
            f"{SIDECAR} describes another {METADATA}: the folder was saved again by another writer, or "
            f"{METADATA} is damaged; delete {SIDECAR} to read the folder as torch reads it",
            file=path,
        )
    check_tree_digest(sidecar["tree_blake3"], path, "tree_blake3")
    if "metadata" in sidecar and type(sidecar["metadata"]) is not dict:
        raise CorruptFileError(f"{SIDECAR}: metadata must be an object", file=path)
    return sidecar


def _ours(assembler: _Assembler, sidecar: dict[str, Any], path: Path, budget: Budget) -> Checkpoint:
    """Our tree from ``sdconvert.json`` and the folder's tensors, once DCP's entries are checked to
    be exactly the view of that tree ``dcp.load`` gives (every FQN, path and value)."""
    entries = _with_copies_shared(assembler.entries(), sidecar["copies"], path, budget)
    view_tree = assembler.tree(entries)
    keys = manifests.storage_keys(view_tree)
    refs: dict[str, TensorRef] = {}
    for tree_path, leaf in walk(view_tree):
        if type(leaf) is TensorRef:
            refs.setdefault(keys[tree_path], leaf)  # a tied tensor: the key of its first path
    tree = tree_from_stored(
        sidecar["tree"], refs, path, f"{SIDECAR}'s tree", holder="the folder", unused_name="DCP tensor", budget=budget
    )
    named = _named(sidecar["optimizers"], path)
    problem = optimizers.check_named(tree, named)
    try:
        expected = view.entries(optimizers.renamed(tree, named)) if problem is None else []
    except UnsupportedValueError as exc:
        problem = exc.message
    if problem is not None:
        raise CorruptFileError(f"{SIDECAR}: {problem}", file=path)
    if len(expected) != len(entries):
        raise CorruptFileError(
            f"{METADATA} holds {len(entries)} entries, the tree of {SIDECAR} makes {len(expected)}", file=path
        )
    for want, (fqn, planner_path, value) in zip(expected, entries, strict=True):
        if (want.fqn, want.path) != (fqn, planner_path) or _signature(want.value) != _signature(value):
            raise CorruptFileError(
                f"{METADATA} entry {fqn!r:.80} is not what the tree of {SIDECAR} makes ({want.fqn!r:.80}): "
                "the folder was changed by another writer",
                file=path,
            )
    own = sidecar.get("metadata")
    return Checkpoint(
        tree,
        path.parent,
        tree_digest=sidecar["tree_blake3"],
        file_metadata=own or None,
        kind=f"{KIND} (statedict-convert)",
        expects_tree_digest=True,
    )


def _named(value: Any, path: Path) -> list[optimizers.Named]:
    if type(value) is not list or not all(
        type(item) is dict
        and item.keys() == {"path", "names"}
        and type(item["path"]) is list
        and all(type(p) in (str, int) for p in item["path"])
        and type(item["names"]) is list
        for item in value
    ):
        raise CorruptFileError(f"{SIDECAR}: optimizers must be a list of {{path, names}}", file=path)
    return [optimizers.Named(tuple(item["path"]), tuple(item["names"])) for item in value]


def _with_copies_shared(
    entries: list[tuple[str, tuple[str | int, ...], Any]], copies: Any, path: Path, budget: Budget
) -> list[tuple[str, tuple[str | int, ...], Any]]:
    """``entries`` with each tensor stored again by another entry (a tensor tied across two
    ``torch.save``d values) replaced by its first copy, once their bytes are compared equal.

    The bytes, not the digest records of the two archives: a record is only what the file says of
    its bytes (another tool may rewrite them and keep it, a bit may rot), and the copy is not in the
    tree that integrity checks then hash. Each pair is compared once (a list naming it again costs
    nothing), a tensor already one object is not compared, and every byte compared is charged to
    the read's budget first: a crafted list cannot make a read slow."""
    if type(copies) is not list or not all(
        type(c) is list
        and len(c) == 4
        and type(c[0]) is str
        and type(c[2]) is str
        and type(c[1]) is int
        and type(c[3]) is int
        for c in copies
    ):
        raise CorruptFileError(f"{SIDECAR}: copies must be a list of [fqn, index, fqn, index]", file=path)
    if not copies:
        return entries
    positions = {fqn: position for position, (fqn, _, _) in enumerate(entries)}
    held: dict[int, list[TensorRef]] = {}  # an entry's tensors, listed once per entry

    def tensor(fqn: str, index: int) -> TensorRef:
        position = positions.get(fqn)
        if position is None:
            raise CorruptFileError(
                f"{SIDECAR}: copies name the entry {fqn!r:.80}, which {METADATA} does not hold", file=path
            )
        if position not in held:
            held[position] = view.tensors_in(entries[position][2])
        if not 0 <= index < len(held[position]):
            raise CorruptFileError(
                f"{SIDECAR}: copies name tensor {index} of {fqn!r:.80}, which it does not hold", file=path
            )
        return held[position][index]

    first_of: dict[int, TensorRef] = {}  # id of a copy -> the tensor it is a copy of
    firsts: set[int] = set()
    for copy_fqn, copy_index, first_fqn, first_index in copies:
        copy, original = tensor(copy_fqn, copy_index), tensor(first_fqn, first_index)
        if copy is original or first_of.get(id(copy)) is original:
            continue  # one object already (a tie .metadata names), or a pair compared already
        if id(copy) in first_of or id(copy) in firsts or id(original) in first_of:
            raise CorruptFileError(
                f"{SIDECAR}: copies make tensor {copy_index} of {copy_fqn!r:.80} a copy of two tensors, or of a copy",
                file=path,
            )
        budget.output(copy.nbytes + original.nbytes, f"tensor bytes compared for {SIDECAR}'s copies")
        if (copy.dtype, copy.shape, copy.numpy) != (original.dtype, original.shape, original.numpy) or not _same_bytes(
            copy, original
        ):
            raise CorruptFileError(
                f"{copy_fqn!r:.80} (its tensor {copy_index}) and {first_fqn!r:.80} (its tensor {first_index}), which "
                f"{SIDECAR} records as one tensor stored twice, hold different tensors: the folder was changed or "
                "damaged",
                file=path.parent,
            )
        first_of[id(copy)] = original
        firsts.add(id(original))
    if not first_of:
        return entries

    def shared(value: Any) -> Any:
        if type(value) is TensorRef:
            return first_of.get(id(value), value)
        if not any(id(ref) in first_of for ref in view.tensors_in(value)):
            return value
        return map_leaves(value, lambda _path, leaf: first_of.get(id(leaf), leaf) if type(leaf) is TensorRef else leaf)

    # By object: a tensor two tensor entries name (a tie of .metadata) is one object in both.
    return [(fqn, planner_path, shared(value)) for fqn, planner_path, value in entries]


def _same_bytes(a: TensorRef, b: TensorRef, chunk_size: int = 1 << 20) -> bool:
    """Whether ``a`` and ``b`` hold the same bytes, streamed (a chunk of each in memory at a time)."""
    if a.nbytes != b.nbytes:
        return False
    theirs = (_raw(chunk) for chunk in b.source.chunks(chunk_size))
    pending = memoryview(b"")
    for chunk in a.source.chunks(chunk_size):
        mine = _raw(chunk)
        while mine:
            while not pending:
                following = next(theirs, None)
                if following is None:
                    return False
                pending = following
            step = min(len(mine), len(pending))
            if mine[:step] != pending[:step]:
                return False
            mine, pending = mine[step:], pending[step:]
    return not pending and not any(theirs)


def _raw(chunk: memoryview) -> memoryview:
    """``chunk`` as bytes: memoryviews of other formats compare as values (NaN != NaN, -0.0 == 0.0)."""
    chunk = memoryview(chunk)
    return chunk if chunk.format == "B" and chunk.ndim == 1 else chunk.cast("B")


def _signature(value: Any) -> str:
    """``value`` as canonical text in which a tensor is its identity (its bytes' source)."""
    keys = {p: f"{id(leaf.source)}" for p, leaf in walk(value) if type(leaf) is TensorRef}
    return json.dumps(manifests.encode_tree(value, keys), separators=(",", ":"), ensure_ascii=True)
