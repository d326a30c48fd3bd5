"""FID: the NNX FID Inception against pytorch-fid's network (random weights), the Frechet distance
against an independent eigenvalue computation, statistics files, the .pth -> safetensors converter.

pytorch-fid itself cannot be imported here (it imports torchvision, which does not import beside
torch 2.13.0), so the reference is its network transcribed in plain torch: tests/references/torch_fid_inception.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from references import torch_fid_inception as ref  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)

from raphael_jax.cli.convert import main as convert_main  # noqa: E402
from raphael_jax.convert.safetensors_io import ConversionError  # noqa: E402
from raphael_jax.evaluation import fid  # noqa: E402
from raphael_jax.evaluation.inception import (  # noqa: E402
    InceptionConfig,
    build_inception,
    init_inception,
    load_inception,
    resize_bilinear,
)


def _state_dict_arrays(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _torch_features(model, images_uint8):
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0  # ToTensor
    with torch.no_grad():
        return model(x).numpy()


def test_resize_matches_torch_interpolate():
    rs = np.random.RandomState(0)
    for shape in [(2, 64, 96, 3), (1, 330, 310, 3), (1, 299, 299, 3)]:  # up, down (no antialias), identity
        x = rs.rand(*shape).astype(np.float32)
        want = (
            torch.nn.functional.interpolate(
                torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
            )
            .permute(0, 2, 3, 1)
            .numpy()
        )
        got = np.asarray(resize_bilinear(jnp.asarray(x), 299))
        assert np.abs(got - want).max() < 2e-6, shape


def test_pooling_matches_torch():
    from raphael_jax.evaluation.inception import avg_pool_exclude_pad, max_pool

    x = np.random.RandomState(1).randn(2, 9, 8, 5).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    F = torch.nn.functional
    pairs = [
        (avg_pool_exclude_pad(jnp.asarray(x)), F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)),
        (max_pool(jnp.asarray(x)), F.max_pool2d(t, 3, 2)),
        (max_pool(jnp.asarray(x), 3, 1, 1), F.max_pool2d(t, 3, 1, 1)),
    ]
    for got, want in pairs:
        np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_inception_parity_with_pytorch_fid_network():
    """The full-size network (2048-d pool3), random weights, images of another size than 299."""
    torch.manual_seed(0)
    pt = ref.randomize_(ref.FIDInceptionV3(), seed=0)
    sd = _state_dict_arrays(pt)
    net = build_inception({k: v.shape for k, v in sd.items()}, lambda names: sd)
    images = np.random.RandomState(0).randint(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    want = _torch_features(pt, images)
    got = np.asarray(jax.jit(lambda m, x: m.features_uint8(x))(net, jnp.asarray(images)))
    assert got.shape == want.shape == (2, 2048)
    err = float(np.abs(got - want).max())
    scale = float(np.abs(want).mean())
    print(f"FID Inception parity: max|diff| {err:.2e}, mean|feature| {scale:.3f}")
    assert 0.05 < scale < 100  # the random weights keep the features O(1): the comparison means something
    assert err < 1e-4


def _tiny_torch_state(div=16, seed=3):
    pt = ref.randomize_(ref.FIDInceptionV3(div=div), seed=seed)
    return pt, _state_dict_arrays(pt)


def test_converter_command_and_errors(tmp_path, capsys):
    div = 16
    pt, sd = _tiny_torch_state(div)
    pth = tmp_path / "fid_weights.pth"
    torch.save(
        {**pt.state_dict(), "fc.weight": torch.zeros(10, 4)}, pth
    )  # extra fc.* tensors are kept, ignored
    out = tmp_path / "fid.safetensors"
    assert convert_main(["inception", str(pth), str(out), "--channel-divisor", str(div)]) == 0
    net = load_inception(out, InceptionConfig(channel_divisor=div))
    images = np.random.RandomState(2).randint(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda m, x: m.features_uint8(x))(net, jnp.asarray(images))),
        _torch_features(pt, images),
        atol=1e-4,
    )
    # never overwrites; refuses pickles on load; checks names/shapes; checks the hash in the name
    assert convert_main(["inception", str(pth), str(out), "--channel-divisor", str(div)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="never unpickles"):
        load_inception(pth)
    with pytest.raises(ConversionError, match="wrong shapes"):
        load_inception(out)  # a full-size network does not fit the tiny weights
    bad = tmp_path / "pt_inception-2015-12-05-deadbeef.pth"
    bad.write_bytes(pth.read_bytes())
    assert convert_main(["inception", str(bad), str(tmp_path / "x.safetensors")]) == 2
    assert "sha256" in capsys.readouterr().err


def _frechet_reference(mu1, s1, mu2, s2):
    """Independent: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) with symmetric square roots."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev)))


def test_frechet_distance_against_reference():
    rs = np.random.RandomState(0)
    d = 16
    a = rs.randn(300, d) @ rs.randn(d, d)
    b = 0.5 + rs.randn(250, d) @ rs.randn(d, d) * 0.8
    mu1, s1 = fid.feature_statistics(a)
    mu2, s2 = fid.feature_statistics(b)
    np.testing.assert_allclose(s1, np.cov(a.T), rtol=1e-12)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    want = _frechet_reference(mu1, s1, mu2, s2)
    assert abs(got - want) < 1e-8 * max(1.0, abs(want)), (got, want)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-7 * np.trace(s1)
    # 1-d closed form: (m1 - m2)^2 + (sd1 - sd2)^2
    assert abs(fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) - (4 + 1)) < 1e-12
    # rank-deficient covariances (fewer samples than dims) still give a finite number
    few = fid.fid_from_features(rs.randn(5, d), rs.randn(6, d))
    assert np.isfinite(few)


def test_stats_round_trip_and_folder_statistics(tmp_path):
    from PIL import Image

    rs = np.random.RandomState(0)
    mu, sigma = rs.randn(8), np.cov(rs.randn(20, 8).T)
    path = fid.save_stats(tmp_path / "s.npz", mu, sigma, 20, source="x")
    mu2, sigma2 = fid.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    with np.load(path, allow_pickle=False) as f:  # everything readable without pickle
        assert int(f["num"]) == 20 and "source" in str(f["meta"])
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_stats(tmp_path / "bad.npz")

    # folder statistics == statistics of the features of the same images, batch-padded and sharded
    cfg = InceptionConfig(channel_divisor=32)
    net = init_inception(cfg, seed=0)
    extract = fid.FeatureExtractor(net, batch_size=3)
    assert extract.batch_size % len(jax.local_devices()) == 0
    images = rs.randint(0, 256, (5, 24, 24, 3)).astype(np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    mu_f, sigma_f, n = fid.folder_statistics(tmp_path, extract, batch_size=2)
    direct = np.asarray(jax.jit(lambda m, x: m.features_uint8(x))(net, jnp.asarray(images)))
    assert n == 5 and direct.shape == (5, cfg.feature_dim)
    np.testing.assert_allclose(extract(images), direct, atol=1e-5)
    mu_d, sigma_d = fid.feature_statistics(direct)
    np.testing.assert_allclose(mu_f, mu_d, atol=1e-5)
    np.testing.assert_allclose(sigma_f, sigma_d, atol=1e-5)
