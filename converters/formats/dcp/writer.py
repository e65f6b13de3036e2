"""Writing a DCP folder without torch: plan it, write each data file, then ``.metadata``.

The three steps, each a function, so that data files can be written side by side (threads of
one process, ranks of a job) with the bytes one writer gives:

1. :func:`plan_folder` decides everything from the checkpoint alone: the entries (the tree as DCP
   flattens it, optimizers named), the archive of each and its length, which data file holds it
   at which offset (files filled in entry order up to ``max_file_size``). Never from a number
   of workers: every split writes the same bytes.
2. :func:`write_data_file` writes data file ``i`` of a plan and returns the digests of the
   tensors it wrote (small, picklable, keyed by FQN).
3. :func:`write_metadata` writes ``sdconvert.json`` and then ``.metadata``, given every file's
   digests.

Each entry is a ``torch.save`` archive (``codecs.torch_archive.write_archive``, as the ``.pt``
writer writes a file): a tensor as torch.save writes one (its bytes copied by the kernel through
``TensorWriter``, with our BLAKE3 digest record and cast record, which ``torch.load`` ignores),
any other value as the pickle ``dcp.save`` would ``torch.save`` (recorded objects only when a
``.pt`` may re-create them; tensors inside it, as in a tuple, are its storage records).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from blake3 import blake3

from ...codecs import dcp_metadata
from ...codecs.pickle_objects import writable
from ...codecs.torch_archive import CASTS_RECORD, DIGESTS_RECORD, archive_length, write_archive
from ...codecs.torch_pickle import PickleWriter
from ...core import dtypes, manifests
from ...core.atomic import atomic_output
from ...core.errors import TreePath
from ...core.tree import Checkpoint, TensorRef, walk
from ...core.writing import TensorWriter
from . import optimizers, view
from .reader import METADATA, SIDECAR, SIDECAR_VERSION

DATA_FILE = "__0_{index}.distcp"  # torch's name for file <index> of rank 0
DTYPE_NAMES = frozenset(dtypes.DTYPES)


@dataclass(frozen=True)
class Stored:
    """Where an entry's archive lies. A tensor entry whose tensor an earlier tensor entry holds (a
    tie) names that entry's archive: the bytes are stored once, both FQNs load them."""

    file: int
    offset: int
    length: int
    first: int  # the position of the entry whose archive this is (itself unless tied)


@dataclass(frozen=True)
class DataFile:
    name: str
    entries: tuple[int, ...]  # positions of the entries whose archives it holds, in file order
    size: int


@dataclass(frozen=True)
class FolderPlan:
    """Everything a DCP folder will hold, decided before a byte is written (see the module doc)."""

    checkpoint: Checkpoint
    named: tuple[optimizers.Named, ...]
    entries: tuple[view.Entry, ...]
    stored: tuple[Stored, ...]  # one per entry
    files: tuple[DataFile, ...]
    copies: tuple[tuple[str, int, str, int], ...]  # a tensor stored again in another archive: (fqn, i, first fqn, j)
    allowed: frozenset[str]  # classes a recorded object may be re-created as (--allow-class)
    tensor_paths: Mapping[int, TreePath]  # id of each tensor -> its first tree path (for messages)

    def sizes(self) -> list[int]:
        """Each data file's byte count (to balance files between workers)."""
        return [data_file.size for data_file in self.files]


def plan_folder(
    checkpoint: Checkpoint, named: Sequence[optimizers.Named], max_file_size: int, allowed: frozenset[str]
) -> FolderPlan:
    """The plan of ``checkpoint`` (root: a mapping) as a DCP folder, optimizers named by ``named``."""
    entries = tuple(view.entries(optimizers.renamed(checkpoint.tree, named)))
    view.check_loadable(list(entries))
    stored: list[Stored] = []
    files: list[list[int]] = []
    sizes: list[int] = []
    archived: dict[int, int] = {}  # id of a tensor entry's tensor -> the position of its archive
    first_held: dict[int, tuple[str, int]] = {}  # id of a tensor -> (fqn, index) of the archive holding it first
    copies = []
    for position, entry in enumerate(entries):
        if entry.is_tensor and id(entry.value) in archived:
            stored.append(stored[archived[id(entry.value)]])
            continue
        for index, ref in enumerate(view.tensors_in(entry.value)):
            first = first_held.setdefault(id(ref), (entry.fqn, index))
            if first[0] != entry.fqn:
                copies.append((entry.fqn, index, *first))
        if entry.is_tensor:
            archived[id(entry.value)] = position
        length = _Archive.of(entry.value, allowed).length()
        if not files or (sizes[-1] and sizes[-1] + length > max_file_size):
            files.append([])
            sizes.append(0)
        stored.append(Stored(len(files) - 1, sizes[-1], length, position))
        files[-1].append(position)
        sizes[-1] += length
    data_files = tuple(
        DataFile(DATA_FILE.format(index=index), tuple(held), size)
        for index, (held, size) in enumerate(zip(files, sizes, strict=True))
    )
    paths = {id(ref): path for path, ref in checkpoint.unique_tensors()}
    return FolderPlan(checkpoint, tuple(named), entries, tuple(stored), data_files, tuple(copies), allowed, paths)


# Per FQN, per tensor of the entry (``view.tensors_in`` order): the BLAKE3 digest stored for its
# bytes, and for a cast tensor that of the bytes it was cast from (learnt while casting, so
# whoever writes .metadata — rank 0 of a distributed write — never reads other ranks' sources).
Written = dict[str, list[tuple[str, str | None]]]


def write_data_file(plan: FolderPlan, index: int, folder: Path, tensors: TensorWriter, *, fsync: bool) -> Written:
    """Write data file ``index`` of ``plan`` into ``folder``; what :func:`write_metadata` needs to
    know of its tensors (``Written``)."""
    data_file = plan.files[index]
    digests: Written = {}
    with atomic_output(folder / data_file.name, fsync=fsync) as out:
        for position in data_file.entries:
            entry, stored = plan.entries[position], plan.stored[position]
            if out.tell() != stored.offset:
                raise AssertionError(f"{entry.fqn!r} planned at {stored.offset}, written at {out.tell()}")
            stored_digests = _Archive.of(entry.value, plan.allowed).write(out, tensors, plan.tensor_paths)
            digests[entry.fqn] = [
                (digest, ref.cast_from.resolved() if ref.cast_from is not None else None)
                for ref, digest in zip(view.tensors_in(entry.value), stored_digests, strict=True)
            ]
            if out.tell() != stored.offset + stored.length:
                raise AssertionError(f"{entry.fqn!r} planned as {stored.length} bytes, written as {out.tell()}")
    return digests


def write_metadata(plan: FolderPlan, digests: Sequence[Written], folder: Path, *, fsync: bool) -> None:
    """Write ``sdconvert.json`` and ``.metadata`` (last) of ``plan`` into ``folder``, once every
    data file is written (``digests``: what :func:`write_data_file` returned for each)."""
    checkpoint = plan.checkpoint
    by_fqn = {entry.fqn: entry for entry in plan.entries}
    digest_of: dict[int, str] = {}
    for written in digests:
        for fqn, file_digests in written.items():
            for ref, (digest, cast_digest) in zip(view.tensors_in(by_fqn[fqn].value), file_digests, strict=True):
                digest_of[id(ref)] = digest
                if ref.cast_from is not None and cast_digest is not None:
                    ref.cast_from.observe(cast_digest)
    carried = checkpoint.carried_metadata()
    tree_digest = manifests.tree_digest(checkpoint.tree, lambda _path, ref: digest_of[id(ref)], carried)
    assert tree_digest is not None  # every tensor was written
    metadata = dcp_metadata.dumps(
        [
            dcp_metadata.Entry(
                entry.fqn,
                entry.path,
                entry.value.dtype if entry.is_tensor else None,
                entry.value.shape if entry.is_tensor else (),
                plan.files[stored.file].name,
                stored.offset,
                stored.length,
            )
            for entry, stored in zip(plan.entries, plan.stored, strict=True)
        ]
    )
    # Tensors are named in our tree by their place in DCP's view (the key manifests.storage_keys
    # gives that place), which the reader rebuilds from .metadata alone.
    view_tree = view.assemble([(entry.path, entry.value) for entry in plan.entries])
    view_keys = manifests.storage_keys(view_tree)
    key_of: dict[int, str] = {}
    for view_path, leaf in walk(view_tree):
        if type(leaf) is TensorRef:
            key_of.setdefault(id(leaf), view_keys[view_path])
    tree_keys = {tree_path: key_of[id(ref)] for tree_path, ref in checkpoint.tensors()}
    sidecar: dict[str, Any] = {
        "sdconvert_dcp": SIDECAR_VERSION,
        "metadata_blake3": str(blake3(metadata).hexdigest()),
        "tree": json.dumps(manifests.encode_tree(checkpoint.tree, tree_keys), separators=(",", ":")),
        "tree_blake3": tree_digest,
        "optimizers": [{"path": list(item.path), "names": list(item.names)} for item in plan.named],
        "copies": [list(copy) for copy in plan.copies],
    }
    if carried:
        sidecar["metadata"] = carried
    with atomic_output(folder / SIDECAR, fsync=fsync) as out:
        out.write((json.dumps(sidecar, separators=(",", ":")) + "\n").encode())
    with atomic_output(folder / METADATA, fsync=fsync) as out:
        out.write(metadata)


@dataclass(frozen=True)
class _Archive:
    """One entry's ``torch.save`` archive: its pickle, its storages and the numpy arrays the
    pickle holds itself. The same value always gives the same bytes."""

    pickled: bytes
    storages: tuple[tuple[str, TensorRef], ...]
    arrays: tuple[TensorRef, ...]
    order: tuple[TensorRef, ...]  # every distinct tensor, in view.tensors_in order

    @classmethod
    def of(cls, value: Any, allowed: frozenset[str]) -> _Archive:
        order = tuple(view.tensors_in(value))
        storages = tuple((str(index), ref) for index, ref in enumerate(r for r in order if not r.numpy))
        key_of = {id(ref): key for key, ref in storages}
        pickled = PickleWriter(
            lambda _path, ref: key_of[id(ref)], lambda record: writable(record, allowed, DTYPE_NAMES)
        ).dumps(value)
        return cls(pickled, storages, tuple(r for r in order if r.numpy), order)

    def length(self) -> int:
        stored = [key for key, _ in self.storages]
        return archive_length(
            len(self.pickled),
            [(key, ref.nbytes) for key, ref in self.storages],
            [(name, len(data)) for name, data in self._records(dict.fromkeys(stored, "0" * 64), final=False)],
        )

    def write(self, out: BinaryIO, tensors: TensorWriter, paths: Mapping[int, TreePath]) -> list[str]:
        """Write the archive at ``out``'s position; the digest of each tensor, in ``order``."""
        digests: dict[int, str] = {}
        stored: dict[str, str] = {}

        def copier(key: str, ref: TensorRef) -> Any:
            def copy(target: BinaryIO) -> int:
                copied = tensors.copy(target, ref, paths.get(id(ref), ()), crc32=True)
                digests[id(ref)] = stored[key] = copied.digest
                assert copied.crc32 is not None
                return copied.crc32

            return copy

        for ref in self.arrays:
            digests[id(ref)] = tensors.hashed(ref)
        write_archive(
            out,
            self.pickled,
            [(key, ref.nbytes, copier(key, ref)) for key, ref in self.storages],
            lambda: self._records(stored, final=True),
        )
        return [digests[id(ref)] for ref in self.order]

    def _records(self, digests: dict[str, str], *, final: bool) -> list[tuple[str, bytes]]:
        """Our records: the digests of the storages, and what a cast tensor was cast from. Before
        the tensors are written (not ``final``) placeholders of the same length."""
        records = []
        if self.storages:
            records.append((DIGESTS_RECORD, json.dumps(digests, separators=(",", ":")).encode()))
        keys: dict[tuple[str | int, ...], str] = {(key,): key for key, _ in self.storages}
        casts = manifests.cast_records([((key,), ref) for key, ref in self.storages], keys, final=final)
        if casts:
            records.append((CASTS_RECORD, json.dumps(casts, separators=(",", ":")).encode()))
        return records
