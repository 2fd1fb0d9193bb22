"""Packs with state: buffers the model writes in place between calls (an LLM's KV cache), served through
sessions that each hold their own copy.

The traps of state in exported and compiled code are each tested: a one-element buffer whose old value is
read must not be folded into the code (the build's check against eager catches it when the fix is off);
buffer reassignment, which export drops, is a CaptureError at the user's line; runtime constant folding
stays off.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import threading

import pytest
import torch

import aotpack
from aotpack import _torch as build_torch
from aotpack_runtime import _torch as rt_torch
from aotpack_runtime import format as fmt
from aotpack_runtime.errors import ArchiveError, BuildError, CaptureError, GuardError, SessionError
from archive_tools import join, split
from conftest import EXAMPLES, ROOT, Counter, run_python
from helpers import assert_facts

sys.path.insert(0, str(EXAMPLES / "llm"))
from decoders import greedy, wrapped  # noqa: E402


def test_a_counter_counts_from_the_initial_state(counter_pack):
    s = aotpack.load(counter_pack.path).session()
    with torch.no_grad():
        outs = [s(torch.ones(3)) for _ in range(3)]
    assert [o[0].tolist() for o in outs] == [[2.0] * 3, [4.0] * 3, [6.0] * 3]
    assert [o[1].item() for o in outs] == [3.0, 6.0, 9.0]
    assert s.state_dict()["count"].item() == 3.0


def test_a_pack_with_state_is_written_as_format_3_and_says_what_its_state_is(counter_pack):
    from aotpack_runtime.archive import Archive

    m = Archive.open(counter_pack.path).manifest
    assert m.format_version == fmt.STATE_FORMAT_VERSION == 3
    assert [(r.name, r.dtype, r.shape, r.init) for r in m.state] == [("count", "float32", (), "zeros"),
                                                                    ("history", "float32", (4,), "zeros")]
    assert not {w.name for w in m.weights} & {r.name for r in m.state}  # state is kept apart from the weights
    assert m.positions == ()


def test_calling_the_package_itself_says_to_open_a_session(counter_pack):
    pkg = aotpack.load(counter_pack.path)
    with pytest.raises(SessionError, match=re.escape("this pack carries state that its calls write (2 state buffers "
                                                     "(count, history)): open a session, which holds its own copy "
                                                     "of it: s = pkg.session(); s(...)")):
        pkg(torch.ones(3))


def test_sessions_are_independent_and_reset(counter_pack):
    pkg = aotpack.load(counter_pack.path)
    a, b = pkg.session(), pkg.session()
    with torch.no_grad():
        a(torch.ones(3))
        a(torch.ones(3))
        assert b(torch.ones(3))[0].tolist() == [2.0] * 3
        assert a(torch.ones(3))[0].tolist() == [6.0] * 3
        a.reset()
        assert a(torch.ones(3))[0].tolist() == [2.0] * 3
        assert b(torch.ones(3))[0].tolist() == [4.0] * 3


def test_state_is_saved_restored_and_forked(counter_pack):
    s = aotpack.load(counter_pack.path).session()
    with torch.no_grad():
        s(torch.ones(3))
        saved = s.state_dict()
        fork = s.fork()
        after = s(torch.full((3,), 5.0))
        s.load_state_dict(saved)
        assert torch.equal(s(torch.full((3,), 5.0))[1], after[1])
        assert torch.equal(fork(torch.full((3,), 5.0))[1], after[1])
    assert saved["count"].item() == 1.0  # a copy: later calls did not change it


@pytest.mark.parametrize("state, message", [
    ({"count": torch.zeros(())}, "a state must hold exactly the pack's state buffers ['count', 'history']; got "
                                 "['count']"),
    ({"count": torch.zeros(()), "history": torch.zeros(5)}, "state buffer 'history' must be float32[4], got "
                                                            "torch.float32[5]"),
    ({"count": torch.zeros((), dtype=torch.int64), "history": torch.zeros(4)},
     "state buffer 'count' must be float32[], got torch.int64[]"),
])
def test_a_wrong_state_is_refused(counter_pack, state, message):
    with pytest.raises(SessionError, match=re.escape(message)):
        aotpack.load(counter_pack.path).session().load_state_dict(state)


def test_a_failed_call_marks_the_session_until_reset(counter_pack, monkeypatch):
    s = aotpack.load(counter_pack.path).session()
    original = rt_torch.run

    def fail(runner, tensors):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(rt_torch, "run", fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated kernel failure"):
        s(torch.ones(3))
    monkeypatch.setattr(rt_torch, "run", original)
    with torch.no_grad(), pytest.raises(SessionError, match=re.escape(
            "an earlier call of this session failed (RuntimeError: simulated kernel failure), so its state is "
            "undefined; call reset() to start it again")):
        s(torch.ones(3))
    s.reset()
    with torch.no_grad():
        assert s(torch.ones(3))[0].tolist() == [2.0] * 3


def test_one_session_runs_one_call_at_a_time(counter_pack, monkeypatch):
    s = aotpack.load(counter_pack.path).session()
    entered, release = threading.Event(), threading.Event()
    original = rt_torch.run

    def slow(runner, tensors):
        entered.set()
        release.wait(30)
        return original(runner, tensors)

    monkeypatch.setattr(rt_torch, "run", slow)
    worker = threading.Thread(target=lambda: s(torch.ones(3)))
    with torch.no_grad():
        worker.start()
        assert entered.wait(30)
        with pytest.raises(SessionError) as info:
            s(torch.ones(3))
        assert_facts(str(info.value), "already running a call", "another thread")
        release.set()
        worker.join(30)


def test_state_is_not_shared_between_two_loads(counter_pack):
    a = aotpack.load(counter_pack.path).session()
    b = aotpack.load(counter_pack.path).session()
    with torch.no_grad():
        for _ in range(3):
            a(torch.ones(3))
        assert b(torch.ones(3))[0].tolist() == [2.0] * 3


def test_a_pack_without_state_has_no_sessions(mlp_pack):
    with pytest.raises(SessionError) as info:
        aotpack.load(mlp_pack.path).session()
    assert_facts(str(info.value), "no state", "call the package itself")


# --- the traps --------------------------------------------------------------------------------------

def test_without_the_fix_a_folded_counter_fails_the_build(tmp_path, monkeypatch):
    """Joint-graph constant folding reads the counter's build-time value into the code (it returns 1, 1, 1
    times x); the build's check against eager refuses that pack. With the fix on (every other test) it
    counts."""
    monkeypatch.setattr(build_torch, "STATEFUL_INDUCTOR_CONFIG", {"joint_graph_constant_folding": True})
    with pytest.raises(BuildError) as info:
        aotpack.build(Counter.make(), (torch.ones(3),), tmp_path / "folded.pack")
    assert_facts(str(info.value), "does not match eager", "call 2 of 3", "output leaf 0", "by 2")
    assert not list(tmp_path.iterdir())  # no pack, and no half-written file


def test_runtime_constant_folding_stays_off_for_state():
    config = build_torch.inductor_options("avx2", 16, stateful=True)
    assert config["aot_inductor.use_runtime_constant_folding"] is False
    assert config["joint_graph_constant_folding"] is False


class Reassigns(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(2))

    def forward(self, x):
        self.total = self.total + x
        return self.total * 2


def test_buffer_reassignment_is_a_capture_error_at_the_users_line():
    from aotpack.capture import capture

    with pytest.raises(CaptureError) as e:
        capture(Reassigns().eval(), (torch.ones(2),))
    err = e.value
    assert err.filename == __file__
    assert err.code.strip() == "self.total = self.total + x"
    assert "forward assigns a new tensor to the buffer 'total'; the captured graph drops such an assignment" \
        in err.reason
    assert err.hint.startswith("update the buffer in place: self.total.copy_(new_value)")


class NestedReassigns(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Reassigns()

    def forward(self, x):
        return self.inner(x) + 1


def test_buffer_reassignment_in_a_submodule_names_its_buffer():
    from aotpack.capture import capture

    with pytest.raises(CaptureError, match=r"forward assigns a new tensor to the buffer 'inner\.total'"):
        capture(NestedReassigns().eval(), (torch.ones(2),))


def test_batch_norm_in_training_mode_is_still_refused():
    from aotpack.capture import capture

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(3, 4),))
    assert_facts(str(info.value), "batch-norm statistics", "'1.num_batches_tracked'", "'1.running_mean'",
                 "'1.running_var'", "training mode")


# --- LLMs -------------------------------------------------------------------------------------------

def test_greedy_generation_matches_eager_token_for_token(llm_pack):
    """Prefill with the whole prompt, then one token per call, through a session in a fresh process
    (examples/llm/generate.py, which imports neither transformers nor the build side), against eager
    generation through the same Hugging Face wrapper."""
    arch = llm_pack.name.split("/")[1]
    proc = run_python(f"import sys; sys.argv = ['generate.py', {str(llm_pack.path)!r}, '--prompt-ids', '5,17,42,8', "
                      "'--max-new-tokens', '24']; sys.path.insert(0, 'examples/llm'); import runpy; "
                      "runpy.run_path('examples/llm/generate.py', run_name='__main__'); "
                      "assert 'transformers' not in sys.modules and 'torch._inductor' not in sys.modules")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = [int(t) for t in re.search(r"tokens: ([\d,]+)", proc.stdout).group(1).split(",")]
    _, wrapper = wrapped(arch)
    with torch.inference_mode():
        expected = greedy(lambda ids, pos: wrapper(input_ids=ids, cache_position=pos), [5, 17, 42, 8], 24)
    assert tokens == expected
    assert re.search(r"prefill of 4 tokens [\d.]+ ms, decode \d+ tokens/s", proc.stdout)


def test_two_conversations_at_once_from_threads(llama_pack):
    pkg = aotpack.load(llama_pack.path, num_models=2)
    prompts = [[5, 17, 42], [9, 8, 7, 6], [1], [300, 301]]
    got: dict[int, list] = {}

    def converse(i):
        s = pkg.session()
        with torch.inference_mode():
            got[i] = greedy(lambda ids, pos: s(input_ids=ids, cache_position=pos), prompts[i], 12)

    threads = [threading.Thread(target=converse, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, prompt in enumerate(prompts):
        _, wrapper = wrapped("llama")
        with torch.inference_mode():
            assert got[i] == greedy(lambda ids, pos: wrapper(input_ids=ids, cache_position=pos), prompt, 12), i


def test_weights_are_never_written_and_state_is_not_the_mapped_file(llama_pack):
    pkg = aotpack.load(llama_pack.path)
    s = pkg.session()
    with torch.inference_mode():
        greedy(lambda ids, pos: s(input_ids=ids, cache_position=pos), [5, 17, 42], 20)
    archive = pkg._archive
    for w in archive.manifest.weights:
        t = pkg.weights[w.name]
        data = t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
        assert hashlib.sha256(data).hexdigest() == archive.manifest.blob(w.blob).sha256, w.name
    mapped = []  # where this process maps the pack file
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(llama_pack.path)):
                lo, hi = line.split()[0].split("-")
                mapped.append((int(lo, 16), int(hi, 16)))
    weight = next(iter(pkg.weights.values()))
    assert any(lo <= weight.data_ptr() < hi for lo, hi in mapped)  # the weights are the mapped file
    for name, t in s._state.items():
        assert not any(lo <= t.data_ptr() < hi for lo, hi in mapped), name  # the state is not
    assert any(t.abs().sum() > 0 for n, t in s._state.items() if n.startswith("key_cache"))


@pytest.mark.parametrize("ids, pos, message", [
    ([[1]], [-1], "input 'cache_position' (kwargs['cache_position']) holds the cache position -1; positions start at 0"),
    ([[1, 2, 3]], [62], "input 'cache_position' (kwargs['cache_position']) starts at cache position 62 and input "
                        "'input_ids' (kwargs['input_ids']) writes 3 positions from there (up to 64), past the end of "
                        "the cache (64 positions, 0..63); start a new session, or reset() this one, for a longer "
                        "conversation"),
    ([[1]], [64], "starts at cache position 64 and input 'input_ids' (kwargs['input_ids']) writes 1 position from "
                  "there (up to 64), past the end of the cache"),
])
def test_positions_outside_the_cache_are_refused_before_native_code(llama_pack, monkeypatch, ids, pos, message):
    s = aotpack.load(llama_pack.path).session()
    monkeypatch.setattr(rt_torch, "run", lambda *a: pytest.fail("native code ran"))
    with torch.inference_mode(), pytest.raises(GuardError, match=re.escape(message)):
        s(input_ids=torch.tensor(ids), cache_position=torch.tensor(pos))


def test_the_last_position_of_the_cache_is_served(llama_pack):
    s = aotpack.load(llama_pack.path).session()
    with torch.inference_mode():
        out = s(input_ids=torch.tensor([[1, 2]]), cache_position=torch.tensor([62]))
    assert out.shape == (1, 2, 1000)


def test_inspect_and_run_show_the_state(llama_pack):
    from click.testing import CliRunner

    from aotpack_cli.main import cli

    text = CliRunner().invoke(cli, ["inspect", str(llama_pack.path)]).output
    assert "state:    6 buffers, 32,784 bytes per session" in text
    assert "  state  key_cache_0: float32[1, 2, 64, 16], starts as zeros" in text
    assert "  cache positions in 'cache_position': each in 0..63, and the first + dim 1 of 'input_ids' <= 64" in text
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(llama_pack.path), "--json"]).output)
    assert info["state"]["positions"] == [{"input": "cache_position", "limit": 64,
                                           "span": {"dim": 1, "input": "input_ids"}}]
    result = CliRunner().invoke(cli, ["run", str(llama_pack.path), "--repeat", "3"])
    assert result.exit_code == 0, result.output
    assert "session: <aotpack.Session of" in result.output and "output: tensor float32[1, 3, 1000]" in result.output


# --- the format -------------------------------------------------------------------------------------

def _manifest_with(counter_pack, tmp_path, edit, version=None):
    """The pack with ``edit(manifest)`` applied (and the format version set, in both places)."""
    header_version, manifest, region = split(counter_pack.path.read_bytes())
    edit(manifest)
    if version is not None:
        manifest["format_version"] = header_version = version
    out = tmp_path / "edited.pack"
    out.write_bytes(join(header_version, fmt.canonical_json(manifest), region))
    return out


@pytest.mark.parametrize("edit, version, reason", [
    (lambda m: m, 2, "manifest.state is state, which format version 3 introduced, but the manifest says format "
                     "version 2; the pack was written by a broken or modified writer"),
    (lambda m: m["state"]["buffers"].append(dict(m["state"]["buffers"][0])), None,
     "manifest.state names 'count', which is also a weight or another state buffer; names must be unique"),
    (lambda m: m["state"]["buffers"][0].update(init="example/0"), None,
     "state 'count' is float32[] (4 bytes) but its initial value 'example/0' holds 12 bytes"),
    (lambda m: m["state"]["positions"].append({"input": "nope", "limit": 4, "span": 1}), None,
     "manifest.state.positions[0] names the input 'nope', which entry 0 does not take as a tensor"),
    (lambda m: m["state"].update(buffers=[]), None,
     "manifest.state lists no buffers; a pack without state has no state field"),
])
def test_a_damaged_state_record_is_refused(counter_pack, tmp_path, edit, version, reason):
    out = _manifest_with(counter_pack, tmp_path, edit, version)
    with pytest.raises(ArchiveError) as e:
        aotpack.load(out)
    assert e.value.reason == reason


def test_older_readers_are_told_to_upgrade(counter_pack, tmp_path, monkeypatch):
    from aotpack_runtime.archive import Archive

    monkeypatch.setattr(fmt, "FORMAT_VERSION", 2)
    with pytest.raises(ArchiveError, match=re.escape("unsupported format version 3 (this reader: 1..2); upgrade "
                                                     "aotpack to load it")):
        Archive.open(counter_pack.path)


def test_position_rules_are_checked_at_build():
    from aotpack.state import position_rules
    from aotpack_runtime.schema import PositionRule

    kwargs = {"input_ids": torch.tensor([[1, 2]]), "cache_position": torch.tensor([0])}
    with pytest.raises(BuildError, match=re.escape("cache_positions[0] names the input 'pos', which the model is "
                                                   "not called with (its inputs: cache_position, input_ids)")):
        position_rules(None, {"input": "pos", "limit": 8}, kwargs, (), ())
    with pytest.raises(BuildError, match=re.escape("cache_positions[0]: the input 'input_ids' must be a 1-D integer "
                                                   "tensor of cache positions, got torch.int64[1, 2]")):
        position_rules(None, {"input": "input_ids", "limit": 8}, kwargs, (), ())
    with pytest.raises(BuildError, match=re.escape("cache_positions[0]: span must be an integer or [INPUT, DIM]")):
        position_rules(None, {"input": "cache_position", "limit": 8, "span": ["input_ids", 2]}, kwargs, (), ())
    assert position_rules(None, {"input": "cache_position", "limit": 8, "span": ["input_ids", 1]}, kwargs, (), ()) \
        == [PositionRule("cache_position", 8, ("input_ids", 1))]


def test_the_llm_examples_are_documented():
    readme = (ROOT / "README.md").read_text()
    assert "aotpack build examples/llm/llama.py -o llama.pack" in readme
    assert "python examples/llm/generate.py llama.pack --prompt-ids 5,17,42 --max-new-tokens 32" in readme


def test_new_weights_for_a_decoder_with_a_kv_cache(llama_pack):
    """load_weights on a stateful pack: a session's KV cache is untouched by the swap, and a session after it
    generates eager's tokens with the new weights (another seed of the same architecture)."""
    pkg = aotpack.load(llama_pack.path)
    s = pkg.session()
    s(input_ids=torch.tensor([[5, 17, 42]]), cache_position=torch.tensor([0]))
    before = {k: v.clone() for k, v in s.state_dict().items()}
    _, other = wrapped("llama", seed=3)
    pkg.load_weights(other.state_dict())
    assert all(torch.equal(before[k], v) for k, v in s.state_dict().items())
    t = pkg.session()
    got = greedy(lambda ids, pos: t(input_ids=ids, cache_position=pos), [5, 17, 42, 8], 12)
    _, base = wrapped("llama")
    with torch.no_grad():
        assert got == greedy(lambda ids, pos: other(input_ids=ids, cache_position=pos), [5, 17, 42, 8], 12)
        assert got != greedy(lambda ids, pos: base(input_ids=ids, cache_position=pos), [5, 17, 42, 8], 12)
