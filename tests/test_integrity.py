"""Stored BLAKE3 digests catch corrupted bytes: verify --deep, load(check=True), and conversions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import builtin_suffixes

import converters
from converters.core.errors import CorruptFileError
from converters.core.sources import FileRange

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def flip_one_bit(path: Path, tensor_path: tuple[str | int, ...]) -> None:
    """Flip the lowest bit of the middle byte of one tensor, in place."""
    ref = dict(converters.read(path).unique_tensors())[tensor_path]
    assert isinstance(ref.source, FileRange)
    position = ref.source.offset + ref.source.length // 2
    data = bytearray(path.read_bytes())
    data[position] ^= 1
    path.write_bytes(bytes(data))


TARGET = ("optimizer_state_dict", "state", 4, "momentum_buffer")  # fc1's momentum, 192000 bytes


@pytest.mark.parametrize("suffix", builtin_suffixes())
def test_a_flipped_bit_is_reported_with_the_tensor_path(tmp_path: Path, recipe_pt: Path, suffix: str) -> None:
    path = converters.convert(recipe_pt, tmp_path / f"c{suffix}")
    assert converters.verify(path, deep=True) == []
    flip_one_bit(path, TARGET)

    problems = converters.verify(path, deep=True)
    digest_problem = (
        re.escape(
            f"{path}: optimizer_state_dict/state/4/momentum_buffer: tensor bytes do not match the stored BLAKE3 digest"
        )
        + r" \(stored [0-9a-f]{64}, bytes hash to [0-9a-f]{64}\)"
    )
    if suffix in (".pt", ".npz"):
        # A zip record also stores a CRC-32 of its bytes: both checks name the tensor.
        crc_problem = re.escape(f"{path}: optimizer_state_dict/state/4/momentum_buffer: zip record ") + r".*CRC-32.*"
        assert len(problems) == 2 and re.fullmatch(crc_problem, problems[0]), problems
        problems = problems[1:]
    assert len(problems) == 1
    assert re.fullmatch(digest_problem, problems[0])
    with pytest.raises(CorruptFileError, match=r"optimizer_state_dict/state/4/momentum_buffer: "):
        converters.load(path, check=True)
    # A checked conversion refuses, writing nothing.
    with pytest.raises(CorruptFileError, match=r"at optimizer_state_dict/state/4/momentum_buffer: "):
        converters.convert(path, tmp_path / "copy.pt", check=True)
    assert not (tmp_path / "copy.pt").exists()
    if suffix in (".pt", ".npz"):
        # The record's CRC-32 is checked by every conversion: the flipped bit is never laundered.
        with pytest.raises(CorruptFileError, match=r"zip record .* does not match its CRC-32"):
            converters.convert(path, tmp_path / "copy.msgpack")
        return
    # An unchecked one carries the stored digest along with the bytes, so the copy still tells.
    copy = converters.convert(path, tmp_path / "copy.msgpack")
    assert [p.split(": ", 1)[1] for p in converters.verify(copy, deep=True)] == [p.split(": ", 1)[1] for p in problems]


def test_cli_verify_deep(tmp_path: Path, recipe_pt: Path) -> None:
    path = converters.convert(recipe_pt, tmp_path / "c.safetensors")
    ok = subprocess.run([sys.executable, str(CLI), "verify", "--deep", path], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == f"intact: every stored digest of {path} matches its tensor bytes\n"
    flip_one_bit(path, ("model_state_dict", "fc1.weight"))
    bad = subprocess.run([sys.executable, str(CLI), "verify", "--deep", path], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[0] == f"1 difference(s) in {path}:"
    assert "model_state_dict/fc1.weight: tensor bytes do not match the stored BLAKE3 digest" in bad.stdout
    usage = subprocess.run([sys.executable, str(CLI), "verify", path], capture_output=True, text=True)
    assert usage.returncode == 2 and "give two files, or --deep" in usage.stderr


def test_files_without_stored_digests_are_never_called_intact(recipe_pt: Path) -> None:
    # torch.save wrote recipe_pt: there is nothing to check its bytes against, and verify says so.
    cannot = f"{recipe_pt}: no stored digests for 20 of 20 tensors: cannot check them"
    [problem] = converters.verify(recipe_pt, deep=True)
    assert problem.startswith(cannot)
    assert [p for p in converters.verify(recipe_pt, recipe_pt, deep=True) if not p.startswith(cannot)] == []
    assert converters.verify(recipe_pt, recipe_pt) == []  # comparing two files needs no digests
    result = subprocess.run([sys.executable, str(CLI), "verify", "--deep", recipe_pt], capture_output=True, text=True)
    assert result.returncode == 1 and cannot in result.stdout
