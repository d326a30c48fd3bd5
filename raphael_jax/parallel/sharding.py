"""Sharding helpers for the trainer: state shardings from logical names, sharded init, global batches,
and the train step jitted with explicit in/out shardings and donated state.

The train state is ``{step, params, ema_params, opt_state, rng}``; ``params`` is an ``nnx.State``
whose ``nnx.Param`` leaves carry their logical axis names as ``out_sharding`` metadata, and
optax's moments (``mu``, ``nu``) are maps over the same tree, so they carry them too. Every
Variable gets ``plan.sharding(names, shape)``; every other leaf (step, counters, RNG) is replicated.

    plan = ShardingPlan.from_config(config, mesh_from_config(config))
    graphdef, abstract, shardings, init = abstract_train_state(config, tx, plan)
    state = jax.jit(init, out_shardings=shardings)()          # created sharded, never gathered
    step = jit_train_step(make_train_step(graphdef, ...), plan, shardings, config.train.batch_size)
    state, metrics = step(state, global_batch(plan, host_local_batch), rng)
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from raphael_jax.parallel import rules as rules_lib
from raphael_jax.parallel.rules import ShardingPlan


def _path_str(path) -> str:
    out = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        out.append(str(key))
    return "/".join(out)


def variable_names(v: nnx.Variable):
    """Logical axis names of a Variable (its ``out_sharding`` metadata), or None."""
    meta = v.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or None


def tree_shardings(tree, plan: ShardingPlan):
    """``NamedSharding``s in ``tree``'s structure: Variables by their logical names, the rest replicated."""

    def one(path, x):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            names = variable_names(x)
            if names is None or not hasattr(value, "shape"):
                return x.replace(plan.replicated())
            return x.replace(plan.sharding(names, value.shape, where=_path_str(path)))
        return plan.replicated()

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs of ``abstract`` carrying ``shardings`` (for AOT lowering and orbax restore)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_train_state(config, tx, plan: ShardingPlan, seed: int | None = None):
    """(graphdef, abstract state, state shardings, init) without allocating the model.

    ``jax.jit(init, out_shardings=shardings)()`` creates the state directly in its sharded layout.
    """
    from raphael_jax.models.raphael import build_model
    from raphael_jax.train.step import init_state, split_model

    seed = config.seed if seed is None else seed

    def init():
        graphdef, params = split_model(build_model(config, seed))
        return init_state(config, graphdef, params, tx)

    graphdef, _ = split_model(nnx.eval_shape(lambda: build_model(config, seed)))
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


def create_sharded_state(config, tx, plan: ShardingPlan, seed: int | None = None):
    """(graphdef, state, shardings): the initial train state, created sharded on ``plan.mesh``."""
    graphdef, _, shardings, init = abstract_train_state(config, tx, plan, seed)
    return graphdef, sharded_init(config, init, shardings, plan), shardings


def global_batch(plan: ShardingPlan, local: Mapping) -> dict:
    """Host-local numpy batch -> global ``jax.Array``s sharded over the batch axes.

    Each process passes only its own rows (``batch_size / process_count`` of them); the global
    batch is their concatenation in process order.
    """
    n = jax.process_count()
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(plan.batch_sharding(v.shape[0] * n), v)
    return out


def jit_train_step(train_step, plan: ShardingPlan, state_shardings, global_batch_size: int | None = None):
    """``train_step`` jitted with explicit shardings, the state donated, traced under ``plan``.

    The batch (a dict of batch-major arrays) is sharded over the batch axes, the RNG and metrics
    are replicated, the state keeps ``state_shardings`` (updated in place: donated).
    """

    def step(state, batch, rng):
        with rules_lib.use(plan):
            return train_step(state, batch, rng)

    rep = plan.replicated()
    return jax.jit(step, in_shardings=(state_shardings, plan.batch_sharding(global_batch_size), rep),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,))


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of ``abstract`` laid out by ``shardings`` (the largest shard per array)."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shape = s.shard_shape(a.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


def describe_state(abstract, shardings, max_rows: int | None = None) -> list[str]:
    """Human-readable ``path shape -> spec`` lines for the parameters (for logs and the AOT report)."""
    lines = []
    flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_s = jax.tree.leaves(shardings)
    for (path, a), s in zip(flat_a, flat_s):
        lines.append(f"{_path_str(path):70s} {str(tuple(a.shape)):22s} {s.spec}")
    return lines if max_rows is None else lines[:max_rows]
