"""A second tiny model (a function of two tensors, named by a function) for the build-many tests."""
import torch


def make():
    def fn(a, b):
        return torch.tanh(a) * b + 1.0

    torch.manual_seed(0)  # the example inputs are stored in the pack: the same ones every time
    return fn, (torch.rand(3, 5), torch.rand(3, 5))
