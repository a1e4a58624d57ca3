"""OmegaConf resolvers used by the config tree (registered before Hydra composes)."""

from __future__ import annotations

from omegaconf import OmegaConf


def _k_label(grouping_name: str, groups: object) -> str:
    # singleton grouping ignores `groups`: its run directory says k=n, not a misleading number
    return "n" if grouping_name == "singleton" else str(groups)


def register_resolvers() -> None:
    """Register ``${ggda_k:grouping_name,groups}`` once per process."""
    if not OmegaConf.has_resolver("ggda_k"):
        OmegaConf.register_new_resolver("ggda_k", _k_label)


register_resolvers()
