"""The models of the peer comparison (``bench.py --peers``): common architectures at small sizes, float32,
random weights drawn with a fixed seed, each with one example input.

ResNet-18 and MobileNetV2 are written here in plain torch, layer for layer as torchvision defines them (no
torchvision needed); the UNet is a small 3-level one; ViT, BERT and GPT-2 are Hugging Face's classes from
small configs. Every model returns one tensor (the transformers' last hidden state), so every contender
compares the same output.
"""
from __future__ import annotations

import torch
from torch import nn

MODELS = ("resnet18", "mobilenet_v2", "unet", "vit", "bert", "gpt2")
CONV_MODELS = ("resnet18", "mobilenet_v2", "unet")
IMAGE = 64  # side of the images (ResNet-18 and MobileNetV2 at 64x64: about 0.15 and 0.03 GFLOPs)


def _seeded_batch_norms(model: nn.Module) -> None:
    """Non-trivial batch-norm statistics, so that folding them is part of what is measured."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, c_in = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(BasicBlock(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        h = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = [] if expand == 1 else [_conv_bn(c_in, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, c_out, 1, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride) of each stage, as in the paper and torchvision
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, c_in = [_conv_bn(3, 32, 3, 2)], 32
        for expand, c_out, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        layers.append(_conv_bn(c_in, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        h = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(h, 1))


class UNet(nn.Module):
    """Three levels down and up (16, 32, 64 channels, 128 at the bottom), skip connections, transposed
    convolutions to upsample."""

    def __init__(self, c_in: int = 3, c_out: int = 2, widths=(16, 32, 64, 128)):
        super().__init__()

        def double(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                                 nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())

        self.down = nn.ModuleList([double(c_in, widths[0])] + [double(widths[i], widths[i + 1]) for i in range(3)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in (2, 1, 0)])
        self.merge = nn.ModuleList([double(2 * widths[i], widths[i]) for i in (2, 1, 0)])
        self.out = nn.Conv2d(widths[0], c_out, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.out(x)


class LastHidden(nn.Module):
    """A Hugging Face model's last hidden state, as one tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).last_hidden_state


def _transformer(name: str) -> nn.Module:
    import transformers as tf

    small = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    if name == "vit":
        model = tf.ViTModel(tf.ViTConfig(image_size=IMAGE, patch_size=8, **small), add_pooling_layer=False)
    elif name == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=8000, max_position_embeddings=128, **small),
                             add_pooling_layer=False)
    else:
        model = tf.GPT2Model(tf.GPT2Config(vocab_size=8000, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                                           bos_token_id=0, eos_token_id=0, use_cache=False))
    return LastHidden(model)


def make(name: str) -> tuple[nn.Module, tuple]:
    """The model ``name`` (in eval mode) and its example input."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    if name in ("bert", "gpt2"):
        model, args = _transformer(name), (torch.randint(0, 8000, (1, 64), generator=gen),)
    elif name == "vit":
        model, args = _transformer(name), (torch.rand(1, 3, IMAGE, IMAGE, generator=gen),)
    else:
        model = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2, "unet": UNet}[name]()
        _seeded_batch_norms(model)
        args = (torch.rand(1, 3, IMAGE, IMAGE, generator=gen),)
    return model.eval(), args
