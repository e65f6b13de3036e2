"""Sharded safetensors: a folder of shards plus ``model.safetensors.index.json``, as Hugging Face
``save_pretrained`` and ``huggingface_hub`` write it.

Index::

    {"metadata": {"total_size": <tensor bytes>, "sdconvert.version": "1", "sdconvert.tree": "<json>"},
     "weight_map": {"<tensor key>": "model-00001-of-00003.safetensors", ...}}

Each shard is an ordinary safetensors file of a flat dict (our writer: with its tensors' BLAKE3
digests). The tree that makes the folder round-trip alone rides in the index's ``metadata``, with
the digest of that tree (``sdconvert.tree_blake3``); loaders that know only ``total_size`` ignore
them. Shards are filled in tree order and a new one starts when the next tensor would pass the
limit (a tensor bigger than the limit gets its own). Bytes stream shard by shard, so memory stays
flat.

Reading: the index and every shard must be regular files in the folder (no symlinks); a shard is
read as one safetensors file, never as an index (an index naming itself or another index is
refused, not followed); the index and every shard are charged to the one budget of the read,
which covers the index and the shards it names.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...core import manifests
from ...core.atomic import atomic_folder, atomic_output
from ...core.budget import Budget
from ...core.contract import WriteContext
from ...core.dtypes import numel
from ...core.errors import ConverterError, CorruptFileError, TreePath
from ...core.parallel import serialized, write_files
from ...core.sources import BufferSource
from ...core.stored import (
    check_tree_digest,
    find_index,
    loads_json_strict,
    paused_gc,
    read_shard_index,
    shard_file,
    tree_from_stored,
)
from ...core.tree import MAPPING_TYPES, Checkpoint, TensorRef

INDEX_NAME = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
TREE_KEY = "sdconvert.tree"
VERSION_KEY = "sdconvert.version"
TREE_DIGEST_KEY = "sdconvert.tree_blake3"
MAX_INDEX_BYTES = 100_000_000
def index_in(folder: Path) -> Path | None:
    """The index file of a sharded folder, if ``folder`` is one."""
    return find_index(folder, INDEX_NAME, INDEX_SUFFIX)


def replaceable(path: Path) -> bool:
    """What a sharded folder holds (shards and an index); anything else is someone's data."""
    return path.name.endswith((".safetensors", ".index.json")) and path.is_file()


# What a shard's writer tells the others about each of its tensors (TensorWriter.written).
Written = dict[str, tuple[str, str | None]]


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
    # The plan above depends on the checkpoint alone, so any number of workers or ranks writes
    # the same files. One tensor writer for every shard of this process; digests written by
    # other ranks are learnt from them, so rank 0's index stores the digest of the whole tree.
    from ...core.writing import TensorWriter  # the copy and hashing machinery: writes only

    context = dataclasses.replace(context, progress=serialized(context.progress))
    tensor_writer = TensorWriter(context, checkpoint.origin)
    group = context.group
    with atomic_folder(
        folder, replaceable, fsync=context.fsync, overwrite=context.overwrite, group=group
    ) as staging:

        def shard_writer(name: str, shard: list[tuple[str, TensorRef]]) -> Callable[[], Written]:
            def write() -> Written:
                shard_checkpoint = Checkpoint(dict(shard), checkpoint.origin)
                fmt.write_file(shard_checkpoint, staging / name, tensor_writer, fsync=context.fsync, overwrite=True)
                return {key: tensor_writer.written(ref) for key, ref in shard}

            return write

        digests = write_files(
            [shard_writer(name, shard) for name, shard in zip(names, shards, strict=True)],
            [sum(ref.nbytes for _, ref in shard) for shard in shards],
            workers=context.workers,
            group=group,
        )
        if group is not None and group.rank != 0:
            return
        for shard, shard_written in zip(shards, digests, strict=True):
            for key, ref in shard:
                tensor_writer.learn(ref, shard_written[key])
        index = {
            "metadata": {
                **checkpoint.carried_metadata(),  # what the source said about itself, carried over
                "total_size": sum(ref.nbytes for _, ref in checkpoint.unique_tensors()),
                # as current transformers' save_pretrained writes it: elements of every stored tensor
                "total_parameters": sum(numel(ref.shape) for _, ref in checkpoint.unique_tensors()),
                VERSION_KEY: str(manifests.MANIFEST_VERSION),
                TREE_KEY: json.dumps(manifests.encode_tree(checkpoint.tree, keys), separators=(",", ":")),
                TREE_DIGEST_KEY: tensor_writer.tree_digest(checkpoint),
            },
            "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key, _ in shard},
        }
        # Written like the shards (fsynced when asked): atomic_folder makes the folder's entries
        # durable, not the bytes of the files in it.
        with atomic_output(staging / INDEX_NAME, fsync=context.fsync) as out:
            out.write((json.dumps(index, indent=2) + "\n").encode())


def read_sharded(fmt: Any, index_path: Path, budget: Budget, wanted: Wanted | None = None) -> Checkpoint:
    """The folder's checkpoint. With ``wanted`` (``Select.covers``, see ``core/contract.py``) only
    the shards holding a wanted tensor are opened (not even a header of the others is read): their
    tensors are left out of the tree, which keeps all else; unread shards are not checked."""
    folder = index_path.parent
    weight_map, metadata = read_shard_index(index_path, MAX_INDEX_BYTES, budget)
    needed = None if wanted is None else _needed_keys(weight_map, metadata, index_path, budget, wanted)
    names = dict.fromkeys(name for key, name in weight_map.items() if needed is None or key in needed)
    shards = {name: shard_file(index_path, name, "a safetensors file") for name in names}
    # Unread shards are not charged: not even stat'ed (a request each, remotely).
    budget.cover(index_path.stat().st_size + sum(shard.stat().st_size for shard in shards.values()))
    refs: dict[str, TensorRef] = {}
    ours = False  # shards written by this project's writer store a tree digest: so must the index
    for shard_name, shard in shards.items():
        # A shard is one safetensors file, never an index: no recursion, whatever the names say.
        shard_checkpoint = fmt.read_file(shard, budget)
        ours = ours or shard_checkpoint.tree_digest is not None
        for key, ref in shard_checkpoint.unique_tensors():
            name = str(key[0]) if len(key) == 1 else None
            if name is None or weight_map.get(name) != shard_name:
                raise CorruptFileError(
                    f"shard {shard_name!r} holds tensor {name!r}, which the weight_map puts elsewhere", file=index_path
                )
            refs[name] = ref
    # every tensor of each shard read (all of them without ``wanted``) was found in it
    missing = next((key for key, name in weight_map.items() if name in shards and key not in refs), None)
    if missing is not None:
        raise CorruptFileError(
            f"the weight_map lists {missing!r}, which its shard {weight_map[missing]!r} lacks", file=index_path
        )
    # What was left out stands in the stored tree as a placeholder, removed once the tree is built.
    omitted = len(refs) < len(weight_map)
    stand_in = {key: _OMITTED for key in weight_map if key not in refs} if omitted else {}
    if ours and not (TREE_KEY in metadata and TREE_DIGEST_KEY in metadata):
        # Otherwise a flipped bit in "metadata" (or in a key inside it) would silently drop the tree
        # and its digest, and the folder would read as a flat dict that verify --deep calls intact.
        missing = TREE_KEY if TREE_KEY not in metadata else TREE_DIGEST_KEY
        raise CorruptFileError(
            f"the shards were written by sdconvert (each stores a tree digest), but the index has no "
            f"metadata[{missing!r}]",
            file=index_path,
        )
    tree_digest = None
    if TREE_DIGEST_KEY in metadata:
        tree_digest = check_tree_digest(metadata[TREE_DIGEST_KEY], index_path, f"metadata[{TREE_DIGEST_KEY!r}]")
    if TREE_KEY in metadata:
        what = f"metadata[{TREE_KEY!r}]"
        tree = tree_from_stored(
            metadata[TREE_KEY],
            {**refs, **stand_in},
            index_path,
            what,
            holder="every shard",
            unused_name="shard tensor",
            budget=budget,
        )
        if omitted:
            tree = _without_omitted(tree)
            tree_digest = None  # it is the whole tree's
    else:
        tree = {key: refs[key] for key in weight_map if key in refs}
    own = {key: value for key, value in metadata.items() if not key.startswith("sdconvert.")}
    return Checkpoint(tree, folder, tree_digest=tree_digest, file_metadata=own or None, kind="safetensors shard folder")


# ------------------------------------------------------------------------------ a selection's shards

Wanted = Callable[[tuple[str | int, ...]], bool]

# The stand-in of a tensor left out, until the tree is built: recognised by its source (an
# "ndarray" node makes a copy of the ref, marked as numpy, with the same source).
_OMITTED_SOURCE = BufferSource.of(b"")
_OMITTED = TensorRef("uint8", (0,), _OMITTED_SOURCE)


def _needed_keys(
    weight_map: dict[str, str], metadata: dict[str, Any], index_path: Path, budget: Budget, wanted: Wanted
) -> set[str] | None:
    """The weight_map keys whose shards must be read for ``wanted``, or None for all of them.

    A key is needed when a path of its tensor (a tied tensor has several) is wanted, or is a
    list's or tuple's item (leaving it out would renumber the items after it): only values of a
    mapping, under a str key, are left out. The stored tree is decoded once for its paths (charged
    to a copy of the budget: the tree is decoded again, with the tensors, and charged then);
    anything wrong with it means reading everything, which reports it as a whole read does."""
    if TREE_KEY not in metadata:  # a flat dict of the weight_map's keys
        return {key for key in weight_map if wanted((key,))}
    text = metadata[TREE_KEY]
    needed: set[str] = set()
    named: set[str] = set()

    def tensor(key: str, path: TreePath) -> TensorRef:
        if key not in weight_map:
            raise _Unplanned
        named.add(key)
        path = tuple(path)
        if not (path and type(path[-1]) is str) or wanted(path):
            needed.add(key)
        return _OMITTED

    try:
        if type(text) is not str:
            raise _Unplanned
        scratch = copy.copy(budget)
        node = loads_json_strict(text, index_path, f"metadata[{TREE_KEY!r}]", scratch)
        scratch.nodes(text.count(":"), f"the tree of metadata[{TREE_KEY!r}]")
        with paused_gc():
            manifests.decode_tree(node, tensor, file=index_path)
    except (_Unplanned, ConverterError):
        return None
    return needed if len(named) == len(weight_map) else None


class _Unplanned(Exception):
    """The stored tree does not name the weight_map's tensors as it must: read everything."""


def _without_omitted(node: Any) -> Any:
    """``node`` without the stand-ins of tensors left out (values of mappings only: see
    ``_needed_keys``); containers keep their types, an OrderedDict its ``_metadata``."""
    kind = type(node)
    if kind in MAPPING_TYPES:
        out: Any = kind({key: _without_omitted(value) for key, value in node.items() if not _is_omitted(value)})
        if kind is OrderedDict and hasattr(node, "_metadata"):
            out._metadata = node._metadata
        return out
    if kind is list or kind is tuple:
        return kind(_without_omitted(value) for value in node)
    return node


def _is_omitted(value: Any) -> bool:
    return type(value) is TensorRef and value.source is _OMITTED_SOURCE
