"""ONNX: exact initializers, a runnable graph for the recipe, optimizer state beside it, external data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import assert_bit_identical, exotic_tree, tensor_bytes
from onnx import TensorProto, helper, numpy_helper

import converters
from converters import recipe
from converters.core.contract import WriteContext
from converters.core.errors import CorruptFileError, UnsafeFileError
from converters.formats.onnx import OnnxFormat
from converters.torch_bridge import from_torch

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def load_in_onnxruntime_without_warnings(path: Path) -> None:
    """onnxruntime prints its warnings from C++ to stderr: load in a child process and read them."""
    script = (
        "import onnxruntime as ort, sys\n"
        "options = ort.SessionOptions(); options.log_severity_level = 1\n"
        "ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[W:" not in result.stderr and "[E:" not in result.stderr, result.stderr


@pytest.fixture
def graph_file(tmp_path: Path, trained: Any) -> Path:
    path = tmp_path / "recipe.onnx"
    converters.save(trained[2], path, model=recipe.Net(), example_input=torch.zeros(1, 3, 32, 32))
    return path


def test_recipe_with_graph_is_valid_runs_and_matches_torch(graph_file: Path, trained: Any) -> None:
    onnx.checker.check_model(str(graph_file), full_check=True)
    load_in_onnxruntime_without_warnings(graph_file)
    session = ort.InferenceSession(str(graph_file), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (onnx_out,) = session.run(None, {"input": images.numpy()})
    with torch.no_grad():
        torch_out = trained[0](images).numpy()
    # Different kernels compute the same graph: outputs agree to float32 rounding, not bit for bit.
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-5, atol=1e-6)


def test_recipe_graph_file_round_trips_and_keeps_state_dict_names(graph_file: Path, trained: Any) -> None:
    assert_bit_identical(trained[2], converters.load(graph_file))
    model = onnx.load(str(graph_file))
    assert [t.name for t in model.graph.initializer] == list(trained[0].state_dict())
    for tensor in model.graph.initializer:
        assert tensor.HasField("raw_data")
        assert tensor.raw_data == tensor_bytes(trained[0].state_dict()[tensor.name])
    state = model.training_info[0].initialization.initializer
    assert [t.name for t in state] == [f"optimizer_state_dict/state/{i}/momentum_buffer" for i in range(10)]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["sdconvert.version"] == "1" and "sdconvert.tree" in props


def test_weights_only_file_is_a_valid_model_that_returns_its_weights(
    tmp_path: Path, recipe_pt: Path, trained: Any
) -> None:
    path = converters.convert(recipe_pt, tmp_path / "weights.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    load_in_onnxruntime_without_warnings(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {}), strict=True))
    state = trained[0].state_dict()
    assert list(outputs) == list(state)
    for name, array in outputs.items():
        assert array.tobytes() == tensor_bytes(state[name])


def test_exotic_tree_every_dtype_is_valid_onnx(tmp_path: Path) -> None:
    tree = exotic_tree()
    tree["all_dtypes"] = {name: torch.zeros(2, dtype=getattr(torch, name)) for name in converters.core.dtypes.DTYPES}
    path = tmp_path / "exotic.onnx"
    converters.save(tree, path)
    onnx.checker.check_model(str(path), full_check=True)
    assert_bit_identical(tree, converters.load(path))


def test_complex32_uses_the_documented_uint8_fallback(tmp_path: Path) -> None:
    tensor = torch.arange(12, dtype=torch.uint8).view(torch.complex32).reshape(3, 1)
    path = tmp_path / "c32.onnx"
    converters.save({"c": tensor}, path)
    (stored,) = onnx.load(str(path)).graph.initializer
    assert stored.data_type == TensorProto.UINT8 and list(stored.dims) == [12]
    assert_bit_identical({"c": tensor}, converters.load(path))


# ------------------------------------------------------------------------------ foreign files


def test_plain_torch_onnx_export_rebuilds_the_recipe_net(tmp_path: Path, trained: Any) -> None:
    net = trained[0]
    path = tmp_path / "net.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False)
    assert list(converters.load(path)) == list(net.state_dict())
    rebuilt, optimizer = recipe.rebuild(path)
    assert_bit_identical(net.state_dict(), rebuilt.state_dict())
    assert_bit_identical(recipe.make_optimizer(recipe.Net()).state_dict(), optimizer.state_dict())


@pytest.mark.parametrize(
    "array",
    [
        np.array([[1.5, -0.0], [np.inf, np.nan]], dtype=np.float32),  # float_data
        np.array([1e-310, -2.5], dtype=np.float64),  # double_data
        np.array([-128, 0, 127], dtype=np.int8),  # int32_data
        np.array([-32768, 7], dtype=np.int16),
        np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        np.array([-(2**63), 2**63 - 1], dtype=np.int64),  # int64_data
        np.array([0, 255], dtype=np.uint8),
        np.array([65535, 1], dtype=np.uint16),
        np.array([2**32 - 1, 3], dtype=np.uint32),  # uint64_data
        np.array([2**64 - 1, 5], dtype=np.uint64),
        np.array([True, False, True]),
        np.array([0.1, -65504.0, 6e-8], dtype=np.float16),  # int32_data holding the bits
        np.array([1 + 2j, -0.0 - 1j], dtype=np.complex64),  # float_data pairs
        np.array([3 - 4j], dtype=np.complex128),
    ],
    ids=lambda a: str(a.dtype),
)
def test_initializers_in_typed_fields_are_read_exactly(tmp_path: Path, array: np.ndarray) -> None:
    tensor = numpy_helper.from_array(array, "t")
    typed = helper.make_tensor(
        "t", tensor.data_type, array.shape, vals=numpy_helper.to_array(tensor).flatten().tolist()
    )
    assert not typed.HasField("raw_data")
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("t", tensor.data_type, array.shape)], [typed])
    path = tmp_path / "typed.onnx"
    onnx.save(helper.make_model(graph), str(path))
    loaded = converters.load(path)["t"]
    assert loaded.numpy().dtype == array.dtype and loaded.numpy().tobytes() == array.tobytes()


def test_bfloat16_in_int32_data_is_read_exactly(tmp_path: Path) -> None:
    bits = [0x3FC0, 0x8000, 0x7FC1]  # 1.5, -0.0, a NaN with a payload
    typed = TensorProto(name="b", data_type=TensorProto.BFLOAT16, dims=[3])
    typed.int32_data.extend(bits)
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [3])], [typed])
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph), str(path))
    loaded = converters.load(path)["b"]
    assert loaded.dtype == torch.bfloat16 and loaded.view(torch.uint16).tolist() == bits


# ------------------------------------------------------------------------------ external data


def test_forced_external_data_round_trips_with_aligned_offsets(tmp_path: Path, recipe_pt: Path, trained: Any) -> None:
    out = tmp_path / "ext.onnx"
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", recipe_pt, out, "--external-data", "--model", "recipe"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "recipe.pt"]
    assert_bit_identical(trained[2], converters.load(out))
    onnx.checker.check_model(str(out), full_check=True)
    load_in_onnxruntime_without_warnings(out)
    model = onnx.load(str(out), load_external_data=False)
    tensors = [*model.graph.initializer, *model.training_info[0].initialization.initializer]
    external = [t for t in tensors if t.data_location == TensorProto.EXTERNAL]
    # Tensors of 1 KiB or more go to the data file; the small biases stay inline.
    assert {t.name for t in external} == {t.name for t in tensors if int(np.prod(t.dims)) * 4 >= 1024}
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in external]
    assert len(external) == 10 and all(offset % 4096 == 0 for offset in offsets)


def test_external_data_is_chosen_automatically_past_the_protobuf_limit(tmp_path: Path, trained: Any) -> None:
    small_limit = OnnxFormat(protobuf_limit=100_000)  # stands in for protobuf's 2 GB
    path = tmp_path / "auto.onnx"
    small_limit.write(from_torch(trained[2]), path, WriteContext(), small_limit.Options())
    assert (tmp_path / "auto.onnx.data").exists()
    assert_bit_identical(trained[2], converters.load(path))


def _external_model(
    tmp_path: Path, location: str, offset: int = 0, length: int = 8, extra: dict[str, str] | None = None
) -> Path:
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": str(offset), "length": str(length), **(extra or {})}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])], [tensor])
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def test_external_data_from_other_writers_is_read(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "weights.bin", offset=4)
    (path.parent / "weights.bin").write_bytes(b"\xff" * 4 + np.array([1.5, -2.0], np.float32).tobytes())
    assert converters.load(path)["w"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    ("location", "setup", "error", "message"),
    [
        ("/etc/passwd", None, UnsafeFileError, "external data location '/etc/passwd' must be a relative path"),
        ("../secret.bin", "outside", UnsafeFileError, "external data location '../secret.bin' must be a relative path"),
        ("link.bin", "symlink", UnsafeFileError, "external data location 'link.bin' goes through a symlink"),
        ("missing.bin", None, CorruptFileError, "external data file 'missing.bin' does not exist beside the model"),
        (
            "short.bin",
            "short",
            CorruptFileError,
            r"external data \[0, 8\) of 'short.bin' must hold exactly 8 bytes inside its 4 bytes",
        ),
    ],
)
def test_hostile_external_data_locations_are_refused(
    tmp_path: Path, location: str, setup: str | None, error: type[Exception], message: str
) -> None:
    path = _external_model(tmp_path, location)
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 8)
    if setup == "symlink":
        os.symlink(tmp_path / "secret.bin", path.parent / "link.bin")
    if setup == "short":
        (path.parent / "short.bin").write_bytes(b"\x00" * 4)
    with pytest.raises(error, match=re.escape(str(path)) + ": initializer 'w': " + message):
        converters.read(path)


def test_unknown_external_data_keys_are_refused(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "w.bin", extra={"command": "rm -rf"})
    (path.parent / "w.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(UnsafeFileError, match="unknown external_data key 'command'"):
        converters.read(path)


# ------------------------------------------------------------------------------ models from the CLI


def test_cli_model_class_with_input_shape(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from toy_models import TinyBatchNormNet

    model = TinyBatchNormNet().eval()
    source = tmp_path / "tiny.pt"
    torch.save({"model": model.state_dict(), "note": "bn"}, source)
    out = tmp_path / "tiny.onnx"
    result = subprocess.run(
        [
            sys.executable,
            str(CLI),
            "convert",
            source,
            out,
            "--model",
            "tests.toy_models:TinyBatchNormNet",
            "--input-shape",
            "2,4",
        ],
        capture_output=True,
        text=True,
        cwd=CLI.parent,
    )
    assert result.returncode == 0, result.stderr
    onnx.checker.check_model(str(out), full_check=True)
    load_in_onnxruntime_without_warnings(out)
    x = torch.randn(3, 4)
    (onnx_out,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(onnx_out, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    # bn.num_batches_tracked is in the state_dict but not the graph: it rides in training_info.
    assert_bit_identical(torch.load(source), converters.load(out))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "nowhere.module:Thing", "--input-shape", "1,2"],
            "cannot import the model class 'nowhere.module:Thing'",
        ),
        (["--model", "tests.toy_models:TinyBatchNormNet"], "--model needs --input-shape"),
        (["--input-shape", "1,2"], "--input-shape goes with --model"),
        (["--model", "recipe", "--input-shape", "1,x"], "--input-shape takes comma-separated sizes"),
    ],
)
def test_cli_model_option_errors(tmp_path: Path, recipe_pt: Path, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, str(CLI), "convert", recipe_pt, tmp_path / "x.onnx", *args],
        capture_output=True,
        text=True,
        cwd=CLI.parent,
    )
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_model_whose_graph_needs_tensors_the_checkpoint_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        converters.ConverterError, match=r"the model's graph uses 'conv1.weight', which the checkpoint does not hold"
    ):
        converters.save({"epoch": 1}, tmp_path / "x.onnx", model=recipe.Net(), example_input=torch.zeros(1, 3, 32, 32))
    wrong = {key: value.double() for key, value in recipe.Net().state_dict().items()}
    with pytest.raises(
        converters.ConverterError,
        match=r"expects 'conv1.weight' as float32\[6, 3, 5, 5\], the checkpoint holds float64",
    ):
        converters.save(wrong, tmp_path / "y.onnx", model=recipe.Net(), example_input=torch.zeros(1, 3, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_other_writers_refuse_onnx_options(tmp_path: Path) -> None:
    with pytest.raises(
        converters.ConverterError, match="the safetensors writer has no option 'model'; its options are max_shard_size"
    ):
        converters.save({"w": torch.ones(1)}, tmp_path / "w.safetensors", model=recipe.Net())


# ------------------------------------------------------------------------------ hostile files


def _model_bytes(*tensors: TensorProto, metadata: dict[str, str] | None = None) -> bytes:
    graph = helper.make_graph([], "g", [], [], list(tensors))
    model = helper.make_model(graph)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return bytes(model.SerializeToString())


def _raw(name: str, data_type: int, dims: list[int], data: bytes) -> TensorProto:
    return TensorProto(name=name, data_type=data_type, dims=dims, raw_data=data)


HOSTILE_ONNX = [
    ("empty", lambda: b"", CorruptFileError, "the file is empty"),
    ("no-graph", lambda: b"\x08\x07", CorruptFileError, "not an ONNX model: no graph field"),
    ("truncated", lambda: _model_bytes(_raw("w", 1, [2], b"\x00" * 8))[:-5], CorruptFileError, r"protobuf field 7 at byte \d+ declares \d+ bytes, its message has \d+ left"),
    ("endless-varint", lambda: b"\x08" + b"\xff" * 11, CorruptFileError, "protobuf varint at byte 1 is longer than 10 bytes"),
    ("bad-wire-type", lambda: b"\x0f", CorruptFileError, r"protobuf wire type 7 \(field 1\) at byte 1 is not supported"),
    ("short-raw", lambda: _model_bytes(_raw("w", 1, [2], b"\x00" * 4)), CorruptFileError, r"initializer 'w': float32\[2\] needs 8 bytes, raw_data holds 4"),
    ("string-type", lambda: _model_bytes(TensorProto(name="s", data_type=8, dims=[1], string_data=[b"x"])), converters.UnsupportedValueError, "initializer 's' has ONNX data type 8, which has no torch dtype"),
    ("duplicate-name", lambda: _model_bytes(_raw("w", 2, [1], b"a"), _raw("w", 2, [1], b"b")), CorruptFileError, "two initializers are named 'w'"),
    ("negative-dim", lambda: _model_bytes(_raw("w", 2, [-1], b"")), CorruptFileError, "initializer 'w' has a negative dimension"),
    ("typed-count", lambda: _model_bytes(TensorProto(name="w", data_type=1, dims=[3], float_data=[1.0])), CorruptFileError, r"initializer 'w': float32\[3\] needs 3 values, found 1"),
    ("tree-missing", lambda: _model_bytes(metadata={"sdconvert.tree": '{"dict":[["a",{"tensor":"nope"}]]}'}), CorruptFileError, "the tree refers to initializer 'nope', which the file lacks"),
    ("tree-unused", lambda: _model_bytes(_raw("w", 2, [1], b"a"), metadata={"sdconvert.tree": '{"dict":[]}'}), CorruptFileError, "initializer 'w' is not part of the stored tree"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "error", "message"), [c[1:] for c in HOSTILE_ONNX], ids=[c[0] for c in HOSTILE_ONNX])
def test_hostile_onnx_gives_its_exact_error(tmp_path: Path, data: Any, error: type[Exception], message: str) -> None:
    path = tmp_path / "x.onnx"
    path.write_bytes(data())
    with pytest.raises(error, match=re.escape(str(path)) + "(: | at a: )" + message):
        converters.read(path)
