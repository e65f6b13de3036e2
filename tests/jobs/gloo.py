"""What the 2-rank gloo jobs of tests/jobs share: gathering sharded state, and spawning the ranks."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor


def full(value: Any) -> Any:
    """The same tree with every DTensor gathered into a plain tensor."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {key: full(item) for key, item in value.items()}
    if isinstance(value, list):
        return [full(item) for item in value]
    return value


def spawn(run: Callable[..., None], *args: Any, world: int) -> None:
    """``run(rank, *args, port)`` in ``world`` processes, ``port`` a free one on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    mp.spawn(run, args=(*args, port), nprocs=world, join=True)
