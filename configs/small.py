"""Small RAPHAEL on the 64x64 shapes world with 1-3 object scenes (GPU-sized; runs on CPU slowly).

    raphael-train --config configs/small.py --workdir runs/small

SD-like 3-level pixel U-Net (2x2 stem, 64/128/256 channels), RAPHAEL blocks at every level with
6 space experts and 4 time experts as in the paper.
"""
from raphael_jax.config import config_module, sibling_config

common = config_module(__file__, "common")


def get_config(arg=None):
    c = sibling_config(__file__, "tiny")
    m = c.model
    m.channels = (64, 128, 256)
    m.num_res_blocks = 2
    m.block_levels = (1, 1, 1)
    m.self_attention_levels = (0, 1, 1)
    m.head_dim = 64
    m.norm_groups = 32
    m.space_moe.num_experts = 6
    m.space_moe.hidden_mult = 4.0
    m.space_moe.gate_hidden = 128
    m.time_moe.num_experts = 4
    m.time_moe.hidden_mult = 4.0
    m.time_moe.gate_hidden = 128
    m.edge.channels = 32
    c.text.width = m.context_dim = 128
    c.data.image_size = 64
    c.data.object_weights = (1.0, 1.0, 1.0)
    t = c.train
    t.batch_size = 64
    t.num_steps = 50_000
    t.learning_rate = 5e-4
    t.warmup_steps = 1000
    t.ema_decay = 0.999
    t.checkpoint_every = 1000
    t.sample_every = 5000
    return common.with_variants(c, arg)
