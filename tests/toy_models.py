"""A module class for the `--model package.module:Class` tests (built without arguments)."""

from __future__ import annotations

import torch
from torch import nn


class TinyBatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("offset", torch.full((3,), 0.5), persistent=False)  # in the graph, not the state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.fc(x)) + self.offset
        return out
