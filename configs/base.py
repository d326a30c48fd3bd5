"""Base config: ``raphael_jax.config.base_config()`` (every field the code reads, with the paper's
choices where it gives them), plus the ablation variants of ``configs/common.py``, e.g.
``configs/base.py:no_space_moe,no_edge``. The other configs here edit a copy of it.
"""
from raphael_jax.config import base_config, config_module

common = config_module(__file__, "common")


def get_config(arg=None):
    return common.with_variants(base_config(), arg)
