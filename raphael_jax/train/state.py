"""The train state: optimizer, model split, and the state created already sharded on the mesh.

The state is a plain pytree dict ``{step, params, ema_params, opt_state, rng}`` that orbax saves as
is; ``params`` is an ``nnx.State`` whose ``nnx.Param`` leaves carry their logical axis names, so
``raphael_jax.parallel.sharding.tree_shardings`` lays it out on the mesh.

    plan = ShardingPlan.from_config(config, mesh_from_config(config))
    graphdef, abstract, shardings, init = abstract_train_state(config, tx, plan)
    state = sharded_init(config, init, shardings, plan)       # jit(init, out_shardings): born sharded
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from raphael_jax.models.raphael import RaphaelModel, build_model
from raphael_jax.parallel.rules import ShardingPlan
from raphael_jax.parallel.sharding import tree_shardings

LR_SCHEDULES = ("constant", "cosine")


def lr_schedule(config) -> optax.Schedule:
    """Linear warm-up to ``train.learning_rate``, then constant or cosine decay to ``lr_final_fraction``
    of it at ``train.num_steps`` (a short run ends sharper with the decay)."""
    t = config.train
    kind = t.lr_schedule
    if kind not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {kind!r}")
    warm = max(t.warmup_steps, 1)
    if kind == "constant":
        after = optax.constant_schedule(t.learning_rate)
    else:
        after = optax.cosine_decay_schedule(t.learning_rate, max(t.num_steps - warm, 1),
                                            alpha=t.lr_final_fraction)
    return optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, warm), after], [warm])


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW (paper: lr 1e-4, betas 0.9/0.999, wd 0) on ``lr_schedule``, global-norm clipping."""
    t = config.train
    lr = lr_schedule(config)
    parts = []
    if t.grad_clip and t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
    return optax.chain(*parts)


def learning_rate(config, step):
    return lr_schedule(config)(step)


def split_model(model: RaphaelModel):
    """(graphdef, params) of a model; params is an ``nnx.State`` of the ``nnx.Param`` leaves."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def init_state(config, params, tx, seed: int | None = None) -> dict:
    seed = config.seed if seed is None else seed
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "ema_params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(seed))}


def abstract_train_state(config, tx, plan: ShardingPlan, seed: int | None = None):
    """(graphdef, abstract state, state shardings, init) without allocating the model.

    ``jax.jit(init, out_shardings=shardings)()`` creates the state directly in its sharded layout. With
    ``lora.rank`` > 0 the state's params are the LoRA adapters (raphael_jax/models/lora.py), not the model's.
    """
    seed = config.seed if seed is None else seed
    graphdef, abstract_params = split_model(nnx.eval_shape(lambda: build_model(config, seed)))

    def init():
        if config.control.enabled:  # ControlNet: the state holds only the ControlNet (the base: an argument)
            from raphael_jax.train.control import split_controlnet
            return init_state(config, split_controlnet(config, seed, abstract=False)[1], tx)
        if config.lora.rank:  # LoRA: the state holds only the adapters (the base is an argument of the step)
            from raphael_jax.models.lora import init_adapters
            adapters = init_adapters(abstract_params, config.lora.targets, config.lora.rank,
                                     jax.random.fold_in(jax.random.key(seed), 1))
            return init_state(config, adapters, tx)
        graphdef, params = split_model(build_model(config, seed))
        return init_state(config, params, tx)

    abstract = jax.eval_shape(init)
    shardings = tree_shardings(abstract, plan)
    return graphdef, abstract, shardings, init


# The init program runs once; on XLA:CPU most of its compile time is LLVM optimising ~250 unrolled
# threefry kernels, so it is compiled without the expensive LLVM passes (2-3x faster, same values).
_CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_INIT_CACHE: dict = {}


def sharded_init(config, init, shardings, plan: ShardingPlan):
    """Run ``init`` jitted with ``out_shardings=shardings``: the state is born sharded.

    The compiled program is kept per (config, mesh) for the process's lifetime (a few entries), so
    a second run of the same config in one process (tests, notebooks) does not compile it again.
    """
    key = (config.to_json(), tuple(d.id for d in plan.mesh.devices.flat), tuple(plan.shape.items()),
           tuple(sorted(plan.rules.items())))
    compiled = _INIT_CACHE.get(key)
    if compiled is None:
        lowered = jax.jit(init, out_shardings=shardings).lower()
        cpu = plan.mesh.devices.flat[0].platform == "cpu"
        compiled = lowered.compile(compiler_options=_CPU_FAST_COMPILE if cpu else None)
        if len(_INIT_CACHE) >= 4:
            _INIT_CACHE.pop(next(iter(_INIT_CACHE)))
        _INIT_CACHE[key] = compiled
    return compiled()


