"""Plain torch networks. Each takes ``input_shape`` and ``num_classes`` at build time.

torchvision is not importable beside our torch build, so every net is written by hand.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ggda.errors import check_float, check_int


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: logits = W flatten(x) + b.

    Args:
        input_shape: shape of one input.
        num_classes: C.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(_numel(tuple(input_shape)), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, C)."""
        return self.fc(self.flatten(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation: for a linear model, the flattened input."""
        return self.flatten(x)

    @property
    def head(self) -> nn.Linear:
        """The last (classification) layer."""
        return self.fc


class MLP(nn.Module):
    """Fully connected ReLU network.

    Args:
        input_shape: shape of one input (flattened internally).
        num_classes: C.
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer (off in eval mode, which
            attribution always uses).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: list[int] | tuple[int, ...] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = [check_int("model.net.hidden[]", h, 1) for h in hidden]
        dropout = check_float("model.net.dropout", dropout, 0.0, 1.0, hi_open=True)
        layers: list[nn.Module] = [nn.Flatten()]
        width = _numel(tuple(input_shape))
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, C)."""
        return self.fc(self.body(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations h: (B, *input_shape) -> (B, hidden[-1])."""
        return self.body(x)

    @property
    def head(self) -> nn.Linear:
        """The last (classification) layer."""
        return self.fc
