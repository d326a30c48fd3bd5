"""Scale-out on 8 virtual CPU devices (tests/conftest.py): mesh, rules, expert parallelism, AOT.

The golden check: one training step's loss, gradients and routing on meshes such as data 2 x
expert 4, fsdp 4 x expert 2 and fsdp 2 x expert 2 x tensor 2 equal the one-device computation.
"""
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from raphael_jax.config import load_config
from raphael_jax.diffusion.schedule import NoiseSchedule
from raphael_jax.models.moe import SpaceMoE, TimeMoE
from raphael_jax.models.routing import pop_intermediates
from raphael_jax.parallel import expert_parallel, rules
from raphael_jax.parallel.mesh import make_mesh, mesh_from_config, resolve_mesh_shape
from raphael_jax.parallel.rules import ShardingPlan, logical_to_spec
from raphael_jax.parallel.sharding import global_batch, tree_shardings
from raphael_jax.train import step as step_mod
from raphael_jax.train.state import abstract_train_state, init_state, make_optimizer
from raphael_jax.train.step import compute_losses, jit_train_step, make_train_step

P = jax.sharding.PartitionSpec
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
SMALL = ["model.channels=(16, 32)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 1)",
         "model.mid_block=False", "model.edge.num_layers=2", "text.num_layers=1", "model.head_dim=8",
         "text.width=32", "model.context_dim=32", "train.batch_size=16", "train.warmup_steps=2",
         "parallel.time_capacity_factor=0"]
MESHES = [{"data": 2, "expert": 4}, {"fsdp": 4, "expert": 2}, {"fsdp": 2, "expert": 2, "tensor": 2}]
STATS = ("space_route", "time_route", "space_usage", "time_usage")
# LLVM-only compile options: XLA:CPU compiles 2-3x faster, the partitioned program is the same
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")


def small_config(mesh=None, extra=()):
    mesh = mesh or {"data": 1}
    sets = [f"parallel.mesh.{a}={mesh.get(a, 1)}" for a in ("data", "fsdp", "expert", "tensor")]
    return load_config(os.path.join(CONFIGS, "tiny.py"), SMALL + sets + list(extra))


def make_batch(config, b, seed=0):
    rng = np.random.default_rng(seed)
    s, L = config.data.image_size, config.text.max_len
    lengths = rng.integers(3, L // 2, size=b)
    mask = np.arange(L)[None] < lengths[:, None]
    tokens = np.where(mask, rng.integers(3, config.text.vocab_size, size=(b, L)), 0).astype(np.int32)
    tokens[np.arange(b), lengths - 1] = 1
    return {"image": rng.uniform(-1, 1, size=(b, s, s, 3)).astype(np.float32), "tokens": tokens, "mask": mask,
            "edges": (rng.uniform(size=(b, s, s)) < 0.2).astype(np.float32)}


# --- mesh and rules -----------------------------------------------------------------------------

def test_resolve_mesh_shape():
    full = {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert resolve_mesh_shape({"data": -1, "expert": 4}, 8) == full
    assert resolve_mesh_shape({"fsdp": -1, "expert": 2}, 256)["fsdp"] == 128
    # a -1 batch axis may stop where the global batch still divides (single-process convenience)
    shape = resolve_mesh_shape({"data": -1}, 8, batch_size=4, batch_axes=("data", "fsdp", "expert"),
                               shrink_to_batch=True)
    assert shape["data"] == 4
    with pytest.raises(ValueError, match="at most one"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        resolve_mesh_shape({"pipeline": 2}, 8)
    with pytest.raises(ValueError, match="needs 16"):
        resolve_mesh_shape({"data": 4, "expert": 4}, 8)


def test_logical_to_spec_single_use_and_divisibility():
    rules_ = {"expert": ("expert",), "embed": ("fsdp", "expert"), "mlp": ("tensor",), "norm": ()}
    mesh = {"data": 1, "fsdp": 4, "expert": 2, "tensor": 2}
    # expert bank: the expert axis goes to the expert dim, embed keeps fsdp only
    spec = logical_to_spec(("expert", "embed", "mlp"), (4, 16, 32), mesh, rules_)
    assert spec == P("expert", "fsdp", "tensor")
    # a dense kernel: embed over fsdp x expert (ZeRO-3 over every data-like axis)
    assert logical_to_spec(("embed", "mlp"), (16, 32), mesh, rules_) == P(("fsdp", "expert"), "tensor")
    # dims that do not divide drop axes from the end and are reported
    fb = []
    assert logical_to_spec(("embed", "mlp"), (12, 3), mesh, rules_, fb, "w") == P("fsdp")
    assert fb == [("w", "embed", 12, ("fsdp", "expert"), ("fsdp",)), ("w", "mlp", 3, ("tensor",), ())]
    assert logical_to_spec(("norm",), (16,), mesh, rules_) == P()
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("hidden",), (16,), mesh, rules_)


def test_state_is_created_sharded_by_logical_names():
    config = small_config({"fsdp": 4, "expert": 2})
    plan = ShardingPlan.from_config(config, mesh_from_config(config))
    _, abstract, shardings, _ = abstract_train_state(config, make_optimizer(config), plan)
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    w1 = [s for k, s in flat.items() if "['params']" in k and "space_moe" in k and "'w1'" in k]
    assert w1 and all(s.spec == P("expert", "fsdp") for s in w1)
    mu = [s for k, s in flat.items() if "opt_state" in k and "space_moe" in k and "'w1'" in k]
    assert mu and all(s.spec == P("expert", "fsdp") for s in mu)  # Adam moments follow their params
    q = [s for k, s in flat.items() if "['params']" in k and "attn_cross" in k and "'q'" in k]
    assert q and all(s.spec == P(("fsdp", "expert")) for s in q)
    # everything with more than 4k elements is sharded somewhere
    big = [(k, s) for (k, s), a in zip(flat.items(), jax.tree.leaves(abstract))
           if "['params']" in k and np.prod(a.shape) > 4096]
    assert big and all(s.spec != P() for _, s in big)


# --- the MoE kernels ------------------------------------------------------------------------------

def _moe_inputs(b=8, n=6, ny=5, d=16, c=12, seed=0):
    rng = np.random.default_rng(seed)
    attn = rng.normal(size=(b, n, ny)) * 2
    attn = np.exp(attn) / np.exp(attn).sum(-1, keepdims=True)
    mask = np.arange(ny)[None] < rng.integers(2, ny + 1, size=b)[:, None]
    return tuple(jnp.asarray(x, jnp.float32 if x.dtype != bool else bool) for x in (
        rng.normal(size=(b, n, d)), attn, rng.normal(size=(b, ny, c)), mask, rng.normal(size=(b, c)) * 3))


def _moe_pair():
    space = SpaceMoE(16, 12, 4, 32, 8, rngs=nnx.Rngs(0))
    space.experts.b1[...] = jax.random.normal(jax.random.key(1), space.experts.b1.shape)
    space.experts.b2[...] = jax.random.normal(jax.random.key(2), space.experts.b2.shape)
    time = TimeMoE(16, 12, 4, 32, 8, rngs=nnx.Rngs(3))
    return nnx.split(nnx.List([space, time]), nnx.Param)


def _moe_fn(gd, plan):
    def f(params, h, attn, ctx, mask, temb):
        def loss(p):
            with rules.use(plan):
                space, time = nnx.merge(gd, p)
                out = space(h, attn, ctx, mask, key=jax.random.key(7))
                out = out + time(h * 0.5 + out, temb, key=jax.random.key(8))
                stats = pop_intermediates(nnx.List([space, time]))
            return jnp.sum(out ** 2), (out, {k: stats[k] for k in STATS})
        return jax.value_and_grad(loss, has_aux=True)(params)
    return f


@pytest.mark.parametrize("mesh", [MESHES[0], MESHES[2]], ids=["data2xexpert4", "fsdp2xexpert2xtensor2"])
def test_moe_kernels_match_one_device(mesh):
    gd, params = _moe_pair()
    inputs = _moe_inputs()
    (l0, (o0, s0)), g0 = jax.jit(_moe_fn(gd, None), compiler_options=FAST)(params, *inputs)
    config = small_config(mesh)
    plan = ShardingPlan.from_config(config, make_mesh(resolve_mesh_shape(dict(config.parallel.mesh), 8)))
    psh = tree_shardings(params, plan)
    bank = params[0]["experts"]
    assert expert_parallel.layout_active(plan, [bank[k][...] for k in ("w1", "b1", "w2", "b2")])
    fn = jax.jit(_moe_fn(gd, plan), in_shardings=(psh, plan.batch_sharding(8), plan.batch_sharding(8),
                                                  plan.batch_sharding(8), plan.batch_sharding(8),
                                                  plan.batch_sharding(8)))
    compiled = fn.lower(params, *inputs).compile(compiler_options=FAST)
    hlo = compiled.as_text()
    assert "all-to-all" in hlo and "reduce-scatter" in hlo
    (l1, (o1, s1)), g1 = compiled(params, *inputs)
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o0), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for k in STATS:
        np.testing.assert_array_equal(np.asarray(s1[k][0]), np.asarray(s0[k][0]))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_time_moe_capacity_drops_overflow_samples():
    config = small_config({"data": 2, "expert": 4}, ["parallel.time_capacity_factor=1.0"])
    plan = ShardingPlan.from_config(config, mesh_from_config(config))
    time = TimeMoE(16, 12, 4, 32, 8, router_noise=0.0, rngs=nnx.Rngs(3))
    h = jax.random.normal(jax.random.key(0), (32, 3, 16))
    temb = jax.random.normal(jax.random.key(1), (32, 12))
    temb = temb.at[:24].set(temb[0])  # 24 of 32 samples on one expert: over capacity

    gd, params = nnx.split(time)

    def run(plan):
        model = nnx.merge(gd, params)
        with rules.use(plan):
            out = model(h, temb)
        inter = pop_intermediates(model)
        return out, {k: v for k, v in inter.items() if k != "paths"}

    ref, _ = jax.jit(lambda: run(None))()
    out, inter = jax.jit(lambda: run(plan))()
    # capacity = ceil(1.0 * 4 local samples / 4 experts) = 1 slot per (device, expert)
    dropped = float(inter["time_dropped"][0])
    assert dropped > 0.3
    out, ref = np.asarray(out), np.asarray(ref)
    zero = np.all(out == 0, axis=(1, 2))
    assert abs(zero.mean() - dropped) < 1e-6
    np.testing.assert_allclose(out[~zero], ref[~zero], atol=1e-5, rtol=1e-5)


# --- one training step: sharded == one device ----------------------------------------------------
# The production step (jit_train_step: explicit shardings, donated state) with SGD(lr=1), so the
# gradient is params - new params; compute_losses is wrapped to also return every layer's routes.

def _with_routes(model, *args, **kwargs):
    captured = {}
    real_pop = step_mod.pop_intermediates

    def capture(m):
        out = real_pop(m)
        captured.update(out)
        return out

    with mock.patch.object(step_mod, "pop_intermediates", capture):
        total, metrics = _compute_losses(model, *args, **kwargs)
    for name in STATS:
        for i, v in enumerate(captured[name]):
            metrics[f"{name}/{i}"] = v
    return total, metrics


_compute_losses = compute_losses


def _random_params(abstract, seed=0):
    rng = np.random.default_rng(seed)

    def one(path, a):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1 + 0.05 * rng.normal(size=a.shape)).astype(a.dtype)
        fan_in = int(np.prod(a.shape[:-1])) if a.ndim >= 2 else 0
        std = 1 / np.sqrt(fan_in) if fan_in else 0.05
        return (std * rng.normal(size=a.shape)).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def _one_step(config, graphdef, params, batch, plan):
    tx = optax.sgd(1.0)
    sched = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.num_timesteps)
    state = init_state(config, params, tx)
    shardings = tree_shardings(state, plan)
    state = jax.device_put(state, shardings)
    step = jit_train_step(make_train_step(graphdef, config, tx, sched), plan, shardings, config.train.batch_size)
    gb = global_batch(plan, batch)
    key = jax.random.key(5)
    with mock.patch.object(step_mod, "compute_losses", _with_routes):
        compiled = step.lower(state, gb, key).compile(compiler_options=FAST)
    old = state["params"]
    new_state, metrics = compiled(state, gb, key)
    assert all(x.is_deleted() for x in jax.tree.leaves(old))  # the state was donated
    grads = jax.tree.map(lambda p, q: np.asarray(p) - np.asarray(q), params, jax.device_get(new_state["params"]))
    return jax.device_get(metrics), grads, new_state, compiled.as_text()


@pytest.fixture(scope="module")
def reference():
    config = small_config()
    plan1 = ShardingPlan.from_config(config, make_mesh({"data": 1}, jax.devices()[:1]))
    graphdef, abstract, _, _ = abstract_train_state(config, optax.sgd(1.0), plan1)  # eval_shape only
    params = _random_params(abstract["params"])
    batch = make_batch(config, config.train.batch_size)
    metrics, grads, _, _ = _one_step(config, graphdef, params, batch, plan1)
    return {"graphdef": graphdef, "params": params, "batch": batch, "metrics": metrics, "grads": grads}


@pytest.mark.parametrize("mesh", MESHES[:2], ids=["data2xexpert4", "fsdp4xexpert2"])
def test_train_step_matches_one_device(reference, mesh):
    config = small_config(mesh)
    plan = ShardingPlan.from_config(config, mesh_from_config(config))
    assert plan.shape == {**{"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, **mesh}
    metrics, grads, new_state, hlo = _one_step(config, reference["graphdef"], reference["params"],
                                               reference["batch"], plan)
    m0 = reference["metrics"]
    # expert parallelism adds the time-MoE's capacity-dropped fraction (none dropped at capacity factor 2 here)
    assert set(metrics) == set(m0) | {"time_dropped_fraction"}
    assert float(metrics["time_dropped_fraction"]) == 0.0
    routes = [k for k in m0 if "/" in k]
    assert any(k.startswith("time_route/") for k in routes) and any(k.startswith("space_route/") for k in routes)
    for k in m0:  # loss, its parts, usage, grad norm, and every layer's routes and usage
        np.testing.assert_allclose(np.asarray(metrics[k]), np.asarray(m0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for k in routes:  # hence identical routing counts
        if "route" in k:
            assert np.array_equal(np.asarray(metrics[k]), np.asarray(m0[k])), k
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(reference["grads"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    # the new parameters keep their sharding; the experts live on the expert axis
    for path, x in jax.tree_util.tree_flatten_with_path(new_state["params"])[0]:
        if "space_moe" in jax.tree_util.keystr(path) and "'w1'" in jax.tree_util.keystr(path):
            assert x.sharding.spec[0] == "expert"
    # expert parallelism in the compiled program: time-MoE all-to-all, space-MoE reduce-scatter
    assert "all-to-all" in hlo and "reduce-scatter" in hlo


# --- frozen encoders shard by the same rules ------------------------------------------------------

def test_frozen_clip_and_vae_shard_and_match_one_device():
    from raphael_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from raphael_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer

    config = small_config({"fsdp": 4, "expert": 2})
    plan = ShardingPlan.from_config(config, mesh_from_config(config))
    clip = CLIPTextTransformer(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              max_position_embeddings=8, eos_token_id=1),
                               rngs=nnx.Rngs(0))
    vae_cfg = AutoencoderKLConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    vae = AutoencoderKL(vae_cfg, rngs=nnx.Rngs(1))
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 64, size=(8, 8)), jnp.int32)
    img = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3), minval=-1, maxval=1)
    for module, run, x in ((clip, lambda m, x: m(x, jnp.ones(x.shape, bool)).last_hidden_state, ids),
                           (vae, lambda m, x: m.encode(x)[0], img)):
        gd, state = nnx.split(module, nnx.Param)
        sh = tree_shardings(state, plan)
        specs = [s.spec for s, a in zip(jax.tree.leaves(sh), jax.tree.leaves(state)) if a.size >= 1024]
        assert specs and all(s != P() for s in specs), specs  # no replicated weight matrices
        def apply(s, x, gd=gd, run=run):
            return run(nnx.merge(gd, s), x)

        ref = jax.jit(apply, compiler_options=FAST)(state, x)
        out = jax.jit(apply, in_shardings=(sh, plan.batch_sharding(8)), compiler_options=FAST)(
            jax.device_put(state, sh), x)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


# --- the AOT compile command on the tiny config ---------------------------------------------------

def test_aot_command_on_tiny_config(tmp_path, capsys):
    from raphael_jax.cli.aot import main as aot_main

    out = tmp_path / "aot.json"
    args = ["--config", os.path.join(CONFIGS, "tiny.py"), "--devices", "8", "--mesh", "data=2,expert=4",
            "--batch", "16", "--json", str(out), "--compiler-option", "xla_backend_optimization_level=0",
            "--compiler-option", "xla_llvm_disable_expensive_passes=true"]
    for s in SMALL:
        args += ["--set", s]
    assert aot_main(args) == 0
    text = capsys.readouterr().out
    assert "per-device memory" in text and "all-to-all" in text and "FLOPs per step" in text
    rep = json.load(open(out))
    assert rep["devices"] == 8 and rep["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert rep["per_device_batch"] == 2
    assert rep["flops_per_device"] > 0 and rep["temp_bytes"] > 0
    assert rep["params_bytes"] < rep["config_params"] * 4  # sharded: less than a full f32 copy per device
    assert rep["opt_bytes"] >= 2 * rep["params_bytes"] * 0.9  # Adam mu + nu
    assert rep["collectives"]["all-to-all"]["count"] > 0
    assert rep["alias_bytes"] > 0  # the state is donated
