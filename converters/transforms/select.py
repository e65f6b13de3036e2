"""``Select`` (``--select``) and ``Exclude`` (``--exclude``): keep or drop sub-trees by path or glob.

Paths and globs are those of :mod:`converters.transforms.paths` (``model_state_dict/fc*``,
``**/*.num_batches_tracked``, backslash escapes for keys holding ``/`` or ``*``).

What ``Select`` returns, with one pattern or several (their union):

- The result is rooted at the patterns' longest common *literal* prefix (the leading segments
  without wildcards that every pattern shares). ``--select model_state_dict`` alone gives the
  state_dict itself (as ever); ``--select optimizer_state_dict/state/0`` that one entry.
- Below that root, only the matched sub-trees are kept, each in its original container, at its
  original key, with the containers' exact types (OrderedDict and its ``_metadata`` included) and
  key order. ``--select 'model_state_dict/fc*'`` is ``model_state_dict`` (an OrderedDict) holding
  the ``fc`` keys only; ``--select model_state_dict --select epoch`` is the root dict with those
  two keys. A list keeps its selected items, in order (their indices close up).

So the shape of the result follows from the command line alone, never from what happens to match.
Every pattern must match something: a typo is an error, not an empty file.

``Select.covers(path)`` says, without the tree, whether the value at ``path`` is kept: a reader
given it (``api.read`` pushes a leading ``Select`` down) may leave out the tensors it does not
cover, and the files holding only those, and the selection still gives the same result.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..core.errors import TreePath
from ..core.tree import MAPPING_TYPES, Checkpoint, TensorRef
from .base import (
    InvalidOptionError,
    Key,
    NoMatchError,
    Path,
    RawPath,
    Reporting,
    ancestors,
    children,
    drop_paths,
    first_keys,
    rebuild,
    replace_tree,
    tensor_count_and_bytes,
)
from .paths import PathPattern, format_path, sort_in_tree_order


def _patterns(paths: tuple[str | Iterable[str], ...], option: str) -> tuple[str, ...]:
    flat: list[str] = []
    for item in paths:
        if isinstance(item, str):
            flat.append(item)
        else:
            flat.extend(item)
    if not flat:
        raise InvalidOptionError(option, None, "needs at least one path")
    for text in flat:
        if not isinstance(text, str):
            raise InvalidOptionError(option, repr(text), "a path must be a string")
    return tuple(flat)


class Select(Reporting):
    """Keep the sub-trees at ``paths`` (their union; see the module docstring for the result's shape).

    >>> Select("a/0")(Checkpoint({"a": [5, 6]})).tree
    5
    >>> Select("a/*", "b")(Checkpoint({"a": {"x1": 1, "y": 2, "x2": 3}, "b": 4, "c": 5})).tree
    {'a': {'x1': 1, 'y': 2, 'x2': 3}, 'b': 4}
    >>> Select("a/x*")(Checkpoint({"a": {"x1": 1, "y": 2, "x2": 3}})).tree
    {'x1': 1, 'x2': 3}
    """

    kind = "select"

    def __init__(self, *paths: str | Iterable[str], option: str = "--select") -> None:
        self.option = option
        self.arguments = _patterns(paths, option)
        self.patterns = tuple(PathPattern.parse(text, option) for text in self.arguments)
        # Where the result is rooted, and each pattern's segments below it (matched from there).
        self._prefix = _common_prefix([pattern.literal_prefix for pattern in self.patterns])
        self._below = tuple(
            PathPattern(pattern.text, pattern.segments[len(self._prefix) :]) for pattern in self.patterns
        )
        self._report = None

    @property
    def path(self) -> str:
        """The first path (the one path of a single-path Select)."""
        return self.arguments[0]

    def covers(self, path: Path) -> bool:
        """Whether the value at ``path`` (a leaf, such as a tensor) is in the result of this
        selection on any tree it applies to, told from the path alone.

        It is kept when a pattern matches the path or one of its ancestors below the root, and the
        path runs through the root (the common literal prefix, walked as ``__call__`` walks it).
        Where only the tree could tell which child the walk to the root takes, the answer is True
        (a leaf covered but not kept costs a read, one kept but not covered would be lost): a
        segment spelling an int covers the str key it spells and that int key or index (the walk
        prefers the str key when both are there), and a negative one any index (it counts from the
        end of a list). On any other path it agrees with ``__call__`` exactly.

        >>> select = Select("model_state_dict/fc*")
        >>> select.covers(("model_state_dict", "fc1.weight")), select.covers(("model_state_dict", "conv.weight"))
        (True, False)
        """
        prefix = self._prefix
        if len(path) < len(prefix):
            return False  # above the root, or beside it: a leaf there is never in the result
        if not all(_on_the_walk(segment, key) for segment, key in zip(prefix, path, strict=False)):
            return False
        below = path[len(prefix) :]
        return any(pattern.matches_within(below) for pattern in self._below)

    def __call__(self, checkpoint: Checkpoint) -> Checkpoint:
        prefix = self._prefix
        node, root = checkpoint.tree, list[Any]()
        for segment in prefix:
            node, key = _child(node, segment, root, checkpoint.origin, self)
            root.append(key)
        root_path: Path = tuple(root)
        matched: list[Path] = []
        whole = False
        for pattern in self.patterns:
            found = pattern.find(node, root_path, skip=len(prefix))
            if not found:
                raise _no_match(self.option, pattern, checkpoint, "matches nothing")
            whole = whole or root_path in found
            matched += found
        if whole:
            result = node
        else:
            kept = sort_in_tree_order(checkpoint.tree, list(dict.fromkeys(matched)))
            result = _prune(node, [path[len(root_path) :] for path in kept])
        dropped = _dropped_subtrees(checkpoint.tree, root_path, node, result, whole, matched)
        self._report = {
            "root": RawPath(root_path),
            "selected": [RawPath(path) for path in sort_in_tree_order(checkpoint.tree, list(set(matched)))],
            "dropped": dropped,
        }
        return replace_tree(checkpoint, result)

    def summary(self) -> str:
        text = super().summary()
        if self._report is None:
            return text
        count = len(self._report["selected"])
        dropped = sum(item["tensors"] for item in self._report["dropped"])
        return f"{text}: kept {count} path{'s' if count != 1 else ''}, dropped {dropped} tensor(s)"


class Exclude(Reporting):
    """Drop every sub-tree that ``patterns`` match (all matched against the tree as given, then
    dropped together; a list closes up over a dropped item).

    >>> Exclude("*.num_batches_tracked")(Checkpoint({"bn.weight": 1, "bn.num_batches_tracked": 2})).tree
    {'bn.weight': 1}
    """

    kind = "exclude"

    def __init__(self, *patterns: str | Iterable[str], option: str = "--exclude") -> None:
        self.option = option
        self.arguments = _patterns(patterns, option)
        self.patterns = tuple(PathPattern.parse(text, option) for text in self.arguments)
        self._report = None

    def __call__(self, checkpoint: Checkpoint) -> Checkpoint:
        drop: dict[Path, str] = {}
        for pattern in self.patterns:
            found = pattern.find(checkpoint.tree)
            if not found:
                raise _no_match(self.option, pattern, checkpoint, "matches nothing")
            if () in found:
                raise InvalidOptionError(self.option, pattern.text, "matches the root: it would exclude everything")
            for path in found:
                drop.setdefault(path, pattern.text)
        result = drop_paths(checkpoint.tree, set(drop))
        counted = {id(ref) for ref in _tensors(result)}  # still written: not lost
        dropped = []
        for path in sort_in_tree_order(checkpoint.tree, list(drop)):
            if any(path[:length] in drop for length in range(len(path))):
                continue  # inside a dropped sub-tree already listed
            count, size = tensor_count_and_bytes(_node_at(checkpoint.tree, path), counted)
            dropped.append({"path": RawPath(path), "by": drop[path], "tensors": count, "bytes": size})
        self._report = {"dropped": dropped}
        return replace_tree(checkpoint, result)

    def summary(self) -> str:
        text = super().summary()
        if self._report is None:
            return text
        items = self._report["dropped"]
        tensors = sum(item["tensors"] for item in items)
        return f"{text}: dropped {len(items)} path{'s' if len(items) != 1 else ''} ({tensors} tensor(s))"


# ------------------------------------------------------------------------------ helpers


def _common_prefix(prefixes: list[tuple[str, ...]]) -> tuple[str, ...]:
    common = prefixes[0]
    for prefix in prefixes[1:]:
        length = 0
        while length < min(len(common), len(prefix)) and common[length] == prefix[length]:
            length += 1
        common = common[:length]
    return common


def _no_match(option: str, pattern: PathPattern, checkpoint: Checkpoint, what: str) -> NoMatchError:
    """The error for a pattern that matches nothing, with what is there: the keys where the
    pattern's literal part leads, or a ``**/`` pattern that would have matched."""
    hint = ""
    if pattern.segments and not pattern.segments[0].globstar:
        deeper = PathPattern.parse("**/" + pattern.text, option).find(checkpoint.tree)
        if deeper:
            hint = (
                f" (patterns start at the root; '**/{pattern.text}' would match {len(deeper)} path(s), "
                f"e.g. {format_path(deeper[0])!r})"
            )
    if not hint:
        node, walked = checkpoint.tree, list[Key]()
        for segment in pattern.literal_prefix:
            found: Key | None = next((key for key, _ in children(node) if type(key) is str and key == segment), None)
            if found is None:
                found = next((key for key, _ in children(node) if str(key) == segment), None)
            if found is None:
                break
            node = node[found]
            walked.append(found)
        keys = [key for key, _ in children(node)]
        if keys and type(node) in MAPPING_TYPES:
            where = f" of {format_path(tuple(walked))}" if walked else ""
            hint = f" (keys{where}: {first_keys(keys)})"
    return NoMatchError(option, pattern.text, what + hint, file=checkpoint.origin)


def _child(node: Any, segment: str, walked: list[Any], file: Any, select: Select) -> tuple[Any, str | int]:
    """The child a literal segment names: a str key, else an int key or list index it spells."""

    def error(message: str) -> NoMatchError:
        return NoMatchError(select.option, select.path, message, file=file, path=list(walked), option_last=True)

    if isinstance(node, dict):
        if segment in node:
            return node[segment], segment
        if _is_int(segment) and int(segment) in node:
            return node[int(segment)], int(segment)
        raise error(f"no key {segment!r} (keys: {first_keys(list(node), 10)})")
    if isinstance(node, (list, tuple)) and _is_int(segment):
        index = int(segment)
        if 0 <= index < len(node):
            return node[index], index
        raise error(f"index {index} out of range (length {len(node)})")
    raise error(f"cannot select {segment!r} inside a {type(node).__name__}")


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _on_the_walk(segment: str, key: Key) -> bool:
    """Whether ``_child`` may take the child ``key`` for this literal segment of the root's path
    (True where only the container could tell: see ``Select.covers``)."""
    if type(key) is str:
        return key == segment
    if not _is_int(segment):
        return False
    try:
        number = int(segment)
    except ValueError:  # digits int() refuses ('²', '--1'): the walk itself fails on them
        return True
    return key == number or number < 0


def _prune(node: Any, paths: list[Path]) -> Any:
    """``node`` keeping only the sub-trees at ``paths`` (relative; none empty) and their ancestors."""
    whole = {path[0] for path in paths if len(path) == 1}
    deeper: dict[Any, list[Path]] = {}
    for path in paths:
        if len(path) > 1 and path[0] not in whole:
            deeper.setdefault(path[0], []).append(path[1:])
    items = []
    mapping = type(node) in MAPPING_TYPES
    for key, child in children(node):
        if key in whole:
            value = child
        elif key in deeper:
            value = _prune(child, deeper[key])
        else:
            continue
        items.append((key, value) if mapping else value)
    return rebuild(node, items)


def _tensors(node: Any) -> list[TensorRef]:
    out: list[TensorRef] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if type(item) is TensorRef:
            out.append(item)
        else:
            stack.extend(child for _, child in children(item))
    return out


def _node_at(tree: Any, path: TreePath) -> Any:
    node = tree
    for key in path:
        node = node[key]
    return node


def _dropped_subtrees(
    tree: Any, root: Path, node: Any, result: Any, whole: bool, matched: list[Path]
) -> list[dict[str, Any]]:
    """The largest sub-trees the selection leaves out, with the tensors (and bytes) lost: each
    tensor counted once, and none that the result still holds."""
    counted = {id(ref) for ref in _tensors(result)}
    out: list[dict[str, Any]] = []

    def add(path: Path, sub: Any) -> None:
        count, size = tensor_count_and_bytes(sub, counted)
        out.append({"path": RawPath(path), "tensors": count, "bytes": size})

    # siblings along the literal prefix
    walk = tree
    for depth, key in enumerate(root):
        for other, child in children(walk):
            if other != key or type(other) is not type(key):
                add((*root[:depth], other), child)
        walk = walk[key]
    if whole:
        return out
    kept = set(matched)
    above = ancestors(kept)

    def prune_walk(sub: Any, path: Path) -> None:
        for key, child in children(sub):
            child_path = (*path, key)
            if child_path in kept:
                continue
            if child_path in above:
                prune_walk(child, child_path)
            else:
                add(child_path, child)

    prune_walk(node, root)
    return out
