"""A latent run end to end, as a user runs it: a LAION-style folder -> ``raphael-data image-text`` ->
``raphael-precompute`` with a tiny random CLIP (transformers) and VAE (diffusers) written by
``save_pretrained`` -> ``raphael-train`` (a few steps, with a VAE-decoded preview) -> ``raphael-sample`` at a
bucket size -> FID of the samples against the folder. Then the same run moved to a new folder with its
weights elsewhere (``--clip`` / ``--vae``), the notebook, and COCO FID-30k through the same sampler."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from references.latent_fixtures import LATENT_SMALL, write_fake_coco, write_tiny_inception, write_tiny_vae

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CONFIG = os.path.join(ROOT, "configs", "small_latent.py")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SIDES = ("left", "right")
WORDS = ["a", "box", "on", "the", *COLOURS, *SIDES]
DIV = 16                     # buckets 28x52 ... 40x40 ... 52x28; the tiny VAE halves them
SQUARE, WIDE = (40, 40), (28, 52)
N_SQUARE, N_OTHER = 48, 16   # batch 8: only the square bucket is served (one compiled train step)
INCEPTION_DIV = 64


def _folder(root):
    """64 captioned images: a coloured box on the left or right of a grey background, 48 square and 16 of
    other aspect ratios; side-car .txt captions as in LAION folders."""
    from raphael_jax.data.real.buckets import scaled_buckets

    root.mkdir()
    rs = np.random.RandomState(0)
    others = [hw for hw in scaled_buckets(DIV) if hw != SQUARE]
    sizes = [SQUARE] * N_SQUARE + [others[i % len(others)] for i in range(N_OTHER)]
    for i, (h, w) in enumerate(sizes):
        colour, side = list(COLOURS)[i % 4], SIDES[(i // 4) % 2]
        img = np.full((h, w, 3), 128, np.uint8) + rs.randint(0, 8, (h, w, 3)).astype(np.uint8)
        x0 = w // 8 if side == "left" else w // 2 + w // 8
        img[h // 4: 3 * h // 4, x0: x0 + w // 4] = COLOURS[colour]
        Image.fromarray(img).save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(f"a {colour} box on the {side}")
    return root


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from raphael_jax.cli import data as data_cli
    from raphael_jax.cli import precompute as precompute_cli
    from raphael_jax.cli import train as train_cli
    from raphael_jax.data.shapes.clip_vocab import write_clip_vocab
    from raphael_jax.tools.tiny_clip import write_random_clip

    root = tmp_path_factory.mktemp("latent_e2e")
    folder = _folder(root / "laion")
    write_clip_vocab(root / "vocab", WORDS)
    clip = write_random_clip(root / "clip", root / "vocab", hidden_size=32, num_layers=2, num_heads=4,
                             intermediate_size=64)
    vae = write_tiny_vae(root / "vae")
    assert data_cli.main(["image-text", str(folder), "--data-dir", str(root / "tfds"), "--name", "e2e",
                          "--scale-divisor", str(DIV), "--min-aesthetic", "-1", "--max-watermark", "-1"]) == 0
    build = root / "tfds" / "image_text" / "e2e" / "1.0.0"
    latents = root / "latents"
    common = ["--config", CONFIG, *[a for kv in LATENT_SMALL for a in ("--set", kv)]]
    assert precompute_cli.main([*common, "--set", f"data.tfds_dir={build}", "--set", f"data.vae_dir={vae}",
                                "--set", f"data.clip_dir={clip}", "--set", f"data.latents_dir={latents}",
                                "--batch-size", "8"]) == 0
    work = root / "run"
    assert train_cli.main([*common, "--workdir", str(work), "--set", f"data.latents_dir={latents}",
                           "--set", "train.batch_size=8", "--set", "train.num_steps=4", "--set", "train.sample_every=4",
                           "--set", "sample.num_steps=3"]) == 0
    return {"root": root, "folder": folder, "work": work, "clip": str(clip), "vae": str(vae), "latents": latents}


def _pngs(folder):
    return sorted(p for p in os.listdir(folder) if p.startswith("sample_"))


def test_run_records_encoders_and_previews(latent_run):
    work = latent_run["work"]
    rec = json.loads((work / "encoders.json").read_text())
    assert rec["clip"] == os.path.abspath(latent_run["clip"]) and rec["vae"] == os.path.abspath(latent_run["vae"])
    assert rec["text_layer"] == "last" and rec["latent_channels"] == 4 and rec["vae_factor"] == 2
    assert [28, 52] in rec["buckets"] and [40, 40] in rec["buckets"] and len(rec["buckets"]) == 9
    meta = json.loads((latent_run["latents"] / "meta.json").read_text())
    assert rec["scaling_factor"] == meta["scaling_factor"]
    # the training preview was sampled and decoded by the VAE: an RGB grid of 40x40 images
    previews = os.listdir(work / "samples")
    assert previews == ["step_0000004.png"]
    with Image.open(work / "samples" / previews[0]) as im:
        grid = np.asarray(im)
        assert im.text["height"] == "40" and im.text["clip_x0"] == "None"
    assert grid.shape[2] == 3 and (grid.shape[1] - 2) % 42 == 0 and grid.std() > 1


def test_sample_cli_at_a_bucket_size_and_fid(latent_run, tmp_path, capsys):
    from raphael_jax.cli.eval import main as eval_main
    from raphael_jax.cli.sample import main as sample_main

    out = tmp_path / "samples"
    args = ["--workdir", str(latent_run["work"]), "--prompt", "a red box on the left", "--prompt",
            "a blue box on the right", "--num", "4", "--out", str(out), "--steps", "3"]
    assert sample_main([*args, "--height", str(WIDE[0]), "--width", str(WIDE[1])]) == 0
    pngs = _pngs(out)
    assert len(pngs) == 8 and os.path.isfile(out / "grid.png")
    images = []
    for p in pngs:
        with Image.open(out / p) as im:
            assert im.size == (WIDE[1], WIDE[0]) and im.mode == "RGB"
            assert im.text["prompt"] in ("a red box on the left", "a blue box on the right")
            assert im.text["height"] == "28" and im.text["width"] == "52" and im.text["steps"] == "3"
            assert im.text["seed"] == "0" and im.text["workdir"] == str(latent_run["work"].resolve())
            images.append(np.asarray(im).astype(np.float32))
    images = np.stack(images)
    assert images.std(axis=(1, 2, 3)).min() > 1.0            # not constant
    assert np.abs(images[0] - images[1]).max() > 0            # per-image noise
    # default size: the most square bucket
    assert sample_main([*args[:-2], "--num", "1", "--out", str(tmp_path / "sq")]) == 0
    with Image.open(tmp_path / "sq" / "sample_0000.png") as im:
        assert im.size == (40, 40)
    # sizes the VAE factor x U-Net downsampling (2 x 2) does not divide: exit 2, one line
    with pytest.raises(SystemExit) as e:
        sample_main([*args, "--height", "30", "--width", "52", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and "height 30 is not a positive multiple of 4" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    # FID of the samples against the folder (tiny random Inception; both resized to 64 px)
    weights = write_tiny_inception(tmp_path / "inception.safetensors", channel_divisor=INCEPTION_DIV)
    capsys.readouterr()
    assert eval_main(["fid", "distance", str(out), str(latent_run["folder"]), "--weights", weights,
                      "--channel-divisor", str(INCEPTION_DIV), "--size", "64", "--batch-size", "16"]) == 0
    fid = float(capsys.readouterr().out.split("FID:")[1])
    assert np.isfinite(fid) and fid > 0


def test_moved_run_samples_with_clip_and_vae_flags(latent_run, tmp_path, capsys):
    from raphael_jax.cli.sample import main as sample_main

    moved = tmp_path / "elsewhere"
    shutil.copytree(latent_run["work"], moved / "run")
    shutil.copytree(latent_run["clip"], moved / "weights" / "clip")
    shutil.copytree(latent_run["vae"], moved / "weights" / "vae")
    rec = json.loads((moved / "run" / "encoders.json").read_text())
    rec["clip"], rec["vae"], rec["tokenizer"] = "/nonexistent/clip", "/nonexistent/vae", "/nonexistent/clip"
    (moved / "run" / "encoders.json").write_text(json.dumps(rec))  # recorded on another machine
    base = ["--workdir", str(moved / "run"), "--prompt", "a green box on the left", "--num", "2", "--steps", "3"]
    with pytest.raises(SystemExit) as e:
        sample_main([*base, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "/nonexistent/clip" in err and "--clip" in err
    assert sample_main([*base, "--out", str(tmp_path / "b"), "--clip", str(moved / "weights" / "clip"),
                        "--vae", str(moved / "weights" / "vae")]) == 0
    ref = tmp_path / "ref"
    assert sample_main(["--workdir", str(latent_run["work"]), *base[2:], "--out", str(ref)]) == 0
    for p in _pngs(ref):  # the same weights wherever they live: the same images
        np.testing.assert_array_equal(np.asarray(Image.open(ref / p)), np.asarray(Image.open(tmp_path / "b" / p)))


def test_sampler_matches_training_text_states_and_shards_batches(latent_run):
    """The sampler's CLIP states of a training caption are the precomputed ones; a batch sharded over 8
    devices, with the weights FSDP-sharded, gives the images of one device."""
    import jax

    from raphael_jax.data.latents import LatentsSource
    from raphael_jax.sampling import Sampler, local_plan
    from raphael_jax.train.checkpoint import load_run

    src = LatentsSource(latent_run["latents"])
    r = src[0]
    one = Sampler.from_run(load_run(str(latent_run["work"]), weights="ema"), plan=local_plan(
        load_run(str(latent_run["work"]), weights="ema").config, jax.local_devices()[:1]))
    ctx = one.encode([r["caption"]])
    np.testing.assert_allclose(np.asarray(ctx["context"])[0], r["text_states"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ctx["mask"])[0], r["mask"])
    assert len(jax.local_devices()) == 8
    run = load_run(str(latent_run["work"]), weights="ema", plan=local_plan(one.config))
    eight = Sampler.from_run(run, shard_params=True)
    leaves = [x for x in jax.tree.leaves(eight.params) if x.ndim >= 2 and x.shape[-1] % 8 == 0]
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in leaves)
    prompts = ["a red box on the right", "a yellow box on the left", "a blue box on the left"]
    a = one.sample(prompts, seed=3, num_steps=3)
    b = eight.sample(prompts, seed=3, num_steps=3)
    assert a.shape == (3, 40, 40, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_notebook_on_a_latent_run(latent_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("RAPHAEL_WORKDIR", str(latent_run["work"]))
    monkeypatch.setenv("RAPHAEL_PROMPTS", "a red box on the left|a blue box on the right")
    monkeypatch.setenv("RAPHAEL_STEPS", "3")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend captures the figures
    path = os.path.join(ROOT, "notebooks", "sample.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "loaded step 4" in text and "latent run" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2


def test_coco_fid_on_the_latent_run(latent_run, tmp_path, capsys):
    from raphael_jax.cli.eval import main as eval_main

    coco = write_fake_coco(tmp_path / "coco", 56, WORDS)
    weights = write_tiny_inception(tmp_path / "inception.safetensors", channel_divisor=INCEPTION_DIV)
    out = tmp_path / "eval"
    argv = ["coco-fid", "--workdir", str(latent_run["work"]), "--annotations",
            str(coco / "annotations" / "captions_val2014.json"), "--coco-images", str(coco / "val2014"),
            "--ref-stats", str(tmp_path / "ref.npz"), "--num", "56", "--steps", "2",
            "--inception-weights", weights, "--inception-channel-divisor", str(INCEPTION_DIV),
            "--batch-size", "28", "--fid-batch-size", "28", "--image-size", "64", "--height", "28", "--width", "52",
            "--out", str(out)]
    assert eval_main(argv) == 0
    res = json.loads((out / "fid.json").read_text())
    assert res["num_images"] == 56 and np.isfinite(res["fid"]) and res["fid"] > 0
    captions = json.loads((out / "captions.json").read_text())
    with Image.open(out / "images" / "00005.png") as im:  # decoded RGB, resized to 64 for the FID
        assert im.size == (64, 64) and im.text["prompt"] == captions[5]["caption"]
        assert np.asarray(im).std() > 1


def test_tiled_decode_in_the_sampler(latent_run):
    """Latents wider than ``sample.vae_tile`` are decoded in tiles, equal to the untiled decode."""
    from raphael_jax.models.vae_tiling import receptive_radius, tile_layout
    from raphael_jax.sampling import LatentDecoder, Sampler
    from raphael_jax.train.checkpoint import load_run

    sampler = Sampler.from_run(load_run(str(latent_run["work"]), weights="ema"))
    _, z = sampler.sample(["a red box on the left"], seed=1, num_steps=2, height=WIDE[0], width=WIDE[1],
                          return_latents=True)
    d = sampler.decoder
    tile = 2 * receptive_radius(d.vae.config) + 2
    assert tile_layout(*z.shape[1:3], tile=tile, halo=receptive_radius(d.vae.config)).n_tiles > 1
    tiled = LatentDecoder(d.vae, d.scaling_factor, d.shift_factor, tile=tile)
    untiled = LatentDecoder(d.vae, d.scaling_factor, d.shift_factor, tile=0)
    a, b = np.asarray(tiled(z)), np.asarray(untiled(z))
    assert a.shape == b.shape == (1, *WIDE, 3)
    assert np.abs(a - b).max() < 1e-3


def test_lora_on_the_latent_run(latent_run, tmp_path):
    """LoRA fine-tunes a latent run too (text states from CLIP, VAE latents): only adapters train, its base is
    untouched, and its adapter file applied to the base samples what the LoRA run samples."""
    from raphael_jax.cli import sample as sample_cli
    from raphael_jax.cli import train as train_cli

    work, lora = latent_run["work"], tmp_path / "lora"
    before = sorted((p, os.path.getmtime(os.path.join(d, p))) for d, _, fs in os.walk(work) for p in fs)
    common = ["--config", CONFIG, *[a for kv in LATENT_SMALL for a in ("--set", kv)]]
    assert train_cli.main([*common, "--workdir", str(lora), "--set", f"data.latents_dir={latent_run['latents']}",
                           "--set", "train.batch_size=8", "--set", "train.num_steps=2", "--set", "train.sample_every=0",
                           "--set", "lora.rank=2", "--set", f"train.init_from={work}",
                           "--set", "train.learning_rate=0.01", "--set", "sample.num_steps=3"]) == 0
    assert sorted((p, os.path.getmtime(os.path.join(d, p))) for d, _, fs in os.walk(work) for p in fs) == before
    assert (lora / "lora.safetensors").is_file() and (lora / "encoders.json").is_file()
    outs = []
    for args in (["--workdir", str(lora)], ["--workdir", str(work), "--lora", str(lora / "lora.safetensors")]):
        out = tmp_path / f"s{len(outs)}"
        assert sample_cli.main([*args, "--prompt", "a big red circle", "--num", "2", "--out", str(out),
                                "--steps", "2"]) == 0
        outs.append(np.stack([np.asarray(Image.open(out / n)) for n in _pngs(out)]))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_controlnet_on_the_latent_run(latent_run, tmp_path):
    """A ControlNet trains on the latent run's edge maps (latent resolution, from raphael-precompute); sampling
    pools the control image's edges to the latents; strength 0 is the base run's samples exactly."""
    from raphael_jax.cli import sample as sample_cli
    from raphael_jax.cli import train as train_cli

    work, ctrl = latent_run["work"], tmp_path / "ctrl"
    common = ["--config", CONFIG, *[a for kv in LATENT_SMALL for a in ("--set", kv)]]
    assert train_cli.main([*common, "--workdir", str(ctrl), "--set", f"data.latents_dir={latent_run['latents']}",
                           "--set", "train.batch_size=8", "--set", "train.num_steps=2", "--set", "train.sample_every=0",
                           "--set", "control.enabled=True", "--set", f"train.init_from={work}",
                           "--set", "train.learning_rate=0.05", "--set", "train.warmup_steps=0",
                           "--set", "train.ema_decay=0.0", "--set", "sample.num_steps=3"]) == 0
    scene = tmp_path / "scene.png"
    Image.fromarray(np.asarray(Image.open(next(latent_run["folder"].glob("*.png"))).convert("RGB"))).save(scene)
    outs = []
    for args in (["--workdir", str(work)], ["--workdir", str(ctrl), "--control", str(scene), "--control-scale", "0"],
                 ["--workdir", str(ctrl), "--control", str(scene)]):
        out = tmp_path / f"s{len(outs)}"
        assert sample_cli.main([*args, "--prompt", "a big red circle", "--num", "2", "--out", str(out),
                                "--steps", "2", "--height", "40", "--width", "40"]) == 0
        outs.append(np.stack([np.asarray(Image.open(out / n)) for n in _pngs(out)]))
    np.testing.assert_array_equal(outs[1], outs[0])
    # the trained ControlNet moves the samples (compared in latent space: after 4 base steps the decoded
    # images hardly depend on the U-Net's output)
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.checkpoint import load_run
    sampler = Sampler.from_run(load_run(str(ctrl)))
    hint = np.zeros((2, 20, 20, 1), np.float32)
    hint[:, 5:15, 5] = 1.0
    lat = [sampler.sample(["a big red circle"] * 2, num_steps=2, height=40, width=40, hint=hint, control_scale=s,
                          return_latents=True)[1] for s in (0.0, 1.0)]
    assert np.abs(lat[1] - lat[0]).max() > 0
