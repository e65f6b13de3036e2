"""``pt``: PyTorch's zip checkpoints, as written by ``torch.save`` and read by ``torch.load``.

Read without torch and without running pickled code (see ``pt_pickle``); written so that
``torch.load(f)`` with its default ``weights_only=True`` accepts the file. Layout written::

    archive/data.pkl            the tree, protocol-2 pickle, tensors as persistent storage ids
    archive/byteorder           "little"
    archive/data/<n>            one record per tensor, its C-order bytes, 64-byte aligned
    archive/.format_version     "1"
    archive/.storage_alignment  "64"
    archive/version             "3\\n"
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ..codecs.torch_archive import CASTS_RECORD, DIGESTS_RECORD, TREE_DIGEST_RECORD, read_archive_and_tree_digest
from ..codecs.torch_pickle import PickleWriter
from ..codecs.zip import ZipWriter
from ..core import manifests
from ..core.atomic import atomic_output
from ..core.budget import Budget
from ..core.contract import FormatBase, NoOptions, WriteContext
from ..core.dtypes import DTYPES
from ..core.errors import TreePath
from ..core.tree import Checkpoint, TensorRef
from ..core.writing import TensorWriter

ARCHIVE = "archive"


class PtFormat(FormatBase):
    name = "pt"
    suffixes: tuple[str, ...] = (".pt", ".pth", ".bin")
    description = "PyTorch zip checkpoint (torch.save / torch.load)"
    # torch names every dtype; the pickle spells it (see codecs/torch_pickle.py), so the code is the name.
    dtype_codes: ClassVar[Mapping[str, Any]] = {name: name for name in DTYPES}

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"PK\x03\x04")

    def read(self, path: Path, budget: Budget) -> Checkpoint:
        path = Path(path)
        tree, tree_digest = read_archive_and_tree_digest(path, budget=budget)
        return Checkpoint(tree, path, tree_digest=tree_digest)

    def write(self, checkpoint: Checkpoint, path: Path, context: WriteContext, options: NoOptions) -> None:
        unique = checkpoint.unique_tensors()
        # One storage record per distinct tensor: tied tensors share it, as torch.save writes them.
        key_of = {id(ref): str(index) for index, (_, ref) in enumerate(unique)}
        pickled = PickleWriter(lambda _path, ref: key_of[id(ref)]).dumps(checkpoint.tree)
        tensor_writer = TensorWriter(context, checkpoint.origin)
        with atomic_output(Path(path), fsync=context.fsync, overwrite=context.overwrite) as out:
            archive = ZipWriter(out)
            archive.add(f"{ARCHIVE}/data.pkl", pickled)
            archive.add(f"{ARCHIVE}/byteorder", b"little")
            digests = {}
            for tensor_path, ref in unique:
                key = key_of[id(ref)]

                def copy(
                    out: BinaryIO, ref: TensorRef = ref, tensor_path: TreePath = tensor_path, key: str = key
                ) -> int:
                    copied = tensor_writer.copy(out, ref, tensor_path, crc32=True)
                    digests[key] = copied.digest
                    assert copied.crc32 is not None
                    return copied.crc32

                archive.add_copied(f"{ARCHIVE}/data/{key}", ref.nbytes, copy)
            archive.add(f"{ARCHIVE}/.format_version", b"1")
            archive.add(f"{ARCHIVE}/.storage_alignment", b"64")
            archive.add(f"{ARCHIVE}/version", b"3\n")
            archive.add(f"{ARCHIVE}/{DIGESTS_RECORD}", json.dumps(digests, separators=(",", ":")).encode())
            archive.add(f"{ARCHIVE}/{TREE_DIGEST_RECORD}", tensor_writer.tree_digest(checkpoint).encode())
            casts = manifests.cast_records(unique, {path: key_of[id(ref)] for path, ref in unique}, final=True)
            if casts:
                archive.add(f"{ARCHIVE}/{CASTS_RECORD}", json.dumps(casts, separators=(",", ":")).encode())
            archive.close()


FORMAT = PtFormat()
