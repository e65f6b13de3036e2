"""Fuzzing in the normal suite: valid files of every format, mutated by hypothesis, fed to every
reader. Only ConverterError may come out; reading the tensors' bytes must not escape either; and
no input may cost more memory or time than the read budget allows (``within_resource_bounds``).
`make fuzz` runs the same readers under atheris for long, coverage-guided sessions."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import builtin_formats, within_resource_bounds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import converters
from converters.core import manifests
from converters.core.sources import read_all

FORMATS = builtin_formats()


def sample_tree() -> dict[str, Any]:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "model": {"w": weight, "b": torch.ones(3, dtype=torch.bfloat16), "tied": weight},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
        "epoch": 2,
        "name": "fuzz",
    }


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("seeds")
    files = {}
    for name, suffix in FORMATS.items():
        path = folder / f"seed{suffix}"
        converters.save(sample_tree(), path)
        files[name] = path.read_bytes()
    return files


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("repeat"), st.integers(0, 10**6), st.integers(1, 64)),
)


def mutate(data: bytes, steps: list[tuple[str, int, Any]]) -> bytes:
    out = bytearray(data)
    for kind, where, arg in steps:
        position = where % (len(out) + 1)
        if kind == "flip" and out:
            out[position % len(out)] ^= 1 << arg
        elif kind == "set" and out:
            out[position % len(out)] = arg
        elif kind == "truncate":
            del out[position:]
        elif kind == "insert":
            out[position:position] = arg
        elif kind == "delete":
            del out[position : position + arg]
        elif kind == "repeat":
            out[position:position] = out[position : position + arg]
    return bytes(out)


def read_everything(path: Path, fmt: str) -> None:
    checkpoint = converters.read(path, fmt)
    for _, ref in checkpoint.unique_tensors():
        read_all(ref.source)
    manifests.build(checkpoint)


@pytest.mark.parametrize("fmt", list(FORMATS))
@settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(steps=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_files_raise_only_converter_errors(valid_files: dict[str, bytes], fmt: str, steps: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"mutated{FORMATS[fmt]}"
        data = mutate(valid_files[fmt], steps)
        path.write_bytes(data)
        with within_resource_bounds(len(data)), contextlib.suppress(converters.ConverterError):
            read_everything(path, fmt)  # anything but a ConverterError fails the test


@pytest.fixture(scope="module")
def pt_kinds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """.pt files beyond plain trees (issue 14): one holding recorded objects, numpy values, bytes
    and a set; a TorchScript archive (torch.jit.save of a scripted module with a BatchNorm), read
    without running its code: its pickled modules and code files are what the mutations hit."""
    import argparse
    import collections

    import numpy as np

    folder = tmp_path_factory.mktemp("pt-kinds")
    objects = {
        **sample_tree(),
        "args": argparse.Namespace(lr=0.1, layers=[1, 2]),
        "counts": collections.defaultdict(list, {"a": [1]}),
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.float64(0.5),
        "raw": b"\x00\xff",
        "ids": {1, 2},
    }
    torch.save(objects, folder / "objects.pt")
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(2, 2))
    torch.jit.save(torch.jit.script(model), str(folder / "torchscript.pt"))
    return {name: (folder / f"{name}.pt").read_bytes() for name in ("objects", "torchscript")}


@pytest.mark.parametrize("kind", ["objects", "torchscript"])
@settings(
    max_examples=100, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(steps=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_pt_kinds_raise_only_converter_errors(pt_kinds: dict[str, bytes], kind: str, steps: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutated.pt"
        data = mutate(pt_kinds[kind], steps)
        path.write_bytes(data)
        with within_resource_bounds(len(data)), contextlib.suppress(converters.ConverterError):
            read_everything(path, "pt")
