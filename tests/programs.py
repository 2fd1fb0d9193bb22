"""Small models of several methods (an encoder-decoder, two encoders sharing a projection), for packs of
several methods: random weights, no downloads."""
from __future__ import annotations

import torch
from torch import nn

VOCAB = 40
SRC_LEN = 6
MAX_LEN = 8


class TinySeq2Seq(nn.Module):
    """An encoder-decoder whose ``encode`` writes the cross-attention keys and values into buffers once, and
    whose ``decode`` reads them and writes its own self-attention cache, one token per call."""

    def __init__(self, d: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, d)  # read by both methods: one weight of the pack
        self.enc = nn.Linear(d, d)
        self.cross_k, self.cross_v = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v, self.q = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, VOCAB)
        self.register_buffer("cross_k_cache", torch.zeros(1, SRC_LEN, d))
        self.register_buffer("cross_v_cache", torch.zeros(1, SRC_LEN, d))
        self.register_buffer("self_k_cache", torch.zeros(1, MAX_LEN, d))
        self.register_buffer("self_v_cache", torch.zeros(1, MAX_LEN, d))

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(self.embed(src)))
        self.cross_k_cache.copy_(self.cross_k(h))
        self.cross_v_cache.copy_(self.cross_v(h))
        return h

    def decode(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed(token)  # [1, 1, d]
        self.self_k_cache.index_copy_(1, pos, self.k(x))
        self.self_v_cache.index_copy_(1, pos, self.v(x))
        q = self.q(x)
        seen = torch.arange(MAX_LEN) <= pos  # the positions written so far
        scores = (q @ self.self_k_cache.transpose(1, 2)).masked_fill(~seen, float("-inf"))
        own = torch.softmax(scores, -1) @ self.self_v_cache
        cross = torch.softmax(q @ self.cross_k_cache.transpose(1, 2), -1) @ self.cross_v_cache
        return self.out(x + own + cross)[:, -1]


def seq2seq_methods(model: TinySeq2Seq) -> dict:
    import aotpack

    return {"encode": aotpack.Method(model.encode, (torch.arange(SRC_LEN).reshape(1, SRC_LEN) % VOCAB,)),
            "decode": aotpack.Method(model.decode, (torch.tensor([[3]]), torch.tensor([0])),
                                     cache_positions={"input": "pos", "limit": MAX_LEN, "span": 1})}


def greedy_seq2seq(encode, decode, src: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding: encode once, then one token per call."""
    encode(src)
    token, out = 1, []
    for pos in range(steps):
        logits = decode(torch.tensor([[token]]), torch.tensor([pos]))
        token = int(logits[0].argmax())
        out.append(token)
    return out


class TwoTower(nn.Module):
    """A CLIP-like pair of encoders (text tokens, image patches) with one projection both use."""

    def __init__(self, d: int = 16, out: int = 8):
        super().__init__()
        torch.manual_seed(1)
        self.text_embed = nn.Embedding(VOCAB, d)
        self.text = nn.Linear(d, d)
        self.image = nn.Linear(12, d)
        self.projection = nn.Linear(d, out, bias=False)  # shared: stored once

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.text(self.text_embed(ids))).mean(1)
        return nn.functional.normalize(self.projection(h), dim=-1)

    def encode_image(self, patches: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.image(patches)).mean(1)
        return nn.functional.normalize(self.projection(h), dim=-1)


PATCHES = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(0))


def two_tower_methods(model: TwoTower) -> dict:
    import aotpack
    from torch.export import Dim

    return {"encode_text": aotpack.Method(model.encode_text, (torch.arange(5).reshape(1, 5),),
                                          dynamic_shapes={"ids": {1: Dim("tokens", min=2, max=32)}}),
            "encode_image": aotpack.Method(model.encode_image, (PATCHES,))}


def t5_program(cache_len: int = 32):
    """A tiny ``T5ForConditionalGeneration`` (random weights) behind transformers' own seq2seq export
    wrappers, as one module of two methods: ``encode(input_ids)`` and ``decode(decoder_input_ids,
    encoder_hidden_states, cache_position)`` with a static self-attention cache (the wrappers pass the encoder
    output to every decode step). The embedding is shared by the encoder, the decoder and the LM head."""
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.integrations.executorch import (Seq2SeqLMDecoderExportableModuleWithStaticCache,
                                                      Seq2SeqLMEncoderExportableModule)

    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    t5 = T5ForConditionalGeneration(config).eval()
    t5.generation_config.use_cache = True
    t5.generation_config.cache_implementation = "static"

    class T5Program(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Seq2SeqLMEncoderExportableModule(t5.get_encoder())
            self.dec = Seq2SeqLMDecoderExportableModuleWithStaticCache(t5, cache_len, 1)

        def encode(self, input_ids):
            return self.enc(input_ids)

        def decode(self, decoder_input_ids, encoder_hidden_states, cache_position):
            return self.dec(decoder_input_ids, encoder_hidden_states, cache_position)

    return T5Program().eval()


T5_SOURCE = torch.tensor([[5, 17, 42, 8, 9, 3]])


def t5_methods(program) -> dict:
    import aotpack

    with torch.no_grad():
        hidden = program.encode(T5_SOURCE)
    return {"encode": aotpack.Method(program.encode, (T5_SOURCE,)),
            "decode": aotpack.Method(program.decode, (torch.tensor([[0]]), hidden, torch.tensor([0])),
                                     cache_positions={"input": "cache_position", "limit": 32,
                                                      "span": ["decoder_input_ids", 1]})}


def greedy_t5(encode, decode, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding of ``T5_SOURCE``: the tokens and each step's logits."""
    hidden = encode(T5_SOURCE)
    token, tokens, logits = 0, [], []
    for pos in range(steps):
        out = decode(torch.tensor([[token]]), hidden, torch.tensor([pos]))
        token = int(out[0, -1].argmax())
        tokens.append(token)
        logits.append(out)
    return tokens, logits


class SharedView(nn.Module):
    """Two methods that read one tensor under two names: ``project`` reads ``lin.weight``, ``score`` a
    non-persistent buffer that is the very same memory (a pack of methods stores it once, under two records
    of one blob); new weights for ``lin.weight`` reach both, as ``load_state_dict`` does in eager."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.lin = nn.Linear(6, 6)
        self.register_buffer("view", self.lin.weight.detach(), persistent=False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.view).sum(-1)


def shared_view_methods(model: SharedView) -> dict:
    import aotpack

    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    return {"project": aotpack.Method(model.project, (x,)), "score": aotpack.Method(model.score, (x,))}
