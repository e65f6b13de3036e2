"""Transformations: ``Checkpoint -> Checkpoint`` callables applied between reader and writer.

A transformation never reads or writes files. It may restructure the tree (keep or drop sub-trees,
rename keys) or derive tensors with new bytes (a cast wraps the tensor's byte source); tensors are
mapped once per tensor *object* (:func:`map_tensors`), so tied tensors stay tied, and a derived
tensor drops the digest of the bytes it replaces.

- :class:`Select` / :class:`Exclude` (``--select``/``--exclude``): sub-trees by path or glob.
- :class:`StripPrefix` (``--strip-prefix``), :class:`Rename` (``--rename``): state_dict keys.
- :class:`Cast` (``--dtype``, ``--dtype-include``/``--dtype-exclude``): floating-point tensors,
  bit-identical to torch's ``tensor.to(dtype)``, streamed through :class:`CastSource`.
- :class:`Ties` (``--ties``): keep, materialize or drop the aliases of tied tensors.
- :class:`Layout` (``--layout flax|mlx|RULES.json|torch``): state_dicts as another framework's
  parameter tree (rules tables in ``converters/layouts/``), permuted through :class:`PermuteSource`.
- :func:`describe_plan` / :func:`plan_lines` (``--dry-run``): what would be written.

Each transformation checks its options when it is made and raises a :class:`TransformError`
(a ``ConverterError``) whose one-line message starts with the option as given.

Example::

    from converters.transforms import Cast, Exclude, StripPrefix
    api.convert("ckpt.pt", "weights.safetensors",
                transforms=[StripPrefix.auto(), Exclude("optimizer_state_dict"), Cast("bfloat16")])
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> (module, its name there); imported when first used, so a job that reads a file
# and changes nothing (``sdconvert inspect``) imports no transformation
_EXPORTS = {
    "InvalidOptionError": ("base", "InvalidOptionError"),
    "KeyCollisionError": ("base", "KeyCollisionError"),
    "NoMatchError": ("base", "NoMatchError"),
    "Transform": ("base", "Transform"),
    "TransformError": ("base", "TransformError"),
    "apply": ("base", "apply"),
    "map_tensors": ("base", "map_tensors"),
    "FLOAT_DTYPES": ("cast", "FLOAT_DTYPES"),
    "Cast": ("cast", "Cast"),
    "CastSource": ("cast", "CastSource"),
    "cast_bits": ("cast", "cast_bits"),
    "cast_bytes": ("cast", "cast_bytes"),
    "Rename": ("keys", "Rename"),
    "StripPrefix": ("keys", "StripPrefix"),
    "split_rule": ("keys", "split_rule"),
    "Layout": ("layout", "Layout"),
    "LayoutRules": ("layout", "LayoutRules"),
    "PermuteSource": ("layout", "PermuteSource"),
    "PathPattern": ("paths", "PathPattern"),
    "escape_key": ("paths", "escape_key"),
    "format_path": ("paths", "format_path"),
    "describe_plan": ("plan", "describe_plan"),
    "plan_lines": ("plan", "lines"),
    "Exclude": ("select", "Exclude"),
    "Select": ("select", "Select"),
    "Ties": ("ties", "Ties"),
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(import_module(f"{__name__}.{module}"), attribute)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .base import (
        InvalidOptionError,
        KeyCollisionError,
        NoMatchError,
        Transform,
        TransformError,
        apply,
        map_tensors,
    )
    from .cast import FLOAT_DTYPES, Cast, CastSource, cast_bits, cast_bytes
    from .keys import Rename, StripPrefix, split_rule
    from .layout import Layout, LayoutRules, PermuteSource
    from .paths import PathPattern, escape_key, format_path
    from .plan import describe_plan
    from .plan import lines as plan_lines
    from .select import Exclude, Select
    from .ties import Ties

__all__ = [
    "FLOAT_DTYPES",
    "Cast",
    "CastSource",
    "Exclude",
    "InvalidOptionError",
    "KeyCollisionError",
    "Layout",
    "LayoutRules",
    "NoMatchError",
    "PathPattern",
    "PermuteSource",
    "Rename",
    "Select",
    "StripPrefix",
    "Ties",
    "Transform",
    "TransformError",
    "apply",
    "cast_bits",
    "cast_bytes",
    "describe_plan",
    "escape_key",
    "format_path",
    "map_tensors",
    "plan_lines",
    "split_rule",
]
