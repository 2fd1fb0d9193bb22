"""A model with keyword arguments and a dict-and-tuple output.

`aotpack build examples/multi_io.py -o multi_io.pack` uses the module-level names below;
`aotpack build examples/multi_io.py:make -o multi_io.pack` calls `make()` instead.
"""
import torch
from torch import nn

torch.manual_seed(0)


class Scorer(nn.Module):
    """Scores tokens, masks padding, and returns logits plus (pooled, attention) as a tuple."""

    def __init__(self, dim: int = 32, classes: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, 1)
        self.cls = nn.Linear(dim, classes)

    def forward(self, tokens, *, mask, temperature: float = 1.0):
        h = self.norm(torch.tanh(self.proj(tokens)))
        scores = self.attn(h).squeeze(-1) / temperature
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        pooled = (weights.unsqueeze(-1) * h).sum(dim=1)
        return {"logits": self.cls(pooled), "extras": (pooled, weights)}


def make():
    model = Scorer().eval()
    tokens = torch.rand(2, 12, 32) * 2 - 1  # rand: the same values on every CPU (README)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    return model, (tokens,), {"mask": mask, "temperature": 0.5}


model, example_inputs, example_kwargs = make()
