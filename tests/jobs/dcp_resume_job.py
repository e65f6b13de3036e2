"""A 2-rank job on the gloo backend, for tests/test_dcp_writer.py: DCP folders we wrote, loaded and
resumed from by torch's own distributed code.

    python tests/jobs/dcp_resume_job.py JOB.json

JOB.json names (all paths):

- ``values``/``template``/``values_out``: a folder of every kind of value (``values``), loaded
  with ``dcp.load`` into ``template`` (``torch.load``ed: the tree ``dcp_to_torch_save`` gives, its
  tensors zeroed) by both ranks; rank 0 saves what was loaded to ``values_out``.
- ``resume``: {name: DCP folder} of the recipe checkpoint, each resumed by the standard code:
  ``fully_shard(net)``, ``get_state_dict(net, optimizer)``, ``dcp.load`` of ``{"model", "optimizer"}``,
  ``set_state_dict``, then ``STEPS`` SGD steps on seeded data (the same on both ranks); rank 0
  saves every folder's parameters and optimizer state after the steps, gathered, to ``resume_out``.

Every rank passes a barrier before destroy_process_group (see dcp_job.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from gloo import full, spawn

from converters.recipe import Net, make_optimizer, train_steps

WORLD = 2
STEPS = 3
SEED = 7  # the data of the steps after resuming


def resume(folder: str) -> dict[str, Any]:
    torch.manual_seed(1)  # other weights than the checkpoint's: the load must replace them all
    net = Net()
    fully_shard(net)
    optimizer = make_optimizer(net)
    model_state, optimizer_state = get_state_dict(net, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    loaded = full(get_state_dict(net, optimizer)[1])
    train_steps(net, optimizer, STEPS, seed=SEED)
    return {
        "loaded_optimizer": loaded,
        "parameters": full(dict(net.state_dict())),
        "optimizer": full(get_state_dict(net, optimizer)[1]),
    }


def run(rank: int, job: dict[str, Any], port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        template = torch.load(job["template"], weights_only=False)
        dcp.load(template, checkpoint_id=job["values"])
        if rank == 0:
            torch.save(template, job["values_out"])
        resumed = {name: resume(folder) for name, folder in job["resume"].items()}
        if rank == 0:
            torch.save(resumed, job["resume_out"])
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    spawn(run, json.loads(Path(sys.argv[1]).read_text()), world=WORLD)
