"""Round trips between formats are bit-identical: bytes, dtypes, shapes, types, key order."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import assert_bit_identical, builtin_formats, exotic_tree

import converters
from converters.recipe import Net

FORMATS = builtin_formats()


@pytest.mark.parametrize(("first", "second"), list(itertools.product(FORMATS, FORMATS)))
def test_recipe_checkpoint_through_every_pair(
    tmp_path: Path, recipe_pt: Path, trained: Any, first: str, second: str
) -> None:
    a = converters.convert(recipe_pt, tmp_path / f"a{FORMATS[first]}")
    b = converters.convert(a, tmp_path / f"b{FORMATS[second]}")
    back = converters.convert(b, tmp_path / "back.pt")
    original = trained[2]
    for path in (a, b, back):
        assert_bit_identical(original, converters.load(path))
    # The file we wrote is read by torch itself with its safe default.
    assert_bit_identical(original, torch.load(back, weights_only=True))
    assert converters.verify(recipe_pt, b) == []


@pytest.mark.parametrize("suffix", FORMATS.values())
def test_exotic_tree_round_trips(tmp_path: Path, suffix: str) -> None:
    tree = exotic_tree()
    path = tmp_path / f"exotic{suffix}"
    converters.save(tree, path)
    assert_bit_identical(tree, converters.load(path))
    again = tmp_path / f"again{suffix}"
    converters.convert(path, again)
    assert_bit_identical(tree, converters.load(again))


def test_our_pt_is_read_by_torch_load_weights_only(tmp_path: Path) -> None:
    tree = exotic_tree()
    path = tmp_path / "exotic.pt"
    converters.save(tree, path)
    assert_bit_identical(tree, torch.load(path, weights_only=True))


@pytest.mark.parametrize("dtype", list(converters.core.dtypes.DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 1)])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_dtype_and_shape_in_every_format_that_holds_it(
    tmp_path: Path, fmt: str, dtype: str, shape: tuple[int, ...]
) -> None:
    if dtype not in converters.registry.get(fmt).dtype_codes:
        with pytest.raises(converters.UnsupportedValueError, match=f"at t: {fmt} cannot hold dtype {dtype}"):
            converters.save({"t": _random_tensor(getattr(torch, dtype), shape)}, tmp_path / f"t{FORMATS[fmt]}")
        return
    tensor = _random_tensor(getattr(torch, dtype), shape)
    path = tmp_path / f"t{FORMATS[fmt]}"
    converters.save({"t": tensor}, path)
    assert_bit_identical({"t": tensor}, converters.load(path))
    if fmt == "pt":
        assert_bit_identical({"t": tensor}, torch.load(path, weights_only=True))


@pytest.mark.parametrize("dtype", sorted(converters.registry.get("safetensors").dtype_codes))
def test_every_safetensors_dtype_is_read_by_the_reference_reader(tmp_path: Path, dtype: str) -> None:
    tensor = _random_tensor(getattr(torch, dtype), (4, 3))
    path = tmp_path / "t.safetensors"
    converters.save({"t": tensor}, path)
    assert_bit_identical({"t": tensor}, converters.load(path))
    with safetensors.safe_open(path, "np") as handle:
        # numpy cannot name every dtype; the raw bytes are what must match.
        assert handle.keys() == ["t"]
    assert_bit_identical({"t": tensor}, safetensors.torch.load_file(path))


def test_bare_state_dict_in_safetensors_loads_into_net_without_this_project(tmp_path: Path, trained: Any) -> None:
    path = tmp_path / "weights.safetensors"
    converters.convert(_save(tmp_path, trained[2]), path, select="model_state_dict")
    state = safetensors.torch.load_file(path)
    assert set(state) == set(trained[0].state_dict())
    net = Net()
    net.load_state_dict(state)
    assert_bit_identical(dict(trained[0].state_dict()), dict(net.state_dict()))


def test_key_order_is_kept_even_when_storage_order_differs(tmp_path: Path) -> None:
    tree = {"z_small": torch.ones(2, dtype=torch.int8), "a_wide": torch.ones(2, dtype=torch.float64), "m": 1}
    path = tmp_path / "order.safetensors"
    converters.save(tree, path)
    assert list(converters.load(path)) == ["z_small", "a_wide", "m"]


def test_pt_output_is_reproducible(tmp_path: Path, recipe_pt: Path) -> None:
    first, second = tmp_path / "1.pt", tmp_path / "2.pt"
    converters.convert(recipe_pt, first)
    converters.convert(recipe_pt, second)
    assert first.read_bytes() == second.read_bytes()


def test_pt_records_are_64_byte_aligned(tmp_path: Path, recipe_pt: Path) -> None:
    from converters.codecs.zip import stored_entries

    out = converters.convert(recipe_pt, tmp_path / "aligned.pt")
    entries = stored_entries(out, out.stat().st_size)
    assert all(e.data_offset % 64 == 0 for name, e in entries.items() if "/data/" in name)


def _save(tmp_path: Path, obj: Any) -> Path:
    path = tmp_path / "src.pt"
    torch.save(obj, path)
    return path


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    itemsize = dtype.itemsize
    count = 1
    for dim in shape:
        count *= dim
    raw = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)
