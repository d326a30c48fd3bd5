"""Edge supervision: focal loss against a hand-written reference, T_c gating, edge head shapes."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raphael_jax.models.edge import EdgeHead, edge_loss, focal_loss, resize_edges, select_token_map


def ref_focal(logit, y, alpha, gamma):
    p = 1.0 / (1.0 + np.exp(-logit))
    if y == 1:
        return -alpha * (1 - p) ** gamma * np.log(p)
    return -(1 - alpha) * p ** gamma * np.log(1 - p)


def test_focal_loss_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5)).astype(np.float32) * 3
    y = (rng.random((4, 5)) > 0.5).astype(np.float32)
    for alpha, gamma in [(0.5, 2.0), (0.25, 1.0), (0.75, 0.0)]:
        got = np.asarray(focal_loss(jnp.asarray(logits), jnp.asarray(y), alpha, gamma))
        want = np.vectorize(ref_focal)(logits.astype(np.float64), y, alpha, gamma)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_edge_loss_zero_at_and_above_tc():
    rng = np.random.default_rng(1)
    logits = [jnp.asarray(rng.normal(size=(4, 8, 8)).astype(np.float32)),
              jnp.asarray(rng.normal(size=(4, 4, 4)).astype(np.float32))]
    edges = jnp.asarray((rng.random((4, 16, 16)) > 0.7).astype(np.float32))
    assert float(edge_loss(logits, edges, jnp.array([500, 501, 999, 700]), 500)) == 0.0
    low = float(edge_loss(logits, edges, jnp.array([499, 0, 999, 700]), 500))
    assert low > 0
    # exactly the two gated-in samples, averaged over blocks and pixels, divided by the batch size
    per = []
    for i in (0, 1):
        blocks = []
        for lg in logits:
            tgt = np.asarray(resize_edges(edges, lg.shape[1:]))[i]
            blocks.append(np.vectorize(ref_focal)(np.asarray(lg[i], np.float64), tgt, 0.5, 2.0).mean())
        per.append(np.mean(blocks))
    np.testing.assert_allclose(low, sum(per) / 4, rtol=1e-5)


def test_resize_edges_is_max_pool():
    e = np.zeros((1, 8, 8), np.float32)
    e[0, 1, 2] = 1
    r = np.asarray(resize_edges(jnp.asarray(e), (4, 4)))
    assert r[0, 0, 1] == 1 and r.sum() == 1


def test_edge_head_and_token_map():
    attn = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 16, 5)), axis=-1)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    m = select_token_map(attn, mask, (4, 4), "eot")
    np.testing.assert_allclose(np.asarray(m[0]).reshape(-1), np.asarray(attn[0, :, 2]))
    np.testing.assert_allclose(np.asarray(m[1]).reshape(-1), np.asarray(attn[1, :, 4]))
    head = EdgeHead(8, 5, rngs=nnx.Rngs(0))
    assert len(head.convs) == 5
    out = head(m)
    assert out.shape == (2, 4, 4) and bool(jnp.isfinite(out).all())
