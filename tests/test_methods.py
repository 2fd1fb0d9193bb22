"""Packs of several methods: one model's functions in one pack, sharing its weights (stored once) and its
state (one copy per session for all methods), each method dispatching by its own guards.

Shown on real small models, each built once per session: an encoder-decoder whose ``encode`` writes the
cross-attention cache that ``decode`` reads; a tiny Llama with ``prefill`` and ``decode`` sharing the KV
cache; two encoders sharing a projection; Hugging Face T5 and Whisper through transformers' export wrappers,
Whisper with its cross-attention cache in the state, and CLIP's two towers.
"""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

import aotpack
import programs
from aotpack_runtime import format as fmt
from aotpack_runtime import schema
from aotpack_runtime.archive import Archive
from aotpack_runtime.errors import ArchiveError, BuildError, GuardError, MethodError, SessionError
from archive_tools import join, split
from conftest import EXAMPLES
from helpers import assert_facts

sys.path.insert(0, str(EXAMPLES / "llm"))
from decoders import wrapped  # noqa: E402


def test_encode_then_decode_gives_eager_tokens(seq2seq_pack):
    """``encode`` fills the cross-attention cache once; ``decode`` reads it token after token, in one session."""
    s = aotpack.load(seq2seq_pack.path).session()
    src = torch.tensor([[1, 5, 7, 2, 9, 4]])
    eager = copy.deepcopy(programs.TinySeq2Seq().eval())
    with torch.no_grad():
        want = programs.greedy_seq2seq(eager.encode, eager.decode, src, programs.MAX_LEN)
    assert programs.greedy_seq2seq(s.encode, s.decode, src, programs.MAX_LEN) == want
    state = s.state_dict()
    for name in ("cross_k_cache", "cross_v_cache", "self_k_cache", "self_v_cache"):
        torch.testing.assert_close(state[name], getattr(eager, name), rtol=1e-5, atol=1e-5)
    # decode alone in a fresh session reads the initial (zero) cross-attention cache, not the first session's
    s2 = aotpack.load(seq2seq_pack.path).session()
    fresh = copy.deepcopy(programs.TinySeq2Seq().eval())
    with torch.no_grad():
        torch.testing.assert_close(s2.decode(torch.tensor([[2]]), torch.tensor([0])),
                                   fresh.decode(torch.tensor([[2]]), torch.tensor([0])), rtol=1e-5, atol=1e-5)


def test_the_manifest_records_methods_shared_weights_and_state(seq2seq_pack):
    m = Archive.open(seq2seq_pack.path).manifest
    assert m.format_version == fmt.V5_FORMAT_VERSION == 5 and m.example is None and m.positions == ()
    assert [(r.name, r.entries, r.writes) for r in m.methods] == [
        ("encode", (0,), ("cross_k_cache", "cross_v_cache")), ("decode", (1,), ("self_k_cache", "self_v_cache"))]
    assert m.methods[1].positions == (schema.PositionRule("pos", programs.MAX_LEN, 1),)
    # every parameter once, though both methods read the embedding; the caches are state, not weights
    params = dict(programs.TinySeq2Seq().named_parameters())
    assert sorted(w.name for w in m.weights) == sorted(params)
    assert len({w.blob for w in m.weights}) == len(params)
    assert sorted(r.name for r in m.state) == ["cross_k_cache", "cross_v_cache", "self_k_cache", "self_v_cache"]
    read = [set(e.constants.values()) for e in m.entries]
    assert "embed.weight" in read[0] and "embed.weight" in read[1]
    assert {"cross_k_cache", "cross_v_cache"} <= read[1]  # decode reads what encode wrote


def test_methods_are_attributes_and_an_unknown_one_lists_those_that_exist(seq2seq_pack):
    pkg = aotpack.load(seq2seq_pack.path)
    assert list(pkg.methods) == ["encode", "decode"]
    assert [e.index for e in pkg.methods["decode"].entries] == [1]
    assert hasattr(pkg, "encode") and not hasattr(pkg, "translate")
    s = pkg.session()
    for call in (lambda: pkg.translate, lambda: s.translate, lambda: pkg(torch.zeros(1, 6, dtype=torch.long))):
        with pytest.raises(MethodError) as e:
            call()
        assert isinstance(e.value, AttributeError) and e.value.methods == ["encode", "decode"]
        assert "encode, decode" in str(e.value)
    with pytest.raises(SessionError, match=r"s\.encode\(\.\.\.\)"):
        pkg.encode(torch.zeros(1, 6, dtype=torch.long))
    args, kwargs = pkg.example_inputs("decode")
    assert [a.tolist() for a in args] == [[[3]], [0]] and kwargs == {}


def test_each_method_has_its_own_guards_and_positions(seq2seq_pack):
    s = aotpack.load(seq2seq_pack.path).session()
    with pytest.raises(GuardError, match=r"src"):
        s.encode(torch.zeros(1, 5, dtype=torch.long))  # encode is built for 6 source tokens
    with pytest.raises(GuardError, match=r"'pos'.*past the end of the cache \(8 positions"):
        s.decode(torch.tensor([[1]]), torch.tensor([programs.MAX_LEN]))


def test_a_pack_of_two_encoders_stores_the_shared_projection_once(two_tower_pack):
    pkg = aotpack.load(two_tower_pack.path)
    model = programs.TwoTower().eval()
    m = pkg.manifest
    assert [w.name for w in m.weights].count("projection.weight") == 1
    assert len({w.blob for w in m.weights}) == len(list(model.parameters())) == len(m.weights)
    assert not pkg.stateful and list(pkg.methods) == ["encode_text", "encode_image"]
    ids, patches = torch.tensor([[4, 8, 15, 16, 23, 30, 2]]), torch.randn(2, 4, 12)
    with torch.no_grad():
        torch.testing.assert_close(pkg.encode_text(ids), model.encode_text(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pkg.encode_image(patches), model.encode_image(patches), rtol=1e-5, atol=1e-5)


def test_prefill_and_decode_share_the_kv_cache_and_give_eager_tokens(llama_methods_pack):
    """A prompt through ``prefill``, then one token per call through ``decode``, against eager generation
    through the same wrapper."""
    pkg = aotpack.load(llama_methods_pack.path)
    m = pkg.manifest
    assert [r.name for r in m.methods] == ["prefill", "decode"]
    decode = pkg.methods["decode"].entries
    assert len(decode) == 1 and decode[0].guards.label().count("[1, 1]") == 1
    assert all(r.positions and r.positions[0].input == "cache_position" for r in m.methods)
    prompt, steps = [5, 17, 42, 8], 12
    s = pkg.session()
    _, eager = wrapped("llama")
    with torch.inference_mode():
        logits = s.prefill(input_ids=torch.tensor([prompt]), cache_position=torch.tensor([0]))
        want = eager(input_ids=torch.tensor([prompt]), cache_position=torch.tensor([0]))
        got_tokens, want_tokens = [int(logits[0, -1].argmax())], [int(want[0, -1].argmax())]
        for i in range(steps):
            pos = torch.tensor([len(prompt) + i])
            got = s.decode(input_ids=torch.tensor([[got_tokens[-1]]]), cache_position=pos)
            want = eager(input_ids=torch.tensor([[want_tokens[-1]]]), cache_position=pos)
            got_tokens.append(int(got[0, -1].argmax()))
            want_tokens.append(int(want[0, -1].argmax()))
    assert got_tokens == want_tokens
    with pytest.raises(GuardError):
        s.decode(input_ids=torch.tensor([[1, 2]]), cache_position=torch.tensor([20]))  # decode is one token


def test_inspect_shows_methods_weights_and_state(seq2seq_pack, two_tower_pack):
    from click.testing import CliRunner

    from cli.main import cli

    text = CliRunner().invoke(cli, ["inspect", str(seq2seq_pack.path)]).output
    assert "methods:  2 (encode, decode;" in text and "entry 1 [cpu] of decode" in text
    assert ("method decode: entries 1; reads 9 weights (1 shared: embed.weight); reads state cross_k_cache, "
            "cross_v_cache; writes state self_k_cache, self_v_cache") in text
    assert "method encode: entries 0; reads 7 weights (1 shared: embed.weight); writes state cross_k_cache" in text
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(two_tower_pack.path), "--json"]).output)
    image = info["methods"][1]
    assert image["name"] == "encode_image" and image["shared_weights"] == ["projection.weight"]
    result = CliRunner().invoke(cli, ["run", str(seq2seq_pack.path), "--method", "encode", "--repeat", "2"])
    assert result.exit_code == 0, result.output
    assert "method encode" in result.output
    result = CliRunner().invoke(cli, ["run", str(two_tower_pack.path), "--method", "nope"])
    assert result.exit_code != 0 and "encode_text, encode_image" in result.output


def test_a_manifest_with_bad_methods_is_refused(two_tower_pack, tmp_path):
    """Each field of ``methods`` is checked by the reader: what, where, expected, actual."""
    version, manifest, rest = split(two_tower_pack.path.read_bytes())
    cases = [
        (lambda m: m["methods"][0].update(name="1st"), r"manifest.methods\[0\].name is '1st'; expected a Python"),
        (lambda m: m["methods"][1].update(entries=[0]), r"methods\[1\] \('encode_image'\) lists entry 0, which method "
                                                        r"'encode_text' also lists"),
        (lambda m: m["methods"][1].update(entries=[7]), r"methods\[1\].entries\[0\] is 7; expected an index into "
                                                        r"manifest.entries \(0..1\)"),
        (lambda m: m["methods"][1].update(entries=[]), r"methods\[1\].entries is empty"),
        (lambda m: m["methods"].pop(), r"manifest.entries \[1\] belong to no method"),
        (lambda m: m["methods"][1].update(name="encode_text"), r"'encode_text' is also the name of an earlier"),
        (lambda m: m["methods"][0].update(writes=["kv"]), r"methods\[0\].writes names 'kv', which is not a state"),
        (lambda m: m["methods"][0].update(positions=[{"input": "ids", "limit": 4, "span": 1}]),
         r"methods\[0\].positions is not empty in a pack without state"),
        (lambda m: m.update(format_version=4), r"manifest.methods is several methods, which format version 5 "
                                               r"introduced, but the manifest says format version 4"),
        (lambda m: m.update(example=m["methods"][0]["example"]), r"manifest.example is present in a pack with methods"),
        (lambda m: m.update(methods=[]), r"manifest.methods is empty"),
    ]
    for i, (change, message) in enumerate(cases):
        bad = copy.deepcopy(manifest)
        change(bad)
        path = tmp_path / f"bad{i}.pack"
        path.write_bytes(join(bad["format_version"], fmt.canonical_json(bad), rest))
        with pytest.raises(ArchiveError, match=message):
            aotpack.load(path)


def test_forward_alone_through_methods_is_todays_pack(mlp_pack, tmp_path):
    """``methods={"forward": ...}`` builds the very pack that the plain arguments build: same bytes, no
    ``methods`` field, its older format version."""
    from aotpack.modelfile import load_model_file

    spec = load_model_file(str(EXAMPLES / "mlp.py"))
    plain, through = mlp_pack.path, tmp_path / "through.pack"
    aotpack.build(spec.model, None, through, cache=False, methods={"forward": aotpack.Method(
        example_inputs=spec.example_inputs, example_kwargs=spec.example_kwargs, dynamic_shapes=spec.dynamic_shapes)})
    assert plain.read_bytes() == through.read_bytes()
    m = Archive.open(plain).manifest
    assert "methods" not in m.raw and m.format_version < 5
    assert [r.name for r in m.method_table()] == ["forward"]


@pytest.mark.parametrize("methods, message", [
    ({}, r"non-empty dict"),
    ({"session": aotpack.Method("encode_text", (torch.zeros(1, 3, dtype=torch.long),))},
     r"'session' is an attribute of a loaded package or session"),
    ({"encode": aotpack.Method(example_inputs=(torch.zeros(1, 3, dtype=torch.long),))},
     r"has no method 'encode'; give fn="),
    ({"encode_text": {"fn": None, "inputs": ()}}, r"unknown keys \['inputs'\]"),
    ({"encode_text": aotpack.Method(example_inputs=[1])}, r"example_inputs must be a tuple"),
])
def test_bad_methods_are_build_errors(methods, message, tmp_path):
    with pytest.raises(BuildError, match=message):
        aotpack.build(programs.TwoTower(), None, tmp_path / "x.pack", methods=methods, cache=False)


def test_a_model_file_defines_methods(tmp_path):
    """The model file convention: module-level ``model`` and ``methods``; ``example_inputs`` then belongs to
    each method, and giving both is an error."""
    from aotpack.modelfile import load_model_file
    from aotpack_runtime.errors import ModelFileError

    spec = load_model_file(str(EXAMPLES / "llm" / "llama_methods.py"))
    assert list(spec.methods) == ["prefill", "decode"] and spec.example_inputs is None
    both = tmp_path / "both.py"
    both.write_text("import torch, aotpack\nmodel = torch.nn.Linear(2, 2)\nexample_inputs = (torch.ones(2),)\n"
                    "methods = {'forward': aotpack.Method(example_inputs=(torch.ones(2),))}\n")
    with pytest.raises(ModelFileError, match=r"defines methods and also example_inputs"):
        load_model_file(str(both))
    empty = tmp_path / "empty.py"
    empty.write_text("import torch\nmodel = torch.nn.Linear(2, 2)\nmethods = {}\n")
    with pytest.raises(ModelFileError, match=r"methods in .* must be a non-empty dict"):
        load_model_file(str(empty))


def _asgi(app, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One request to the ASGI ``app`` in this process (no server, no socket)."""
    import asyncio

    raw = json.dumps(body).encode() if body is not None else b""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-length", str(len(raw)).encode())], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_the_serving_example_serves_a_method_by_name(seq2seq_pack, two_tower_pack, monkeypatch):
    """``POST /predict/{method}``, and in a session ``POST /sessions/{id}/predict/{method}``: encode, then
    decode token by token over HTTP gives eager's tokens; an unknown method is a 404 naming those there are."""
    pytest.importorskip("fastapi", reason="the serving example needs its extra: pip install -e '.[serve]'")
    monkeypatch.syspath_prepend(str(EXAMPLES / "serve"))
    import app as serve

    towers = serve.build_app(aotpack.load(two_tower_pack.path))
    ids = [[4, 8, 15, 16, 23]]
    status, body = _asgi(towers, "POST", "/predict/encode_text", {"args": [ids]})
    with torch.no_grad():
        want = programs.TwoTower().eval().encode_text(torch.tensor(ids))
    assert status == 200 and torch.allclose(torch.tensor(body["outputs"]), want, atol=1e-5)
    status, body = _asgi(towers, "POST", "/predict/nope", {"args": [ids]})
    assert status == 404 and "no method 'nope'; its methods: encode_text, encode_image" in body["error"]
    assert _asgi(towers, "POST", "/predict", {"args": [ids]})[0] == 404  # no forward in this pack
    status, health = _asgi(towers, "GET", "/health")
    assert sorted(health["methods"]) == ["encode_image", "encode_text"]

    seq = serve.build_app(aotpack.load(seq2seq_pack.path))
    status, opened = _asgi(seq, "POST", "/sessions")
    sid = opened["session"]
    src = [[1, 5, 7, 2, 9, 4]]

    def encode(x):
        status, body = _asgi(seq, "POST", f"/sessions/{sid}/predict/encode", {"args": [x.tolist()]})
        assert status == 200, body

    def decode(token, pos):
        status, body = _asgi(seq, "POST", f"/sessions/{sid}/predict/decode", {"args": [token.tolist(), pos.tolist()]})
        assert status == 200, body
        return torch.tensor(body["outputs"])

    eager = programs.TinySeq2Seq().eval()
    with torch.no_grad():
        want_tokens = programs.greedy_seq2seq(eager.encode, eager.decode, torch.tensor(src), 5)
    assert programs.greedy_seq2seq(encode, decode, torch.tensor(src), 5) == want_tokens
    status, body = _asgi(seq, "POST", "/predict/encode", {"args": [src]})
    assert status == 409 and "/sessions/{id}/predict/encode" in body["error"]


def test_t5_through_transformers_export_wrappers_gives_eager_tokens(t5_pack):
    """T5's encoder and its static-cache decoder wrapper as two methods of one pack: greedy tokens and every
    step's logits equal eager's; the embedding that encoder, decoder and LM head share is one weight, which
    both methods read; ``encode`` touches no state: it runs in the session and on the package alike."""
    pkg = aotpack.load(t5_pack.path)
    names = [w.name for w in pkg.manifest.weights]
    assert len(names) == len({w.blob for w in pkg.manifest.weights}) and \
        sum("embed_tokens" in n or "shared" in n or "lm_head" in n for n in names) == 1
    encode, decode = pkg.manifest.methods
    assert encode.writes == () and len(decode.writes) == 6
    s = pkg.session()
    eager = programs.t5_program()
    with torch.no_grad():
        got_tokens, got = programs.greedy_t5(s.encode, s.decode, 10)
        want_tokens, want = programs.greedy_t5(eager.encode, eager.decode, 10)
    assert got_tokens == want_tokens
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # ``encode`` reads and writes no state: the package runs it without a session; ``decode`` needs one
    ids = pkg.example_inputs("encode")[0][0]
    with torch.no_grad():
        torch.testing.assert_close(pkg.encode(ids), s.encode(ids), rtol=0, atol=0)
        with pytest.raises(SessionError) as info:
            pkg.decode(*pkg.example_inputs("decode")[0])
    assert_facts(str(info.value), "state", "s = pkg.session(); s.decode(...)")


def test_a_pack_of_methods_is_reproducible_and_found_in_the_build_cache(two_tower_pack, tmp_path):
    """Built again without the cache, in another folder: the same bytes. Built again with the cache (which the
    fixture's build filled): a hit by the graph key, the same bytes."""
    from aotpack.buildcache import BuildCache
    from aotpack.pipeline import build as pipeline_build

    model = programs.TwoTower().eval()
    again = tmp_path / "again.pack"
    aotpack.build(model, None, again, methods=programs.two_tower_methods(model), cache=False)
    assert again.read_bytes() == two_tower_pack.path.read_bytes()
    cached = tmp_path / "cached.pack"
    report = pipeline_build(model, None, cached, methods=programs.two_tower_methods(model), cache=BuildCache.open(True))
    assert report.hit == "graph" and cached.read_bytes() == two_tower_pack.path.read_bytes()


def test_verify_compares_each_method_and_build_refuses_dynamic_with_methods(two_tower_pack, tmp_path):
    """``aotpack verify --against`` a model file with ``methods`` runs every method against eager;
    ``aotpack build --dynamic`` on such a file is refused before anything is built (each method gives its own shapes)."""
    from click.testing import CliRunner

    from cli.main import cli

    model_file = tmp_path / "towers.py"
    model_file.write_text("import programs\nmodel = programs.TwoTower().eval()\n"
                          "methods = programs.two_tower_methods(model)\n")
    result = CliRunner().invoke(cli, ["verify", str(two_tower_pack.path), "--against", str(model_file)])
    assert result.exit_code == 0, result.output
    assert "cpu, encode_text: max relative error" in result.output and "cpu, encode_image" in result.output
    result = CliRunner().invoke(cli, ["build", str(model_file), "-o", str(tmp_path / "x.pack"), "--dynamic",
                                      "ids:1=2..8"])
    assert result.exit_code == 1 and "--dynamic does not apply to" in result.output


def test_whisper_through_the_decoder_wrapper_gives_eager_tokens(whisper_pack):
    """Whisper's encoder on log-mel features and transformers' static-cache decoder wrapper as two methods:
    12 greedy tokens (not all the same) and every step's logits equal eager's, and eager's equal the
    model's own forward over the whole sequence without a cache."""
    pkg = aotpack.load(whisper_pack.path)
    encode, decode = pkg.manifest.methods
    assert encode.writes == () and len(decode.writes) == 6  # keys, values, length of 2 layers
    s = pkg.session()
    eager = programs.whisper_program()
    with torch.no_grad():
        got_tokens, got = programs.greedy_whisper(s.encode, s.decode, 12)
        want_tokens, want = programs.greedy_whisper(eager.encode, eager.decode, 12)
        full = programs.whisper_model()(input_features=programs.WHISPER_FEATURES,
                                        decoder_input_ids=torch.tensor([[1] + want_tokens[:-1]]),
                                        use_cache=False).logits
    assert got_tokens == want_tokens and len(set(want_tokens)) >= 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([w[0] for w in want]), full[0], rtol=1e-4, atol=1e-5)
    # another input in a new session: eager's tokens from a new program (the wrapper keeps, in Python, the
    # cross-attention keys and values of its first call and reuses them for any later input; the pack's
    # decode projects the encoder output it is given at every call)
    other = torch.randn(1, 8, programs.WHISPER_FRAMES, generator=torch.Generator().manual_seed(7))
    s2, fresh = pkg.session(), programs.whisper_program()
    with torch.no_grad():
        other_tokens = programs.greedy_whisper(s2.encode, s2.decode, 8, other)[0]
        assert other_tokens == programs.greedy_whisper(fresh.encode, fresh.decode, 8, other)[0] != want_tokens[:8]


def test_whisper_whose_encode_writes_the_cross_attention_cache(whisper_cross_pack):
    """``encode`` writes each decoder layer's cross-attention keys and values into the state once; ``decode``
    takes no encoder output and reads them: tokens and logits equal eager's (and the wrapper program's); the
    weights keep the Hugging Face model's names, the head tied to the embedding is one blob."""
    pkg = aotpack.load(whisper_cross_pack.path)
    m = pkg.manifest
    encode, decode = m.methods
    assert sorted(encode.writes) == ["cross_key_0", "cross_key_1", "cross_value_0", "cross_value_1"]
    assert not set(encode.writes) & set(decode.writes) and len(decode.writes) == 6
    read = set(m.entries[decode.entries[0]].constants.values())
    assert {"cross_key_0", "cross_value_1"} <= read
    assert not any("encoder_attn.k_proj" in n or "encoder_attn.v_proj" in n for n in read)  # not projected per token
    hf = programs.whisper_model()
    names = {w.name for w in m.weights}
    assert names <= set(hf.state_dict()) and "model.decoder.layers.0.encoder_attn.k_proj.weight" in names
    assert len({w.blob for w in m.weights}) == len(m.weights) - ("proj_out.weight" in names)
    s = pkg.session()
    eager = programs.WhisperCrossCached(hf).eval()
    with torch.no_grad():
        got_tokens, got = programs.greedy_whisper(s.encode, s.decode, 12, cross_cached=True)
        want_tokens, want = programs.greedy_whisper(eager.encode, eager.decode, 12, cross_cached=True)
        wrapper = programs.whisper_program()
        wrapper_tokens, _ = programs.greedy_whisper(wrapper.encode, wrapper.decode, 12)
    assert got_tokens == want_tokens == wrapper_tokens and len(set(got_tokens)) >= 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_clip_encodes_text_and_image_from_one_pack(clip_pack):
    """Hugging Face ``CLIPModel``'s two towers as two methods: embeddings equal eager's (text at the example
    length and at another within its dynamic range); every weight is stored once under ``CLIPModel``'s own
    name (its non-persistent ``position_ids`` too); the towers read disjoint weights (CLIP shares none between them: each has its own projection),
    whose union is the pack's weights, and ``logit_scale``, which neither reads, is recorded as unread."""
    pkg = aotpack.load(clip_pack.path)
    model = clip_pack.model
    assert list(pkg.methods) == ["encode_text", "encode_image"] and not pkg.stateful
    with torch.no_grad():
        for ids in (programs.clip_ids(7), programs.clip_ids(13, seed=5)):
            torch.testing.assert_close(pkg.encode_text(ids), programs.clip_encode_text(model, ids), rtol=1e-5,
                                       atol=1e-5)
        torch.testing.assert_close(pkg.encode_image(programs.CLIP_PIXELS),
                                   programs.clip_encode_image(model, programs.CLIP_PIXELS), rtol=1e-5, atol=1e-5)
    m = pkg.manifest
    names = [w.name for w in m.weights]
    assert len(names) == len(set(names)) == len({w.blob for w in m.weights})
    assert set(names) <= {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    text, image = (set().union(*(m.entries[i].constants.values() for i in r.entries)) for r in m.methods)
    assert "text_projection.weight" in text and "visual_projection.weight" in image
    assert not text & image and text | image == set(names)
    assert m.raw["unread_weights"] == ["logit_scale"]
