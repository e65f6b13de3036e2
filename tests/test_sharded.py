"""Sharded safetensors: a folder of shards + model.safetensors.index.json, as transformers writes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import assert_bit_identical, builtin_suffixes

import converters
from converters.core.errors import CorruptFileError, DestinationError, UnsafeFileError
from converters.core.sizes import parse_size

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def test_cli_writes_shards_and_an_index_that_round_trip(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    out = tmp_path / "sharded"
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", recipe_pt, out, "--to", "safetensors", "--max-shard-size", "100KB"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == sorted(set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _tensors(trained[2]))
    for shard in shards:  # a limit of 100 kB, except for single tensors bigger than it
        tensors = safetensors.torch.load_file(out / shard)
        assert len(tensors) == 1 or sum(t.numel() * 4 for t in tensors.values()) <= 100_000
    assert_bit_identical(trained[2], converters.load(out))
    assert converters.verify(recipe_pt, out) == []
    assert converters.verify(out, deep=True) == []
    for suffix in builtin_suffixes():
        back = converters.convert(out, tmp_path / f"back{suffix}")
        assert converters.verify(recipe_pt, back) == []


def test_a_sharded_folder_is_accepted_by_every_command(tmp_path: Path, recipe_pt: Path) -> None:
    out = tmp_path / "sharded"
    converters.convert(recipe_pt, out, dst_format="safetensors", max_shard_size="200KB")
    for args in (["inspect", out], ["schema", out], ["verify", out, recipe_pt], ["verify", "--deep", out]):
        result = subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True)
        assert result.returncode == 0, (args, result.stderr)
    manifest = converters.manifest(out)
    assert manifest["file"]["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    index = converters.convert(out / "model.safetensors.index.json", tmp_path / "via-index.pt")
    assert converters.verify(recipe_pt, index) == []


def test_folders_written_by_transformers_style_tools_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    first = {"embed.weight": torch.randn(4, 3), "layer.0.weight": torch.randn(3, 3)}
    second = {"layer.1.weight": torch.randn(3, 3), "head.bias": torch.zeros(4)}
    safetensors.torch.save_file(first, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    safetensors.torch.save_file(second, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first} | {
        k: "model-00002-of-00002.safetensors" for k in second
    }
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 136}, "weight_map": weight_map})
    )
    loaded = converters.load(folder)
    assert list(loaded) == list(weight_map)
    assert_bit_identical({**first, **second}, {k: loaded[k] for k in {**first, **second}})


def test_replacing_a_sharded_folder_needs_force_and_spares_other_folders(tmp_path: Path, recipe_pt: Path) -> None:
    out = tmp_path / "sharded"
    converters.convert(recipe_pt, out, dst_format="safetensors", max_shard_size="100KB")
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", recipe_pt, out, "--to", "safetensors", "--max-shard-size", "1MB"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "exists; pass --force" in result.stderr
    converters.convert(recipe_pt, out, dst_format="safetensors", max_shard_size="1MB")  # the API replaces
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(
        DestinationError, match=r"is a folder holding other files \('notes.txt'\); refusing to replace it"
    ):
        converters.convert(recipe_pt, precious, dst_format="safetensors", max_shard_size="1MB")
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "recipe.pt", "sharded"]  # no staging left


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (
            lambda i: i["weight_map"].update({"ghost": "model-00001-of-00002.safetensors"}),
            CorruptFileError,
            "the weight_map lists 'ghost', which its shard",
        ),
        (
            lambda i: i["weight_map"].update({"w": "../outside.safetensors"}),
            UnsafeFileError,
            "shard file name '../outside.safetensors' must be a plain file name",
        ),
        (
            lambda i: i["weight_map"].update({"w": "/etc/passwd"}),
            UnsafeFileError,
            "shard file name '/etc/passwd' must be a plain file name",
        ),
        (
            lambda i: i["weight_map"].update({"w": "missing.safetensors"}),
            CorruptFileError,
            "shard 'missing.safetensors' is not a regular file beside the index",
        ),
        (
            lambda i: i["weight_map"].update({"b": "model-00001-of-00002.safetensors"}),
            CorruptFileError,
            "the weight_map lists 'b', which its shard 'model-00001-of-00002.safetensors' lacks",
        ),
        (
            lambda i: i["weight_map"].update(
                {"extra": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}
            ),
            CorruptFileError,
            "shard 'model-00002-of-00002.safetensors' holds tensor 'b', which the weight_map puts elsewhere",
        ),
        (lambda i: i.update({"weight_map": []}), CorruptFileError, "the shard index must hold a weight_map"),
    ],
)
def test_hostile_indexes_are_refused(tmp_path: Path, edit: Any, error: type[Exception], message: str) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    safetensors.torch.save_file({"b": torch.ones(3)}, folder / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {"total_size": 20},
        "weight_map": {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    edit(index)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(error, match=message):
        converters.read(folder)


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("512MiB", 512 * 2**20), ("100kb", 100_000), ("1.5GB", 1_500_000_000), ("4096", 4096)],
)
def test_shard_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_bad_shard_sizes() -> None:
    with pytest.raises(converters.ConverterError, match="cannot read the size '5 parsecs'"):
        parse_size("5 parsecs")
    with pytest.raises(converters.ConverterError, match="must be positive"):
        parse_size("0GB")


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in _tensors(value)]
    return [tree] if isinstance(tree, torch.Tensor) else []


def test_the_index_states_total_size_and_total_parameters(tmp_path: Path, recipe_pt: Path) -> None:
    folder = converters.convert(recipe_pt, tmp_path / "shards", max_shard_size="100KB")
    metadata = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]
    tensors = converters.read(recipe_pt).unique_tensors()
    assert metadata["total_size"] == sum(ref.nbytes for _, ref in tensors)
    assert metadata["total_parameters"] == sum(torch.Size(ref.shape).numel() for _, ref in tensors)
