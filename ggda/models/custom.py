"""A user's own network (``model=custom``): any importable ``nn.Module`` factory.

``model.net._target_`` names a class or function by its import path
(``my_pkg.my_module.MyNet``); the other keys of ``model.net`` are its keyword arguments.
It is called like the shipped nets, ``MyNet(input_shape=(C, H, W), num_classes=C, **kw)``;
a factory that does not take ``input_shape`` (or ``num_classes``) as a parameter (nor
``**kwargs``) is called without it. It must return an ``nn.Module`` mapping a batch
(B, *input_shape) to logits (B, num_classes). Optional ``features(x)`` and ``head``
members (penultimate activations and the last layer, as the shipped nets define them)
enable the representation-based groupings.

Both the import and the output width are checked before training, with errors naming
``model.net._target_``. A module in the working directory is importable as if the
working directory were on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ggda.errors import ConfigError, GGDAError

log = logging.getLogger(__name__)

KEY = "model.net._target_"


def check_target(target: Any, key: str = KEY) -> Callable[..., Any]:
    """Import ``target`` (``pkg.module.Name``) or raise a :class:`ConfigError` naming ``key``.

    The working directory is added to ``sys.path`` when the module is not found otherwise
    (so ``my_nets.py`` beside where you run is found, also by the retrain workers, which
    inherit ``sys.path``).
    """
    example = "the import path of your nn.Module class or factory, e.g. my_pkg.my_module.MyNet"
    if not isinstance(target, str) or target.strip() in ("", "???") or "." not in target:
        raise ConfigError(key, target, example)
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if cwd in sys.path or "" in sys.path:
            raise ConfigError(
                key,
                target,
                example,
                f"Importing {module_name} failed ({e}). Run from the directory that holds "
                "it, put that directory on PYTHONPATH, or `pip install -e` its package.",
            ) from None
        sys.path.append(cwd)
        return check_target(target, key)
    except Exception as e:  # the user's module itself raised while importing
        raise ConfigError(
            key, target, example, f"Importing {module_name} raised {type(e).__name__}: {e}"
        ) from None
    if not hasattr(module, attr):
        names = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
        raise ConfigError(
            key, target, example, f"{module_name} has no attribute {attr!r} (it has: {names})."
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(key, target, example, f"{target} is a {type(fn).__name__}.")
    return fn


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


class NetFactory:
    """``(input_shape, num_classes) -> nn.Module`` around a user's factory (picklable).

    Args:
        target: the import path (for errors and pickling).
        kwargs: the factory's keyword arguments from ``model.net``.
    """

    def __init__(self, target: str, kwargs: dict[str, Any]) -> None:
        self.target = target
        self.kwargs = dict(kwargs)
        fn = check_target(target)
        self.pass_shape = _accepts(fn, "input_shape")
        self.pass_classes = _accepts(fn, "num_classes")

    def __call__(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        fn = check_target(self.target)
        kw = dict(self.kwargs)
        if self.pass_shape:
            kw["input_shape"] = tuple(input_shape)
        if self.pass_classes:
            kw["num_classes"] = int(num_classes)
        try:
            net = fn(**kw)
        except GGDAError:
            raise
        except TypeError as e:
            raise ConfigError(
                KEY,
                self.target,
                "a factory accepting the keys of model.net",
                f"Calling it with {sorted(kw)} raised TypeError: {e}. Fix the extra "
                "`model.net.*` keys (new keys need a leading +, e.g. `+model.net.width=16`).",
            ) from None
        if not isinstance(net, nn.Module):
            raise ConfigError(
                KEY,
                self.target,
                "a factory that returns a torch.nn.Module",
                f"It returned a {type(net).__name__}.",
            )
        return net


def custom_factory(net_cfg: dict[str, Any]) -> NetFactory:
    """A :class:`NetFactory` from a ``model.net`` node (``_target_`` plus kwargs)."""
    cfg = {k: v for k, v in net_cfg.items() if k not in ("_target_", "_partial_")}
    return NetFactory(net_cfg.get("_target_"), cfg)


def net_factory(net_cfg: dict[str, Any], build: Callable[[dict], Any]) -> Callable[..., Any]:
    """The factory of a ``model.net`` node: the shipped nets (``ggda.*``, built by
    ``build``) as they are, any other ``_target_`` as a checked :class:`NetFactory`.
    """
    target = net_cfg.get("_target_")
    if isinstance(target, str) and target.startswith("ggda."):
        return build(net_cfg)
    return custom_factory(net_cfg)


def check_net(net: nn.Module, x: torch.Tensor, num_classes: int, key: str = KEY) -> None:
    """Run two training inputs through ``net`` (eval mode, no grad) and check the logits.

    Args:
        net: the freshly built model.
        x: (B, *input_shape) a few training inputs.
        num_classes: C.

    Raises:
        ConfigError: the forward pass fails, or the output is not (B, C) and finite-typed.
    """
    target = type(net).__module__ + "." + type(net).__qualname__
    # The net is built in the default dtype while the inputs may already be float64
    # (trainer.precision=64-true casts the data; Lightning casts the net only when training
    # starts): probe in the net's own dtype so a dtype mismatch is not reported as a bad net.
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as e:
        raise ConfigError(
            key,
            target,
            f"a net accepting inputs of shape {tuple(x.shape)} (a batch of {x.shape[0]})",
            f"Its forward pass raised {type(e).__name__}: {e}. It is built with "
            f"input_shape={tuple(x.shape[1:])}, num_classes={num_classes}.",
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise ConfigError(
            key,
            target,
            "a net returning a float tensor of logits",
            f"It returned {type(out).__name__}.",
        )
    want = (x.shape[0], num_classes)
    if tuple(out.shape) != want:
        raise ConfigError(
            key,
            target,
            f"a net whose output has shape (batch, num_classes) = {want}",
            f"It gives {tuple(out.shape)} for inputs of shape {tuple(x.shape)}: its last layer "
            f"must have num_classes={num_classes} outputs (the data set has {num_classes} "
            "classes); build it from the `num_classes` argument.",
        )
