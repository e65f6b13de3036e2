"""A dtype cast stays visible: every format records what each cast tensor was made from (source
dtype, BLAKE3 of the source bytes), the manifest and ``inspect`` show it, later conversions keep it,
the tree digest covers it, and a malformed record is refused. Also: ``inspect`` shows the file's
own metadata (safetensors ``__metadata__``, a shard index's ``metadata``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from blake3 import blake3
from helpers import tensor_bytes
from safetensors.torch import save_file

import converters
from converters.cli import main
from converters.core.errors import CorruptFileError

SCHEMA = json.loads((Path(__file__).parent.parent / "schemas" / "manifest.schema.json").read_text())
DESTINATIONS = ["out.safetensors", "out.pt", "out.msgpack", "out.onnx", "shards"]


def _source(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    tensors = {
        "w": torch.randn(4, 6),
        "steps": torch.arange(5),
        "b": torch.randn(6, dtype=torch.float64),
        "half": torch.randn(3).to(torch.bfloat16),
    }
    path = tmp_path / "src.pt"
    torch.save(tensors, path)
    return path, tensors


def _convert(*args: object) -> None:
    assert main(["convert", *map(str, args), "--quiet"]) == 0


def _digest(tensor: torch.Tensor) -> str:
    return str(blake3(tensor_bytes(tensor)).hexdigest())


def _casts(path: Path) -> dict[str, Any]:
    manifest = converters.manifest(path)
    jsonschema.validate(manifest, SCHEMA)
    return {entry["key"]: entry.get("cast") for entry in manifest["tensors"]}


@pytest.mark.parametrize("name", DESTINATIONS)
def test_every_format_records_the_source_dtype_and_digest_and_keeps_them(tmp_path: Path, name: str) -> None:
    src, tensors = _source(tmp_path)
    out = tmp_path / name
    extra = ["--max-shard-size", "100"] if name == "shards" else []
    _convert(src, out, "--dtype", "float16", *extra)
    expected = {
        "w": {"from": "float32", "blake3": _digest(tensors["w"])},
        "steps": None,  # integers are not cast
        "b": {"from": "float64", "blake3": _digest(tensors["b"])},
        "half": {"from": "bfloat16", "blake3": _digest(tensors["half"])},
    }
    assert _casts(out) == expected
    assert converters.verify(out, deep=True) == []
    # A later conversion without a cast keeps the history, to every format.
    for again in DESTINATIONS:
        hop = tmp_path / f"hop-{again}"
        _convert(out, hop, *(["--max-shard-size", "100"] if again == "shards" else []))
        assert _casts(hop) == expected, again
        assert converters.verify(hop, deep=True) == [], again


def test_the_stored_digest_of_our_source_is_the_one_recorded(tmp_path: Path) -> None:
    src, _ = _source(tmp_path)
    ours = tmp_path / "f32.safetensors"
    _convert(src, ours)
    stored = {entry["key"]: entry["blake3"] for entry in converters.manifest(ours)["tensors"]}
    out = tmp_path / "bf16.msgpack"
    _convert(ours, out, "--dtype", "bfloat16")
    assert _casts(out)["w"] == {"from": "float32", "blake3": stored["w"]}
    assert "half" not in {k for k, v in _casts(out).items() if v is not None}  # already bfloat16: not cast


def test_a_second_cast_records_the_latest_source(tmp_path: Path) -> None:
    src, _ = _source(tmp_path)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _convert(src, first, "--dtype", "float16")
    _convert(first, second, "--dtype", "float32")
    loaded = converters.load(first)
    assert _casts(second)["w"] == {"from": "float16", "blake3": _digest(loaded["w"])}


def test_the_tree_digest_covers_the_cast_record(tmp_path: Path) -> None:
    src, _ = _source(tmp_path)
    out = tmp_path / "out.safetensors"
    _convert(src, out, "--dtype", "float16")
    data = bytearray(out.read_bytes())
    at = data.index(b'\\"from\\":\\"float32\\"') + len(b'\\"from\\":\\"float')
    data[at : at + 2] = b"64"  # float32 -> float64, same length: the header still parses
    out.write_bytes(bytes(data))
    assert _casts(out)["w"]["from"] == "float64"
    problems = converters.verify(out, deep=True)
    assert problems and "tree" in problems[0], problems


def _safetensors_with_casts(path: Path, record: Any) -> Path:
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, str(path), metadata={"sdconvert.casts": json.dumps(record)})
    return path


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"w": {"from": "int8", "blake3": "0" * 64}}, "must be {'from'"),
        ({"w": {"from": "float32", "blake3": "0" * 63}}, "must be {'from'"),
        ({"w": {"from": "float32", "blake3": "0" * 64, "more": 1}}, "must be {'from'"),
        ({"w": ["float32", "0" * 64]}, "must be {'from'"),
        ({"nope": {"from": "float32", "blake3": "0" * 64}}, "not a stored tensor"),
        (["w"], "must map tensor keys"),
    ],
)
def test_a_malformed_cast_record_is_refused(tmp_path: Path, record: Any, message: str) -> None:
    path = _safetensors_with_casts(tmp_path / "bad.safetensors", record)
    with pytest.raises(CorruptFileError, match=message.replace("{", r"\{").replace("(", r"\(")):
        converters.read(path)


def test_inspect_shows_casts_and_the_files_own_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _source(tmp_path)
    out = tmp_path / "out.safetensors"
    _convert(src, out, "--dtype", "bfloat16")
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "file metadata format: pt" in text
    assert re.search(r"^w +bfloat16  \[4, 6\]  \(cast from float32\)$", text, re.M)
    assert "cast: 1 tensor float32 → bfloat16" in text and "1 tensor float64 → bfloat16" in text
    assert "sdconvert." not in text  # our own keys are not the file's metadata

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(2)}, str(foreign), metadata={"format": "pt", "evil\n/x: pt": "a\x1b[2Jb"})
    assert main(["inspect", str(foreign)]) == 0
    text = capsys.readouterr().out
    assert "file metadata evil\\n/x: pt: a\\x1b[2Jb" in text
    assert "\x1b" not in text
    manifest = converters.manifest(foreign)
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["file"]["metadata"] == {"format": "pt", "evil\n/x: pt": "a\x1b[2Jb"}


def test_inspect_shows_a_shard_index_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, tensors = _source(tmp_path)
    folder = tmp_path / "shards"
    _convert(src, folder, "--max-shard-size", "100")
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert f"file metadata total_size: {total}" in text
    assert f"file metadata total_parameters: {sum(t.numel() for t in tensors.values())}" in text


def test_a_cast_of_a_source_without_digests_hashes_it_once_while_casting(tmp_path: Path) -> None:
    """The source digest of a cast from a file that stores none (a torch.save file) is learnt from
    the cast's own pass over the bytes; the recorded value is checked against an independent hash."""
    src = tmp_path / "big.pt"
    values = torch.arange(300_000, dtype=torch.float32) * 1.000001
    torch.save({"v": values}, src)
    out = tmp_path / "big.safetensors"
    _convert(src, out, "--dtype", "bfloat16")
    assert _casts(out)["v"] == {"from": "float32", "blake3": _digest(values)}
    loaded = converters.load(out)["v"]
    assert tensor_bytes(loaded) == tensor_bytes(values.to(torch.bfloat16))
