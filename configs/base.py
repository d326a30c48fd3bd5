"""Base config: every field the code reads, with the paper's choices where it gives them.

Variants import this and edit it (``tiny.py``, ``small.py``, ``raphael_3b.py``). The ``arg`` of
``get_config`` takes ablation switches, e.g. ``configs/tiny.py:no_space_moe,no_edge``
(see ``raphael_jax.config.apply_variant``).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- denoiser -------------------------------------------------------------------------
    m = c.model = ml_collections.ConfigDict()
    m.in_channels = 3            # 3 for pixels, 4 for KL-f8 latents
    m.patch_size = 1             # space-to-depth stem (pixel models)
    m.channels = (32, 64, 64)
    m.num_res_blocks = 1
    m.block_levels = (1, 1, 1)   # a RAPHAEL block after each ResNet block of these levels
    m.self_attention_levels = (0, 1, 1)
    m.mid_block = True
    m.head_dim = 32
    m.norm_groups = 8
    m.context_dim = 64           # d_y: text token width
    m.text_temb = False          # add the pooled text to the ResBlocks' timestep embedding (Imagen/SDXL style)
    m.pos_embed = False          # 2D sin-cos position embedding on the cross-attention queries
    m.ffn_mult = 4.0             # plain FFN replacing a switched-off MoE
    m.dense_ffn_mult = 0.0       # > 0: dense baseline (both MoEs -> one FFN of this width)
    m.dtype = "float32"
    m.remat = False
    s = m.space_moe = ml_collections.ConfigDict()
    s.enabled = True
    s.num_experts = 6            # paper: 6
    s.hidden_mult = 4.0
    s.gate_hidden = 64
    s.alpha = 0.2                # paper: region threshold alpha = 0.2
    s.router_noise = 1.0         # std of the gate-logit noise, training only
    s.gate_grad = "prob"         # prob | straight_through | none
    s.average = "real"           # real: mean over real tokens; all: the paper's 1/n_y
    t = m.time_moe = ml_collections.ConfigDict()
    t.enabled = True
    t.num_experts = 4            # paper: 4
    t.hidden_mult = 4.0
    t.gate_hidden = 64
    t.router_noise = 1.0
    t.gate_grad = "prob"
    t.impl = "gather"            # gather | ragged
    e = m.edge = ml_collections.ConfigDict()
    e.enabled = True
    e.channels = 32
    e.num_layers = 5             # paper: 5 conv layers
    e.token = "eot"              # eot (pooled token) | mean
    e.t_c = 500                  # paper: edge loss only for t < T_c
    e.focal_alpha = 0.5
    e.focal_gamma = 2.0
    e.weight = 1.0
    e.source = "canny"

    # --- text encoder ---------------------------------------------------------------------
    tx = c.text = ml_collections.ConfigDict()
    tx.kind = "small"            # small (trainable, shapes world) | external (CLIP / precomputed)
    tx.vocab_size = 64
    tx.width = 64
    tx.num_layers = 2
    tx.num_heads = 4
    tx.max_len = 32
    tx.embed_init_std = 1.0      # token/position embedding init std (T5's 1.0; GPT/CLIP use 0.02)

    # --- diffusion ------------------------------------------------------------------------
    d = c.diffusion = ml_collections.ConfigDict()
    d.num_timesteps = 1000
    d.schedule = "scaled_linear"  # scaled_linear | linear | cosine
    d.prediction = "epsilon"      # epsilon (paper) | v

    # --- data -----------------------------------------------------------------------------
    da = c.data = ml_collections.ConfigDict()
    da.kind = "shapes"
    da.image_size = 32
    da.object_weights = (1.0, 0.0, 0.0)   # relative frequency of 1-, 2-, 3-object scenes
    da.seed = 0

    # --- training -------------------------------------------------------------------------
    tr = c.train = ml_collections.ConfigDict()
    tr.batch_size = 32
    tr.num_steps = 1000
    tr.learning_rate = 1e-4       # paper: 1e-4, AdamW (0.9, 0.999), weight decay 0
    tr.warmup_steps = 200
    tr.lr_schedule = "constant"   # after warm-up: constant | cosine (decays to lr_final_fraction * lr at num_steps)
    tr.lr_final_fraction = 0.0
    tr.weight_decay = 0.0
    tr.b1 = 0.9
    tr.b2 = 0.999
    tr.grad_clip = 1.0
    tr.ema_decay = 0.999
    tr.caption_dropout = 0.1
    tr.log_every = 50
    tr.checkpoint_every = 500
    tr.sample_every = 1000
    tr.max_to_keep = 2
    tr.init_from = ""             # workdir whose latest params/EMA initialize a new run (curricula)

    # --- scale-out (raphael_jax.parallel, docs/SCALE_OUT.md) ------------------------------
    p = c.parallel = ml_collections.ConfigDict()
    # Mesh over the physical axes, outermost first (data crosses hosts / DCN, tensor is innermost).
    # -1 fills the devices left over (at most one axis); with parallel.num_devices=0 a -1 axis
    # stops at the largest size that still divides the global batch (single-process runs only).
    p.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
    p.num_devices = 0             # 0: every device (multi-process runs always use all of them)
    # Logical axis -> mesh axes. Parameters: embed/context/conv_in are FSDP-sharded over
    # fsdp (and expert, which carries data in the dense layers); mlp/heads/gate/conv_out/vocab
    # over tensor; the expert dim of the expert banks over expert. Activations: batch over
    # every data-like axis. A mesh axis is used once per array (the first dim that names it
    # wins) and is dropped from a dim it does not divide (the dim then stays replicated on it).
    p.rules = ml_collections.ConfigDict({
        "batch": ("data", "fsdp", "expert"),
        "embed": ("fsdp", "expert"),
        "context": ("fsdp", "expert"),
        "conv_in": ("fsdp", "expert"),
        "mlp": ("tensor",),
        "heads": ("tensor",),
        "kv": (),
        "gate": ("tensor",),
        "conv_out": ("tensor",),
        "vocab": ("tensor",),
        "expert": ("expert",),
        "norm": (),
    })
    # Time-MoE expert parallelism: per (device, expert) capacity = ceil(factor * local batch / K)
    # samples; a sample over capacity skips the time-MoE (residual only). 0 = never drop
    # (capacity = local batch: exact, costs K x the buffer and expert FLOPs).
    p.time_capacity_factor = 2.0

    # --- sampling / evaluation ------------------------------------------------------------
    sa = c.sample = ml_collections.ConfigDict()
    sa.num_steps = 50
    sa.guidance = 3.0
    sa.eta = 0.0
    sa.timestep_spacing = "trailing"  # first step at t = T-1 (Lin et al. 2024); "leading" = diffusers' default
    sa.use_clipped_model_output = True  # eps re-derived from the clipped x0 (raphael_jax.sampling.ddim_options)
    sa.guidance_rescale = 0.0           # Lin et al. 2024 CFG rescale phi (diffusers' guidance_rescale)
    ev = c.eval = ml_collections.ConfigDict()
    ev.num_prompts = 200
    ev.seed = 1234
    ev.batch_size = 100
    return c
