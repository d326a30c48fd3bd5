"""Diffusion-path analysis: templates, token lookup, routes of a tiny trained run, the classifier, plots."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from raphael_jax.analysis.paths import (
    CATEGORIES,
    PathRecorder,
    classify_paths,
    make_templates,
    word_token_index,
)
from raphael_jax.config import load_config
from raphael_jax.data.shapes.world import parse_caption
from raphael_jax.models.moe import SpaceMoE

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
# a very small model: 3 RAPHAEL blocks (1 down, 2 up, at 8x8), 1-layer text encoder
SMALL = ["model.channels=(8, 16)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 0)",
         "model.mid_block=False", "model.head_dim=8", "text.width=16", "model.context_dim=16",
         "text.num_layers=1", "model.edge.channels=4", "model.edge.num_layers=2", "train.batch_size=2",
         "train.log_every=1", "train.checkpoint_every=2",
         "train.sample_every=0", "train.warmup_steps=1", "sample.num_steps=3", "eval.num_prompts=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from raphael_jax.train.loop import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("paths") / "run")
    train_and_evaluate(load_config(os.path.join(CONFIGS, "tiny.py"), SMALL), workdir, num_steps=2)
    return workdir


@pytest.fixture(scope="module")
def recorder(run):
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.checkpoint import load_run

    return PathRecorder(Sampler.from_run(load_run(run)))


def test_templates_fill_to_world_captions():
    for cat, words in CATEGORIES.items():
        templates = make_templates(cat, 12, seed=1)
        assert len(templates) == 12 and all(t.text.count("{}") == 1 for t in templates)
        assert make_templates(cat, 12, seed=1) == templates  # deterministic
        assert len({len(t.objects) for t in templates}) > 1    # 1- to 3-object contexts
        for t in templates:
            for w in words:
                if cat != "place":  # a filled-in place may collide with another object's cell
                    objs = parse_caption(t.fill(w))
                    assert getattr(objs[t.slot], cat) == w


def test_word_token_index_single_and_multi_token(recorder):
    tok, max_len = recorder.tokenizer, recorder.config.text.max_len
    [t] = [t for t in make_templates("colour", 40, seed=0) if len(t.objects) == 2 and t.slot == 1][:1]
    ids, mask = tok.encode([t.fill("red")], max_len)
    words = t.fill("red").split()
    assert int(mask.sum()) - 1 == len(words)  # the world's tokenizer: one token per word
    i = word_token_index(tok, t, "red", max_len)
    assert words[i] == "red" and i > 8  # the second object's colour, not an earlier "red"
    assert word_token_index(tok, t, "red", max_len, token="first") == i
    [p] = [p for p in make_templates("place", 20, seed=0) if len(p.objects) == 1][:1]
    last = word_token_index(tok, p, "top left", max_len, "last")
    first = word_token_index(tok, p, "top left", max_len, "first")
    assert p.fill("top left").split()[first:last + 1] == ["top", "left"]
    assert word_token_index(tok, p, "center", max_len) == len(p.fill("center").split()) - 1


def test_recorded_paths_follow_the_text_gate(recorder):
    """One route per space-MoE layer per word, equal to argmax of each layer's gate on E(y_i)."""
    templates = make_templates("kind", 5, seed=0)
    rec = recorder.word_paths("kind", templates)
    n_layers = len(recorder.space_layers)
    assert n_layers == 3
    assert rec["paths"].shape == (3, 5, n_layers)
    assert rec["paths"].min() >= 0 and rec["paths"].max() < recorder.num_space_experts
    # golden: the gate network applied directly to the text encoder's states
    s = recorder.sampler
    model = nnx.merge(s.graphdef, s.params)
    tokens, mask = s.tokenize(rec["prompts"][1])
    ctx = model.encode_text(tokens, mask)
    gates = {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, SpaceMoE)}
    for layer, name in enumerate(recorder.space_layers):
        logits = np.asarray(gates[name].gate.logits(ctx))  # [5, L, K]
        want = logits.argmax(-1)[np.arange(5), rec["token_index"][1]]
        np.testing.assert_array_equal(rec["paths"][1, :, layer], want)


def test_time_routes_over_ddim(recorder):
    tr = recorder.time_routes_over_ddim(["a big red circle at the top left", "a small blue square"],
                                        num_steps=3, guidance=3.0)
    assert tr["routes"].shape == (3, len(recorder.time_layers), 4)  # steps, blocks, cond+uncond
    assert tr["timesteps"] == sorted(tr["timesteps"], reverse=True)
    assert tr["agreement"] == 1.0  # the time gate sees t alone
    np.testing.assert_allclose(tr["usage"].sum(1), 1.0)


def test_classifier_on_synthetic_paths():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(6)]
    codes = rng.integers(0, 4, (6, 7))
    codes[:, 0] = np.arange(6) % 4
    codes[:, 1] = np.arange(6) // 4  # every word its own path
    labels = np.repeat(words, 30)
    det = classify_paths(np.repeat(codes, 30, axis=0), labels, seed=0)
    assert det["accuracy"] == 1.0 and det["chance"] == pytest.approx(1 / 6) and det["distinct_paths"] == 6
    assert np.trace(np.asarray(det["confusion"])) == 180
    rand = classify_paths(rng.integers(0, 4, (180, 7)), labels, seed=0)
    assert abs(rand["accuracy"] - 1 / 6) < 0.12, rand["accuracy"]
    with pytest.raises(ValueError, match="at least folds"):
        classify_paths(np.zeros((6, 3), int), ["a", "b"] * 3)


def test_cli_writes_json_and_plots(run, recorder, tmp_path, monkeypatch):
    # the run is already loaded (the recorder fixture): skip a second restore
    import raphael_jax.train.checkpoint as checkpoint
    from raphael_jax.cli.paths import main
    from raphael_jax.sampling import Sampler

    monkeypatch.setattr(checkpoint, "load_run", lambda *a, **k: None)
    monkeypatch.setattr(Sampler, "from_run", classmethod(lambda cls, *a, **k: recorder.sampler))
    out = tmp_path / "paths"
    assert main(["--workdir", run, "--out", str(out), "--templates", "5", "--time-prompts", "2",
                 "--ddim-steps", "3", "--categories", "colour,kind,place"]) == 0
    res = json.load(open(out / "paths.json"))
    assert res["token"] == "last" and len(res["space_layers"]) == 3
    for cat, n_words in (("colour", 8), ("kind", 3), ("place", 9)):
        r = res["categories"][cat]
        assert np.asarray(r["paths"]).shape == (n_words, 5, 3)
        c = r["classification"]
        assert 0.0 <= c["accuracy"] <= 1.0 and c["chance"] == pytest.approx(1 / n_words)
        assert (out / f"routes_{cat}.png").stat().st_size > 1000
    t = json.load(open(out / "time_experts.json"))
    assert len(t["timesteps"]) == 3 and len(t["usage"]) == 3
    assert (out / "time_experts.png").stat().st_size > 1000
    assert "chance" in (out / "summary.md").read_text()
