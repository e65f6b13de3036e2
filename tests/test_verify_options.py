"""`sdconvert verify A B` answering "are these the same weights?": --atol/--rtol (exact boundaries,
NaN and infinities), --cast-aware against files converted with --dtype, convert's key options
applied to A (--strip-prefix, --rename, --select/--exclude), --json, and bad options (exit 2)."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tensor_bytes

import converters
from converters.api import verify_report
from converters.core.compare import tensor_report
from converters.core.sources import BufferSource
from converters.core.tree import TensorRef

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def sdconvert(*args: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SDCONVERT_DEBUG"}
    return subprocess.run(
        [sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def pair(tmp_path: Path, first: Any, second: Any, suffix: str = ".safetensors") -> tuple[Path, Path]:
    a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    converters.save(first, a)
    converters.save(second, b)
    return a, b


def f32(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def from_bits(*bits: int) -> torch.Tensor:
    return torch.tensor(list(bits), dtype=torch.int64).to(torch.int32).view(torch.float32)


# ------------------------------------------------------------------------------ tolerances

# (A, B, atol, rtol, passes): the boundary element is exactly representable, so "<=" is tested
# at equality; the values one ulp beyond it fail. |a - b| <= atol + rtol * |b| (b: the second).
BELOW = math.nextafter(0.5, 0.0)
BOUNDARIES = [
    ((1.0, 2.0), (1.0, 2.5), 0.5, None, True),  # |Δ| == atol
    ((1.0, 2.0), (1.0, 2.5), BELOW, None, False),  # atol one ulp short
    ((3.0,), (2.0,), None, 0.5, True),  # |Δ| 1 == rtol * |b| = 0.5 * 2
    ((3.0,), (2.0,), None, math.nextafter(0.5, 0.0), False),
    ((2.0,), (3.0,), None, 0.375, True),  # relative to the second: 0.375 * 3 = 1.125 >= 1
    ((3.0,), (2.0,), None, 0.375, False),  # ... and not to the first: 0.375 * 2 = 0.75 < 1
    ((3.0,), (2.0,), 0.25, 0.375, True),  # atol + rtol * |b| = 0.25 + 0.75 == 1
    ((3.0,), (2.0,), 0.25 - 2**-50, 0.375, False),  # (an ulp of 0.25 would round away in the sum)
    ((1.0, 2.0), (1.0, 2.5), 0.0, None, False),  # a tolerance of 0: equal values only
]


@pytest.mark.parametrize(("first", "second", "atol", "rtol", "passes"), BOUNDARIES)
def test_tolerance_boundary_through_the_cli_and_the_library(
    tmp_path: Path, first: tuple[float, ...], second: tuple[float, ...], atol: Any, rtol: Any, passes: bool
) -> None:
    a, b = pair(tmp_path, {"w": f32(*first)}, {"w": f32(*second)})
    flags = [
        *(["--atol", repr(atol)] if atol is not None else []),
        *(["--rtol", repr(rtol)] if rtol is not None else []),
    ]
    result = sdconvert("verify", a, b, *flags)
    assert result.returncode == (0 if passes else 1), result.stdout + result.stderr
    problems = converters.verify(a, b, atol=atol, rtol=rtol)
    if passes:
        assert problems == []
        assert "w: within tolerance, max |Δ| " in result.stdout
        assert result.stdout.startswith(
            f"tensors within tolerance (atol {atol or 0:g}, rtol {rtol or 0:g}): {a} and {b}"
        )
    else:
        assert problems == [
            f"w: 1 of {len(first)} elements outside the tolerance, max |Δ| {abs(first[-1] - second[-1]):.3g}"
        ]
        assert f"  {problems[0]}" in result.stdout.splitlines()
    # without a tolerance the same files are never the same: bytes differ
    assert sdconvert("verify", a, b).returncode == 1


def test_the_report_distinguishes_identical_within_and_differing(tmp_path: Path) -> None:
    first = {"same": f32(1.0, 2.0), "near": f32(1.0, 2.0), "far": f32(1.0, 2.0), "ints": torch.arange(3)}
    second = {"same": f32(1.0, 2.0), "near": f32(1.0, 2.0625), "far": f32(1.0, 3.0), "ints": torch.arange(1, 4)}
    a, b = pair(tmp_path, first, second)
    result = sdconvert("verify", a, b, "--atol", "0.0625")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"2 difference(s) between {a} and {b}:",
        "  tensors: 1 bit-identical, 1 within tolerance (atol 0.0625, rtol 0), 2 differ, "
        "0 only in the first, 0 only in the second",
        "  near: within tolerance, max |Δ| 0.0625, 1 of 2 elements differ in value",
        "  far: 1 of 2 elements outside the tolerance, max |Δ| 1",
        "  ints: 3 of 3 elements differ, max |Δ| 1",  # integers: bit for bit, whatever the tolerance
    ]
    report = verify_report(a, b, atol=0.0625)
    assert report.tensors.identical == ["same"]
    assert report.tensors.within == [("near", "max |Δ| 0.0625, 1 of 2 elements differ in value", 0.0625)]
    assert [path for path, _ in report.tensors.differ] == ["far", "ints"]
    assert not report.same


def test_nan_and_infinities(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    base = {"w": f32(nan, inf, -inf, 0.0, 1.0)}
    cases = {
        # NaN (another payload) where the other is NaN, the same infinities, -0.0 for 0.0: equal values
        "payloads": ({"w": torch.cat([from_bits(0x7FC00123), f32(inf, -inf, -0.0, 1.0)])}, "0", 0),
        "nan_vs_number": ({"w": f32(nan, inf, -inf, 0.0, nan)}, "1e30", 1),
        "inf_vs_finite": ({"w": f32(nan, 3e38, -inf, 0.0, 1.0)}, "1e38", 1),
        "inf_vs_minus_inf": ({"w": f32(nan, -inf, -inf, 0.0, 1.0)}, "1e38", 1),
    }
    for name, (second, atol, code) in cases.items():
        (tmp_path / name).mkdir()
        a, b = pair(tmp_path / name, base, second)
        result = sdconvert("verify", a, b, "--atol", atol)
        assert result.returncode == code, (name, result.stdout)
        assert sdconvert("verify", a, b).returncode == 1, name  # the bytes differ
        if name == "payloads":
            assert "w: within tolerance, max |Δ| 0: equal values, different bits" in result.stdout
        if name == "nan_vs_number":
            assert "w: 1 of 5 elements outside the tolerance, max |Δ| 0, 1 NaN where the other is not" in result.stdout
        if name.startswith("inf"):
            assert "w: 1 of 5 elements outside the tolerance, max |Δ| inf" in result.stdout


def test_two_floating_dtypes_are_compared_as_float64_only_with_a_tolerance(tmp_path: Path) -> None:
    a, b = pair(
        tmp_path,
        {"w": f32(1.0, 1.0009765625), "n": torch.arange(2)},
        {
            "w": torch.tensor([1.0, 1.0], dtype=torch.float16),
            "n": torch.arange(2, dtype=torch.int32),
        },
    )
    plain = sdconvert("verify", a, b)
    assert plain.returncode == 1 and "  w: float32[2] vs float16[2]" in plain.stdout.splitlines()
    loose = sdconvert("verify", a, b, "--atol", "0.0009765625", "--tensors")
    assert loose.returncode == 1  # int64 vs int32 stays a difference
    lines = loose.stdout.splitlines()
    within = "  w: within tolerance, float32 vs float16 compared as float64: max |Δ| 0.000977, "
    assert within + "1 of 2 elements differ in value" in lines
    assert "  n: int64[2] vs int32[2]" in lines
    tight = sdconvert("verify", a, b, "--atol", "0.0009", "--tensors")
    assert (
        "  w: float32 vs float16 compared as float64: 1 of 2 elements outside the tolerance, max |Δ| 0.000977"
        in tight.stdout.splitlines()
    )


def test_a_tolerance_compares_in_bounded_memory() -> None:
    count = 8 * 2**20  # 32 MiB of float32 per side; as float64 all at once it would be 64 MiB each
    left = bytearray(count * 4)
    right = bytearray(left)
    struct.pack_into("<f", right, 4 * (count - 1), 0.5)
    a = {"w": TensorRef("float32", (count,), BufferSource.of(left))}
    b = {"w": TensorRef("float32", (count,), BufferSource.of(right))}
    tracemalloc.start()
    try:
        report = tensor_report(a, b, atol=0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.within == [("w", f"max |Δ| 0.5, 1 of {count} elements differ in value", 0.5)]
    assert peak < 40 * 2**20, f"peak {peak >> 20} MiB"


# ------------------------------------------------------------------------------ --cast-aware


@pytest.mark.parametrize(("dtype", "suffix"), [("bfloat16", ".safetensors"), ("float16", ".pt")])
def test_cast_aware_recognises_a_file_converted_with_dtype(
    tmp_path: Path, recipe_pt: Path, trained: tuple[Any, Any, dict[str, Any]], dtype: str, suffix: str
) -> None:
    cast = tmp_path / f"cast{suffix}"
    assert sdconvert("convert", recipe_pt, cast, "--dtype", dtype, "--quiet").returncode == 0
    # the premise, judged by torch and bytes: the file holds torch's own cast of every weight
    loaded = converters.load(cast)["model_state_dict"]
    for key, value in trained[0].state_dict().items():
        assert tensor_bytes(loaded[key]) == tensor_bytes(value.to(getattr(torch, dtype))), key
    floats = sum(1 for _, ref in converters.read(recipe_pt).tensors() if ref.dtype == "float32")
    assert floats == 20  # 10 weights and biases, 10 momentum buffers

    assert sdconvert("verify", recipe_pt, cast).returncode == 1
    result = sdconvert("verify", recipe_pt, cast, "--cast-aware")
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[:2] == [
        f"tensors bit-identical after casting the first's tensors to the second's dtypes: {recipe_pt} and {cast} "
        f"({floats} tensors)",
        f"  tensors: {floats} bit-identical ({floats} compared after casting the first's tensor to the second's "
        "dtype), 0 differ, 0 only in the first, 0 only in the second",
    ]
    report = json.loads(sdconvert("verify", recipe_pt, cast, "--cast-aware", "--json").stdout)
    assert report["same"] is True and report["bit_identical"] is False
    assert report["tensors"]["counts"]["compared_after_cast"] == floats
    assert report["tensors"]["compared_after_cast"][0] == {
        "path": "model_state_dict/conv1.weight",
        "from_dtype": "float32",
    }
    assert converters.verify(recipe_pt, cast, cast_aware=True) == []

    # one bit of one element changed: found, and named
    tampered = converters.load(cast)
    bias = tampered["model_state_dict"]["fc1.bias"].clone()
    bias.view(torch.int16)[7] ^= 1
    tampered["model_state_dict"]["fc1.bias"] = bias
    bad = tmp_path / f"tampered{suffix}"
    converters.save(tampered, bad)
    failed = sdconvert("verify", recipe_pt, bad, "--cast-aware")
    assert failed.returncode == 1
    wanted = (
        f"  model_state_dict/fc1.bias: after casting the first's float32 to {dtype}: 1 of 120 elements differ, max |Δ| "
    )
    assert [line for line in failed.stdout.splitlines() if line.startswith(wanted)], failed.stdout
    assert failed.stdout.splitlines()[0] == f"1 difference(s) between {recipe_pt} and {bad}:"
    [problem] = converters.verify(recipe_pt, bad, cast_aware=True)
    assert problem.startswith(wanted.strip())


def test_cast_aware_leaves_integers_and_shapes_alone(tmp_path: Path) -> None:
    a, b = pair(
        tmp_path,
        {"w": f32(1.0, 2.0), "n": torch.arange(2), "s": f32(1.0, 2.0)},
        {
            "w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
            "n": torch.arange(2, dtype=torch.int32),
            "s": torch.tensor([1.0], dtype=torch.bfloat16),
        },
    )
    report = verify_report(a, b, cast_aware=True)
    assert report.tensors.identical == ["w"] and report.tensors.cast_from == {"w": "float32"}
    assert report.tensors.differ == [("n", "int64[2] vs int32[2]"), ("s", "float32[2] vs bfloat16[1]")]


# ------------------------------------------------------------------------------ A transformed


@pytest.fixture
def ddp_pt(tmp_path: Path, trained: tuple[Any, Any, dict[str, Any]]) -> Path:
    """The recipe checkpoint with the model's state_dict as DistributedDataParallel gives it: every
    key (and every ``_metadata`` entry) under ``module.``."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    path = tmp_path / "ddp.pt"
    checkpoint = dict(trained[2])
    checkpoint["model_state_dict"] = Wrapper(trained[0]).state_dict()
    torch.save(checkpoint, path)
    return path


def test_strip_prefix_verifies_a_ddp_file_against_the_plain_one(ddp_pt: Path, recipe_pt: Path) -> None:
    plain = sdconvert("verify", ddp_pt, recipe_pt)
    assert plain.returncode == 1 and "  model_state_dict/module.conv1.weight: only in the first" in plain.stdout
    for prefix in ("auto", "module."):
        result = sdconvert("verify", ddp_pt, recipe_pt, "--strip-prefix", prefix)
        assert result.returncode == 0, result.stdout
        assert result.stdout.splitlines()[0] == f"bit-identical: {ddp_pt} and {recipe_pt}"  # _metadata too
        assert "  applied to the first: --strip-prefix" in result.stdout
    # it is A that is transformed: the other way round, B keeps its prefix (auto finds none in A)
    reverse = sdconvert("verify", recipe_pt, ddp_pt, "--strip-prefix", "auto")
    assert reverse.returncode == 1 and "  model_state_dict/module.conv1.weight: only in the second" in reverse.stdout
    assert converters.verify(ddp_pt, recipe_pt, strip_prefix="auto") == []


def test_select_and_strip_prefix_verify_a_ddp_checkpoint_against_bare_weights(
    tmp_path: Path, ddp_pt: Path, trained: tuple[Any, Any, dict[str, Any]]
) -> None:
    weights = tmp_path / "weights.safetensors"
    converters.save(trained[0].state_dict(), weights)
    result = sdconvert("verify", ddp_pt, weights, "--select", "model_state_dict", "--strip-prefix", "auto")
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        f"bit-identical: {ddp_pt} and {weights}",
        "  applied to the first: --select model_state_dict: kept 1 path, dropped 10 tensor(s)",
        "  applied to the first: --strip-prefix auto: removed 'module.' from 10 keys of <root>",
    ]
    assert sdconvert("verify", ddp_pt, weights, "--select", "model_state_dict").returncode == 1


def test_rename_select_and_exclude_apply_to_the_first(tmp_path: Path, recipe_pt: Path) -> None:
    renamed = tmp_path / "renamed.safetensors"
    rule = r"^fc(\d)\.=head\1."
    assert sdconvert("convert", recipe_pt, renamed, "--rename", rule, "--quiet").returncode == 0
    assert sdconvert("verify", recipe_pt, renamed).returncode == 1
    assert sdconvert("verify", recipe_pt, renamed, "--rename", rule).returncode == 0
    back = sdconvert("verify", renamed, recipe_pt, "--rename", r"^head(\d)\.=fc\1.", "--json")
    assert back.returncode == 0 and json.loads(back.stdout)["first_transformed"][0].startswith("--rename")

    weights = tmp_path / "model.safetensors"
    args = ("--select", "model_state_dict", "--exclude", "fc3.*", "--quiet")
    assert sdconvert("convert", recipe_pt, weights, *args).returncode == 0
    result = sdconvert("verify", recipe_pt, weights, *args[:4])
    assert result.returncode == 0, result.stdout
    assert converters.verify(recipe_pt, weights, select="model_state_dict", exclude="fc3.*") == []
    missing = ["fc3.weight: only in the first", "fc3.bias: only in the first"]
    assert converters.verify(recipe_pt, weights, select="model_state_dict", tensors_only=True) == missing
    assert converters.verify(recipe_pt, weights, select="model_state_dict") == [
        *missing,
        "<root>: keys only in the first: 'fc3.weight', 'fc3.bias'",
    ]


# ------------------------------------------------------------------------------ --json


def test_json_fields(tmp_path: Path) -> None:
    a, b = pair(
        tmp_path,
        {"module.w": f32(1.0, 2.0), "module.v": f32(1.0, 2.0), "module.x": f32(0.0)},
        {"w": f32(1.0, 2.25), "v": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "y": f32(0.0)},
    )
    result = sdconvert(
        "verify", a, b, "--json", "--atol", "0.25", "--rtol", "0.125", "--cast-aware", "--strip-prefix", "auto"
    )
    assert result.returncode == 1 and result.stderr == ""
    report = json.loads(result.stdout)
    assert report["same"] is False and report["bit_identical"] is False
    tensors = report["tensors"]
    assert tensors["tolerance"] == {"atol": 0.25, "rtol": 0.125}
    assert tensors["counts"] == {
        "bit_identical": 1,
        "within_tolerance": 1,
        "differ": 0,
        "only_in_first": 1,
        "only_in_second": 1,
        "compared_after_cast": 1,
    }
    assert tensors["identical"] == ["v"]
    assert tensors["compared_after_cast"] == [{"path": "v", "from_dtype": "float32"}]
    assert tensors["within_tolerance"] == [
        {"path": "w", "difference": "max |Δ| 0.25, 1 of 2 elements differ in value", "max_abs_diff": 0.25}
    ]
    assert (tensors["only_in_first"], tensors["only_in_second"]) == (["x"], ["y"])
    assert report["first_transformed"] == ["--strip-prefix auto: removed 'module.' from 3 keys of <root>"]
    assert report["tensors_only"] is False and report["integrity"] == []
    exact = json.loads(sdconvert("verify", a, a, "--json").stdout)
    assert exact["same"] is exact["bit_identical"] is True
    assert exact["tensors"]["tolerance"] is None and exact["tensors"]["counts"]["compared_after_cast"] == 0


# ------------------------------------------------------------------------------ bad options


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--atol", "-1"], "sdconvert verify: --atol -1: a tolerance is a finite number >= 0"),
        (["--rtol", "-0.5"], "sdconvert verify: --rtol -0.5: a tolerance is a finite number >= 0"),
        (["--atol", "nan"], "sdconvert verify: --atol nan: a tolerance is a finite number >= 0"),
        (["--rtol", "inf"], "sdconvert verify: --rtol inf: a tolerance is a finite number >= 0"),
        (["--atol", "1e-3x"], "sdconvert verify: --atol takes a number, got '1e-3x'"),
        (["--rtol", ""], "sdconvert verify: --rtol takes a number, got ''"),
        (["--atol"], "sdconvert verify: argument --atol: expected one argument"),
    ],
)
def test_bad_tolerances_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    a, b = pair(tmp_path, {"w": f32(1.0)}, {"w": f32(1.0)})
    result = sdconvert("verify", a, b, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == message + "\n", result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--rename", "a(=b"],
        ["--rename", "nothing_like_this=x"],
        ["--exclude", "nowhere"],
        ["--select", "model_state_dict", "--rename", "conv.=x"],
        ["--strip-prefix", "modul_"],
        ["--select", "nowhere"],
    ],
)
def test_key_options_fail_as_convert_does(tmp_path: Path, ddp_pt: Path, recipe_pt: Path, args: list[str]) -> None:
    converted = sdconvert("convert", ddp_pt, tmp_path / "out.safetensors", *args)
    verified = sdconvert("verify", ddp_pt, recipe_pt, *args)
    assert converted.returncode == verified.returncode == 2
    assert verified.stdout == "" and verified.stderr.count("\n") == 1
    assert verified.stderr == converted.stderr  # one parser, one wording


def test_comparison_options_need_two_files(tmp_path: Path) -> None:
    a, _ = pair(tmp_path, {"w": f32(1.0)}, {"w": f32(1.0)})
    for args in (["--atol", "1"], ["--cast-aware"], ["--strip-prefix", "auto"]):
        result = sdconvert("verify", "--deep", a, *args)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == f"sdconvert verify: {args[0]} goes with two files to compare\n"
    with pytest.raises(converters.ConverterError, match="atol goes with a second checkpoint"):
        converters.verify(a, deep=True, atol=1.0)
    with pytest.raises(converters.ConverterError, match=r"--atol -1\.0: a tolerance is a finite number >= 0"):
        converters.verify(a, a, atol=-1.0)
    with pytest.raises(converters.ConverterError, match="--rtol 'x': a tolerance"):
        converters.verify(a, a, rtol="x")  # type: ignore[arg-type]
