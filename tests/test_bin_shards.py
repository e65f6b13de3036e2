"""Hugging Face ``.bin`` shard folders (issue 14, part 3): ``pytorch_model.bin.index.json`` plus
``pytorch_model-0000k-of-0000n.bin`` files (each a ``torch.save`` of a flat state_dict), as
``save_pretrained(safe_serialization=False, max_shard_size=...)`` writes them, read as one flat
state_dict by every command.

transformers is not installed here, so the folders are written the way its ``save_pretrained``
writes them: shards filled in state_dict order, ``torch.save`` per shard, the index dumped with
``indent=2, sort_keys=True`` (so its weight_map is sorted by key, not in model order). The oracle
is ``torch.load`` of each shard.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import assert_bit_identical

import converters
from converters.core.errors import ConverterError, CorruptFileError, UnsafeFileError, UnsupportedValueError

CLI = Path(__file__).resolve().parent.parent / "cli.py"
INDEX = "pytorch_model.bin.index.json"


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(16, 48)
        self.norm = torch.nn.LayerNorm(16)
        self.mlp = torch.nn.Linear(16, 32)


class TinyModel(torch.nn.Module):
    """Keys whose sorted order differs from the model's (layers.10 sorts before layers.2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList(Block() for _ in range(12))
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.register_buffer("positions", torch.arange(8, dtype=torch.int64))
        self.scale_bf16 = torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))


def shard_like_save_pretrained(state: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    """transformers' split: tensors in state_dict order, a new shard when the next would pass the limit."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and filled + size > max_shard_size:
            shards.append({})
            filled = 0
        shards[-1][key] = tensor
        filled += size
    return shards


def write_bin_folder(
    folder: Path, state: dict[str, torch.Tensor], max_shard_size: int = 8000, *, legacy_first: bool = False
) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    shards = shard_like_save_pretrained(state, max_shard_size)
    count = len(shards)
    weight_map = {}
    total = 0
    for number, shard in enumerate(shards, 1):
        name = f"pytorch_model-{number:05d}-of-{count:05d}.bin"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(shard, folder / name, _use_new_zipfile_serialization=not (legacy_first and number == 1))
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map


def torch_loaded_shards(folder: Path) -> dict[str, torch.Tensor]:
    """What loading every shard with torch.load gives, shard by shard in file-name order."""
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        merged.update(torch.load(shard, weights_only=True))
    return merged


@pytest.fixture(scope="module")
def model_state() -> dict[str, torch.Tensor]:
    return TinyModel().state_dict()


@pytest.fixture
def folder(tmp_path: Path, model_state: dict[str, torch.Tensor]) -> Path:
    write_bin_folder(tmp_path / "model", dict(model_state))
    return tmp_path / "model"


def test_folder_reads_as_one_state_dict_in_model_order(folder: Path, model_state: dict[str, torch.Tensor]) -> None:
    shards = sorted(folder.glob("pytorch_model-*.bin"))
    assert len(shards) >= 4
    index = json.loads((folder / INDEX).read_text())
    assert list(index["weight_map"]) != list(model_state)  # the index is sorted by key, the model is not
    loaded = converters.load(folder)
    expected = torch_loaded_shards(folder)
    assert_bit_identical(expected, loaded)
    assert list(loaded) == list(model_state)  # shards in file-name order, each in its own order
    assert_bit_identical({key: value.contiguous() for key, value in model_state.items()}, loaded)
    checkpoint = converters.read(folder)
    assert checkpoint.format == "pt" and checkpoint.file_metadata == {"total_size": index["metadata"]["total_size"]}


def test_index_file_path_reads_the_same(folder: Path) -> None:
    assert converters.registry.resolve(folder / INDEX).name == "pt"
    assert converters.registry.resolve(folder).name == "pt"
    assert_bit_identical(converters.load(folder), converters.load(folder / INDEX))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".msgpack"])
def test_folder_converts_bit_exactly(folder: Path, tmp_path: Path, suffix: str) -> None:
    destination = tmp_path / f"model{suffix}"
    converters.convert(folder, destination)
    expected = torch_loaded_shards(folder)
    assert_bit_identical(expected, converters.load(destination))
    if suffix == ".safetensors":
        # safetensors' own reader: the state_dict keeps its keys
        assert_bit_identical(
            dict(sorted(expected.items())), dict(sorted(safetensors.torch.load_file(destination).items()))
        )
    if suffix == ".pt":
        assert_bit_identical(expected, torch.load(destination))
    assert converters.verify(folder, destination) == []


def test_folder_converts_to_a_safetensors_shard_folder(folder: Path, tmp_path: Path) -> None:
    destination = tmp_path / "st-shards"
    converters.convert(folder, destination, dst_format="safetensors", max_shard_size=6000)
    assert (destination / "model.safetensors.index.json").is_file()
    assert_bit_identical(torch_loaded_shards(folder), converters.load(destination))


def test_every_command_takes_the_folder(folder: Path, tmp_path: Path) -> None:
    run = [sys.executable, str(CLI)]

    def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*run, *map(str, args)], capture_output=True, text=True, check=False)

    done = cli("inspect", folder)
    assert done.returncode == 0 and re.search(r"^embed\.weight +float32 +\[50, 16\]$", done.stdout, re.M), done.stdout
    done = cli("schema", folder / INDEX, "-o", tmp_path / "schema.json")
    assert done.returncode == 0, done.stderr
    schema = json.loads((tmp_path / "schema.json").read_text())
    assert "embed.weight" in json.dumps(schema)
    done = cli("convert", folder, tmp_path / "one.safetensors")
    assert done.returncode == 0, done.stderr
    done = cli("verify", folder, tmp_path / "one.safetensors")
    assert done.returncode == 0 and "bit-identical" in done.stdout, done.stdout + done.stderr
    done = cli("verify", "--deep", folder)
    assert done.returncode == 1 and "no stored digests" in done.stdout + done.stderr


def test_legacy_shards_and_tied_tensors(tmp_path: Path) -> None:
    embed = torch.randn(10, 4)
    state = {
        "embed.weight": embed,
        "lm_head.weight": embed,
        "bias": torch.zeros(10),
        "x": torch.ones(3, dtype=torch.float16),
    }
    folder = tmp_path / "tied"
    write_bin_folder(folder, state, max_shard_size=330, legacy_first=True)
    shards = sorted(folder.glob("pytorch_model-*.bin"))
    assert len(shards) >= 2 and not shards[0].read_bytes().startswith(b"PK")  # a legacy shard
    assert shards[1].read_bytes().startswith(b"PK")
    loaded = converters.read(folder).tree
    assert loaded["embed.weight"] is loaded["lm_head.weight"]  # tied within its shard: one tensor
    assert_bit_identical(torch_loaded_shards(folder), converters.load(folder))


def test_a_folder_with_both_indexes_is_safetensors_unless_told(folder: Path) -> None:
    # Hub repositories often hold both: sharded safetensors wins, --from pt reads the .bin shards.
    shard = folder / "model-00001-of-00001.safetensors"
    safetensors.torch.save_file({"only": torch.ones(1)}, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"only": shard.name}}))
    assert list(converters.load(folder)) == ["only"]
    assert_bit_identical(torch_loaded_shards(folder), converters.load(folder, format="pt"))


# ----------------------------------------------------------------------------------- hostile folders


def small_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "small"
    write_bin_folder(folder, {"a": torch.ones(4), "b": torch.zeros(4), "c": torch.arange(4.0)}, max_shard_size=16)
    return folder


def edit_index(folder: Path, change: Any) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index)
    (folder / INDEX).write_text(json.dumps(index))


def save(folder: Path, name: str, tree: Any) -> None:
    torch.save(tree, folder / name)


HOSTILE: list[tuple[str, Any, type[Exception], str]] = [
    (
        "path-traversal",
        lambda f: edit_index(f, lambda i: i["weight_map"].update({"a": "../pytorch_model-00001-of-00003.bin"})),
        UnsafeFileError,
        r"shard file name '\.\./pytorch_model-00001-of-00003\.bin' must be a plain file name in the index's folder",
    ),
    (
        "absolute-path",
        lambda f: edit_index(f, lambda i: i["weight_map"].update({"a": "/etc/passwd"})),
        UnsafeFileError,
        r"shard file name '/etc/passwd' must be a plain file name",
    ),
    (
        "sub-folder",
        lambda f: edit_index(f, lambda i: i["weight_map"].update({"a": "sub/x.bin"})),
        UnsafeFileError,
        r"shard file name 'sub/x.bin' must be a plain file name",
    ),
    (
        "missing-shard",
        lambda f: (f / "pytorch_model-00002-of-00003.bin").unlink(),
        CorruptFileError,
        r"shard 'pytorch_model-00002-of-00003\.bin' is not a regular file beside the index",
    ),
    (
        "tensor-missing-from-its-shard",
        lambda f: edit_index(f, lambda i: i["weight_map"].update({"ghost": "pytorch_model-00001-of-00003.bin"})),
        CorruptFileError,
        r"at ghost: the weight_map puts tensor 'ghost' in shard 'pytorch_model-00001-of-00003\.bin', which does not "
        r"hold it",
    ),
    (
        "unlisted-tensor",
        lambda f: save(f, "pytorch_model-00001-of-00003.bin", {"a": torch.ones(4), "stowaway": torch.ones(1)}),
        CorruptFileError,
        r"at stowaway: shard 'pytorch_model-00001-of-00003\.bin' holds tensor 'stowaway', but the weight_map does "
        r"not list it",
    ),
    (
        "duplicate-tensor-across-shards",
        lambda f: save(f, "pytorch_model-00002-of-00003.bin", {"a": torch.ones(4), "b": torch.zeros(4)}),
        CorruptFileError,
        r"at a: shard 'pytorch_model-00002-of-00003\.bin' holds tensor 'a', but the weight_map puts it in shard "
        r"'pytorch_model-00001-of-00003\.bin'",
    ),
    (
        "duplicate-key-in-the-index",
        lambda f: (f / INDEX).write_text(
            '{"weight_map": {"a": "pytorch_model-00001-of-00003.bin", "a": "pytorch_model-00002-of-00003.bin"}}'
        ),
        CorruptFileError,
        r"the shard index has the key 'a' twice",
    ),
    (
        "index-too-big",
        lambda f: os.truncate(f / INDEX, 100_000_001),  # sparse: costs nothing, refused from its size
        CorruptFileError,
        r"the shard index is larger than 100000000 bytes",
    ),
    (
        "index-is-a-symlink",
        lambda f: (
            (f / "real.json").write_text((f / INDEX).read_text()),
            (f / INDEX).unlink(),
            (f / INDEX).symlink_to("real.json"),
        ),
        CorruptFileError,
        r"the shard index is a symbolic link, not a regular file in its folder; refusing to follow it",
    ),
    (
        "shard-is-a-symlink",
        lambda f: (
            (f / "pytorch_model-00003-of-00003.bin").rename(f / "elsewhere.bin"),
            (f / "pytorch_model-00003-of-00003.bin").symlink_to("elsewhere.bin"),
        ),
        CorruptFileError,
        r"shard 'pytorch_model-00003-of-00003\.bin' is not a regular file beside the index",
    ),
    (
        "shard-names-an-index",
        lambda f: edit_index(f, lambda i: i["weight_map"].update({"a": INDEX})),
        CorruptFileError,
        r"shard 'pytorch_model\.bin\.index\.json' names an index, not a torch checkpoint; indexes are not followed",
    ),
    (
        "weight-map-not-a-dict",
        lambda f: (f / INDEX).write_text('{"weight_map": ["a"]}'),
        CorruptFileError,
        r"the shard index must hold a weight_map of tensor key to shard file name",
    ),
    (
        "shard-holds-a-non-tensor",
        lambda f: save(f, "pytorch_model-00001-of-00003.bin", {"a": 5}),
        UnsupportedValueError,
        r"shard 'pytorch_model-00001-of-00003\.bin' holds an int at key 'a'; a shard holds tensors under str keys only",
    ),
    (
        "shard-is-not-a-dict",
        lambda f: save(f, "pytorch_model-00001-of-00003.bin", [torch.ones(4)]),
        UnsupportedValueError,
        r"shard 'pytorch_model-00001-of-00003\.bin' holds a list, not a state_dict",
    ),
    (
        "shard-is-corrupt",
        lambda f: (f / "pytorch_model-00002-of-00003.bin").write_bytes(b"PK\x03\x04 not really"),
        ConverterError,
        r"pytorch_model-00002-of-00003\.bin: ",
    ),
]


@pytest.mark.parametrize(("name", "damage", "error", "message"), HOSTILE, ids=[row[0] for row in HOSTILE])
def test_hostile_shard_folder_is_refused(
    tmp_path: Path, name: str, damage: Any, error: type[Exception], message: str
) -> None:
    folder = small_folder(tmp_path)
    assert len(list(folder.glob("*.bin"))) == 3
    damage(folder)
    for source in (folder, folder / INDEX):
        with pytest.raises(error, match=message) as caught:
            converters.convert(source, tmp_path / "out.safetensors")
        assert "\n" not in str(caught.value)
        assert str(folder) in str(caught.value)  # the index or the shard, by its path
        assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", ["path-traversal", "duplicate-tensor-across-shards"])
def test_cli_exits_2_on_a_hostile_folder(tmp_path: Path, name: str) -> None:
    folder = small_folder(tmp_path)
    damage = next(row[1] for row in HOSTILE if row[0] == name)
    damage(folder)
    done = subprocess.run(
        [sys.executable, str(CLI), "convert", str(folder), str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr and INDEX in done.stderr
    assert not (tmp_path / "out.safetensors").exists()
