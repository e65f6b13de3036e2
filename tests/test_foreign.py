"""Files written by other tools (plain torch.save, safetensors.torch) are read exactly."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import assert_bit_identical, builtin_suffixes

import converters
from converters import recipe
from converters.recipe import Net


def test_plain_torch_save_checkpoint(recipe_pt: Path, trained: Any) -> None:
    assert_bit_identical(trained[2], converters.load(recipe_pt))
    assert_bit_identical(torch.load(recipe_pt), converters.load(recipe_pt))


@pytest.mark.parametrize("protocol", [2, 4])
def test_torch_save_with_views_and_shared_storage(tmp_path: Path, protocol: int) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tree = {
        "transposed": base.t(),  # non-contiguous strides
        "slice": base[1:3, 2:5],  # a view into a larger storage, with an offset
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
        "row": base[2],  # contiguous view with an offset
        "same_storage_a": base,
        "same_storage_b": base.view(6, 4),
        "param": torch.nn.Parameter(torch.ones(3)),
    }
    path = tmp_path / "views.pt"
    torch.save(tree, path, pickle_protocol=protocol)
    loaded = converters.load(path)
    expected = {key: value.detach().contiguous().clone() for key, value in tree.items()}
    assert_bit_identical(expected, loaded)
    # Strides are not kept: every tensor comes back C-contiguous with the same values.
    assert all(t.is_contiguous() for t in loaded.values())


def test_legacy_non_zip_torch_file_is_read(tmp_path: Path) -> None:
    # More in test_legacy_pt.py (issue 14): every dtype, views, hostile legacy files.
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert_bit_identical(torch.load(path, weights_only=True), converters.load(path))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_reads_as_its_state_dict(tmp_path: Path) -> None:
    # More in test_torchscript.py (issue 14): the order rule, every format, no code run, hostile archives.
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    assert converters.read(path).kind == "TorchScript archive"
    assert_bit_identical(torch.jit.load(path).state_dict(), converters.load(path))


def test_safetensors_save_file(tmp_path: Path, trained: Any) -> None:
    state = trained[0].state_dict()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(dict(state), path, metadata={"format": "pt"})
    loaded = converters.load(path)
    assert type(loaded) is dict
    assert_bit_identical(dict(sorted(state.items())), dict(sorted(loaded.items())))
    net = Net()
    net.load_state_dict(loaded)


def test_safetensors_save_model_with_tied_weights(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    path = tmp_path / "tied.safetensors"
    safetensors.torch.save_model(model, str(path))  # drops one of the shared names
    loaded = converters.load(path)
    assert len(loaded) == 1
    (name,) = loaded
    assert_bit_identical(model.state_dict()[name], loaded[name])


def test_safetensors_output_has_pt_format_metadata(tmp_path: Path, trained: Any) -> None:
    path = tmp_path / "w.safetensors"
    converters.save(trained[0].state_dict(), path)
    with safetensors.safe_open(path, "pt") as handle:
        assert handle.metadata()["format"] == "pt"


def test_ordered_dict_state_dict_keeps_metadata_versions(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    state = model.state_dict()
    assert isinstance(state, OrderedDict) and hasattr(state, "_metadata")
    for suffix in builtin_suffixes():
        path = tmp_path / f"bn{suffix}"
        converters.save(state, path)
        loaded = converters.load(path)
        assert_bit_identical(state, loaded)
        assert loaded["1.num_batches_tracked"].dtype == torch.int64 and loaded["1.num_batches_tracked"].dim() == 0


@pytest.mark.parametrize("suffix", builtin_suffixes())
def test_lightning_style_state_dict_wrapper(tmp_path: Path, trained: Any, suffix: str) -> None:
    """Trainers wrap the weights: {"state_dict": ..., "optimizer_states": [...], "lr_schedulers": [...]}."""
    net, optimizer, _ = trained
    checkpoint = {
        "epoch": 2,
        "global_step": 40,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": net.state_dict(),
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [{"step_size": 2, "gamma": 0.5, "base_lrs": [0.001], "last_epoch": 2}],
        "hyper_parameters": {"lr": 0.001, "momentum": 0.9},
    }
    source = tmp_path / "lightning.ckpt.pt"
    torch.save(checkpoint, source)
    converted = converters.convert(source, tmp_path / f"converted{suffix}")
    assert_bit_identical(checkpoint, converters.load(converted))
    rebuilt, _ = recipe.rebuild(converted)
    assert_bit_identical(net.state_dict(), rebuilt.state_dict())


def test_safetensors_like_transformers_save_pretrained(tmp_path: Path) -> None:
    """save_pretrained drops tied duplicates and writes {"format": "pt"}; the file reads as the rest."""
    state = {"embed.weight": torch.randn(5, 3), "layer.weight": torch.randn(3, 3), "layer.bias": torch.zeros(3)}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})
    loaded = converters.load(path)
    assert_bit_identical(dict(sorted(state.items())), dict(sorted(loaded.items())))
    assert converters.manifest(path)["file"]["format"] == "safetensors"
