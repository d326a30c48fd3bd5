"""Tiled upscaling (raphael_jax/models/upscale_tiling.py) against the untiled RRDBNet, and raphael-upscale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from raphael_jax.data.shapes.world import example
from raphael_jax.models.rrdbnet import PRESETS, RRDBNet, RRDBNetConfig, pixel_unshuffle, receptive_radius
from raphael_jax.models.upscale_tiling import (
    exact_halo,
    to_uint8,
    upscale,
    upscale_picture,
    upscale_tiled,
)

SMALL = RRDBNetConfig(num_feat=16, num_block=2, num_grow_ch=8)


def strong(model: RRDBNet, seed: int = 0, std: float = 0.08) -> RRDBNet:
    """Every parameter redrawn at ``std``: the body reaches far, so a too-small halo shows."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def test_pixel_unshuffle_orders_channels_as_pytorch():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = pixel_unshuffle(x, 2)
    assert y.shape == (2, 2, 3, 12)
    # torch: out[c * 4 + i * 2 + j, h, w] = in[c, 2h + i, 2w + j]
    for c in range(3):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(y[..., c * 4 + i * 2 + j], x[:, i::2, j::2, c])


def test_receptive_radius_counts_every_conv():
    assert receptive_radius(PRESETS["RealESRGAN_x4plus"]) == 2 + 15 * 23 + 0.5 + 0.75
    assert receptive_radius(PRESETS["RealESRGAN_x2plus"]) == 2 * (2 + 15 * 23) + 1 + 1.5


@pytest.mark.parametrize("scale", [4, 2])
def test_tiled_with_the_exact_halo_equals_untiled(scale):
    model = strong(RRDBNet(RRDBNetConfig(scale=scale, num_feat=16, num_block=2, num_grow_ch=8), rngs=nnx.Rngs(0)))
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    full = upscale(model, image[None])[0]
    halo = exact_halo(model)
    assert halo >= receptive_radius(model.config)
    tiled = upscale_tiled(model, image, tile=2 * halo + 8, halo=halo)
    assert tiled.shape == (40 * scale, 56 * scale, 3) and tiled.dtype == np.uint8
    diff = np.abs(tiled.astype(int) - to_uint8(full).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.9999, (diff.max(), (diff == 0).mean())
    # without a halo the tiles' zero padding is visibly wrong on these weights: the check above can fail
    small = upscale_tiled(model, image, tile=16, halo=0)
    assert np.abs(small.astype(int) - to_uint8(full).astype(int)).max() > 8


def test_default_halo_on_a_published_architecture_is_within_one_level():
    """The 6-block Real-ESRGAN architecture (its own initialisation) on a shapes scene, 4 tiles of 48 px."""
    model = RRDBNet(PRESETS["RealESRGAN_x4plus_anime_6B"], rngs=nnx.Rngs(0))
    image = example(3, 0, 64, 2, 3)["image"]
    full = to_uint8(upscale(model, image[None])[0])
    tiled = upscale_tiled(model, image, tile=48, halo=16)
    diff = np.abs(tiled.astype(int) - full.astype(int))
    assert (diff <= 1).mean() >= 0.999


def test_tiles_over_several_devices_equal_one_device():
    devices = jax.local_devices()
    if len(devices) < 2:
        pytest.skip("needs several (virtual) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    model = strong(RRDBNet(SMALL, rngs=nnx.Rngs(0)))
    image = np.random.default_rng(2).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    calls = []
    many = upscale_tiled(model, image, tile=16, halo=4, progress=lambda d, t: calls.append((d, t)))
    one = upscale_tiled(model, image, tile=16, halo=4, devices=devices[:1])
    np.testing.assert_array_equal(many, one)
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_picture_grey_alpha_odd_sides_and_outscale():
    model = RRDBNet(RRDBNetConfig(scale=2, num_feat=8, num_block=1, num_grow_ch=4), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (15, 21, 4), dtype=np.uint8)  # odd sides: reflect-padded for the x2 unshuffle
    out = upscale_picture(model, rgba, tile=8, halo=2)
    assert out.shape == (30, 42, 4)
    alpha = np.asarray(Image.fromarray(rgba[..., 3]).resize((42, 30), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out[..., 3], alpha)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    g = upscale_picture(model, grey, tile=0)
    assert g.shape == (32, 32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_array_equal(g, to_uint8(upscale(model, rgb[None])[0])[..., 0])
    assert upscale_picture(model, rgb, tile=0, scale=1.5).shape == (24, 24, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tile=16, halo=8), r"must exceed 2 \* halo"),
    (dict(tile=15, halo=2), "multiples of 2"),
])
def test_bad_tiles_are_refused(kwargs, message):
    model = RRDBNet(RRDBNetConfig(scale=2, num_feat=8, num_block=1, num_grow_ch=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        upscale_tiled(model, np.zeros((16, 16, 3), np.uint8), **kwargs)
    with pytest.raises(ValueError, match="sides divisible by 2"):
        upscale_tiled(model, np.zeros((15, 16, 3), np.uint8), tile=8, halo=2)
    with pytest.raises(ValueError, match="expected an image"):
        upscale_tiled(model, np.zeros((16, 16), np.uint8))


def test_raphael_upscale_writes_the_tiled_picture(tmp_path, capsys):
    from raphael_jax.cli.upscale import main
    from raphael_jax.convert.esrgan import save_rrdbnet

    model = strong(RRDBNet(SMALL, rngs=nnx.Rngs(0)), std=0.03)
    weights = save_rrdbnet(model, tmp_path / "g.safetensors")
    image = example(5, 1, 32, 1, 2)["image"]
    Image.fromarray(image).save(tmp_path / "in.png")
    assert main([str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--weights", str(weights),
                 "--tile", "16", "--halo", "4"]) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    np.testing.assert_array_equal(out, upscale_tiled(model, image, tile=16, halo=4))
    assert "-> " in capsys.readouterr().out
    # a folder: every image, into a new folder
    (tmp_path / "many").mkdir()
    for k in range(2):
        Image.fromarray(example(5, k, 32, 1, 1)["image"]).save(tmp_path / "many" / f"im{k}.png")
    assert main([str(tmp_path / "many"), str(tmp_path / "many_x4"), "--weights", str(weights), "--tile", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "many_x4").iterdir()) == ["im0.png", "im1.png"]
    assert Image.open(tmp_path / "many_x4" / "im1.png").size == (128, 128)
    # RGBA into a JPEG: the alpha channel is dropped with a note
    Image.fromarray(np.concatenate([image, np.full((32, 32, 1), 255, np.uint8)], -1)).save(tmp_path / "a.png")
    assert main([str(tmp_path / "a.png"), str(tmp_path / "a.jpg"), "--weights", str(weights), "--tile", "0"]) == 0
    assert Image.open(tmp_path / "a.jpg").mode == "RGB" and "no alpha channel" in capsys.readouterr().out
    # two images that would be written to one name are refused before anything is written
    Image.fromarray(image).save(tmp_path / "many" / "im0.jpg")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "many"), str(tmp_path / "clash"), "--weights", str(weights)])
    assert e.value.code == 2 and "share the name 'im0'" in capsys.readouterr().err
    assert not (tmp_path / "clash").exists()


def test_every_rrdbnet_parameter_carries_logical_axis_names():
    model = RRDBNet(SMALL, rngs=nnx.Rngs(0))
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert len(flat) == 2 * (1 + 2 * 3 * 5 + 5)  # kernel + bias of every conv
    for path, var in flat:
        want = (None, None, "conv_in", "conv_out") if path[-1] == "kernel" else ("conv_out",)
        assert var.get_metadata().get("out_sharding") == want, path


def test_parameter_counts_of_the_published_and_the_shapes_generators():
    """RealESRGAN_x4plus has 16,697,987 parameters (the published .pth); configs/upscaler/sr_shapes.py's is 758,755."""
    from raphael_jax.convert.safetensors_io import abstract_module

    def count(cfg):
        m = abstract_module(lambda: RRDBNet(cfg, rngs=nnx.Rngs(0)))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))

    assert count(PRESETS["RealESRGAN_x4plus"]) == 16_697_987
    assert count(RRDBNetConfig(num_feat=32, num_block=4, num_grow_ch=16)) == 758_755
