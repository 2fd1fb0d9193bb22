"""A tiny model for the build-many and build cache tests."""
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval()
example_inputs = (torch.rand(4, 16),)
