"""The package's layers point one way (README "Layout"): a module imports only from its own layer or below.

Every ``import raphael_jax...`` / ``from raphael_jax... import`` in the package, at module level or
inside a function, is checked; a lazy import inside a function is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raphael_jax"

# Low to high. ``parallel`` sits below ``models`` (the MoE layers call expert parallelism) and knows
# no model; ``config`` sits above ``data`` (``validate`` checks values against the registries of the
# layers below: edge sources, schedules, mesh axes) and below everything that loads a config;
# ``sampling`` sits below ``train`` (the trainer's previews use the Sampler, and the Sampler is
# built from a ``train.checkpoint.Run`` it never imports). ``root`` is ``raphael_jax/__init__.py``.
LAYERS = ["root", "parallel", "models", "diffusion", "data", "config", "convert", "sampling", "train",
          "evaluation", "analysis", "tools", "cli"]

# Sub-packages of one layer that must not import each other.
SIBLINGS_APART = [("data.shapes", "data.real")]


def layer_of(module: str) -> str:
    """``raphael_jax.data.shapes.world`` -> ``data``; the package root is ``root`` (lowest)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: not in a known layer {LAYERS}; add it to README 'Layout' and LAYERS")
    return parts[1]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    pkg = module_name(path, root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "raphael_jax"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = pkg.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "raphael_jax":
                found.append((node.lineno, name))
    return found


def upward_imports(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        mine = LAYERS.index(layer_of(me))
        for line, target in imports_of(path, root):
            if LAYERS.index(layer_of(target)) > mine:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {me} ({layer_of(me)}) imports "
                           f"{target} ({layer_of(target)})")
            for a, b in SIBLINGS_APART:
                for x, y in ((a, b), (b, a)):
                    if me.startswith(f"raphael_jax.{x}") and target.startswith(f"raphael_jax.{y}"):
                        bad.append(f"{path.relative_to(root.parent)}:{line}: {me} imports {target} "
                                   f"({x} and {y} stay apart)")
    return bad


def test_layers_point_one_way():
    bad = upward_imports()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_parallel_knows_no_model_trainer_or_sampler():
    bad = [f"{p.name}: {t}" for p in (PACKAGE / "parallel").rglob("*.py") for _, t in imports_of(p)
           if t.startswith(("raphael_jax.models", "raphael_jax.train", "raphael_jax.sampling"))]
    assert not bad


@pytest.mark.parametrize("source, expect", [
    # a model importing the trainer (lazily, inside a function) is caught
    ("def f():\n    from raphael_jax.train.step import make_train_step\n", "imports raphael_jax.train.step"),
    ("import raphael_jax.cli.train\n", "imports raphael_jax.cli.train"),
    ("from ..sampling import Sampler\n", "imports raphael_jax.sampling"),
])
def test_checker_catches_an_upward_import(tmp_path, source, expect):
    pkg = tmp_path / "raphael_jax"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "bad.py").write_text(source)
    bad = upward_imports(pkg)
    assert len(bad) == 1 and expect in bad[0]


def test_checker_catches_shapes_importing_real(tmp_path):
    pkg = tmp_path / "raphael_jax"
    (pkg / "data" / "shapes").mkdir(parents=True)
    (pkg / "data" / "shapes" / "x.py").write_text("from raphael_jax.data.real.sources import load_image\n")
    bad = upward_imports(pkg)
    assert len(bad) == 1 and "stay apart" in bad[0]
