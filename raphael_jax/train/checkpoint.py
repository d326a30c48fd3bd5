"""Checkpoints of a run: orbax CheckpointManager holding the train state, the data position and the config.

Layout under ``<workdir>/checkpoints/<step>/``: ``state`` (params, EMA, optimizer, step, RNG;
``StandardSave``, restored onto any sharding), ``data`` (the input iterator's JSON state) and
``config`` (the run's config as JSON). Every process takes part in every save.

orbax writes each checkpoint into a temporary folder and renames it when complete, so a process killed
mid-save leaves no half checkpoint under its step number. A step folder damaged afterwards (files
deleted or truncated by hand, a full disk, a bad copy) is detected when it is read: the trainer and
the sampling commands warn with its step, move it to ``<workdir>/checkpoints_damaged/`` (never delete
it) and use the newest intact one (:meth:`RunCheckpoints.restore_config_intact`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
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


class _QuietPartialRestore(logging.Filter):
    """Drops orbax's warning for every item a restore leaves out on purpose (reading a run's config or data
    position without its state prints one per call otherwise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was found in the checkpoint, but could not be restored" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietPartialRestore())


class RunCheckpoints:
    """Thin wrapper over ``ocp.CheckpointManager`` for one workdir."""

    def __init__(self, workdir: str, max_to_keep: int = 2, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                  enable_async_checkpointing=async_save)
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"), options=self._opts)

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

    def check_step(self, step: int) -> None:
        """Raise ``DamagedCheckpointError`` unless ``step``'s folder holds every item with its files intact.

        Cheap: reads the config and data items and the state's metadata, and checks that every file the
        state's array store lists exists with a size matching its manifest (truncated files fail)."""
        root = os.path.join(self.directory, str(step))
        try:
            for item in ("state", "data", "config"):
                if not os.path.isdir(os.path.join(root, item)):
                    raise DamagedCheckpointError(f"item {item!r} missing")
            self.restore_config(step)
            self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
            self.manager.item_metadata(step)["state"]  # noqa: B018 - parses the state's tree metadata
            _check_files(os.path.join(root, "state"))
        except DamagedCheckpointError as e:
            raise DamagedCheckpointError(f"checkpoint at step {step} in {self.directory} is damaged: {e}") from None
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore / json raise many kinds on damaged files
            raise DamagedCheckpointError(f"checkpoint at step {step} in {self.directory} is damaged: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def move_aside(self, step: int) -> str:
        """Move step ``step``'s folder to ``<workdir>/checkpoints_damaged/<step>-<time>``; returns the new path."""
        dest_root = os.path.join(os.path.dirname(self.directory), "checkpoints_damaged")
        os.makedirs(dest_root, exist_ok=True)
        dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(os.path.join(self.directory, str(step)), dest)
        self.manager.close()
        self.manager = self._open()  # forget the moved step
        return dest

    def newest_intact_step(self, *, move: bool = True) -> int:
        """The newest step whose checkpoint passes :meth:`check_step`; damaged newer ones are reported on
        stderr and (``move``) moved aside. ``FileNotFoundError`` when there is none (or nothing intact)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        damaged = []
        for step in steps:
            try:
                self.check_step(step)
            except DamagedCheckpointError as e:
                damaged.append(step)
                where = ""
                if move and jax.process_index() == 0:
                    where = f"; moved to {self.move_aside(step)}"
                print(f"warning: {e}{where}; trying the previous checkpoint", file=sys.stderr, flush=True)
                continue
            return step
        raise FileNotFoundError(f"no intact checkpoint in {self.directory}: every one is damaged "
                                f"(steps {damaged}); start a new --workdir or restore the files")

    def restore_config_intact(self) -> tuple[int, ml_collections.ConfigDict]:
        """(newest intact step, its config), moving damaged newer checkpoints aside."""
        step = self.newest_intact_step()
        return step, self.restore_config(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class DamagedCheckpointError(ValueError):
    """A checkpoint folder with missing items or files, short files or unreadable metadata."""


def _check_files(state_dir: str) -> None:
    """Every non-empty file of an orbax state item must be readable; OCDBT manifests name their data files.

    Truncation is caught where tensorstore would only notice at read time: each ``d/`` data file of an
    OCDBT store must be non-empty, and the item must hold its metadata files.
    """
    names = set(os.listdir(state_dir))
    if not names:
        raise DamagedCheckpointError("the state item is empty")
    if "_METADATA" not in names and "_sharding" not in names and "manifest.ocdbt" not in names:
        raise DamagedCheckpointError(f"the state item has no metadata ({sorted(names)[:5]})")
    for dirpath, _, files in os.walk(state_dir):
        for f in files:
            path = os.path.join(dirpath, f)
            if os.path.getsize(path) == 0 and not f.startswith("."):
                raise DamagedCheckpointError(f"empty file {os.path.relpath(path, state_dir)}")


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
        if step is None:  # the newest intact one; damaged newer ones are reported and moved aside
            step = ckpts.newest_intact_step()
        elif step not in ckpts.manager.all_steps():
            raise FileNotFoundError(f"{workdir} has no checkpoint at step {step} (it has {ckpts.manager.all_steps()})")
        else:
            ckpts.check_step(step)
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
