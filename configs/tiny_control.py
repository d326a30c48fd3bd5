"""A ControlNet on a trained tiny run: the scenes' edge maps (exact outlines, = Canny on this world) as the
control image, captions without places so the layout comes from the control alone (docs/FINETUNE.md).

    raphael-train --config configs/tiny.py --workdir runs/tiny
    raphael-train --config configs/tiny_control.py --workdir runs/tiny_control --set train.init_from=runs/tiny
    raphael-eval control --workdir runs/tiny_control                 # place follows the control?
    raphael-sample --workdir runs/tiny_control --prompt "a big red circle" --control scene.png --out out/

The base stays frozen; the ControlNet (a copy of the U-Net's encoder and middle, the hint encoder and the
zero convolutions: raphael_jax/models/controlnet.py) trains on 1- and 2-object scenes.
"""
from raphael_jax.config import config_module, sibling_config

common = config_module(__file__, "common")


def get_config(arg=None):
    c = sibling_config(__file__, "tiny")
    c.control.enabled = True
    c.control.scale = 1.0
    c.data.caption_places = False
    c.data.object_weights = (1.0, 1.0, 0.0)
    c.train.init_from = "runs/tiny"
    t = c.train
    t.num_steps = 1200
    t.warmup_steps = 100
    t.learning_rate = 1e-3
    t.log_every = 100
    t.checkpoint_every = 400
    t.sample_every = 1200
    return common.with_variants(c, arg)
