"""Logical axis names -> mesh axes, from ``config.parallel.rules``.

Models name logical axes only (``embed``, ``mlp``, ``heads``, ``context``, ``gate``, ``expert``,
``conv_in``, ``conv_out``, ``vocab``, ``kv``, ``norm``; activations: ``batch``). A rule maps a
logical name to a tuple of mesh axes (empty: replicated). Resolving the names of one array
(``logical_to_spec``), like ``flax.linen.logical_to_mesh_axes``, gives a ``PartitionSpec`` with
two safety rules:

* a mesh axis shards at most one dim of an array (the first dim naming it wins: for an expert
  bank ``(expert, embed, mlp)`` the ``expert`` axis goes to the expert dim, so ``embed``'s rule
  ``(fsdp, expert)`` leaves it ``fsdp`` only);
* mesh axes a dim does not divide by are dropped from the end of its tuple (the dim stays
  replicated over them), so any config compiles on any mesh; ``ShardingPlan.fallbacks`` lists
  where that happened.

``ShardingPlan`` bundles the mesh and the rules. ``use(plan)`` makes it current while a step is
traced: the MoE layers then take their expert-parallel path (``expert_parallel``) and
``constrain`` pins activations; without a current plan both are no-ops (one device).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

Rules = Mapping[str, tuple[str, ...]]


def rules_from_config(config) -> dict[str, tuple[str, ...]]:
    """``config.parallel.rules`` as ``{logical: (mesh axes...)}`` (a bare string is one axis)."""
    out = {}
    for k, v in dict(config.parallel.rules).items():
        if v is None:
            v = ()
        elif isinstance(v, str):
            v = (v,)
        out[k] = tuple(v)
    return out


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh_shape: Mapping[str, int],
                    rules: Rules, fallbacks: list | None = None, where: str = "") -> PartitionSpec:
    """PartitionSpec of an array of ``shape`` whose dims carry the logical ``names``.

    Unknown logical names raise (a typo would silently replicate a multi-GB tensor). Mesh axes of
    size 1 are left out of the spec (they shard nothing).
    """
    if names is None:
        return PartitionSpec()
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"{where}: {len(names)} logical names {names} for an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"{where}: logical axis {name!r} has no rule in parallel.rules ({sorted(rules)})")
        axes = [a for a in rules[name] if a not in used and mesh_shape.get(a, 1) > 1]
        wanted = list(axes)
        while axes and size % math.prod(mesh_shape[a] for a in axes):
            axes.pop()
        if fallbacks is not None and axes != wanted:
            fallbacks.append((where, name, size, tuple(wanted), tuple(axes)))
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


@dataclasses.dataclass
class ShardingPlan:
    """A mesh plus logical-axis rules: everything the trainer needs to place arrays."""

    mesh: jax.sharding.Mesh
    rules: dict[str, tuple[str, ...]]
    time_capacity_factor: float = 0.0
    fallbacks: list = dataclasses.field(default_factory=list)

    @classmethod
    def from_config(cls, config, mesh) -> ShardingPlan:
        return cls(mesh, rules_from_config(config), float(config.parallel.time_capacity_factor))

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(self.mesh.axis_names, self.mesh.devices.shape))

    def axis_size(self, axes: Sequence[str] | str | None) -> int:
        if axes is None:
            return 1
        axes = (axes,) if isinstance(axes, str) else axes
        return math.prod(self.shape.get(a, 1) for a in axes)

    def spec(self, names, shape, where: str = "") -> PartitionSpec:
        return logical_to_spec(names, shape, self.shape, self.rules, self.fallbacks, where)

    def sharding(self, names, shape, where: str = "") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape, where))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes (size > 1) the batch dim is sharded over, in rule order."""
        return tuple(a for a in self.rules.get("batch", ()) if self.shape.get(a, 1) > 1)

    def batch_sharding(self, batch_size: int | None = None) -> NamedSharding:
        """Batch-major arrays [B, ...] of any rank: dim 0 over the batch axes (must divide ``batch_size``)."""
        axes = self.batch_axes()
        if batch_size is not None and batch_size % self.axis_size(axes):
            raise ValueError(f"global batch {batch_size} does not divide over the batch axes {axes} "
                             f"(size {self.axis_size(axes)}) of mesh {self.shape}")
        entry = None if not axes else axes[0] if len(axes) == 1 else axes
        return NamedSharding(self.mesh, PartitionSpec(entry))


_CURRENT: contextvars.ContextVar[ShardingPlan | None] = contextvars.ContextVar("raphael_plan", default=None)


@contextlib.contextmanager
def use(plan: ShardingPlan | None):
    """Make ``plan`` current while tracing (the MoE layers and ``constrain`` read it)."""
    token = _CURRENT.set(plan)
    try:
        yield plan
    finally:
        _CURRENT.reset(token)


def current() -> ShardingPlan | None:
    return _CURRENT.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of an activation by logical names; identity without a plan."""
    plan = current()
    if plan is None or plan.mesh.devices.size == 1:
        return x
    spec = logical_to_spec(names, x.shape, plan.shape, plan.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(plan.mesh, spec))
