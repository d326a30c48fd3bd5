"""Small latent RAPHAEL on precomputed KL-f8 latents and frozen CLIP text states (real image-text data).

    raphael-data image-text DATA/laion_folder --data-dir tfds                     # build (docs/DATA_REAL.md)
    raphael-precompute --config configs/small_latent.py --set data.tfds_dir=... --set data.latents_dir=...
    raphael-train --config configs/small_latent.py --set data.latents_dir=... --workdir runs/small_latent

U-Net on 4-channel latents (patch 1), 3 levels 128/256/512 with RAPHAEL blocks at every level,
6 space experts and 4 time experts as in the paper, edge heads on latent-resolution edge maps.
The text encoder is external (``text.kind="external"``): the batches carry text states from the
precompute pass, so ``model.context_dim`` = ``text.width`` = the CLIP width: 1024 for OpenCLIP
ViT-g/14 (the paper's) or ViT-H/14, 768 for OpenAI ViT-L/14, 1280 for ViT-bigG/14. The trainer
checks it against the precompute's ``meta.json``. Latents of the nine buckets (/8: 56x104 ...
104x56) are divisible by 4, as this 3-level U-Net needs.

``data.*`` directories (set them with ``--set`` or edit here):
- ``tfds_dir``: the image_text build (``DATA_DIR/image_text/NAME/1.0.0``), read by the precompute;
- ``vae_dir`` / ``clip_dir`` / ``tokenizer_dir``: weights for the precompute (safetensors folders or
  ``raphael-convert`` outputs; tokenizer_dir "" means clip_dir);
- ``latents_dir``: the precompute output, read by the trainer.
The trainer records the CLIP, tokenizer and VAE folders of the latents in ``<workdir>/encoders.json``;
its previews (``train.sample_every``) and ``raphael-sample --workdir`` load them from there (decoded by
the VAE, no x0 clipping in latent space: ``sample.clip_x0 = -1`` is auto).
"""
from raphael_jax.config import base_config, config_module

common = config_module(__file__, "common")

CLIP_WIDTH = 1024  # OpenCLIP ViT-g/14


def get_config(arg=None):
    c = base_config()
    m = c.model
    m.in_channels = 4
    m.patch_size = 1
    m.channels = (128, 256, 512)
    m.num_res_blocks = 2
    m.block_levels = (1, 1, 1)
    m.self_attention_levels = (1, 1, 1)
    m.head_dim = 64
    m.norm_groups = 32
    m.context_dim = CLIP_WIDTH
    m.space_moe.num_experts = 6
    m.space_moe.hidden_mult = 4.0
    m.space_moe.gate_hidden = 256
    m.time_moe.num_experts = 4
    m.time_moe.hidden_mult = 4.0
    m.time_moe.gate_hidden = 256
    m.edge.channels = 32
    m.edge.source = "canny"
    m.remat = "full"
    c.text.kind = "external"
    c.text.width = CLIP_WIDTH
    c.text.max_len = 77
    c.diffusion.schedule = "scaled_linear"
    c.diffusion.prediction = "epsilon"
    d = c.data
    d.kind = "latents"
    d.image_size = 80                  # 640 px / 8 (the square bucket); only informational here
    # tfds_dir, tokenizer_dir, latents_dir ("" until set), latent_mode "mean", text_layer "last":
    # the base's defaults (raphael_jax.config.base_config)
    d.vae_dir = "weights/sd-vae-ft-mse"
    d.clip_dir = "weights/clip-vit-g-14"
    t = c.train
    t.batch_size = 64
    t.num_steps = 100_000
    t.learning_rate = 1e-4
    t.warmup_steps = 2000
    t.ema_decay = 0.9999
    t.caption_dropout = 0.1
    t.log_every = 100
    t.checkpoint_every = 2000
    t.sample_every = 5000              # preview grids decoded by the VAE (encoders.json)
    c.sample.guidance = 4.5
    return common.with_variants(c, arg)
