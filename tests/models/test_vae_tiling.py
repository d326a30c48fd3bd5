"""Tiled VAE decoding (raphael_jax/models/vae_tiling.py) equals the untiled decode; naive tiling does not."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raphael_jax.models import vae_tiling
from raphael_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from raphael_jax.models.vae_tiling import decode_latents_tiled, decode_tiled, receptive_radius, tile_layout

TOL = 1e-3
CFG = AutoencoderKLConfig(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)
TILE = 20  # receptive radius 8 -> stride 4


@pytest.fixture(scope="module")
def vae():
    """Random weights drawn with numpy into the abstract model (eager nnx init takes ~30 s on CPU here).

    GroupNorm scales / biases are moved away from 1 / 0 and conv biases away from 0, so a wrong
    normalisation statistic shows in the output.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name, owner = path[-1].key, str(path[-2].key)
        if name == "kernel":  # lecun-normal-like
            x = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "scale":
            x = 1 + 0.3 * rng.standard_normal(leaf.shape)
        else:
            x = (0.3 if "norm" in owner else 0.1) * rng.standard_normal(leaf.shape)
        return jnp.asarray(x, jnp.float32)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


_decode = jax.jit(lambda m, v: m.decode(v))  # one function, so equal shapes compile once across tests


def _untiled(vae, z):
    return np.asarray(_decode(vae, jnp.asarray(z)))


def _latents(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _uint8(x):
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def _check_equal(got, want):
    assert got.shape == want.shape and got.dtype == np.float32
    err = float(np.abs(got - want).max())
    same = float((_uint8(got) == _uint8(want)).mean())
    assert err < TOL and same >= 0.999, (err, same)
    return err


def test_receptive_radius_and_layout():
    assert receptive_radius(CFG) == 8  # 4 + 1/2 + 2 + 1/4 + 1 + 1/4
    assert receptive_radius(AutoencoderKLConfig()) == 13  # SD VAE: 12.25
    for h, w, tile, halo in [(24, 40, 20, 8), (37, 5, 16, 3), (100, 64, 64, 13), (64, 64, 64, 13)]:
        lay = tile_layout(h, w, tile=tile, halo=halo)
        cover = np.zeros((h, w), int)
        for wy, wx, (y0, y1, x0, x1) in lay.tiles():
            assert 0 <= wy and wy + lay.tile_h <= h and 0 <= wx and wx + lay.tile_w <= w
            assert y0 < y1 and x0 < x1
            # a core is >= halo from every window edge that is not an image edge
            assert wy == 0 or y0 >= halo
            assert wy + lay.tile_h == h or lay.tile_h - y1 >= halo
            assert wx == 0 or x0 >= halo
            assert wx + lay.tile_w == w or lay.tile_w - x1 >= halo
            cover[wy + y0 : wy + y1, wx + x0 : wx + x1] += 1
        assert (cover == 1).all()  # the cores partition the image
    assert tile_layout(24, 40, tile=TILE, halo=8).n_tiles == 2 * 6


def test_tiled_equals_untiled(vae, monkeypatch):
    z = _latents((2, 24, 40, 4), 1)
    layouts = []
    real = vae_tiling.tile_layout
    monkeypatch.setattr(vae_tiling, "tile_layout", lambda *a, **k: layouts.append(real(*a, **k)) or layouts[-1])
    got = decode_tiled(vae, z, tile=TILE, chunk=5)
    assert [lay.n_tiles for lay in layouts] == [12]  # 2 x 6 windows of 20 x 20 latent px
    want = _untiled(vae, z)
    err = _check_equal(got, want)
    print(f"tiled vs untiled max abs diff {err:.2e}, image std {want.std():.2f}")


def test_naive_tiling_is_not_equal(vae):
    """Decoding each window alone (per-tile GroupNorm statistics and attention) fails the same bar."""
    z = _latents((2, 24, 40, 4), 1)
    want = _untiled(vae, z)
    lay = tile_layout(24, 40, tile=TILE, halo=receptive_radius(CFG))
    naive = np.empty_like(want)
    f = CFG.downsample_factor
    for wy, wx, (y0, y1, x0, x1) in lay.tiles():
        out = np.asarray(_decode(vae, jnp.asarray(z[:, wy : wy + lay.tile_h, wx : wx + lay.tile_w])))
        naive[:, (wy + y0) * f : (wy + y1) * f, (wx + x0) * f : (wx + x1) * f] = out[
            :, y0 * f : y1 * f, x0 * f : x1 * f
        ]
    err = float(np.abs(naive - want).max())
    print(f"naive per-tile decode max abs diff {err:.2e}")
    assert err > 30 * TOL


def test_non_square_and_small(vae):
    z = _latents((1, 12, 44, 4), 3)  # height below one tile: a single row of 8 windows 12 x 20
    want = _untiled(vae, z)
    _check_equal(decode_tiled(vae, z, tile=TILE, chunk=3), want)
    small = _latents((1, 12, 16, 4), 4)  # fits one tile: the untiled decoder
    _check_equal(decode_tiled(vae, small, tile=TILE), _untiled(vae, small))
    # decode_latents_tiled = decode_tiled(z_scaled / scale + shift), as AutoencoderKL.decode_latents
    _check_equal(decode_latents_tiled(vae, z * CFG.scaling_factor, tile=TILE, chunk=3), want)


def test_bad_arguments(vae):
    z = _latents((1, 24, 40, 4), 5)
    with pytest.raises(ValueError, match="must be"):
        decode_tiled(vae, z[0], tile=TILE)
    with pytest.raises(ValueError, match="channels"):
        decode_tiled(vae, z[..., :3], tile=TILE)
    with pytest.raises(ValueError, match="exceed"):
        decode_tiled(vae, z, tile=16)
    with pytest.raises(ValueError, match="exceed"):
        tile_layout(24, 40, tile=16, halo=8)
    with pytest.raises(ValueError, match="receptive radius"):
        decode_tiled(vae, z, tile=40, halo=7)
    with pytest.raises(ValueError, match="chunk"):
        decode_tiled(vae, z, tile=TILE, chunk=0)
