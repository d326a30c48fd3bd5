"""Shardings of pytrees and batches from logical axis names (knows no model).

Every ``nnx.Variable`` leaf of a tree gets ``plan.sharding(names, shape)`` from its logical axis
names (``out_sharding`` metadata); every other leaf (step, counters, RNG) is replicated. optax's
moments (``mu``, ``nu``) are maps over the parameter tree, so they carry the names too.

    shardings = tree_shardings(abstract_state, plan)
    batch = global_batch(plan, host_local_batch)
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

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


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of ``abstract`` laid out by ``shardings`` (the largest shard per array)."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shape = s.shard_shape(a.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


