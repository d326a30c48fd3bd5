"""The latent shapes world: RAPHAEL on 16x16x4 latents of the project's own shapes-world VAE, with
frozen text states of a CLIP-layout text tower, through the real image-text pipeline.

    launch/latent_shapes.sh runs/latent_shapes      # VAE -> folder -> build -> precompute -> train -> eval

It proves that the latent path learns, not only runs (README "The latent shapes world", docs/RESULTS.md §6): the same
world and the same U-Net shape as ``configs/tiny.py`` (levels 16/8/4 with 32/64/64 channels, RAPHAEL
blocks at 8x8, 4x4 and the middle, 4 space and 4 time experts, edge heads), here on the latents of a
64 px KL autoencoder (factor 4, ``raphael-train-vae``) and on text states of a random CLIP text tower
(``raphael_jax.tools.tiny_clip``; frozen features still carry the words) whose vocabulary makes
every world word one token (``raphael_jax.data.shapes.clip_vocab``). Set ``data.latents_dir`` (the
``raphael-precompute`` output); ``encoders.json`` in the workdir records the VAE and CLIP folders.
"""
from raphael_jax.config import config_module, sibling_config

common = config_module(__file__, "common")

CLIP_WIDTH = 64  # the random CLIP text tower of launch/latent_shapes.sh


def get_config(arg=None):
    c = sibling_config(__file__, "tiny")
    m = c.model
    m.in_channels = 4
    m.patch_size = 1                    # 16x16 latents: levels 16/8/4 as the tiny pixel model's stem gives
    m.edge.source = "canny"             # edges come from the build (Canny at 64 px, max-pooled to 16x16)
    c.text.kind = "external"
    c.text.width = m.context_dim = CLIP_WIDTH
    c.text.max_len = 16                 # SOT + at most 8 words + EOT, padded
    d = c.data
    d.kind = "latents"
    d.image_size = 16                   # latent side (64 px / 4); informational
    d.latent_mode = "mean"
    c.train.sample_every = 0            # the evaluation samples at the end (launch/latent_shapes.sh)
    return common.with_variants(c, arg)
