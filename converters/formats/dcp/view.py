"""How ``torch.distributed.checkpoint`` sees a tree: the values ``dcp.save`` writes and ``dcp.load``
fills, each under its flattened key (FQN) with the path it is put back at.

The rules are torch 2.13's (``_traverse.traverse_state_dict`` and ``_nested_dict.flatten_state_dict``),
kept exactly so that the keys we write are the keys a resuming job asks for:

- a mapping is always walked, its keys turned into strings (``{0: x}`` gives the segment ``"0"``);
  an empty mapping therefore writes nothing and does not come back;
- a list is walked (segments are its int indices) when it holds a tensor or a mapping, or a list
  that must be walked; otherwise it is one value, as is a tuple, whatever it holds;
- every other value is one entry: a tensor is a tensor entry, anything else (a numpy array, a
  number, a recorded object...) a value that ``dcp.save`` would ``torch.save``;
- the FQN is the path's segments joined by ``.``; two values with one FQN are refused (torch
  raises "duplicated flatten key").

Recorded objects are values even when the class they name is a mapping (a ``defaultdict``): the
name is only a string here, so nothing is assumed about it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ...core.errors import UnsupportedValueError, format_tree_path, shown
from ...core.tree import MAPPING_TYPES, TensorRef

ViewPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Entry:
    """One value as DCP stores it: its FQN, where ``dcp.load`` puts it, and the value."""

    fqn: str
    path: ViewPath  # planner_data: a str segment is a dict key, an int a list index
    value: Any
    tree_path: tuple[str | int, ...]  # where it is in our tree (for messages)

    @property
    def is_tensor(self) -> bool:
        return type(self.value) is TensorRef and not self.value.numpy


def entries(tree: Mapping[Any, Any]) -> list[Entry]:
    """The entries of ``tree`` (a mapping: DCP's root is a state dict), in tree order."""
    found: list[Entry] = []
    where: dict[str, tuple[str | int, ...]] = {}

    def visit(path: ViewPath, tree_path: tuple[str | int, ...], value: Any) -> None:
        if type(value) in MAPPING_TYPES:
            for key, child in value.items():
                visit((*path, str(key)), (*tree_path, key), child)
        elif type(value) is list and not _terminal(value):
            for index, child in enumerate(value):
                visit((*path, index), (*tree_path, index), child)
        else:
            fqn = ".".join(map(str, path))
            if fqn in where:
                raise UnsupportedValueError(
                    f"DCP flattens {shown(list(where[fqn]))} and {shown(list(tree_path))} to one key "
                    f"{shown(repr(fqn))} (it joins a path's keys with '.'); rename one of them (--rename)",
                    path=tree_path,
                )
            where[fqn] = tree_path
            found.append(Entry(fqn, path, value, tree_path))

    visit((), (), tree)
    return found


def check_loadable(found: list[Entry]) -> None:
    """Refuse (``UnsupportedValueError`` naming the list) entries DCP cannot load back.

    ``dcp.load`` (through ``_flatten_sharded_tensors``) and ``dcp_to_torch_save`` rebuild the tree
    from the stored values' paths before flattening it again: empty containers are gone and a list
    slot no value fills is ``None``. A list walked only for an empty container (``[1, {}]``), or
    with such an item before stored ones (``[{}, 1]``, ``[{}, tensor]``), then flattens to keys no
    folder holds and both fail ("Missing key in checkpoint state_dict") — for ``dcp.save``'s own
    folders too. So the tree rebuilt from the entries must flatten to the entries' own paths."""
    if not any(type(segment) is int for entry in found for segment in entry.path):
        return  # no list walked: nothing to rebuild otherwise
    paths = {entry.path for entry in found}
    rebuilt = assemble([(entry.path, entry.value) for entry in found])
    extra = next((path for path in _flattened(rebuilt, ()) if path not in paths), None)
    if extra is None:
        return
    if any(entry.path[: len(extra)] == extra for entry in found):  # values lie below: the list turned one value
        where, why = extra, "DCP stores its items one by one only because of the empty containers it holds"
    else:  # a slot no value fills
        where = extra[:-1]
        why = f"its item {extra[-1]} holds only empty containers (no value DCP stores) and a later one holds values"
    at = next(entry.tree_path[: len(where)] for entry in found if entry.path[: len(where)] == where)
    raise UnsupportedValueError(
        f"DCP cannot load back the list at {format_tree_path(at)}: {why}. dcp.load and dcp_to_torch_save rebuild "
        "lists from the paths of the values stored, without empty containers, and then ask for keys the folder "
        "does not hold (torch's own dcp.save writes such a list alike): drop its empty containers, or leave it "
        f"out (--exclude {format_tree_path(at)})",
        path=at,
    )


def _flattened(value: Any, path: ViewPath) -> Iterator[ViewPath]:
    """The paths :func:`entries` gives a tree :func:`assemble` rebuilt (keys are str already)."""
    if type(value) is dict:
        for key, child in value.items():
            yield from _flattened(child, (*path, key))
    elif type(value) is list and not _terminal(value):
        for index, child in enumerate(value):
            yield from _flattened(child, (*path, index))
    else:
        yield path


def _terminal(value: list[Any]) -> bool:
    """torch's ``_is_terminal`` for a list: stored whole unless it holds a tensor, a mapping, or a
    list that is not stored whole."""
    for item in value:
        kind = type(item)
        if kind in MAPPING_TYPES or (kind is list and not _terminal(item)):
            return False
        if kind is TensorRef and not item.numpy:
            return False
    return True


def tensors_in(value: Any) -> list[TensorRef]:
    """The distinct tensors (numpy arrays included) of one entry's value, in walk order."""
    if type(value) is TensorRef:
        return [value]
    found: dict[int, TensorRef] = {}
    for leaf in _leaves(value):
        if type(leaf) is TensorRef:
            found.setdefault(id(leaf), leaf)
    return list(found.values())


def _leaves(value: Any) -> Iterator[Any]:
    stack = [value]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind in MAPPING_TYPES:
            stack.extend(reversed(list(node.values())))
        elif kind is list or kind is tuple:
            stack.extend(reversed(node))
        else:
            yield node


def assemble(placed: list[tuple[ViewPath, Any]]) -> dict[str, Any]:
    """The tree ``dcp.load`` builds from values placed at their paths (``_traverse.set_element``):
    a str segment makes a dict, an int one a list grown with ``None`` up to it. Only for paths made
    by :func:`entries` (the reader places what a file says with its own checks)."""
    root: dict[str, Any] = {}
    for path, value in placed:
        container: Any = root
        for key, following in itertools.pairwise(path):
            if type(container) is list:
                assert type(key) is int
                container.extend([None] * (key + 1 - len(container)))
                if container[key] is None:
                    container[key] = {} if type(following) is str else []
                container = container[key]
            else:
                container = container.setdefault(key, {} if type(following) is str else [])
        last = path[-1]
        if type(container) is list:
            assert type(last) is int
            container.extend([None] * (last + 1 - len(container)))
        container[last] = value
    return root
