"""The commands live in one place: every console script of setup.py is a ``raphael_jax.cli`` module whose
``main(argv)`` answers ``--help`` (and every subcommand's ``--help``) with exit status 0; bad arguments
exit with argparse's status 2; no module outside ``raphael_jax/cli/`` parses arguments or defines ``main``."""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "raphael_jax"
CLI = PACKAGE / "cli"


def console_scripts(setup_py: Path = ROOT / "setup.py") -> dict[str, str]:
    """``{name: "module:function"}`` of setup.py's ``entry_points["console_scripts"]`` (read with ast)."""
    tree = ast.parse(setup_py.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            eps = ast.literal_eval(node.value)
            return dict(s.replace(" ", "").split("=", 1) for s in eps["console_scripts"])
    raise AssertionError(f"{setup_py}: no entry_points")


SCRIPTS = console_scripts()


def _main_of(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _parser_of(main) -> argparse.ArgumentParser:
    """The ArgumentParser that ``main`` builds (captured at its first ``parse_args``, which is not run)."""
    seen = []

    class Stop(Exception):
        pass

    def capture(self, *a, **k):
        seen.append(self)
        raise Stop

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), contextlib.suppress(Stop):
        main(["--help"])
    assert seen, "main() never called ArgumentParser.parse_args"
    return seen[0]


def _subcommand_paths(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out += _subcommand_paths(sub, (*prefix, name))
    return out


def test_every_console_script_is_a_cli_module():
    assert len(SCRIPTS) >= 10
    modules = {t.partition(":")[0] for t in SCRIPTS.values()}
    for name, target in SCRIPTS.items():
        module, _, func = target.partition(":")
        assert name.startswith("raphael-") and module.startswith("raphael_jax.cli.") and func == "main", target
        assert callable(_main_of(target)), target
    # and every module in raphael_jax/cli/ is a registered command
    files = {f"raphael_jax.cli.{p.stem}" for p in CLI.glob("*.py") if p.name != "__init__.py"}
    assert files == modules, (files ^ modules)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_exits_zero(name, capsys):
    main = _main_of(SCRIPTS[name])
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
    for path in _subcommand_paths(_parser_of(main)):
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0, (name, path)
        assert "usage:" in capsys.readouterr().out


def test_subcommands():
    def subs(name):
        return set(_subcommand_paths(_parser_of(_main_of(SCRIPTS[name]))))

    assert {("alignment",), ("subject",), ("control",), ("report",), ("upscale",), ("probe",), ("fid",),
            ("fid", "stats"),
            ("fid", "distance"), ("coco-fid",), ("sfd",), ("sfd", "train"), ("sfd", "score"),
            ("clip-score",)} == subs("raphael-eval")
    assert {("clip",), ("vae",), ("inception",), ("esrgan",)} == subs("raphael-convert")
    assert {("image-text",), ("shapes",), ("shapes-folder",)} == subs("raphael-data")


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")), ids=lambda p: p.name)
def test_runs_as_python_module(path):
    """``python -m raphael_jax.cli.<name>``: a ``if __name__ == "__main__": raise SystemExit(main())`` block."""
    if path.name == "__init__.py":
        return
    tree = ast.parse(path.read_text())
    blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert blocks and "raise SystemExit(main())" in ast.unparse(blocks[0]), path


@pytest.mark.parametrize("name, argv, message", [
    ("raphael-sample", ["--workdir", "w", "--prompt", "x", "--num", "0", "--out", "o"], "--num must be at least 1"),
    ("raphael-sample", ["--workdir", "w", "--prompt", " ", "--out", "o"], "--prompt must not be empty"),
    ("raphael-params", [], "give --config FILE or --all"),
    ("raphael-ablate", ["--root", "r", "--objects", "1,4"], "1 to 3 objects"),
    ("raphael-ablate", ["--root", "r", "--guidance", "x"], "comma-separated numbers"),
    ("raphael-eval", ["coco-fid", "--inception-weights", "w", "--annotations", "a"], "give --sampler (or --workdir)"),
    ("raphael-eval", ["coco-fid", "--inception-weights", "w", "--sampler", "noise"], "give --annotations"),
    ("raphael-eval", ["coco-fid", "--inception-weights", "w", "--sampler", "noise", "--annotations", "a"],
     "no reference"),
    ("raphael-eval", ["clip-score", "/no/such/folder", "--clip-model", "m"], "no such folder"),
    ("raphael-data", ["shapes", "--data-dir", "d", "--min-objects", "3", "--max-objects", "1"], "min_objects"),
    ("raphael-convert", ["clip", "src"], "required"),
])
def test_bad_arguments_exit_2(name, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _main_of(SCRIPTS[name])(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_data_shapes_builds_the_splits(tmp_path, capsys):
    from raphael_jax.data.shapes.tfds import load_shapes_split

    main = _main_of(SCRIPTS["raphael-data"])
    argv = ["shapes", "--data-dir", str(tmp_path), "--num-train", "6", "--num-test", "2", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "s32_o1-3_n6-2_seed3" in out and "'train': 6" in out and "'test': 2" in out
    kw = dict(image_size=32, num_train=6, num_test=2, seed=3)
    train, test = load_shapes_split(tmp_path, "train", **kw), load_shapes_split(tmp_path, "test", **kw)
    assert len(train) == 6 and len(test) == 2
    assert train[0]["image"].shape == (32, 32, 3) and train[0]["image"].dtype == np.uint8
    assert main(argv) == 0  # already built: a no-op


# --------------------------------------------------------------------------- one home for commands

def command_code_outside_cli(package: Path = PACKAGE) -> list[str]:
    """``file:line: what`` for every argparse import (anywhere in a module) and every module-level ``main``
    (function, assignment or import) or ``if __name__ == "__main__"`` block outside ``package/cli/``."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        if rel.parts[1] == "cli":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
                bad.append(f"{rel}:{node.lineno}: imports argparse")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
                bad.append(f"{rel}:{node.lineno}: imports from argparse")
        for node in tree.body:
            names = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.asname or a.name for a in node.names]
            elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                bad.append(f"{rel}:{node.lineno}: an `if __name__ == \"__main__\"` block")
            if "main" in names:
                bad.append(f"{rel}:{node.lineno}: defines a module-level main")
    return bad


def test_no_command_code_outside_cli():
    bad = command_code_outside_cli()
    assert not bad, "commands belong in raphael_jax/cli/:\n" + "\n".join(bad)


def test_the_check_finds_command_code(tmp_path):
    pkg = tmp_path / "raphael_jax"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "lib").mkdir()
    (pkg / "cli" / "ok.py").write_text("import argparse\n\ndef main(argv=None):\n    return 0\n")
    (pkg / "lib" / "clean.py").write_text("def run():\n    def main():\n        pass\n    return main\n")
    (pkg / "lib" / "a.py").write_text("def f():\n    import argparse\n")
    (pkg / "lib" / "b.py").write_text("from argparse import ArgumentParser\n")
    (pkg / "lib" / "c.py").write_text("def main(argv=None):\n    return 0\n")
    (pkg / "lib" / "d.py").write_text("from x import run as main\n")
    (pkg / "e.py").write_text("if __name__ == '__main__':\n    pass\n")
    bad = command_code_outside_cli(pkg)
    assert [b.split(":")[0] for b in bad] == ["raphael_jax/e.py", "raphael_jax/lib/a.py", "raphael_jax/lib/b.py",
                                              "raphael_jax/lib/c.py", "raphael_jax/lib/d.py"], bad
