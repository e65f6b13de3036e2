"""A conversion killed with SIGKILL at any moment leaves no destination or a complete one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import converters

CLI = Path(__file__).resolve().parent.parent / "cli.py"
DELAYS = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.7, 0.9, 1.2, 1.6]
SUFFIXES = [".pt", ".safetensors", ".msgpack", ".onnx"]


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 48 MiB, so a conversion takes long enough to be killed part-way."""
    path = tmp_path_factory.mktemp("kill") / "source.pt"
    generator = torch.Generator().manual_seed(0)
    torch.save({f"layer{i}.weight": torch.randn(1024, 1024, generator=generator) for i in range(12)}, path)
    return path


@pytest.mark.parametrize("delay", DELAYS)
def test_sigkill_leaves_nothing_or_a_complete_file(tmp_path: Path, big_source: Path, delay: float) -> None:
    suffix = SUFFIXES[DELAYS.index(delay) % len(SUFFIXES)]
    destination = tmp_path / f"out{suffix}"
    # An existing destination replaced with --force: after the kill it is the old file or the new.
    converters.save({"old": torch.ones(1)}, destination)
    old = destination.read_bytes()
    process = subprocess.Popen(
        [sys.executable, str(CLI), "convert", str(big_source), str(destination), "--force", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if destination.exists() and destination.read_bytes() != old:
        assert converters.verify(big_source, destination) == [], f"killed after {delay}s: partial {destination.name}"
    elif destination.exists():
        assert converters.load(destination)["old"].tolist() == [1.0]
    # What a kill can leave is a temporary file beside it, never under the destination's name.
    leftovers = {p.name for p in tmp_path.iterdir()} - {destination.name, destination.name + ".data"}
    assert all(name.endswith(".partial") for name in leftovers), leftovers
