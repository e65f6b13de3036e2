"""Test helpers that judge bit-identity with torch itself, independently of converters.compare."""

from __future__ import annotations

import contextlib
import struct
from collections import OrderedDict
from typing import Any

import torch

import converters


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_bit_identical(a: Any, b: Any, path: str = "<root>") -> None:
    """Exact Python types, key order and key types, float bits, tensor dtype/shape/bytes."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert tensor_bytes(a) == tensor_bytes(b), f"{path}: tensor bytes differ"
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{path}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_bit_identical(a[key], b[key], f"{path}/{key}")
        if isinstance(a, OrderedDict):
            assert hasattr(a, "_metadata") == hasattr(b, "_metadata"), f"{path}: _metadata presence"
            if hasattr(a, "_metadata"):
                assert_bit_identical(a._metadata, b._metadata, f"{path}/_metadata")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bit_identical(x, y, f"{path}/{index}")
    elif isinstance(a, float):
        assert struct.pack(">d", a) == struct.pack(">d", b), f"{path}: float {a!r} vs {b!r}"
    elif isinstance(a, complex):
        assert struct.pack(">dd", a.real, a.imag) == struct.pack(">dd", b.real, b.imag), f"{path}: {a!r} vs {b!r}"
    elif type(a).__module__ == "numpy":  # a numpy scalar: same type, same bits
        assert a.tobytes() == b.tobytes(), f"{path}: numpy {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def float32_from_bits(*bits: int) -> torch.Tensor:
    return torch.tensor(list(bits), dtype=torch.int64).to(torch.uint32).view(torch.float32)


def exotic_tree() -> dict[Any, Any]:
    """Every kind of leaf and container the tree must keep exactly."""
    metadata_dict: OrderedDict[str, Any] = OrderedDict(w=torch.arange(6, dtype=torch.float32).reshape(2, 3))
    metadata_dict._metadata = OrderedDict([("", {"version": 1}), ("sub", {"version": 2})])  # type: ignore[attr-defined]
    nan_payload = struct.unpack(">d", bytes.fromhex("7ff8000000000123"))[0]
    return {
        "state": metadata_dict,
        0: "int key zero",
        "0": "str key zero",
        -5: None,
        "floats": [0.001, -0.0, float("inf"), float("-inf"), nan_payload, 5e-324, 1e308],
        "ints": (0, -1, 2**31, -(2**63), 2**64 + 7, 10**40),
        "flags": (True, False),
        "text": "ünïcödé ✓ \x00 tab\t",
        "empty": {"dict": {}, "list": [], "tuple": ()},
        "nested": [[1, [2, (3, {"x": 4.0})]]],
        "special_floats": float32_from_bits(0x7FC00001, 0xFFC00000, 0x00000001, 0x80000000, 0x7F800000),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "zero_size": torch.empty(0, 3, dtype=torch.float16),
        "bf16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
    }


def builtin_suffixes() -> list[str]:
    """The main suffix of every built-in single-file format: tests over "every format" follow the
    registry. Folder formats (DCP) have no suffix to name them by: tests add them by name (a DCP
    folder we wrote reads back as the exact tree, like the single-file formats)."""
    return list(builtin_formats().values())


def builtin_formats() -> dict[str, str]:
    from converters.formats import BUILTIN_MODULES

    formats = [converters.registry.get(name) for name in BUILTIN_MODULES]
    return {fmt.name: fmt.suffixes[0] for fmt in formats if not fmt.folder}


class ResourceBoundExceeded(AssertionError):
    """A reader spent more memory or time on an input than the read budget allows (issue 12's bar)."""


@contextlib.contextmanager
def within_resource_bounds(input_bytes: int, *, seconds_per_mib: float = 3.0, min_seconds: float = 2.0) -> Any:
    """The oracle the fuzzers use besides "only ConverterError": reading an input may raise the
    process's peak RSS to at most its RSS before + 2 x the input's size + 100 MB, and take at most
    a few seconds of CPU per MiB (``min_seconds`` at least)."""
    import resource
    import time

    def rss_now() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    before, peak_before = rss_now(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu_before = time.process_time()
    yield
    cpu = time.process_time() - cpu_before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    allowed = before + 2 * input_bytes + 100 * 2**20
    if peak > peak_before and peak > allowed:
        raise ResourceBoundExceeded(
            f"peak RSS rose to {peak >> 20} MiB reading a {input_bytes}-byte input (allowed {allowed >> 20} MiB)"
        )
    limit = max(min_seconds, seconds_per_mib * input_bytes / 2**20)
    if cpu > limit:
        raise ResourceBoundExceeded(f"{cpu:.1f} s of CPU reading a {input_bytes}-byte input (allowed {limit:.1f} s)")
