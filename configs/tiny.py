"""Tiny RAPHAEL on the 32x32 captioned-shapes world: the embedded default, trains on 2 CPU cores.

    raphael-train --config configs/tiny.py --workdir runs/tiny

Pixel-space U-Net (2x2 space-to-depth stem, levels 16/8/4 with 32/64/64 channels) with RAPHAEL
blocks at 8x8, 4x4 and the middle (7 blocks), 4 space experts, 4 time experts,
edge heads, a 2-layer trainable text encoder. v-prediction with the cosine schedule: on this short
budget epsilon-prediction left the layout (where the object goes) to the initial noise instead of
the prompt. Single-object scenes.
Results (README "Results"): per-attribute accuracy on 200 held-out single-object prompts.
Ablations: ``configs/tiny.py:no_space_moe`` etc. (the variants of ``configs/common.py``).
"""
from raphael_jax.config import base_config, config_module

common = config_module(__file__, "common")


def get_config(arg=None):
    c = base_config()
    m = c.model
    m.patch_size = 2
    m.channels = (32, 64, 64)
    m.num_res_blocks = 1
    m.block_levels = (0, 1, 1)          # RAPHAEL blocks at 8x8 and 4x4 (+ middle): 7 blocks
    m.self_attention_levels = (0, 1, 1)
    m.head_dim = 32
    m.pos_embed = True                      # 2D position embedding on the cross-attention queries
    m.text_temb = True                      # pooled text into the ResBlocks (colour reaches the 16x16 level)
    m.space_moe.num_experts = 4
    m.space_moe.hidden_mult = 1.0          # 4 experts x 1x width: a 4x FFN's FLOPs per position
    m.space_moe.gate_hidden = 32
    m.time_moe.num_experts = 4
    m.time_moe.hidden_mult = 2.0
    m.time_moe.gate_hidden = 32
    m.edge.channels = 8
    m.edge.source = "outline"               # exact shape outlines (= Canny on this world, 8x cheaper)
    c.text.width = m.context_dim = 64
    c.diffusion.schedule = "cosine"
    c.diffusion.prediction = "v"
    c.data.image_size = 32
    c.data.object_weights = (1.0, 0.0, 0.0)
    t = c.train
    t.batch_size = 32
    t.num_steps = 2400
    t.learning_rate = 2e-3
    t.warmup_steps = 200
    t.ema_decay = 0.995
    t.log_every = 100
    t.checkpoint_every = 400
    t.sample_every = 2400
    c.sample.guidance = 3.0
    c.sample.num_steps = 25
    return common.with_variants(c, arg)
