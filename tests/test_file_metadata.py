"""What other tools put beside the tensors survives (issue 14, part 7): a safetensors file's own
``__metadata__`` (a LoRA trainer's ``ss_*`` keys) and an ONNX model's ``metadata_props`` are carried
to every output and back, and ``verify`` compares them; an ONNX model whose weights are Constant
nodes gives those tensors, and one without weights is refused instead of becoming an empty file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import tensor_bytes
from onnx import TensorProto, helper, numpy_helper
from safetensors import safe_open
from safetensors.torch import save_file

import converters
from converters.cli import main
from converters.core.errors import UnsupportedValueError

LORA = {"format": "pt", "ss_network_dim": "16", "ss_output_name": "my-lora", "modelspec.title": "x"}
THROUGH = ["a.safetensors", "a.pt", "a.msgpack", "a.onnx", "shards"]


def _metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return {key: value for key, value in (handle.metadata() or {}).items() if not key.startswith("sdconvert.")}


@pytest.mark.parametrize("through", THROUGH)
def test_safetensors_metadata_of_another_tool_survives_every_format(tmp_path: Path, through: str) -> None:
    source = tmp_path / "lora.safetensors"
    save_file({"lora_up.weight": torch.randn(4, 2)}, str(source), metadata=LORA)
    middle, back = tmp_path / through, tmp_path / "back.safetensors"
    extra = ["--max-shard-size", "100"] if through == "shards" else []
    assert main(["convert", str(source), str(middle), "--quiet", *extra]) == 0
    assert converters.read(middle).carried_metadata() == LORA
    assert main(["convert", str(middle), str(back), "--quiet"]) == 0
    assert _metadata_of(back) == LORA
    assert converters.verify(source, back) == []
    assert converters.verify(middle, deep=True) == []


def test_verify_reports_metadata_differences_but_not_the_format_marker(tmp_path: Path) -> None:
    first, second, third = (tmp_path / f"{n}.safetensors" for n in "abc")
    weights = {"w": torch.ones(2)}
    save_file(weights, str(first), metadata=LORA)
    save_file(weights, str(second), metadata={**LORA, "ss_network_dim": "32"})
    save_file(weights, str(third))  # no metadata at all
    assert converters.verify(first, second) == ["file metadata 'ss_network_dim': '16' vs '32'"]
    assert converters.verify(first, third) == [
        "file metadata: keys only in the first: 'modelspec.title', 'ss_network_dim', 'ss_output_name'"
    ]
    # a torch.save file against our safetensors (which says format: pt): the same
    pt = tmp_path / "w.pt"
    torch.save(weights, pt)
    converters.convert(pt, tmp_path / "w.safetensors")
    assert converters.verify(pt, tmp_path / "w.safetensors") == []
    # --tensors ignores it, the JSON report lists it
    assert main(["verify", str(first), str(third), "--tensors"]) == 0
    assert main(["verify", str(first), str(third)]) == 1


def test_transformations_keep_the_metadata(tmp_path: Path) -> None:
    source = tmp_path / "lora.safetensors"
    save_file({"module.w": torch.ones(2), "module.b": torch.ones(1)}, str(source), metadata=LORA)
    out = tmp_path / "out.safetensors"
    converters.convert(source, out, strip_prefix="auto", dtype="bfloat16", exclude="module.b")
    assert _metadata_of(out) == LORA


def _graph_with_constants() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), name="")
    bias = numpy_helper.from_array(np.ones(3, dtype=np.float32), name="ignored")
    nodes = [
        helper.make_node("Constant", [], ["fc.weight"], value=weight),
        helper.make_node("Constant", [], ["fc.bias"], value=bias),
        helper.make_node("MatMul", ["x", "fc.weight"], ["h"]),
        helper.make_node("Add", ["h", "fc.bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph)
    onnx.helper.set_model_props(model, {"author": "someone", "license": "mit"})
    return model


def test_onnx_weights_in_constant_nodes_are_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "constants.onnx"
    onnx.save(_graph_with_constants(), str(path))
    checkpoint = converters.read(path)
    assert list(checkpoint.tree) == ["fc.weight", "fc.bias"]
    loaded = converters.load(path)
    assert tensor_bytes(loaded["fc.weight"]) == np.arange(6, dtype=np.float32).tobytes()
    assert checkpoint.carried_metadata() == {"author": "someone", "license": "mit"}
    assert main(["inspect", str(path)]) == 0
    assert (
        "note: the model has no initializers: its weights were read from its Constant nodes" in capsys.readouterr().out
    )
    out = tmp_path / "w.safetensors"
    converters.convert(path, out)
    assert _metadata_of(out) == {"format": "pt", "author": "someone", "license": "mit"}


def test_an_onnx_model_without_weights_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "none.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(UnsupportedValueError, match="the model has no initializers and no Constant nodes"):
        converters.read(path)
    assert main(["convert", str(path), str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_our_own_onnx_file_of_a_tree_without_tensors_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    converters.write(converters.read(_tensorless(tmp_path)), path)
    assert converters.read(path).tree == {"epoch": 3}


def _tensorless(tmp_path: Path) -> Path:
    path = tmp_path / "e.pt"
    torch.save({"epoch": 3}, path)
    return path
