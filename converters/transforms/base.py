"""What every transformation shares: the type, chaining, errors, reports, and the tree helpers.

A transformation is a ``Checkpoint -> Checkpoint`` callable. The ones in this package are objects
with a constructor that checks its arguments (a bad regex or glob fails before any file is read),
``__call__``, and ``describe()``: a JSON-serialisable record of the options and of what the last
call did (what ``--dry-run`` prints). They never mutate the checkpoint they are given: the result
is a new tree (sharing unchanged leaves and ``TensorRef`` objects, so ties survive).
"""

from __future__ import annotations

import dataclasses
import shlex
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..core.errors import ConverterError, TreePath
from ..core.tree import MAPPING_TYPES, Checkpoint, TensorRef, map_leaves

Transform = Callable[[Checkpoint], Checkpoint]
Key = str | int
Path = tuple[Key, ...]


class TransformError(ConverterError):
    """A transformation's option is invalid, or cannot apply to this checkpoint.

    The message starts with the option as it was given (``--rename 'a(=b': invalid regex: ...``),
    or ends with it (``option_last``: ``no key 'x' (keys: ...), in --select 'a/x'``, after the file
    and tree path); ``option`` and ``argument`` keep the two parts.
    """

    def __init__(
        self,
        option: str,
        argument: str | None,
        message: str,
        *,
        file: Any = None,
        path: TreePath | None = None,
        option_last: bool = False,
    ) -> None:
        self.option = option
        self.argument = argument
        named = option_text(option, argument)
        text = f"{message}, in {named}" if option_last else f"{named}: {message}"
        super().__init__(text, file=file, path=path)


class InvalidOptionError(TransformError):
    """The option itself is malformed: an invalid regex or glob, an unknown dtype or mode."""


class NoMatchError(TransformError):
    """A prefix, rule or pattern matches nothing in the checkpoint (a typo must not pass silently)."""


class KeyCollisionError(TransformError):
    """Two keys of one mapping would become the same key."""


def option_text(option: str, argument: str | None) -> str:
    r"""The option as a shell would take it back, for messages: ``--rename 'a(=b'``, ``--dtype bfloat16``.

    >>> print(option_text("--rename", r"^fc(\d)\.=head\1."), option_text("--dtype", "bfloat16"))
    --rename '^fc(\d)\.=head\1.' --dtype bfloat16
    """
    return option if argument is None else f"{option} {shlex.quote(argument)}"


def apply(checkpoint: Checkpoint, transforms: Iterable[Transform]) -> Checkpoint:
    """``checkpoint`` through each transformation in order."""
    for transform in transforms:
        checkpoint = transform(checkpoint)
    return checkpoint


def map_tensors(checkpoint: Checkpoint, fn: Callable[[TreePath, TensorRef], TensorRef]) -> Checkpoint:
    """A copy of ``checkpoint`` with every tensor replaced by ``fn(first_path, tensor)``.

    ``fn`` is called once per tensor object (with the first path that holds it), and its result is
    placed at every path that held that object: tied tensors stay tied through any chain.

    >>> from converters.core.sources import BufferSource
    >>> shared = TensorRef("float32", (1,), BufferSource.of(bytes(4)))
    >>> out = map_tensors(Checkpoint({"a": shared, "b": shared}), lambda path, ref: ref.derive(shape=()))
    >>> out.tree["a"] is out.tree["b"], out.tree["a"].shape
    (True, ())
    """
    made: dict[int, TensorRef] = {}

    def convert(path: TreePath, leaf: Any) -> Any:
        if type(leaf) is not TensorRef:
            return leaf
        if id(leaf) not in made:
            made[id(leaf)] = fn(path, leaf)
        return made[id(leaf)]

    return replace_tree(checkpoint, map_leaves(checkpoint.tree, convert))


def replace_tree(checkpoint: Checkpoint, tree: Any) -> Checkpoint:
    """``checkpoint`` with another tree; origin, format and what the file said about itself (its
    own metadata, its kind) kept, the stored tree digest dropped (it describes the old tree)."""
    return dataclasses.replace(checkpoint, tree=tree, tree_digest=None)


class RawPath(tuple):  # type: ignore[type-arg]
    """A tree path kept in a report as it is: turned into text (``format_path``) only when the
    report is described, so a conversion without ``--dry-run`` never formats 100,000 paths."""

    __slots__ = ()


def render(value: Any) -> Any:
    """A report with every :class:`RawPath` in it as path text (JSON-ready)."""
    if type(value) is RawPath:
        from .paths import format_path

        return format_path(value)
    if type(value) is dict:
        return {key: render(item) for key, item in value.items()}
    if type(value) is list:
        return [render(item) for item in value]
    return value


class Reporting:
    """The ``describe()`` protocol: options, plus the report of the last call.

    Subclasses set ``kind`` (``"rename"``), ``option`` (the CLI flag) and ``arguments`` (the flag
    values, as given), fill ``self._report`` in ``__call__`` (paths as :class:`RawPath`) and write
    ``summary()`` from ``self.report()``.
    """

    kind = "transform"
    option = ""
    arguments: tuple[str, ...] = ()
    _report: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """What this transformation was asked to do and, once called, what it did (JSON-ready).

        ``{"transform": kind, "option": flag, "arguments": [...], "summary": "one line", ...}``;
        before the first call ``"applied"`` is false and there is no report.
        """
        record: dict[str, Any] = {"transform": self.kind, "option": self.option, "arguments": list(self.arguments)}
        report = self.report()
        record["applied"] = report is not None
        if report is not None:
            record.update(report)
        record["summary"] = self.summary()
        return record

    def report(self) -> dict[str, Any] | None:
        """What the last call did, paths as text; None before the first call."""
        return None if self._report is None else render(self._report)

    def summary(self) -> str:
        return " ".join(option_text(self.option, argument) for argument in self.arguments) or self.option


# ------------------------------------------------------------------------------ tree helpers


def rebuild(original: Any, items: Iterable[tuple[Key, Any]] | Iterable[Any]) -> Any:
    """A container of ``original``'s exact type holding ``items`` (key/value pairs for a mapping,
    values for a list/tuple); an OrderedDict's ``_metadata`` is carried over (the same object:
    trees are never mutated)."""
    kind = type(original)
    if kind in MAPPING_TYPES:
        out = kind(dict(items))  # through a dict: Counter(pairs) would count the pairs
        if kind is OrderedDict and hasattr(original, "_metadata"):
            out._metadata = original._metadata  # type: ignore[union-attr]
        return out
    return kind(items)


def children(node: Any) -> Iterator[tuple[Key, Any]]:
    """``(key, child)`` of a mapping, ``(index, child)`` of a list/tuple, nothing for a leaf."""
    kind = type(node)
    if kind in MAPPING_TYPES:
        yield from node.items()
    elif kind is list or kind is tuple:
        yield from enumerate(node)


def is_container(node: Any) -> bool:
    kind = type(node)
    return kind in MAPPING_TYPES or kind is list or kind is tuple


def is_optimizer_state(node: Any) -> bool:
    """An optimizer ``state_dict``: a mapping with ``state`` and ``param_groups`` (and nothing else
    but ``torch.optim`` additions). Its keys are torch's own field names and int parameter ids."""
    return type(node) in MAPPING_TYPES and "state" in node and "param_groups" in node


def is_tensor_mapping(node: Any) -> bool:
    """A ``state_dict``-like mapping: a non-empty dict/OrderedDict with str keys whose values are
    all tensors. Prefixes and renames apply to the keys of these (and only these) mappings."""
    if type(node) not in (dict, OrderedDict) or not node:
        return False
    return all(type(key) is str and type(value) is TensorRef for key, value in node.items())


def tensor_mappings(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every tensor mapping in ``tree`` with its path, in tree order. The sub-tree of an optimizer
    state_dict is skipped (its per-parameter ``{"momentum_buffer": tensor}`` maps are torch's
    fields, not model keys)."""
    if is_tensor_mapping(tree):
        yield path, tree
        return
    if is_optimizer_state(tree):
        return
    for key, child in children(tree):
        yield from tensor_mappings(child, (*path, key))


def map_tensor_mappings(tree: Any, fn: Callable[[Path, Any], Any], path: Path = ()) -> Any:
    """A copy of ``tree`` with each tensor mapping (see :func:`tensor_mappings`) replaced by
    ``fn(path, mapping)``; everything else kept as it is (unchanged sub-trees are shared)."""
    if is_tensor_mapping(tree):
        return fn(path, tree)
    if is_optimizer_state(tree) or not is_container(tree):
        return tree
    return rebuild(tree, _mapped_children(tree, fn, path))


def _mapped_children(tree: Any, fn: Callable[[Path, Any], Any], path: Path) -> Iterator[Any]:
    mapping = type(tree) in MAPPING_TYPES
    for key, child in children(tree):
        value = map_tensor_mappings(child, fn, (*path, key))
        yield (key, value) if mapping else value


def ancestors(paths: Iterable[Path]) -> set[Path]:
    """Every proper ancestor of ``paths`` (the root included)."""
    return {path[:length] for path in paths for length in range(len(path))}


def drop_paths(tree: Any, drop: set[Path]) -> Any:
    """A copy of ``tree`` without the nodes at ``drop`` (a list or tuple closes up over a dropped
    item); sub-trees with nothing dropped below are shared, not copied."""
    above = ancestors(drop)

    def walk(node: Any, path: Path) -> Any:
        if path not in above:
            return node
        mapping = type(node) in MAPPING_TYPES
        items = []
        for key, child in children(node):
            child_path = (*path, key)
            if child_path in drop:
                continue
            value = walk(child, child_path)
            items.append((key, value) if mapping else value)
        return rebuild(node, items)

    return tree if () in drop else walk(tree, ())


def tensor_count_and_bytes(node: Any, seen: set[int] | None = None) -> tuple[int, int]:
    """Distinct tensors under ``node`` and their bytes (a tied tensor counted once); ``seen``: ids
    of tensors not to count, updated with those counted (so a running total counts each once)."""
    seen = set() if seen is None else seen
    count = size = 0
    stack = [node]
    while stack:
        item = stack.pop()
        if type(item) is TensorRef:
            if id(item) not in seen:
                seen.add(id(item))
                count += 1
                size += item.nbytes
        else:
            stack.extend(child for _, child in children(item))
    return count, size


def first_keys(keys: Sequence[Any], limit: int = 5) -> str:
    """``'a', 'b', 'c' (+7 more)``: a few keys for a message."""
    shown_keys = ", ".join(repr(key) for key in keys[:limit])
    return shown_keys + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def paths_by_tensor(checkpoint: Checkpoint) -> tuple[dict[int, list[Path]], dict[int, TensorRef]]:
    """Every path of each tensor object, and the objects, keyed by ``id``, in tree order."""
    paths_of: dict[int, list[Path]] = {}
    refs: dict[int, TensorRef] = {}
    for path, ref in checkpoint.tensors():
        paths_of.setdefault(id(ref), []).append(tuple(path))
        refs[id(ref)] = ref
    return paths_of, refs


class TracksOrigins:
    """For transformations that put new tensor objects in the tree (a cast, a materialized tie):
    which tensor each came from in the last call, for ``describe_plan``."""

    _origins: dict[int, tuple[TensorRef, TensorRef]]

    def _forget_origins(self) -> None:
        self._origins = {}

    def _made_from(self, new: TensorRef, original: TensorRef) -> None:
        self._origins[id(new)] = (new, original)

    def origin_of(self, ref: TensorRef) -> TensorRef | None:
        """The tensor ``ref`` was made from by the last call, if it was made by it."""
        pair = getattr(self, "_origins", {}).get(id(ref))
        return pair[1] if pair is not None and pair[0] is ref else None
