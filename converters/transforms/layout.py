"""``Layout`` (``--layout flax|mlx|RULES.json|torch``): PyTorch state_dicts as another framework's parameter tree.

A *layout* is a table of rules (``converters/layouts/flax.json``, ``mlx.json``, or a user's JSON
file; ``schemas/layouts.md``): each rule names the state_dict keys it applies to (a regex, and the
tensor ranks it takes), where the tensor goes (a key, or a path in nested dicts) and the axis
permutation its bytes get (``[1, 0]``: ``nn.Linear.weight [out, in]`` → ``nn.Dense``'s
``kernel [in, out]``). The first rule that matches a key wins. Nothing here knows a model.

- ``Layout("flax")`` rewrites every state_dict in the tree (a mapping of str keys to tensors; an
  optimizer state is left alone) into the layout's tree, permuting bytes where a rule says so. The
  permutation is :class:`PermuteSource`: a byte source that reads one tensor, permutes it and hands
  out the result in bounded blocks as the writer pulls them, so one tensor at a time is in memory,
  never the checkpoint. Tensors a rule leaves as they are keep their bytes (and their digest: a
  kernel copy).
- What was done is recorded in the checkpoint's own metadata under ``sdconvert_layout`` (JSON
  text: the layout's name and, per state_dict, each key with its new path and permutation, its
  container type and ``_metadata``), which every format that carries a file's metadata stores
  (msgpack, safetensors, shard folders, pt, ONNX), ``inspect`` shows and the tree digest covers.
  Applying a layout to a checkpoint that records one is refused, naming it: a second pass would
  permute its tensors again (the double transpose).
- ``Layout("torch")`` undoes the recorded layout: the inverse permutations, the original keys in
  their order, the ``OrderedDict`` and its ``_metadata``, and ties the layout had to separate (a
  tied tensor permuted at one path and not at the other) tied again when their bytes still agree.
  A permutation only moves bytes, so the tensors come back bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path as FilePath
from typing import Any

from ..core import dtypes, manifests
from ..core.errors import ConverterError, CorruptFileError, TreePath
from ..core.integrity import crc_message, records_of, verify_record
from ..core.sources import CHUNK_SIZE, ByteSource, FileRange, fill_from_chunks
from ..core.transfer import Checks
from ..core.tree import MAPPING_TYPES, Checkpoint, TensorRef, walk
from .base import (
    InvalidOptionError,
    KeyCollisionError,
    NoMatchError,
    Path,
    RawPath,
    Reporting,
    TracksOrigins,
    TransformError,
    first_keys,
    map_tensor_mappings,
    rebuild,
    tensor_mappings,
)
from .paths import format_path

LAYOUT_KEY = "sdconvert_layout"  # the checkpoint's own metadata key that records a layout
TORCH = "torch"  # --layout torch: back to PyTorch's layout
BUILTIN = ("flax", "mlx")
RULES_VERSION = 1
RECORD_VERSION = 1
TREES = ("nested", "flat")
# A permuted block of this many bytes at most is made at a time (besides the tensor itself).
BLOCK_BYTES = 4 << 20
TILE = 64  # output columns per copy when the source is read across its rows (see _copy_block)
_GROUP = re.compile(r"\{(\w+)\}")
_NUMERIC = re.compile(r"[0-9]+")
_RULES_FIELDS = frozenset(
    {"layout", "version", "description", "container", "tree", "index", "root_index", "rules", "extends"}
)
_RULE_FIELDS = frozenset({"name", "why", "key", "ndim", "to", "permute"})


# ------------------------------------------------------------------------------ the rules table


@dataclass(frozen=True)
class Rule:
    """One row of a layout table: keys matching ``key`` (a regex matched against the whole key) of
    a rank in ``ndim`` (any rank when None) go to ``to``, their axes permuted by ``permute``."""

    name: str
    key: re.Pattern[str]
    to: str
    ndim: frozenset[int] | None = None
    permute: tuple[int, ...] | None = None
    why: str = ""

    def match(self, key: str, ndim: int) -> re.Match[str] | None:
        if self.ndim is not None and ndim not in self.ndim:
            return None
        return self.key.fullmatch(key)

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "why": self.why, "key": self.key.pattern, "to": self.to}
        if self.ndim is not None and self.permute is None:
            row["ndim"] = sorted(self.ndim)
        if self.permute is not None:
            row["permute"] = list(self.permute)
        return row


@dataclass(frozen=True)
class LayoutRules:
    """A layout's table (see ``schemas/layouts.md``): its name, how its tree is shaped and its rules.

    ``tree``: ``nested`` (a target ``a/{module}/kernel`` is a path in nested dicts; the module path
    ``layer1.0.conv1`` becomes the keys ``layer1_0``, ``conv1``, an index named by ``index``) or
    ``flat`` (a target is one key, as in a state_dict).

    >>> rules = LayoutRules.load("flax")
    >>> rule, groups = rules.match("layer1.0.conv1.weight", 4)
    >>> rule.name, rule.permute, rules.target(rule, groups)
    ('conv2d', (2, 3, 1, 0), ('params', 'layer1_0', 'conv1', 'kernel'))
    """

    layout: str
    rules: tuple[Rule, ...]
    tree: str = "nested"
    index: str = "{name}_{index}"
    root_index: str = "layers_{index}"
    description: str = ""
    container: str | None = None
    version: int = RULES_VERSION
    origin: str = ""  # where the table was read from: a built-in's name or a file's path

    @classmethod
    def load(cls, spec: str | FilePath, *, option: str = "--layout", _chain: tuple[str, ...] = ()) -> LayoutRules:
        """A built-in table by name (``flax``, ``mlx``) or a JSON file by path."""
        text, origin = _rules_text(spec, option)
        if origin in _chain:
            raise InvalidOptionError(
                option, _chain[0], f"'extends' goes round in a circle: {' → '.join(_chain)} → {origin}"
            )
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidOptionError(option, str(spec), f"not a JSON rules table: {exc}") from None
        return cls.from_dict(data, origin=origin, option=option, argument=str(spec), _chain=(*_chain, origin))

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        origin: str = "",
        option: str = "--layout",
        argument: str | None = None,
        _chain: tuple[str, ...] = (),
    ) -> LayoutRules:
        """A table from its JSON form; ``extends`` (a built-in's name or a path) adds that table's
        rules after these and takes its settings where these give none."""
        argument = origin if argument is None else argument

        def bad(message: str) -> InvalidOptionError:
            return InvalidOptionError(option, argument, message)

        if type(data) is not dict:
            raise bad("a rules table is a JSON object")
        unknown = sorted(set(data) - _RULES_FIELDS)
        if unknown:
            raise bad(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(_RULES_FIELDS))})")
        base: LayoutRules | None = None
        if "extends" in data:
            if type(data["extends"]) is not str:
                raise bad("'extends' names a built-in layout or a rules file")
            if data["extends"] == TORCH:
                raise bad("'extends' cannot name torch (it is not a table)")
            base = cls.load(data["extends"], option=option, _chain=_chain or (origin or "<table>",))
        name = data.get("layout", base.layout if base and "layout" not in data else None)
        if type(name) is not str or not name or name == TORCH:
            raise bad("'layout' must name the layout (a non-empty string other than 'torch')")
        if base is not None and name == base.layout:
            raise bad(f"a table that extends {base.layout!r} needs a name of its own in 'layout'")
        version = data.get("version", RULES_VERSION)
        if type(version) is not int or version != RULES_VERSION:
            raise bad(f"'version' must be {RULES_VERSION}")
        texts = {}
        for field_name in ("description", "container", "tree", "index", "root_index"):
            value = data.get(field_name)
            if value is not None and type(value) is not str:
                raise bad(f"{field_name!r} must be a string")
            texts[field_name] = value
        tree = texts["tree"] or (base.tree if base else "nested")
        if tree not in TREES:
            raise bad(f"'tree' must be one of {', '.join(TREES)}")
        index = texts["index"] or (base.index if base else "{name}_{index}")
        root_index = texts["root_index"] or (base.root_index if base else "layers_{index}")
        if not index.startswith("{name}") or "{index}" not in index:
            raise bad("'index' must start with {name} and hold {index} ('{name}_{index}', '{name}/layers_{index}')")
        if "{index}" not in root_index or "{name}" in root_index:
            raise bad("'root_index' must hold {index} and not {name} ('layers_{index}')")
        rows = data.get("rules", [])
        if type(rows) is not list or (not rows and base is None):
            raise bad("'rules' must be a non-empty list of rules")
        rules = tuple(_rule(row, number, tree, bad) for number, row in enumerate(rows, 1))
        return cls(
            layout=name,
            rules=rules + (base.rules if base else ()),
            tree=tree,
            index=index,
            root_index=root_index,
            description=texts["description"] or (base.description if base else ""),
            container=texts["container"] or (base.container if base else None),
            origin=origin,
        )

    def match(self, key: str, ndim: int) -> tuple[Rule, dict[str, str]] | None:
        """The first rule for ``key`` (of rank ``ndim``) and its regex's named groups ("" for a
        group that did not take part)."""
        for rule in self.rules:
            found = rule.match(key, ndim)
            if found is not None:
                return rule, {name: value or "" for name, value in found.groupdict().items()}
        return None

    def target(self, rule: Rule, groups: dict[str, str]) -> tuple[str, ...]:
        """Where a key matched by ``rule`` goes: a path in the nested tree, or one flat key."""
        if self.tree == "flat":
            key = _fill(rule.to, groups)
            return (key,) if key else ()
        path: list[str] = []
        for part in rule.to.split("/"):
            if part == "{module}":
                path += self.module_path(groups.get("module", ""))
                continue
            text = _fill(part, groups)
            if not text:
                return ()  # an empty segment: the caller reports it
            path.append(text)
        return tuple(path)

    def module_path(self, module: str) -> list[str]:
        """``layer1.0.conv1`` as nested keys: each number joined to the segment before it by
        ``index`` (``layer1_0``), or named by ``root_index`` when it comes first (``layers_0``)."""
        path: list[str] = []
        for segment in module.split(".") if module else ():
            if _NUMERIC.fullmatch(segment):
                if path:
                    named = self.index.replace("{name}", path.pop()).replace("{index}", segment)
                else:
                    named = self.root_index.replace("{index}", segment)
                path += named.split("/")
            else:
                path.append(segment)
        return path

    def as_dict(self) -> dict[str, Any]:
        """The table in its JSON form (``extends`` resolved)."""
        data: dict[str, Any] = {"layout": self.layout, "version": self.version, "description": self.description}
        if self.container:
            data["container"] = self.container
        data["tree"] = self.tree
        if self.tree == "nested":
            data["index"], data["root_index"] = self.index, self.root_index
        data["rules"] = [rule.as_dict() for rule in self.rules]
        return data


def _rules_text(spec: str | FilePath, option: str) -> tuple[str, str]:
    name = str(spec)
    if name in BUILTIN:
        return resources.files("converters").joinpath("layouts", f"{name}.json").read_text("utf-8"), name
    path = FilePath(spec)
    if path.suffix.lower() != ".json" and not path.exists():
        raise InvalidOptionError(
            option, name, f"expected {', '.join(BUILTIN)}, {TORCH} (back to PyTorch's layout) or a JSON rules file"
        )
    try:
        return path.read_text("utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidOptionError(option, name, f"cannot read the rules file: {exc}") from None


def _rule(row: Any, number: int, tree: str, bad: Callable[[str], InvalidOptionError]) -> Rule:
    where = f"rule {number}"
    if type(row) is not dict:
        raise bad(f"{where} must be an object")
    unknown = sorted(set(row) - _RULE_FIELDS)
    if unknown:
        raise bad(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(_RULE_FIELDS))})")
    name = row.get("name", where)
    if type(name) is not str:
        raise bad(f"{where}: 'name' must be a string")
    where = f"rule {number} ({name})"
    for required in ("key", "to"):
        if type(row.get(required)) is not str or not row[required]:
            raise bad(f"{where}: {required!r} must be a non-empty string")
    try:
        pattern = re.compile(row["key"])
    except re.error as exc:
        raise bad(f"{where}: invalid regex in 'key': {exc}") from None
    groups = set(pattern.groupindex)
    used = set(_GROUP.findall(row["to"]))
    if used - groups:
        raise bad(f"{where}: 'to' names {{{sorted(used - groups)[0]}}}, which 'key' has no group for")
    if tree == "flat" and "/" in _GROUP.sub("", row["to"]):
        raise bad(f"{where}: a flat layout's target is one key (no '/')")
    ndim = row.get("ndim")
    if ndim is not None:
        ranks = [ndim] if type(ndim) is int else ndim
        if type(ranks) is not list or not ranks or any(type(r) is not int or not 0 <= r <= 64 for r in ranks):
            raise bad(f"{where}: 'ndim' must be a rank (0-64) or a list of ranks")
        ndim = frozenset(ranks)
    permute = row.get("permute")
    if permute is not None:
        if type(permute) is not list or sorted(permute) != list(range(len(permute))) or not permute:
            raise bad(f"{where}: 'permute' must list the axes 0..n-1 in their new order, each once")
        if any(type(axis) is not int for axis in permute):
            raise bad(f"{where}: 'permute' must list ints")
        if ndim is not None and ndim != {len(permute)}:
            raise bad(f"{where}: a permutation of {len(permute)} axes applies to rank {len(permute)} only")
        ndim, permute = frozenset({len(permute)}), tuple(permute)
        if permute == tuple(range(len(permute))):
            permute = None
    why = row.get("why", "")
    if type(why) is not str:
        raise bad(f"{where}: 'why' must be a string")
    return Rule(name=name, key=pattern, to=row["to"], ndim=ndim, permute=permute, why=why)


def _fill(template: str, groups: dict[str, str]) -> str:
    return _GROUP.sub(lambda found: groups.get(found.group(1), ""), template)


# ------------------------------------------------------------------------------ the byte source


def permuted_shape(shape: tuple[int, ...], permute: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[axis] for axis in permute)


def inverse(permute: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``permute``.

    >>> inverse((2, 3, 1, 0))
    (3, 2, 0, 1)
    """
    out = [0] * len(permute)
    for position, axis in enumerate(permute):
        out[axis] = position
    return tuple(out)


@dataclass(frozen=True)
class PermuteSource:
    """The bytes of ``source`` (a C-order ``dtype`` tensor of ``shape``) with its axes permuted
    (``numpy.transpose(a, permute)``, in C order), made as they are read.

    The source tensor is read whole into memory (its zip record's CRC-32 checked, and with
    ``check_digest`` its stored BLAKE3 digest, before anything is handed out: a permutation never
    launders a flipped bit into a fresh digest), then permuted block by block: at most one tensor
    and ``block_bytes`` of output at a time, whatever the checkpoint's size.

    >>> from converters.core.sources import BufferSource, read_all
    >>> source = PermuteSource(BufferSource.of(bytes(range(6))), "uint8", (2, 3), (1, 0))
    >>> list(read_all(source)), source.shape_after
    ([0, 3, 1, 4, 2, 5], (3, 2))
    """

    source: ByteSource
    dtype: str
    shape: tuple[int, ...]
    permute: tuple[int, ...]
    source_digest: str | None = field(default=None, compare=False)
    check_digest: bool = field(default=False, compare=False)
    block_bytes: int = field(default=BLOCK_BYTES, compare=False)

    def __post_init__(self) -> None:
        if sorted(self.permute) != list(range(len(self.shape))):
            raise ConverterError(f"{list(self.permute)} is not a permutation of the axes of {list(self.shape)}")
        if self.source.nbytes != dtypes.numel(self.shape) * dtypes.itemsize(self.dtype):
            raise ConverterError(f"a {self.dtype}{list(self.shape)} source holds {self.source.nbytes} bytes")

    @property
    def nbytes(self) -> int:
        return self.source.nbytes

    @property
    def shape_after(self) -> tuple[int, ...]:
        return permuted_shape(self.shape, self.permute)

    def readinto(self, buffer: memoryview) -> None:
        fill_from_chunks(self, buffer)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        """The permuted bytes in order, each chunk at most ``chunk_size`` long; a chunk's memory is
        reused once the next one is asked for."""
        for block in self._blocks():
            view = memoryview(block).cast("B")
            for start in range(0, len(view), chunk_size):
                yield view[start : start + chunk_size]

    def _blocks(self) -> Iterator[Any]:
        import numpy as np

        if self.nbytes == 0:
            return
        itemsize = dtypes.itemsize(self.dtype)
        element = np.dtype(f"V{itemsize}") if itemsize not in (1, 2, 4, 8) else np.dtype(f"u{itemsize}")
        array = np.frombuffer(self._read(), dtype=element).reshape(self.shape).transpose(self.permute)
        limit = max(self.block_bytes, itemsize)
        buffer = np.empty(min(array.size, limit // itemsize), dtype=element)  # reused by every block
        for part in _pieces(array, limit):
            yield _copy_block(np, part, buffer)

    def _read(self) -> bytearray:
        """The source bytes, checked against what their container and file store."""
        source = self.source
        whole = source.record if isinstance(source, FileRange) and source.is_whole_record else None
        for record in records_of(source):
            if record is not whole:
                verify_record(record)  # part of a record: the whole record is checked first
        buffer = bytearray(self.nbytes)
        source.readinto(memoryview(buffer))
        checks = Checks.make(crc=whole is not None, digest=self.check_digest and self.source_digest is not None)
        if checks.needed:
            checks.update(memoryview(buffer))
        if whole is not None and checks.crc != whole.crc32:
            raise CorruptFileError(crc_message(whole, checks.crc or 0), file=whole.path)
        actual = checks.hexdigest()
        if actual is not None and actual != self.source_digest:
            raise CorruptFileError(
                f"the bytes being permuted do not match their stored BLAKE3 digest "
                f"(stored {self.source_digest}, bytes hash to {actual})"
            )
        return buffer


def _pieces(view: Any, limit: int) -> Iterator[Any]:
    """``view`` (any strides) cut into sub-views that are, in order, its C-order bytes: each at most
    ``limit`` bytes (or one element, if that is more)."""
    if view.nbytes <= limit:
        yield view
        return
    if view.ndim == 1:
        step = max(1, limit // view.itemsize)
        for start in range(0, len(view), step):
            yield view[start : start + step]
        return
    row = view[0].nbytes
    if row <= limit:
        step = max(1, limit // max(row, 1))
        for start in range(0, len(view), step):
            yield view[start : start + step]
        return
    for index in range(len(view)):
        yield from _pieces(view[index], limit)


def _copy_block(np: Any, part: Any, buffer: Any) -> Any:
    """``part`` copied into the start of ``buffer``, C-contiguous. When its last axis is strided in
    the source (a transpose reads each output row across the source's rows), the copy goes
    ``TILE`` columns at a time, so the source lines it reads stay in cache from one output row to
    the next: about twice as fast as one strided copy (measured on a 2048 × 2048 transpose)."""
    out = buffer[: part.size].reshape(part.shape)
    if part.ndim >= 2 and part.strides[-1] != part.itemsize and part.shape[-1] > TILE:
        for start in range(0, part.shape[-1], TILE):
            out[..., start : start + TILE] = part[..., start : start + TILE]
    else:
        np.copyto(out, part)
    return out


# ------------------------------------------------------------------------------ the transform


class Layout(TracksOrigins, Reporting):
    """Put every state_dict in ``layout`` (a built-in's name, a rules file, a :class:`LayoutRules`),
    or with ``"torch"`` give back PyTorch's layout from the one the checkpoint records (see the
    module docstring). ``check``: hash the source bytes of each permutation against the digest
    their file stores (as ``convert(check=True)`` does for copies).

    >>> from converters.core.sources import BufferSource, read_all
    >>> weight = TensorRef("float32", (2, 3), BufferSource.of(bytes(range(24))))
    >>> flax = Layout("flax")(Checkpoint({"fc.weight": weight}))
    >>> kernel = flax.tree["params"]["fc"]["kernel"]
    >>> kernel.shape, LAYOUT_KEY in flax.file_metadata
    ((3, 2), True)
    >>> back = Layout("torch")(flax)
    >>> bytes(read_all(back.tree["fc.weight"].source)) == bytes(range(24)), back.file_metadata
    (True, None)
    """

    kind = "layout"

    def __init__(
        self, layout: str | FilePath | LayoutRules = "flax", *, check: bool = False, option: str = "--layout"
    ) -> None:
        self.option = option
        self.check = check
        if isinstance(layout, LayoutRules):
            self.rules: LayoutRules | None = layout
            self.arguments = (layout.layout,)
        elif str(layout) == TORCH:
            self.rules = None
            self.arguments = (TORCH,)
        else:
            self.rules = LayoutRules.load(layout, option=option)
            self.arguments = (str(layout),)
        self._report = None

    @property
    def undoes(self) -> bool:
        """``--layout torch``: undo the recorded layout (runs before the other options)."""
        return self.rules is None

    def __call__(self, checkpoint: Checkpoint) -> Checkpoint:
        self._forget_origins()
        recorded = recorded_layout(checkpoint)
        if self.rules is None:
            if recorded is None:
                raise TransformError(
                    self.option,
                    TORCH,
                    f"the checkpoint records no layout (no {LAYOUT_KEY!r} in its metadata): its state_dicts "
                    "are in PyTorch's layout already, there is nothing to undo",
                    file=checkpoint.origin,
                )
            return self._undo(checkpoint, recorded)
        if recorded is not None:
            raise TransformError(
                self.option,
                self.arguments[0],
                f"the checkpoint is already in the {recorded['layout']!r} layout (its metadata records it "
                f"under {LAYOUT_KEY!r}): applying {self.rules.layout!r} on top would permute its tensors a "
                "second time; convert with --layout torch first to get PyTorch's layout back",
                file=checkpoint.origin,
            )
        return self._apply(checkpoint, self.rules)

    # --------------------------------------------------------------------------- applying

    def _apply(self, checkpoint: Checkpoint, rules: LayoutRules) -> Checkpoint:
        mappings = list(tensor_mappings(checkpoint.tree))
        if not mappings:
            raise NoMatchError(
                self.option,
                self.arguments[0],
                "no state_dict (a mapping of str keys to tensors) in the checkpoint to lay out",
                file=checkpoint.origin,
            )
        first_place: dict[int, tuple[int, str]] = {}  # id(tensor) -> (state_dict index, key) of its first place
        made: dict[tuple[int, tuple[int, ...] | None], TensorRef] = {}
        new_of: dict[tuple[int, str], TensorRef] = {}
        results: dict[Path, Any] = {}
        records: list[dict[str, Any]] = []
        moved: list[dict[str, Any]] = []
        for number, (path, mapping) in enumerate(mappings):
            out: dict[str, Any] = {}
            owners: dict[tuple[str, ...], str] = {}
            entries: list[list[Any]] = []
            for key, ref in mapping.items():
                found = rules.match(key, len(ref.shape))
                if found is None:
                    raise NoMatchError(
                        self.option,
                        self.arguments[0],
                        f"no rule of the {rules.layout!r} layout ({rules.origin}) takes {key!r} "
                        f"({ref.dtype}{list(ref.shape)}); add one in a rules file (schemas/layouts.md)",
                        file=checkpoint.origin,
                        path=path,
                    )
                rule, groups = found
                target = rules.target(rule, groups)
                if not target:
                    raise TransformError(
                        self.option,
                        self.arguments[0],
                        f"rule {rule.name!r} makes an empty key of {key!r}",
                        file=checkpoint.origin,
                        path=path,
                    )
                new = made.get((id(ref), rule.permute))
                if new is None:
                    new = ref if rule.permute is None else self._permuted(ref, rule.permute)
                    made[(id(ref), rule.permute)] = new
                _place(out, target, new, key, owners, self, checkpoint, path)
                entry: list[Any] = [key, list(target), None if rule.permute is None else list(rule.permute)]
                tied = first_place.setdefault(id(ref), (number, key))
                if tied != (number, key) and new_of[tied] is not new:
                    entry.append([tied[0], tied[1]])  # a tie the permutation separated
                new_of[(number, key)] = new
                entries.append(entry)
                moved.append(
                    {
                        "path": RawPath((*path, *target)),
                        "from": RawPath((*path, key)),
                        "rule": rule.name,
                        "permute": None if rule.permute is None else list(rule.permute),
                        "shape_before": list(ref.shape),
                        "shape": list(new.shape),
                    }
                )
            record: dict[str, Any] = {"path": list(path), "container": _container(mapping), "tensors": entries}
            if type(mapping) is OrderedDict and hasattr(mapping, "_metadata"):
                record["metadata"] = manifests.encode_tree(mapping._metadata, {})
            records.append(record)
            results[path] = out
        tree = map_tensor_mappings(checkpoint.tree, lambda path, _mapping: results[path])
        text = json.dumps(
            {"layout": rules.layout, "version": RECORD_VERSION, "rules": rules.origin, "state_dicts": records},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        metadata = {**(checkpoint.file_metadata or {}), LAYOUT_KEY: text}
        self._report = {
            "direction": "apply",
            "layout": rules.layout,
            "rules": rules.origin,
            "state_dicts": [RawPath(path) for path, _ in mappings],
            "tensors": moved,
        }
        return dataclasses.replace(checkpoint, tree=tree, tree_digest=None, file_metadata=metadata)

    def _permuted(self, ref: TensorRef, permute: tuple[int, ...]) -> TensorRef:
        source = PermuteSource(ref.source, ref.dtype, ref.shape, permute, ref.digest, self.check)
        new = ref.derive(shape=source.shape_after, source=source)
        self._made_from(new, ref)
        return new

    # --------------------------------------------------------------------------- undoing

    def _undo(self, checkpoint: Checkpoint, record: dict[str, Any]) -> Checkpoint:
        tree = checkpoint.tree
        made: dict[tuple[int, tuple[int, ...] | None], TensorRef] = {}
        restored: list[Any] = []
        moved: list[dict[str, Any]] = []
        ties: list[tuple[int, str, int, str]] = []
        for number, state_dict in enumerate(record["state_dicts"]):
            path = tuple(state_dict["path"])
            node = _get(tree, path)
            if type(node) not in MAPPING_TYPES:
                raise self._stale(checkpoint, path, "is not there (or is no longer a mapping)")
            out: Any = OrderedDict() if state_dict["container"] == "odict" else dict()
            if "metadata" in state_dict:
                out._metadata = manifests.decode_tree(state_dict["metadata"], _no_tensor, file=checkpoint.origin)
            named: set[tuple[str | int, ...]] = set()
            for entry in state_dict["tensors"]:
                key, target, permute = entry[0], tuple(entry[1]), entry[2]
                ref = _get(node, target)
                if type(ref) is not TensorRef:
                    raise self._stale(checkpoint, (*path, *target), f"holds no tensor (the layout put {key!r} there)")
                named.add(target)
                back = None if permute is None else inverse(tuple(permute))
                if back is not None and len(back) != len(ref.shape):
                    raise self._stale(
                        checkpoint, (*path, *target), f"has {len(ref.shape)} axes, the layout permuted {len(back)}"
                    )
                new = made.get((id(ref), back))
                if new is None:
                    new = ref if back is None else self._permuted(ref, back)
                    made[(id(ref), back)] = new
                out[key] = new
                if len(entry) > 3:
                    ties.append((number, key, entry[3][0], entry[3][1]))
                moved.append(
                    {
                        "path": RawPath((*path, key)),
                        "from": RawPath((*path, *target)),
                        "permute": None if back is None else list(back),
                        "shape_before": list(ref.shape),
                        "shape": list(new.shape),
                    }
                )
            extra = [leaf_path for leaf_path, leaf in walk(node) if tuple(leaf_path) not in named]
            if extra:
                raise self._stale(
                    checkpoint,
                    (*path, *extra[0]),
                    f"is not in the recorded layout ({len(extra)} such place(s)); it was added after the layout "
                    "was applied",
                )
            restored.append(out)
        retied, untied = self._retie(restored, ties)
        for state_dict, out in zip(record["state_dicts"], restored, strict=True):
            tree = _put(tree, tuple(state_dict["path"]), out)
        metadata = {key: value for key, value in (checkpoint.file_metadata or {}).items() if key != LAYOUT_KEY}
        self._report = {
            "direction": "undo",
            "layout": record["layout"],
            "rules": record.get("rules"),
            "state_dicts": [RawPath(tuple(state_dict["path"])) for state_dict in record["state_dicts"]],
            "tensors": moved,
            "retied": retied,
            "untied": untied,
        }
        return dataclasses.replace(checkpoint, tree=tree, tree_digest=None, file_metadata=metadata or None)

    def _retie(self, restored: list[Any], ties: list[tuple[int, str, int, str]]) -> tuple[list[str], list[str]]:
        """Tie again what the layout separated (a tensor permuted at one place, not at another),
        when the bytes of both places still agree (compared block by block)."""
        retied, untied = [], []
        for number, key, first_number, first_key in ties:
            alias, first = restored[number][key], restored[first_number].get(first_key)
            if type(first) is TensorRef and _same_bytes(alias, first):
                restored[number][key] = first
                retied.append(key)
            else:
                untied.append(key)
        return retied, untied

    def _stale(self, checkpoint: Checkpoint, path: TreePath, what: str) -> TransformError:
        return TransformError(
            self.option,
            TORCH,
            f"{format_path(tuple(path)) or '<root>'} {what}: the tree no longer matches the layout its metadata "
            f"records ({LAYOUT_KEY!r})",
            file=checkpoint.origin,
        )

    # --------------------------------------------------------------------------- reporting

    def summary(self) -> str:
        text = super().summary()
        report = self._report
        if report is None:
            return text
        tensors = report["tensors"]
        permuted = [item for item in tensors if item["permute"] is not None]
        where = f"{len(report['state_dicts'])} state_dict(s)"
        if report["direction"] == "undo":
            ties = f", {len(report['retied'])} tie(s) restored" if report["retied"] else ""
            kept = f", {len(report['untied'])} no longer equal to what they were tied to" if report["untied"] else ""
            return (
                f"{text}: {len(tensors)} tensor(s) of {where} back from the {report['layout']!r} layout "
                f"({len(permuted)} permuted back{ties}{kept})"
            )
        counts: dict[str, int] = {}
        for item in permuted:
            counts[item["rule"]] = counts.get(item["rule"], 0) + 1
        rules = ", ".join(f"{name} {count}" for name, count in counts.items())
        return (
            f"{text}: {len(tensors)} tensor(s) of {where} in the {report['layout']!r} layout "
            f"({len(permuted)} permuted{': ' + rules if rules else ''}; {len(tensors) - len(permuted)} as they are), "
            f"recorded as {LAYOUT_KEY!r}"
        )


def _container(mapping: Any) -> str:
    return "odict" if type(mapping) is OrderedDict else "dict"


def _place(
    out: dict[str, Any],
    target: tuple[str, ...],
    ref: TensorRef,
    key: str,
    owners: dict[tuple[str, ...], str],
    layout: Layout,
    checkpoint: Checkpoint,
    path: Path,
) -> None:
    """Put ``ref`` at ``target`` in the nested ``out``, refusing a place another key took (the
    same place, or a place inside a tensor, or a tensor where other tensors are nested)."""
    node = out
    for depth, segment in enumerate(target):
        prefix = target[: depth + 1]
        last = depth == len(target) - 1
        if (last and segment in node) or type(node.get(segment)) is TensorRef:
            other = owners.get(prefix) or next(
                owner for place, owner in owners.items() if place[: len(prefix)] == prefix
            )
            raise KeyCollisionError(
                layout.option,
                layout.arguments[0],
                f"{other!r} and {key!r} would both be at {format_path(prefix)!r}",
                file=checkpoint.origin,
                path=path,
            )
        if last:
            node[segment] = ref
            owners[target] = key
            return
        node = node.setdefault(segment, {})


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    node = tree
    for segment in path:
        inside = segment in node if type(node) in MAPPING_TYPES else type(segment) is int and 0 <= segment < len(node)
        if type(node) not in (*MAPPING_TYPES, list, tuple) or not inside:
            return None
        node = node[segment]
    return node


def _put(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of ``tree`` with ``value`` at ``path`` (containers along the way rebuilt, types kept)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if type(tree) in MAPPING_TYPES:
        return rebuild(tree, [(key, _put(child, rest, value) if key == head else child) for key, child in tree.items()])
    return rebuild(tree, [_put(child, rest, value) if index == head else child for index, child in enumerate(tree)])


def _no_tensor(key: str, path: TreePath) -> Any:
    raise CorruptFileError(f"the {LAYOUT_KEY!r} record's _metadata holds a tensor")


def _same_bytes(a: TensorRef, b: TensorRef) -> bool:
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    if a.digest is not None and a.digest == b.digest:
        return True
    left, right = a.source.chunks(), b.source.chunks()
    pending = memoryview(b"")
    for chunk in left:
        view = memoryview(chunk).cast("B")
        while len(view):
            if not len(pending):
                pending = memoryview(next(right, b"")).cast("B")
                if not len(pending):
                    return False
                pending = memoryview(bytes(pending))  # the next chunk may reuse its memory
            take = min(len(view), len(pending))
            if view[:take] != pending[:take]:
                return False
            view, pending = view[take:], pending[take:]
    return not len(pending) and next(right, None) is None


# ------------------------------------------------------------------------------ the record


def recorded_layout(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The layout a checkpoint records (its metadata's ``sdconvert_layout``), checked; None if none."""
    text = (checkpoint.file_metadata or {}).get(LAYOUT_KEY)
    if text is None:
        return None
    return parse_record(text, file=checkpoint.origin)


def parse_record(text: Any, *, file: Any = None) -> dict[str, Any]:
    def bad(what: str) -> CorruptFileError:
        return CorruptFileError(f"the metadata's {LAYOUT_KEY!r} {what}", file=file)

    if type(text) is not str:
        raise bad("must be JSON text")
    try:
        record = json.loads(text)
    except ValueError:
        raise bad("is not JSON") from None
    if (
        type(record) is not dict
        or type(record.get("layout")) is not str
        or record.get("version") != RECORD_VERSION
        or type(record.get("state_dicts")) is not list
    ):
        raise bad(f"must be an object with layout, version {RECORD_VERSION} and state_dicts")
    count = len(record["state_dicts"])
    for state_dict in record["state_dicts"]:
        if (
            type(state_dict) is not dict
            or type(state_dict.get("path")) is not list
            or any(type(key) not in (str, int) for key in state_dict["path"])
            or state_dict.get("container") not in ("dict", "odict")
            or type(state_dict.get("tensors")) is not list
        ):
            raise bad("state_dicts must be objects with path, container (dict/odict) and tensors")
        for entry in state_dict["tensors"]:
            if not _entry_ok(entry, count):
                raise bad(f"holds a malformed tensor entry {first_keys([entry], 1)}")
    return record


def _entry_ok(entry: Any, count: int) -> bool:
    if type(entry) is not list or len(entry) not in (3, 4) or type(entry[0]) is not str:
        return False
    target, permute = entry[1], entry[2]
    if type(target) is not list or not target or any(type(key) is not str for key in target):
        return False
    if permute is not None and (
        type(permute) is not list
        or any(type(axis) is not int for axis in permute)
        or sorted(permute) != list(range(len(permute)))
    ):
        return False
    if len(entry) == 4:
        tie = entry[3]
        return (
            type(tie) is list and len(tie) == 2 and type(tie[0]) is int and 0 <= tie[0] < count and type(tie[1]) is str
        )
    return True


def describe_record(text: Any) -> str:
    """One line for ``inspect``: the recorded layout, what it covers and how to undo it."""
    try:
        record = parse_record(text)
    except CorruptFileError as exc:
        return f"unreadable ({exc})"
    tensors = sum(len(state_dict["tensors"]) for state_dict in record["state_dicts"])
    permuted = sum(1 for sd in record["state_dicts"] for entry in sd["tensors"] if entry[2] is not None)
    return (
        f"{record['layout']} (rules {record.get('rules')}): {tensors} tensor(s) of {len(record['state_dicts'])} "
        f"state_dict(s), {permuted} permuted; `convert --layout torch` gives PyTorch's layout back"
    )
