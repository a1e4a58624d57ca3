"""Plain torch networks. Each takes ``input_shape`` and ``num_classes`` at build time.

torchvision is not importable beside our torch build, so every net is written by hand.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ggda.errors import GGDAError, check_float, check_int


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


def _image_shape(input_shape: tuple[int, ...], net: str, min_side: int) -> tuple[int, int, int]:
    """(C, H, W) of an image input, or a clear error for flat inputs."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise GGDAError(
            f"model {net} needs image inputs (C, H, W) but the data set gives shape {shape}; "
            "set `dataset.flatten=false` (the experiment configs for image models do)"
        )
    if min(shape[1:]) < min_side:
        raise GGDAError(f"model {net} needs images of at least {min_side}x{min_side}, got {shape}")
    return shape  # type: ignore[return-value]


class CNN(nn.Module):
    """Small ConvNet.

    [conv3x3 -> ReLU -> maxpool2] per entry of ``channels``, then one hidden fully
    connected layer and the linear head.

    Args:
        input_shape: (C, H, W).
        num_classes: C_out.
        channels: output channels of the conv blocks (each halves H and W).
        hidden: width of the fully connected layer (the penultimate features).
        dropout: dropout before the head (off in eval mode, which attribution uses).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: list[int] | tuple[int, ...] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = [check_int("model.net.channels[]", c, 1) for c in channels]
        hidden = check_int("model.net.hidden", hidden, 1)
        dropout = check_float("model.net.dropout", dropout, 0.0, 1.0, hi_open=True)
        c, h, w = _image_shape(input_shape, "cnn", 2 ** len(channels))
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes)."""
        return self.fc(self.body(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations: (B, C, H, W) -> (B, hidden)."""
        return self.body(x)

    @property
    def head(self) -> nn.Linear:
        """The last (classification) layer."""
        return self.fc


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    # No conv bias: the batch-norm shift makes it redundant.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class _Residual(nn.Module):
    """x + f(x), out of place (vmap and autograd need the input intact)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class ResNet9(nn.Module):
    """ResNet-9 in the style of the DAWNBench CIFAR-10 net (Page, 2018), by hand.

    prep conv(w) -> [conv(2w), pool, residual] -> [conv(4w), pool] -> [conv(8w), pool,
    residual] -> global max pool -> linear head. Every conv is 3x3 + BatchNorm + ReLU.
    Train mode uses batch statistics; attribution runs in eval mode, where batch-norm
    applies its running statistics, so points do not interact and ``vmap`` works.

    Args:
        input_shape: (C, H, W) with H, W >= 8.
        num_classes: C_out.
        width: channels of the first conv (64 in the original: 6.6M parameters; 16 gives
            0.4M and trains on a CPU).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> None:
        super().__init__()
        w = check_int("model.net.width", width, 1)
        c, _, _ = _image_shape(input_shape, "resnet9", 8)
        self.body = nn.Sequential(
            _conv_bn(c, w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _Residual(2 * w),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w),
            nn.MaxPool2d(2),
            _Residual(8 * w),
        )
        self.fc = nn.Linear(8 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-max-pooled last block: (B, C, H, W) -> (B, 8 * width)."""
        return torch.amax(self.body(x), dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes)."""
        return self.fc(self.features(x))

    @property
    def head(self) -> nn.Linear:
        """The last (classification) layer."""
        return self.fc


class TextClassifier(nn.Module):
    """Bag of embeddings: mean of the token embeddings (padding excluded), an MLP, a head.

    h = MLP(sum_t m_t E[x_t] / max(1, sum_t m_t)), m_t = [x_t != pad], logits = W h + b.
    The masked mean is written with plain tensor ops (no ``nn.EmbeddingBag``) so that
    ``torch.func.vmap(grad)`` handles it.

    Args:
        input_shape: (L,) padded sequence length.
        num_classes: C.
        vocab_size: embedding rows; token ids must be below it (``dataset.max_vocab``).
        embed_dim: embedding width.
        hidden: widths of the hidden layers after pooling ([] = linear on the mean).
        dropout: dropout after each hidden layer (off in eval mode).
        pad_id: id of the padding token (ignored by the mean).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        vocab_size: int,
        embed_dim: int = 64,
        hidden: list[int] | tuple[int, ...] = (64,),
        dropout: float = 0.0,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if len(tuple(input_shape)) != 1:
            raise GGDAError(
                f"model text needs padded token ids of shape (L,), got inputs of shape "
                f"{tuple(input_shape)}; use a text data set (dataset=bbcnews or qnli)"
            )
        vocab_size = check_int("model.net.vocab_size", vocab_size, 2)
        embed_dim = check_int("model.net.embed_dim", embed_dim, 1)
        hidden = [check_int("model.net.hidden[]", h, 1) for h in hidden]
        dropout = check_float("model.net.dropout", dropout, 0.0, 1.0, hi_open=True)
        self.pad_id = check_int("model.net.pad_id", pad_id, 0, vocab_size - 1)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=self.pad_id)
        layers: list[nn.Module] = []
        width = embed_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) long token ids -> (B, hidden[-1]) (or (B, embed_dim) without hidden)."""
        if x.is_floating_point():
            # Some callers cast every input to the parameters' dtype; ids below 2**24 are
            # exact in float32 (and float64), so rounding recovers them.
            x = x.round().long()
        e = self.embedding(x)  # (B, L, D)
        m = (x != self.pad_id).to(e.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (e * m).sum(-2) / m.sum(-2).clamp_min(1.0)
        return self.body(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, C)."""
        return self.fc(self.features(x))

    @property
    def head(self) -> nn.Linear:
        """The last (classification) layer."""
        return self.fc
