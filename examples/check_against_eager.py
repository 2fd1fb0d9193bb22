"""Load a pack in this (fresh) process and compare it with the eager model it was built from.

Usage: python examples/check_against_eager.py MODEL_FILE.py[:NAME] PACK
"""
import sys
import time

import torch
import torch.utils._pytree as pytree

import aotpack
from aotpack.modelfile import load_model_file


def main(target: str, pack: str) -> int:
    start = time.perf_counter()
    pkg = aotpack.load(pack)
    loaded = time.perf_counter()
    spec = load_model_file(target)
    with torch.inference_mode():
        out = pkg(*spec.example_inputs, **spec.example_kwargs)
        ref = spec.model(*spec.example_inputs, **spec.example_kwargs)
    errors = [(a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
              for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)) if isinstance(b, torch.Tensor)]
    worst = max(errors)
    print(f"load {1e3 * (loaded - start):.1f} ms; max error relative to the output scale vs eager: {worst:.2e}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
