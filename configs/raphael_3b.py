"""RAPHAEL at paper scale: 16 RAPHAEL blocks in the SD U-Net layout, 6 space experts, 4 time experts.

Latent diffusion on KL-f8 latents (4 channels) with frozen OpenCLIP ViT-g/14 text states
(77 x 1024). Paper training (Table 2): AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0, 20k
warm-up steps, batch 2000, epsilon target, T = 1000, T_c = 500, alpha = 0.2.
Denoiser parameters (``raphael-params --config configs/raphael_3b.py``): see README.
"""
from raphael_jax.config import base_config, config_module

common = config_module(__file__, "common")

BASE_WIDTH = 384


def get_config(arg=None):
    c = base_config()
    m = c.model
    m.in_channels = 4
    m.patch_size = 1
    w = BASE_WIDTH
    m.channels = (w, 2 * w, 4 * w, 4 * w)
    m.num_res_blocks = 2
    m.block_levels = (1, 1, 1, 0)          # 2+2+2 down, 1 mid, 3+3+3 up = 16 blocks
    m.self_attention_levels = (1, 1, 1, 1)
    m.mid_block = True
    m.head_dim = 64
    m.norm_groups = 32
    m.context_dim = 1024                   # OpenCLIP ViT-g/14 text width
    m.space_moe.num_experts = 6
    m.space_moe.hidden_mult = 5.5          # [SILENT] expert width; 5.5x puts the denoiser at ~3.0B
    m.space_moe.gate_hidden = 1024
    m.time_moe.num_experts = 4
    m.time_moe.hidden_mult = 5.5
    m.time_moe.gate_hidden = 1024
    m.edge.channels = 64
    m.dtype = "bfloat16"
    m.remat = "full"
    c.text.kind = "external"
    c.text.width = 1024
    c.text.max_len = 77
    c.diffusion.schedule = "scaled_linear"
    c.diffusion.prediction = "epsilon"
    c.data.kind = "latents"
    c.data.image_size = 80                 # 640 px / 8 (the 640x640 bucket)
    t = c.train
    t.batch_size = 2000
    t.num_steps = 1_000_000
    t.learning_rate = 1e-4
    t.warmup_steps = 20_000
    t.weight_decay = 0.0
    t.ema_decay = 0.9999
    t.log_every = 100
    t.checkpoint_every = 5000
    t.sample_every = 20_000
    c.sample.guidance = 4.5                # paper: best w with space-MoE
    return common.with_variants(c, arg)
