"""The reference model of the PyTorch recipe "What is a state_dict", and rebuilding it from any file.

Example::

    net, optimizer = rebuild("checkpoint.safetensors")
    train_steps(net, optimizer, steps=3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn, optim

from .api import load
from .core.errors import ConverterError, PathLike

LR = 0.001
MOMENTUM = 0.9
INPUT_SHAPE = (3, 32, 32)  # CIFAR-10 sized images, as in the recipe
MODEL_KEYS = ("model_state_dict", "model", "state_dict", "net")
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optim")


class Net(nn.Module):
    """conv1 3→6 k5, 2×2 max-pool, conv2 6→16 k5, fc1 400→120, fc2 120→84, fc3 84→10, ReLUs."""

    example_input_shape = (1, *INPUT_SHAPE)  # what `--model recipe` traces when no --input-shape is given

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        out: torch.Tensor = self.fc3(x)
        return out


def make_optimizer(net: nn.Module) -> optim.SGD:
    """The recipe's optimizer: SGD with lr=0.001 and momentum=0.9."""
    return optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)


def train_steps(net: nn.Module, optimizer: optim.Optimizer, steps: int, *, seed: int = 0, batch: int = 4) -> float:
    """Run ``steps`` SGD steps on generated images and labels (seeded); returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        images = torch.randn((batch, *INPUT_SHAPE), generator=generator)
        labels = torch.randint(0, 10, (batch,), generator=generator)
        optimizer.zero_grad()
        loss = F.cross_entropy(net(images), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return float(loss.item())


def trained_checkpoint(steps: int = 3, *, seed: int = 0) -> tuple[Net, optim.SGD, dict[str, Any]]:
    """A seeded Net and SGD after ``steps`` steps, and the recipe's general checkpoint dict of them."""
    torch.manual_seed(seed)
    net = Net()
    optimizer = make_optimizer(net)
    loss = train_steps(net, optimizer, steps, seed=seed)
    checkpoint = {
        "epoch": steps,
        "model_state_dict": net.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": loss,
    }
    return net, optimizer, checkpoint


def rebuild(path: PathLike, format: str | None = None) -> tuple[Net, optim.SGD]:
    """A fresh Net and SGD whose state_dicts are bit-identical to what the file holds.

    Accepts a general checkpoint (``model_state_dict`` + ``optimizer_state_dict``, or the common
    ``model``/``optimizer`` spellings) or a bare model state_dict (the optimizer is then fresh).
    """
    obj = load(path, format)
    model_state, optimizer_state = split_checkpoint(obj, path)
    net = Net()
    try:
        net.load_state_dict(model_state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise ConverterError(f"the model state does not fit the recipe Net: {_one_line(exc)}", file=path) from None
    optimizer = make_optimizer(net)
    if optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ConverterError(
                f"the optimizer state does not fit SGD over Net: {_one_line(exc)}", file=path
            ) from None
    return net, optimizer


def split_checkpoint(obj: Any, path: PathLike | None = None) -> tuple[Any, Any]:
    """(model state_dict, optimizer state_dict or None) of a loaded checkpoint object."""
    if not isinstance(obj, dict):
        raise ConverterError(f"expected a state_dict or checkpoint dict, found {type(obj).__name__}", file=path)
    if all(isinstance(value, torch.Tensor) for value in obj.values()):
        return obj, None
    model_key = next((key for key in MODEL_KEYS if key in obj), None)
    if model_key is None:
        raise ConverterError(
            f"found neither a bare model state_dict nor one of the keys {', '.join(MODEL_KEYS)}",
            file=Path(path) if path else None,
        )
    optimizer_key = next((key for key in OPTIMIZER_KEYS if key in obj), None)
    return obj[model_key], obj[optimizer_key] if optimizer_key else None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
