"""Greedy generation from a stateful pack, token by token, through a session (no transformers needed).

    python examples/llm/generate.py llama.pack --prompt-ids 5,17,42 --max-new-tokens 32

The whole prompt goes through the pack in one call (prefill), then one token per call (decode); the
session holds this conversation's KV cache. Prints the new token ids and the timings.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import aotpack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pack")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids, e.g. 5,17,42")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    try:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    except ValueError:
        parser.error(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")

    start = time.perf_counter()
    pkg = aotpack.load(args.pack)
    loaded = time.perf_counter()
    chat = pkg.session()
    opened = time.perf_counter()
    with torch.inference_mode():
        logits = chat(input_ids=torch.tensor([prompt]), cache_position=torch.tensor([0]))
        prefilled = time.perf_counter()
        tokens = [int(logits[0, -1].argmax())]
        steps = []
        while len(tokens) < args.max_new_tokens:
            t = time.perf_counter()
            logits = chat(input_ids=torch.tensor([[tokens[-1]]]),
                          cache_position=torch.tensor([len(prompt) + len(tokens) - 1]))
            tokens.append(int(logits[0, -1].argmax()))
            steps.append(time.perf_counter() - t)
    print("tokens:", ",".join(map(str, tokens)))
    decode = f"decode {1 / statistics.median(steps):.0f} tokens/s (median of {len(steps)})" if steps else "no decode"
    print(f"load {1e3 * (loaded - start):.1f} ms, session {1e6 * (opened - loaded):.0f} us, prefill of "
          f"{len(prompt)} tokens {1e3 * (prefilled - opened):.2f} ms, {decode}")


if __name__ == "__main__":
    main()
