"""The small networks used by ``probopt compare``, the benchmarks and the docs."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["make_network", "MLP", "SmallCNN"]


class MLP(nn.Sequential):
    """``Linear -> ReLU`` blocks and a final linear layer (no hidden layer: logistic regression)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (128,)):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Two conv blocks, global average pooling, a hidden and a final linear layer.

    Works on 1-D signals (``input_shape = (C, L)``) and 2-D images (``(C, H, W)``); inputs arrive
    flat and are reshaped. ``features`` returns the penultimate activations.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16):
        super().__init__()
        self.input_shape = tuple(input_shape)
        conv = nn.Conv1d if len(input_shape) == 2 else nn.Conv2d
        pool = nn.MaxPool1d if len(input_shape) == 2 else nn.MaxPool2d
        gap = nn.AdaptiveAvgPool1d(1) if len(input_shape) == 2 else nn.AdaptiveAvgPool2d(1)
        c = input_shape[0]
        self.body = nn.Sequential(
            conv(c, width, 3, padding=1), nn.ReLU(), pool(2),
            conv(width, 2 * width, 3, padding=1), nn.ReLU(), pool(2),
            gap, nn.Flatten(),
            nn.Linear(2 * width, 4 * width), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, *self.input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_network(
    kind: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int = 0,
    hidden: tuple[int, ...] = (128,),
    width: int = 16,
) -> nn.Module:
    """Build a seeded network.

    Args:
        kind: ``"logreg"`` (linear softmax), ``"mlp"`` or ``"cnn"``.
        input_shape: one example's shape (:attr:`probopt.experiments.Dataset.input_shape`).
        num_classes: output width.
        seed: initialisation seed (the global RNG is left untouched).
        hidden: hidden widths of the MLP.
        width: base channel count of the CNN.

    Example:
        >>> net = make_network("mlp", (64,), 10, seed=0)
        >>> net(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """
    in_features = math.prod(input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "logreg":
            return MLP(in_features, num_classes, hidden=())
        if kind == "mlp":
            return MLP(in_features, num_classes, hidden=hidden)
        if kind == "cnn":
            if len(input_shape) < 2:
                raise ValueError(f"a cnn needs a signal or image input shape, got {input_shape}")
            return SmallCNN(input_shape, num_classes, width=width)
    raise ValueError(f"unknown network kind {kind!r}; choose logreg, mlp or cnn")
