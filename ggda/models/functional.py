"""Per-example loss and query measurements, shared by training, attribution and evaluation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ggda.errors import check_choice

MEASUREMENTS = ("loss", "margin")


def per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example: (B, C), (B,) -> (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's margin: logit of the true class minus logsumexp of the others. (B,C),(B,) -> (B,)."""
    true = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, y.unsqueeze(-1), float("-inf"))
    return true - torch.logsumexp(others, dim=-1)


def neg_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negated cross-entropy: the 'goodness' we attribute when measuring the loss."""
    return -per_example_loss(logits, y)


def measurement_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-example measurement f, oriented so that higher is better for the query.

    ``loss`` -> -cross_entropy (so a helpful group, which lowers the loss, scores positive);
    ``margin`` -> margin.
    """
    check_choice("method.measurement", name, MEASUREMENTS)
    return neg_loss if name == "loss" else margin


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correct argmax predictions."""
    return float((logits.argmax(-1) == y).float().mean())
