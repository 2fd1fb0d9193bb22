"""A small conv net (conv, batch norm, ReLU, pooling, linear): `aotpack build examples/convnet.py -o convnet.pack`."""
import torch
from torch import nn

torch.manual_seed(0)


class ConvNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


def _trained_looking(model: nn.Module) -> nn.Module:
    # Give batch norm non-trivial statistics, as a trained model would have.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


model = _trained_looking(ConvNet())
example_inputs = (torch.rand(4, 3, 32, 32) * 2 - 1,)  # rand: the same values on every CPU (README)
