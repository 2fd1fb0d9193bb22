"""A tiny Llama (random weights, no download) as a pack of two methods sharing one KV cache: ``prefill``
takes a prompt of 1 to 63 tokens, ``decode`` exactly one token (its code is compiled for that size alone).

    aotpack build examples/llm/llama_methods.py -o llama-methods.pack
    aotpack run llama-methods.pack --method decode

Both methods are the static-cache wrapper's ``forward`` with other example inputs and shapes; the
wrapper's cache buffers are the pack's one state, which a session shares between them.
"""
import torch
from torch.export import Dim

import aotpack
from decoders import MAX_CACHE_LEN, wrapped

_, model = wrapped("llama")

methods = {
    "prefill": aotpack.Method(
        model.forward, example_kwargs={"input_ids": torch.tensor([[5, 17, 42]]), "cache_position": torch.tensor([0])},
        dynamic_shapes={"input_ids": {1: Dim("seq", min=1, max=MAX_CACHE_LEN - 1)}, "cache_position": None}),
    "decode": aotpack.Method(
        model.forward, example_kwargs={"input_ids": torch.tensor([[7]]), "cache_position": torch.tensor([3])}),
}
