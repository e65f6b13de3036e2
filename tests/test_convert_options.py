"""The transformation flags of `sdconvert convert` end to end: every flag through the CLI, the dry
run, the errors (exit 2, one line, nothing written), and options that imply the format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bit_identical, builtin_suffixes

import converters
from converters import recipe

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def sdconvert(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def ddp_pt(tmp_path: Path, trained: tuple[Any, Any, dict[str, Any]]) -> Path:
    """The recipe checkpoint as DistributedDataParallel saves it: every model key under module."""
    net, optimizer, _ = trained
    path = tmp_path / "ddp.pt"
    model = {f"module.{key}": value for key, value in net.state_dict().items()}
    torch.save({"model_state_dict": model, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3}, path)
    return path


@pytest.mark.parametrize("suffix", builtin_suffixes())
def test_strip_prefix_select_and_cast_through_the_cli_to_every_format(
    tmp_path: Path, ddp_pt: Path, trained: tuple[Any, Any, dict[str, Any]], suffix: str
) -> None:
    out = tmp_path / f"weights{suffix}"
    result = sdconvert("convert", ddp_pt, out, "--select", "model_state_dict", "--strip-prefix", "auto", "--quiet")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    fresh = recipe.Net()
    fresh.load_state_dict(converters.load(out))  # the classic "Missing key(s): module.conv1.weight" is gone
    assert_bit_identical(dict(fresh.state_dict()), dict(trained[0].state_dict()))
    cast = tmp_path / f"bf16{suffix}"
    assert sdconvert("convert", out, cast, "--dtype", "bfloat16", "--quiet").returncode == 0
    expected = {key: value.to(torch.bfloat16) for key, value in trained[0].state_dict().items()}
    assert_bit_identical(dict(converters.load(cast)), expected)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, ddp_pt: Path) -> None:
    out = tmp_path / "w.safetensors"
    args = ("convert", ddp_pt, out, "--strip-prefix", "auto", "--exclude", "optimizer_state_dict", "--dry-run")
    result = sdconvert(*args)
    assert result.returncode == 0 and not out.exists()
    assert "model_state_dict/conv1.weight" in result.stdout and "optimizer_state_dict" in result.stdout
    planned = json.loads(sdconvert(*args, "--json").stdout)
    assert planned["destination"] == {"path": str(out), "format": "safetensors"}
    assert [t["path"] for t in planned["tensors"]][:2] == [
        "model_state_dict/conv1.weight",
        "model_state_dict/conv1.bias",
    ]
    assert list(tmp_path.iterdir()) == [ddp_pt]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rename", "a(=b"], "--rename 'a(=b': invalid regex"),
        (["--rename", "nothing_like_this=x"], "matches no key"),
        (["--exclude", "nowhere"], "--exclude nowhere: matches nothing"),
        (["--select", "model_state_dict", "--rename", "conv.=x"], "would both become"),
        (["--dtype", "int8"], "--dtype int8"),
        (["--select", "epoch", "--dtype", "bfloat16"], "no floating-point tensor to cast"),
        (["--strip-prefix", "modul_"], "--strip-prefix modul_"),
        (["--ties", "copy"], "--ties copy"),
        (["--json"], "--json goes with --dry-run"),
        (["--dtype-include", "x"], "goes with --dtype"),
    ],
)
def test_bad_transformation_options_exit_2_with_one_line(
    tmp_path: Path, ddp_pt: Path, args: list[str], message: str
) -> None:
    result = sdconvert("convert", ddp_pt, tmp_path / "out.safetensors", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == [ddp_pt]


def test_a_cast_to_a_dtype_the_destination_cannot_hold_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "c.pt"
    torch.save({"w": torch.ones(2, dtype=torch.float64), "z": torch.ones(2, dtype=torch.complex128)}, source)
    result = sdconvert("convert", source, tmp_path / "c.safetensors", "--dtype", "float16")
    assert result.returncode == 2 and "safetensors cannot hold dtype complex128" in result.stderr


def test_max_shard_size_implies_the_sharded_folder_and_refuses_a_file_name(tmp_path: Path, ddp_pt: Path) -> None:
    folder = tmp_path / "shards"
    assert sdconvert("convert", ddp_pt, folder, "--max-shard-size", "100KB").returncode == 0
    assert (folder / "model.safetensors.index.json").is_file()
    assert converters.verify(ddp_pt, folder) == []
    named = sdconvert("convert", ddp_pt, tmp_path / "out.safetensors", "--max-shard-size", "100KB")
    assert named.returncode == 2 and "name it without the .safetensors suffix (e.g. " in named.stderr
    assert not (tmp_path / "out.safetensors").exists()
