"""LoRA fine-tuning runs: the frozen base they read, the adapter file they write, and how they are restored.

A LoRA run (``lora.rank`` > 0) names its base run in ``train.init_from``. The base's EMA weights are
read once (never written: the base's workdir stays as it was) and passed to every train step; the run's
own checkpoints hold only the adapters, their EMA and optimizer state. At every checkpoint the EMA
adapters are also written to ``<workdir>/lora.safetensors`` (raphael_jax/convert/lora_file.py),
the file ``raphael-sample --lora FILE[:SCALE]`` applies to any run with the same model.
"""
from __future__ import annotations

import json
import os

import jax

from raphael_jax.convert.lora_file import load_adapters, save_adapters
from raphael_jax.models import lora as lora_lib

ADAPTER_FILE = "lora.safetensors"
# the sections of the config that give the model's weights their shapes and meaning
MODEL_SECTIONS = ("model", "text", "diffusion")


def _sections(config) -> dict:
    return {k: json.loads(config[k].to_json()) for k in MODEL_SECTIONS}


def load_base(config, plan=None):
    """The base run of a LoRA config (``train.init_from``): a ``Run`` with its EMA weights (sharded by
    ``plan``). ValueError when its model differs from the config's."""
    from raphael_jax.train.checkpoint import load_run

    src = config.train.init_from
    base = load_run(src, weights="ema", plan=plan)
    a, b = _sections(base.config), _sections(config)
    diff = sorted(f"{s}.{k}" for s in MODEL_SECTIONS for k in set(a[s]) | set(b[s]) if a[s].get(k) != b[s].get(k))
    if diff:
        raise ValueError(f"train.init_from={src!r} was trained with another model ({', '.join(diff[:4])} differ): "
                         "fine-tune it with the config it was trained with (plus data/train/lora changes)")
    if base.config.lora.rank:
        raise ValueError(f"train.init_from={src!r} is itself a LoRA run; fine-tune its base, or merge it first")
    return base


def adapter_meta(config, base_step: int, step: int) -> dict:
    return {"rank": int(config.lora.rank), "alpha": float(config.lora.alpha), "targets": list(config.lora.targets),
            "base": os.path.abspath(config.train.init_from), "base_step": int(base_step), "step": int(step),
            "subject": json.loads(config.data.subject.to_json()) if config.data.kind == "subject" else None}


def export_adapters(workdir: str, adapters, config, base_step: int, step: int) -> str | None:
    """Write the adapters (host 0) to ``<workdir>/lora.safetensors``; returns its path (None on other hosts)."""
    adapters = jax.tree.map(lambda x: jax.device_get(x), adapters)
    if jax.process_index() != 0:
        return None
    path = os.path.join(workdir, ADAPTER_FILE)
    save_adapters(adapters, path, adapter_meta(config, base_step, step))
    return path


def abstract_adapters(config, abstract_params):
    """ShapeDtypeStruct tree of the adapters a LoRA config trains (for restoring its checkpoints)."""
    return jax.eval_shape(lambda: lora_lib.init_adapters(abstract_params, config.lora.targets, config.lora.rank,
                                                         jax.random.key(0)))


def load_lora_files(specs, params, *, source_of=str, with_meta: bool = False):
    """``[(adapters, scale)]`` for ``raphael-sample --lora FILE[:SCALE]`` arguments, checked against
    ``params`` (LoraError naming the file when one does not fit); with ``with_meta`` also the files'
    metadata, in the same order."""
    out, metas = [], []
    for spec in specs:
        path, scale = lora_lib.parse_lora_arg(spec)
        adapters, meta = load_adapters(path)
        lora_lib.check_fits(adapters, params, source_of(path))
        out.append((adapters, lora_lib.adapter_scale(meta["alpha"], meta["rank"], scale)))
        metas.append(meta)
    return (out, metas) if with_meta else out
