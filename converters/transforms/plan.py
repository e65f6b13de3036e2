"""What a conversion with transformations would write (``--dry-run``), as JSON and as text.

:func:`describe_plan` compares the checkpoint before and after the transformations (already
applied, in order) and collects what each one reported through its ``describe()``: every tensor
that would be written, with its path after renames, its dtype after casts, shape and bytes, where
it came from when that differs; every tied alias; what was dropped and by which option; and the
totals before and after. :func:`lines` renders that for a terminal.

Example::

    transforms = [StripPrefix.auto(), Exclude("optimizer_state_dict"), Cast("bfloat16")]
    before = api.read("ckpt.pt")
    after = apply(before, transforms)
    print("\\n".join(lines(describe_plan(before, after, transforms))))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..core import dtypes
from ..core.errors import shown
from ..core.report import human_bytes
from ..core.tree import Checkpoint, TensorRef
from .base import Path, Transform, option_text
from .paths import format_path

PATH_WIDTH = 160  # characters of one path in lines(): keys come from the file, so they are bounded


def describe_plan(before: Checkpoint, after: Checkpoint, transforms: Iterable[Transform]) -> dict[str, Any]:
    """The dry-run record of ``before`` → ``after`` through ``transforms`` (JSON-serialisable).

    ``{"tensors": [{"path", "keys", "dtype", "shape", "bytes", "alias_of"?, "from"?}],
    "totals": {...}, "before": {...}, "dropped": [...], "transforms": [describe() of each]}``.
    A tied tensor is listed at each of its paths; its bytes count once (``alias_of`` names the path
    that stores it). ``from`` gives the source path and dtype when the path or the dtype changed.
    """
    transforms = list(transforms)
    records = [_describe(transform) for transform in transforms]
    before_paths: dict[int, list[Path]] = {}
    for path, ref in before.tensors():
        before_paths.setdefault(id(ref), []).append(tuple(path))

    tensors: list[dict[str, Any]] = []
    first_path: dict[int, str] = {}
    used: dict[int, set[int]] = {}
    for raw_path, ref in after.tensors():
        path = tuple(raw_path)
        entry: dict[str, Any] = {
            "path": format_path(path),
            "keys": list(path),
            "dtype": ref.dtype,
            "shape": list(ref.shape),
            "bytes": ref.nbytes,
        }
        if id(ref) in first_path:
            entry["alias_of"] = first_path[id(ref)]
        else:
            first_path[id(ref)] = entry["path"]
        origin = _origin(ref, transforms)
        sources = before_paths.get(id(origin), [])
        if sources:
            # a tied tensor's paths: the same path if it is still there, else the next one unclaimed
            claimed = used.setdefault(id(origin), set())
            free = [index for index in range(len(sources)) if index not in claimed] or [0]
            index = sources.index(path) if path in sources and sources.index(path) in free else free[0]
            claimed.add(index)
            source_path = sources[index]
            if source_path != path or origin.dtype != ref.dtype:
                entry["from"] = {"path": format_path(source_path), "dtype": origin.dtype}
        else:  # made by a transformation that does not say from what
            entry["from"] = {"path": None, "dtype": origin.dtype}
        tensors.append(entry)

    dropped: list[dict[str, Any]] = []
    for record in records:
        option = record.get("option") or record.get("transform", "")
        for item in record.get("dropped", []):
            pattern = item.get("by")
            by = option_text(option, pattern) if isinstance(pattern, str) else _option(record)
            dropped.append({**item, "by": by})
        if record.get("transform") == "ties" and record.get("mode") == "drop-aliases":
            for group in record.get("tied", []):
                for alias in group["aliases"]:
                    item = {"path": alias, "by": _option(record), "tensors": 0, "bytes": 0, "alias_of": group["path"]}
                    dropped.append(item)
    return {
        "tensors": tensors,
        "totals": _totals(after),
        "before": _totals(before),
        "dropped": dropped,
        "transforms": records,
    }


def lines(plan: dict[str, Any]) -> list[str]:
    """``plan`` (from :func:`describe_plan`) as lines for a terminal: the tensors that would be
    written (path, dtype, shape, size, where each came from), what was dropped, what each
    transformation did. Keys are shown escaped and shortened (they come from the file)."""
    totals, before = plan["totals"], plan["before"]
    out = [
        f"would write {totals['tensors']} tensor(s) at {totals['paths']} path(s), {human_bytes(totals['bytes'])}"
        f" (before: {before['tensors']} tensor(s), {human_bytes(before['bytes'])})"
    ]
    rows: list[tuple[str, ...]] = []
    for item in plan["tensors"]:
        path = shown(item["path"] or "<root>", PATH_WIDTH)
        if "alias_of" in item:
            tied = f"tied to {shown(item['alias_of'], PATH_WIDTH)}"
            rows.append((path, item["dtype"], _shape(item["shape"]), "-", tied))
            continue
        notes = []
        source = item.get("from")
        if source is not None:
            if source["dtype"] != item["dtype"]:
                notes.append(f"from {source['dtype']}")
            if source["path"] is not None and source["path"] != item["path"]:
                notes.append(f"was {shown(source['path'] or '<root>', PATH_WIDTH)}")
        rows.append((path, item["dtype"], _shape(item["shape"]), human_bytes(item["bytes"]), ", ".join(notes)))
    out += _table(rows)
    if plan["dropped"]:
        out.append("dropped:")
        for item in plan["dropped"]:
            if "alias_of" in item:
                what = f"alias of {shown(item['alias_of'], PATH_WIDTH)}"
            elif "class" in item:
                what = f"a recorded {shown(item['class'], PATH_WIDTH)} object"
            else:
                what = f"{item['tensors']} tensor(s), {human_bytes(item['bytes'])}"
            out.append(f"  {shown(item['path'] or '<root>', PATH_WIDTH)}  {what}  ({shown(item['by'])})")
    if plan["transforms"]:
        out.append("transformations:")
        out += [f"  {shown(record['summary'], 400)}" for record in plan["transforms"]]
    return out


def _describe(transform: Transform) -> dict[str, Any]:
    describe = getattr(transform, "describe", None)
    if callable(describe):
        record = describe()
        if isinstance(record, dict):
            return record
    name = getattr(transform, "__name__", type(transform).__name__)
    return {"transform": name, "option": "", "arguments": [], "applied": True, "summary": name}


def _option(record: dict[str, Any]) -> str:
    option = str(record.get("option") or record.get("transform", ""))
    arguments = record.get("arguments") or []
    return " ".join(option_text(option, str(argument)) for argument in arguments) or option


def _origin(ref: TensorRef, transforms: list[Transform]) -> TensorRef:
    """The tensor ``ref`` was made from (through casts and materialized ties), or ``ref`` itself."""
    current = ref
    for _ in range(len(transforms) + 1):
        for transform in reversed(transforms):
            origin_of = getattr(transform, "origin_of", None)
            found = origin_of(current) if callable(origin_of) else None
            if found is not None:
                current = found
                break
        else:
            return current
    return current


def _totals(checkpoint: Checkpoint) -> dict[str, Any]:
    paths = 0
    seen: set[int] = set()
    size = 0
    by_dtype: dict[str, dict[str, int]] = {}
    for _, ref in checkpoint.tensors():
        paths += 1
        if id(ref) in seen:
            continue
        seen.add(id(ref))
        size += ref.nbytes
        row = by_dtype.setdefault(ref.dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
        row["tensors"] += 1
        row["parameters"] += dtypes.numel(ref.shape)
        row["bytes"] += ref.nbytes
    return {"paths": paths, "tensors": len(seen), "bytes": size, "by_dtype": by_dtype}


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    if not rows:
        return ["  (no tensors)"]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    out = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        out.append(("  " + "  ".join(cells) + ("  " + row[-1] if row[-1] else "")).rstrip())
    return out
