"""LoRA and full fine-tuning on the subject set, through the real loop: only adapters train and are saved, the
base run is left bit for bit as it was, and the adapter file gives the run's own samples."""
import hashlib
import os

import jax
import numpy as np
import pytest
from PIL import Image

from raphael_jax.config import load_config
from raphael_jax.train.loop import train_and_evaluate

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
SMALL = ["model.channels=(16, 32)", "model.block_levels=(1, 1)", "model.self_attention_levels=(0, 1)",
         "model.head_dim=16", "text.width=32", "model.context_dim=32", "train.batch_size=4",
         "train.log_every=2", "train.checkpoint_every=3", "train.sample_every=0", "train.warmup_steps=2",
         "sample.num_steps=3", "eval.num_prompts=4"]
PROMPT = "a big green ring at the top"


def cfg(extra=()):
    return load_config(os.path.join(CONFIGS, "tiny.py"), SMALL + list(extra))


def tree_digest(folder):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            h.update(open(p, "rb").read())
            h.update(str(os.stat(p).st_mtime_ns).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base = str(root / "base")
    train_and_evaluate(cfg(), base, num_steps=3)
    digest = tree_digest(base)
    lora_run = str(root / "lora")
    lora_cfg = cfg(["data.kind=subject", "lora.rank=2", f"train.init_from={base}", "train.learning_rate=0.01",
                    "lora.targets=('attention', 'experts', 'convs')"])
    state = train_and_evaluate(lora_cfg, lora_run, num_steps=4)
    return {"root": root, "base": base, "digest": digest, "lora": lora_run, "state": state, "cfg": lora_cfg}


def test_only_adapters_train_and_the_base_is_untouched(runs):
    from raphael_jax.models.lora import matched_keys
    from raphael_jax.train.checkpoint import load_run

    assert tree_digest(runs["base"]) == runs["digest"]  # nothing in the base run was written or touched
    state = runs["state"]
    base = load_run(runs["base"], weights="ema")
    assert set(state["params"]) == set(matched_keys(base.ema_params, ("attention", "experts", "convs")))
    # the trained state is the adapters (their B moved off zero), not the model
    assert all(float(np.abs(np.asarray(ab["b"].get_value())).max()) > 0 for ab in state["params"].values())
    n_adapter = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_base = sum(x.size for x in jax.tree.leaves(base.ema_params))
    assert n_adapter < n_base / 4
    # the checkpoint holds only the adapters
    from raphael_jax.train.checkpoint import RunCheckpoints
    ck = RunCheckpoints(runs["lora"], async_save=False)
    assert ck.latest_step() == 4
    ck.close()
    saved = os.listdir(os.path.join(runs["lora"], "checkpoints", "4", "state"))
    assert saved  # orbax wrote the (small) state
    def du(folder):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)

    assert du(os.path.join(runs["lora"], "checkpoints", "4")) < du(os.path.join(runs["base"], "checkpoints", "3")) / 2


def test_adapter_gradients_only(runs):
    """The step differentiates the adapters alone: the frozen base arrays passed in come back unchanged and
    every adapter gets a gradient."""
    from flax import nnx

    from raphael_jax.diffusion.schedule import NoiseSchedule
    from raphael_jax.models.lora import adapter_scale, apply_lora
    from raphael_jax.models.raphael import build_model
    from raphael_jax.train.checkpoint import load_run
    from raphael_jax.train.step import compute_losses

    c = runs["cfg"]
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(c, 0)), nnx.Param)
    base = load_run(runs["base"], weights="ema").ema_params
    adapters = jax.tree.map(np.asarray, runs["state"]["params"])  # off the training mesh, beside the base
    before = [np.asarray(x).copy() for x in jax.tree.leaves(base)]
    sched = NoiseSchedule.create(c.diffusion.schedule, c.diffusion.num_timesteps)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
             "tokens": np.array([[3, 4, 5, 1] + [0] * 28] * 2, np.int32),
             "mask": np.array([[1] * 4 + [0] * 28] * 2, bool), "edges": np.zeros((2, 32, 32), np.float32)}

    def loss(ad, w):
        model = nnx.merge(graphdef, apply_lora(w, [(ad, adapter_scale(0.0, 2))]))
        return compute_losses(model, c, sched, batch, jax.random.key(0))[0]

    g = jax.jit(jax.grad(loss))(adapters, base)
    assert set(g) == set(adapters)
    assert all(float(np.abs(np.asarray(ab["a"].get_value())).max()) > 0 for ab in g.values())
    for a, b in zip(before, jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_adapter_file_equals_the_run_and_merges(runs, tmp_path):
    """raphael-sample --workdir BASE --lora lora.safetensors(:1) gives the LoRA run's own samples; scale 0 the
    base's."""
    from raphael_jax.cli.sample import main
    from raphael_jax.convert.lora_file import load_adapters

    adapter = os.path.join(runs["lora"], "lora.safetensors")
    _, meta = load_adapters(adapter)
    assert meta["rank"] == 2 and meta["step"] == 4 and meta["subject"]["kind"] == "ring"
    assert meta["base"] == os.path.abspath(runs["base"])

    def sample(workdir, *extra):
        out = tmp_path / f"o{len(os.listdir(tmp_path))}"
        assert main(["--workdir", workdir, "--prompt", PROMPT, "--num", "2", "--out", str(out), *extra]) == 0
        return np.stack([np.asarray(Image.open(out / f"sample_000{i}.png")) for i in range(2)])

    own = sample(runs["lora"])
    merged = sample(runs["base"], "--lora", adapter)
    np.testing.assert_array_equal(own, merged)
    base = sample(runs["base"])
    np.testing.assert_array_equal(sample(runs["base"], "--lora", adapter + ":0"), base)
    assert not np.array_equal(merged, base)
    # two adapters at half scale = one at scale 1 (up to float rounding of the sum: compare weights)
    from raphael_jax.models.lora import merge_lora
    from raphael_jax.train.checkpoint import load_run
    from raphael_jax.train.finetune import load_lora_files
    w = load_run(runs["base"], weights="ema").ema_params
    one = merge_lora(w, load_lora_files([adapter], w))
    two = merge_lora(w, load_lora_files([adapter + ":0.5", adapter + ":0.5"], w))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sample_upscale_writes_each_sample_upscaled(runs, tmp_path):
    """raphael-sample --upscale WEIGHTS: sample_NNNN_x4.png is the tiled upscale of sample_NNNN.png."""
    from flax import nnx

    from raphael_jax.cli.sample import main
    from raphael_jax.convert.esrgan import save_rrdbnet
    from raphael_jax.models.rrdbnet import RRDBNet, RRDBNetConfig
    from raphael_jax.models.upscale_tiling import upscale_tiled

    g = RRDBNet(RRDBNetConfig(num_feat=8, num_block=1, num_grow_ch=4), rngs=nnx.Rngs(0))
    weights = save_rrdbnet(g, tmp_path / "g.safetensors")
    out = tmp_path / "out"
    assert main(["--workdir", runs["base"], "--prompt", PROMPT, "--num", "2", "--out", str(out),
                 "--upscale", str(weights), "--upscale-tile", "48"]) == 0
    for i in range(2):
        small = np.asarray(Image.open(out / f"sample_000{i}.png"))
        big = np.asarray(Image.open(out / f"sample_000{i}_x4.png"))
        assert big.shape == (4 * small.shape[0], 4 * small.shape[1], 3)
        np.testing.assert_array_equal(big, upscale_tiled(g, small, tile=48))
        assert Image.open(out / f"sample_000{i}_x4.png").text["upscale"] == str(weights)


def test_lora_run_resumes_and_refuses_another_base_model(runs, tmp_path):
    from raphael_jax.train.checkpoint import load_run

    state = train_and_evaluate(runs["cfg"], runs["lora"], num_steps=6)  # resumes from step 4
    assert int(state["step"]) == 6
    assert load_run(runs["lora"]).step == 6
    other = cfg(["data.kind=subject", "lora.rank=2", f"train.init_from={runs['base']}", "model.head_dim=8"])
    with pytest.raises(ValueError, match="was trained with another model"):
        train_and_evaluate(other, str(tmp_path / "x"), num_steps=1)


def test_full_finetune_on_the_subject(runs, tmp_path):
    """The comparison's other arm: every weight trains from the base (train.init_from without lora)."""
    from raphael_jax.train.checkpoint import load_run

    full = str(tmp_path / "full")
    train_and_evaluate(cfg(["data.kind=subject", f"train.init_from={runs['base']}"]), full, num_steps=2)
    a, b = load_run(full).params, load_run(runs["base"]).params
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert tree_digest(runs["base"]) == runs["digest"]


@pytest.fixture(scope="module")
def control_run(runs):
    """A ControlNet trained a few steps (a high learning rate, so its zero convs leave zero) on the base."""
    ctrl = str(runs["root"] / "control")
    c = cfg(["control.enabled=True", f"train.init_from={runs['base']}", "data.caption_places=False",
             "data.object_weights=(1.0, 1.0, 0.0)", "train.learning_rate=0.05", "train.warmup_steps=0",
             "train.ema_decay=0.0"])
    state = train_and_evaluate(c, ctrl, num_steps=3)
    from PIL import Image

    from raphael_jax.data.shapes.world import example
    ref = runs["root"] / "scene.png"
    Image.fromarray(example(0, 3, 32, 1, 2, stream=1)["image"]).save(ref)
    return {"dir": ctrl, "state": state, "ref": str(ref)}


def test_controlnet_trains_alone_and_strength_zero_is_the_base(runs, control_run, tmp_path):
    from raphael_jax.cli.sample import main

    assert tree_digest(runs["base"]) == runs["digest"]
    zero_convs = control_run["state"]["params"]["zero_convs"]
    assert any(float(np.abs(np.asarray(x)).max()) > 0 for x in jax.tree.leaves(zero_convs))  # they trained

    def sample(workdir, *extra):
        out = tmp_path / f"o{len(os.listdir(tmp_path))}"
        assert main(["--workdir", workdir, "--prompt", "a big red circle", "--num", "2", "--out", str(out),
                     *extra]) == 0
        return np.stack([np.asarray(Image.open(out / f"sample_000{i}.png")) for i in range(2)])

    base = sample(runs["base"])
    np.testing.assert_array_equal(sample(control_run["dir"], "--control", control_run["ref"], "--control-scale", "0"),
                                  base)
    assert not np.array_equal(sample(control_run["dir"], "--control", control_run["ref"]), base)
    np.testing.assert_array_equal(sample(control_run["dir"]), base)  # no control image: the base model


def test_sample_refuses_wrong_adapters_and_controls(runs, control_run, tmp_path, capsys):
    from raphael_jax.cli.sample import main

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an adapter")
    for extra, expect in ((["--workdir", runs["base"], "--lora", str(tmp_path / "nope.safetensors")],
                           "no such adapter file"),
                          (["--workdir", runs["base"], "--lora", f"{bad}:0.5"], "truncated or corrupt"),
                          (["--workdir", runs["base"], "--control", control_run["ref"]], "is not a ControlNet run"),
                          (["--workdir", control_run["dir"], "--control", str(bad)], "cannot read it as an image")):
        with pytest.raises(SystemExit) as e:
            main([*extra, "--prompt", "a big red circle", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and expect in err[-1] and "Traceback" not in "\n".join(err), err
        assert not (tmp_path / "out").exists()


def test_controlnet_measurement_cli(control_run, capsys):
    import json

    from raphael_jax.cli.eval import main

    assert main(["control", "--workdir", control_run["dir"], "--num-prompts", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "follow:" in out and "recolour:" in out and "no_control:" in out
    saved = json.load(open(out.strip().splitlines()[-1].split("saved ", 1)[1]))
    assert set(saved["results"]) == {"follow", "recolour", "no_control"}


def test_subject_measurement_cli(runs, capsys):
    import json

    from raphael_jax.cli.eval import main

    assert main(["subject", "--workdir", runs["base"], "--subject-of", runs["lora"], "--num-prompts", "2",
                 "--steps", "2", "--tag", "t"]) == 0
    out = capsys.readouterr().out
    saved = json.load(open(out.strip().splitlines()[-1].split("saved ", 1)[1]))
    assert saved["results"]["unseen"]["num_prompts"] == 2 and "colour_collapse" in saved["results"]["unseen"]
    assert saved["results"]["retention"]["num_prompts"] == 2
