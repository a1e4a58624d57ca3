"""Seeded random projections that never hold the whole (p, d) matrix when it is large."""

from __future__ import annotations

import math

import torch

from ggda.errors import check_choice, check_int

PROJ_TYPES = ("rademacher", "gaussian")


class RandomProjector:
    """x (b, p) -> x P (b, d), P a seeded random (p, d) matrix scaled by 1/sqrt(d).

    P is generated in row blocks of ``block`` rows from a per-block seed, so it is the same
    matrix on every call and on every device, and is held whole only when it is small
    (``p * d <= cache_elems``); otherwise each block is regenerated on use.

    Args:
        p: input dimension.
        d: output dimension (``proj_dim``).
        seed: projection seed.
        kind: ``rademacher`` (+-1) or ``gaussian``.
        block: rows of P generated at a time.
        cache_elems: hold P in memory when it has at most this many entries.
    """

    def __init__(
        self,
        p: int,
        d: int,
        seed: int = 0,
        kind: str = "rademacher",
        block: int = 8192,
        cache_elems: int = 64_000_000,
    ) -> None:
        self.p = check_int("projection input dim", p, 1)
        self.d = check_int("method.proj_dim", d, 1)
        self.kind = check_choice("method.proj_type", kind, PROJ_TYPES)
        self.seed = int(seed)
        self.block = int(block)
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._cacheable = p * d <= cache_elems

    def _block(self, i: int, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        if self.kind == "gaussian":
            m = torch.randn(rows, self.d, generator=g)
        else:
            m = torch.randint(0, 2, (rows, self.d), generator=g).float().mul_(2).sub_(1)
        return m.mul_(1.0 / math.sqrt(self.d)).to(device=device, dtype=dtype)

    def matrix(self, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
        """The whole P (p, d); for tests and small p."""
        device = torch.device(device)
        blocks = [
            self._block(i, min(self.block, self.p - s), device, dtype)
            for i, s in enumerate(range(0, self.p, self.block))
        ]
        return torch.cat(blocks, 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project rows: (b, p) -> (b, d)."""
        if x.shape[-1] != self.p:
            raise ValueError(f"projector expects {self.p} features, got {x.shape[-1]}")
        key = (x.device, x.dtype)
        if self._cacheable:
            if key not in self._cache:
                self._cache[key] = self.matrix(x.device, x.dtype)
            return x @ self._cache[key]
        out = x.new_zeros(x.shape[0], self.d)
        for i, s in enumerate(range(0, self.p, self.block)):
            rows = min(self.block, self.p - s)
            out += x[:, s : s + rows] @ self._block(i, rows, x.device, x.dtype)
        return out
