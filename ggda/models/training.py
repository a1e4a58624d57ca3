"""The training recipe shared by the Lightning module and the lean retraining loop.

Both build their optimizer and scheduler here, so a retrain in the evaluation service
follows exactly the recipe of the base model (minus logging and checkpoint files). The
optimizer and scheduler are factories (in the config: ``_target_`` nodes such as
``torch.optim.SGD``, built as partials by the pipeline), so any torch optimizer works.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ggda.errors import ConfigError, GGDAError, check_float, check_int
from ggda.models.functional import per_example_loss

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def default_optimizer() -> OptimizerFactory:
    """SGD with lr 0.05 and momentum 0.9 (the recipe's default; conf/model/*.yaml set theirs)."""
    return functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def retrain_seeds(seed: int, repeats: int) -> list[int]:
    """Seeds of the R retrains per subset, fixed by the evaluation seed alone.

    Every run and sweep job asking for the same subset (LDS, pruning, group leave-one-out)
    then reuses the same cached retrains: seeds ``seed * 100003 + r`` for r < R.
    """
    return [seed * 100_003 + r for r in range(repeats)]


def _name(factory: Callable) -> str:
    func = getattr(factory, "func", factory)
    return getattr(func, "__qualname__", repr(func))


@dataclass
class Recipe:
    """How a model is trained.

    Attributes:
        net_factory: ``(input_shape, num_classes) -> nn.Module`` (picklable partial).
        optimizer: ``params -> torch.optim.Optimizer`` (picklable partial, e.g.
            ``functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)``).
        scheduler: ``optimizer -> LRScheduler`` stepped once per epoch, or None.
        epochs: number of epochs.
        batch_size: minibatch size.
        save_epochs: epochs (1-based) after which the base model is checkpointed.
    """

    net_factory: Callable[..., nn.Module]
    optimizer: OptimizerFactory = field(default_factory=default_optimizer)
    scheduler: SchedulerFactory | None = None
    epochs: int = 10
    batch_size: int = 64
    save_epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_int("model.epochs", self.epochs, 1)
        check_int("model.batch_size", self.batch_size, 1)
        # Build once on a probe parameter: a bad optimizer/scheduler setting fails here,
        # before training, naming the config key (torch's own message says what is wrong).
        lr = getattr(self.optimizer, "keywords", {}).get("lr")
        if isinstance(lr, (int, float)):
            check_float("model.optim.lr", lr, 0.0, lo_open=True)
        probe = torch.nn.Parameter(torch.zeros(1))
        try:
            opt = self.optimizer([probe])
        except (TypeError, ValueError) as e:
            raise ConfigError(
                "model.optim", _name(self.optimizer), "arguments the optimizer accepts", str(e)
            ) from None
        self._lr = float(opt.param_groups[0]["lr"])
        check_float("model.optim.lr", self._lr, 0.0, lo_open=True)
        if self.scheduler is not None:
            try:
                self.scheduler(opt)
            except (TypeError, ValueError) as e:
                raise ConfigError(
                    "model.scheduler",
                    _name(self.scheduler),
                    "arguments the scheduler accepts (or `model.scheduler=null`)",
                    str(e),
                ) from None
        asked = {check_int("model.save_epochs[]", e, 1) for e in self.save_epochs}
        late = sorted(e for e in asked if e > self.epochs)
        if late:
            # Shortening `model.epochs` for a quick run should not need a second override.
            log.warning(
                "model.save_epochs %s lie beyond model.epochs=%d: not saved", late, self.epochs
            )
        self.save_epochs = sorted({e for e in asked if e <= self.epochs} | {self.epochs})

    @property
    def lr(self) -> float:
        """The optimizer's initial learning rate (of its first parameter group)."""
        return self._lr

    def build_net(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """A freshly initialised net for inputs of ``input_shape`` and ``num_classes``."""
        return self.net_factory(input_shape=tuple(input_shape), num_classes=num_classes)

    def build_optimizer(
        self, params: Iterable[torch.nn.Parameter]
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """Optimizer and (per-epoch) scheduler of this recipe, over ``params``."""
        opt = self.optimizer(params)
        return opt, (self.scheduler(opt) if self.scheduler is not None else None)


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
