"""The import contract: which ggda package may import which, and where Lightning/Hydra live.

Every module under ``ggda/`` is parsed with ``ast`` (nothing is imported), so a violation
anywhere (also inside a function or under ``TYPE_CHECKING``) fails here with the module,
the line and the rule. The table below is the contract; docs/architecture.md shows the same
table and :func:`test_architecture_doc_shows_this_table` keeps the two equal.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ggda"

# Layer -> the ggda packages (first-level subpackage or top-level module) in it. A package
# may import packages of strictly lower layers only: no sideways or upward edges, so the
# package graph has no cycles.
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("errors", "faults", "config", "cluster", "procs"),
    1: ("io",),
    2: ("models", "data", "tracking"),
    3: ("gradients",),
    4: ("grouping",),
    5: ("attribution",),
    6: ("evaluation",),
    7: ("stages", "report", "lds"),
    8: ("lightning",),
    9: ("pipeline", "cli"),
}
RANK = {pkg: layer for layer, pkgs in LAYERS.items() for pkg in pkgs}

# Frameworks confined to the adapter and the build site.
FRAMEWORKS = ("pytorch_lightning", "lightning", "lightning_fabric", "hydra")
FRAMEWORK_USERS = ("lightning", "pipeline", "cli")

# Edges that break the contract today and are being removed on another branch; each entry is
# (importing module, imported module). An entry that no longer occurs fails the test, so
# the list cannot go stale.
PENDING: set[tuple[str, str]] = set()


def _modules() -> list[tuple[str, Path]]:
    out = []
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, f))
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Absolute names of every module imported by ``path`` (any scope), with line numbers."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            # `from ggda.x import y` may name a submodule y: count it as imported too
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return out


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "ggda" and len(parts) > 1 else None


def _existing(module: str) -> bool:
    rel = Path(*module.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def test_every_package_has_a_layer():
    units = {_unit(name) for name, _ in _modules()} - {None}
    missing = sorted(units - RANK.keys())
    assert not missing, (
        f"ggda packages {missing} are not in the layer table: add them to LAYERS in "
        "tests/test_imports.py and to the table in docs/architecture.md"
    )


def test_imports_follow_the_layers():
    bad, seen_pending = [], set()
    for name, path in _modules():
        src = _unit(name)
        if src is None:  # ggda/__init__.py
            continue
        for mod, line in _imports(name, path):
            dst = _unit(mod)
            if dst is None or dst == src or not _existing(mod):
                continue
            if (name, mod) in PENDING:
                seen_pending.add((name, mod))
                continue
            if dst not in RANK or RANK[dst] >= RANK[src]:
                bad.append(
                    f"{path.relative_to(ROOT)}:{line} ggda.{src} (layer {RANK[src]}) imports "
                    f"{mod} (layer {RANK.get(dst, '?')}): only lower layers may be imported"
                )
    assert not bad, "\n".join(bad)
    stale = PENDING - seen_pending
    assert not stale, f"PENDING lists edges that are gone; delete them: {sorted(stale)}"


def test_frameworks_only_in_the_adapter_and_the_build_site():
    bad = []
    for name, path in _modules():
        if _unit(name) in FRAMEWORK_USERS:
            continue
        for mod, line in _imports(name, path):
            if mod.split(".")[0] in FRAMEWORKS:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "Lightning/Hydra outside ggda.lightning and ggda.pipeline:\n" + "\n".join(bad)


def test_library_loads_without_lightning_or_hydra():
    code = (
        "import sys; import ggda.attribution, ggda.grouping, ggda.evaluation, ggda.data, "
        "ggda.models; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{FRAMEWORKS!r}); print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, f"the library imported {res.stdout.strip()} {res.stderr[-2000:]}"


def test_the_adapter_is_what_loads_lightning():
    """The check above can fail: importing the adapter does pull Lightning in."""
    code = "import sys, ggda.lightning; sys.exit(0 if 'pytorch_lightning' in sys.modules else 1)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_violation_is_reported(tmp_path, monkeypatch):
    """The checker itself: an upward import in a scratch package is caught."""
    pkg = tmp_path / "ggda"
    (pkg / "models").mkdir(parents=True)
    (pkg / "evaluation").mkdir()
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "evaluation" / "__init__.py").write_text("")
    (pkg / "evaluation" / "lds.py").write_text("")
    (pkg / "models" / "bad.py").write_text("def f():\n    from ..evaluation import lds\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    monkeypatch.setattr(sys.modules[__name__], "PENDING", set())
    with pytest.raises(AssertionError, match=r"ggda.models \(layer 2\) imports ggda.evaluation"):
        test_imports_follow_the_layers()


def test_architecture_doc_shows_this_table():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|([^|]+)\|", doc, flags=re.M)
    table = {int(layer): tuple(re.findall(r"`ggda\.(\w+)`", pkgs)) for layer, pkgs in rows}
    assert table == LAYERS, "docs/architecture.md's layer table differs from LAYERS"
