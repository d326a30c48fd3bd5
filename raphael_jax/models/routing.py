"""Pick the sown routing statistics and edge logits out of a model after a forward pass, by name.

Every MoE / block sows ``nnx.Intermediate`` values under fixed names; ``pop_intermediates`` removes
them from the module and returns ``{name: [value per layer in forward order]}`` plus the layer
paths, so the loss, the metric logs and the path-analysis tools read them the same way.
"""
from __future__ import annotations

from flax import nnx

NAMES = ("space_route", "space_usage", "region_masks", "cross_attention", "time_route", "time_usage",
         "edge_logits")


def _path_key(path) -> tuple:
    # nnx.List children are indexed by int; order by the module tree's (down, mid, up) layout
    order = {"down": 0, "mid_attn": 1, "up": 2}
    out = []
    for p in path:
        out.append((order.get(p, 3), p) if isinstance(p, str) else (-1, p))
    return tuple(out)


def pop_intermediates(model: nnx.Module) -> dict[str, list]:
    """Remove sown intermediates from ``model``; return ``{name: [per-layer values]}`` and ``"paths"``.

    Layers are ordered as the forward pass visits them (down path, middle, up path).
    """
    state = nnx.pop(model, nnx.Intermediate)
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = path[-1]
        value = var.get_value() if isinstance(var, nnx.Variable) else var  # Variable.value is deprecated (flax 0.12.8+)
        if isinstance(value, tuple):  # sow's default reduce keeps a tuple per call
            value = value[-1]
        flat.append((path[:-1], name, value))
    flat.sort(key=lambda e: _path_key(e[0]))
    out: dict[str, list] = {n: [] for n in NAMES}
    paths: dict[str, list] = {n: [] for n in NAMES}
    for layer_path, name, value in flat:
        out.setdefault(name, []).append(value)
        paths.setdefault(name, []).append("/".join(str(p) for p in layer_path))
    out["paths"] = paths
    return out
