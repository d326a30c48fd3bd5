"""Fine-tune a trained tiny run on a new subject: 32 images of rings (a kind the base never saw) in two
colours, one size and two places; LoRA by default (docs/FINETUNE.md).

    raphael-train --config configs/tiny.py --workdir runs/tiny
    raphael-train --config configs/tiny_ring.py --workdir runs/ring_lora4 --set train.init_from=runs/tiny
    raphael-train --config configs/tiny_ring.py --workdir runs/ring_full --set train.init_from=runs/tiny \\
        --set lora.rank=0 --set train.learning_rate=1e-4             # full fine-tuning, the same budget
    raphael-eval subject --workdir runs/ring_lora4                   # unseen colours/places + retention

The whole measurement (rank 1/4/16 and full): launch/finetune_ring.sh. The subject set:
``data.subject`` (raphael_jax/data/shapes/subject.py); the model: configs/tiny.py unchanged.
"""
from raphael_jax.config import config_module, sibling_config

common = config_module(__file__, "common")


def get_config(arg=None):
    c = sibling_config(__file__, "tiny")
    c.data.kind = "subject"
    s = c.data.subject
    s.kind = "ring"
    s.colours = ("red", "blue")
    s.sizes = ("big",)
    s.places = ("center", "left")
    s.num_images = 32
    c.lora.rank = 4
    c.lora.alpha = 0.0                # = rank: A @ B at scale 1 whatever the rank
    c.lora.targets = ("attention", "experts", "convs")  # without the convs no ring is learned (seed-99 tuning)
    c.train.init_from = "runs/tiny"
    t = c.train
    t.num_steps = 300                # 300 passes over the 32 images at batch 32
    t.warmup_steps = 30
    t.learning_rate = 1e-3           # chosen on seed 99 among 1e-3, 3e-3
    t.log_every = 50
    t.checkpoint_every = 300
    t.sample_every = 300
    return common.with_variants(c, arg)
