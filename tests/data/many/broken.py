"""A model that cannot be captured (data-dependent branching): its build-many tasks fail, the others land."""
import torch


def model(x):
    if x.sum() > 0:
        return x * 2
    return x


example_inputs = (torch.rand(3),)
