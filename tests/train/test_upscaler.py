"""The upscaler trainer (raphael_jax/train/upscaler.py): both stages' steps, exact resume, config refusal,
init_from, and the evaluation against bicubic (raphael_jax/evaluation/upscale.py)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from raphael_jax.config import load_config
from raphael_jax.convert.esrgan import save_rrdbnet
from raphael_jax.models.rrdbnet import RRDBNet, RRDBNetConfig
from raphael_jax.train import upscaler

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY = ["model.num_feat=8", "model.num_block=1", "model.num_grow_ch=4", "disc.num_feat=8", "data.hr_size=64",
        "train.batch_size=2", "loss.perceptual_net=random:16", "eval.num=2", "train.num_steps=4",
        "train.pixel_steps=2", "train.checkpoint_every=2", "train.log_every=2"]


def tiny_config(*extra):
    return load_config(os.path.join(ROOT, "configs", "upscaler", "sr_shapes.py"), TINY + list(extra),
                       validator=upscaler.validate_config)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_training_pairs_are_a_function_of_the_step():
    c = tiny_config()
    lr, hr = upscaler.training_pairs(c, 3)
    assert lr.shape == (2, 16, 16, 3) and hr.shape == (2, 64, 64, 3) and lr.dtype == np.float32
    assert 0 <= lr.min() and lr.max() <= 1 and 0 <= hr.min() and hr.max() <= 1
    lr2, hr2 = upscaler.training_pairs(c, 3)
    np.testing.assert_array_equal(lr, lr2)
    np.testing.assert_array_equal(hr, hr2)
    assert not np.array_equal(upscaler.training_pairs(c, 4)[1], hr)


def test_pixel_steps_fit_a_batch():
    c = tiny_config("train.lr_g=2e-3")
    trainer, state = upscaler.build(c)
    lr, hr = (jnp.asarray(a) for a in upscaler.training_pairs(c, 0))
    first = None
    for _ in range(25):
        state, logs = trainer.pixel_step(state, lr, hr)
        first = float(logs["l1"]) if first is None else first
    assert float(logs["l1"]) < 0.8 * first, (first, float(logs["l1"]))
    assert int(state["step"]) == 25


def test_gan_step_updates_generator_discriminator_and_spectral_vectors():
    c = tiny_config()
    trainer, state = upscaler.build(c)
    before = jax.tree.map(np.asarray, state)
    lr, hr = (jnp.asarray(a) for a in upscaler.training_pairs(c, 0))
    state, logs = trainer.gan_step(state, lr, hr)
    assert set(logs) >= {"l1", "perceptual", "gan_g", "loss_g", "loss_d"}
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert float(logs["perceptual"]) > 0
    for key in ("g", "g_ema", "d", "d_sn"):
        changed = [not np.array_equal(a, b) for a, b in zip(leaves(before[key]), leaves(state[key]))]
        assert all(changed) if key == "d_sn" else any(changed), key
    # the pixel-stage optimizer is untouched by a GAN step
    for a, b in zip(leaves(before["opt_pixel"]), leaves(state["opt_pixel"])):
        np.testing.assert_array_equal(a, b)


def test_resume_is_bit_identical(tmp_path):
    c = tiny_config()
    upscaler.train_upscaler(c, str(tmp_path / "once"), log=lambda s: None)
    upscaler.train_upscaler(c, str(tmp_path / "twice"), steps=2, log=lambda s: None)  # stops after the pixel stage
    lines = []
    upscaler.train_upscaler(c, str(tmp_path / "twice"), log=lines.append)
    assert any("resumed" in s and "step 2" in s for s in lines), lines
    a = load_file(str(tmp_path / "once" / upscaler.GENERATOR_FILE))
    b = load_file(str(tmp_path / "twice" / upscaler.GENERATOR_FILE))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    def metrics(run):
        return [json.loads(s) for s in open(tmp_path / run / "metrics.jsonl")]

    last_once, last_twice = metrics("once")[-1], metrics("twice")[-1]
    assert last_once["step"] == last_twice["step"] == 4
    for k in ("loss_g", "loss_d", "l1", "perceptual", "val_psnr"):
        assert last_once[k] == last_twice[k], k


def test_resume_with_another_config_is_refused(tmp_path):
    run = str(tmp_path / "run")
    upscaler.train_upscaler(tiny_config("train.num_steps=2"), run, log=lambda s: None)
    with pytest.raises(ValueError, match=r"another config \(model.num_feat: 8 -> 12"):
        upscaler.train_upscaler(tiny_config("model.num_feat=12", "train.num_steps=3"), run, log=lambda s: None)
    lines = []
    upscaler.train_upscaler(tiny_config("train.num_steps=3"), run, log=lines.append)  # a safe change
    assert any("train.num_steps: 2 -> 3" in s for s in lines), lines


def test_init_from_starts_from_the_file(tmp_path):
    g = RRDBNet(RRDBNetConfig(num_feat=8, num_block=1, num_grow_ch=4), rngs=nnx.Rngs(42))
    path = save_rrdbnet(g, tmp_path / "g.safetensors")
    c = tiny_config()
    _, state = upscaler.build(c, init_from=str(path))
    for a, b in zip(leaves(nnx.state(g)), leaves(state["g"])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="set model.\\* to match"):
        upscaler.build(tiny_config("model.num_feat=12"), init_from=str(path))


def test_evaluation_against_bicubic(tmp_path, capsys):
    from raphael_jax.data.degrade import bicubic_resize
    from raphael_jax.evaluation.upscale import evaluate_upscaler, psnr, test_scenes
    from raphael_jax.models.upscale_tiling import to_uint8

    g = RRDBNet(RRDBNetConfig(num_feat=8, num_block=1, num_grow_ch=4), rngs=nnx.Rngs(0))
    res = evaluate_upscaler(g, seed=5, num=4, hr_size=128, inputs=("bicubic", "render"))
    hr, _ = test_scenes(5, 4, 128, 1, 3)
    lr, _ = test_scenes(5, 4, 32, 1, 3)
    bic = to_uint8(np.stack([bicubic_resize(x.astype(np.float32) / 255, (128, 128)) for x in lr]))
    assert res["inputs"]["render"]["psnr_bicubic"] == pytest.approx(psnr(hr, bic))
    assert res["scores_hr"]["colour"] >= 0.9  # the analyzer reads the HR renders
    assert res["inputs"]["bicubic"]["psnr_bicubic"] > 20  # bicubic round trip of flat shapes
    # an untrained generator is far worse than bicubic: the comparison can go either way
    assert res["inputs"]["bicubic"]["psnr_gain_mean"] < 0
    # tiled against untiled: exact with the exact halo, and reported
    from raphael_jax.evaluation.upscale import tiling_agreement
    from raphael_jax.models.upscale_tiling import exact_halo

    h = exact_halo(g)
    agree = tiling_agreement(g, seed=5, num=2, size=2 * h + 24, tile=2 * h + 8, halo=h)
    assert agree["within_1"] == 1.0 and agree["max_diff"] <= 1
    # the command
    from raphael_jax.cli.eval import main

    weights = save_rrdbnet(g, tmp_path / "g.safetensors")
    assert main(["upscale", "--weights", str(weights), "--num", "2", "--inputs", "bicubic", "--tile-check", "24:4",
                 "--out", str(tmp_path / "r.json"), "--grid", str(tmp_path / "g.png")]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["num"] == 2 and set(saved["inputs"]) == {"bicubic"}
    assert saved["tiling"]["tile"] == 24 and 0 <= saved["tiling"]["within_1"] <= 1
    assert "| bicubic | upscaler |" in capsys.readouterr().out
    assert (tmp_path / "g.png").is_file()


def test_ema_decay_warms_up_to_the_configured_value():
    assert float(upscaler.ema_decay(0, 0.999)) == pytest.approx(0.1)
    assert float(upscaler.ema_decay(90, 0.999)) == pytest.approx(91 / 100)
    assert float(upscaler.ema_decay(10**6, 0.999)) == pytest.approx(0.999)
    # after the first steps the average is mostly the live weights, not the initialisation
    c = tiny_config("train.lr_g=2e-3")
    trainer, state = upscaler.build(c)
    init = leaves(state["g"])
    lr, hr = (jnp.asarray(a) for a in upscaler.training_pairs(c, 0))
    for _ in range(3):
        state, _ = trainer.pixel_step(state, lr, hr)
    for e, g, i in zip(leaves(state["g_ema"]), leaves(state["g"]), init):
        if not np.array_equal(g, i):
            assert np.abs(e - g).max() < np.abs(e - i).max()


def test_shipped_upscaler_configs_load_and_validate():
    """configs/upscaler/*.py (raphael-train-upscaler's; configs/*.py are raphael-train's)."""
    import glob

    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "upscaler", "*.py")))
    assert paths
    for path in paths:
        c = load_config(path, validator=upscaler.validate_config)
        assert c.train.pixel_steps <= c.train.num_steps
