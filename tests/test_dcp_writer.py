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
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import assert_bit_identical, exotic_tree, tensor_bytes
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import converters
from converters import recipe
from converters.core.compare import differences
from converters.core.contract import WriteContext
from converters.core.errors import CorruptFileError, DestinationError, UnsupportedValueError
from converters.core.sources import read_all
from converters.core.writing import TensorWriter
from converters.formats.dcp import optimizers, writer

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
    """An empty dict is no entry for DCP (torch's own readers then fail on a list with a hole:
    dcp_to_torch_save asks for the ``None`` it put there); ours come back from sdconvert.json."""
    tree = {"holes": [torch.ones(1), {}, 2, {"a": {}}], "empty": {}, "t": ((), [])}
    torch.save(tree, tmp_path / "source.pt")
    converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    quiet_save(tree, tmp_path / "torch")
    assert torch_metadata(tmp_path / "out").planner_data == torch_metadata(tmp_path / "torch").planner_data
    assert_bit_identical(tree, converters.load(tmp_path / "out"))


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


def test_contiguous_param_groups_are_named_as_torch_names_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = recipe.Net()
    optimizer = _sgd(net, _groups(net, "contiguous"))
    _stepped(net, optimizer, (2, 3, 32, 32))
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "source.pt")
    converters.convert(tmp_path / "source.pt", tmp_path / "out", dst_format="dcp")
    model_state, optimizer_state = get_state_dict(net, optimizer)
    quiet_save({"model": model_state, "optimizer": optimizer_state}, tmp_path / "torch")
    assert_bit_identical(torch_view(tmp_path / "torch"), torch_view(tmp_path / "out"))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        (
            "decay groups",
            r"parameter 1's 'momentum_buffer' has the shape \[16, 6, 5, 5\], but parameter 1 of the model at model ",
        ),
        ("reversed", r"parameter 0's 'momentum_buffer' has the shape \[10\], but parameter 0 "),
        ("two groups, no state yet", r"it has 2 param_groups, .* of which parameter 0 has none"),
    ],
)
def test_a_mapping_that_cannot_be_checked_is_refused(tmp_path: Path, case: str, match: str) -> None:
    torch.manual_seed(0)
    net = recipe.Net()
    if case == "reversed":
        optimizer = _sgd(net, list(reversed(list(net.parameters()))))
    else:
        optimizer = _sgd(net, _groups(net, "decay" if case == "decay groups" else "contiguous"))
    if case != "two groups, no state yet":
        _stepped(net, optimizer, (2, 3, 32, 32))
    refused({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path, match)


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
