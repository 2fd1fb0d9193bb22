"""One measurement in a fresh process, run by bench_big.py: ``python _big_child.py MODE RESULT_JSON ARGS...``.

Timed modes count from the first line of this file, before ``import torch``. The models are Hugging Face
``LlamaForCausalLM`` with random weights (the same seed in every process), one configuration per size.
"""
import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

# One Llama architecture (GQA: 4 key/value heads, SwiGLU, RMSNorm, RoPE; vocabulary 32000, float32) at three
# sizes, about 0.13, 0.62 and 2.5 GB of weights, and a fourth past 4 GiB.
SIZES = {
    "0.1GB": dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=1024),
    "0.6GB": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816),
    "2.5GB": dict(hidden_size=2048, num_hidden_layers=11, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=5632),
    # TinyLlama-1.1B's shape (1.1 billion parameters): the check of a model past 4 GiB, run by hand.
    "4.4GB": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  intermediate_size=5632),
}
VOCAB, SEQ = 32000, 32


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def make_model(size):
    """The model for ``size`` and its example input (token ids [1, SEQ]); weights uniform in ±0.02."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=256, **SIZES[size])
    with torch.device("meta"):
        lm = LlamaForCausalLM(config)
    lm = lm.to_empty(device="cpu")  # allocate without the (slow) default initialisation, then fill
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            p.uniform_(-0.02, 0.02, generator=gen)
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config)  # its buffers are computed, not drawn
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=gen)
    return Logits(lm).eval(), ids


def build_aotpack(size, pack, ref):
    import torch

    import aotpack

    model, ids = make_model(size)
    with torch.inference_mode():
        torch.save({"ids": ids, "logits": model(ids)}, ref)
    lines = []
    start = time.perf_counter()
    aotpack.build(model, (ids,), pack, progress=lines.append)
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss(), "summary": lines[-1],
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "size": os.path.getsize(pack)}


def build_aoti(size, pt2):
    import torch
    import torch._inductor

    model, ids = make_model(size)
    start = time.perf_counter()
    exported = torch.export.export(model, (ids,))
    torch._inductor.aoti_compile_and_package(exported, package_path=pt2)
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss(), "size": os.path.getsize(pt2)}


def load(pack, verify):
    import aotpack

    start = time.perf_counter()
    pkg = aotpack.load(pack, verify=verify)
    return {"seconds": time.perf_counter() - start, "checked": pkg.checked}


def load_aoti(pt2):
    import torch._inductor

    start = time.perf_counter()
    torch._inductor.aoti_load_package(pt2)
    return {"seconds": time.perf_counter() - start}


def hash_rate(pack, threads):
    from aotpack_runtime.archive import Archive

    archive = Archive.open(pack)
    start = time.perf_counter()
    n = archive.check_blobs(threads=int(threads))
    return {"seconds": time.perf_counter() - start, "bytes": n}


def import_torch():
    import torch  # noqa: F401

    return {"ms": 1e3 * (time.perf_counter() - T0)}


def first_output(pack, prefetch, ref):
    import torch

    import aotpack

    pkg = aotpack.load(pack, prefetch=prefetch == "prefetch")
    args, kwargs = pkg.example_inputs()
    with torch.inference_mode():
        out = pkg(*args, **kwargs)
    ms = 1e3 * (time.perf_counter() - T0)
    return {"ms": ms, "checked": pkg.checked, "max_abs_diff": (out - torch.load(ref)["logits"]).abs().max().item()}


def first_output_aoti(pt2, ref):
    import torch
    import torch._inductor

    compiled = torch._inductor.aoti_load_package(pt2)
    ids = torch.load(ref)["ids"]
    with torch.inference_mode():
        out = compiled(ids)
    ms = 1e3 * (time.perf_counter() - T0)
    return {"ms": ms, "max_abs_diff": (out - torch.load(ref)["logits"]).abs().max().item()}


def serve(kind, path, ref):
    """Load, answer once, say so, and wait (the parent measures this process's memory meanwhile)."""
    import torch

    ids = torch.load(ref)["ids"]
    if kind == "aotpack":
        import aotpack

        fn = aotpack.load(path)
    else:
        import torch._inductor

        fn = torch._inductor.aoti_load_package(path)
    with torch.inference_mode():
        fn(ids)
    print("ready", flush=True)
    sys.stdin.readline()
    return {}


MODES = {"build-aotpack": build_aotpack, "build-aoti": build_aoti, "load": load, "load-aoti": load_aoti,
         "hash": hash_rate, "import-torch": import_torch, "first-output": first_output,
         "first-output-aoti": first_output_aoti, "serve": serve}


def main(mode, result_path, *argv):
    result = MODES[mode](*argv)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
