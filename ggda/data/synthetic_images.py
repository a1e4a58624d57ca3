"""Seeded synthetic images with learnable class structure (``dataset=synthetic_images``).

Each class c has a template T_c of shape (C, H, W): a smooth random field (Gaussian noise
on a coarse grid of about a quarter of the side, upsampled bilinearly, scaled to unit
standard deviation per class). An example of class c is

    x = a * shift(T_c, dy, dx) + noise * eps,

with amplitude a ~ U(0.6, 1.4), a cyclic shift (dy, dx) uniform in
[-max_shift, max_shift]^2 and eps ~ N(0, I). Shifts make convolutions and pooling pay off;
the noise keeps the task from being trivial. Nothing is read from disk.

Presets: ``mnist`` (1, 28, 28), ``cifar`` (3, 32, 32); ``shape`` overrides. Labels cycle
through the classes (balanced) in a seeded random order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ggda.data.bundled import TensorDataset
from ggda.errors import ConfigError, check_choice, check_float, check_int

PRESETS = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}


def class_templates(
    num_classes: int, shape: tuple[int, int, int], generator: torch.Generator
) -> torch.Tensor:
    """(num_classes, C, H, W) smooth random fields, each of unit std."""
    c, h, w = shape
    coarse = torch.randn(
        num_classes, c, max(2, h // 4), max(2, w // 4), generator=generator, dtype=torch.float64
    )
    t = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    t = t - t.mean(dim=(1, 2, 3), keepdim=True)
    return t / t.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)


def sample_images(
    templates: torch.Tensor,
    y: torch.Tensor,
    noise: float,
    max_shift: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """(n, C, H, W) examples a * shift(T_y, dy, dx) + noise * eps (see the module docstring)."""
    n = y.shape[0]
    amp = 0.6 + 0.8 * torch.rand(n, generator=generator, dtype=torch.float64)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    x = templates[y] * amp[:, None, None, None]
    # One roll per distinct shift, over all examples that share it.
    codes = (shifts[:, 0] + max_shift) * (2 * max_shift + 1) + (shifts[:, 1] + max_shift)
    for code in codes.unique().tolist():
        idx = (codes == code).nonzero().squeeze(1)
        dy, dx = (int(v) for v in shifts[idx[0]])
        x[idx] = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
    return x + noise * torch.randn(x.shape, generator=generator, dtype=torch.float64)


class SyntheticImages(TensorDataset):
    """Image-shaped data with class templates, shifts and noise; seeded, no files.

    Args:
        name: data set name (None = ``synth_<preset>``, as in the run directory names).
        num_train, num_val, num_test: split sizes (all generated).
        preset: ``mnist`` (1x28x28) | ``cifar`` (3x32x32).
        shape: (C, H, W) overriding the preset (None = the preset's).
        num_classes: number of classes.
        noise: std of the per-pixel Gaussian noise (templates have unit std).
        max_shift: largest cyclic shift in pixels (0 = templates in place).
        data_seed: seed of the templates and the examples.
        **kw: ``num_queries``, ``split_seed``, ``label_noise``, ``noise_seed``, ``flatten``
            (see :class:`TensorDataset`).
    """

    def __init__(
        self,
        name: str | None = None,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        preset: str = "mnist",
        shape: list[int] | tuple[int, ...] | None = None,
        num_classes: int = 10,
        noise: float = 2.0,
        max_shift: int = 4,
        data_seed: int = 0,
        **kw,
    ) -> None:
        kw.setdefault("flatten", False)
        check_choice("dataset.preset", preset, list(PRESETS))
        super().__init__(
            f"synth_{preset}" if name is None else name, num_train, num_val, num_test, **kw
        )
        # the settings as given (the config's keys); `image_shape` is the resolved shape
        self.preset, self.shape = preset, None if shape is None else list(shape)
        if shape is None:
            shape = PRESETS[preset]
        if len(shape) != 3:
            raise ConfigError("dataset.shape", list(shape), "[channels, height, width] or null")
        self.image_shape = tuple(check_int("dataset.shape[]", s, 1) for s in shape)
        self.num_classes = check_int("dataset.num_classes", num_classes, 2)
        self.noise = check_float("dataset.noise", noise, 0.0)
        side = min(self.image_shape[1:])
        self.max_shift = check_int("dataset.max_shift", max_shift, 0, max(0, side // 2))
        self.data_seed = int(data_seed)

    def raw(self) -> tuple[np.ndarray, np.ndarray, int]:
        g = torch.Generator().manual_seed(self.data_seed)
        templates = class_templates(self.num_classes, self.image_shape, g)
        n = self.num_train + self.num_val + self.num_test
        y = (torch.arange(n) % self.num_classes)[torch.randperm(n, generator=g)]
        x = sample_images(templates, y, self.noise, self.max_shift, g)
        return x.flatten(1).numpy(), y.numpy(), self.num_classes
