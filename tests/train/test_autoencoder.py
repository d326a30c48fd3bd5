"""The shapes-world KL autoencoder trainer (raphael_jax/train/autoencoder.py) and its diffusers export.

Checks are independent of the code under test: the export is read back by the project's importer
AND by diffusers (torch), the trained model's improvement, scaling factor and PSNR are recomputed
from the exported files on held-out scenes rebuilt straight from the world.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raphael_jax.cli.train_vae import main as train_vae_main
from raphael_jax.convert import load_autoencoder
from raphael_jax.data.shapes.world import example
from raphael_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from raphael_jax.train.autoencoder import (
    edge_mask,
    evaluate_autoencoder,
    export_diffusers,
    reconstruction_error,
    train_autoencoder,
)

NCHW_TO_NHWC = (0, 2, 3, 1)
TINY = AutoencoderKLConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                           scaling_factor=0.5)


def _perturbed(cfg, seed=1):
    """A random model whose GroupNorm scales / biases are not the trivial ones/zeros."""
    graphdef, params = nnx.split(AutoencoderKL(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_export_round_trip_through_our_importer_and_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model = _perturbed(TINY)
    out = export_diffusers(model, tmp_path / "vae", sample_size=16)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    ours, cfg = load_autoencoder(out)
    assert cfg == TINY
    pt, info = diffusers.AutoencoderKL.from_pretrained(out, output_loading_info=True)
    pt = pt.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert pt.config.scaling_factor == 0.5 and list(pt.config.block_out_channels) == [8, 16]
    assert pt.config.sample_size == 16

    rs = np.random.RandomState(0)
    x = rs.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)  # NCHW, as diffusers takes it
    z = rs.randn(2, 4, 8, 8).astype(np.float32)
    with torch.no_grad():
        want_mean = pt.encode(torch.tensor(x)).latent_dist.mean.numpy().transpose(NCHW_TO_NHWC)
        want_img = pt.decode(torch.tensor(z)).sample.numpy().transpose(NCHW_TO_NHWC)
    x_nhwc, z_nhwc = jnp.asarray(x.transpose(NCHW_TO_NHWC)), jnp.asarray(z.transpose(NCHW_TO_NHWC))
    encode = jax.jit(lambda m, v: m.encode(v)[0])
    decode = jax.jit(lambda m, v: m.decode(v))
    for m in (model, ours):
        np.testing.assert_allclose(np.asarray(encode(m, x_nhwc)), want_mean, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(decode(m, z_nhwc)), want_img, atol=1e-4, rtol=1e-4)
    assert np.abs(want_img).max() > 0.1  # not a trivially constant output


def _l1_and_latents(model, images_uint8):
    x = jnp.asarray(images_uint8.astype(np.float32) / 127.5 - 1.0)
    mean = jax.jit(lambda m, v: m.encode(v)[0])(model, x)
    recon = np.asarray(jax.jit(lambda m, v: m.decode(v))(model, mean))
    return float(np.mean(np.abs(recon - np.asarray(x)))), np.asarray(mean), recon


def test_training_reduces_loss_and_measures_the_scaling_factor(tmp_path):
    seed, size, num_eval = 3, 32, 8
    out = tmp_path / "vae"
    report = train_autoencoder(out, image_size=size, block_out_channels=(8, 16), norm_num_groups=4, steps=40,
                               batch_size=4, learning_rate=3e-3, warmup_steps=5, seed=seed, num_eval=num_eval,
                               log_every=20, verbose=False)
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for key in ("steps", "seconds", "final", "scaling_factor", "psnr_db", "scores_decoded", "scores_original"):
        assert key in saved, key
    assert saved["steps"] == 40 and saved["latent_shape"] == [16, 16, 4]
    assert saved["final"]["loss"] < 0.5 * saved["first_loss"]

    # held-out scenes rebuilt from the world: stream 1 of the seed (training reads stream 0)
    exs = [example(seed, i, size, 1, 1, stream=1) for i in range(num_eval)]
    images = np.stack([e["image"] for e in exs])
    trained, cfg = load_autoencoder(out)
    assert cfg.block_out_channels == (8, 16) and cfg.layers_per_block == 1 and cfg.norm_num_groups == 4
    init = AutoencoderKL(cfg, rngs=nnx.Rngs(seed))  # the documented random init (same config: one compile)
    l1_trained, mean, recon = _l1_and_latents(trained, images)
    l1_init, _, _ = _l1_and_latents(init, images)
    assert l1_trained < 0.5 * l1_init, (l1_trained, l1_init)

    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["sample_size"] == size
    assert config["scaling_factor"] == pytest.approx(1.0 / np.std(mean.astype(np.float64)), rel=1e-4)
    assert cfg.scaling_factor == config["scaling_factor"] == saved["scaling_factor"]
    decoded = np.clip(np.round((recon + 1.0) * 127.5), 0, 255)
    mse = np.mean((decoded - images.astype(np.float64)) ** 2)
    assert saved["psnr_db"] == pytest.approx(10 * np.log10(255.0**2 / mse), abs=0.05)
    assert saved["scores_original"]["colour"] == 1.0  # the ceiling: the analyzer reads the true scenes
    by_shape = saved["kind_by_shape"]
    assert set(by_shape) <= {f"{k}/{s}" for k in ("circle", "square", "triangle") for s in ("big", "small")}
    assert all(0.0 <= v <= 1.0 for v in by_shape.values())

    # scoring the saved files again (raphael-train-vae --evaluate) gives the report's held-out numbers
    again = evaluate_autoencoder(out, seed=seed, num_eval=num_eval)
    assert again["image_size"] == size
    assert again["psnr_db"] == pytest.approx(saved["psnr_db"], abs=0.05)
    assert again["scaling_factor_measured"] == pytest.approx(saved["scaling_factor"], rel=1e-3)
    assert again["kind_by_shape"].keys() == by_shape.keys()


def test_cli_evaluate_needs_a_vae_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_vae_main(["--evaluate", str(tmp_path)])
    assert e.value.code == 2 and "no config.json there" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # one of --out / --evaluate
        train_vae_main(["--evaluate", str(tmp_path), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()


def test_edge_weighted_reconstruction_error():
    # a 4x4 red square on black in an 12x12 image: edge pixels are the ring of pixels whose 3x3
    # window holds both colours (the square's outer pixels and the black ones touching it)
    x = -np.ones((1, 12, 12, 3), np.float32)
    x[0, 4:8, 4:8, 0] = 1.0
    want = np.zeros((12, 12), np.float32)
    want[3:9, 3:9] = 1.0
    want[5:7, 5:7] = 0.0  # the square's 2x2 interior sees only red
    np.testing.assert_array_equal(np.asarray(edge_mask(jnp.asarray(x)))[0, ..., 0], want)

    recon = x + 0.5  # the same error everywhere
    mse = np.asarray(reconstruction_error(jnp.asarray(recon), jnp.asarray(x), "mse", 0.1, 4.0))
    base = 0.25 + 0.1 * 0.5
    np.testing.assert_allclose(mse[0, ..., 0], base * (1 + 4.0 * want), rtol=1e-6)
    l1 = np.asarray(reconstruction_error(jnp.asarray(recon), jnp.asarray(x), "l1", 0.1, 0.0))
    np.testing.assert_allclose(l1, 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        train_autoencoder("unused", image_size=32, block_out_channels=(8, 16), steps=1, reconstruction="huber",
                          verbose=False)


def test_non_empty_out_dir_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="refusing"):
        export_diffusers(AutoencoderKL(TINY, rngs=nnx.Rngs(0)), out)
    with pytest.raises(ValueError, match="refusing"):
        train_autoencoder(out, image_size=32, block_out_channels=(8, 16), steps=1, verbose=False)
    with pytest.raises(SystemExit) as e:
        train_vae_main(["--out", str(out)])
    assert e.value.code == 2 and "refusing" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="refusing"):  # a file in the way
        export_diffusers(AutoencoderKL(TINY, rngs=nnx.Rngs(0)), out / "keep.txt")
    assert (out / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("argv, message", [
    (["--channels", "16,x"], "comma-separated ints"),
    (["--image-size", "34"], "not divisible by the downsampling factor 4"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--image-size", "16", "--channels", "8,16"], "--image-size must be at least 32"),
    (["--norm-groups", "3"], "--norm-groups 3 must divide"),
    (["--lr", "0"], "--lr must be positive"),
    (["--edge-weight", "-1"], "--edge-weight must be >= 0"),
    (["--reconstruction", "huber"], "invalid choice"),
    (["--max-objects", "12"], "--max-objects <= 9"),
])
def test_cli_bad_values_exit_2(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_vae_main(["--out", str(tmp_path / "new"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "new").exists()
