"""``.metadata`` of a ``torch.distributed.checkpoint`` folder: a pickle of DCP's dataclasses,
written without torch (torch's classes are named by their globals, never imported).

What ``FileSystemWriter`` (torch 2.13) pickles, and what :func:`dumps` writes the same way::

    Metadata(state_dict_metadata={fqn: TensorStorageMetadata | BytesStorageMetadata},
             planner_data={fqn: path tuple},            # where dcp.load puts each value
             storage_data={MetadataIndex: _StorageInfo}, # where each value's bytes are
             storage_meta=StorageMeta(...), version="1.0.0")
    TensorStorageMetadata(properties=TensorProperties, size=torch.Size, chunks=[ChunkStorageMetadata])
    TensorProperties     pickled by its __getstate__ as the tuple
                         (dtype, torch.serialization._get_layout("torch.strided"), False,
                          _MEM_FORMAT_ENCODING(0), False)
    ChunkStorageMetadata(offsets=torch.Size, sizes=torch.Size)
    MetadataIndex        a tensor chunk: {"fqn", "index": 0, "offset": torch.Size}; a value: {"fqn", "index": None}
    _StorageInfo         {"relative_path", "offset", "length"} (no transform_descriptors: no compression)

Every dataclass is ``NEWOBJ`` of its class with no arguments and ``BUILD`` with its fields (the
way pickle makes one; ``BytesStorageMetadata`` has none), ``torch.Size`` is ``REDUCE`` of a tuple.
The pickle is protocol 2 (``codecs.torch_pickle.PickleWriter``); ``pickle.load`` in torch reads any.
The reader side (``formats/dcp``) unpickles with inert stand-ins for exactly these globals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..core import dtypes
from ..core.objects import ObjectRecord
from .torch_pickle import PickleWriter

DCP_MODULE = "torch.distributed.checkpoint.metadata"
FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"
# filesystem.CURRENT_DCP_VERSION of torch 2.13: what FileSystemWriter.finish stores as Metadata.version
VERSION = "1.0.0"
# The dataclasses of .metadata, as (module, name)
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
} | {(FILESYSTEM_MODULE, "_StorageInfo")}
# What their fields hold besides plain values: sizes, layouts, memory formats, checkpoint paths.
HELPERS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    (DCP_MODULE, "_MEM_FORMAT_ENCODING"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}
ALLOWED_GLOBALS = RECORDS | HELPERS | {("torch", name) for name in dtypes.DTYPES}
_WRITTEN = {f"{module}.{name}" for module, name in ALLOWED_GLOBALS}


@dataclass(frozen=True)
class Entry:
    """One value of the flattened state dict: where dcp.load puts it and where its bytes are.

    ``dtype`` is the tensor's (torch spelling) for a tensor, None for any other value (a
    ``torch.save`` of it); a tensor is one chunk, the whole tensor (offsets all 0)."""

    fqn: str
    path: tuple[str | int, ...]
    dtype: str | None
    shape: tuple[int, ...]
    file: str
    offset: int
    length: int


def dumps(entries: Sequence[Entry]) -> bytes:
    """The ``.metadata`` pickle of ``entries`` (in this order), as ``FileSystemWriter`` writes it.

    ``storage_meta`` has no checkpoint path and no save id (torch writes the path it was given
    and a random UUID; neither is read by ``dcp.load``), so the bytes depend on the entries alone.
    """
    layout = ObjectRecord("torch.serialization._get_layout", "call", ("torch.strided",))
    contiguous = ObjectRecord(f"{DCP_MODULE}._MEM_FORMAT_ENCODING", "call", (0,))
    dtype_records: dict[str, ObjectRecord] = {}
    state_dict_metadata: dict[str, ObjectRecord] = {}
    storage_data: dict[ObjectRecord, ObjectRecord] = {}
    for entry in entries:
        if entry.dtype is None:
            state_dict_metadata[entry.fqn] = _new("BytesStorageMetadata", None)
            index = _new("MetadataIndex", {"fqn": entry.fqn, "index": None})
        else:
            dtype = dtype_records.setdefault(entry.dtype, ObjectRecord(f"torch.{entry.dtype}", "global"))
            origin = _size((0,) * len(entry.shape))
            properties = _new("TensorProperties", (dtype, layout, False, contiguous, False))
            chunk = _new("ChunkStorageMetadata", {"offsets": origin, "sizes": _size(entry.shape)})
            state_dict_metadata[entry.fqn] = _new(
                "TensorStorageMetadata", {"properties": properties, "size": _size(entry.shape), "chunks": [chunk]}
            )
            index = _new("MetadataIndex", {"fqn": entry.fqn, "index": 0, "offset": origin})
        info = {"relative_path": entry.file, "offset": entry.offset, "length": entry.length}
        storage_data[index] = _new("_StorageInfo", info, FILESYSTEM_MODULE)
    metadata = _new(
        "Metadata",
        {
            "state_dict_metadata": state_dict_metadata,
            "planner_data": {entry.fqn: entry.path for entry in entries},
            "storage_data": storage_data,
            "storage_meta": _new(
                "StorageMeta", {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": []}
            ),
            "version": VERSION,
        },
    )
    return PickleWriter(_no_tensors, lambda record: record.name in _WRITTEN).dumps(metadata)


def _new(name: str, state: object, module: str = DCP_MODULE) -> ObjectRecord:
    """A dataclass instance as pickle makes it: ``cls.__new__(cls)``, then its state (if any)."""
    return ObjectRecord(f"{module}.{name}", "new", (), state=state, built=state is not None)


def _size(dims: tuple[int, ...]) -> ObjectRecord:
    return ObjectRecord("torch.Size", "call", (tuple(dims),))


def _no_tensors(path: object, ref: object) -> str:
    raise AssertionError(".metadata holds no tensors")
