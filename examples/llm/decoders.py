"""Tiny decoder-only LLMs from small configs with random weights (no downloads), wrapped for export with
Hugging Face's static KV cache (``TorchExportableModuleWithStaticCache``).

The wrapper registers the cache as buffers (``key_cache_{i}``, ``value_cache_{i}``, ``cumulative_length_{i}``)
that its forward writes in place: a pack carries them as state, and each session gets its own copy. Its
``forward(input_ids=..., cache_position=...)`` takes the tokens of this call and the cache position of the
first one; one entry with a dynamic sequence length serves both the prompt (prefill) and one token at a time
(decode).
"""
from __future__ import annotations

import torch
from torch.export import Dim

ARCHITECTURES = ("llama", "qwen3", "gemma2")
MAX_CACHE_LEN = 64


def config(arch: str, **overrides):
    from transformers import AutoConfig

    shape = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    shape.update(overrides)
    return AutoConfig.for_model(arch, **shape)


def wrapped(arch: str, max_cache_len: int = MAX_CACHE_LEN, seed: int = 0, **overrides):
    """(model, export wrapper): a tiny ``arch`` decoder with random weights, and the static-cache wrapper
    around it (the wrapper is what a pack is built from; the model is what eager generation uses)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, **overrides)).eval()
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    return model, TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_cache_len).eval()


def model_file(arch: str, max_cache_len: int = MAX_CACHE_LEN) -> tuple:
    """What a model file for ``aotpack build`` defines: ``(model, example_inputs, example_kwargs,
    dynamic_shapes)``: the wrapper, a 3-token prompt at position 0, and a dynamic sequence length from 1 to
    ``max_cache_len - 1`` tokens per call."""
    _, wrapper = wrapped(arch, max_cache_len)
    kwargs = {"input_ids": torch.tensor([[5, 17, 42]]), "cache_position": torch.tensor([0])}
    dynamic = {"input_ids": {1: Dim("seq", min=1, max=max_cache_len - 1)}, "cache_position": None}
    return wrapper, (), kwargs, dynamic


def greedy(step, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy generation with ``step(input_ids, cache_position) -> logits``: the whole prompt in one call
    (prefill), then one token per call (decode). Returns the new tokens."""
    logits = step(torch.tensor([prompt]), torch.tensor([0]))
    tokens = [int(logits[0, -1].argmax())]
    while len(tokens) < max_new_tokens:
        logits = step(torch.tensor([[tokens[-1]]]), torch.tensor([len(prompt) + len(tokens) - 1]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens
