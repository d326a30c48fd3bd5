"""Checkpoints of a run: orbax CheckpointManager holding the train state, the data position and the config.

Layout under ``<workdir>/checkpoints/<step>/``: ``state`` (params, EMA, optimizer, step, RNG;
``StandardSave``, restored onto any sharding), ``data`` (the input iterator's JSON state) and
``config`` (the run's config as JSON). Every process takes part in every save.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from raphael_jax.config import from_saved
from raphael_jax.data.latents import ENCODERS_FILE
from raphael_jax.data.shapes.tokenizer import TOKENIZER_FILE, Tokenizer
from raphael_jax.models.raphael import RaphaelModel
from raphael_jax.train.state import split_model


class RunCheckpoints:
    """Thin wrapper over ``ocp.CheckpointManager`` for one workdir."""

    def __init__(self, workdir: str, max_to_keep: int = 2, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"), options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict, config) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(config.to_json()))))

    def restore(self, abstract_state, step: int | None = None):
        """Restore (state, data_state) at ``step`` (latest by default) onto ``abstract_state``'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return from_saved(out["config"])


    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings when the leaves have them) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


@dataclasses.dataclass
class Run:
    """A trained run restored for use (sampling, evaluation, analysis): its config, model graph,
    weights at ``step`` (``params`` / ``ema_params``: None when not restored), the text tokenizer it was
    trained with (None for CLIP text states) and, for latent runs, ``encoders``: its ``encoders.json``
    (the CLIP, tokenizer and VAE folders and settings the latents and text states were made with)."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    graphdef: Any
    params: Any
    ema_params: Any
    tokenizer: Tokenizer | None
    encoders: dict | None = None


WEIGHTS = ("both", "ema", "params")


def load_run(workdir: str, step: int | None = None, *, weights: str = "both", plan=None) -> Run:
    """Restore ``workdir``'s checkpoint at ``step`` (latest by default).

    Only the weights are read (``weights``: ``"both"``, ``"ema"`` or ``"params"``), never the optimizer
    state. They land on the first local device, or with ``plan`` (a ``ShardingPlan``) sharded by their
    logical axes over its mesh (FSDP for models that do not fit one device). The model is built
    abstractly (``nnx.eval_shape``, no random init): the checkpoint supplies every value.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    ckpts = RunCheckpoints(workdir, async_save=False)
    try:
        if ckpts.latest_step() is None:
            raise FileNotFoundError(f"{workdir} holds no checkpoint (train first: raphael-train --workdir {workdir})")
        step = ckpts.latest_step() if step is None else step
        if step not in ckpts.manager.all_steps():
            raise FileNotFoundError(f"{workdir} has no checkpoint at step {step} (it has {ckpts.manager.all_steps()})")
        config = ckpts.restore_config(step)
    finally:
        ckpts.close()
    graphdef, params = split_model(nnx.eval_shape(lambda: RaphaelModel(config, rngs=nnx.Rngs(config.seed))))
    if plan is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, params)
    else:
        from raphael_jax.parallel.sharding import tree_shardings
        shardings = tree_shardings(params, plan)
    abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    names = {"both": ("params", "ema_params"), "ema": ("ema_params",), "params": ("params",)}[weights]
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), **{k: abstract_params for k in names}}
    path = os.path.join(ckpts.directory, str(step), "state")
    state = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
    tokenizer = Tokenizer.load(os.path.join(workdir, TOKENIZER_FILE)) if config.text.kind == "small" else None
    enc_path = os.path.join(workdir, ENCODERS_FILE)
    encoders = json.loads(open(enc_path).read()) if os.path.isfile(enc_path) else None
    return Run(os.path.abspath(workdir), int(state["step"]), config, graphdef, state.get("params"),
               state.get("ema_params"), tokenizer, encoders)
