"""Expert parallelism for the two MoEs: ``shard_map`` kernels the MoE layers call under a ``ShardingPlan``.

The expert banks are stacked ``[K, ...]`` and their expert dim is sharded over the mesh axes the
rules give ``expert`` (``e_axes``, size ``ep``); each device holds ``K_l = K / ep`` experts. The
batch is sharded over the batch axes, which include ``e_axes`` (``parallel.rules.batch``). Inside
the kernels the FSDP-sharded dims of the expert weights are all-gathered (their gradients come
back reduce-scattered), and a hidden (``mlp``) dim sharded over axes that do not carry the batch
(``tensor``) stays sharded: the second matmul's partial sums are ``psum``-ed over them.

Time-MoE (top-1 per sample, GShard/Switch-style dispatch with capacity):
  every device sorts its ``B_l`` samples into ``K`` buffers of ``C`` slots (slot = rank of the
  sample among the local samples routed to that expert), one ``all_to_all`` over ``e_axes`` sends
  each buffer to the device that holds the expert, the device runs its ``K_l`` experts on the
  ``ep * C`` received slots each (a batched matmul, no weight gather), a second ``all_to_all``
  brings the outputs back, and each sample reads its slot. ``C = B_l`` (``time_capacity_factor``
  0) never drops; ``C = ceil(f * B_l / K)`` spends ``f`` x the routed FLOPs and a sample beyond
  its expert's capacity skips the time-MoE (output 0: the block's residual passes it through).

Space-MoE (every image position goes through every expert, weighted by the per-expert mask counts
``C_k`` and totals ``T_k``, see ``SpaceMoE``):
  every device all-gathers the image tokens of its ``ep`` expert-group peers, runs its own ``K_l``
  experts on them, and a ``psum_scatter`` over ``e_axes`` sums the partial outputs of all experts
  and hands each device back its own samples. No expert runs twice; the cost is one all-gather and
  one reduce-scatter of the activations per layer.

Routing (gates, routes, masks, usage statistics) is computed outside the kernels on the global
arrays, so the sown statistics are the same as on one device.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from raphael_jax.parallel.rules import ShardingPlan, logical_to_spec

# logical names of an ExpertBank's w1, b1, w2, b2
EXPERT_NAMES = (("expert", "embed", "mlp"), ("expert", "mlp"),
                ("expert", "mlp", "embed"), ("expert", "embed"))


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_axes(spec: PartitionSpec, ndim: int) -> list[tuple[str, ...]]:
    entries = list(spec) + [None] * (ndim - len(spec))
    return [_axes(e) for e in entries]


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


class _Layout:
    """Specs of the expert weights and activations for one MoE call, and which axes do what."""

    def __init__(self, plan: ShardingPlan, params, names):
        self.plan = plan
        self.specs = [logical_to_spec(n, p.shape, plan.shape, plan.rules) for n, p in zip(names, params)]
        self.dims = [_spec_axes(s, p.ndim) for s, p in zip(self.specs, params)]
        self.batch = plan.batch_axes()
        self.e_axes = self.dims[0][0]
        self.ep = plan.axis_size(self.e_axes)
        # the hidden dim stays sharded (psum the output) over axes that do not carry the batch
        self.tp_axes = tuple(a for a in self.dims[0][2] if a not in self.batch)
        self.num_experts = params[0].shape[0]

    @property
    def active(self) -> bool:
        """Take the expert-parallel path: experts are sharded over axes that also shard the batch."""
        return self.ep > 1 and set(self.e_axes) <= set(self.batch) and \
            all(d[0] == self.e_axes for d in self.dims)

    def act_spec(self, ndim: int) -> PartitionSpec:
        return PartitionSpec(_entry(self.batch), *([None] * (ndim - 1)))

    def gather_weight(self, x, dims, hidden_dim: int | None):
        """All-gather every sharded dim of a local expert weight except the expert and kept-hidden dims."""
        for i, axes in enumerate(dims):
            if i == 0 or not axes:
                continue
            keep = tuple(a for a in axes if a in self.tp_axes) if i == hidden_dim else ()
            if keep and keep != axes:
                raise ValueError(f"expert hidden dim sharded over {axes}: mix of batch and tensor axes")
            if not keep:
                x = jax.lax.all_gather(x, _entry(axes), axis=i, tiled=True)
        return x


def _psum(x, axes):
    return jax.lax.psum(x, _entry(axes)) if axes else x


def time_moe_layout(plan: ShardingPlan, params) -> _Layout:
    return _Layout(plan, params, EXPERT_NAMES)


def time_moe(plan: ShardingPlan, h: jax.Array, route: jax.Array, weight: jax.Array, params):
    """Expert-parallel time-MoE: h [B, N, D], route int [B], weight [B] -> (out [B, N, D], dropped [])."""
    lay = time_moe_layout(plan, params)
    k, ep = lay.num_experts, lay.ep
    k_local = k // ep
    b_local = h.shape[0] // plan.axis_size(lay.batch)
    f = plan.time_capacity_factor
    cap = b_local if f <= 0 else max(1, min(b_local, math.ceil(f * b_local / k)))
    e_axes = _entry(lay.e_axes)

    def kernel(h, route, weight, w1, b1, w2, b2):
        w1 = lay.gather_weight(w1, lay.dims[0], 2)
        b1 = lay.gather_weight(b1, lay.dims[1], 1)
        w2 = lay.gather_weight(w2, lay.dims[2], 1)
        b2 = lay.gather_weight(b2, lay.dims[3], None)
        bl, n, d = h.shape
        onehot = jax.nn.one_hot(route, k, dtype=jnp.int32)                     # [B_l, K]
        pos = ((jnp.cumsum(onehot, axis=0) - 1) * onehot).sum(-1)               # rank within expert
        keep = pos < cap
        slot = jnp.where(keep, pos, cap)                                         # cap = out of range
        buf = jnp.zeros((k, cap, n, d), h.dtype).at[route, slot].set(h, mode="drop")
        # [K, C] -> the devices holding each expert; received [ep (source) * K_l, C, N, D]
        recv = jax.lax.all_to_all(buf, e_axes, 0, 0, tiled=True)
        x = recv.reshape(ep, k_local, cap, n, d).transpose(1, 0, 2, 3, 4).reshape(k_local, ep * cap, n, d)
        act = jax.nn.gelu(jnp.einsum("esnd,edh->esnh", x, w1) + b1[:, None, None, :])
        y = _psum(jnp.einsum("esnh,ehd->esnd", act, w2), lay.tp_axes) + b2[:, None, None, :]
        y = y.reshape(k_local, ep, cap, n, d).transpose(1, 0, 2, 3, 4).reshape(k, cap, n, d)
        back = jax.lax.all_to_all(y, e_axes, 0, 0, tiled=True)                  # [K, C, N, D], own samples
        out = back.at[route, slot].get(mode="fill", fill_value=0)
        out = out * (keep.astype(out.dtype) * weight.astype(out.dtype))[:, None, None]
        dropped = jax.lax.psum((~keep).sum(), _entry(lay.batch))
        return out, dropped

    act3, act1 = lay.act_spec(3), lay.act_spec(1)
    fn = jax.shard_map(kernel, mesh=plan.mesh, in_specs=(act3, act1, act1, *lay.specs),
                       out_specs=(act3, PartitionSpec()), check_vma=False)
    out, dropped = fn(h, route, weight, *params)
    return out, dropped.astype(jnp.float32) / h.shape[0]


def space_moe(plan: ShardingPlan, h: jax.Array, counts: jax.Array, totals: jax.Array, params):
    """Expert-parallel space-MoE sum (before the 1/n average).

    ``sum_k C_k[j] e_k(h_j) + (T_k - C_k[j]) e_k(0)`` for h [B, N, D], counts [B, N, K] and
    totals [B, K] (float32) -> [B, N, D] (the same arithmetic as ``SpaceMoE``'s one-device form).
    """
    lay = _Layout(plan, params, EXPERT_NAMES)
    k_local = lay.num_experts // lay.ep
    e_axes = _entry(lay.e_axes)

    def kernel(h, counts, totals, w1, b1, w2, b2):
        w1 = lay.gather_weight(w1, lay.dims[0], 2)
        b1 = lay.gather_weight(b1, lay.dims[1], 1)
        w2 = lay.gather_weight(w2, lay.dims[2], 1)
        b2 = lay.gather_weight(b2, lay.dims[3], None)
        # the expert group's samples: [ep * B_l, ...]
        hg = jax.lax.all_gather(h, e_axes, axis=0, tiled=True)
        start = jax.lax.axis_index(e_axes) * k_local
        c = jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(counts, e_axes, axis=0, tiled=True),
                                         start, k_local, axis=2)               # [S, N, K_l]
        t = jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(totals, e_axes, axis=0, tiled=True),
                                         start, k_local, axis=1)               # [S, K_l]
        act = jax.nn.gelu(jnp.einsum("snd,kdh->snkh", hg, w1) + b1)
        rest = (t[:, None, :] - c).astype(act.dtype)                          # T_k - C_k[j]
        c = c.astype(act.dtype)
        at_zero_partial = jnp.einsum("kh,khd->kd", jax.nn.gelu(b1), w2)        # e_k(0) - b2, partial over tp
        y = jnp.einsum("snkh,khd->snd", act * c[..., None], w2)
        y = y + jnp.einsum("snk,kd->snd", rest, at_zero_partial)
        # C_k b2 + (T_k - C_k) b2 = T_k b2, added once after the tensor-parallel sum
        y = _psum(y, lay.tp_axes) + jnp.einsum("sk,kd->sd", t.astype(act.dtype), b2)[:, None, :]
        return jax.lax.psum_scatter(y, e_axes, scatter_dimension=0, tiled=True)

    act3, act2 = lay.act_spec(3), lay.act_spec(2)
    fn = jax.shard_map(kernel, mesh=plan.mesh, in_specs=(act3, act3, act2, *lay.specs), out_specs=act3,
                       check_vma=False)
    return fn(h, counts, totals, *params)


def layout_active(plan: ShardingPlan | None, params) -> bool:
    """Whether the MoE with these expert weights takes the expert-parallel path under ``plan``."""
    if plan is None or plan.mesh.devices.size == 1:
        return False
    return _Layout(plan, params, EXPERT_NAMES).active
