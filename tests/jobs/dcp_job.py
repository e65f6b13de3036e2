"""A 2-rank job on the gloo backend, for tests/test_dcp.py.

    python tests/jobs/dcp_job.py save FOLDER REFERENCE.pt   # FSDP2-sharded Net + SGD, dcp.save
    python tests/jobs/dcp_job.py load FOLDER LOADED.pt      # dcp.load into sharded state, gathered

Ranks run in processes spawned here; rank 0 writes the full (gathered) state with torch.save.
Every rank passes a barrier before destroy_process_group: without it a gloo rank can abort at
teardown ("terminate called without an active exception").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from gloo import full, spawn

from converters.recipe import Net, make_optimizer, train_steps

WORLD = 2


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = Net()
    fully_shard(net)  # FSDP2: parameters become DTensors sharded along dim 0 over the 2 ranks
    return net, make_optimizer(net)


def run(rank: int, mode: str, folder: str, output: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        net, optimizer = build()
        if mode == "save":
            train_steps(net, optimizer, 3, seed=0)
            model_state, optimizer_state = get_state_dict(net, optimizer)
            state = {"model": model_state, "optim": optimizer_state}
            dcp.save(state, checkpoint_id=folder)
        else:
            train_steps(net, optimizer, 1, seed=5)  # state to be overwritten by the load
            model_state, optimizer_state = get_state_dict(net, optimizer)
            state = {"model": model_state, "optim": optimizer_state}
            dcp.load(state, checkpoint_id=folder)
        gathered = full(state)
        if rank == 0:
            torch.save(gathered, output)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    spawn(run, *sys.argv[1:4], world=WORLD)
