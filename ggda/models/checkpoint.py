"""The saved state of a model, shared by the model cache and the attribution methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Checkpoint:
    """One saved state of the base model.

    Attributes:
        state_dict: the net's weights.
        lr: learning rate in force when the checkpoint was taken (TracIn's eta_t).
        epoch: 1-based epoch after which it was saved.
    """

    state_dict: dict[str, torch.Tensor]
    lr: float
    epoch: int
