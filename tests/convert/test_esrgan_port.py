"""Real-ESRGAN weights: parity of the NNX RRDBNet with basicsr's (transcribed in ``tests/references/torch_rrdbnet.py``)
through ``raphael-convert esrgan``, the architecture read off the shapes, the way back (``save_rrdbnet``) and the
refusals (a truncated or foreign ``.pth``, missing / mis-shaped tensors, an existing output, an absent ``--key``).

Small random networks (16 features, 2 blocks, 8 growth channels) for x4, x2 and x1, every parameter re-drawn
with std 0.1 so the body and every bias matter (outputs of magnitude 1-5; dropping the body moves them by 0.5-1.5,
checked to be far above the tolerance). Outputs must agree within ``TOL`` = 1e-4 max abs on a [1, 3, 24, 32]
input in [0, 1] (float32 on CPU: about 4e-6 found).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from references.torch_rrdbnet import RRDBNet as TorchRRDBNet  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)

from raphael_jax.cli.convert import main as convert_main  # noqa: E402
from raphael_jax.convert import ConversionError  # noqa: E402
from raphael_jax.convert.esrgan import (  # noqa: E402
    FORMAT,
    convert_esrgan_weights,
    describe,
    infer_rrdbnet_config,
    load_rrdbnet,
    rrdbnet_tensors,
    save_rrdbnet,
)
from raphael_jax.models.rrdbnet import PRESETS, RRDBNetConfig  # noqa: E402

TOL = 1e-4
SMALL = dict(num_feat=16, num_block=2, num_grow_ch=8)


def _torch_model(scale: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    pt = TorchRRDBNet(3, 3, scale=scale, **SMALL).eval()
    with torch.no_grad():
        for p in pt.parameters():
            p.normal_(0.0, 0.1)
    return pt


def _input() -> np.ndarray:
    return np.random.RandomState(0).uniform(0, 1, (1, 3, 24, 32)).astype(np.float32)  # NCHW


def _torch_out(pt, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return pt(torch.from_numpy(x)).numpy()


def _jax_out(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _state_dict(pt) -> dict:
    return {k: v.detach().clone() for k, v in pt.state_dict().items()}


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_parity_with_basicsr_rrdbnet(scale, tmp_path):
    pt = _torch_model(scale)
    src, out = tmp_path / "x.pth", tmp_path / "x.safetensors"
    torch.save({"params_ema": _state_dict(pt)}, src)
    assert convert_esrgan_weights(src, out) == out
    model = load_rrdbnet(out)
    assert model.config == RRDBNetConfig(scale=scale, **SMALL)
    x = _input()
    want = _torch_out(pt, x)
    assert want.shape == (1, 3, 24 * scale, 32 * scale)
    got = _jax_out(model, x)
    assert got.shape == want.shape
    assert _err(got, want) < TOL, _err(got, want)
    # The test can fail: without its body (or with another model's weights) the output is far off.
    body = pt.body
    pt.body = torch.nn.Identity()
    try:
        assert _err(_torch_out(pt, x), want) > 100 * TOL
    finally:
        pt.body = body
    assert _err(_torch_out(_torch_model(scale, seed=1), x), got) > 100 * TOL

    # The way back: the published layout, read by the torch network as it is.
    tensors = rrdbnet_tensors(model)
    assert set(tensors) == set(pt.state_dict())
    for k, v in pt.state_dict().items():
        assert tensors[k].shape == tuple(v.shape) and tensors[k].dtype == np.float32, k
        np.testing.assert_array_equal(tensors[k], v.numpy(), err_msg=k)
    back = tmp_path / "back.safetensors"
    save_rrdbnet(model, back)
    pt2 = TorchRRDBNet(3, 3, scale=scale, **SMALL).eval()
    pt2.load_state_dict(safetensors_torch.load_file(str(back)))
    assert _err(_torch_out(pt2, x), want) == 0.0
    assert _err(_jax_out(load_rrdbnet(back), x), got) == 0.0


def test_metadata_key_choice_and_pth_export(tmp_path):
    from safetensors import safe_open

    pt = _torch_model(4)
    sd = _state_dict(pt)
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    src = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params": other, "params_ema": sd}, src)  # params_ema wins over params
    out = convert_esrgan_weights(src, tmp_path / "a.safetensors")
    with safe_open(str(out), framework="np") as f:
        assert f.metadata() == {"format": FORMAT, "source": "RealESRGAN_x4plus.pth", "key": "params_ema"}
    x = _input()
    want = _torch_out(pt, x)
    assert _err(_jax_out(load_rrdbnet(out), x), want) < TOL
    # --key overrides; a flat state dict works without a key
    out = convert_esrgan_weights(src, tmp_path / "b.safetensors", key="params")
    assert _err(_jax_out(load_rrdbnet(out), x), 0.0) == 0.0  # all-zero weights
    torch.save(sd, tmp_path / "flat.pth")
    out = convert_esrgan_weights(tmp_path / "flat.pth", tmp_path / "c.safetensors")
    with safe_open(str(out), framework="np") as f:
        assert f.metadata()["key"] == ""
    model = load_rrdbnet(out)
    # save_rrdbnet(.pth) writes what Real-ESRGAN loads: {"params_ema": state_dict}, which converts back
    save_rrdbnet(model, tmp_path / "g.pth")
    loaded = torch.load(tmp_path / "g.pth", weights_only=True)
    assert set(loaded) == {"params_ema"} and set(loaded["params_ema"]) == set(sd)
    out = convert_esrgan_weights(tmp_path / "g.pth", tmp_path / "d.safetensors")
    assert _err(_jax_out(load_rrdbnet(out), x), want) < TOL


def test_original_esrgan_names_are_renamed(tmp_path):
    """xinntao/ESRGAN's RRDB_ESRGAN_x4.pth names the same network RRDB_trunk.N.RDBk / trunk_conv / upconvN / HRconv."""
    pt = _torch_model(4)
    legacy = {}
    for k, v in _state_dict(pt).items():
        k = k.replace("conv_body", "trunk_conv").replace("conv_up", "upconv").replace("conv_hr", "HRconv")
        k = k.replace("body.", "RRDB_trunk.").replace(".rdb", ".RDB")
        legacy[k] = v
    assert "RRDB_trunk.1.RDB3.conv5.bias" in legacy and "HRconv.weight" in legacy
    torch.save(legacy, tmp_path / "RRDB_ESRGAN_x4.pth")
    out = convert_esrgan_weights(tmp_path / "RRDB_ESRGAN_x4.pth", tmp_path / "esrgan.safetensors")
    x = _input()
    assert _err(_jax_out(load_rrdbnet(out), x), _torch_out(pt, x)) < TOL


def test_infer_config_from_shapes():
    for name, cfg in PRESETS.items():  # the published architectures, from shapes only (torch's meta device)
        with torch.device("meta"):
            pt = TorchRRDBNet(3, 3, scale=cfg.scale, num_block=cfg.num_block)
        shapes = {k: tuple(v.shape) for k, v in pt.state_dict().items()}
        assert infer_rrdbnet_config(shapes) == cfg, name
    shapes = {k: tuple(v.shape) for k, v in TorchRRDBNet(3, 3, scale=1, **SMALL).state_dict().items()}
    assert shapes["conv_first.weight"] == (16, 48, 3, 3)
    assert infer_rrdbnet_config(shapes) == RRDBNetConfig(scale=1, **SMALL)
    assert describe(PRESETS["RealESRGAN_x4plus"]) == "RRDBNet x4, 23 blocks, 64 features"
    assert describe(PRESETS["RealESRGAN_x2plus"]) == "RRDBNet x2, 23 blocks, 64 features"
    assert describe(PRESETS["RealESRGAN_x4plus_anime_6B"]) == "RRDBNet x4, 6 blocks, 64 features"
    gray = {k: tuple(v.shape) for k, v in TorchRRDBNet(1, 1, scale=2, **SMALL).state_dict().items()}
    assert infer_rrdbnet_config(gray) == RRDBNetConfig(num_in_ch=1, num_out_ch=1, scale=2, **SMALL)
    with pytest.raises(ConversionError, match="fits no RRDBNet scale"):
        infer_rrdbnet_config({**shapes, "conv_first.weight": (16, 5, 3, 3)})


# ------------------------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def good_pth(tmp_path_factory):
    d = tmp_path_factory.mktemp("esrgan")
    torch.save({"params_ema": _state_dict(_torch_model(4))}, d / "good.pth")
    return d / "good.pth"


def test_truncated_pth_is_refused(good_pth, tmp_path):
    data = good_pth.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated.pth is not a PyTorch weights file"):
        convert_esrgan_weights(bad, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_another_network_is_refused(tmp_path):
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    cnn(torch.zeros(1, 3, 8, 8))
    torch.save({"params": cnn.state_dict()}, tmp_path / "cnn.pth")
    with pytest.raises(ConversionError, match="not an RRDBNet \\(Real-ESRGAN\\) state dict: no conv_first.weight"):
        convert_esrgan_weights(tmp_path / "cnn.pth", tmp_path / "out.safetensors")
    # SRVGGNetCompact (realesr-general-x4v3): body.N.weight, no conv_first -> named as such
    compact = {"body.0.weight": torch.zeros(64, 3, 3, 3), "body.0.bias": torch.zeros(64),
               "body.1.weight": torch.zeros(64)}
    torch.save({"params": compact}, tmp_path / "realesr-general-x4v3.pth")
    with pytest.raises(ConversionError, match="look like SRVGGNetCompact") as e:
        convert_esrgan_weights(tmp_path / "realesr-general-x4v3.pth", tmp_path / "out.safetensors")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_and_misshaped_tensors_are_named(good_pth, tmp_path):
    from safetensors.numpy import save_file

    out = convert_esrgan_weights(good_pth, tmp_path / "good.safetensors")
    tensors = rrdbnet_tensors(load_rrdbnet(out))
    missing = {k: v for k, v in tensors.items() if k != "body.1.rdb2.conv3.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConversionError, match=r"missing tensors \(1\):\n    body.1.rdb2.conv3.bias \(expected \[8\]\)"):
        load_rrdbnet(tmp_path / "missing.safetensors")
    wrong = {**tensors, "conv_hr.weight": np.zeros((16, 16, 1, 1), np.float32)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ConversionError, match="conv_hr.weight: expected \\[16, 16, 3, 3\\], found \\[16, 16, 1, 1\\]"):
        load_rrdbnet(tmp_path / "wrong.safetensors")
    nested = {f"params_ema.{k}": v for k, v in tensors.items()}
    save_file(nested, str(tmp_path / "nested.safetensors"))
    with pytest.raises(ConversionError, match="holds tensors named params_ema.\\*"):
        load_rrdbnet(tmp_path / "nested.safetensors")
    with pytest.raises(ConversionError, match="never unpickles on load: convert it once"):
        load_rrdbnet(good_pth)
    with pytest.raises(ConversionError, match="nope.safetensors: no such file"):
        load_rrdbnet(tmp_path / "nope.safetensors")
    # the same checks hold for a .pth with a wrong tensor: refused before anything is written
    sd = torch.load(good_pth, weights_only=True)["params_ema"]
    sd["conv_up2.bias"] = torch.zeros(3)
    torch.save({"params_ema": sd}, tmp_path / "wrong.pth")
    with pytest.raises(ConversionError, match="conv_up2.bias: expected \\[16\\], found \\[3\\]"):
        convert_esrgan_weights(tmp_path / "wrong.pth", tmp_path / "new.safetensors")
    assert not (tmp_path / "new.safetensors").exists()


def test_existing_output_and_absent_key_are_refused(good_pth, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(ConversionError, match="out.safetensors exists; refusing to overwrite"):
        convert_esrgan_weights(good_pth, out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(ConversionError, match="--key params: .* has no such key \\(its top-level keys: params_ema\\)"):
        convert_esrgan_weights(good_pth, tmp_path / "new.safetensors", key="params")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary file left either
    with pytest.raises(ConversionError, match="must be a new .safetensors file"):
        convert_esrgan_weights(good_pth, tmp_path / "new.pth")


def test_cli_converts_and_names_the_architecture(good_pth, tmp_path, capsys):
    out = tmp_path / "x4.safetensors"
    assert convert_main(["esrgan", str(good_pth), str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "RRDBNet x4, 2 blocks, 16 features, 8 growth channels" in line, line
    assert f"raphael-upscale IN OUT --weights {out}" in line
    assert load_rrdbnet(out).config == RRDBNetConfig(scale=4, **SMALL)
    assert convert_main(["esrgan", str(good_pth), str(tmp_path / "new.safetensors"), "--key", "nope"]) == 2
    assert "raphael-convert: error: --key nope:" in capsys.readouterr().err
