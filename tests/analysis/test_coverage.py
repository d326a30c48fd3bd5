"""Space-expert coverage (raphael_jax.analysis.coverage): hand-made masks, a numpy reference of the space-MoE's
weighted counts, hand-set routing and thresholds on a tiny U-Net, the DDIM and data sources, bench/moe_coverage.py."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raphael_jax.analysis.coverage import (
    CoverageRecorder,
    check_edges,
    coverage_markdown,
    expert_coverage,
    measure_coverage,
    range_timesteps,
    summarize,
)
from raphael_jax.analysis.paths import _short_layer
from raphael_jax.config import load_config
from raphael_jax.models.moe import SpaceMoE
from raphael_jax.models.routing import pop_intermediates

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIGS = os.path.join(ROOT, "configs")
# the very small model of tests/analysis/test_paths.py: 3 RAPHAEL blocks (1 down, 2 up, at 8x8), 4 space experts
SMALL = ["model.channels=(8, 16)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 0)",
         "model.mid_block=False", "model.head_dim=8", "text.width=16", "model.context_dim=16",
         "text.num_layers=1", "model.edge.channels=4", "model.edge.num_layers=2", "train.batch_size=2",
         "train.log_every=1", "train.checkpoint_every=2",
         "train.sample_every=0", "train.warmup_steps=1", "sample.num_steps=3", "eval.num_prompts=2"]
PROMPTS = ["a big red circle at the top left", "a small blue square in the center",
           "a big green triangle at the bottom right"]


# ------------------------------------------------------------------------------- pure functions

def test_hand_made_masks():
    """16 positions, 5 tokens: expected shares counted by hand from the fixture."""
    n, L = 16, 5
    masks = np.zeros((1, n, L), np.float32)
    masks[0, 0:4, 0] = 1     # token 0 -> expert 0, positions 0-3
    masks[0, 2:8, 1] = 1     # token 1 -> expert 0, positions 2-7 (overlaps token 0): expert 0 covers 0-7
    masks[0, 8, 2] = 1       # token 2 -> expert 1, position 8
    masks[0, 7:10, 3] = 1    # token 3 -> expert 3, positions 7-9 (7 shared with expert 0, 8 with expert 1)
    masks[0, :, 4] = 1       # token 4: padding (route -1) covering everything: must not count
    routes = np.array([[0, 0, 1, 3, -1]])
    per, union = expert_coverage(masks, routes, 4)
    np.testing.assert_allclose(np.asarray(per), [[8 / 16, 1 / 16, 0.0, 3 / 16]])
    np.testing.assert_allclose(np.asarray(union), [10 / 16])  # positions 0-9


def test_against_a_loop_over_positions():
    rng = np.random.default_rng(0)
    b, n, L, k = 3, 20, 6, 5
    masks = (rng.random((b, n, L)) < 0.15).astype(np.float32)
    routes = rng.integers(-1, k, (b, L))
    per, union = (np.asarray(a) for a in expert_coverage(masks, routes, k))
    for bi in range(b):
        for e in range(k):
            covered = [any(masks[bi, j, i] and routes[bi, i] == e for i in range(L)) for j in range(n)]
            assert per[bi, e] == pytest.approx(sum(covered) / n)
        anyc = [any(masks[bi, j, i] and routes[bi, i] >= 0 for i in range(L)) for j in range(n)]
        assert union[bi] == pytest.approx(sum(anyc) / n)


@pytest.mark.parametrize("average", ["real", "all"])
def test_support_of_the_space_moe_weighted_counts(average):
    """Coverage from the sown masks and routes = share of positions where the space-MoE's weighted count
    C_k[j] = sum_{i: route(i)=k} w_i M_hat[j, i] (recomputed here in numpy from its gate) is nonzero."""
    rng = np.random.default_rng(1)
    b, n, L, d, c, k = 3, 12, 7, 8, 10, 4
    moe = SpaceMoE(d, c, k, 16, 8, alpha=0.5, average=average, rngs=nnx.Rngs(0))
    h = rng.normal(size=(b, n, d)).astype(np.float32)
    attn = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, n, L)) * 2, jnp.float32), axis=1)
    ctx = rng.normal(size=(b, L, c)).astype(np.float32)
    mask = np.arange(L)[None] < np.array([[5], [7], [2]])
    moe(jnp.asarray(h), attn, jnp.asarray(ctx), jnp.asarray(mask), record_masks=True)
    inter = pop_intermediates(moe)
    per, union = (np.asarray(a) for a in expert_coverage(inter["region_masks"][0], inter["space_route"][0], k))
    # numpy: gate probabilities, thresholded masks, weighted counts as the space-MoE's docstring defines them
    logits = np.asarray(moe.gate.logits(jnp.asarray(ctx)))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    route = probs.argmax(-1)
    w = probs.max(-1) * (mask if average == "real" else np.ones_like(mask))
    a = np.asarray(attn)
    m_hat = a >= 0.5 * a.max(axis=1, keepdims=True)
    counts = np.einsum("bnl,blk->bnk", m_hat.astype(np.float64), np.eye(k)[route] * w[..., None])
    np.testing.assert_allclose(per, (counts > 0).mean(1))
    np.testing.assert_allclose(union, (counts > 0).any(-1).mean(1))
    if average == "real":  # padding never counts: the 2-token prompt covers no more than its 2 tokens' masks
        assert union[2] == pytest.approx(m_hat[2, :, :2].any(-1).mean())


def test_summarize_ranges_and_weights():
    # 4 evaluations, 2 layers (64 and 16 positions), 2 experts
    t = np.array([10, 260, 270, 900])
    per = np.array([[[1.0, 0.0], [0.5, 0.5]],
                    [[0.2, 0.4], [1.0, 0.0]],
                    [[0.4, 0.0], [0.0, 1.0]],
                    [[0.1, 0.1], [0.3, 0.3]]])
    union = np.array([[1.0, 1.0], [0.5, 1.0], [0.4, 1.0], [0.2, 0.5]])
    s = summarize(t, per, union, (0, 250, 500, 750, 1000), [64, 16], [100, 400])
    assert s["count"].tolist() == [1, 2, 0, 1]
    np.testing.assert_allclose(s["coverage"][1], [[0.3, 0.2], [0.5, 0.5]])  # mean of evaluations 2 and 3
    np.testing.assert_allclose(s["union"][1], [0.45, 1.0])
    assert np.isnan(s["coverage"][2]).all() and np.isnan(s["pairs_positions"][2])
    # range [0, 250): layer pairs 0.5 and 0.5 -> 0.5 whatever the weights
    assert s["pairs_positions"][0] == pytest.approx(0.5) and s["pairs_flops"][0] == pytest.approx(0.5)
    # range [250, 500): layer pairs 0.25 (64 positions, 64*100 FLOP) and 0.5 (16 positions, 16*400 FLOP)
    assert s["pairs_positions"][1] == pytest.approx((0.25 * 64 + 0.5 * 16) / 80)
    assert s["pairs_flops"][1] == pytest.approx((0.25 * 6400 + 0.5 * 6400) / 12800)
    np.testing.assert_allclose(s["routed"][1], [0.75, 0.5])  # experts with nonzero coverage
    o = s["overall"]
    np.testing.assert_allclose(o["coverage"], per.mean(0))
    assert o["pairs_positions"] == pytest.approx((per[:, 0].mean() * 64 + per[:, 1].mean() * 16) / 80)
    with pytest.raises(ValueError, match="outside"):
        summarize(np.array([1000]), per[:1], union[:1], (0, 500, 1000), [64, 16], [1, 1])


def test_edges_and_range_timesteps():
    assert check_edges([0, 250, 500, 750, 1000], 1000) == (0, 250, 500, 750, 1000)
    for bad in ([0, 500], [10, 1000], [0, 500, 500, 1000]):
        with pytest.raises(ValueError, match="edges"):
            check_edges(bad, 1000)
    ts = range_timesteps((0, 250, 500, 750, 1000), 2)
    assert ts == [62, 187, 312, 437, 562, 687, 812, 937]


# ------------------------------------------------------------------------------- a tiny trained run

@pytest.fixture(scope="module")
def sampler():
    """The very small model of tests/analysis/test_paths.py at its initialization (coverage needs no training:
    the hand-set routings below fix what it must be), with the world's tokenizer."""
    from raphael_jax.data.shapes.tokenizer import Tokenizer
    from raphael_jax.models.raphael import build_model
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.state import _CPU_FAST_COMPILE, split_model

    cfg = load_config(os.path.join(CONFIGS, "tiny.py"), SMALL)
    graphdef, _ = split_model(nnx.eval_shape(lambda: build_model(cfg, cfg.seed)))
    init = jax.jit(lambda: split_model(build_model(cfg, cfg.seed))[1]).lower()  # jitted: eager init is slow
    params = init.compile(compiler_options=_CPU_FAST_COMPILE if jax.default_backend() == "cpu" else None)()
    return Sampler(cfg, graphdef, params, Tokenizer.train_on_world(seed=cfg.data.seed), step=0)


def _with_space_moe(sampler, alpha: float, expert: int | None = None):
    """A sampler of the same weights with every space-MoE's threshold set to ``alpha`` and, with ``expert``,
    every text token routed to that expert (gate output layer: zero weights, a large bias on it)."""
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.state import split_model

    model = nnx.merge(sampler.graphdef, jax.tree.map(jnp.copy, sampler.params))
    for _, m in nnx.iter_graph(model):
        if isinstance(m, SpaceMoE):
            m.alpha = alpha
            if expert is not None:
                m.gate.fc2.kernel[...] = jnp.zeros_like(m.gate.fc2.kernel[...])
                m.gate.fc2.bias[...] = 50.0 * jax.nn.one_hot(expert, m.experts.num_experts)
    graphdef, params = split_model(model)
    return Sampler(sampler.config, graphdef, params, sampler.tokenizer, sampler.step)


@pytest.fixture(scope="module")
def all_to_expert_2(sampler):
    """Every token routed to expert 2, alpha tiny: every real token's mask covers the whole image (softmax
    attention is positive), so expert 2 covers everything and the others nothing."""
    return CoverageRecorder(_with_space_moe(sampler, alpha=1e-6, expert=2), batch_size=4)


def test_hand_set_routing_data_source(all_to_expert_2):
    res = measure_coverage(all_to_expert_2.sampler, num_prompts=3, source="data", timesteps_per_range=1,
                           recorder=all_to_expert_2)
    s = res["summary"]
    assert len(res["layers"]) == 3
    assert res["positions"] == [64, 64, 64] and s["count"].tolist() == [3, 3, 3, 3]
    want = np.broadcast_to([0.0, 0.0, 1.0, 0.0], s["coverage"].shape)
    np.testing.assert_array_equal(s["coverage"], want)
    np.testing.assert_array_equal(s["union"], 1.0)
    np.testing.assert_allclose(s["pairs_positions"], 0.25)
    np.testing.assert_allclose(s["routed"], 0.25)
    assert res["uncond"] is None


def test_hand_set_routing_sample_source(all_to_expert_2):
    res = measure_coverage(all_to_expert_2.sampler, num_prompts=2, source="sample", num_steps=3,
                           recorder=all_to_expert_2)
    s, u = res["summary"], res["uncond"]
    # 3 trailing DDIM steps: t = 999, 666, 333; two prompts each
    assert s["count"].tolist() == [0, 2, 2, 2] and u["count"].tolist() == [0, 2, 2, 2]
    for r in (s, u):  # the empty prompt (EOS alone) is routed to expert 2 as well
        np.testing.assert_array_equal(r["coverage"][1:], np.broadcast_to([0.0, 0.0, 1.0, 0.0], r["coverage"][1:].shape))
        assert np.isnan(r["coverage"][0]).all()
        assert r["overall"]["pairs_flops"] == pytest.approx(0.25)
    md = coverage_markdown(res)
    assert "Empty prompt" in md and f"| [0, 250) | {_short_layer(res['layers'][0])} | 64 | - |" in md


def test_alpha_one_covers_the_attention_argmax_of_each_routed_token(sampler):
    """alpha = 1: a token's mask is the position(s) of its largest attention weight. Expected coverage per
    expert from the sown cross-attention maps and the gates' own argmax on the text states (not from the
    region masks the recorder reads)."""
    s = _with_space_moe(sampler, alpha=1.0)
    rec = CoverageRecorder(s, batch_size=4)
    n = len(PROMPTS)
    cond = s.encode(PROMPTS)
    x0 = jax.random.normal(jax.random.key(3), s.image_shape(n))
    t = jnp.array([100, 500, 900], jnp.int32)
    per, union = rec.record(x0, t, cond)
    @jax.jit
    def attention_maps(params, x, t, ctx, mask):  # the head-averaged cross-attention of every RAPHAEL block
        m = nnx.merge(s.graphdef, params)
        m.unet(x, t, ctx, mask, record_masks=True, with_edges=False)
        return pop_intermediates(m)["cross_attention"]

    attn = [np.asarray(a) for a in attention_maps(s.params, x0, t, cond["context"], cond["mask"])]
    model = nnx.merge(s.graphdef, s.params)
    gates = [m for _, m in sorted(((p, m) for p, m in nnx.iter_graph(model) if isinstance(m, SpaceMoE)),
                                  key=lambda e: rec.layers.index("/".join(map(str, e[0]))))]
    real = np.asarray(cond["mask"])
    k = rec.num_experts
    assert len(attn) == len(gates) == len(rec.layers) == per.shape[1]
    for li, (a, g) in enumerate(zip(attn, gates, strict=True)):
        route = np.asarray(g.gate.logits(cond["context"])).argmax(-1)
        for b in range(n):
            top = a[b] >= a[b].max(axis=0, keepdims=True)  # [n_x, L]: argmax positions of each token
            for e in range(k):
                tokens = np.nonzero(real[b] & (route[b] == e))[0]
                want = top[:, tokens].any(-1).mean() if len(tokens) else 0.0
                assert per[b, li, e] == pytest.approx(want), (li, b, e)
            assert union[b, li] == pytest.approx(top[:, real[b]].any(-1).mean())
    # one argmax per token: at most as many covered positions as real tokens, so coverage is partial here
    assert (union * 64 <= real.sum(1)[:, None] + 1e-6).all() and union.max() < 1.0


def test_bench_script_writes_the_table(sampler, tmp_path, monkeypatch):
    import raphael_jax.train.checkpoint as checkpoint
    from raphael_jax.sampling import Sampler

    spec = importlib.util.spec_from_file_location("moe_coverage_under_test", os.path.join(ROOT, "bench",
                                                                                          "moe_coverage.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(checkpoint, "load_run", lambda *a, **k: None)  # the run is loaded already (fixture)
    monkeypatch.setattr(Sampler, "from_run", classmethod(lambda cls, *a, **k: sampler))
    out = tmp_path / "cov.md"
    assert bench.main(["--workdir", str(tmp_path / "run"), "--source", "sample", "--prompts", "2", "--ddim-steps", "4",
                       "--out", str(out), "--json", str(tmp_path / "cov.json"), "--note", "pytest"]) == 0
    text = out.read_text()
    assert "also running: pytest" in text and "DDIM sampling (4 steps" in text
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| [")]
    block_rows = [r for r in rows if len(r) == 3 + 4 + 3]
    assert len(block_rows) == 4 * 3  # ranges x blocks
    for r in block_rows:
        cov, union = [float(x) for x in r[3:7]], float(r[7])
        assert all(0.0 <= c <= 1.0 for c in cov) and union >= max(cov) - 1e-9 and union <= sum(cov) + 1e-9
        assert float(r[8]) == pytest.approx(np.mean(cov), abs=2e-3)
    import json

    res = json.load(open(tmp_path / "cov.json"))["sources"]["sample"]
    assert len(res["prompts"]) == 2 and res["summary"]["count"] == [2, 2, 2, 2]  # t = 999, 749, 499, 249
