"""The sdconvert command: exit codes, one-line errors, --force, --select, inspect/schema/verify/formats/demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import assert_bit_identical, builtin_suffixes

import converters

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def sdconvert(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SDCONVERT_DEBUG"}
    return subprocess.run(
        [sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def test_convert_then_verify(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    out = tmp_path / "c.safetensors"
    result = sdconvert("convert", recipe_pt, out)
    assert result.returncode == 0 and result.stdout == f"wrote {out}\n"
    assert_bit_identical(trained[2], converters.load(out))
    verified = sdconvert("verify", recipe_pt, out)
    assert verified.returncode == 0 and verified.stdout.startswith("bit-identical")


def test_convert_refuses_to_overwrite_without_force(tmp_path: Path, recipe_pt: Path) -> None:
    out = tmp_path / "c.safetensors"
    out.write_bytes(b"precious")
    assert_one_line_error(sdconvert("convert", recipe_pt, out), "exists; pass --force to replace it")
    assert out.read_bytes() == b"precious"
    assert sdconvert("convert", recipe_pt, out, "--force").returncode == 0
    assert out.read_bytes() != b"precious"


def test_convert_never_writes_over_the_source(recipe_pt: Path) -> None:
    before = recipe_pt.read_bytes()
    assert_one_line_error(sdconvert("convert", recipe_pt, recipe_pt, "--force"), "the destination is the source file")
    assert recipe_pt.read_bytes() == before


def test_select_writes_the_bare_model_weights(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    out = tmp_path / "model.safetensors"
    assert sdconvert("convert", recipe_pt, out, "--select", "model_state_dict").returncode == 0
    state = safetensors.torch.load_file(out)
    assert_bit_identical(dict(sorted(trained[0].state_dict().items())), dict(sorted(state.items())))


def test_select_an_int_keyed_subtree(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    out = tmp_path / "state0.pt"
    assert sdconvert("convert", recipe_pt, out, "--select", "optimizer_state_dict/state/0").returncode == 0
    assert_bit_identical(trained[1].state_dict()["state"][0], torch.load(out))


def test_select_a_missing_key_is_a_clear_error(tmp_path: Path, recipe_pt: Path) -> None:
    result = sdconvert("convert", recipe_pt, tmp_path / "x.pt", "--select", "model_state_dict/nope")
    assert_one_line_error(result, "at model_state_dict: no key 'nope' (keys: 'conv1.weight'")
    assert not (tmp_path / "x.pt").exists()


def test_explicit_formats(tmp_path: Path, recipe_pt: Path) -> None:
    odd = tmp_path / "weights.data"
    assert sdconvert("convert", recipe_pt, odd, "--to", "safetensors").returncode == 0
    back = tmp_path / "back.bin"
    assert sdconvert("convert", odd, back, "--from", "safetensors", "--to", "pt").returncode == 0
    assert sdconvert("verify", recipe_pt, back).returncode == 0


def test_inspect_lists_keys_dtypes_shapes_then_optimizer(recipe_pt: Path) -> None:
    result = sdconvert("inspect", recipe_pt)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{recipe_pt}: pt (torch zip archive), ") and lines[0].endswith("20 tensors (484.4 KiB)")
    assert "  conv1.weight  float32   [6, 3, 5, 5]" in lines
    assert "  fc3.bias      float32   [10]" in lines
    assert "      momentum_buffer  float32   [6, 3, 5, 5]" in lines
    assert "      lr: 0.001" in lines and "      momentum: 0.9" in lines
    assert lines.index("optimizer_state_dict:") > lines.index("  fc3.bias      float32   [10]")


def test_inspect_json_and_schema_give_the_manifest(tmp_path: Path, recipe_pt: Path) -> None:
    shown = json.loads(sdconvert("inspect", recipe_pt, "--json").stdout)
    out = tmp_path / "schema.json"
    result = sdconvert("schema", recipe_pt, "-o", out)
    assert result.returncode == 0
    assert json.loads(out.read_text()) == shown == converters.manifest(recipe_pt)
    assert json.loads(sdconvert("schema", recipe_pt).stdout) == shown


def test_verify_reports_differences_with_exit_1(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.safetensors"
    converters.save({"w": torch.zeros(3), "lr": 0.1, "steps": (1, 2)}, a)
    converters.save({"w": torch.tensor([0.0, -0.0, 0.0]), "lr": 0.1, "steps": [1, 2]}, b)
    result = sdconvert("verify", a, b)
    assert result.returncode == 1
    # The tensors first (matched by path, with how much they differ), then everything else.
    assert result.stdout.splitlines() == [
        f"2 difference(s) between {a} and {b}:",
        "  tensors: 0 bit-identical, 1 differ, 0 only in the first, 0 only in the second",
        "  w: 1 of 3 elements differ, max |Δ| 0",
        "  other differences (containers, key order, values):",
        "    steps: tuple vs list",
    ]
    tensors_only = sdconvert("verify", "--tensors", a, b)
    assert tensors_only.returncode == 1  # -0.0 is not 0.0, bit for bit
    report = json.loads(sdconvert("verify", "--json", a, b).stdout)
    assert report["same"] is False and report["tensors"]["differ"][0]["path"] == "w"
    assert report["other"] == ["steps: tuple vs list"]


def test_verify_tensors_ignores_containers_and_key_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pt"
    converters.save(OrderedDict([("x", torch.ones(2)), ("y", torch.zeros(3))]), a)
    converters.save({"y": torch.zeros(3), "x": torch.ones(2)}, b)
    assert sdconvert("verify", a, b).returncode == 1
    result = sdconvert("verify", "--tensors", a, b)
    assert result.returncode == 0 and result.stdout.startswith(f"tensors bit-identical: {a} and {b} (2 tensors)")


def test_formats_lists_formats_and_dtype_matrix() -> None:
    result = sdconvert("formats")
    assert result.returncode == 0
    assert "pt           .pt .pth .bin" in result.stdout
    assert "safetensors  .safetensors" in result.stdout
    lines = result.stdout.splitlines()
    columns = next(line for line in lines if line.startswith("dtype ")).split()
    complex128 = dict(zip(columns, next(line for line in lines if line.startswith("complex128")).split(), strict=True))
    # safetensors and gguf have no C128
    assert [complex128[name] for name in ("safetensors", "pt", "msgpack", "onnx", "dcp", "gguf")] == (
        ["-", "yes", "yes", "yes", "yes", "-"]
    )
    # every format's write options, with the flag and the library keyword
    assert re.search(r"onnx +--external-data +external_data ", result.stdout)
    assert re.search(r"safetensors +--max-shard-size +max_shard_size ", result.stdout)
    assert re.search(r"gguf +--gguf-alignment +alignment ", result.stdout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("inspect", "missing.pt"), "missing.pt: no such file"),
        (("convert", "missing.pt", "out.pt"), "missing.pt: no such file"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("convert", "only-one-arg"), "the following arguments are required: dst"),
        (("inspect", "junk.pt"), "junk.pt: not a readable zip archive"),
        (("convert", "junk.pt", "out.xyz"), "out.xyz: cannot write the format from the name"),
    ],
)
def test_bad_usage_and_bad_input_exit_2_with_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    (tmp_path / "junk.pt").write_bytes(b"junk" * 10)
    assert_one_line_error(sdconvert(*args, cwd=tmp_path), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt"]


def test_demo_runs_the_main_job(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = sdconvert("demo", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "every format round-tripped bit-identically" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"checkpoint{suffix}" for suffix in builtin_suffixes()]  # every single-file format
        + [
            "checkpoint.graph.onnx",
            "checkpoint.schema.json",
            "ddp-stripped.safetensors",
            "ddp.pt",
            "model.safetensors",
            "source.pt",
        ]
    )
    assert {"checkpoint.pt", "checkpoint.gguf"} <= {p.name for p in out.iterdir()}
    assert "matches torch in onnxruntime" in result.stdout
    assert "--strip-prefix auto: loads into a fresh Net, bit-identical" in result.stdout
    for line in result.stdout.splitlines():
        words = line.split()
        formats = ("pt", "safetensors", "msgpack", "onnx", "gguf", "npz")
        if len(words) > 1 and words[0] in formats and words[1] != "graph":
            assert "ok: rebuilt Net + SGD bit-identical" in line


def test_inspect_totals_per_dtype_and_patterns(tmp_path: Path) -> None:
    path = tmp_path / "llm.safetensors"
    state = {f"layers.{i}.attn.q.weight": torch.zeros(4, 4) for i in range(12)}
    state.update({f"layers.{i}.norm.weight": torch.zeros(4) for i in range(12)})
    state["embed.weight"] = torch.zeros(10, 4, dtype=torch.bfloat16)
    state["layers.3.extra"] = torch.zeros(2, dtype=torch.int64)  # alone: listed as itself
    converters.save(state, path)
    plain = sdconvert("inspect", path).stdout.splitlines()
    assert "layers.11.norm.weight    float32   [4]" in plain
    assert plain[-1] == (
        "totals: float32: 24 tensors, 240 parameters, 960 B; bfloat16: 1 tensor, 40 parameters, 80 B; "
        "int64: 1 tensor, 2 parameters, 16 B"
    )
    collapsed = sdconvert("inspect", "--patterns", path).stdout.splitlines()
    assert "layers.#.attn.q.weight  float32   [4, 4]  ×12" in collapsed
    assert "layers.#.norm.weight    float32   [4]  ×12" in collapsed
    assert "layers.3.extra          int64     [2]" in collapsed and len(collapsed) == 7
    assert collapsed[1] == "file metadata format: pt"  # the file's own __metadata__, before the tree


def test_a_reader_that_leaves_early_is_not_an_error() -> None:
    """`sdconvert formats | head -1`: the pipe closes before we write; exit 0, nothing on stderr
    (a broken pipe is an OSError, which must not be reported as bad input)."""
    process = subprocess.Popen([sys.executable, str(CLI), "formats"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr) == (0, b"")
