"""Bad input, everywhere: ``raphael-train``, ``raphael-sample``, ``raphael-convert``, ``raphael-data`` and
``raphael-eval`` answer bad arguments, bad config values, missing / empty / wrong folders and corrupt files
(safetensors, .pth, config.json, tokenizer, images, statistics, feature nets) with exit status 2, a last
stderr line that names the problem, no traceback (``--debug`` shows it), and nothing created, changed or
removed anywhere (docs/RELIABILITY.md, bad-input catalogue). Every case fails before any model is built.

All cases go through :func:`refused`, which builds the same folder of good and bad inputs under
``tmp_path`` (:func:`make_inputs`), fills ``{placeholders}`` in the arguments, runs the command and compares
the whole tree before and after.
"""
import hashlib
import importlib
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from raphael_jax.cli import train as train_cli
from raphael_jax.convert.safetensors_io import ConversionError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY = os.path.join(ROOT, "configs", "tiny.py")
AFILE_TEXT = "not a run"


# ------------------------------------------------------------------------------------------ shared setup

def _safetensors_bytes(tensors: dict, data: bytes) -> bytes:
    header = json.dumps(tensors).encode()
    return struct.pack("<Q", len(header)) + header + data


def make_inputs(tmp) -> dict:
    """Writes every input the cases refer to under ``tmp`` and returns ``{placeholder: path}``."""
    def folder(name, files=()):
        d = tmp / name
        d.mkdir()
        for fname, content in dict(files).items():
            (d / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
        return d

    png = tmp / "good.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(png)
    good_png = png.read_bytes()
    png.unlink()
    truncated = _safetensors_bytes({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 10)
    vocab = json.dumps({"a</w>": 0, "b</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3})
    (tmp / "afile").write_text(AFILE_TEXT)
    (tmp / "stats.npz").write_bytes(b"existing statistics")
    (tmp / "net.safetensors").write_bytes(b"an existing feature net")
    (tmp / "bad.pth").write_bytes(b"\x80\x02 not a torch zip file")
    paths = {
        "tmp": tmp, "afile": tmp / "afile", "stats_npz": tmp / "stats.npz", "net": tmp / "net.safetensors",
        "bad_pth": tmp / "bad.pth",
        "empty": folder("empty"),
        "full": folder("full", {"keep.txt": "keep me"}),  # an existing, non-empty output folder
        "run_empty": folder("run_empty"),  # a run folder whose checkpoints/ is empty
        "st_garbage": folder("st_garbage", {"config.json": "{}", "model.safetensors": b"garbage, not safetensors"}),
        "st_truncated": folder("st_truncated", {"config.json": "{}", "diffusion_pytorch_model.safetensors": truncated}),
        "no_config": folder("no_config", {"model.safetensors": truncated}),
        "bad_config": folder("bad_config", {"config.json": '{"hidden_size": 1', "model.safetensors": truncated}),
        "images_ok": folder("images_ok", {"a.png": good_png, "a.txt": "a red circle"}),
        "images_bad": folder("images_bad", {"bad.png": b"\x89PNG garbage", "bad.txt": "a broken image"}),
        "tok_bad_vocab": folder("tok_bad_vocab", {"vocab.json": '{"a</w>": 0, "b</w', "merges.txt": "#version\na b\n"}),
        "tok_bad_merges": folder("tok_bad_merges", {"vocab.json": vocab, "merges.txt": "#version\na b\n\x00 b c\n"}),
        "tok_no_merges": folder("tok_no_merges", {"vocab.json": vocab}),
    }
    (paths["run_empty"] / "checkpoints").mkdir()
    return {k: str(v) for k, v in paths.items()}


def tree(root) -> dict:
    """``{relative path: sha1 of the file, or "dir"}`` of everything under ``root``."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = "dir"
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha1(f.read()).hexdigest()
    return out


def fill(argv, paths, defaults=None) -> list[str]:
    """``argv`` with ``{placeholders}`` filled, plus each ``defaults`` flag it does not give."""
    argv = [a.format_map(paths) for a in argv]
    for flag, value in (defaults or {}).items():
        if flag not in argv:
            argv += [flag, value.format_map(paths)]
    return argv


def run_main(main, argv):
    """``main(argv)``'s exit status, returned or raised as SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def refused(main, argv, expect, tmp_path, capsys, *, prog, defaults=None, one_line=False) -> list[str]:
    """Runs ``main`` on ``argv`` over :func:`make_inputs` and asserts a clean refusal: exit status 2, ``expect``
    in the last stderr line (which starts with ``prog`` and says ``error:``), no traceback, and the tree under
    ``tmp_path`` (the inputs, the existing output and run folders) exactly as before; with ``one_line``,
    stderr is that one line. Returns stderr's lines."""
    argv = fill(argv, make_inputs(tmp_path), defaults)
    before = tree(tmp_path)
    capsys.readouterr()
    code = run_main(main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert "Traceback" not in err and lines, err
    assert lines[-1].startswith(prog) and ": error: " in lines[-1] and expect in lines[-1], lines[-1]
    assert sum(": error: " in line for line in lines) == 1, lines  # one error line (argparse adds its usage)
    if one_line:
        assert len(lines) == 1, lines
    assert tree(tmp_path) == before  # nothing created, changed or removed
    return lines


def main_of(command: str):
    return importlib.import_module(f"raphael_jax.cli.{command}").main


# ---------------------------------------------------------------------------------------- raphael-train

CASES = {
    "missing config file": (["--config", "configs/nope.py"], "config file not found"),
    "unknown variant": (["--config", TINY + ":nosuch"], "unknown config variant 'nosuch'"),
    "unknown key": (["--set", "model.nope=1"], "unknown config key 'model.nope'"),
    "override without =": (["--set", "train.batch_size"], "is not of the form key.sub=value"),
    "wrong type": (["--set", "train.batch_size=abc"], "train.batch_size takes a int"),
    "bad choice": (["--set", "model.attention=splash"], "model.attention='splash': must be one of"),
    "negative batch": (["--set", "train.batch_size=-4"], "train.batch_size"),
    "zero nonfinite limit": (["--set", "train.max_nonfinite_steps=0"], "train.max_nonfinite_steps"),
    "workdir is a file": (["--workdir", "{afile}"], "is a file, not a run folder"),
    "workdir under a file": (["--workdir", "{afile}/run"], "is a file, so the run folder cannot be created"),
    "LoRA without a base run": (["--set", "lora.rank=4"], "lora.rank=4: needs train.init_from"),
    "LoRA target unknown": (["--set", "lora.targets=('mlp',)"], "lora.targets=('mlp',): must be a non-empty tuple"),
    "ControlNet and LoRA at once": (["--set", "control.enabled=True", "--set", "lora.rank=2", "--set",
                                     "train.init_from=runs/tiny"], "train a ControlNet and LoRA adapters in separate"),
    "subject of an unknown kind": (["--set", "data.subject.kind=star"], "data.subject.kind='star': must be one of"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_one_line_exit_2(name, tmp_path, capsys):
    argv, expect = CASES[name]
    refused(train_cli.main, argv, expect, tmp_path, capsys, prog="raphael-train: error: ", one_line=True,
            defaults={"--workdir": "{tmp}/run", "--config": TINY})


def test_bad_steps_flag_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--workdir", str(tmp_path / "run"), "--steps", "0"])
    assert e.value.code == 2 and "--steps must be a positive step number" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(KeyError, match="model.nope"):
        train_cli.main(["--workdir", str(tmp_path / "run"), "--set", "model.nope=1", "--debug"])


# --- raphael-sample: refused before any weight is read --------------------------------------------------

SAMPLE_CASES = {
    "zero images": (["--num", "0"], "--num must be at least 1"),
    "zero batch": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "zero steps": (["--steps", "0"], "--steps must be at least 1"),
    "control scale without control": (["--control-scale", "0.5"], "--control-map / --control-scale need --control"),
    "negative control scale": (["--control", "{afile}", "--control-scale", "-1"], "--control-scale must be >= 0"),
    "empty prompt": (["--prompt", "  "], "--prompt must not be empty"),
    "out is a file": (["--out", "{afile}"], "is a file, not a folder"),
    "no such workdir": (["--workdir", "{tmp}/nope"], "holds no checkpoints"),
    "empty workdir": (["--workdir", "{empty}"], "holds no checkpoints"),
    "workdir is a file": (["--workdir", "{afile}"], "holds no checkpoints"),
    "empty checkpoints folder": (["--workdir", "{run_empty}"], "holds no checkpoint"),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_CASES))
def test_sample_bad_input_exit_2(name, tmp_path, capsys):
    from raphael_jax.cli import sample as sample_cli

    argv, expect = SAMPLE_CASES[name]
    refused(sample_cli.main, argv, expect, tmp_path, capsys, prog="raphael-sample",
            defaults={"--workdir": "{empty}", "--prompt": "a red circle", "--out": "{tmp}/out"})


# --- raphael-convert, raphael-data, raphael-eval: (command, argv, what the last line says) ----------------

FID = ["--weights", "{st_garbage}/model.safetensors"]
OTHER_CASES = {
    # raphael-convert: corrupt or missing sources, outputs that exist
    "convert clip: garbage model.safetensors": (
        "convert", ["clip", "{st_garbage}", "{tmp}/out"], "model.safetensors is not a safetensors file"),
    "convert vae: truncated safetensors": (
        "convert", ["vae", "{st_truncated}", "{tmp}/out"], "(truncated or corrupt? its tensors need"),
    "convert clip: no config.json": ("convert", ["clip", "{no_config}", "{tmp}/out"], "no config.json"),
    "convert vae: config.json is not JSON": (
        "convert", ["vae", "{bad_config}", "{tmp}/out"], "config.json is not valid JSON"),
    "convert clip: no such source": ("convert", ["clip", "{tmp}/nope", "{tmp}/out"], "nope: no such folder"),
    "convert clip: non-empty output": (
        "convert", ["clip", "{st_garbage}", "{full}"], "exists and is not an empty directory"),
    "convert inception: no such .pth": (
        "convert", ["inception", "{tmp}/nope.pth", "{tmp}/fid.safetensors"], "nope.pth: no such file (download"),
    "convert inception: corrupt .pth": (
        "convert", ["inception", "{bad_pth}", "{tmp}/fid.safetensors"], "bad.pth is not a PyTorch weights file"),
    "convert inception: output exists": (
        "convert", ["inception", "{bad_pth}", "{afile}"], "afile exists; refusing to overwrite"),
    "convert esrgan: no such .pth": (
        "convert", ["esrgan", "{tmp}/nope.pth", "{tmp}/x4.safetensors"], "nope.pth: no such file (download"),
    "convert esrgan: corrupt .pth": (
        "convert", ["esrgan", "{bad_pth}", "{tmp}/x4.safetensors"], "bad.pth is not a PyTorch weights file"),
    "convert esrgan: output exists": (
        "convert", ["esrgan", "{bad_pth}", "{net}"], "net.safetensors exists; refusing to overwrite"),
    "convert esrgan: output not .safetensors": (
        "convert", ["esrgan", "{bad_pth}", "{tmp}/x4.pth"], "the output must be a new .safetensors file"),
    # raphael-upscale: missing / corrupt images and weights, outputs that exist, bad tiles
    "upscale: no such input": (
        "upscale", ["{tmp}/nope.png", "{tmp}/out.png", "--weights", "{net}"], "nope.png does not exist"),
    "upscale: output exists": (
        "upscale", ["{images_ok}/a.png", "{afile}", "--weights", "{net}"], "afile exists; refusing to overwrite"),
    "upscale: output folder not empty": (
        "upscale", ["{images_ok}", "{full}", "--weights", "{net}"], "is not an empty folder; refusing"),
    "upscale: folder without images": (
        "upscale", ["{empty}", "{tmp}/out", "--weights", "{net}"], "holds no images"),
    "upscale: corrupt image": (
        "upscale", ["{images_bad}/bad.png", "{tmp}/out.png", "--weights", "{net}"], "bad.png is not a readable image"),
    "upscale: corrupt weights": (
        "upscale", ["{images_ok}/a.png", "{tmp}/out.png", "--weights", "{st_garbage}/model.safetensors"],
        "model.safetensors is not a safetensors file"),
    "upscale: unknown output type": (
        "upscale", ["{images_ok}/a.png", "{tmp}/out.tif", "--weights", "{net}"], "unknown image type '.tif'"),
    "upscale: tile within twice the halo": (
        "upscale", ["{images_ok}/a.png", "{tmp}/out.png", "--weights", "{net}", "--tile", "32", "--halo", "16"],
        "must exceed 2 x --halo"),
    # raphael-train-upscaler: bad config values, a workdir that is a file, a missing init_from
    "train-upscaler: bad degradation": (
        "train_upscaler", ["--workdir", "{tmp}/sr", "--set", "data.degradation=jpeg"],
        "data.degradation='jpeg': must be 'realesrgan' or 'clean'"),
    "train-upscaler: bad perceptual net": (
        "train_upscaler", ["--workdir", "{tmp}/sr", "--set", "loss.perceptual_net=alexnet"],
        "loss.perceptual_net='alexnet': expected 'vgg19:PATH"),
    "train-upscaler: workdir is a file": (
        "train_upscaler", ["--workdir", "{afile}"], "is a file, not a folder"),
    "train-upscaler: no such init_from": (
        "train_upscaler", ["--workdir", "{tmp}/sr", "--set", "train.init_from={tmp}/nope.safetensors"],
        "nope.safetensors: no such file"),
    # raphael-eval upscale / raphael-sample --upscale
    "eval upscale: corrupt weights": (
        "eval", ["upscale", "--weights", "{st_garbage}/model.safetensors"], "is not a safetensors file"),
    "eval upscale: result not .json": (
        "eval", ["upscale", "--weights", "{net}", "--out", "{stats_npz}"], "the output must be a .json file"),
    "sample --upscale-tile within twice the halo": (
        "sample", ["--workdir", "{run_empty}", "--prompt", "a red circle", "--out", "{tmp}/o", "--upscale", "{net}",
                   "--upscale-tile", "16"], "--upscale-tile must exceed 32"),
    "sample --upscale: corrupt weights": (
        "sample", ["--workdir", "{run_empty}", "--prompt", "a red circle", "--out", "{tmp}/o", "--upscale",
                   "{st_garbage}/model.safetensors"], "model.safetensors is not a safetensors file"),
    # raphael-data: missing / empty / corrupt sources, bad buckets, folders that are files or not empty
    "data image-text: no such source": (
        "data", ["image-text", "{tmp}/nope", "--data-dir", "{tmp}/tfds"], "nope' does not exist"),
    "data image-text: empty source": (
        "data", ["image-text", "{empty}", "--data-dir", "{tmp}/tfds"], "no images in"),
    "data image-text: only corrupt images": (
        "data", ["image-text", "{images_bad}", "--data-dir", "{tmp}/tfds", "--buckets", "32x32"],
        "bad.png (UnidentifiedImageError"),
    "data image-text: malformed --buckets": (
        "data", ["image-text", "{images_ok}", "--data-dir", "{tmp}/tfds", "--buckets", "64by64"], "expected HxW"),
    "data image-text: zero-sized bucket": (
        "data", ["image-text", "{images_ok}", "--data-dir", "{tmp}/tfds", "--buckets", "0x64"], "positive ints"),
    "data image-text: data dir is a file": (
        "data", ["image-text", "{images_ok}", "--data-dir", "{afile}"], "afile is a file, not a folder"),
    "data shapes-folder: non-empty output": (
        "data", ["shapes-folder", "{full}", "--num", "2"], "exists and is not an empty directory"),
    "data shapes-folder: zero examples": (
        "data", ["shapes-folder", "{tmp}/shapes", "--num", "0"], "num must be an int >= 1"),
    # raphael-eval: folders that are no run, bad subcommand arguments, corrupt weights / tokenizers
    "eval alignment: no such workdir": (
        "eval", ["alignment", "--workdir", "{tmp}/nope"], "holds no checkpoints (does not exist)"),
    "eval alignment: empty workdir": (
        "eval", ["alignment", "--workdir", "{empty}"], "holds no checkpoints (no checkpoints/ folder)"),
    "eval alignment: four objects": (
        "eval", ["alignment", "--workdir", "{empty}", "--objects", "1,4"], "1 to 3 objects per scene"),
    "eval alignment: --set outside sample.*": (
        "eval", ["alignment", "--workdir", "{empty}", "--set", "train.lr=1"], "only overrides sample.*"),
    "eval probe: bad --timesteps": (
        "eval", ["probe", "--workdir", "{empty}", "--timesteps", "900,late"], "--timesteps must be comma-separated"),
    "eval probe: workdir is a file": ("eval", ["probe", "--workdir", "{afile}"], "holds no checkpoints (is a file)"),
    "eval fid stats: no such weights": (
        "eval", ["fid", "stats", "{images_ok}", "{tmp}/new.npz", "--weights", "{tmp}/nope.safetensors"],
        "nope.safetensors: no such file"),
    "eval fid stats: corrupt weights": (
        "eval", ["fid", "stats", "{images_ok}", "{tmp}/new.npz", *FID], "model.safetensors is not a safetensors file"),
    "eval fid stats: output exists": (
        "eval", ["fid", "stats", "{images_ok}", "{stats_npz}", *FID], "stats.npz exists; refusing to overwrite"),
    "eval fid distance: no such folder": (
        "eval", ["fid", "distance", "{tmp}/nope", "{stats_npz}", *FID], "nope: no such folder of images"),
    "eval sfd score: corrupt feature net": (
        "eval", ["sfd", "score", "--net", "{st_garbage}/model.safetensors", "--workdir", "{run_empty}"],
        "model.safetensors is not a safetensors file"),
    "eval sfd train: output exists": (
        "eval", ["sfd", "train", "--out", "{net}"], "net.safetensors exists; refusing to overwrite"),
    "eval clip-score: corrupt vocab.json": (
        "eval", ["clip-score", "{images_ok}", "--clip-model", "{empty}", "--tokenizer", "{tok_bad_vocab}"],
        "vocab.json is not a CLIP vocabulary (truncated or corrupt?"),
    "eval clip-score: corrupt merges.txt": (
        "eval", ["clip-score", "{images_ok}", "--clip-model", "{empty}", "--tokenizer", "{tok_bad_merges}"],
        "merges.txt:3: '\\x00 b c' is not a BPE merge"),
    "eval clip-score: tokenizer without merges.txt": (
        "eval", ["clip-score", "{images_ok}", "--clip-model", "{tok_no_merges}"], "lacks merges.txt"),
    "eval coco-fid: no such workdir": (
        "eval", ["coco-fid", "--workdir", "{tmp}/nope", "--annotations", "{afile}", "--ref-stats", "{stats_npz}",
                 "--inception-weights", "{st_garbage}/model.safetensors"], "holds no checkpoints (does not exist)"),
}


@pytest.mark.parametrize("name", sorted(OTHER_CASES))
def test_commands_refuse_bad_input(name, tmp_path, capsys):
    command, argv, expect = OTHER_CASES[name]
    refused(main_of(command), argv, expect, tmp_path, capsys, prog=f"raphael-{command.replace('_', '-')}")


def test_at_least_thirty_cases():
    assert len(CASES) + len(SAMPLE_CASES) + len(OTHER_CASES) >= 30


# --- --debug: the traceback instead of the one line (before or after the subcommand) ---------------------

DEBUG_CASES = {
    "convert": (["clip", "{st_garbage}", "{tmp}/out", "--debug"], ConversionError, "not a safetensors file"),
    "data": (["--debug", "image-text", "{tmp}/nope", "--data-dir", "{tmp}/tfds"], FileNotFoundError,
             "does not exist"),
    "eval": (["fid", "stats", "{images_ok}", "{tmp}/new.npz", *FID, "--debug"], ConversionError,
             "not a safetensors file"),
    "sample": (["--workdir", "{empty}", "--prompt", "a red circle", "--out", "{tmp}/out", "--debug"],
               FileNotFoundError, "holds no checkpoints"),
}


@pytest.mark.parametrize("command", sorted(DEBUG_CASES))
def test_debug_raises_instead_of_one_line(command, tmp_path, capsys):
    argv, kind, expect = DEBUG_CASES[command]
    argv = fill(argv, make_inputs(tmp_path))
    before = tree(tmp_path)
    with pytest.raises(kind, match=expect):
        main_of(command)(argv)
    assert ": error: " not in capsys.readouterr().err
    assert tree(tmp_path) == before


# --- a corrupt image among good ones is skipped, counted in the stats and named in a warning -------------

def test_corrupt_image_among_good_ones_is_skipped_and_named(tmp_path, capsys):
    make_inputs(tmp_path)
    src = tmp_path / "images_ok"
    (src / "broken.png").write_bytes(b"\x89PNG truncated")
    (src / "broken.txt").write_text("a broken image")
    sources = tree(src)
    code = run_main(main_of("data"), ["image-text", str(src), "--data-dir", str(tmp_path / "tfds"), "--buckets",
                                      "32x32", "--edge-source", "none", "--name", "mixed"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "'kept': 1" in out and "'unreadable': 1" in out, out
    warning = err.strip().splitlines()[-1]
    assert warning.startswith("raphael-data: warning: skipped 1 unreadable image(s)") and "Traceback" not in err
    assert f"{src / 'broken.png'} (UnidentifiedImageError" in warning, warning
    assert tree(src) == sources  # the sources are read, never written
