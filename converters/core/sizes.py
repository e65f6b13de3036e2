"""Byte sizes as people write them on a command line: ``5GB`` (decimal, as transformers reads its
``max_shard_size``), ``512MiB`` (binary) or a plain number of bytes."""

from __future__ import annotations

import re

from .errors import ConverterError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int, what: str = "a size") -> int:
    """The number of bytes ``text`` stands for; ``what`` names it in the error (``a shard size``)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text).upper())
        if match is None:
            raise ConverterError(f"cannot read the size {text!r}; use e.g. 5GB, 500MB or 512MiB")
        size = int(float(match.group(1)) * UNITS[match.group(2) or ""])
    if size <= 0:
        raise ConverterError(f"{what} must be positive, got {text!r}")
    return size
