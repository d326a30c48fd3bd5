"""docs/img/finetune_ring.png and finetune_control.png (docs/RESULTS.md section 8), from runs/tiny, runs/ring and
runs/tiny_control (launch/finetune_ring.sh, launch/tiny_control.sh): python docs/img/finetune_figures.py"""
import numpy as np
from PIL import Image

from raphael_jax.data.shapes.subject import unseen_prompts
from raphael_jax.data.shapes.world import make_caption
from raphael_jax.evaluation.control import control_scenes, recolour
from raphael_jax.sampling import Sampler, image_grid, subject_words
from raphael_jax.train.checkpoint import load_run


def save(grid, path):
    g = np.asarray(grid)
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(path)

lr = load_run("runs/ring/lora4")
objs = unseen_prompts(lr.config.data.subject, 8, 1234)
prompts = [make_caption(o) for o in objs]
rows = []
for wd in ("runs/tiny", "runs/ring/lora4", "runs/ring/full"):
    s = Sampler.from_run(load_run(wd))
    s.new_words = subject_words(lr.config)
    rows.append(s.sample(prompts, seed=1234))
save(image_grid(np.concatenate(rows), cols=8), "docs/img/finetune_ring.png")
print("ring prompts:", " | ".join(prompts))
s = Sampler.from_run(load_run("runs/tiny_control"))
objs, hints = control_scenes(s.config, 8, 1234)
ctrl = np.repeat((hints * 255).astype(np.uint8), 3, axis=-1)
a = s.sample([make_caption(o, places=False) for o in objs], seed=1234, hint=hints)
re = recolour(objs, 1234)
b = s.sample([make_caption(o, places=False) for o in re], seed=1234, hint=hints)
save(image_grid(np.concatenate([ctrl, a, b]), cols=8), "docs/img/finetune_control.png")
print("control prompts:", " | ".join(make_caption(o, places=False) for o in objs))
print("recoloured:", " | ".join(make_caption(o, places=False) for o in re))
