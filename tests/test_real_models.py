"""Models nobody on the team wrote: Hugging Face transformers architectures built from small configs with
random weights (no hub downloads), and two classic architectures written from their papers
(examples/models/). Each is built once per module, loaded in a fresh process that never imports
transformers, Dynamo or Inductor, run on its example inputs and on new inputs of the same shapes (new
token ids, another padding pattern), and compared with eager under torch.no_grad.

Models that cannot be captured as one graph must fail at build with a CaptureError naming the exact file
and line inside the library. docs/MODELS.md records the results.
"""
from __future__ import annotations

import importlib.util
import json
import linecache
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import aotpack
from conftest import EXAMPLES, run_python
from helpers import assert_close_to_eager, assert_facts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
except (ImportError, ValueError):
    HAVE_TRANSFORMERS = False

pytestmark = pytest.mark.slow

BATCH, SEQ, DEC_SEQ, VOCAB = 2, 16, 8, 1000


@dataclass
class Case:
    model: nn.Module
    args: tuple
    kwargs: dict
    fresh_args: tuple  # other values of the same shapes, never seen at build time
    fresh_kwargs: dict


def _ids(seed: int, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, seq), generator=torch.Generator().manual_seed(seed))


def _mask(pad_from: list[int], seq: int = SEQ) -> torch.Tensor:
    """Attention mask with right padding: row i is 1 before pad_from[i], 0 from there."""
    m = torch.ones(BATCH, seq, dtype=torch.long)
    for i, p in enumerate(pad_from):
        m[i, p:] = 0
    return m


# --- Hugging Face models (small configs, random weights) ---------------------------------------------

def make_bert() -> Case:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 vocab_size=VOCAB, max_position_embeddings=64)).eval()
    return Case(model, (_ids(1),), {"attention_mask": _mask([SEQ, 11]), "return_dict": False},
                (_ids(2),), {"attention_mask": _mask([5, SEQ]), "return_dict": False})


def make_gpt2() -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    kw = {"return_dict": False, "use_cache": False}
    return Case(model, (_ids(1),), dict(kw, attention_mask=_mask([SEQ, 12])),
                (_ids(2),), dict(kw, attention_mask=_mask([9, SEQ])))


class CausalLMLogits(nn.Module):
    """Wraps a Hugging Face causal LM: no KV cache, and a dict of plain tensors instead of a ModelOutput."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return {"logits": self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits}


def make_llama() -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                      max_position_embeddings=64))
    model = CausalLMLogits(lm).eval()
    return Case(model, (_ids(1), _mask([SEQ, 10])), {}, (_ids(2), _mask([13, SEQ])), {})


def make_t5() -> Case:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                                num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0)).eval()
    kw = {"return_dict": False, "use_cache": False}
    return Case(model, (_ids(1),), dict(kw, attention_mask=_mask([SEQ, 12]), decoder_input_ids=_ids(3, DEC_SEQ)),
                (_ids(2),), dict(kw, attention_mask=_mask([7, SEQ]), decoder_input_ids=_ids(4, DEC_SEQ)))


def make_vit() -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=128,
                                                num_labels=10)).eval()
    gen = torch.Generator().manual_seed(5)
    return Case(model, (torch.randn(BATCH, 3, 32, 32, generator=gen),), {"return_dict": False},
                (torch.randn(BATCH, 3, 32, 32, generator=gen),), {"return_dict": False})


def _mixtral(experts_implementation: str | None, layers: int = 2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return MixtralForCausalLM(MixtralConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                            max_position_embeddings=64, num_local_experts=4,
                                            num_experts_per_tok=2, **extra)).eval()


def make_mixtral() -> Case:
    """Sparse mixture of experts. transformers' default experts code on CPU (grouped_mm) calls its own custom
    operator, and "eager" loops over the experts that were hit (data-dependent); "batched_mm" gathers the
    top-k experts' weights per token with tensor operations only, which captures."""
    model = _mixtral("batched_mm")
    kw = {"return_dict": False, "use_cache": False}
    return Case(model, (_ids(1),), dict(kw, attention_mask=_mask([SEQ, 12])),
                (_ids(2),), dict(kw, attention_mask=_mask([6, SEQ])))


# --- Classic architectures from their papers (examples/models/) -------------------------------------

def _model_file(name: str):
    from aotpack.modelfile import load_model_file

    return load_model_file(str(EXAMPLES / "models" / f"{name}.py"))


def make_resnet() -> Case:
    spec = _model_file("resnet")
    gen = torch.Generator().manual_seed(5)
    return Case(spec.model, spec.example_inputs, {}, (torch.randn(spec.example_inputs[0].shape, generator=gen),),
                {})


def make_lstm_lm() -> Case:
    spec = _model_file("lstm_lm")
    tokens, h0, c0 = spec.example_inputs
    gen = torch.Generator().manual_seed(5)
    fresh = (torch.randint(0, VOCAB, tokens.shape, generator=gen), torch.randn(h0.shape, generator=gen),
             torch.randn(c0.shape, generator=gen))
    return Case(spec.model, spec.example_inputs, {}, fresh, {})


CASES: dict[str, Callable[[], Case]] = {
    "bert": make_bert, "gpt2": make_gpt2, "llama": make_llama, "t5": make_t5, "vit": make_vit,
    "mixtral": make_mixtral, "resnet": make_resnet, "lstm_lm": make_lstm_lm,
}
HF_CASES = {"bert", "gpt2", "llama", "t5", "vit", "mixtral"}


@dataclass
class BuildResult:
    case: Case | None
    path: pathlib.Path | None
    seconds: float
    error: BaseException | None


@pytest.fixture(scope="module")
def packs(session_dir) -> dict[str, BuildResult]:
    """Every available case, built once; a failed build is kept and reported by that case's test."""
    results = {}
    for name, make in CASES.items():
        if name in HF_CASES and not HAVE_TRANSFORMERS:
            continue
        start = time.perf_counter()
        try:
            case = make()
            path = aotpack.build(case.model, case.args, session_dir / f"real-{name}.pack",
                                 example_kwargs=case.kwargs)
            results[name] = BuildResult(case, path, time.perf_counter() - start, None)
        except Exception as e:  # reported by the test of this case
            results[name] = BuildResult(None, None, time.perf_counter() - start, e)
        print(f"\nbuilt {name} in {results[name].seconds:.1f} s" + (f": {results[name].error!r}"
                                                                     if results[name].error else ""))
    return results


@pytest.fixture(scope="module")
def fresh_outputs(packs, session_dir) -> dict[str, list]:
    """One fresh process loads every pack and runs each on its example and its fresh inputs."""
    jobs = {name: {"path": str(r.path), "inputs": [(r.case.args, r.case.kwargs),
                                                   (r.case.fresh_args, r.case.fresh_kwargs)]}
            for name, r in packs.items() if r.error is None}
    jobs_file, out_file = session_dir / "real-jobs.pt", session_dir / "real-outputs.pt"
    torch.save(jobs, jobs_file)
    code = f"""
import json, sys, time, torch
import aotpack
jobs = torch.load({str(jobs_file)!r})
results, load_s = {{}}, {{}}
for name, job in jobs.items():
    t = time.perf_counter()
    pkg = aotpack.load(job["path"])
    load_s[name] = time.perf_counter() - t
    results[name] = [pkg(*args, **kwargs) for args, kwargs in job["inputs"]]
torch.save(results, {str(out_file)!r})
heavy = [m for m in ("transformers", "torch._dynamo", "torch._inductor", "aotpack.capture") if m in sys.modules]
print(json.dumps({{"heavy": heavy, "load_s": load_s}}))
"""
    proc = run_python(code, env={"AOTPACK_CACHE_DIR": str(session_dir / "real-fresh-cache")}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"the serving process imported {report['heavy']}"
    print("\nfresh-process load times: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in report["load_s"].items()))
    return torch.load(out_file)


@pytest.mark.parametrize("name", list(CASES))
def test_builds_loads_fresh_and_matches_eager(name, packs, fresh_outputs):
    if name in HF_CASES:
        pytest.importorskip("transformers")
    result = packs[name]
    if result.error is not None:
        raise result.error
    case = result.case
    outs = fresh_outputs[name]
    for (args, kwargs), out in zip([(case.args, case.kwargs), (case.fresh_args, case.fresh_kwargs)], outs):
        with torch.no_grad():
            ref = case.model(*args, **kwargs)
        assert_close_to_eager(out, ref, rel=1e-4)
    # The fresh inputs are not the example: the pack computed, it did not replay.
    assert not torch.equal(torch.utils._pytree.tree_leaves(outs[0])[0], torch.utils._pytree.tree_leaves(outs[1])[0])


def test_padding_mask_is_an_input_not_a_constant(packs, fresh_outputs):
    """BERT was built with padding in row 1 only; the pack must honour another pattern (row 0 padded), and
    must not have specialised on the mask values (a mask of all ones at build time could be dropped)."""
    pytest.importorskip("transformers")
    result = packs["bert"]
    if result.error is not None:
        raise result.error
    case = result.case
    pkg = aotpack.load(result.path)
    all_ones = dict(case.fresh_kwargs, attention_mask=torch.ones(BATCH, SEQ, dtype=torch.long))
    with torch.no_grad():
        a = pkg(*case.fresh_args, **case.fresh_kwargs)
        b = pkg(*case.fresh_args, **all_ones)
        assert_close_to_eager(b, case.model(*case.fresh_args, **all_ones))
    assert (a[0][0] - b[0][0]).abs().max() > 1e-3  # row 0 was padded in one call and not in the other


def test_static_sequence_length_is_guarded(packs):
    """Dynamic sequence length is not supported yet: another length is refused before any native code runs."""
    pytest.importorskip("transformers")
    result = packs["gpt2"]
    if result.error is not None:
        raise result.error
    pkg = aotpack.load(result.path)
    with pytest.raises(aotpack.GuardError, match=r"input 'input_ids' \(args\[0\]\) size mismatch at dim 1: "
                                                 r"expected 16, actual 8"):
        pkg(_ids(1, seq=8), **dict(result.case.kwargs, attention_mask=_mask([8, 8], seq=8)))
    with pytest.raises(aotpack.GuardError, match=r"return_dict"):
        pkg(*result.case.args, **dict(result.case.kwargs, return_dict=True))


# --- What does not work, and how it fails -----------------------------------------------------------

def _transformers_file(module: str) -> str:
    import importlib

    return os.path.realpath(importlib.import_module(module).__file__)


def test_model_output_dataclass_is_refused_with_hint(session_dir):
    """Hugging Face returns ModelOutput objects by default; packs support tuples, lists and dicts."""
    pytest.importorskip("transformers")
    case = make_bert()
    kwargs = {k: v for k, v in case.kwargs.items() if k != "return_dict"}
    with pytest.raises(aotpack.CaptureError) as info:
        aotpack.build(case.model, case.args, session_dir / "never-bert.pack", example_kwargs=kwargs)
    assert "the model's output holds a BaseModelOutputWithPoolingAndCrossAttentions" in str(info.value)
    assert "return_dict=False" in info.value.hint and "to_tuple()" in info.value.hint
    assert not (session_dir / "never-bert.pack").exists()


def test_kv_cache_output_is_refused(session_dir):
    """A causal LM returns its KV cache (a DynamicCache object) unless called with use_cache=False."""
    pytest.importorskip("transformers")
    case = make_gpt2()
    kwargs = {k: v for k, v in case.kwargs.items() if k != "use_cache"}
    with pytest.raises(aotpack.CaptureError) as info:
        aotpack.build(case.model, case.args, session_dir / "never-gpt2.pack", example_kwargs=kwargs)
    assert "the model's output" in info.value.reason and "DynamicCache" in info.value.reason
    assert "use_cache=False" in info.value.hint


def _assert_points_into(e: aotpack.CaptureError, module: str, line_text: str) -> None:
    expected_file = _transformers_file(module)
    assert e.filename is not None and os.path.realpath(e.filename) == expected_file, e.filename
    assert e.lineno is not None
    assert line_text in linecache.getline(e.filename, e.lineno)
    assert str(e).startswith(f"{e.filename}:{e.lineno}: ")


def test_longformer_global_attention_branch_is_a_capture_error(session_dir):
    """Longformer decides in Python whether any token has global attention (`.any().item()`), then branches
    on it: a data-dependent branch, refused at the library's line."""
    pytest.importorskip("transformers")
    from transformers import LongformerConfig, LongformerModel

    torch.manual_seed(0)
    model = LongformerModel(LongformerConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=128, vocab_size=VOCAB, attention_window=8,
                                             max_position_embeddings=64)).eval()
    with pytest.raises(aotpack.CaptureError) as info:
        aotpack.build(model, (_ids(1),), session_dir / "never-longformer.pack",
                      example_kwargs={"attention_mask": _mask([SEQ, 12]), "return_dict": False})
    e = info.value
    _assert_points_into(e, "transformers.models.longformer.modeling_longformer", "if is_global_attn")
    assert "data-dependent expression" in e.reason
    assert "torch.cond" in e.hint


def test_reformer_numpy_chunk_length_is_a_capture_error(session_dir):
    """Reformer computes its chunk length with NumPy (np.lcm); Dynamo traces NumPy values as tensors, so the
    padding check on it is a data-dependent branch, refused at the library's line."""
    pytest.importorskip("transformers")
    from transformers import ReformerConfig, ReformerModelWithLMHead

    torch.manual_seed(0)
    model = ReformerModelWithLMHead(ReformerConfig(
        hidden_size=64, attention_head_size=32, num_attention_heads=2, feed_forward_size=128, vocab_size=VOCAB,
        axial_pos_shape=(4, 4), axial_pos_embds_dim=(32, 32), is_decoder=True, attn_layers=["local", "lsh"],
        local_attn_chunk_length=8, lsh_attn_chunk_length=8, num_buckets=2)).eval()
    with pytest.raises(aotpack.CaptureError) as info:
        aotpack.build(model, (_ids(1),), session_dir / "never-reformer.pack",
                      example_kwargs={"return_dict": False, "use_cache": False})
    e = info.value
    _assert_points_into(e, "transformers.models.reformer.modeling_reformer", "least_common_mult_chunk_length")
    assert "Data-dependent branching" in e.reason


def test_mixtral_eager_experts_loop_is_a_capture_error(session_dir):
    """experts_implementation="eager" loops in Python over the experts some token was routed to: the loop's
    length depends on the data."""
    pytest.importorskip("transformers")
    with pytest.raises(aotpack.CaptureError) as info:
        aotpack.build(_mixtral("eager", layers=1), (_ids(1),), session_dir / "never-mixtral.pack",
                      example_kwargs={"return_dict": False, "use_cache": False})
    e = info.value
    _assert_points_into(e, "transformers.models.mixtral.modeling_mixtral", "for expert_idx in expert_hit")
    assert "data-dependent expression" in e.reason


def test_mixtral_default_experts_custom_operator_is_refused_at_capture():
    """A custom operator (torch.library; here transformers.grouped_mm_fallback) would compile to a
    proxy-executor call that a pack cannot run: refused at capture, at the library's line."""
    pytest.importorskip("transformers")
    from aotpack.capture import capture

    with pytest.raises(aotpack.CaptureError) as info:
        capture(_mixtral(None, layers=1), (_ids(1),), {"return_dict": False, "use_cache": False})
    _assert_points_into(info.value, "transformers.integrations.moe", "grouped_mm_fallback")
    assert "custom operator transformers.grouped_mm_fallback" in info.value.reason
    assert "batched_mm" in info.value.hint


class _TwoInputs(torch.nn.Module):
    """The usual serving wrapper: explicit (input_ids, attention_mask), first output only."""

    def __init__(self, model: torch.nn.Module, extra: dict):
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask=attention_mask, **self.extra)[0]


@pytest.mark.parametrize("make", ["make_bert", "make_gpt2"])
def test_dynamic_sequence_length(make, session_dir):
    """One pack serves every sequence length in 2..32 (both ends tested) and refuses 33."""
    pytest.importorskip("transformers")
    from torch.export import Dim

    case = globals()[make]()
    wrapper = _TwoInputs(case.model, {k: v for k, v in case.kwargs.items() if k != "attention_mask"}).eval()
    seq = Dim("seq", min=2, max=32)
    path = aotpack.build(wrapper, (case.args[0], case.kwargs["attention_mask"]), session_dir / f"{make}-dyn.pack",
                         dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    pkg = aotpack.load(path)
    for t in (2, 5, 17, 32):
        ids, mask = _ids(3, t), _mask([t, max(1, t - 2)], t)
        with torch.no_grad():
            torch.testing.assert_close(pkg(ids, mask), wrapper(ids, mask), rtol=1e-4, atol=1e-4)
    with pytest.raises(aotpack.GuardError, match=r"dim 1 \(seq\) is 33, above 32"):
        pkg(_ids(3, 33), _mask([33, 33], 33))
    with pytest.raises(aotpack.GuardError) as info:
        pkg(_ids(3, 10), _mask([9, 9], 9))
    assert_facts(str(info.value), "dim 1 (seq) is 9", "seq is 10 in input 'input_ids'", "must be equal")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_new_weights_give_eager_outputs(packs, name, tmp_path):
    """The built pack takes other weights for the same config (no rebuild) and then gives eager's outputs with
    them: GPT-2 from a sharded checkpoint folder that transformers wrote (its tied lm_head left out, Conv1D
    weights), the Llama wrapper from a state_dict."""
    pytest.importorskip("transformers")
    result = packs[name]
    if result.error is not None:
        raise result.error
    case = CASES[name]()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in case.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pkg = aotpack.load(result.path)
    if name == "gpt2":
        case.model.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
        pkg.load_weights(tmp_path)
    else:
        pkg.load_weights(case.model.state_dict())
    with torch.no_grad():
        for args, kwargs in ((case.args, case.kwargs), (case.fresh_args, case.fresh_kwargs)):
            torch.testing.assert_close(pkg(*args, **kwargs), case.model(*args, **kwargs), rtol=1e-4, atol=1e-4)
