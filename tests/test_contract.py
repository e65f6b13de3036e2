"""The format contract, the write context and the transform seams hold for every built-in format."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from helpers import assert_bit_identical

import converters
from converters.core.contract import option_specs
from converters.core.sources import BufferSource, read_all
from converters.core.tree import Checkpoint, TensorRef
from converters.formats import BUILTIN_MODULES
from converters.transforms import Select, map_tensors

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = list(BUILTIN_MODULES)


def destination(tmp_path: Path, name: str, stem: str = "out") -> Path:
    fmt = converters.registry.get(name)
    return tmp_path / (stem if fmt.folder else f"{stem}{fmt.suffixes[0]}")


# ------------------------------------------------------------------------------ declarations


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_declares_the_whole_contract(name: str) -> None:
    fmt = converters.registry.get(name)
    assert isinstance(fmt, converters.Format)
    assert fmt.name == name and isinstance(fmt.folder, bool) and fmt.dtype_codes
    assert set(fmt.dtype_codes) <= set(converters.core.dtypes.DTYPES)
    assert dataclasses.is_dataclass(fmt.Options) and fmt.Options.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for spec in option_specs(fmt.Options):  # each with help text and a flag the CLI can build
        assert spec.help and spec.flag.startswith("--")
    assert fmt.folder or fmt.suffixes


def test_builtin_suffixes_never_end_with_one_another() -> None:
    """The registry matches suffixes importing one format at a time; that finds the longest match
    only while no built-in suffix ends with another built-in's."""
    owned = [(suffix, name) for name in BUILTINS for suffix in converters.registry.get(name).suffixes]
    for suffix, name in owned:
        for other, other_name in owned:
            if other_name != name:
                assert not suffix.endswith(other), f"{name}'s {suffix} ends with {other_name}'s {other}"


@pytest.mark.parametrize("name", BUILTINS)
def test_unknown_options_get_one_wording(tmp_path: Path, name: str) -> None:
    fmt = converters.registry.get(name)
    known = [item.name for item in dataclasses.fields(fmt.Options)]
    takes = f"its options are {', '.join(known)}" if known else "it takes no options"
    with pytest.raises(converters.ConverterError, match=rf"^the {name} writer has no option 'bogus'; {takes}$"):
        converters.save({"w": torch.ones(2)}, destination(tmp_path, name), format=name, bogus=1)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ the write context


@pytest.mark.parametrize("name", BUILTINS)
def test_every_writer_reports_progress_for_every_tensor_byte(tmp_path: Path, recipe_pt: Path, name: str) -> None:
    seen: list[int] = []
    converters.convert(
        recipe_pt, destination(tmp_path, name), dst_format=name, progress=lambda done, _: seen.append(done)
    )
    assert sum(seen) == sum(ref.nbytes for _, ref in converters.read(recipe_pt).unique_tensors())


@pytest.mark.parametrize("name", BUILTINS)
def test_every_writer_skips_fsync_when_told(
    tmp_path: Path, recipe_pt: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    converters.convert(recipe_pt, destination(tmp_path, name, "fast"), dst_format=name, fsync=False)
    assert calls == []
    converters.convert(recipe_pt, destination(tmp_path, name, "durable"), dst_format=name)
    assert calls, "the default write is durable: at least the output is fsynced"


@pytest.mark.parametrize("name", BUILTINS)
def test_every_writer_refuses_bytes_that_do_not_match_their_stored_digest_when_checking(
    tmp_path: Path, name: str
) -> None:
    source = tmp_path / "source.safetensors"
    converters.save({"w": torch.arange(64, dtype=torch.float32)}, source)
    data = bytearray(source.read_bytes())
    data[-1] ^= 1  # a flipped bit in the last tensor byte; the header's digest no longer matches
    source.write_bytes(bytes(data))
    with pytest.raises(converters.CorruptFileError, match="do not match the stored BLAKE3 digest"):
        converters.convert(source, destination(tmp_path, name), dst_format=name, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]


# ------------------------------------------------------------------------------ the API around readers


class _SetReader(converters.FormatBase):
    """A plugin whose reader returns something the tree cannot hold: the API must refuse it (exit 2)."""

    name = "setreader"
    suffixes = (".setreader",)
    description = "returns a set"
    dtype_codes: ClassVar[dict[str, str]] = {"float32": "f4"}

    def read(self, path: Path, budget: Any) -> Checkpoint:
        return Checkpoint({"bad": {1, 2}}, path)

    def write(self, checkpoint: Checkpoint, path: Path, context: Any, options: Any) -> None:
        raise AssertionError("never called: float64 is refused before")


def test_the_api_validates_every_tree_and_checks_dtypes_whatever_the_plugin(tmp_path: Path) -> None:
    converters.registry.register(_SetReader())
    try:
        path = tmp_path / "x.setreader"
        path.write_bytes(b"anything")
        with pytest.raises(
            converters.UnsupportedValueError, match=r"at bad: cannot represent a value of type builtins\.set"
        ):
            converters.read(path)
        with pytest.raises(converters.UnsupportedValueError, match="at w: setreader cannot hold dtype float64"):
            converters.save({"w": torch.ones(1, dtype=torch.float64)}, tmp_path / "y.setreader")
    finally:
        converters.registry.unregister("setreader")


@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--json"], ["schema"], ["convert"]])
def test_a_misnamed_file_is_named_as_what_it_is_by_every_command(
    tmp_path: Path, recipe_pt: Path, command: list[str]
) -> None:
    misnamed = tmp_path / "x.safetensors"
    misnamed.write_bytes(recipe_pt.read_bytes())
    extra = [str(tmp_path / "y.msgpack")] if command == ["convert"] else []
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *command, str(misnamed), *extra], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert (
        result.stderr == f"sdconvert: {misnamed}: the name says safetensors but the contents are pt; "
        "pass --from pt (format='pt') or rename the file\n"
    )


# ------------------------------------------------------------------------------ tensors and transforms


def test_a_derived_tensor_never_keeps_the_digest_of_the_bytes_it_replaced() -> None:
    ref = TensorRef("float32", (2,), BufferSource.of(bytes(8))).with_stored_digest("ab" * 32)
    new_bytes = BufferSource.of(b"\x00\x00\x80\x3f" * 2)
    assert ref.derive(source=new_bytes).digest is None
    assert dataclasses.replace(ref, source=new_bytes).digest is None  # the old trap: replace() kept it
    with pytest.raises(TypeError):
        TensorRef("float32", (2,), new_bytes, "ab" * 32)  # type: ignore[call-arg]  # no digest argument
    assert ref.with_stored_digest(ref.digest).digest == "ab" * 32


def _negate(checkpoint: Checkpoint) -> Checkpoint:
    """A transformation that changes bytes: float32 tensors negated (sign bit flipped)."""

    def negate(_path: Any, ref: TensorRef) -> TensorRef:
        if ref.dtype != "float32":
            return ref
        data = bytearray(read_all(ref.source))
        for index in range(3, len(data), 4):
            data[index] ^= 0x80
        return ref.derive(source=BufferSource.of(bytes(data)))

    return map_tensors(checkpoint, negate)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".msgpack", ".onnx"])
def test_a_transform_that_changes_bytes_writes_fresh_digests_and_keeps_ties(tmp_path: Path, suffix: str) -> None:
    shared = torch.arange(6, dtype=torch.float32)
    source = tmp_path / "tied.safetensors"
    converters.save({"embed": shared, "head": shared, "steps": torch.tensor([3])}, source)
    out = tmp_path / f"negated{suffix}"
    converters.convert(source, out, transforms=[_negate])
    assert converters.verify(out, deep=True) == []  # digests of the new bytes, not the old
    loaded = converters.load(out)
    assert loaded["embed"] is loaded["head"]  # still one tensor at both paths
    assert_bit_identical(loaded, {"embed": -shared, "head": -shared, "steps": torch.tensor([3])})


def test_select_is_a_transform_and_composes(tmp_path: Path, recipe_pt: Path) -> None:
    out = tmp_path / "fc1.safetensors"
    converters.convert(recipe_pt, out, transforms=[Select("model_state_dict"), Select("fc1.weight")])
    assert_bit_identical(converters.load(out), torch.load(recipe_pt)["model_state_dict"]["fc1.weight"])
    assert converters.read(recipe_pt, transforms=[Select("optimizer_state_dict/param_groups/0/lr")]).tree == 0.001
