"""OmegaConf resolvers used by the config tree (registered before Hydra composes)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _k_label(grouping_name: str, groups: object) -> str:
    # singleton grouping ignores `groups`: its run directory says k=n, not a misleading number
    return "n" if grouping_name == "singleton" else str(groups)


def _stem(path: object, default: str) -> str:
    # a data set named after its file (run directories of two files stay apart)
    if path is None or str(path).strip() in ("", "???"):
        return default
    name = Path(str(path).rstrip("/")).name
    return name.split(".")[0] or default


def register_resolvers() -> None:
    """Register ``${ggda_k:grouping_name,groups}`` and ``${ggda_stem:path,default}`` once
    per process.
    """
    if not OmegaConf.has_resolver("ggda_k"):
        OmegaConf.register_new_resolver("ggda_k", _k_label)
    if not OmegaConf.has_resolver("ggda_stem"):
        OmegaConf.register_new_resolver("ggda_stem", _stem)


register_resolvers()
