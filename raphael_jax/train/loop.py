"""The training loop: ``train_and_evaluate(config, workdir)``.

Resumes by default from the workdir's newest intact checkpoint (state, EMA, optimizer, step, RNG, data
position), refusing a config that differs in more than the keys of :data:`SAFE_ON_RESUME`; writes
TensorBoard scalars and sample grids (host 0 only); prints a progress line with step, loss, steps/s
and ETA. SIGTERM / SIGINT save a checkpoint at the step boundary and raise
:class:`~raphael_jax.train.preemption.Preempted`; steps with a non-finite loss or gradient leave the
weights untouched (raphael_jax/train/step.py), are counted (``nonfinite_steps``) and stop the run after
``train.max_nonfinite_steps`` in a row. docs/RELIABILITY.md lists each promise and its test.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from raphael_jax.data.shapes.pipeline import ShapesWorldSource, make_train_iterator
from raphael_jax.data.shapes.tokenizer import TOKENIZER_FILE, Tokenizer
from raphael_jax.data.shapes.world import make_caption, sample_prompts
from raphael_jax.diffusion.schedule import NoiseSchedule
from raphael_jax.models.lora import adapter_scale, merge_lora
from raphael_jax.parallel.mesh import describe, mesh_from_config
from raphael_jax.parallel.rules import ShardingPlan
from raphael_jax.parallel.sharding import global_batch, tree_shardings, with_shardings
from raphael_jax.sampling import Sampler, image_grid, save_png
from raphael_jax.train.checkpoint import RunCheckpoints, abstract_like
from raphael_jax.train.finetune import export_adapters, load_base
from raphael_jax.train.host_memory import release_free_memory
from raphael_jax.train.preemption import Preempted, StopSignals
from raphael_jax.train.state import abstract_train_state, make_optimizer, sharded_init
from raphael_jax.train.step import jit_train_step, make_train_step, step_rng


def load_or_train_tokenizer(config, workdir: str) -> Tokenizer:
    """The run's tokenizer: loaded from the workdir (or from ``train.init_from``'s), else trained on the
    world's captions; saved in the workdir either way."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    parent = os.path.join(config.train.init_from, TOKENIZER_FILE) if config.train.init_from else None
    if os.path.exists(path):
        tok = Tokenizer.load(path)
    elif parent:
        tok = Tokenizer.load(parent)
        if jax.process_index() == 0:
            tok.save(path)
    else:
        tok = Tokenizer.train_on_world(seed=config.data.seed)
        if jax.process_index() == 0:
            tok.save(path)
    if tok.vocab_size > config.text.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but text.vocab_size={config.text.vocab_size}")
    return tok


def object_range(config):
    weights = tuple(config.data.object_weights)
    nonzero = [i for i, w in enumerate(weights) if w > 0]
    if not nonzero:
        raise ValueError(f"data.object_weights={weights} has no positive entry")
    lo, hi = nonzero[0] + 1, nonzero[-1] + 1
    return lo, hi, weights[lo - 1:hi]


def make_data_iterator(config, tokenizer: Tokenizer | None):
    n_proc = jax.process_count()
    if config.train.batch_size % n_proc:
        raise ValueError(f"train.batch_size={config.train.batch_size} does not split over {n_proc} processes")
    if config.data.kind == "latents":  # precomputed VAE latents + text states (raphael_jax.data.latents)
        from raphael_jax.data.latents import make_latents_iterator
        latents_dir = config.data.latents_dir
        if not latents_dir:
            raise ValueError("data.kind='latents' needs data.latents_dir (the output of raphael-precompute)")
        return make_latents_iterator(
            latents_dir, batch_size=config.train.batch_size // n_proc, seed=config.data.seed,
            shard_index=jax.process_index(), shard_count=n_proc, expect_text_width=config.model.context_dim,
            expect_latent_channels=config.model.in_channels)
    if config.data.kind == "subject":  # the fine-tuning subject (raphael_jax/data/shapes/subject.py)
        from raphael_jax.data.shapes.subject import SubjectSource
        from raphael_jax.data.shapes.world import NEW_KINDS
        sj = config.data.subject
        return make_train_iterator(
            seed=config.data.seed, image_size=config.data.image_size, min_objects=1, max_objects=1,
            batch_size=config.train.batch_size // n_proc, tokenizer=tokenizer, max_len=config.text.max_len,
            edge_source=config.model.edge.source if config.model.edge.enabled else None,
            shard_index=jax.process_index(), shard_count=n_proc,
            source=SubjectSource(sj, config.data.seed, config.data.image_size),
            new_words=(sj.kind,) if sj.kind in NEW_KINDS else ())
    if config.data.kind != "shapes":
        raise ValueError(f"data.kind must be 'shapes', 'subject' or 'latents', got {config.data.kind!r}")
    lo, hi, w = object_range(config)
    return make_train_iterator(
        seed=config.data.seed, image_size=config.data.image_size, min_objects=lo, max_objects=hi,
        batch_size=config.train.batch_size // n_proc, tokenizer=tokenizer, max_len=config.text.max_len,
        edge_source=config.model.edge.source if config.model.edge.enabled or config.control.enabled else None,
        shard_index=jax.process_index(), shard_count=n_proc, object_weights=w if hi > lo else None,
        source=None if config.data.caption_places else ShapesWorldSource(
            config.data.seed, config.data.image_size, lo, hi, object_weights=w if hi > lo else None, places=False))

# Config keys a resumed run may change without --allow-config-change: how long it runs and how often it
# logs, saves and previews; what sampling and evaluation do (they never touch the train state); the mesh.
SAFE_ON_RESUME = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.sample_every",
                  "train.max_to_keep", "train.max_nonfinite_steps", "train.init_from", "sample.", "eval.",
                  "parallel.mesh.")  # a run resumes on any mesh (orbax restores into the new shardings)


class ConfigMismatchError(ValueError):
    """Resuming a workdir with a config that changes keys outside :data:`SAFE_ON_RESUME`."""


class NonFiniteError(RuntimeError):
    """``train.max_nonfinite_steps`` steps in a row had a non-finite loss or gradient."""


def _flat(config) -> dict:
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = tuple(v) if isinstance(v, list) else v

    walk(json.loads(config.to_json()), "")
    return out


def config_changes(saved, config, safe_keys=SAFE_ON_RESUME) -> tuple[list[str], list[str]]:
    """(changed keys that need --allow-config-change, changed keys that are safe), each "key: old -> new";
    ``safe_keys``: keys (or ``prefix.``) that may change (another trainer passes its own)."""
    a, b = _flat(saved), _flat(config)
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            is_safe = any(key == k or (k.endswith(".") and key.startswith(k)) for k in safe_keys)
            (safe if is_safe else unsafe).append(line)
    return unsafe, safe


def _drop_partial_last_line(path: str) -> None:
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class MetricWriter:
    """TensorBoard (tensorboardX) scalars and images plus a JSONL copy of the scalars; host 0 only."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_partial_last_line(path)  # a process killed mid-write (kill -9) leaves half a record
            self.jsonl = open(path, "a")

    def scalars(self, step: int, values: dict) -> None:
        if not self.active:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, float(v), step)
        self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self.jsonl.flush()

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.active:
            self.tb.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self.tb.close()
            self.jsonl.close()


def preview_prompts(config, n: int = 16) -> list[str]:
    if config.data.kind == "subject":  # half as trained, half in unseen colours and places
        from raphael_jax.data.shapes.subject import subject_objects, unseen_prompts
        seen = sorted({make_caption([o]) for o in subject_objects(config.data.subject, config.data.seed)})
        unseen = [make_caption(o) for o in unseen_prompts(config.data.subject, n, config.eval.seed + 1)]
        return (seen * n)[:n // 2] + unseen[:n - n // 2]
    lo, hi, w = object_range(config)
    objs = sample_prompts(n, seed=config.eval.seed + 1, min_objects=lo, max_objects=hi,
                          object_weights=w if hi > lo else None)
    return [make_caption(o) for o in objs]


def write_samples(sampler: Sampler, params, prompts, workdir, step, writer: MetricWriter, size=None,
                  control=None) -> None:
    """A preview grid of ``prompts`` from ``params`` (the EMA weights): ``samples/step_*.png`` and TensorBoard,
    written by host 0 (every host takes part in the sampling). ControlNet runs: ``control`` = (ControlNet EMA
    weights, control images of the prompts)."""
    sampler.params = params
    hint = None
    if control is not None:
        sampler.control = (sampler.control[0], sampler.place(control[0]))
        hint = control[1]
    h, w = size or sampler.default_size()
    images = sampler.sample(prompts, seed=0, num_steps=min(sampler.config.sample.num_steps, 25), height=h, width=w,
                            hint=hint)
    grid = image_grid(images, cols=8)
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"), " | ".join(prompts),
                 sampler.settings(seed=0, num_steps=min(sampler.config.sample.num_steps, 25), height=h, width=w))
    writer.image(step, "samples", grid)


def record_encoders(config, workdir: str) -> dict | None:
    """Latent runs: write ``<workdir>/encoders.json`` (host 0) from the latents' ``meta.json``: what the run
    needs to be sampled (CLIP, tokenizer and VAE folders, text layer, scaling, buckets). Returns it."""
    if config.data.kind != "latents":
        return None
    from raphael_jax.data.latents import ENCODERS_FILE, META, encoders_record

    meta_path = os.path.join(config.data.latents_dir, META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"data.latents_dir={config.data.latents_dir!r} holds no {META} "
                                "(run raphael-precompute first)")
    with open(meta_path) as f:
        record = encoders_record(json.load(f), config.data.latents_dir)
    path = os.path.join(workdir, ENCODERS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        keep = ("clip", "tokenizer", "vae", "latents_dir")  # locations may move between machines
        if {k: v for k, v in old.items() if k not in keep} != {k: v for k, v in record.items() if k not in keep}:
            raise ValueError(f"{path} records other encoders than {meta_path} (text layer, scaling or buckets "
                             "differ): these latents do not belong to this run; use a new --workdir")
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    return record


def make_preview_sampler(config, graphdef, state, tokenizer, record, plan) -> tuple[Sampler, list[str]] | None:
    """The sampler (and prompts) of the training previews, or None with ``train.sample_every = 0``.

    Pixel runs: 16 evaluation-stream prompts of the shapes world. Latent runs: the CLIP tower, tokenizer
    and VAE of ``encoders.json`` are loaded once here (a missing folder fails now, not at the first
    preview) and the prompts are the first 16 distinct training captions.
    """
    if not config.train.sample_every:
        return None
    if record is None:
        return Sampler(config, graphdef, state["ema_params"], tokenizer, plan=plan, shard_params=True), \
            preview_prompts(config)
    from raphael_jax.data.latents import LatentsSource
    from raphael_jax.sampling import ClipText, LatentDecoder

    hint = " (set train.sample_every=0 to train without previews)"
    text = ClipText.load(record["clip"], record["tokenizer"], record["text_layer"], record["max_len"], hint=hint)
    decoder = LatentDecoder.load(record["vae"], record["scaling_factor"], record["shift_factor"],
                                 tile=config.sample.vae_tile, hint=hint)
    source = LatentsSource(config.data.latents_dir)
    prompts: list[str] = []
    for i in range(min(len(source), 256)):
        cap = source[i]["caption"]
        if cap not in prompts:
            prompts.append(cap)
        if len(prompts) == 16:
            break
    sampler = Sampler(config, graphdef, state["ema_params"], text=text, decoder=decoder, buckets=record["buckets"],
                      plan=plan, shard_params=True)
    return sampler, prompts


def init_from_run(src_workdir: str, state: dict) -> dict:
    """A fresh state (step 0, new optimizer) whose params and EMA come from another run's latest checkpoint.

    Used for curricula (e.g. single-object scenes first, then the multi-object mix). The source
    run's model config must give the same parameter shapes.
    """
    src = RunCheckpoints(src_workdir, async_save=False)
    if src.latest_step() is None:
        raise FileNotFoundError(f"train.init_from={src_workdir!r} holds no checkpoint")
    abstract = abstract_like(state)  # restored onto the state's shardings
    try:
        restored, _ = src.restore(abstract)
    except ValueError as e:
        raise ValueError(f"train.init_from={src_workdir!r}: its parameters do not fit this config ({e})") from None
    print(f"initialized params and EMA from {src_workdir} at step {int(restored['step'])}")
    src.close()
    return {**state, "params": restored["params"], "ema_params": restored["ema_params"]}


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_and_evaluate(config, workdir: str, num_steps: int | None = None, *,
                       allow_config_change: bool = False) -> dict:
    """Train ``config`` in ``workdir`` up to ``num_steps`` (default ``config.train.num_steps``).

    Returns the final (host-local) train state. Raises :class:`ConfigMismatchError` when the workdir was
    trained with a config that differs outside :data:`SAFE_ON_RESUME` (unless ``allow_config_change``),
    :class:`Preempted` after saving on SIGTERM / SIGINT, :class:`NonFiniteError` after
    ``train.max_nonfinite_steps`` non-finite steps in a row.
    """
    os.makedirs(workdir, exist_ok=True)
    num_steps = config.train.num_steps if num_steps is None else num_steps
    # The shapes world trains its own tokenizer; precomputed latents carry their text states.
    tokenizer = load_or_train_tokenizer(config, workdir) if config.data.kind != "latents" else None
    eos_id = tokenizer.eos_id if tokenizer is not None else 1
    record = record_encoders(config, workdir)  # latent runs: what sampling needs (encoders.json)
    tx = make_optimizer(config)
    sched = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.num_timesteps)
    # the state is created sharded on the config's mesh (parallel.mesh / parallel.rules)
    plan = ShardingPlan.from_config(config, mesh_from_config(config))
    graphdef, abstract, shardings, init = abstract_train_state(config, tx, plan)
    base = base_shardings = None
    if config.lora.rank or config.control.enabled:  # the base run's EMA weights, read once and frozen
        base = load_base(config, plan)                 # (raphael_jax/train/finetune.py)
        base_shardings = tree_shardings(base.ema_params, plan)
        what = (f"LoRA rank {config.lora.rank} (targets {', '.join(config.lora.targets)})" if config.lora.rank
                else "ControlNet (control image: the scenes' edge maps)")
        print(f"{what} on {config.train.init_from} (step {base.step}), frozen")
    data = make_data_iterator(config, tokenizer)
    ckpts = RunCheckpoints(workdir, max_to_keep=config.train.max_to_keep)
    if ckpts.latest_step() is not None:  # restored straight into this run's shardings (any mesh), no init
        start, saved = ckpts.restore_config_intact()
        unsafe, safe = config_changes(saved, config)
        if unsafe and not allow_config_change:
            ckpts.close()
            raise ConfigMismatchError(
                f"{workdir} was trained with a different config ({'; '.join(unsafe)}); resume with the saved "
                "config, pass --allow-config-change to resume with this one, or use a new --workdir")
        for line in (unsafe + safe) if jax.process_index() == 0 else ():
            print(f"config changed on resume: {line}")
        start, state, data_state = ckpts.restore_with_fallback(with_shardings(abstract, shardings), start)
        data.set_state(data_state)
        print(f"resumed from step {start} in {ckpts.directory}")
    else:
        state = sharded_init(config, init, shardings, plan)  # jit(init, out_shardings=shardings)
        if config.train.init_from and base is None:
            state = init_from_run(config.train.init_from, state)
        elif config.control.enabled:  # the encoder copy starts as the base's U-Net
            from raphael_jax.train.control import start_from_base
            state = start_from_base(state, base.ema_params)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(f"raphael_jax: {n_params / 1e6:.2f}M parameters, {num_steps} steps, batch {config.train.batch_size}, "
          f"mesh {describe(plan.mesh)} ({jax.devices()[0].platform}, {jax.process_count()} processes)")
    fallbacks = [f for f in plan.fallbacks if f[0].startswith("params/")]
    if fallbacks and jax.process_index() == 0:
        print(f"sharding: {len(fallbacks)} parameter dims left replicated on mesh axes they do not divide "
              f"(e.g. {fallbacks[0]})")
    train_step = jit_train_step(make_train_step(graphdef, config, tx, sched, eos_id), plan, shardings,
                                config.train.batch_size, base_shardings)
    frozen = () if base is None else (base.ema_params,)
    lora_scale = adapter_scale(config.lora.alpha, config.lora.rank) if config.lora.rank else None

    def sample_weights(state):  # what previews sample from: the EMA weights, or the base (+ the EMA adapters)
        if base is None:
            return state["ema_params"]
        if lora_scale is None:  # ControlNet: the base (its previews are not controlled)
            return base.ema_params
        return merge_lora(base.ema_params, [(state["ema_params"], lora_scale)])

    def save(step):
        ckpts.save(step, state, data.get_state(), config)
        if lora_scale is not None:
            export_adapters(workdir, state["ema_params"], config, base.step, step)

    writer = MetricWriter(workdir)
    preview = make_preview_sampler(config, graphdef, {"ema_params": sample_weights(state)}, tokenizer, record, plan)
    control_preview = None
    if preview is not None and config.control.enabled and record is not None:
        print("note: a latent ControlNet run's previews are its base's samples (not controlled)")
    elif preview is not None and config.control.enabled:  # controlled previews: evaluation scenes' edges
        from raphael_jax.train.control import preview_controls, split_controlnet
        prompts, hints = preview_controls(config)
        preview[0].set_control(split_controlnet(config)[0], state["ema_params"])
        preview = (preview[0], prompts)
        control_preview = lambda s: (s["ema_params"], hints)  # noqa: E731
    step = int(state["step"])
    t_start, s_start, compiled = time.time(), step, False
    pending, unchecked = [], []
    streak, last_saved = 0, ckpts.latest_step()
    limit = config.train.max_nonfinite_steps

    def check_nonfinite():  # pulls the flags of the steps since the last check (a sync: not every step)
        nonlocal streak
        flags = [(s_, float(jax.device_get(f))) for s_, f in unchecked]
        unchecked.clear()
        bad = [s_ for s_, f in flags if f]
        for _, f in flags:
            streak = streak + 1 if f else 0
        if bad and jax.process_index() == 0:
            print(f"warning: {len(bad)} step(s) with a non-finite loss or gradient skipped (weights unchanged): "
                  f"steps {bad[0]}..{bad[-1]}, {streak} in a row now", flush=True)
        if streak >= limit:
            ckpts.close()  # an asynchronous save still running completes first
            writer.close()
            raise NonFiniteError(
                f"{streak} steps in a row (to step {flags[-1][0]}) had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={limit}); the weights were not updated by them and the last "
                f"checkpoint (step {last_saved}) is intact: lower train.learning_rate or check the data")

    with StopSignals() as signals:
        while step < num_steps:
            batch = global_batch(plan, {k: v for k, v in next(data).items() if k != "caption"})
            state, metrics = train_step(state, batch, step_rng(state), *frozen)
            step += 1
            if not compiled:  # exclude compilation from the rate
                jax.block_until_ready(metrics)
                t_start, s_start, compiled = time.time(), step, True
            pending.append(metrics)
            unchecked.append((step, metrics["nonfinite"]))
            logging = step % config.train.log_every == 0 or step == num_steps
            if logging or len(unchecked) >= limit:
                check_nonfinite()
            if logging:
                if not ckpts.manager.is_saving_in_progress() and os.environ.get("RAPHAEL_NO_TRIM") != "1":
                    release_free_memory()  # the last save's host buffers (raphael_jax/train/host_memory.py)
                means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]
                         if k != "nonfinite"}
                means["nonfinite_steps"] = float(sum(jax.device_get(m["nonfinite"]) for m in pending))
                pending = []
                now = time.time()
                rate = (step - s_start) / max(now - t_start, 1e-9) if step > s_start else 0.0
                writer.scalars(step, {**means, "steps_per_sec": rate})
                if means.get("time_dropped_fraction", 0.0) > 0.01 and jax.process_index() == 0:
                    print(f"warning: the time-MoE's capacity dropped {100 * means['time_dropped_fraction']:.1f}% of "
                          "the samples' expert calls since the last log (raise parallel.time_capacity_factor)",
                          flush=True)
                if jax.process_index() == 0:
                    eta = _fmt_time((num_steps - step) / rate) if rate > 0 else "--"
                    skipped = f"  {int(means['nonfinite_steps'])} non-finite" if means["nonfinite_steps"] else ""
                    print(f"step {step:6d}/{num_steps}  loss {means['loss']:.4f}  denoise {means['denoise_loss']:.4f}  "
                          f"edge {means['edge_loss']:.4f}  {rate:5.2f} steps/s  ETA {eta}{skipped}",
                          flush=True)
            if step % config.train.checkpoint_every == 0 or step == num_steps:
                save(step)
                last_saved = step
            signum = signals.requested()
            if signum:
                signals.saving = True
                if last_saved != step:
                    save(step)
                ckpts.close()  # waits for the (asynchronous) save to be complete on disk
                writer.close()
                raise Preempted(signum, step, ckpts.directory)
            if preview is not None and (step % config.train.sample_every == 0 or step == num_steps):
                write_samples(preview[0], sample_weights(state), preview[1], workdir, step, writer,
                              control=control_preview(state) if control_preview else None)
    ckpts.close()
    writer.close()
    return state
