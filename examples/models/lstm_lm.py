"""A word-level LSTM language model (Zaremba, Sutskever and Vinyals, "Recurrent Neural Network
Regularization", 2014): embedding, a two-layer LSTM, a linear decoder tied to the embedding (Press and
Wolf, 2017). It takes token ids and the initial state and returns the logits and the final state, so a
caller can feed the state back for the next chunk. `aotpack build examples/models/lstm_lm.py -o lstm.pack`.
"""
import torch
from torch import nn

torch.manual_seed(0)


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 64, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, batch_first=True, dropout=0.2)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embed.weight  # weight tying

    def forward(self, tokens, h0, c0):
        out, (h, c) = self.lstm(self.embed(tokens), (h0, c0))
        return self.decoder(out), (h, c)


def make(batch: int = 2, seq: int = 16):
    model = LSTMLanguageModel().eval()
    tokens = torch.randint(0, 1000, (batch, seq))
    h0 = torch.zeros(2, batch, 64)
    c0 = torch.zeros(2, batch, 64)
    return model, (tokens, h0, c0)


model, example_inputs = make()
