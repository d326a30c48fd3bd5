"""Ablation variants of every config in this folder: ``configs/<name>.py:<variant>[,<variant>...]``.

    raphael-train --config configs/tiny.py:no_space_moe,no_edge --workdir runs/tiny_no_space_no_edge

Not a config itself: the config files load it with ``config_module(__file__, "common")`` (they are
loaded by path, not imported as a package) and every ``get_config(arg=None)`` ends with
``with_variants(config, arg)``. That applies the comma-separated switches of :data:`VARIANTS` (in
the order given; ``dense`` last, so it is sized on the final MoE settings) and records them in
``config.variant``; ``raphael_jax.config.load_config`` checks the record against the variants it
was asked for, so a config file that ignores its argument fails instead of silently returning the
full model. The switches (the paper's Fig. 6 ablations):

- ``full``: the config as written;
- ``no_space_moe`` / ``no_time_moe`` / ``no_moe``: that MoE (both) replaced by a plain GELU FFN of
  width ``model.ffn_mult`` (Fig. 6b);
- ``no_edge``: no edge head and no edge loss (Fig. 6b);
- ``dense``: both MoEs replaced by ONE FFN of the RAPHAEL block's active width per position
  (:func:`dense_ffn_mult`; the FLOP-matched dense baseline);
- ``experts=N``: N space experts, 0 = no space-MoE (Fig. 6c);
- ``time_experts=N``: N time experts, 0 = no time-MoE;
- ``alpha=X``: the space-MoE's region threshold alpha (Fig. 6a, left);
- ``tc=N``: edge loss only for t < N (Fig. 6a, right; 0 = no edge loss);
- ``multi``: 1-, 2- and 3-object scenes in equal parts.
"""
from raphael_jax.config import VARIANT_KEY, ConfigError, split_variants


def dense_ffn_mult(model_cfg) -> float:
    """FFN width (x dim) of the dense baseline with the RAPHAEL block's active FLOPs per image position.

    Per position the time-MoE spends one expert and the space-MoE's efficient form one pass of
    every space expert, so the matched dense FFN is ``time.hidden_mult + K_space * space.hidden_mult``.
    """
    return float(model_cfg.time_moe.hidden_mult + model_cfg.space_moe.num_experts * model_cfg.space_moe.hidden_mult)


def _full(c):
    pass


def _no_space_moe(c):
    c.model.space_moe.enabled = False


def _no_time_moe(c):
    c.model.time_moe.enabled = False


def _no_moe(c):
    c.model.space_moe.enabled = False
    c.model.time_moe.enabled = False


def _no_edge(c):
    c.model.edge.enabled = False


def _dense(c):
    c.model.dense_ffn_mult = dense_ffn_mult(c.model)


def _experts(c, n):
    if n == 0:
        c.model.space_moe.enabled = False
    else:
        c.model.space_moe.num_experts = n


def _time_experts(c, n):
    if n == 0:
        c.model.time_moe.enabled = False
    else:
        c.model.time_moe.num_experts = n


def _alpha(c, x):
    c.model.space_moe.alpha = x


def _tc(c, n):
    c.model.edge.t_c = n


def _multi(c):
    c.data.object_weights = (1.0, 1.0, 1.0)


# name -> (value type, or None for a plain switch; function editing the config)
VARIANTS = {
    "full": (None, _full),
    "no_space_moe": (None, _no_space_moe),
    "no_time_moe": (None, _no_time_moe),
    "no_moe": (None, _no_moe),
    "no_edge": (None, _no_edge),
    "dense": (None, _dense),
    "experts": (int, _experts),
    "time_experts": (int, _time_experts),
    "alpha": (float, _alpha),
    "tc": (int, _tc),
    "multi": (None, _multi),
}
APPLIED_LAST = ("dense",)  # sized on the other switches' result
_PLACEHOLDER = {int: "N", float: "X"}


def known_variants() -> str:
    """``full, no_space_moe, ..., experts=N, alpha=X, ...`` (for error messages and help texts)."""
    return ", ".join(n if t is None else f"{n}={_PLACEHOLDER[t]}" for n, (t, _) in VARIANTS.items())


def with_variants(config, arg=None):
    """Apply the comma-separated variants of ``arg`` to ``config`` and record them in ``config.variant``."""
    parts = split_variants(arg)
    steps = []
    for part in parts:
        name, sep, raw = part.partition("=")
        name = name.strip()
        if name not in VARIANTS:
            raise ConfigError(f"unknown config variant {part!r}; known: {known_variants()}")
        kind, fn = VARIANTS[name]
        if kind is None:
            if sep:
                raise ConfigError(f"config variant {part!r}: {name} takes no value")
            steps.append((name, fn, ()))
            continue
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ConfigError(f"config variant {part!r}: {name}={_PLACEHOLDER[kind]} needs "
                              f"{'an integer' if kind is int else 'a number'}") from None
        steps.append((name, fn, (value,)))
    steps.sort(key=lambda s: s[0] in APPLIED_LAST)  # stable: the others in the order given
    for _, fn, args in steps:
        fn(config, *args)
    with config.unlocked():
        config[VARIANT_KEY] = ",".join(parts)
    return config
