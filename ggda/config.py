"""The config's key lists and the OmegaConf resolvers the config tree uses.

One list, :data:`PRESENTATION_KEYS`, says which config keys never change a run's results
(where and how a job runs, what it prints or logs). Everything else decides results. The
list feeds, from this one place:

- the run-directory names: a sweep job's subdirectory (``ggda_dirname``), a single
  run's suffix (``ggda_variant``) and Hydra's own ``override_dirname`` exclusions
  (``ggda_presentation_overrides``);
- the finished-results check (:func:`ggda.pipeline.results_config`);
- the cache keys of trained models (:func:`ggda.pipeline.trainer_results`).

Registered before Hydra composes (``run.py`` imports this module).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Config keys (dotted paths; a key names its whole subtree) that never change results.
PRESENTATION_KEYS: tuple[str, ...] = (
    "overwrite",
    "tag",
    "sweep_name",
    "logger",
    "paths",
    "hydra",
    "callbacks",
    "scores_mmap_bytes",
    "grouping.warn_share",
    # where the base model trains and what Lightning prints (precision, determinism and
    # the rest of `trainer` decide results)
    "trainer.accelerator",
    "trainer.devices",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    # how retrains are scheduled (what is retrained is decided by the evaluation keys)
    "retrain.backend",
    "retrain.workers",
    "retrain.device",
    "retrain.min_parallel",
    "retrain.executor",
    "retrain.jobs",
    "retrain.retrains_per_job",
    "retrain.submitit_folder",
    "retrain.slurm",
)
# Command-line override keys that never enter a directory name: the presentation keys,
# the leaves of their subtrees a user may set one by one, and config-group choices that
# only pick a presentation option (`trainer=gpu` picks the accelerator).
_SUBTREE_LEAVES = {
    "retrain.slurm": ("partition", "timeout_min", "cpus_per_task", "mem_gb", "array_parallelism"),
}
PRESENTATION_GROUPS: tuple[str, ...] = ("hydra/launcher", "trainer", "logger", "paths", "callbacks")
# Overrides already spelled out in a single run's directory name (dataset, method,
# grouping, k, seed, tag) or naming an experiment preset (whose dataset name is in it).
NAME_KEYS: tuple[str, ...] = (
    "dataset",
    "method",
    "grouping",
    "groups",
    "seed",
    "tag",
    "experiment",
)


def is_presentation(key: str) -> bool:
    """True if the dotted config key is (inside) a presentation key."""
    return any(key == p or key.startswith(p + ".") for p in PRESENTATION_KEYS)


def presentation_overrides() -> list[str]:
    """Override keys Hydra leaves out of ``override_dirname`` (sweep subdirectories)."""
    keys = list(PRESENTATION_KEYS) + list(PRESENTATION_GROUPS)
    for tree, leaves in _SUBTREE_LEAVES.items():
        keys += [f"{tree}.{leaf}" for leaf in leaves]
    return sorted(set(keys))


def drop_presentation(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of a nested config dict without its presentation keys."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if is_presentation(path):
            continue
        out[k] = drop_presentation(v, path + ".") if isinstance(v, dict) else v
    return out


def _override_key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("~+")


def _result_overrides(overrides: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The result-deciding override lines, sorted (``/`` made ``_`` for file names)."""
    out = []
    for line in overrides or []:
        key = _override_key(str(line))
        if key in skip or key in PRESENTATION_GROUPS or is_presentation(key):
            continue
        out.append(str(line).replace("/", "_"))
    return sorted(out)


# Longest directory-name part made of overrides, in bytes: file systems cap a name at 255
# bytes, and a run's name adds `<grouping>_k<k>_s<seed><tag>` to its suffix.
MAX_NAME_BYTES = 160


def _fit_name(text: str) -> str:
    """``text`` if short enough for a directory name, else its start plus a hash of it all.

    The hash keeps long variants (an absolute ``dataset.file`` path, many overrides) apart
    and stable: the same overrides always map to the same directory.
    """
    if len(text.encode()) <= MAX_NAME_BYTES:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    head = text.encode()[: MAX_NAME_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def _dirname(overrides: Any) -> str:
    """A sweep job's subdirectory: its result-deciding overrides, ``key=value,...``."""
    return _fit_name(",".join(_result_overrides(overrides))) or "default"


def _variant(overrides: Any) -> str:
    """``,key=value,...`` of the result-deciding overrides not already in the run name.

    A single run's directory is named by dataset, method, grouping, k and seed; any other
    override that changes results (``model=cnn``, ``trainer.precision=bf16-mixed``) is
    appended, so that it writes (and finds) its own results instead of colliding with the
    run without it. Presentation overrides never appear.
    """
    return _fit_name("".join("," + line for line in _result_overrides(overrides, NAME_KEYS)))


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
    """Register the ``ggda_*`` resolvers once per process."""
    if not OmegaConf.has_resolver("ggda_k"):
        OmegaConf.register_new_resolver("ggda_k", _k_label)
    if not OmegaConf.has_resolver("ggda_stem"):
        OmegaConf.register_new_resolver("ggda_stem", _stem)
    if not OmegaConf.has_resolver("ggda_variant"):
        OmegaConf.register_new_resolver("ggda_variant", _variant)
    if not OmegaConf.has_resolver("ggda_dirname"):
        OmegaConf.register_new_resolver("ggda_dirname", _dirname)
    if not OmegaConf.has_resolver("ggda_presentation_overrides"):
        OmegaConf.register_new_resolver("ggda_presentation_overrides", presentation_overrides)


register_resolvers()
