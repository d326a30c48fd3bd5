"""Space-MoE and time-MoE against slow references written here in numpy (paper eqs., sec. 3.1 / App. 7.3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raphael_jax.models.moe import SpaceMoE, TimeMoE, region_masks
from raphael_jax.models.routing import pop_intermediates


def np_gelu(x):  # jax.nn.gelu's default tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_linear(lin, x):
    y = x @ np.asarray(lin.kernel[...])
    return y + np.asarray(lin.bias[...]) if lin.bias is not None else y


def np_expert(bank, k, x):
    w1, b1, w2, b2 = (np.asarray(v[...])[k] for v in (bank.w1, bank.b1, bank.w2, bank.b2))
    return np_gelu(x @ w1 + b1) @ w2 + b2


def np_gate(gate, x):
    logits = np_linear(gate.fc2, np_gelu(np_linear(gate.fc1, x)))
    probs = np_softmax(logits)
    return probs.argmax(-1), probs


def make_inputs(seed, b=3, n=12, n_y=7, d=8, c=10):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, n, d)).astype(np.float32)
    attn = np_softmax(rng.normal(size=(b, n, n_y)) * 2).astype(np.float32)
    ctx = rng.normal(size=(b, n_y, c)).astype(np.float32)
    lengths = rng.integers(2, n_y + 1, size=b)
    lengths[0] = n_y - 2  # padding present
    mask = np.arange(n_y)[None] < lengths[:, None]
    return h, attn, ctx, mask


def space_reference(moe, h, attn, ctx, mask, average, gate_grad):
    """The paper's formula, token by token: 1/n sum_i w_i e_{route(i)}(h o M_hat_i)."""
    alpha = moe.alpha
    b, n, _ = h.shape
    route, probs = np_gate(moe.gate, ctx)
    out = np.zeros_like(h, dtype=np.float64)
    for bi in range(b):
        tokens = range(ctx.shape[1]) if average == "all" else np.nonzero(mask[bi])[0]
        count = 0
        for i in tokens:
            col = attn[bi, :, i]
            m = (col >= alpha * col.max()).astype(np.float32)
            w = probs[bi, i, route[bi, i]] if gate_grad == "prob" else 1.0
            out[bi] += w * np_expert(moe.experts, route[bi, i], h[bi] * m[:, None])
            count += 1
        out[bi] /= max(count, 1)
    return out, route


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("average", ["real", "all"])
@pytest.mark.parametrize("gate_grad", ["prob", "none"])
def test_space_moe_matches_per_token_reference(seed, average, gate_grad):
    h, attn, ctx, mask = make_inputs(seed)
    moe = SpaceMoE(8, 10, 4, 16, 12, alpha=0.2, average=average, gate_grad=gate_grad, rngs=nnx.Rngs(seed))
    # non-zero biases so the masked-out term e_k(0) matters
    moe.experts.b1[...] = jax.random.normal(jax.random.key(seed + 10), moe.experts.b1.shape)
    moe.experts.b2[...] = jax.random.normal(jax.random.key(seed + 11), moe.experts.b2.shape)
    out = moe(jnp.asarray(h), jnp.asarray(attn), jnp.asarray(ctx), jnp.asarray(mask))
    ref, route = space_reference(moe, h, attn, ctx, mask, average, gate_grad)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)
    inter = pop_intermediates(moe)
    sown = np.asarray(inter["space_route"][0])
    if average == "real":
        np.testing.assert_array_equal(sown, np.where(mask, route, -1))
    # every routed token goes to exactly one expert: usage is a distribution over experts
    np.testing.assert_allclose(np.asarray(inter["space_usage"][0]).sum(), 1.0, atol=1e-6)


def test_region_masks_equal_threshold():
    _, attn, _, _ = make_inputs(5, n=20)
    got = np.asarray(region_masks(jnp.asarray(attn), 0.3))
    want = np.zeros_like(attn)
    for b in range(attn.shape[0]):
        for i in range(attn.shape[2]):
            thr = 0.3 * max(attn[b, j, i] for j in range(attn.shape[1]))
            for j in range(attn.shape[1]):
                want[b, j, i] = 1.0 if attn[b, j, i] >= thr else 0.0
    np.testing.assert_array_equal(got, want)
    assert got.sum() > 0 and (got == 0).sum() > 0


def test_region_masks_stop_gradient():
    _, attn, _, _ = make_inputs(6)
    g = jax.grad(lambda a: region_masks(a, 0.2).sum())(jnp.asarray(attn))
    assert float(jnp.abs(g).max()) == 0.0


def test_space_moe_with_noise_routes_each_real_token_once():
    h, attn, ctx, mask = make_inputs(3)
    moe = SpaceMoE(8, 10, 4, 16, 12, router_noise=5.0, rngs=nnx.Rngs(0))
    routes = []
    for k in range(3):
        moe(jnp.asarray(h), jnp.asarray(attn), jnp.asarray(ctx), jnp.asarray(mask), key=jax.random.key(k))
        r = np.asarray(pop_intermediates(moe)["space_route"][0])
        assert ((r >= 0) & (r < 4))[mask].all() and (r[~mask] == -1).all()
        routes.append(r)
    assert not all((r == routes[0]).all() for r in routes[1:]), "router noise never changed a route"


@pytest.mark.parametrize("gate_grad,gate_gets_grad", [("prob", True), ("straight_through", True), ("none", False)])
def test_space_moe_gradients(gate_grad, gate_gets_grad):
    h, attn, ctx, mask = make_inputs(4)
    moe = SpaceMoE(8, 10, 4, 16, 12, gate_grad=gate_grad, rngs=nnx.Rngs(1))
    gd, params = nnx.split(moe, nnx.Param)

    def loss(p):
        m = nnx.merge(gd, p)
        return jnp.sum(m(jnp.asarray(h), jnp.asarray(attn), jnp.asarray(ctx), jnp.asarray(mask)) ** 2)

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["experts"]["w1"][...]).max()) > 0
    assert float(jnp.abs(grads["experts"]["w2"][...]).max()) > 0
    gate_norm = float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(grads["gate"])))
    assert (gate_norm > 0) == gate_gets_grad


def test_straight_through_forward_equals_unweighted():
    h, attn, ctx, mask = make_inputs(8)
    a = SpaceMoE(8, 10, 4, 16, 12, gate_grad="straight_through", rngs=nnx.Rngs(2))
    b = SpaceMoE(8, 10, 4, 16, 12, gate_grad="none", rngs=nnx.Rngs(2))
    args = tuple(jnp.asarray(x) for x in (h, attn, ctx, mask))
    np.testing.assert_allclose(np.asarray(a(*args)), np.asarray(b(*args)), atol=1e-6)


@pytest.mark.parametrize("impl", ["gather", "ragged"])
@pytest.mark.parametrize("seed", [0, 1])
def test_time_moe_matches_per_sample_reference(impl, seed):
    rng = np.random.default_rng(seed)
    b, n, d, tdim = 6, 5, 8, 12
    h = rng.normal(size=(b, n, d)).astype(np.float32)
    temb = rng.normal(size=(b, tdim)).astype(np.float32) * 3
    moe = TimeMoE(d, tdim, 4, 16, 10, impl=impl, rngs=nnx.Rngs(seed))
    moe.experts.b1[...] = jax.random.normal(jax.random.key(seed), moe.experts.b1.shape)
    out = np.asarray(moe(jnp.asarray(h), jnp.asarray(temb)))
    route, probs = np_gate(moe.gate, temb)
    assert len(set(route.tolist())) > 1, "test needs several experts in use"
    for i in range(b):  # only the chosen expert, scaled by its probability
        ref = probs[i, route[i]] * np_expert(moe.experts, route[i], h[i])
        np.testing.assert_allclose(out[i], ref, atol=1e-5, rtol=1e-5)
    inter = pop_intermediates(moe)
    np.testing.assert_array_equal(np.asarray(inter["time_route"][0]), route)
    np.testing.assert_allclose(np.asarray(inter["time_usage"][0]).sum(), 1.0, atol=1e-6)


def test_time_routing_is_a_function_of_t_without_noise():
    from raphael_jax.models.layers import timestep_embedding

    moe = TimeMoE(8, 16, 4, 16, 10, rngs=nnx.Rngs(0))
    t = jnp.array([0, 999, 500, 0, 999, 500, 250, 250])
    h = jax.random.normal(jax.random.key(1), (8, 3, 8))
    moe(h, timestep_embedding(t, 16))
    r1 = np.asarray(pop_intermediates(moe)["time_route"][0])
    moe(jax.random.normal(jax.random.key(2), (8, 3, 8)), timestep_embedding(t, 16))
    r2 = np.asarray(pop_intermediates(moe)["time_route"][0])
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(r1[:3], r1[3:6])
    assert r1[6] == r1[7]


def test_bad_options_raise():
    with pytest.raises(ValueError, match="gate_grad"):
        SpaceMoE(8, 10, 4, 16, 12, gate_grad="soft", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="average"):
        SpaceMoE(8, 10, 4, 16, 12, average="tokens", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha"):
        SpaceMoE(8, 10, 4, 16, 12, alpha=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl"):
        TimeMoE(8, 10, 4, 16, 12, impl="dense", rngs=nnx.Rngs(0))
