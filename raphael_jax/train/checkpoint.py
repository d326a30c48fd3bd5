"""Checkpoints of a run: orbax CheckpointManager holding the train state, the data position and the config.

Layout under ``<workdir>/checkpoints/<step>/``: ``state`` (params, EMA, optimizer, step, RNG;
``StandardSave``, restored onto any sharding), ``data`` (the input iterator's JSON state) and
``config`` (the run's config as JSON). Every process takes part in every save.

orbax writes each checkpoint into a temporary folder and renames it when complete, so a process killed
mid-save leaves no half checkpoint under its step number. A step folder damaged afterwards (files
deleted or truncated by hand, a full disk, a bad copy) is detected when it is read: the trainer and
the sampling commands warn with its step, move it to ``<workdir>/checkpoints_damaged/`` (never delete
it) and use the newest intact one (:meth:`RunCheckpoints.restore_config_intact`). The sizes of a
checkpoint's files are recorded after its save (``<workdir>/checkpoint_sizes/<step>.json``) so that a file
truncated part-way is caught before orbax reads it; one that still fails while being read (no record:
killed right after the save) is moved aside the same way (:meth:`RunCheckpoints.restore_with_fallback`).
A save that fails (a full disk, an unwritable folder) raises :class:`CheckpointWriteError`; the earlier
checkpoints are untouched.
"""
from __future__ import annotations

import dataclasses
import errno
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


SIZES_DIR = "checkpoint_sizes"  # <workdir>/checkpoint_sizes/<step>.json: every file's size after the save


class RunCheckpoints:
    """Thin wrapper over ``ocp.CheckpointManager`` for one workdir."""

    def __init__(self, workdir: str, max_to_keep: int = 2, async_save: bool = True, config_from=from_saved):
        """``config_from``: the saved config's JSON dict -> the run's config (validating it); the diffusion
        trainer's :func:`raphael_jax.config.from_saved` by default, the upscaler trainer passes its own."""
        self.config_from = config_from
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                  enable_async_checkpointing=async_save)
        self.manager = self._open()
        self._writing: int | None = None
        self._failed = False

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"), options=self._opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict, config) -> None:
        """Start saving ``step`` (asynchronously when enabled). A failed write, of this save or of the previous
        asynchronous one (a full disk, an unwritable folder), raises :class:`CheckpointWriteError`; the
        earlier checkpoints are untouched (orbax commits a checkpoint by renaming its temporary folder and
        deletes old ones only after that)."""
        self._finish()
        self._writing = step
        if jax.process_index() == 0 and os.path.isfile(self._sizes_path(step)):
            os.remove(self._sizes_path(step))  # a record of an earlier save of this step (moved aside since)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(json.loads(config.to_json()))))
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore wrap OSErrors in several types
            raise self._write_error(e) from e

    def _finish(self) -> None:
        """Wait for the asynchronous save in flight; its failure becomes a :class:`CheckpointWriteError`.
        A completed save gets its file sizes recorded (:meth:`_record_sizes`)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(e) from e
        if self._writing is not None and jax.process_index() == 0:
            self._record_sizes(self._writing)
        self._writing = None

    def _sizes_path(self, step: int) -> str:
        return os.path.join(os.path.dirname(self.directory), SIZES_DIR, f"{step}.json")

    def _record_sizes(self, step: int) -> None:
        """Write every file's size of the committed ``step`` to ``<workdir>/checkpoint_sizes/<step>.json``
        (atomically), so that :meth:`check_step` notices a file truncated part-way (which orbax would only
        find while reading, after many errors); drops the records of steps that no longer exist."""
        root = os.path.join(self.directory, str(step))
        if not os.path.isdir(root):
            return
        sizes = {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
                 for d, _, files in os.walk(root) for f in files}
        path = self._sizes_path(step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump(sizes, fh)
        os.replace(path + ".tmp", path)
        kept = {f"{s}.json" for s in self.committed_steps()}
        for name in os.listdir(os.path.dirname(path)):
            if name.endswith(".json") and name not in kept:
                os.remove(os.path.join(os.path.dirname(path), name))

    def _check_sizes(self, step: int) -> None:
        """Compare ``step``'s files with the sizes recorded after its save (none recorded: nothing to do)."""
        path = self._sizes_path(step)
        if not os.path.isfile(path):
            return
        try:
            sizes = json.load(open(path))
        except ValueError:
            return  # our own record is unreadable: the other checks still run
        root = os.path.join(self.directory, str(step))
        for rel, size in sizes.items():
            full = os.path.join(root, rel)
            if not os.path.isfile(full):
                raise DamagedCheckpointError(f"file {rel} is missing")
            if os.path.getsize(full) != size:
                raise DamagedCheckpointError(f"file {rel} is {os.path.getsize(full)} bytes, {size} when saved")

    def committed_steps(self) -> list[int]:
        """Steps with a committed folder on disk (no temporary ones), oldest first."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())

    def _write_error(self, e: Exception) -> CheckpointWriteError:
        self._failed = True
        cause = _root_cause(e)
        kept = self.committed_steps()
        return CheckpointWriteError(
            f"could not write the checkpoint of step {self._writing} into {self.directory} ({cause}); "
            f"the earlier checkpoints (steps {kept}) are intact: free disk space or fix the folder's "
            "permissions, then run the same command to resume")

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
        return self.config_from(out["config"])

    def check_step(self, step: int) -> None:
        """Raise ``DamagedCheckpointError`` unless ``step``'s folder holds every item with its files intact.

        Cheap: reads the config and data items and the state's metadata, checks that the state's files are
        non-empty and, when the trainer recorded them after the save (``<workdir>/checkpoint_sizes/``),
        that every file exists with the size it had then (a file truncated part-way fails)."""
        root = os.path.join(self.directory, str(step))
        try:
            for item in ("state", "data", "config"):
                if not os.path.isdir(os.path.join(root, item)):
                    raise DamagedCheckpointError(f"item {item!r} missing")
            self.restore_config(step)
            self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
            self.manager.item_metadata(step)["state"]  # noqa: B018 - parses the state's tree metadata
            _check_files(os.path.join(root, "state"))
            self._check_sizes(step)
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
                self.report_damaged(step, e, move=move)
                continue
            return step
        raise FileNotFoundError(f"no intact checkpoint in {self.directory}: every one is damaged "
                                f"(steps {damaged}); start a new --workdir or restore the files")

    def report_damaged(self, step: int, error: Exception, *, move: bool = True) -> None:
        """Warn on stderr that ``step`` is damaged and (``move``, process 0) move it aside."""
        where = ""
        if move and jax.process_index() == 0:
            where = f"; moved to {self.move_aside(step)}"
        print(f"warning: {error}{where}; trying the previous checkpoint", file=sys.stderr, flush=True)

    def read_with_fallback(self, step: int, read, *, fallback: bool = True):
        """(step, ``read(step)``); when ``step``'s data files turn out damaged only while being read (a file
        truncated part-way passes :meth:`check_step`), the step is reported, moved aside and the newest intact
        earlier one read instead (``fallback=False``: :class:`DamagedCheckpointError`). Other errors propagate."""
        while True:
            try:
                return step, read(step)
            except Exception as e:  # noqa: BLE001 - sorted by read_damage below
                damage = read_damage(e)
                if damage is None:
                    raise
                error = DamagedCheckpointError(f"checkpoint at step {step} in {self.directory} is damaged: {damage}")
                if not fallback:
                    raise error from None
                self.report_damaged(step, error)
                step = self.newest_intact_step()

    def restore_with_fallback(self, abstract_state, step: int):
        """(step, state, data_state): :meth:`restore` through :meth:`read_with_fallback`."""
        step, (state, data_state) = self.read_with_fallback(step, lambda s: self.restore(abstract_state, s))
        return step, state, data_state

    def restore_config_intact(self) -> tuple[int, ml_collections.ConfigDict]:
        """(newest intact step, its config), moving damaged newer checkpoints aside."""
        step = self.newest_intact_step()
        return step, self.restore_config(step)

    def close(self) -> None:
        """Wait for the save in flight (:class:`CheckpointWriteError` if it failed) and close the manager."""
        if self._failed:  # the failed save's threads are in an undefined state: do not wait on them again
            return
        self._finish()
        self.manager.close()


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (a full disk, an unwritable folder, a file-size limit)."""


def _root_cause(e: BaseException) -> str:
    """The innermost ``OSError`` of ``e``'s chain (``[Errno 28] No space left on device``), else ``e``'s first line."""
    found = None
    for cur in _chain(e):
        if isinstance(cur, OSError) and cur.errno is not None:
            found = cur
    if found is not None:
        return f"[Errno {found.errno}] {found.strerror}"
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM):
        if os.strerror(code) in text:  # tensorstore reports the OS error inside its own message
            return f"[Errno {code}] {os.strerror(code)}"
    lines = text.splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


_READ_DAMAGE = ("DATA_LOSS", "OUT_OF_RANGE", "Error reading", "NOT_FOUND")


def read_damage(e: BaseException) -> str | None:
    """The first line of the tensorstore read error (truncated, missing or corrupt data file) in ``e``'s
    chain, or None when ``e`` is not one (a bug, a wrong sharding: those must not move checkpoints aside)."""
    for cur in _chain(e):
        text = str(cur)
        if any(m in text for m in _READ_DAMAGE):
            return text.strip().splitlines()[0][:300]
    return None


def _chain(e: BaseException):
    """``e``, then its causes / contexts, each once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


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
    control: Any = None  # ControlNet runs: (graphdef, weights) of the ControlNet; the weights above are its base's


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
    explicit = step is not None
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
        graphdef, params = split_model(nnx.eval_shape(lambda: RaphaelModel(config, rngs=nnx.Rngs(config.seed))))
        if config.lora.rank:  # a LoRA run: its checkpoints hold the adapters; the weights are its base's + them
            from raphael_jax.train.finetune import abstract_adapters
            params = abstract_adapters(config, params)
        elif config.control.enabled:  # a ControlNet run: its checkpoints hold the ControlNet; its base the rest
            from raphael_jax.train.control import split_controlnet
            control_graphdef, params = split_controlnet(config)
        if plan is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, params)
        else:
            from raphael_jax.parallel.sharding import tree_shardings
            shardings = tree_shardings(params, plan)
        abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                                       shardings)
        names = {"both": ("params", "ema_params"), "ema": ("ema_params",), "params": ("params",)}[weights]
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), **{k: abstract_params for k in names}}
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)

        def read(s):
            return ocp.PyTreeCheckpointer().restore(os.path.join(ckpts.directory, str(s), "state"), args=(
                ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)))

        # the user's explicit step gets no silent substitute
        step, state = ckpts.read_with_fallback(step, read, fallback=not explicit)
    finally:
        ckpts.close()
    tokenizer = Tokenizer.load(os.path.join(workdir, TOKENIZER_FILE)) if config.text.kind == "small" else None
    enc_path = os.path.join(workdir, ENCODERS_FILE)
    encoders = json.loads(open(enc_path).read()) if os.path.isfile(enc_path) else None
    if config.lora.rank:
        from raphael_jax.models.lora import adapter_scale, merge_lora
        from raphael_jax.train.finetune import load_base
        base = load_base(config, plan)
        scale = adapter_scale(config.lora.alpha, config.lora.rank)
        state = {k: merge_lora(base.ema_params, [(v, scale)]) if k in ("params", "ema_params") else v
                 for k, v in state.items()}
        encoders = encoders or base.encoders
    control = None
    if config.control.enabled:
        from raphael_jax.train.finetune import load_base
        base = load_base(config, plan)
        control = (control_graphdef, state.get("ema_params", state.get("params")))
        state = {k: base.ema_params if k in ("params", "ema_params") else v for k, v in state.items()}
    return Run(os.path.abspath(workdir), int(state["step"]), config, graphdef, state.get("params"),
               state.get("ema_params"), tokenizer, encoders, control)
