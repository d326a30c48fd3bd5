"""The device mesh from the config: axes ``data``, ``fsdp``, ``expert``, ``tensor`` (outermost first).

``config.parallel.mesh`` gives a size per axis; sizes may be 1, and one axis may be -1 to take the
devices left over. The order puts the axis with the least traffic (``data``: one gradient
all-reduce per step) outermost, where it crosses hosts, and ``tensor`` (collectives in every
layer) innermost. Meshes use ``AxisType.Auto`` (GSPMD propagation; ``jax.make_mesh`` defaults to
explicit axes).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int, *, batch_size: int | None = None,
                       batch_axes: Sequence[str] = (), shrink_to_batch: bool = False) -> dict[str, int]:
    """Sizes of every mesh axis, the -1 axis filled with the devices left over.

    With ``shrink_to_batch`` (and a ``batch_size``) a -1 axis that names a batch axis stops at the
    largest size that still divides the global batch, leaving devices idle rather than failing
    (handy on a box whose device count does not divide the batch; multi-process runs never shrink).
    """
    unknown = set(mesh_cfg) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"parallel.mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"parallel.mesh: at most one axis may be -1, got {fill}")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"parallel.mesh: sizes must be positive or -1, got {dict(sizes)}")
    fixed = math.prod(s for s in sizes.values() if s > 0)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"parallel.mesh {dict(sizes)}: {num_devices} devices do not divide by the fixed "
                             f"axes' product {fixed}")
        n = num_devices // fixed
        a = fill[0]
        if shrink_to_batch and batch_size and a in batch_axes:
            other = math.prod(sizes[b] for b in batch_axes if b != a)
            while n > 1 and batch_size % (other * n):
                n -= 1
        sizes[a] = n
    total = math.prod(sizes.values())
    if total > num_devices:
        raise ValueError(f"parallel.mesh {sizes} needs {total} devices, only {num_devices} available")
    return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` over ``MESH_AXES`` with Auto axis types (topology-aware order from ``jax.make_mesh``)."""
    devices = list(jax.devices() if devices is None else devices)
    dims = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    n = math.prod(dims)
    if n > len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {n} devices, got {len(devices)}")
    if devices[0].platform == "cpu":
        # virtual CPU devices have no topology: keep the process-major order (each process owns a
        # contiguous block of the mesh, so host-local batches are contiguous slices of the global one)
        arr = np.array(sorted(devices[:n], key=lambda d: (d.process_index, d.id))).reshape(dims)
        return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:n])


def mesh_from_config(config, devices: Sequence | None = None) -> Mesh:
    """The run's mesh from ``config.parallel`` and the global batch (``config.train.batch_size``)."""
    pc = config.parallel
    devices = list(jax.devices() if devices is None else devices)
    if pc.num_devices:
        if pc.num_devices > len(devices):
            raise ValueError(f"parallel.num_devices={pc.num_devices} but only {len(devices)} devices")
        devices = devices[:pc.num_devices]
    shrink = not pc.num_devices and jax.process_count() == 1
    shape = resolve_mesh_shape(dict(pc.mesh), len(devices), batch_size=config.train.batch_size,
                               batch_axes=tuple(pc.rules.batch), shrink_to_batch=shrink)
    if jax.process_count() > 1 and math.prod(shape.values()) != len(devices):
        raise ValueError(f"multi-process runs must use every device: mesh {shape} vs {len(devices)} devices")
    return make_mesh(shape, devices)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def describe(mesh: Mesh) -> str:
    shape = mesh_shape(mesh)
    return " x ".join(f"{a} {s}" for a, s in shape.items()) + f" ({mesh.devices.size} devices)"
