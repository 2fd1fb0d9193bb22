"""A three-layer MLP: `aotpack build examples/mlp.py -o mlp.pack`."""
import torch
from torch import nn

torch.manual_seed(0)


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 256, d_out: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, d_out))

    def forward(self, x):
        return self.net(x)


model = MLP().eval()
# torch.rand, not torch.randn: randn draws different values on CPUs with different vector units, and
# the example inputs are stored in the pack (see README, "Reproducibility").
example_inputs = (torch.rand(8, 64) * 2 - 1,)
