"""Low-precision weights: a Hugging Face Llama (small config, random weights) in bfloat16 and in float16
builds, is served from a fresh process (which never imports transformers), and matches eager in the same
dtype within that dtype's tolerance; its weights are stored in that dtype, byte for byte."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import aotpack
from aotpack.package import tensor_bytes
from aotpack_runtime.archive import Archive
from aotpack_runtime.guards import dtype_name
from conftest import run_python

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="needs transformers (the test extras)")]

# Max |pack - eager| over the output, relative to max |eager|: a few units in the last place of the dtype
# (bfloat16 keeps 8 significant bits, float16 11). Inductor computes in float32 inside a fused kernel and
# rounds once where eager rounds after every op, so the two differ by rounding, not by more.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
DTYPE_NAME = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


class Logits(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _llama(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1000, max_position_embeddings=64)
    return Logits(LlamaForCausalLM(config).to(dtype)).eval()


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def low_precision(session_dir) -> dict:
    """Both models built once; one fresh process serves both on the example and on new inputs."""
    built = {}
    for dtype in TOLERANCE:
        model = _llama(dtype)
        path = session_dir / f"llama-{DTYPE_NAME[dtype]}.pack"
        aotpack.build(model, _inputs(1), path)
        built[dtype] = (model, path)
    jobs, outputs = session_dir / "low-precision-jobs.pt", session_dir / "low-precision-outputs.pt"
    torch.save({DTYPE_NAME[d]: str(p) for d, (_, p) in built.items()}, jobs)
    proc = run_python(f"""
import sys, torch, aotpack
paths = torch.load({str(jobs)!r})
inputs = [{tuple(t.tolist() for t in _inputs(1))!r}, {tuple(t.tolist() for t in _inputs(2))!r}]
out = {{}}
with torch.inference_mode():
    for name, path in paths.items():
        pkg = aotpack.load(path)
        out[name] = [pkg(torch.tensor(ids), torch.tensor(mask)) for ids, mask in inputs]
torch.save(out, {str(outputs)!r})
assert "transformers" not in sys.modules
""", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = torch.load(outputs)
    return {dtype: (model, path, served[DTYPE_NAME[dtype]]) for dtype, (model, path) in built.items()}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=list(DTYPE_NAME.values()))
def test_low_precision_llama_matches_eager_in_its_dtype(low_precision, dtype):
    model, _, served = low_precision[dtype]
    for out, seed in zip(served, (1, 2)):
        with torch.inference_mode():
            ref = model(*_inputs(seed))
        assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
        assert torch.isfinite(out).all()
        err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
        assert err <= TOLERANCE[dtype], f"{DTYPE_NAME[dtype]}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=list(DTYPE_NAME.values()))
def test_low_precision_weights_are_stored_in_their_dtype(low_precision, dtype):
    model, path, _ = low_precision[dtype]
    archive = Archive.open(path)
    params = dict(model.named_parameters())
    tensors = {**dict(model.named_buffers()), **params}
    assert {w.dtype for w in archive.manifest.weights if w.name in params} == {DTYPE_NAME[dtype]}
    for w in archive.manifest.weights:
        assert w.dtype == dtype_name(tensors[w.name].dtype), w.name
        assert archive.read_blob(w.blob) == tensor_bytes(tensors[w.name]), w.name
