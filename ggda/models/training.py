"""The training recipe shared by the Lightning module and the lean retraining loop.

Both build their optimizer and scheduler here, so a retrain in the evaluation service
follows exactly the recipe of the base model (minus logging and checkpoint files).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ggda.errors import GGDAError, check_choice, check_float, check_int
from ggda.models.functional import per_example_loss

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "step")


@dataclass
class Recipe:
    """How a model is trained.

    Attributes:
        net_factory: ``(input_shape, num_classes) -> nn.Module`` (picklable partial).
        optimizer: sgd | adam | adamw.
        lr: base learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        scheduler: none | cosine | step (stepped once per epoch).
        step_gamma, step_every: decay factor and period for ``step``.
        epochs: number of epochs.
        batch_size: minibatch size.
        save_epochs: epochs (1-based) after which the base model is checkpointed.
    """

    net_factory: Callable[..., nn.Module]
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "none"
    step_gamma: float = 0.1
    step_every: int = 10
    epochs: int = 10
    batch_size: int = 64
    save_epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("model.optim.name", self.optimizer, OPTIMIZERS)
        check_float("model.optim.lr", self.lr, 0.0, lo_open=True)
        check_float("model.optim.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_float("model.optim.weight_decay", self.weight_decay, 0.0)
        check_choice("model.optim.scheduler", self.scheduler, SCHEDULERS)
        check_float("model.optim.step_gamma", self.step_gamma, 0.0, 1.0, lo_open=True)
        check_int("model.optim.step_every", self.step_every, 1)
        check_int("model.epochs", self.epochs, 1)
        check_int("model.batch_size", self.batch_size, 1)
        asked = {check_int("model.save_epochs[]", e, 1) for e in self.save_epochs}
        late = sorted(e for e in asked if e > self.epochs)
        if late:
            # Shortening `model.epochs` for a quick run should not need a second override.
            log.warning(
                "model.save_epochs %s lie beyond model.epochs=%d: not saved", late, self.epochs
            )
        self.save_epochs = sorted({e for e in asked if e <= self.epochs} | {self.epochs})

    def build_net(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return self.net_factory(input_shape=tuple(input_shape), num_classes=num_classes)

    def build_optimizer(
        self, params: Iterable[torch.nn.Parameter]
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """Optimizer and (per-epoch) scheduler of this recipe."""
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        elif self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched: torch.optim.lr_scheduler.LRScheduler | None = None
        if self.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
        elif self.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, self.step_every, self.step_gamma)
        return opt, sched


def check_finite_loss(loss: torch.Tensor, stage: str, epoch: int, step: int) -> None:
    """Stop with a clear error when the training loss is NaN or infinite."""
    if not torch.isfinite(loss):
        raise GGDAError(
            f"{stage}: training loss became {float(loss)} at epoch {epoch}, step {step}. "
            "The run is stopped. Lower the learning rate (`model.optim.lr`) or check the "
            "data for extreme values."
        )


def train_lean(
    recipe: Recipe,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train a fresh model on (x, y) with the recipe: no logger, no checkpoint files.

    Args:
        recipe: the training recipe.
        x: (n, *input_shape) inputs.
        y: (n,) labels.
        num_classes: C.
        seed: initialisation and shuffling seed.
        device: where to train.

    Returns:
        The trained model in eval mode.
    """
    torch.manual_seed(seed)
    net = recipe.build_net(tuple(x.shape[1:]), num_classes).to(device)
    if x.is_floating_point():
        net = net.to(x.dtype)  # float64 data (trainer.precision=64-true) trains in float64
    opt, sched = recipe.build_optimizer(net.parameters())
    g = torch.Generator().manual_seed(seed)
    x, y = x.to(device), y.to(device)
    n = y.shape[0]
    net.train()
    for epoch in range(recipe.epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for step, start in enumerate(range(0, n, recipe.batch_size)):
            idx = perm[start : start + recipe.batch_size]
            loss = per_example_loss(net(x[idx]), y[idx]).mean()
            check_finite_loss(loss, "retrain", epoch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
    return net.eval()


def cosine_lr(base: float, epoch: int, total: int) -> float:
    """Learning rate of CosineAnnealingLR after ``epoch`` steps (for reference/tests)."""
    return base * (1 + math.cos(math.pi * epoch / total)) / 2
