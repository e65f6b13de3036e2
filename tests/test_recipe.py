"""converters.recipe.rebuild gives a fresh Net + SGD identical to the file, and training continues identically."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bit_identical, builtin_suffixes

import converters
from converters import recipe

SUFFIXES = builtin_suffixes()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_rebuild_gives_bit_identical_state(tmp_path: Path, recipe_pt: Path, trained: Any, suffix: str) -> None:
    net, optimizer, _ = trained
    path = converters.convert(recipe_pt, tmp_path / f"ckpt{suffix}")
    rebuilt_net, rebuilt_optimizer = recipe.rebuild(path)
    assert type(rebuilt_net) is recipe.Net and type(rebuilt_optimizer) is torch.optim.SGD
    assert_bit_identical(net.state_dict(), rebuilt_net.state_dict())
    assert_bit_identical(optimizer.state_dict(), rebuilt_optimizer.state_dict())


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_training_continues_bit_identically(tmp_path: Path, recipe_pt: Path, trained: Any, suffix: str) -> None:
    net, optimizer, _ = trained
    reference_net = copy.deepcopy(net)
    reference_optimizer = recipe.make_optimizer(reference_net)
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    rebuilt_net, rebuilt_optimizer = recipe.rebuild(converters.convert(recipe_pt, tmp_path / f"c{suffix}"))

    losses_reference = [recipe.train_steps(reference_net, reference_optimizer, 1, seed=100 + i) for i in range(4)]
    losses_rebuilt = [recipe.train_steps(rebuilt_net, rebuilt_optimizer, 1, seed=100 + i) for i in range(4)]

    assert_bit_identical(losses_reference, losses_rebuilt)
    assert_bit_identical(reference_net.state_dict(), rebuilt_net.state_dict())
    assert_bit_identical(reference_optimizer.state_dict(), rebuilt_optimizer.state_dict())
    assert reference_net.state_dict()["fc3.bias"].ne(net.state_dict()["fc3.bias"]).any(), "training moved nothing"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_bare_model_state_dict_gives_a_fresh_default_optimizer(tmp_path: Path, trained: Any, suffix: str) -> None:
    net = trained[0]
    path = tmp_path / f"weights{suffix}"
    converters.save(net.state_dict(), path)
    rebuilt_net, rebuilt_optimizer = recipe.rebuild(path)
    assert_bit_identical(net.state_dict(), rebuilt_net.state_dict())
    fresh = recipe.make_optimizer(recipe.Net()).state_dict()
    assert_bit_identical(fresh, rebuilt_optimizer.state_dict())
    assert rebuilt_optimizer.state_dict()["param_groups"][0]["lr"] == 0.001


def test_rebuild_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(converters.ConverterError, match=r"the model state does not fit the recipe Net: .*Missing key"):
        recipe.rebuild(path)


def test_rebuild_refuses_a_tree_without_a_model(tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(converters.ConverterError, match="found neither a bare model state_dict nor one of the keys"):
        recipe.rebuild(path)
