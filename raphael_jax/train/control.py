"""ControlNet runs: the trainable copy of the base's encoder (raphael_jax/models/controlnet.py), trained on
the frozen base model of ``train.init_from`` with the scenes' edge maps as the control image.

A ControlNet run (``control.enabled``) reads its base's EMA weights once (like a LoRA run,
raphael_jax/train/finetune.py: the base workdir is never written) and checkpoints only the ControlNet.
Its encoder copy starts from the base U-Net's weights and its zero convolutions at zero, so at step 0
the controlled model is the base model exactly.
"""
from __future__ import annotations

from flax import nnx

from raphael_jax.models.controlnet import ControlNet, init_from_unet


def build_controlnet(config, seed: int = 0) -> ControlNet:
    return ControlNet(config.model, control_channels=1, rngs=nnx.Rngs(seed + 1))


def split_controlnet(config, seed: int = 0, abstract: bool = True):
    """(graphdef, params) of the config's ControlNet (ShapeDtypeStructs when ``abstract``)."""
    build = lambda: build_controlnet(config, seed)  # noqa: E731
    return nnx.split(nnx.eval_shape(build) if abstract else build(), nnx.Param)


def start_from_base(state: dict, base_params) -> dict:
    """A fresh ControlNet state whose params and EMA copy the base's U-Net (zero convs kept at zero)."""
    params = init_from_unet(state["params"], base_params)
    ema = init_from_unet(state["ema_params"], base_params)
    return {**state, "params": params, "ema_params": ema}


def preview_controls(config, n: int = 16):
    """(prompts, control images [n, H, W, 1]) of the training previews: evaluation-stream scenes, their captions
    as the run trains on them (without places when ``data.caption_places`` is off) and their edge maps."""
    import numpy as np

    from raphael_jax.data.edges import get_edge_source
    from raphael_jax.data.shapes.world import example
    from raphael_jax.train.loop import object_range

    lo, hi, w = object_range(config)
    edge = get_edge_source(config.model.edge.source)
    exs = [example(config.eval.seed + 1, i, config.data.image_size, lo, hi, w if hi > lo else None, stream=1,
                   places=config.data.caption_places) for i in range(n)]
    return [e["caption"] for e in exs], np.stack([np.asarray(edge(e["image"]), np.float32)[..., None] for e in exs])
