"""Tiny models whose packs (tests/data/formats/build-packs.sh) hold one format version each: each is
``FILE.py:NAME`` for ``aotpack build``, and test_format_versions.py calls the same function for eager's
answer. Weights are set from ``torch.arange``, not drawn, so every torch makes the same model."""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim


class Tiny(nn.Module):
    """Linear(4, 3) and a ReLU."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10 - 0.5)
            self.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        return torch.relu(self.fc(x))


class Counting(Tiny):
    """Tiny with state: a step counter the forward writes in place (a pack with state, version 3)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        return torch.relu(self.fc(x)) * self.count


def _x(rows: int) -> torch.Tensor:
    return torch.linspace(-1, 1, rows * 4).reshape(rows, 4)


def plain():
    """Version 1: a CPU pack (version 2 when built with --device cpu --device cuda)."""
    return Tiny().eval(), (_x(2),)


def stateful():
    """Version 3: a pack with state."""
    return Counting().eval(), (_x(2),)


def unbounded():
    """Version 4: a dynamic dimension without an upper bound."""
    return {"model": Tiny().eval(), "example_inputs": (_x(3),), "dynamic_shapes": {"x": {0: Dim("n", min=2)}}}
