"""The manifest: valid against schemas/manifest.schema.json, exact, and true to the file's bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import blake3
import jsonschema
import pytest
import torch
from helpers import builtin_suffixes, exotic_tree, tensor_bytes

import converters
from converters.core import compare, manifests
from converters.torch_bridge import from_torch

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "schemas" / "manifest.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("suffix", builtin_suffixes())
def test_recipe_manifest_validates_and_matches_the_tensors(
    tmp_path: Path, recipe_pt: Path, trained: Any, suffix: str
) -> None:
    path = converters.convert(recipe_pt, tmp_path / f"c{suffix}")
    document = converters.manifest(path)
    VALIDATOR.validate(document)
    expected_file: dict[str, Any] = {"name": path.name, "format": suffix[1:], "bytes": path.stat().st_size}
    if suffix == ".safetensors":  # the file's own __metadata__ beside ours: what transformers looks for
        expected_file["metadata"] = {"format": "pt"}
    if suffix == ".pt":  # the pt format reads several kinds of file and says which
        expected_file["kind"] = "torch zip archive"
    if suffix == ".npz":  # so does npz (ours, numpy's, a single .npy)
        expected_file["kind"] = "numpy .npz archive (statedict-convert)"
    assert document["file"] == expected_file
    entries = {tuple(entry["path"]): entry for entry in document["tensors"]}
    checkpoint = trained[2]
    for key, tensor in checkpoint["model_state_dict"].items():
        entry = entries[("model_state_dict", key)]
        assert entry["dtype"] == "float32"
        assert entry["shape"] == list(tensor.shape)
        assert entry["nbytes"] == tensor.numel() * 4
        assert entry["blake3"] == blake3.blake3(tensor_bytes(tensor)).hexdigest()
    assert entries[("optimizer_state_dict", "state", 0, "momentum_buffer")]["key"] == (
        "optimizer_state_dict/state/0/momentum_buffer"
    )


def test_manifest_is_the_same_for_every_format(tmp_path: Path, recipe_pt: Path) -> None:
    documents = []
    for suffix in builtin_suffixes():
        document = converters.manifest(converters.convert(recipe_pt, tmp_path / f"c{suffix}"))
        document.pop("file")
        documents.append(document)
    assert all(document == documents[0] for document in documents)


def test_exotic_tree_manifest_validates_and_decodes_exactly() -> None:
    checkpoint = from_torch(exotic_tree())
    document = manifests.build(checkpoint)
    VALIDATOR.validate(document)
    text = json.dumps(document, allow_nan=False)  # strict JSON: no NaN/Infinity literals
    refs = {entry["key"]: ref for entry, (_, ref) in zip(document["tensors"], checkpoint.tensors(), strict=True)}
    decoded = manifests.decode_tree(json.loads(text)["tree"], lambda key, _path: refs[key])
    assert compare.differences(checkpoint.tree, decoded) == []


def test_non_finite_floats_are_written_as_their_bits() -> None:
    payload = struct.unpack(">d", bytes.fromhex("7ff8000000000123"))[0]
    node = manifests.encode_tree({"a": [payload, float("-inf"), -0.0, 0.1]}, {})
    assert node == {
        "dict": [
            [
                "a",
                {
                    "list": [
                        {"float": "0x7ff8000000000123"},
                        {"float": "0xfff0000000000000"},
                        {"float": -0.0},
                        {"float": 0.1},
                    ]
                },
            ]
        ]
    }


def test_int_and_str_keys_stay_apart() -> None:
    node = manifests.encode_tree({0: 1, "0": 2}, {})
    assert json.loads(json.dumps(node)) == {"dict": [[0, {"int": 1}], ["0", {"int": 2}]]}


def test_storage_keys_of_a_bare_state_dict_are_its_own_keys() -> None:
    tree = from_torch({"conv1.weight": torch.ones(1), "a/b~c": torch.ones(1)}).tree
    assert list(manifests.storage_keys(tree).values()) == ["conv1.weight", "a/b~c"]


def test_storage_keys_of_nested_trees_escape_and_never_collide() -> None:
    tree = from_torch({"x": {0: torch.ones(1), "0": torch.ones(1), "a/b": torch.ones(1), "t~": torch.ones(1)}}).tree
    assert list(manifests.storage_keys(tree).values()) == ["x/0", "x/0#2", "x/a~1b", "x/t~0"]
