"""Sharded safetensors: a folder of shards plus ``model.safetensors.index.json``, as Hugging Face
``save_pretrained`` and ``huggingface_hub`` write it.

Index::

    {"metadata": {"total_size": <tensor bytes>, "sdconvert.version": "1", "sdconvert.tree": "<json>"},
     "weight_map": {"<tensor key>": "model-00001-of-00003.safetensors", ...}}

Each shard is an ordinary safetensors file of a flat dict (our writer: with its tensors' BLAKE3
digests). The tree that makes the folder round-trip alone rides in the index's ``metadata``;
loaders that know only ``total_size`` ignore it. Shards are filled in tree order and a new one
starts when the next tensor would pass the limit (a tensor bigger than the limit gets its own).
Bytes stream shard by shard, so memory stays flat.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ...core import manifests
from ...core.atomic import atomic_folder, atomic_output
from ...core.budget import Budget
from ...core.contract import WriteContext
from ...core.errors import ConverterError, CorruptFileError, UnsafeFileError
from ...core.stored import loads_json_strict, tree_from_stored
from ...core.tree import Checkpoint, TensorRef

INDEX_NAME = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
TREE_KEY = "sdconvert.tree"
VERSION_KEY = "sdconvert.version"
MAX_INDEX_BYTES = 100_000_000
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``5GB`` (decimal, as transformers reads it), ``512MiB`` (binary) or a number of bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
        if match is None:
            raise ConverterError(f"cannot read the size {text!r}; use e.g. 5GB, 500MB or 512MiB")
        size = int(float(match.group(1)) * SIZE_UNITS[match.group(2) or ""])
    if size <= 0:
        raise ConverterError(f"a shard size must be positive, got {text!r}")
    return size


def index_in(folder: Path) -> Path | None:
    """The index file of a sharded folder, if ``folder`` is one."""
    if not folder.is_dir():
        return None
    preferred = folder / INDEX_NAME
    if preferred.is_file():
        return preferred
    found = sorted(p for p in folder.iterdir() if p.name.endswith(INDEX_SUFFIX) and p.is_file())
    return found[0] if len(found) == 1 else None


def replaceable(path: Path) -> bool:
    """What a sharded folder holds (shards and an index); anything else is someone's data."""
    return path.name.endswith((".safetensors", ".index.json")) and path.is_file()


def write_sharded(fmt: Any, checkpoint: Checkpoint, folder: Path, max_shard_size: int, context: WriteContext) -> None:
    keys = manifests.storage_keys(checkpoint.tree)
    shards: list[list[tuple[str, TensorRef]]] = [[]]
    filled = 0
    for tensor_path, ref in checkpoint.unique_tensors():
        if shards[-1] and filled + ref.nbytes > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append((keys[tensor_path], ref))
        filled += ref.nbytes
    count = len(shards)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    index = {
        "metadata": {
            "total_size": sum(ref.nbytes for _, ref in checkpoint.unique_tensors()),
            VERSION_KEY: str(manifests.MANIFEST_VERSION),
            TREE_KEY: json.dumps(manifests.encode_tree(checkpoint.tree, keys), separators=(",", ":")),
        },
        "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key, _ in shard},
    }
    with atomic_folder(folder, replaceable, fsync=context.fsync, overwrite=context.overwrite) as staging:
        for name, shard in zip(names, shards, strict=True):
            fmt.write(Checkpoint(dict(shard), checkpoint.origin), staging / name, context, fmt.Options())
        # Written like the shards (fsynced when asked): atomic_folder makes the folder's entries
        # durable, not the bytes of the files in it.
        with atomic_output(staging / INDEX_NAME, fsync=context.fsync) as out:
            out.write((json.dumps(index, indent=2) + "\n").encode())


def read_sharded(fmt: Any, index_path: Path, budget: Budget) -> Checkpoint:
    folder = index_path.parent
    if index_path.stat().st_size > MAX_INDEX_BYTES:
        raise CorruptFileError(f"the index is larger than {MAX_INDEX_BYTES} bytes", file=index_path)
    index = loads_json_strict(index_path.read_bytes(), index_path, "the shard index")
    weight_map = index.get("weight_map") if type(index) is dict else None
    metadata = index.get("metadata", {}) if type(index) is dict else None
    if (
        type(weight_map) is not dict
        or type(metadata) is not dict
        or not all(type(v) is str for v in weight_map.values())
    ):
        raise CorruptFileError(
            "the shard index must hold a weight_map of tensor key to shard file name", file=index_path
        )
    refs: dict[str, TensorRef] = {}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = _shard_path(folder, shard_name, index_path)
        for key, ref in fmt.read(shard, budget).unique_tensors():
            name = str(key[0]) if len(key) == 1 else None
            if name is None or weight_map.get(name) != shard_name:
                raise CorruptFileError(
                    f"shard {shard_name!r} holds tensor {name!r}, which the weight_map puts elsewhere", file=index_path
                )
            refs[name] = ref
    missing = [key for key in weight_map if key not in refs]
    if missing:
        raise CorruptFileError(
            f"the weight_map lists {missing[0]!r}, which its shard {weight_map[missing[0]]!r} lacks", file=index_path
        )
    if TREE_KEY in metadata:
        what = f"metadata[{TREE_KEY!r}]"
        tree = tree_from_stored(
            metadata[TREE_KEY], refs, index_path, what, holder="every shard", unused_name="shard tensor"
        )
    else:
        tree = {key: refs[key] for key in weight_map}
    return Checkpoint(tree, folder)


def _shard_path(folder: Path, name: str, index_path: Path) -> Path:
    relative = Path(name)
    if relative.is_absolute() or len(relative.parts) != 1 or name in ("", ".", ".."):
        raise UnsafeFileError(
            f"shard file name {name!r} must be a plain file name in the index's folder", file=index_path
        )
    shard = folder / relative
    if shard.is_symlink() or not shard.is_file():
        raise CorruptFileError(f"shard {name!r} is not a regular file beside the index", file=index_path)
    return shard
