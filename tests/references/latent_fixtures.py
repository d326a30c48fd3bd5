"""Builders of tiny test artefacts shared by several test modules (tests/ is on sys.path: tests/conftest.py):
the small latent config overrides, a tiny random diffusers VAE, a tiny random FID Inception and a fake COCO."""
import json

import numpy as np

# configs/small_latent.py shrunk to a few RAPHAEL blocks (with MoEs and edge heads) on one device.
LATENT_SMALL = ["model.channels=(16, 32)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 0)",
                "model.num_res_blocks=1", "model.mid_block=False", "model.head_dim=16", "model.norm_groups=8",
                "model.remat=none", "model.space_moe.num_experts=2", "model.space_moe.gate_hidden=16",
                "model.space_moe.hidden_mult=1.0", "model.time_moe.num_experts=2",
                "model.time_moe.gate_hidden=16", "model.time_moe.hidden_mult=1.0", "model.edge.channels=4",
                "model.edge.num_layers=2", "text.width=32", "model.context_dim=32", "train.batch_size=3",
                "train.log_every=1", "train.checkpoint_every=100", "train.warmup_steps=1",
                "train.learning_rate=1e-3", "parallel.num_devices=1"]


def write_tiny_vae(out_dir, seed: int = 0) -> str:
    """A random diffusers AutoencoderKL (factor 2, 4 latent channels) saved with ``save_pretrained``."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    vae.save_pretrained(out_dir, safe_serialization=True)
    return str(out_dir)


def write_tiny_inception(path, channel_divisor: int = 64, seed: int = 0) -> str:
    """A random FID Inception (channels / ``channel_divisor``) under pytorch-fid's tensor names, as the
    converter writes it."""
    from flax import nnx

    from raphael_jax.convert.safetensors_io import write_safetensors
    from raphael_jax.evaluation.inception import InceptionConfig, inception_torch_name, init_inception

    net = init_inception(InceptionConfig(channel_divisor=channel_divisor), seed=seed)
    tensors = {}
    for p, var in nnx.to_flat_state(nnx.state(net)):
        v = np.asarray(var[...])
        tensors[inception_torch_name(p)] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
    write_safetensors(tensors, path)
    return str(path)


def write_fake_coco(root, num_images: int, words, seed: int = 0):
    """``root/val2014/*.jpg`` (random sizes) and ``root/annotations/captions_val2014.json`` with two
    captions of five ``words`` per image, in shuffled order."""
    from PIL import Image

    (root / "val2014").mkdir(parents=True)
    rs = np.random.RandomState(seed)
    images, anns = [], []
    for k in range(num_images):
        image_id = 1000 + 7 * k
        name = f"COCO_val2014_{image_id:012d}.jpg"
        h, w = rs.randint(40, 80, 2)
        arr = np.clip(rs.normal(120, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "val2014" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": int(h), "width": int(w)})
        for j in range(2):
            anns.append({"id": 50000 + 2 * k + j, "image_id": image_id,
                         "caption": " ".join(rs.choice(words, 5)) + " ."})
    rs.shuffle(anns)
    ann_path = root / "annotations" / "captions_val2014.json"
    ann_path.parent.mkdir()
    ann_path.write_text(json.dumps({"images": images, "annotations": anns}))
    return root
