from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The test servers (S3 behind a byte-counting proxy, HTTP with Range) as fixtures: tests/remote_fixtures.py
pytest_plugins = ["remote_fixtures"]

# A suite started in the background without job control (`make test &` in a script) inherits
# SIGINT ignored, and so would every process it starts: the Ctrl-C tests would test nothing.
# Catching it here makes it raise KeyboardInterrupt again, and children (exec resets a caught
# signal to its default) get Python's own handler.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from converters import recipe  # noqa: E402


@pytest.fixture(scope="session")
def trained() -> tuple[recipe.Net, torch.optim.SGD, dict[str, Any]]:
    """The recipe Net + SGD after 3 steps and their general checkpoint dict (do not mutate)."""
    return recipe.trained_checkpoint(steps=3)


@pytest.fixture
def recipe_pt(tmp_path: Path, trained: tuple[Any, Any, dict[str, Any]]) -> Path:
    """The trained general checkpoint, written by plain torch.save."""
    path = tmp_path / "recipe.pt"
    torch.save(trained[2], path)
    return path
