"""``pt``: PyTorch's checkpoints, as written by ``torch.save`` and read by ``torch.load``.

Read without torch and without running pickled code (``codecs/torch_pickle.py``): torch's zip
archive (``codecs/torch_archive.py``), its legacy non-zip file (``codecs/torch_legacy.py``: torch
before 1.6, or ``_use_new_zipfile_serialization=False``), told apart by their first bytes whatever
the suffix, and Hugging Face ``.bin`` shard folders (``pytorch_model.bin.index.json`` beside
``pytorch_model-0000k-of-0000n.bin`` files, as ``save_pretrained(safe_serialization=False)`` writes
them), read as one flat state_dict. Written as a zip archive only, so that ``torch.load(f)`` with
its default ``weights_only=True`` accepts the file. Layout written::

    archive/data.pkl            the tree, protocol-2 pickle, tensors as persistent storage ids
    archive/byteorder           "little"
    archive/data/<n>            one record per tensor, its C-order bytes, 64-byte aligned
    archive/.format_version     "1"
    archive/.storage_alignment  "64"
    archive/version             "3\\n"

A ``.bin`` shard folder reads as one flat dict: the shards in file-name order (the order
``transformers`` loads them: ``sorted(set(weight_map.values()))``, which for its
``pytorch_model-0000k-of-0000n.bin`` names is the order they were written in), and each shard's
tensors in the order ``torch.load`` gives them. ``save_pretrained`` fills its shards in the
state_dict's order, so this is the model's own order (the index's ``weight_map`` is sorted by key).
The index is read as the safetensors shard index is (``core/stored.py``: no symlink, regular file,
at most 100 MB, strict JSON); every shard must be a plain file name beside it, hold a dict of str
keys to tensors, exactly the tensors the ``weight_map`` puts in it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ..codecs import torch_export, torchscript
from ..codecs.npy import starts_like_npz
from ..codecs.pickle_objects import check_writable, writable
from ..codecs.torch_archive import (
    CASTS_RECORD,
    DIGESTS_RECORD,
    METADATA_RECORD,
    TREE_DIGEST_RECORD,
    read_archive_contents,
    write_archive,
)
from ..codecs.torch_legacy import TAR_MESSAGE, is_legacy, is_legacy_tar, read_legacy
from ..codecs.torch_pickle import PickleWriter, describe
from ..codecs.zip import Ranges, remote_ranges
from ..core import folders, manifests
from ..core.atomic import atomic_output
from ..core.budget import Budget
from ..core.contract import FormatBase, WriteContext, option
from ..core.dtypes import DTYPES
from ..core.errors import CorruptFileError, TreePath, UnsupportedValueError
from ..core.storage import location
from ..core.stored import read_shard_index, shard_file
from ..core.tree import MAPPING_TYPES, Checkpoint, TensorRef
from ..core.writing import TensorWriter

ARCHIVE = "archive"
ZIP_MAGIC = b"PK\x03\x04"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_INDEX_SUFFIX = ".bin.index.json"
MAX_INDEX_BYTES = 100_000_000


@dataclass(frozen=True)
class PtOptions:
    allow_class: tuple[str, ...] = option(
        (),
        "re-create recorded objects of this class in .pt output (repeatable; beyond the data-only classes)",
        kind="list",
        metavar="CLASS",
    )


class PtFormat(FormatBase):
    name = "pt"
    suffixes: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar", BIN_INDEX_SUFFIX)
    Options = PtOptions
    description = "PyTorch checkpoint (torch.save / torch.load; zip, legacy, .bin shard folders)"
    # torch names every dtype; the pickle spells it (see codecs/torch_pickle.py), so the code is the name.
    dtype_codes: ClassVar[Mapping[str, Any]] = {name: name for name in DTYPES}

    def sniff(self, head: bytes) -> bool:
        # Any zip but an .npz (numpy's arrays: a first member named .npy), which the npz format reads.
        zip_archive = head.startswith(ZIP_MAGIC) and not starts_like_npz(head)
        return zip_archive or is_legacy(head) or is_legacy_tar(head)

    def reads_folder(self, path: Path) -> bool:
        # A save_pretrained folder of .bin weights, or a Trainer checkpoint folder (core/folders.py).
        family = folders.default_family(path)
        return (family is not None and family.suffix == ".bin") or folders.is_trainer(path)

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        return self.read_selected(path, budget, None)

    def read_selected(
        self, path: Path, budget: Budget, wanted: Callable[[tuple[str | int, ...]], bool] | None
    ) -> Checkpoint:
        """``read``, leaving out of a ``.bin`` shard folder the shards without a ``wanted`` tensor
        (``core/contract.py``); anything else is read whole."""
        path = location(path)  # not Path(path): that would make a remote path a local one
        if path.is_dir():
            if folders.is_trainer(path):
                return folders.read_trainer(path, budget)
            weights, notes = folders.weights_for(path, ".bin", self.name)
            if weights.name.lower().endswith(BIN_INDEX_SUFFIX):
                checkpoint = self.read_shards(weights, budget, wanted)
                return dataclasses.replace(checkpoint, notes=checkpoint.notes + notes)
            checkpoint = self.read_file(folders.regular_part(weights), budget)
            kind = f"{folders.MODEL_KIND}: {weights.name}, {checkpoint.kind}"
            return dataclasses.replace(checkpoint, kind=kind, notes=checkpoint.notes + notes)
        if path.name.lower().endswith(BIN_INDEX_SUFFIX):
            return self.read_shards(path, budget, wanted)
        if path.name.lower().endswith(folders.INDEX_SUFFIX):  # another kind's (model.safetensors.index.json)
            raise folders.wrong_index(path, self.name)
        return self.read_file(path, budget)

    def read_file(self, path: Path, budget: Budget) -> Checkpoint:
        """One ``torch.save`` file, zip or legacy by its first bytes (never an index: shards are read with this).

        A remote file is read through one ``Ranges`` (range requests, few of them) by whichever
        reader its first bytes choose: its first fetch, which holds them, serves that reader too."""
        with remote_ranges(path) as ranges:
            return self._read_file(path, budget, ranges)

    def _read_file(self, path: Path, budget: Budget, ranges: Ranges | None) -> Checkpoint:
        if ranges is not None:
            ranges.fetch([(0, 512)])  # exactly: the reader's own requests follow
            head = ranges.read(0, 512)
        else:
            with open(path, "rb") as handle:
                head = handle.read(512)
        if is_legacy_tar(head):
            raise UnsupportedValueError(TAR_MESSAGE, file=path)
        if head[:1] == b"\x80":  # a pickle: torch's legacy file (or a plain pickle, refused by its reader)
            return Checkpoint(read_legacy(path, budget, ranges), path, kind="torch legacy (non-zip) file")
        if not torch_export.starts_like_torch_save(head):  # a .pt2 program archive, or another zip
            exported = torch_export.read_if_exported(path, budget, ranges)
            if exported is not None:
                return Checkpoint(exported.tree, path, kind=torch_export.KIND, notes=exported.notes)
        contents = read_archive_contents(path, budget=budget, torchscript=True, ranges=ranges)
        if contents.torchscript:  # torch.jit.save: its parameters and buffers (codecs/torchscript.py)
            return Checkpoint(contents.tree, path, kind=torchscript.KIND, notes=torchscript.notes(contents.tree))
        return Checkpoint(
            contents.tree,
            path,
            tree_digest=contents.tree_digest,
            file_metadata=contents.metadata or None,
            kind="torch zip archive",
            expects_tree_digest=contents.ours,
        )

    def read_shards(
        self, index_path: Path, budget: Budget, wanted: Callable[[tuple[str | int, ...]], bool] | None = None
    ) -> Checkpoint:
        """A ``.bin`` shard folder through its index, as one flat dict (order: see the module doc).
        With ``wanted``, only the shards holding a wanted key are opened (and checked): the
        tensors of the others are left out of the dict."""
        weight_map, metadata = read_shard_index(index_path, MAX_INDEX_BYTES, budget)
        names = {name for key, name in weight_map.items() if wanted is None or wanted((key,))}
        shards = {name: shard_file(index_path, name, "a torch checkpoint") for name in sorted(names)}
        budget.cover(index_path.stat().st_size + sum(shard.stat().st_size for shard in shards.values()))
        tensors: dict[str, TensorRef] = {}
        for name, shard in shards.items():
            tree = self.read_file(shard, budget).tree
            if type(tree) not in MAPPING_TYPES:
                raise UnsupportedValueError(
                    f"shard {name!r} holds {describe(tree)}, not a state_dict (a dict of tensors)", file=index_path
                )
            for key, value in tree.items():
                if type(key) is not str or type(value) is not TensorRef:
                    raise UnsupportedValueError(
                        f"shard {name!r} holds {describe(value)} at key {key!r:.80}; "
                        "a shard holds tensors under str keys only",
                        file=index_path,
                    )
                listed = weight_map.get(key)
                if listed != name:
                    where = "does not list it" if listed is None else f"puts it in shard {listed!r}"
                    raise CorruptFileError(
                        f"shard {name!r} holds tensor {key!r}, but the weight_map {where}", file=index_path, path=(key,)
                    )
                tensors[key] = value
        # every tensor the weight_map puts in a shard read (all of them without ``wanted``) was in it
        missing = next((key for key, name in weight_map.items() if name in shards and key not in tensors), None)
        if missing is not None:
            raise CorruptFileError(
                f"the weight_map puts tensor {missing!r} in shard {weight_map[missing]!r}, which does not hold it",
                file=index_path,
                path=(missing,),
            )
        return Checkpoint(
            tensors, index_path.parent, file_metadata=dict(metadata) or None, kind="Hugging Face .bin shard folder"
        )

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: PtOptions) -> None:
        allowed, dtype_names = frozenset(options.allow_class), frozenset(DTYPES)
        check_writable(checkpoint.tree, allowed, dtype_names)  # names the path of a refused record
        # numpy arrays are pickled as numpy pickles them (their bytes inside data.pkl), not as storages
        everything = checkpoint.unique_tensors()
        unique = [(tensor_path, ref) for tensor_path, ref in everything if not ref.numpy]
        # One storage record per distinct tensor: tied tensors share it, as torch.save writes them.
        key_of = {id(ref): str(index) for index, (_, ref) in enumerate(unique)}
        pickled = PickleWriter(
            lambda _path, ref: key_of[id(ref)], lambda record: writable(record, allowed, dtype_names)
        ).dumps(checkpoint.tree)
        tensor_writer = TensorWriter(context, checkpoint.origin)
        for _, ref in everything:
            if ref.numpy:
                tensor_writer.hashed(ref)  # for the tree digest
        digests: dict[str, str] = {}

        def copier(key: str, ref: TensorRef, tensor_path: TreePath) -> Callable[[BinaryIO], int]:
            def copy(out: BinaryIO) -> int:
                copied = tensor_writer.copy(out, ref, tensor_path, crc32=True)
                digests[key] = copied.digest
                assert copied.crc32 is not None
                return copied.crc32

            return copy

        def records() -> list[tuple[str, bytes]]:  # once every storage is written: their digests are known
            ours = [
                (DIGESTS_RECORD, json.dumps(digests, separators=(",", ":")).encode()),
                (TREE_DIGEST_RECORD, tensor_writer.tree_digest(checkpoint).encode()),
            ]
            casts = manifests.cast_records(unique, {path: key_of[id(ref)] for path, ref in unique}, final=True)
            if casts:
                ours.append((CASTS_RECORD, json.dumps(casts, separators=(",", ":")).encode()))
            own = checkpoint.carried_metadata()  # what the source said about itself, carried over
            if own:
                ours.append((METADATA_RECORD, json.dumps(own, separators=(",", ":")).encode()))
            return ours

        storages = [
            (key_of[id(ref)], ref.nbytes, copier(key_of[id(ref)], ref, tensor_path)) for tensor_path, ref in unique
        ]
        with atomic_output(Path(path), fsync=context.fsync, overwrite=context.overwrite) as out:
            write_archive(out, pickled, storages, records, prefix=ARCHIVE)


FORMAT = PtFormat()
