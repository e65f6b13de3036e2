"""Our DCP writer (no torch): what torch reads from it is what its own dcp.save would give, a training
job resumes from it bit for bit, and we read back the exact tree.

One 2-rank gloo job (tests/jobs/dcp_resume_job.py) serves the module: it loads a folder of every
kind of value with ``dcp.load`` and resumes the recipe Net + SGD(momentum) from our conversion and
from torch's own ``dcp.save`` of the live objects, with ``get_state_dict``/``set_state_dict``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import struct
import subprocess
import sys
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from blake3 import blake3
from helpers import assert_bit_identical, exotic_tree, tensor_bytes, within_resource_bounds
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import converters
from converters import recipe
from converters.core.budget import Budget
from converters.core.compare import differences
from converters.core.contract import WriteContext
from converters.core.errors import CorruptFileError, DestinationError, UnsupportedValueError
from converters.core.sources import read_all
from converters.core.writing import TensorWriter
from converters.formats.dcp import optimizers, reader, writer

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "cli.py"
JOB = ROOT / "tests" / "jobs" / "dcp_resume_job.py"
STEPS, SEED = 3, 7  # the job's steps after resuming, and their data


class Thing:
    """A class no data-only list names: its objects are records a .pt (and DCP) re-creates only if allowed."""

    def __init__(self, value: int) -> None:
        self.value = value


def quiet_save(state: Any, folder: Path) -> None:
    """torch's own dcp.save, in one process (the naive path we are compared with)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder, no_dist=True)


def torch_view(folder: Path) -> Any:
    """What dcp_to_torch_save gives for ``folder``: torch's reading of every entry."""
    out = folder.parent / f"{folder.name}-view.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)


def torch_metadata(folder: Path) -> Any:
    return pickle.loads((folder / ".metadata").read_bytes())


def values_tree() -> dict[Any, Any]:
    """Every kind of value and container: int keys, nested lists, ties (between entries and inside
    a torch.saved tuple), numpy arrays, records, a Counter, empty containers, every edge dtype."""
    tree = exotic_tree()
    del tree["0"]  # DCP flattens the int key 0 and the str key "0" to one FQN: refused (torch raises too)
    shared = torch.arange(4.0)
    array = np.arange(3, dtype=np.int16)
    tree.update(
        {
            "tie_a": shared,
            "tie_b": shared,
            "pair": (shared, 3),
            "array": array,
            "arrays": [array, 1],
            "namespace": argparse.Namespace(a=1, b=[1, 2]),
            "counter": Counter({"a": 2}),
            "mixed": [torch.ones(2), 5, {"k": torch.zeros(1)}, [torch.full((2,), 7.0), "x"]],
            "float8": torch.tensor([1.0, -2.0]).to(torch.float8_e4m3fn),
            "complex": torch.tensor([1 + 2j]),
            "uint16": torch.tensor([1, 65535], dtype=torch.uint16),
            "bool": torch.tensor([True, False]),
            "zero_dim_bf16": torch.tensor(-0.5, dtype=torch.bfloat16),
            "empty_int": torch.empty(3, 0, dtype=torch.int32),
        }
    )
    return tree


def zeroed(tree: Any) -> Any:
    """``tree`` with its tensors zeroed (tensors inside torch.saved values, like tuples, kept)."""
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {key: zeroed(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [zeroed(value) for value in tree]
    return tree


def sdconvert(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def recipe_checkpoint() -> tuple[recipe.Net, torch.optim.SGD, dict[str, Any]]:
    net, optimizer, _ = recipe.trained_checkpoint(steps=3)
    return net, optimizer, {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every folder the module looks at, and what the 2-rank job loaded and resumed from them."""
    folder = tmp_path_factory.mktemp("dcp-writer")
    values = values_tree()
    torch.save(values, folder / "values.pt")
    ours = converters.convert(folder / "values.pt", folder / "values-ours", dst_format="dcp", max_file_size=4096)
    quiet_save(torch.load(folder / "values.pt", weights_only=False), folder / "values-torch")
    view = torch_view(folder / "values-torch")
    torch.save(zeroed(view), folder / "template.pt")

    net, optimizer, checkpoint = recipe_checkpoint()
    torch.save(checkpoint, folder / "recipe.pt")
    converted = sdconvert("convert", folder / "recipe.pt", folder / "recipe-ours", "--to", "dcp")
    assert converted.returncode == 0, converted.stderr
    model_state, optimizer_state = get_state_dict(net, optimizer)  # torch's own names, from the live objects
    quiet_save({"model": model_state, "optimizer": optimizer_state, "epoch": 3}, folder / "recipe-torch")

    spec: dict[str, Any] = {
        "values": str(ours),
        "template": str(folder / "template.pt"),
        "values_out": str(folder / "values-loaded.pt"),
        "resume": {"ours": str(folder / "recipe-ours"), "torch": str(folder / "recipe-torch")},
        "resume_out": str(folder / "resumed.pt"),
    }
    (folder / "job.json").write_text(json.dumps(spec))
    result = subprocess.run(
        [sys.executable, str(JOB), str(folder / "job.json")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "folder": folder,
        "values_view": view,
        "values_loaded": torch.load(spec["values_out"], weights_only=False),
        "resumed": torch.load(spec["resume_out"], weights_only=False),
        "live_optimizer_state": optimizer_state,
    }


# ------------------------------------------------------------------------------ what torch reads


def test_torch_reads_every_value_as_from_its_own_dcp_save(job: dict[str, Any]) -> None:
    folder = job["folder"]
    ours, theirs = folder / "values-ours", folder / "values-torch"
    assert len(list(ours.glob("__0_*.distcp"))) > 5  # --max-file-size 4096: several data files
    # dcp_to_torch_save: every entry, its exact Python type, dtype, shape and raw bytes
    assert_bit_identical(job["values_view"], torch_view(ours))
    # .metadata: the same entries (dtype, size, one chunk) and planner paths as torch's own
    mine, reference = torch_metadata(ours), torch_metadata(theirs)
    assert mine.state_dict_metadata == reference.state_dict_metadata
    assert mine.planner_data == reference.planner_data
    assert mine.version == reference.version
    # dcp.load in place, one process: into the zeroed template
    template = torch.load(folder / "template.pt", weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=ours, no_dist=True)
    assert_bit_identical(job["values_view"], template)


def test_two_ranks_load_every_value(job: dict[str, Any]) -> None:
    assert_bit_identical(job["values_view"], job["values_loaded"])
    source = values_tree()
    for key in ("special_floats", "float8", "complex", "uint16", "bool", "zero_dim_bf16", "empty_int", "bf16"):
        loaded, original = job["values_loaded"][key], source[key]
        assert (loaded.dtype, loaded.shape) == (original.dtype, original.shape), key
        assert tensor_bytes(loaded) == tensor_bytes(original), key


def test_we_read_back_the_exact_tree(job: dict[str, Any]) -> None:
    folder = job["folder"]
    ours = converters.read(folder / "values-ours")
    assert differences(converters.read(folder / "values.pt").tree, ours.tree) == []
    tree = ours.tree
    assert tree["tie_a"] is tree["tie_b"] is tree["pair"][0]  # ties, across entries and into a tuple
    assert tree["arrays"][0] is tree["array"] and tree["array"].numpy
    assert type(tree[0]) is str and -5 in tree  # int keys
    assert all(ref.digest is not None for _, ref in ours.unique_tensors() if ref.nbytes and not ref.numpy)
    assert converters.verify(folder / "values.pt", folder / "values-ours") == []
    assert converters.verify(folder / "values-ours", deep=True) == []
    assert ours.kind is not None and "statedict-convert" in ours.kind


def test_containers_dcp_drops_come_back(tmp_path: Path) -> None:
    """An empty dict is no entry for DCP (after the last stored item of a list, torch's loaders give
    the list shorter); ours come back from sdconvert.json."""
    tree = {"tails": [torch.ones(1), 2, {}, {"a": {}}], "empty": {}, "t": ((), []), "all": [{}, {"a": {}}]}
    torch.save(tree, tmp_path / "source.pt")
    converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    quiet_save(tree, tmp_path / "torch")
    assert torch_metadata(tmp_path / "out").planner_data == torch_metadata(tmp_path / "torch").planner_data
    assert_bit_identical(torch_view(tmp_path / "torch"), torch_view(tmp_path / "out"))
    assert_bit_identical(tree, converters.load(tmp_path / "out"))


@pytest.mark.parametrize(
    ("tree", "where", "why"),
    [
        ({"l": [{}, torch.ones(1)]}, "l", "its item 0 holds only empty containers"),
        ({"m": {3: [torch.ones(1), {"a": {}}, 2]}}, "m/3", "its item 1 holds only empty containers"),
        ({"l": [1, {}]}, "l", "DCP stores its items one by one only because of the empty containers"),
        ({"l": [{}, 1]}, "l", "DCP stores its items one by one only because of the empty containers"),
    ],
)
def test_lists_dcp_cannot_load_back_are_refused(tmp_path: Path, tree: Any, where: str, why: str) -> None:
    """dcp.load and dcp_to_torch_save rebuild a list from the stored values' paths, without its
    empty containers, and then ask for keys no folder holds: refused, naming the list."""
    quiet_save(tree, tmp_path / "torch")  # torch writes it, and cannot load it back
    template = {key: value for key, value in tree.items()}
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=tmp_path / "torch", no_dist=True)
    refused(tree, tmp_path, rf"^at {where}: DCP cannot load back the list at {where}: {why}.*\(--exclude {where}\)$")


# ------------------------------------------------------------------------------ resuming training


def test_two_ranks_resume_training_bit_identically(job: dict[str, Any]) -> None:
    resumed = job["resumed"]
    # what set_state_dict put in place is torch's own naming of the live optimizer
    assert_bit_identical(job["live_optimizer_state"], resumed["ours"]["loaded_optimizer"])
    # after STEPS more steps: the same as resuming from torch's own dcp.save of the live objects ...
    assert_bit_identical(resumed["torch"]["parameters"], resumed["ours"]["parameters"])
    assert_bit_identical(resumed["torch"]["optimizer"], resumed["ours"]["optimizer"])
    # ... and as resuming from the original .pt in one process, the classic way
    checkpoint = torch.load(job["folder"] / "recipe.pt")  # afresh: load_state_dict shares its tensors
    net = recipe.Net()
    net.load_state_dict(checkpoint["model"])
    optimizer = recipe.make_optimizer(net)
    optimizer.load_state_dict(checkpoint["optimizer"])
    recipe.train_steps(net, optimizer, STEPS, seed=SEED)
    assert_bit_identical(dict(net.state_dict()), resumed["ours"]["parameters"])
    # ... which the momentum buffers do change: a resume that lost them differs
    fresh = recipe.Net()
    fresh.load_state_dict(checkpoint["model"])
    recipe.train_steps(fresh, recipe.make_optimizer(fresh), STEPS, seed=SEED)
    assert tensor_bytes(fresh.fc1.weight) != tensor_bytes(net.fc1.weight)


def test_the_resume_layout_is_get_state_dicts(job: dict[str, Any]) -> None:
    folder = job["folder"]
    view, reference = torch_view(folder / "recipe-ours"), torch_view(folder / "recipe-torch")
    assert_bit_identical(reference, view)
    assert list(view["optimizer"]["state"])[:2] == ["conv1.weight", "conv1.bias"]
    # and we read back the original: int parameter ids, the exact types
    assert_bit_identical(torch.load(folder / "recipe.pt"), converters.load(folder / "recipe-ours"))
    assert converters.verify(folder / "recipe.pt", folder / "recipe-ours") == []
    assert converters.verify(folder / "recipe-ours", deep=True) == []


# ------------------------------------------------------------------------------ the optimizer mapping


def _sgd(net: torch.nn.Module, groups: Any = None) -> torch.optim.SGD:
    return torch.optim.SGD(groups if groups is not None else net.parameters(), lr=0.01, momentum=0.9)


def _stepped(net: torch.nn.Module, optimizer: torch.optim.Optimizer, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        optimizer.zero_grad()
        net(torch.randn(shape, generator=generator)).square().mean().backward()
        optimizer.step()


def refused(tree: dict[str, Any], tmp_path: Path, match: str, **options: Any) -> None:
    torch.save(tree, tmp_path / "source.pt")
    with pytest.raises(UnsupportedValueError, match=match):
        converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp", **options)
    assert not (tmp_path / "out").exists()


def test_an_optimizer_without_its_model_is_refused(tmp_path: Path) -> None:
    _, optimizer, _ = recipe_checkpoint()
    refused(
        {"optimizer": optimizer.state_dict(), "epoch": 3},
        tmp_path,
        r"at optimizer: cannot name this optimizer's parameters for DCP: no model state_dict lies beside it .*"
        r"leave the optimizer out \(--exclude optimizer\)$",
    )
    # the CLI: one line, exit 2; leaving the optimizer out writes the rest
    result = sdconvert("convert", tmp_path / "source.pt", tmp_path / "out", "--to", "dcp")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "no model state_dict lies beside it" in result.stderr
    excluded = sdconvert("convert", tmp_path / "source.pt", tmp_path / "out", "--to", "dcp", "--exclude", "optimizer")
    assert excluded.returncode == 0, excluded.stderr
    assert converters.load(tmp_path / "out") == {"epoch": 3}


def test_buffers_need_the_model_class(tmp_path: Path) -> None:
    from toy_models import TinyBatchNormNet

    torch.manual_seed(0)
    net = TinyBatchNormNet()
    optimizer = _sgd(net)
    _stepped(net, optimizer, (5, 4))
    checkpoint = {"model": net.state_dict(), "optimizer": optimizer.state_dict()}
    refused(checkpoint, tmp_path, r"it numbers 4 parameters but the model state_dict at model holds 7 tensors.*--model")
    # with the class, named as torch names them (the CLI resolves the spec to an instance)
    model = ("--model", "tests.toy_models:TinyBatchNormNet")
    result = sdconvert("convert", tmp_path / "source.pt", tmp_path / "out", "--to", "dcp", *model, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    model_state, optimizer_state = get_state_dict(net, optimizer)
    quiet_save({"model": model_state, "optimizer": optimizer_state}, tmp_path / "torch")
    assert_bit_identical(torch_view(tmp_path / "torch"), torch_view(tmp_path / "out"))
    # a class that does not fit the checkpoint is refused
    with pytest.raises(UnsupportedValueError, match=r"--model does not fit the model state_dict at model"):
        converters.convert(tmp_path / "source.pt", tmp_path / "other", dst_format="dcp", model=recipe.Net())


def test_a_single_process_resume_restores_the_optimizer(tmp_path: Path) -> None:
    net, optimizer, checkpoint = recipe_checkpoint()
    torch.save(checkpoint, tmp_path / "source.pt")
    converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    fresh = recipe.Net()
    fresh_optimizer = recipe.make_optimizer(fresh)
    model_state, optimizer_state = get_state_dict(fresh, fresh_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=tmp_path / "out", no_dist=True)
    set_state_dict(fresh, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    assert_bit_identical(optimizer.state_dict(), fresh_optimizer.state_dict())
    assert_bit_identical(net.state_dict(), fresh.state_dict())


def _groups(net: recipe.Net, how: str) -> list[dict[str, Any]]:
    parameters = list(net.parameters())
    if how == "contiguous":  # the first layers and the rest: model order, two learning rates
        return [{"params": parameters[:4]}, {"params": parameters[4:], "lr": 0.001}]
    # decay / no decay, as transformer recipes group them: not in model order
    return [
        {"params": [p for p in parameters if p.ndim > 1], "weight_decay": 0.01},
        {"params": [p for p in parameters if p.ndim == 1], "weight_decay": 0.0},
    ]


def assert_converted_as_torch_saves_it(tmp_path: Path, net: torch.nn.Module, optimizer: Any) -> None:
    """``net`` and ``optimizer`` saved by torch.save and converted to DCP by us read back as what
    ``dcp.save`` writes of ``get_state_dict(net, optimizer)``, bit for bit (the output is ``out``)."""
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "source.pt")
    converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    model_state, optimizer_state = get_state_dict(net, optimizer)
    quiet_save({"model": model_state, "optimizer": optimizer_state}, tmp_path / "torch")
    assert_bit_identical(torch_view(tmp_path / "torch"), torch_view(tmp_path / "out"))


def test_contiguous_param_groups_are_named_as_torch_names_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = recipe.Net()
    optimizer = _sgd(net, _groups(net, "contiguous"))
    _stepped(net, optimizer, (2, 3, 32, 32))
    assert_converted_as_torch_saves_it(tmp_path, net, optimizer)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("reversed", r"parameter 0's 'momentum_buffer' has the shape \[10\], but parameter 0 "),
        (
            "two groups, no state yet",
            r"it has 2 param_groups whose parameters cannot be told apart: .* parameter 0 has no state with dims",
        ),
    ],
)
def test_a_mapping_that_cannot_be_checked_is_refused(tmp_path: Path, case: str, match: str) -> None:
    torch.manual_seed(0)
    net = recipe.Net()
    if case == "reversed":
        optimizer = _sgd(net, list(reversed(list(net.parameters()))))
    else:
        optimizer = _sgd(net, _groups(net, "contiguous"))
    if case != "two groups, no state yet":
        _stepped(net, optimizer, (2, 3, 32, 32))
    refused({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path, match)


def _resumed(folder: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The standard resume of ``net`` and ``optimizer`` (fresh) from ``folder``."""
    model_state, optimizer_state = get_state_dict(net, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _adam_groups(net: recipe.Net) -> torch.optim.AdamW:
    """Weights then biases (not model order), each group its own hyper-parameters."""
    parameters = list(net.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.ndim > 1], "weight_decay": 0.01},
            {"params": [p for p in parameters if p.ndim == 1], "weight_decay": 0.0, "lr": 0.01},
        ],
        lr=0.001,
    )


def test_param_groups_out_of_model_order_are_found_by_shape(tmp_path: Path) -> None:
    """A weight-decay split numbers the weights first: each number is found as the one parameter of
    its state's shape (recipe.Net has no two of one shape), so state and every group's hyper-
    parameters come back on the right parameters."""
    torch.manual_seed(0)
    net = recipe.Net()
    optimizer = _adam_groups(net)
    _stepped(net, optimizer, (2, 3, 32, 32))
    assert_converted_as_torch_saves_it(tmp_path, net, optimizer)
    torch.manual_seed(1)
    fresh = recipe.Net()
    fresh_optimizer = _adam_groups(fresh)
    _resumed(tmp_path / "out", fresh, fresh_optimizer)
    assert_bit_identical(optimizer.state_dict(), fresh_optimizer.state_dict())
    _stepped(fresh, fresh_optimizer, (2, 3, 32, 32))  # every group has its hyper-parameters


class _EncoderDecoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.decoder(torch.relu(self.encoder(x))))
        return out


@pytest.mark.parametrize("case", ["decoder listed first", "weight decay over equal shapes"])
def test_param_groups_over_parameters_of_equal_shapes_are_refused(tmp_path: Path, case: str) -> None:
    """Several groups whose numbers the shapes of their state cannot pin (two parameters of one
    shape): mapping them in model order exchanged the decoder's and the encoder's Adam moments, and
    lost the first group's hyper-parameters on set_state_dict. Refused, saying what to do."""
    torch.manual_seed(0)
    net: torch.nn.Module
    if case == "decoder listed first":
        net = _EncoderDecoder()
        groups = [
            {"params": [*net.decoder.parameters(), *net.encoder.parameters()]},
            {"params": list(net.head.parameters()), "lr": 0.01},
        ]
        shape = (4, 8)
    else:
        net = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.LayerNorm(4))
        named = list(net.named_parameters())
        groups = [
            {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": 0.1},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
        ]
        shape = (8, 4)
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    _stepped(net, optimizer, shape)
    refused(
        {"model": net.state_dict(), "optimizer": optimizer.state_dict()},
        tmp_path,
        r"^at optimizer: cannot name this optimizer's parameters for DCP: it has 2 param_groups whose parameters "
        r"cannot be told apart: \S+ and \S+ of the model at model share the shape \[\d+(, \d+)?\], .*"
        r"convert the model alone \(--select model\), or write another format.*\(--exclude optimizer\)$",
    )


def _gan() -> tuple[dict[str, Any], torch.nn.Module, torch.optim.Optimizer]:
    """A GAN's checkpoint: the generator under the conventional 'model', the discriminator beside it."""
    torch.manual_seed(0)
    generator, discriminator = torch.nn.Linear(4, 6), torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Linear(3, 1))
    generator_optimizer, discriminator_optimizer = _sgd(generator), _sgd(discriminator)
    _stepped(generator, generator_optimizer, (2, 4))
    _stepped(discriminator, discriminator_optimizer, (2, 6))
    checkpoint = {
        "model": generator.state_dict(),
        "discriminator": discriminator.state_dict(),
        "optimizer": generator_optimizer.state_dict(),
        "discriminator_optimizer": discriminator_optimizer.state_dict(),
    }
    return checkpoint, discriminator, discriminator_optimizer


def test_each_optimizer_is_named_by_the_model_that_fits_it(tmp_path: Path) -> None:
    """Not by the conventional name: the discriminator's optimizer was named by the generator."""
    checkpoint, discriminator, discriminator_optimizer = _gan()
    torch.save(checkpoint, tmp_path / "source.pt")
    converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    view = torch_view(tmp_path / "out")
    assert list(view["discriminator_optimizer"]["state"]) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert list(view["optimizer"]["state"]) == ["weight", "bias"]
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Linear(3, 1))
    fresh_optimizer = _sgd(fresh)
    model_state, optimizer_state = get_state_dict(fresh, fresh_optimizer)
    state = {"discriminator": model_state, "discriminator_optimizer": optimizer_state}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=tmp_path / "out", no_dist=True)
    set_state_dict(
        fresh,
        fresh_optimizer,
        model_state_dict=state["discriminator"],
        optim_state_dict=state["discriminator_optimizer"],
    )
    assert_bit_identical(discriminator_optimizer.state_dict(), fresh_optimizer.state_dict())
    assert_bit_identical(discriminator.state_dict(), fresh.state_dict())


def test_an_optimizer_two_models_fit_alike_is_refused(tmp_path: Path) -> None:
    """Two models of equal shapes but other names beside it: which one it trains nothing says."""
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4))
    optimizer = _sgd(student)
    _stepped(student, optimizer, (2, 4))
    checkpoint = {"model": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict()}
    refused(checkpoint, tmp_path, r"2 model state_dicts beside it \(model, teacher\) fit its parameters alike")
    # a copy under the same names (an EMA of the model) names it alike: no doubt
    ema = {key: value.clone() for key, value in student.state_dict().items()}
    converters.convert(
        _saved({"model": student.state_dict(), "ema": ema, "optimizer": optimizer.state_dict()}, tmp_path / "ema.pt"),
        tmp_path / "ema",
        dst_format="dcp",
    )
    assert list(torch_view(tmp_path / "ema")["optimizer"]["state"]) == ["weight", "bias"]


def _saved(tree: Any, path: Path) -> Path:
    torch.save(tree, path)
    return path


def test_a_fresh_single_group_optimizer_is_named(tmp_path: Path) -> None:
    """No state: nothing is assigned per parameter, the one group holds them all whatever their order."""
    net = recipe.Net()
    optimizer = recipe.make_optimizer(net)
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "source.pt")
    converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    assert torch_view(tmp_path / "out")["optimizer"]["param_groups"][0]["params"][0] == "conv1.weight"


def test_lightning_style_optimizer_lists_find_the_model(tmp_path: Path) -> None:
    net, optimizer, _ = recipe_checkpoint()
    checkpoint = {"state_dict": net.state_dict(), "optimizer_states": [optimizer.state_dict()], "epoch": 1}
    torch.save(checkpoint, tmp_path / "source.pt")
    converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    view = torch_view(tmp_path / "out")
    assert "conv1.weight" in view["optimizer_states"][0]["state"]
    assert_bit_identical(checkpoint, converters.load(tmp_path / "out"))


# ------------------------------------------------------------------------------ the writer itself


def test_files_are_the_same_whatever_writes_them(tmp_path: Path, job: dict[str, Any]) -> None:
    """The seam for writing files side by side: each file written alone (here in reverse order, each
    by its own TensorWriter, as other processes would), then .metadata: the bytes of a plain write."""
    source = job["folder"] / "values.pt"
    checkpoint = converters.read(source)
    plan = writer.plan_folder(checkpoint, optimizers.name_parameters(checkpoint.tree), 4096, frozenset())
    assert len(plan.files) > 5 and all(size <= 4096 for size in plan.sizes() if size)
    split = tmp_path / "split"
    split.mkdir()
    digests: list[dict[str, list[str]]] = [{} for _ in plan.files]
    for index in reversed(range(len(plan.files))):
        tensors = TensorWriter(WriteContext(fsync=False), checkpoint.origin)
        digests[index] = writer.write_data_file(plan, index, split, tensors, fsync=False)
    writer.write_metadata(plan, digests, split, fsync=False)
    whole = job["folder"] / "values-ours"
    assert sorted(p.name for p in split.iterdir()) == sorted(p.name for p in whole.iterdir())
    for path in whole.iterdir():
        assert (split / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_big_tensor_gets_a_file_of_its_own(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(10), "big": torch.ones(4096), "b": torch.ones(10), "c": torch.ones(10)}
    torch.save(tensors, tmp_path / "source.pt")
    result = sdconvert("convert", tmp_path / "source.pt", tmp_path / "out", "--to", "dcp", "--max-file-size", "5KB")
    assert result.returncode == 0, result.stderr
    storage = torch_metadata(tmp_path / "out").storage_data
    files = {index.fqn: info.relative_path for index, info in storage.items()}
    assert files == {"a": "__0_0.distcp", "big": "__0_1.distcp", "b": "__0_2.distcp", "c": "__0_2.distcp"}
    assert_bit_identical(tensors, converters.load(tmp_path / "out"))


def test_the_writer_never_imports_torch(tmp_path: Path) -> None:
    _, _, checkpoint = recipe_checkpoint()
    source = tmp_path / "source.pt"
    torch.save(checkpoint, source)
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked here')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import converters\n"
        "converters.convert(sys.argv[1], sys.argv[2], dst_format='dcp')\n"
        "tree = converters.read(sys.argv[2]).tree\n"
        "print(sorted(tree['optimizer']['state'])[:2], 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(source), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 1] False"


def test_digests_casts_and_file_metadata_are_kept(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.randn(3, 4), "b": torch.randn(4)}, tmp_path / "source.safetensors", metadata={"note": "x"})
    converters.convert(tmp_path / "source.safetensors", tmp_path / "out", dst_format="dcp", dtype="bfloat16")
    read = converters.read(tmp_path / "out")
    assert read.file_metadata == {"note": "x"} and read.tree_digest is not None
    assert all(ref.cast_from is not None and ref.cast_from.dtype == "float32" for _, ref in read.unique_tensors())
    assert converters.verify(tmp_path / "source.safetensors", tmp_path / "out", cast_aware=True) == []
    assert converters.verify(tmp_path / "out", deep=True) == []
    # a flipped bit in a tensor's bytes is found by its digest
    data = (tmp_path / "out" / "__0_0.distcp").read_bytes()
    stored = bytes(read_all(read.tree["w"].source))
    at = data.index(stored) + 5
    flipped = bytearray(data)
    flipped[at] ^= 1
    (tmp_path / "out" / "__0_0.distcp").write_bytes(bytes(flipped))
    problems = converters.verify(tmp_path / "out", deep=True)
    assert problems and all(": w: " in problem for problem in problems), problems


def test_records_are_written_as_a_pt_writes_them(tmp_path: Path) -> None:
    tree = {"args": argparse.Namespace(lr=0.1), "thing": Thing(3), "w": torch.ones(2)}
    torch.save(tree, tmp_path / "source.pt")
    with pytest.raises(UnsupportedValueError, match=r"at thing: the recorded object of class test_dcp_writer\.Thing"):
        converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    converters.convert(
        tmp_path / "source.pt", tmp_path / "out", dst_format="dcp", allow_class=["test_dcp_writer.Thing"]
    )
    view = torch_view(tmp_path / "out")  # dcp.load re-creates them (torch.load of the value)
    assert view["args"] == argparse.Namespace(lr=0.1) and type(view["thing"]) is Thing and view["thing"].value == 3
    assert differences(converters.read(tmp_path / "source.pt").tree, converters.read(tmp_path / "out").tree) == []


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        (
            {"a.b": torch.ones(1), "a": {"b": torch.ones(1)}},
            r"DCP flattens \['a\.b'\] and \['a', 'b'\] to one key 'a\.b'",
        ),
        ({0: 1, "0": 2}, r"DCP flattens \[0\] and \['0'\] to one key '0'"),
    ],
)
def test_values_dcp_cannot_tell_apart_are_refused(tmp_path: Path, tree: Any, match: str) -> None:
    refused(tree, tmp_path, match)


# ------------------------------------------------------------------------------ sdconvert.json


def test_a_folder_saved_again_by_torch_is_not_taken_for_ours(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3), "epoch": 3}, tmp_path / "source.pt")
    folder = converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    quiet_save({"w": torch.zeros(3), "epoch": 4}, folder)  # torch writes its files over ours
    with pytest.raises(CorruptFileError, match=r"sdconvert\.json describes another \.metadata: .* delete sdconvert"):
        converters.read(folder)
    (folder / "sdconvert.json").unlink()
    assert converters.load(folder)["epoch"] == 4


def test_a_tree_that_is_not_the_folders_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3), "epoch": 3}, tmp_path / "source.pt")
    folder = converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    sidecar = json.loads((folder / "sdconvert.json").read_text())
    sidecar["tree"] = sidecar["tree"].replace('{"int":3}', '{"int":4}')
    (folder / "sdconvert.json").write_text(json.dumps(sidecar))
    with pytest.raises(CorruptFileError, match=r"entry 'epoch' is not what the tree of sdconvert\.json makes"):
        converters.read(folder)


def test_a_full_disk_names_the_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    torch.save({"w": torch.arange(1 << 19, dtype=torch.float32), "epoch": 3}, tmp_path / "source.pt")

    def full(*args: Any) -> int:  # the kernel copy, and the buffered copy it falls back to
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    monkeypatch.setattr(os, "pwrite", full)
    destination = tmp_path / "out"
    with pytest.raises(DestinationError, match="no space left on the device") as caught:
        converters.convert(tmp_path / "source.pt", destination, dst_format="dcp")
    assert caught.value.file == str(destination) and caught.value.errno == errno.ENOSPC
    assert not destination.exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]


# ------------------------------------------------------------------------------ tensors stored twice


def _stored_twice(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A tensor at "a" and inside the tuple entry "b": stored in both archives, listed in copies."""
    t = torch.arange(8.0)
    torch.save({"a": t, "b": (t, 1)}, tmp_path / "source.pt")
    folder = converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    assert json.loads((folder / "sdconvert.json").read_text())["copies"] == [["b", 0, "a", 0]]
    return folder, t


def _rewrite_in_archive(folder: Path, fqn: str, old: bytes, new: bytes, *, fix_crc: bool) -> None:
    """Replace ``old`` by ``new`` (same length) in the archive of ``fqn``, its digest record kept;
    with ``fix_crc`` the zip CRC-32s too (a rewrite by a tool), else not (bit rot)."""
    info = {index.fqn: value for index, value in torch_metadata(folder).storage_data.items()}[fqn]
    path = folder / info.relative_path
    data = bytearray(path.read_bytes())
    start = data.index(old, info.offset, info.offset + info.length)
    data[start : start + len(old)] = new
    if fix_crc:
        crc = zlib.crc32(new)
        for signature, crc_at in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
            at = info.offset
            while (at := data.find(signature, at, info.offset + info.length)) >= 0:
                if struct.unpack_from("<I", data, at + crc_at)[0] == zlib.crc32(old):
                    struct.pack_into("<I", data, at + crc_at, crc)
                at += 4
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["rewritten, records kept", "one bit flipped"])
def test_a_tensor_stored_twice_is_compared_by_its_bytes(tmp_path: Path, how: str) -> None:
    """The second copy was taken for the first when the two archives' digest records agreed: other
    bytes there (what torch loads) went unseen by load and verify --deep. Now its bytes are compared."""
    folder, t = _stored_twice(tmp_path)
    old = tensor_bytes(t)
    new = (
        tensor_bytes(torch.full((8,), 666.0))
        if how.startswith("rewritten")
        else bytes([old[0], old[1] ^ 0x40]) + old[2:]
    )
    _rewrite_in_archive(folder, "b", old, new, fix_crc=how.startswith("rewritten"))
    assert not torch.equal(torch_view(folder)["b"][0], t)  # what torch loads differs
    message = (
        r"'b' \(its tensor 0\) and 'a' \(its tensor 0\), which sdconvert\.json records as one tensor stored "
        r"twice, hold different tensors"
    )
    with pytest.raises(CorruptFileError, match=message):
        converters.load(folder)
    result = sdconvert("verify", "--deep", folder)
    assert result.returncode == 2 and "hold different tensors" in result.stderr, result.stderr


def test_a_tensor_tied_into_a_tuple_and_two_entries_reads_back(tmp_path: Path) -> None:
    """A tensor two tensor entries name (one range, one object) was shared with its copy in one of
    them only: the folder could not be read back."""
    t = torch.arange(4.0)
    tree = {"pair": (t, 1), "a": t, "b": t}
    torch.save(tree, tmp_path / "source.pt")
    converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    loaded = converters.load(tmp_path / "out")
    assert_bit_identical(tree, loaded)
    assert loaded["a"] is loaded["b"] is loaded["pair"][0]
    assert converters.verify(tmp_path / "out", deep=True) == []


def test_copies_cost_one_comparison_each(tmp_path: Path) -> None:
    """A crafted sdconvert.json naming one pair 20,000 times beside a folder torch wrote (no digest
    records) read both tensors whole each time: 48 s of CPU for 2.3 MiB. Each pair is compared once,
    and the bytes compared are charged to the read's budget."""
    t = torch.randn(256 * 1024)  # 1 MiB
    state = {"a": t, "b": (t, 1)}
    torch.save(state, tmp_path / "source.pt")
    ours = converters.convert(tmp_path / "source.pt", tmp_path / "ours", dst_format="dcp")
    folder = tmp_path / "torch"
    quiet_save(state, folder)
    sidecar = json.loads((ours / "sdconvert.json").read_text())
    sidecar["metadata_blake3"] = blake3((folder / ".metadata").read_bytes()).hexdigest()

    def read(copies: list[list[Any]], budget: Budget | None = None) -> Budget:
        (folder / "sdconvert.json").write_text(json.dumps({**sidecar, "copies": copies}))
        budget = budget or Budget.for_path(folder)
        checkpoint = reader.read_folder(folder, budget)
        assert checkpoint.tree["b"][0] is checkpoint.tree["a"]
        return budget

    once = read([["b", 0, "a", 0]]).output_bytes
    size = sum(path.stat().st_size for path in folder.iterdir())
    with within_resource_bounds(size):
        assert read([["b", 0, "a", 0]] * 20_000).output_bytes == once
    # the comparison is charged: a budget that covers reading the tensors but not comparing them refuses
    tight = Budget.for_path(folder)
    tight.output_limit = once - 1
    with pytest.raises(CorruptFileError, match=r"tensor bytes compared for sdconvert\.json's copies"):
        read([["b", 0, "a", 0]], tight)
    # a list making a copy of a copy, or of two tensors, is not ours
    (folder / "sdconvert.json").write_text(json.dumps({**sidecar, "copies": [["b", 0, "a", 0], ["a", 0, "b", 0]]}))
    with pytest.raises(CorruptFileError, match=r"copies make tensor 0 of 'a' a copy of two tensors, or of a copy"):
        converters.read(folder)
