"""The msgpack files are language-neutral.

A published JavaScript decoder (npm @msgpack/msgpack) walks a converted recipe checkpoint and finds
every tensor with the manifest's dtype, shape and BLAKE3 digest (computed in JavaScript by npm
@noble/hashes). Needs Node.js and the npm registry (both on this project's machines and CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import converters
from converters.core.contract import NoOptions, WriteContext
from converters.formats.msgpack import MsgpackFormat
from converters.torch_bridge import from_torch

JS = Path(__file__).resolve().parent / "js"


@pytest.fixture(scope="module")
def node() -> str:
    executable = shutil.which("node")
    npm = shutil.which("npm")
    if executable is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js and npm are needed for the cross-language test in CI")
        pytest.skip("Node.js/npm not found on PATH")
    installed = [JS / "node_modules" / package / "package.json" for package in ("@msgpack/msgpack", "@noble/hashes")]
    if not all(path.exists() for path in installed):
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=JS, check=True, timeout=300)
    return executable


def walk_with_node(node: str, path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [node, str(JS / "walk_msgpack.mjs"), str(path)], capture_output=True, text=True, check=True, timeout=120
    )
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def assert_matches_manifest(found: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    # The recipe's int keys (optimizer state 0..9) are decimal strings in msgpack maps.
    by_path = {"/".join(map(str, entry["path"])): entry for entry in found}
    assert len(by_path) == len(found) == len(manifest["tensors"])
    for tensor in manifest["tensors"]:
        seen = by_path["/".join(map(str, tensor["path"]))]
        assert (seen["dtype"], seen["shape"], seen["nbytes"], seen["blake3"]) == (
            tensor["dtype"],
            tensor["shape"],
            tensor["nbytes"],
            tensor["blake3"],
        )


def test_javascript_decoder_finds_every_tensor_of_the_recipe(node: str, tmp_path: Path, recipe_pt: Path) -> None:
    path = converters.convert(recipe_pt, tmp_path / "recipe.msgpack")
    manifest = converters.manifest(path)
    assert len(manifest["tensors"]) == 20
    assert_matches_manifest(walk_with_node(node, path), manifest)


def test_javascript_decoder_reassembles_chunked_leaves(node: str, tmp_path: Path, trained: Any) -> None:
    path = tmp_path / "chunked.msgpack"
    MsgpackFormat(max_leaf_bytes=4096).write(
        from_torch(trained[2]), path, WriteContext(), NoOptions()
    )  # fc1.weight: 192000 bytes
    manifest = converters.manifest(path)
    assert_matches_manifest(walk_with_node(node, path), manifest)
