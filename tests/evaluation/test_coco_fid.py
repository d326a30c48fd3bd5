"""The COCO FID-30k driver end to end on a fake COCO folder (tiny random Inception, fake sampler),
caption drawing and host slicing, the RAPHAEL sampler adapter, and the shapes Frechet distance."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from references.latent_fixtures import write_fake_coco, write_tiny_inception  # tests/ is on sys.path (conftest)

from raphael_jax.cli.eval import main as eval_main
from raphael_jax.evaluation import caption_samplers, coco_captions, fid
from raphael_jax.evaluation.inception import InceptionConfig, load_inception
from raphael_jax.evaluation.shapes_fd import (
    load_feature_net,
    real_images,
    save_feature_net,
    shapes_frechet_distance,
)

DIV = 64  # tiny Inception: 48-d features, so 56 images give full-rank covariances
N_IMAGES = 64
CALLS = {"n": 0}


class FakeSampler:
    """Colour from the caption's words plus per-index noise; counts the images it makes."""

    def __init__(self, size=48):
        self.size = size

    def sample_batch(self, prompts, indices):
        CALLS["n"] += len(prompts)
        out = []
        for p, i in zip(prompts, indices):
            rng = np.random.default_rng([7, int(i)])
            base = np.array([len(p) * 7 % 256, ("red" in p) * 200, ("sky" in p) * 200], np.float32)
            out.append(np.clip(base + rng.normal(0, 40, (self.size, self.size, 3)), 0, 255).astype(np.uint8))
        return np.stack(out)


def make_fake_sampler(args):  # --sampler py:test_coco_fid:make_fake_sampler (args: the parsed command line)
    assert args.batch_size == 16
    return FakeSampler()


WORDS = ["a", "red", "bus", "sky", "over", "the", "city", "dog", "on", "grass"]


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    root = write_fake_coco(tmp_path_factory.mktemp("coco"), N_IMAGES, WORDS)
    write_tiny_inception(root / "inception_tiny.safetensors", channel_divisor=DIV)
    return root


def test_draw_captions_and_host_slices(fake_coco):
    entries = coco_captions.load_coco_captions(fake_coco / "annotations" / "captions_val2014.json")
    assert len(entries) == 2 * N_IMAGES and entries == sorted(entries, key=lambda e: (e["image_id"], e["ann_id"]))
    a = coco_captions.draw_captions(entries, 20, seed=0)
    assert a == coco_captions.draw_captions(list(entries), 20, seed=0)  # fixed seed: same draw
    assert len({e["image_id"] for e in a}) == 20  # one caption per image
    assert a != coco_captions.draw_captions(entries, 20, seed=1)
    assert len(coco_captions.draw_captions(entries, 100, seed=0, one_per_image=False)) == 100
    with pytest.raises(ValueError, match="images"):
        coco_captions.draw_captions(entries, N_IMAGES + 1)
    slices = [coco_captions.host_slice(30, i, 4) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(slices), np.arange(30))  # each caption exactly once, in order


def test_coco_fid_end_to_end(fake_coco, tmp_path, capsys):
    out = tmp_path / "eval"
    ref_stats = tmp_path / "ref_stats.npz"
    argv = [
        "coco-fid",
        "--annotations",
        str(fake_coco / "annotations" / "captions_val2014.json"),
        "--coco-images",
        str(fake_coco / "val2014"),
        "--ref-stats",
        str(ref_stats),
        "--num",
        "56",
        "--seed",
        "0",
        "--sampler",
        "py:test_coco_fid:make_fake_sampler",
        "--inception-weights",
        str(fake_coco / "inception_tiny.safetensors"),
        "--inception-channel-divisor",
        str(DIV),
        "--batch-size",
        "16",
        "--fid-batch-size",
        "16",
        "--out",
        str(out),
    ]
    CALLS["n"] = 0
    assert eval_main(argv) == 0
    assert CALLS["n"] == 56
    res = json.loads((out / "fid.json").read_text())
    assert res["num_images"] == 56 and np.isfinite(res["fid"]) and res["fid"] > 0
    assert f"FID-56: {res['fid']:.4f}" in capsys.readouterr().out
    print("fake-COCO FID", res["fid"])
    pngs = sorted(os.listdir(out / "images"))
    assert len(pngs) == 56 and pngs[0] == "00000.png"
    with Image.open(out / "images" / "00003.png") as im:
        assert (
            im.size == (256, 256) and im.text["prompt"] == json.loads((out / "captions.json").read_text())[3]["caption"]
        )
    assert ref_stats.is_file()

    # independent recomputation: features of the saved PNGs and of the reference images, 256x256
    net = load_inception(fake_coco / "inception_tiny.safetensors", InceptionConfig(channel_divisor=DIV))
    gen = np.stack([np.asarray(Image.open(out / "images" / p).convert("RGB")) for p in pngs])
    files = fid.list_images(fake_coco / "val2014")
    assert len(files) == N_IMAGES
    real = np.stack([fid.load_image(f, 256, center_crop=True) for f in files])
    feats = np.asarray(jax.jit(lambda m, im: m.features_uint8(im))(net, np.concatenate([gen, real])))
    want = fid.fid_from_features(feats[: len(gen)], feats[len(gen) :])
    assert res["fid"] == pytest.approx(want, rel=1e-4)

    # the FID command on the saved images against the saved reference statistics gives the same number
    weights = ["--weights", str(fake_coco / "inception_tiny.safetensors"), "--channel-divisor", str(DIV)]
    assert eval_main(["fid", "distance", str(out / "images"), str(ref_stats), *weights, "--batch-size", "16"]) == 0
    assert f"FID: {res['fid']:.4f}" in capsys.readouterr().out
    assert eval_main(["fid", "stats", str(out / "images"), str(tmp_path / "gen.npz"), *weights]) == 0
    mu, sigma = fid.load_stats(tmp_path / "gen.npz")
    assert fid.frechet_distance(mu, sigma, *fid.load_stats(ref_stats)) == pytest.approx(res["fid"], rel=1e-5)

    # re-run: reference statistics come from the file, images from disk (resume), same FID
    CALLS["n"] = 0
    os.remove(out / "images" / "00007.png")
    assert eval_main(argv) == 0
    assert CALLS["n"] == 1  # only the missing image was generated again
    again = json.loads((out / "fid.json").read_text())
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-6)


def test_noise_sampler_is_far():
    s = caption_samplers.NoiseSampler(size=16, seed=0)
    a = s.sample_batch(["x", "y"], np.array([3, 4]))
    np.testing.assert_array_equal(a[1], s.sample_batch(["z"], np.array([4]))[0])  # keyed by index only
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8


@pytest.mark.slow
def test_raphael_sampler_is_independent_of_batching():
    """Per-index noise and device sharding: the same caption index gives the same image whatever the
    batch it is generated in (the tiny config shrunk as in tests/train/test_train.py, random weights)."""
    import importlib.util

    # tests/train/test_train.py's shrunken tiny config (loaded by path: the test folders are not packages)
    spec = importlib.util.spec_from_file_location(
        "_test_train", os.path.join(os.path.dirname(__file__), "..", "train", "test_train.py")
    )
    test_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_train)
    small_config = test_train.small_config

    from raphael_jax.convert.safetensors_io import abstract_module
    from raphael_jax.data.shapes.tokenizer import Tokenizer
    from raphael_jax.models.raphael import build_model
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.state import split_model

    config = small_config()
    # random weights drawn with numpy on the abstract model (eager init of the whole model is slow on CPU)
    graphdef, abstract = split_model(abstract_module(lambda: build_model(config, 0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jax.numpy.asarray(rng.normal(0, 0.05, a.shape), a.dtype), abstract)
    sampler = caption_samplers.RaphaelSampler(
        Sampler(config, graphdef, params, Tokenizer.train_on_world()), seed=5, num_steps=2
    )
    prompts = [
        "a big red circle at the top left",
        "a small blue square in the center",
        "a big green triangle at the bottom",
        "a small white circle at the right",
    ]
    idx = np.array([10, 11, 12, 13])
    whole = sampler.sample_batch(prompts, idx)
    parts = np.concatenate([sampler.sample_batch(prompts[:3], idx[:3]), sampler.sample_batch(prompts[3:], idx[3:])])
    assert whole.shape == (4, config.data.image_size, config.data.image_size, 3) and whole.dtype == np.uint8
    assert np.abs(whole.astype(int) - parts.astype(int)).max() <= 1
    assert np.abs(whole[0].astype(int) - whole[1].astype(int)).max() > 0


def test_shapes_frechet_distance(tmp_path, capsys):
    out = tmp_path / "sfd.safetensors"
    assert eval_main(["sfd", "train", "--out", str(out), "--steps", "6", "--batch-size", "32"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    net, metrics = load_feature_net(out)
    assert metrics["steps"] == 6 and set(metrics["heldout_accuracy"]) == {"colour", "kind", "size", "place"}
    with pytest.raises(FileExistsError):
        save_feature_net(net, out)

    real_a, _, _ = real_images(300, seed=1)
    real_b, _, _ = real_images(300, seed=2)
    noise = np.random.default_rng(0).integers(0, 256, real_a.shape, dtype=np.uint8)
    same = shapes_frechet_distance(net, real_a, real_b)
    far = shapes_frechet_distance(net, real_a, noise)
    print(f"SFD real/real' {same:.4f}  real/noise {far:.4f}")
    assert 0 <= same < far
    # larger generated images are resized to the net's 32x32
    big, _, _ = real_images(8, seed=1, image_size=64)
    assert net.features_uint8(big).shape == (8, net.config.feature_dim)
