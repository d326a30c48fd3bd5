"""``raphael-train`` and ``raphael-sample`` answer bad input with exit status 2, one error line, no traceback,
and write nothing (docs/RELIABILITY.md, bad-input catalogue). Every case fails before any model is built."""
import os

import pytest

from raphael_jax.cli import train as train_cli

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY = os.path.join(ROOT, "configs", "tiny.py")

CASES = {
    "missing config file": (["--config", "configs/nope.py"], "config file not found"),
    "unknown variant": (["--config", TINY + ":nosuch"], "unknown config variant 'nosuch'"),
    "unknown key": (["--set", "model.nope=1"], "unknown config key 'model.nope'"),
    "override without =": (["--set", "train.batch_size"], "is not of the form key.sub=value"),
    "wrong type": (["--set", "train.batch_size=abc"], "train.batch_size takes a int"),
    "bad choice": (["--set", "model.attention=splash"], "model.attention='splash': must be one of"),
    "negative batch": (["--set", "train.batch_size=-4"], "train.batch_size"),
    "zero nonfinite limit": (["--set", "train.max_nonfinite_steps=0"], "train.max_nonfinite_steps"),
    "workdir is a file": (["--workdir", "{file}"], "is a file, not a run folder"),
    "workdir under a file": (["--workdir", "{file}/run"], "is a file, so the run folder cannot be created"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_one_line_exit_2(name, tmp_path, capsys):
    argv, expect = CASES[name]
    afile = tmp_path / "afile"
    afile.write_text("not a run")
    argv = [a.replace("{file}", str(afile)) for a in argv]
    if "--workdir" not in argv:
        argv = argv + ["--workdir", str(tmp_path / "run")]
    if "--config" not in argv:
        argv = ["--config", TINY] + argv
    before = sorted(os.listdir(tmp_path))
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raphael-train: error: ") and expect in err[0], err
    assert sorted(os.listdir(tmp_path)) == before  # nothing created or removed
    assert afile.read_text() == "not a run"


def test_bad_steps_flag_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--workdir", str(tmp_path / "run"), "--steps", "0"])
    assert e.value.code == 2 and "--steps must be a positive step number" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(KeyError, match="model.nope"):
        train_cli.main(["--workdir", str(tmp_path / "run"), "--set", "model.nope=1", "--debug"])


# --- raphael-sample: refused before any weight is read (argparse's usage line + one error line, exit 2) ----

SAMPLE_CASES = {
    "zero images": (["--num", "0"], "--num must be at least 1"),
    "zero batch": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "zero steps": (["--steps", "0"], "--steps must be at least 1"),
    "empty prompt": (["--prompt", "  "], "--prompt must not be empty"),
    "out is a file": (["--out", "{file}"], "is a file, not a folder"),
    "no such workdir": (["--workdir", "{tmp}/nope"], "holds no checkpoints"),
    "empty workdir": (["--workdir", "{tmp}/empty"], "holds no checkpoints"),
    "workdir is a file": (["--workdir", "{file}"], "holds no checkpoints"),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_CASES))
def test_sample_bad_input_exit_2(name, tmp_path, capsys):
    from raphael_jax.cli import sample as sample_cli

    argv, expect = SAMPLE_CASES[name]
    afile = tmp_path / "afile"
    afile.write_text("not an image folder")
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{file}", str(afile)).replace("{tmp}", str(tmp_path)) for a in argv]
    base = {"--workdir": str(tmp_path / "empty"), "--prompt": "a red circle", "--out": str(tmp_path / "out")}
    for flag, value in base.items():
        if flag not in argv:
            argv = argv + [flag, value]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        sample_cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expect in err.strip().splitlines()[-1], err
    assert sorted(os.listdir(tmp_path)) == before and afile.read_text() == "not an image folder"
