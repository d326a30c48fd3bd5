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
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from raphael_jax.config import from_saved
from raphael_jax.data.shapes.tokenizer import TOKENIZER_FILE, Tokenizer
from raphael_jax.models.raphael import RaphaelModel
from raphael_jax.train.state import init_state, make_optimizer, split_model


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
    weights at ``step`` and the text tokenizer it was trained with (None for precomputed text states)."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    graphdef: Any
    params: Any
    ema_params: Any
    tokenizer: Tokenizer | None


def load_run(workdir: str, step: int | None = None) -> Run:
    """Restore ``workdir``'s checkpoint at ``step`` (latest by default) onto the first local device.

    The model is built abstractly (``nnx.eval_shape``, no random init): the checkpoint supplies every
    value. The optimizer state is restored too (orbax needs the full tree) and dropped.
    """
    ckpts = RunCheckpoints(workdir, async_save=False)
    try:
        if ckpts.latest_step() is None:
            raise FileNotFoundError(f"{workdir} holds no checkpoint (train first: raphael-train --workdir {workdir})")
        config = ckpts.restore_config(step)
        graphdef, params = split_model(nnx.eval_shape(lambda: RaphaelModel(config, rngs=nnx.Rngs(config.seed))))
        abstract = jax.eval_shape(lambda p: init_state(config, p, make_optimizer(config)), params)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        state, _ = ckpts.restore(abstract, step)
    finally:
        ckpts.close()
    tok_path = os.path.join(workdir, TOKENIZER_FILE)
    tokenizer = Tokenizer.load(tok_path) if config.text.kind == "small" else None
    return Run(os.path.abspath(workdir), int(state["step"]), config, graphdef, state["params"],
               state["ema_params"], tokenizer)
