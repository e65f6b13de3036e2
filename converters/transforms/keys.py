"""Key transformations of state_dicts: ``StripPrefix`` (``--strip-prefix``) and ``Rename`` (``--rename``).

Both act on the keys of every *tensor mapping* in the tree: a non-empty dict/OrderedDict with str
keys whose values are all tensors (a model ``state_dict``, wherever it sits: the root, or
``model_state_dict`` of a training checkpoint). They keep the mapping's type, its key order and
every value (the same tensor objects, so tied tensors stay tied), and leave everything else alone:

- Optimizer ``state_dict``s (a mapping with ``state`` and ``param_groups``) are never touched: their
  ``state`` is keyed by int parameter ids and their per-parameter maps by torch's field names
  (``momentum_buffer``, ``exp_avg``), which no DDP prefix or model rename concerns.
- Mappings that mix tensors with other values, or have int keys, are not state_dicts here.

A prefix or rule that changes no key anywhere is an error, and so is a change that makes two keys
of one mapping equal (both are named).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from ..core.tree import Checkpoint
from .base import (
    InvalidOptionError,
    KeyCollisionError,
    NoMatchError,
    Path,
    RawPath,
    Reporting,
    first_keys,
    map_tensor_mappings,
    rebuild,
    replace_tree,
    tensor_mappings,
)
from .paths import format_path

DEFAULT_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile
AUTO = "auto"


class StripPrefix(Reporting):
    """Remove prefixes from the keys of every state_dict (tensor mapping) in the tree.

    ``StripPrefix(["module."])``: each prefix, in order, is removed from every key that starts with
    it; a prefix no key starts with is an error. ``StripPrefix.auto()`` (``--strip-prefix auto``):
    in each state_dict where *every* key starts with ``module.`` or every key with ``_orig_mod.``,
    that prefix is removed, repeatedly (``_orig_mod.module.`` goes too); state_dicts where only some
    keys have it are left as they are, and finding nothing is not an error. The word ``auto`` among
    the prefixes (:meth:`from_options`) runs that step in its place.

    An OrderedDict's ``_metadata`` (per-module versions) is renamed as
    ``torch.nn.modules.utils.consume_prefix_in_state_dict_if_present`` does, so the result equals
    what that function gives.

    >>> from converters.core.sources import BufferSource
    >>> from converters.core.tree import TensorRef
    >>> w = TensorRef("float32", (), BufferSource.of(bytes(4)))
    >>> StripPrefix.auto()(Checkpoint({"_orig_mod.module.w": w, "_orig_mod.module.v": w})).tree.keys()
    dict_keys(['w', 'v'])
    """

    kind = "strip-prefix"

    def __init__(self, prefixes: str | Iterable[str] = (), *, option: str = "--strip-prefix") -> None:
        self.option = option
        steps: tuple[str, ...] = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
        for prefix in steps:
            if not isinstance(prefix, str) or not prefix:
                raise InvalidOptionError(option, str(prefix), "a prefix must be a non-empty string")
        self.arguments = steps
        self.candidates: tuple[str, ...] = DEFAULT_PREFIXES
        self._explicit = True  # the word "auto" is a prefix like any other unless from_options/auto
        self._report = None

    @classmethod
    def auto(cls, candidates: Iterable[str] = DEFAULT_PREFIXES, *, option: str = "--strip-prefix") -> StripPrefix:
        """Strip ``module.``/``_orig_mod.`` wherever every key of a state_dict has it."""
        made = cls((), option=option)
        made.arguments = (AUTO,)
        made.candidates = tuple(candidates)
        made._explicit = False
        return made

    @classmethod
    def from_options(cls, values: Iterable[str], *, option: str = "--strip-prefix") -> StripPrefix:
        """The ``--strip-prefix`` values as given: prefixes, and the word ``auto`` for the automatic step."""
        made = cls(tuple(values), option=option)
        made._explicit = False
        return made

    @property
    def automatic(self) -> bool:
        return not self._explicit and AUTO in self.arguments

    def __call__(self, checkpoint: Checkpoint) -> Checkpoint:
        removed: list[dict[str, Any]] = []
        matched = dict.fromkeys((p for p in self.arguments if self._explicit or p != AUTO), 0)

        def strip(path: Path, mapping: Any) -> Any:
            keys = list(mapping)
            metadata = getattr(mapping, "_metadata", None) if type(mapping) is OrderedDict else None
            for step in self.arguments:
                if step == AUTO and not self._explicit:
                    while (prefix := self._auto_prefix(keys)) is not None:
                        keys = self._strip(keys, prefix, path, checkpoint)
                        metadata = _strip_metadata(metadata, prefix)
                        removed.append({"path": RawPath(path), "prefix": prefix, "keys": len(keys)})
                    continue
                count = sum(key.startswith(step) for key in keys)
                if count:
                    matched[step] += count
                    keys = self._strip(keys, step, path, checkpoint, step)
                    metadata = _strip_metadata(metadata, step)
                    removed.append({"path": RawPath(path), "prefix": step, "keys": count})
            if keys == list(mapping):
                return mapping
            out = rebuild(mapping, zip(keys, mapping.values(), strict=True))
            if metadata is not None:
                out._metadata = metadata
            return out

        tree = map_tensor_mappings(checkpoint.tree, strip)
        for prefix, count in matched.items():
            if not count:
                raise NoMatchError(self.option, prefix, _no_key_starts(checkpoint), file=checkpoint.origin)
        self._report = {"removed": _merge_removed(removed)}
        return replace_tree(checkpoint, tree)

    def _auto_prefix(self, keys: list[str]) -> str | None:
        for prefix in self.candidates:
            if all(key.startswith(prefix) and len(key) > len(prefix) for key in keys):
                return prefix
        return None

    def _strip(
        self, keys: list[str], prefix: str, path: Path, checkpoint: Checkpoint, argument: str | None = None
    ) -> list[str]:
        argument = AUTO if argument is None else argument
        out = [key[len(prefix) :] if key.startswith(prefix) else key for key in keys]
        for old, new in zip(keys, out, strict=True):
            if old is new:
                continue
            if not new:
                raise InvalidOptionError(
                    self.option, argument, f"would leave the key {old!r} empty", file=checkpoint.origin, path=path
                )
            if not prefix.endswith(".") and new.startswith("."):
                raise InvalidOptionError(
                    self.option,
                    argument,
                    f"would turn {old!r} into {new!r}; did you mean {prefix + '.'!r}?",
                    file=checkpoint.origin,
                    path=path,
                )
        _check_collisions(keys, out, self.option, argument, checkpoint, path)
        return out

    def summary(self) -> str:
        text = super().summary()
        report = self.report()
        if report is None:
            return text
        removed = report["removed"]
        if not removed:
            return f"{text}: no state_dict has a prefix on every key; nothing removed"
        parts = [f"{item['prefix']!r} from {item['keys']} keys of {item['path'] or '<root>'}" for item in removed]
        return f"{text}: removed " + "; ".join(parts)


def _merge_removed(removed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive removals from one mapping in one entry: ``_orig_mod.`` then ``module.`` is
    ``_orig_mod.module.``."""
    merged: list[dict[str, Any]] = []
    for item in removed:
        if merged and merged[-1]["path"] == item["path"] and merged[-1]["keys"] == item["keys"]:
            merged[-1] = {**merged[-1], "prefix": merged[-1]["prefix"] + item["prefix"]}
        else:
            merged.append(dict(item))
    return merged


def _strip_metadata(metadata: Any, prefix: str) -> Any:
    """``consume_prefix_in_state_dict_if_present``'s renaming of ``_metadata``, on a copy."""
    if metadata is None or not hasattr(metadata, "keys"):
        return metadata
    out = type(metadata)(metadata)
    for key in list(out.keys()):
        if not isinstance(key, str) or len(key) == 0:
            continue
        if key == prefix.replace(".", "") or key.startswith(prefix):
            out[key[len(prefix) :]] = out.pop(key)
    return out


def _no_key_starts(checkpoint: Checkpoint) -> str:
    found = list(tensor_mappings(checkpoint.tree))
    if not found:
        return "no state_dict in the checkpoint (no mapping whose values are all tensors)"
    path, mapping = found[0]
    where = f" of {format_path(path)}" if path else ""
    return f"no key of a state_dict starts with it (keys{where}: {first_keys(list(mapping))})"


def _check_collisions(
    old: list[Any], new: list[Any], option: str, argument: str | None, checkpoint: Checkpoint, path: Path
) -> None:
    seen: dict[Any, Any] = {}
    for before, after in zip(old, new, strict=True):
        if after in seen:
            raise KeyCollisionError(
                option,
                argument,
                f"{seen[after]!r} and {before!r} would both become {after!r}",
                file=checkpoint.origin,
                path=path,
            )
        seen[after] = before


# ------------------------------------------------------------------------------ rename


def split_rule(rule: str, option: str = "--rename") -> tuple[str, str]:
    """``'REGEX=REPLACEMENT'`` split on the first ``=`` not escaped by a backslash.

    A literal ``=`` in the regex is written ``\\=`` (Python's ``re`` reads ``\\=`` as ``=``, so the
    regex is used exactly as written); the replacement may hold any ``=``.

    >>> split_rule(r"^module\\.=")
    ('^module\\\\.', '')
    >>> split_rule(r"a\\=b=c=d")
    ('a\\\\=b', 'c=d')
    """
    position = 0
    while position < len(rule):
        char = rule[position]
        if char == "\\":
            position += 2
            continue
        if char == "=":
            return rule[:position], rule[position + 1 :]
        position += 1
    raise InvalidOptionError(option, rule, "expected REGEX=REPLACEMENT (write a literal '=' in the regex as '\\=')")


class Rename(Reporting):
    """Rename the keys of every state_dict (tensor mapping) with regex rules, applied in order.

    Each rule is ``'REGEX=REPLACEMENT'`` (Python ``re`` syntax; see :func:`split_rule`) or a
    ``(regex, replacement)`` pair, applied to each key as ``re.sub`` does (every non-overlapping
    match; ``\\1``/``\\g<name>`` in the replacement). A rule sees the keys the previous rules made.
    Errors: an invalid regex or replacement (at construction), a rule that matches no key, two keys
    of one mapping that end up equal (both named), an empty key. OrderedDict ``_metadata`` is kept
    as it is.

    >>> from converters.core.sources import BufferSource
    >>> from converters.core.tree import TensorRef
    >>> w = TensorRef("float32", (), BufferSource.of(bytes(4)))
    >>> list(Rename([r"^fc(\\d)\\.=head\\1."])(Checkpoint({"fc1.weight": w, "conv.bias": w})).tree)
    ['head1.weight', 'conv.bias']
    """

    kind = "rename"

    def __init__(self, rules: str | Iterable[str | tuple[str, str]], *, option: str = "--rename") -> None:
        self.option = option
        items = (rules,) if isinstance(rules, str) else tuple(rules)
        if not items:
            raise InvalidOptionError(option, None, "needs at least one REGEX=REPLACEMENT rule")
        texts: list[str] = []
        compiled: list[tuple[re.Pattern[str], str]] = []
        for item in items:
            if isinstance(item, str):
                text = item
                regex, replacement = split_rule(item, option)
            else:
                regex, replacement = item
                text = f"{regex}={replacement}"
            if not regex:
                raise InvalidOptionError(option, text, "empty regex (to add a prefix to every key, use '^=PREFIX')")
            try:
                pattern = re.compile(regex)
            except re.error as error:
                raise InvalidOptionError(option, text, f"invalid regex: {error}") from None
            try:
                pattern.sub(replacement, "")  # parses the replacement: bad group references fail here
            except (re.error, IndexError) as error:
                raise InvalidOptionError(option, text, f"invalid replacement: {error}") from None
            texts.append(text)
            compiled.append((pattern, replacement))
        self.arguments = tuple(texts)
        self.rules = tuple(compiled)
        self._report = None

    def __call__(self, checkpoint: Checkpoint) -> Checkpoint:
        matched = [0] * len(self.rules)
        renamed: list[dict[str, Any]] = []

        def rename(path: Path, mapping: Any) -> Any:
            keys = list(mapping)
            last_rule: dict[str, int] = {}
            out = []
            for key in keys:
                new = key
                for index, (pattern, replacement) in enumerate(self.rules):
                    if pattern.search(new) is None:
                        continue
                    matched[index] += 1
                    changed = pattern.sub(replacement, new)
                    if changed != new:
                        last_rule[key] = index
                    new = changed
                if not new:
                    raise InvalidOptionError(
                        self.option,
                        self.arguments[last_rule.get(key, 0)],
                        f"would leave the key {key!r} empty",
                        file=checkpoint.origin,
                        path=path,
                    )
                out.append(new)
            seen: dict[str, str] = {}
            for before, after in zip(keys, out, strict=True):
                if after in seen:
                    first = seen[after]
                    rule = last_rule.get(before, last_rule.get(first, 0))
                    raise KeyCollisionError(
                        self.option,
                        self.arguments[rule],
                        f"{first!r} and {before!r} would both become {after!r}",
                        file=checkpoint.origin,
                        path=path,
                    )
                seen[after] = before
            changes = [(a, b) for a, b in zip(keys, out, strict=True) if a != b]
            if not changes:
                return mapping
            for before, after in changes:
                renamed.append({"path": RawPath((*path, before)), "to": RawPath((*path, after))})
            return rebuild(mapping, zip(out, mapping.values(), strict=True))

        tree = map_tensor_mappings(checkpoint.tree, rename)
        for index, count in enumerate(matched):
            if not count:
                raise NoMatchError(
                    self.option, self.arguments[index], _no_key_matches(checkpoint, index), file=checkpoint.origin
                )
        self._report = {
            "rules": [{"rule": text, "matched": count} for text, count in zip(self.arguments, matched, strict=True)],
            "renamed": renamed,
        }
        return replace_tree(checkpoint, tree)

    def summary(self) -> str:
        text = super().summary()
        if self._report is None:
            return text
        return f"{text}: renamed {len(self._report['renamed'])} key(s)"


def _no_key_matches(checkpoint: Checkpoint, index: int) -> str:
    found = list(tensor_mappings(checkpoint.tree))
    if not found:
        return "no state_dict in the checkpoint (no mapping whose values are all tensors)"
    path, mapping = found[0]
    where = f" of {format_path(path)}" if path else ""
    after = " (after the rules before it)" if index else ""
    return f"matches no key{after} (keys{where}: {first_keys(list(mapping))})"
