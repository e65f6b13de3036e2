"""Property-based: random checkpoint trees with tensors of every dtype, ties included, pushed
through random chains of formats, come back bit-identical with exact Python types."""

from __future__ import annotations

import struct
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from helpers import assert_bit_identical, builtin_formats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import converters
from converters.core.dtypes import DTYPES

FORMATS = builtin_formats()

keys = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=6).filter(lambda k: not k.startswith("__")),
    st.integers(-(2**40), 2**40),
)
floats = st.integers(0, 2**64 - 1).map(lambda bits: struct.unpack(">d", bits.to_bytes(8, "big"))[0])
finite = st.floats(allow_nan=False, allow_infinity=True)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    floats,
    st.text(st.characters(exclude_categories=("Cs",)), max_size=8),
    # values beyond the plain tree types that load() gives back as themselves (issue 14)
    st.binary(max_size=8),
    st.builds(np.float64, finite),
    st.builds(np.int32, st.integers(-(2**31), 2**31 - 1)),
    st.builds(np.bool_, st.booleans()),
    st.lists(st.integers(0, 2**40), max_size=4).map(torch.Size),
    st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.bool]),
    st.sets(st.integers(-5, 5), max_size=3),
    st.builds(complex, finite, finite),
)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    name = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    count = 1
    for dim in shape:
        count *= dim
    raw = draw(st.binary(min_size=count * DTYPES[name].itemsize, max_size=count * DTYPES[name].itemsize))
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if name == "bool":
        data = data % 2
    return data.view(getattr(torch, name)).reshape(shape)


def ordered(items: dict[Any, Any]) -> OrderedDict[Any, Any]:
    return OrderedDict(items)


trees = st.recursive(
    st.one_of(scalars, tensors()),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
        st.dictionaries(keys, children, max_size=3).map(ordered),
        st.dictionaries(keys, st.integers(-5, 5), max_size=3).map(Counter),
    ),
    max_leaves=10,
)


@st.composite
def checkpoints(draw: st.DrawFn) -> dict[Any, Any]:
    tree = draw(st.dictionaries(keys, trees, min_size=1, max_size=4))
    if draw(st.booleans()):  # tie two places to one tensor, as tied weights are
        tensor = draw(tensors())
        tree["tied_a"], tree["tied_b"] = tensor, {"inner": tensor}
    return tree


def holds(fmt: str, tree: Any) -> bool:
    dtypes = {
        str(leaf.dtype).removeprefix("torch.")
        for _, leaf in converters.core.tree.walk(tree)
        if isinstance(leaf, torch.Tensor)
    }
    return dtypes <= set(converters.registry.get(fmt).dtype_codes)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=checkpoints(), data=st.data())
def test_random_trees_survive_random_chains_of_formats(tree: dict[Any, Any], data: st.DataObject) -> None:
    usable = [fmt for fmt in FORMATS if holds(fmt, tree)]
    chain = data.draw(st.lists(st.sampled_from(usable), min_size=1, max_size=4), label="chain")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"0{FORMATS[chain[0]]}"
        converters.save(tree, path)
        for step, fmt in enumerate(chain[1:], start=1):
            path = converters.convert(path, Path(folder) / f"{step}{FORMATS[fmt]}")
        loaded = converters.load(path)
    assert_bit_identical(tree, loaded)
    if "tied_a" in tree:
        assert loaded["tied_a"] is loaded["tied_b"]["inner"], f"tie lost through {chain}"
