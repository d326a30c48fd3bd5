"""Loading configs (``configs/<name>.py[:arg]``), command-line overrides and ablation variants."""
from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections

ABLATIONS = ("full", "no_space_moe", "no_time_moe", "no_edge", "dense", "no_moe")


def dense_ffn_mult(model_cfg) -> float:
    """FFN width (x dim) of the dense baseline with the RAPHAEL block's active FLOPs per image position.

    Per position the time-MoE spends one expert and the space-MoE's efficient form one pass of
    every space expert, so the matched dense FFN is ``time.hidden_mult + K_space * space.hidden_mult``.
    """
    return float(model_cfg.time_moe.hidden_mult + model_cfg.space_moe.num_experts * model_cfg.space_moe.hidden_mult)


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Apply ablation switches named by ``variant``, a comma-separated list such as
    ``no_space_moe``, ``no_time_moe``, ``no_edge``, ``dense``, ``experts=4``, ``alpha=0.3``,
    ``tc=300``, ``time_experts=2``, ``multi`` (1-3 object scenes)."""
    m = config.model
    for part in [p.strip() for p in (variant or "").split(",") if p.strip()]:
        key, _, val = part.partition("=")
        if key == "full":
            continue
        elif key == "no_space_moe":
            m.space_moe.enabled = False
        elif key == "no_time_moe":
            m.time_moe.enabled = False
        elif key == "no_moe":
            m.space_moe.enabled = False
            m.time_moe.enabled = False
        elif key == "no_edge":
            m.edge.enabled = False
        elif key == "dense":
            m.dense_ffn_mult = dense_ffn_mult(m)
        elif key == "experts":
            n = int(val)
            if n == 0:
                m.space_moe.enabled = False
            else:
                m.space_moe.num_experts = n
        elif key == "time_experts":
            m.time_moe.num_experts = int(val)
        elif key == "alpha":
            m.space_moe.alpha = float(val)
        elif key == "tc":
            m.edge.t_c = int(val)
        elif key == "multi":
            config.data.object_weights = (1.0, 1.0, 1.0)
        else:
            raise ValueError(f"unknown config variant {part!r}; known: {ABLATIONS} and "
                             "experts=N, time_experts=N, alpha=X, tc=N, multi")
    return config


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py`` or ``path/to/config.py:arg`` (``get_config(arg)``), then apply
    ``key.sub=value`` overrides (values parsed as Python literals, else kept as strings)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location(f"_raphael_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg=None)")
    config = module.get_config(arg) if arg else module.get_config()
    apply_overrides(config, overrides)
    config.lock()
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"unknown config key {key!r} (no {p!r})")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"unknown config key {key!r}")
        old = node[parts[-1]]
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        node[parts[-1]] = value


def sibling_config(this_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``<dir of this_file>/<name>.py`` (lets config files build on a base)."""
    path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
    return load_config(f"{path}:{arg}" if arg else path).unlock()


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's config as saved in its checkpoint (JSON: lists for tuples) as a ConfigDict."""

    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return tuple(fix(x) for x in v)
        return v

    return ml_collections.ConfigDict(fix(saved))
