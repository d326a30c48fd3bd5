"""Tiny RAPHAEL continued on 1-3 object scenes (curriculum: start from a single-object tiny run).

    raphael-train --config configs/tiny.py --workdir runs/tiny
    raphael-train --config configs/tiny_multi.py --workdir runs/tiny_multi --set train.init_from=runs/tiny
    raphael-eval alignment --workdir runs/tiny_multi

Without space-MoE (the comparison the README asks for; not run yet): the same two commands with
``configs/tiny.py:no_space_moe`` and ``configs/tiny_multi.py:no_space_moe``.
"""
from raphael_jax.config import config_module, sibling_config

common = config_module(__file__, "common")


def get_config(arg=None):
    c = sibling_config(__file__, "tiny")
    c.data.object_weights = (1.0, 2.0, 1.0)   # mostly two-object scenes, single objects kept in the mix
    t = c.train
    t.num_steps = 4000
    t.warmup_steps = 100
    t.learning_rate = 1e-3
    t.sample_every = 4000
    return common.with_variants(c, arg)
