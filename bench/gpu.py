"""RAPHAEL-3B on one NVIDIA GPU: train-step throughput and MFU (MoE and dense), 50-step DDIM latency.

    bash bench/gpu.sh                                  # on the GPU machine: PYTHONPATH, carried wheels, then this
    python bench/gpu.py                                # the same, with PYTHONPATH=<repo root> set by hand
    python bench/gpu.py --batches 64,32,16 --peak-tflops 989 --out /tmp/gpu
    python bench/gpu.py --dry-run --out /tmp/gpu_dry   # CPU: the same code path on a shrunk config (tests/bench)

Within ``--budget-s`` (default 480 s = 8 minutes wall, from the start of this script; a progress line
with the elapsed seconds for every step), three phases, each with its own deadline that it stops at
rather than running over (shares 50 / 25 / 22% of the budget; phase 1's batch search may run into phase
2's share, which has nothing to run without a batch; a watchdog writes the partial results and exits if
a compile runs past the budget):

1. ``configs/raphael_3b.py`` (the paper's 3B model, RAPHAEL, Xue et al. 2023; bfloat16 compute,
   ``model.attention=auto``, i.e. cuDNN fused attention for bfloat16 on GPUs, remat as configured)
   trained at 640 x 640 px (80 x 80 x 4 latents) on random latents and random precomputed text states
   of the config's text shape (``text.max_len`` x ``model.context_dim`` = 77 x 1024; null states for
   caption dropout and random edge maps, as the latent pipeline yields them), through the project's
   train step: ``raphael_jax.train.state.abstract_train_state`` / ``sharded_init`` (AdamW + EMA as
   configured) and ``raphael_jax.train.step.make_train_step`` / ``jit_train_step`` (state donated),
   batch shapes from ``raphael_jax.tools.aot.abstract_batch``. The per-device batch is the LARGEST of
   ``--batches`` (descending, default 32,16,8,4,2,1) that fits: each candidate is compiled and its
   ``memory_analysis()`` (arguments + outputs - aliased + temporaries) compared with the device's
   ``memory_stats()['bytes_limit']`` before it runs, and an XLA ``RESOURCE_EXHAUSTED`` at compile or
   run time counts as "does not fit". A smaller candidate is skipped without compiling when even a
   linear scaling of a larger one's temporaries is over the limit (a lower bound when the
   temporaries are affine in the batch). Reported: img/s = batch / median step time (after warm-up),
   FLOPs per step from XLA's cost analysis (``compiled.cost_analysis()['flops']``) and
   MFU = FLOPs / step time / the chip's bfloat16 dense peak (:data:`PEAK_BF16`, by ``device_kind``;
   unknown chips: MFU unknown unless ``--peak-tflops``).
2. The dense baseline ``configs/raphael_3b.py:dense`` (both MoEs replaced by one FFN of the RAPHAEL
   block's active width, ``configs/common.py``) at the same batch, same measurements.
3. Guided DDIM, 50 steps, one 1024 x 1024 image (128 x 128 x 4 latents), through the project's
   ``raphael_jax.sampling.Sampler.guided_sample`` (the run's ``sample`` settings, ``ddim_sample``: one
   U-Net call on [cond; uncond] per step) on phase 1's EMA weights; median of ``--ddim-runs`` after
   the compiling call. The frozen CLIP text tower and the VAE are stand-ins: the text states are
   random, and the latents are NOT decoded (no VAE decode in the latency). Remat never applies to
   sampling (``raphael_jax/models/unet.py``: only a training call, which passes the router key).

FLOP caveat: XLA's cost analysis gives the custom calls it does not model (cuDNN's fused attention)
no FLOPs, so on GPUs the self-attention FLOPs are missing from the count. The report adds an analytic
estimate of them (what XLA counts for the same attention as einsums: forward, its remat recompute and
the backward's four matmuls) and the MFU including it; the goal line (MFU >= 40%) judges XLA's count.

Writes Markdown and JSON (default ``bench/results/gpu.md`` / ``gpu.json``; ``--dry-run``:
``bench/results/gpu_dry_run.*``; ``--out FILE.md`` or ``--out DIR``), rewritten after every phase.

``--dry-run``: CPU, the same functions on ``configs/raphael_3b.py`` shrunk by config overrides
(:data:`DRY_OVERRIDES`: one level of 16 channels whose one RAPHAEL block is the middle one, still
bfloat16 with remat, 8 x 8 latents, 8 text tokens of width 16), batch candidates 2,1, 3 timed steps,
2 DDIM steps on 8 x 8 latents, XLA:CPU compiled without its expensive LLVM passes (as the train
state's init), and the peak from ``--peak-tflops`` or a nominal 0.1 TFLOP/s labelled as such (not a
CPU's spec). About 70 s of CPU time (XLA:CPU compiles of the two train steps, their inits and the
sampler).

Packages. The train step and sampler import chain needs, beyond jax / jaxlib / flax / optax / numpy:
``ml_collections`` (configs; with its dependencies ``absl-py`` and ``PyYAML``) and ``pillow``
(``raphael_jax.sampling``). Not needed here: clu, sentencepiece, transformers, safetensors,
tensorflow_datasets, grain, orbax (checkpoints), torch. The script checks them before importing
anything heavy and fails with one line naming the missing ones. To carry them to a machine that
cannot download, into ``runs/wheels`` (``runs/`` is git-ignored):

    # here, with network access
    pip download --no-deps -d runs/wheels 'ml-collections>=1.1.0,<1.2'       # pure Python: any platform
    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 -d runs/wheels 'pillow>=11,<14'    # binary: the machine's Python
    # copy runs/wheels/ along with the checkout, then on the machine
    bash bench/gpu.sh [--wheels runs/wheels] [gpu.py args]              # unpacks them onto PYTHONPATH
    # or by hand
    pip install --no-index --no-deps runs/wheels/*.whl
    # or: unzip every wheel into runs/wheels-unpacked and PYTHONPATH=<repo>:runs/wheels-unpacked
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/benchlib.py
from benchlib import FAST_COMPILE as _CPU_FAST_COMPILE
from benchlib import ROOT, cpu_model, elapsed, log, xla_flops  # noqa: E402

MFU_GOAL = 0.40
NOMINAL_CPU_PEAK = 1e11  # --dry-run without --peak-tflops: a nominal number so MFU is computed, not a spec
WHEELS_DIR = "runs/wheels"

# bfloat16 dense tensor-core peak per chip (FLOP/s, NVIDIA spec sheets, without sparsity), matched on
# jax's device_kind in this order (GH200 before H200, GB200 before B200, "H100 PCIe"/"NVL" before "H100").
PEAK_BF16 = [
    (r"GB200", 2500e12, "GB200"),
    (r"B200", 2250e12, "B200"),
    (r"B100", 1750e12, "B100"),
    (r"GH200", 989e12, "GH200"),
    (r"H200", 989e12, "H200"),
    (r"H100.*NVL", 835e12, "H100 NVL"),
    (r"H100.*PCIe", 756e12, "H100 PCIe"),
    (r"H100", 989e12, "H100 SXM"),
    (r"H800.*PCIe", 756e12, "H800 PCIe"),
    (r"H800", 989e12, "H800 SXM"),
    (r"\bH20\b", 148e12, "H20"),
    (r"A100|A800", 312e12, "A100"),
    (r"L40S", 362e12, "L40S"),
    (r"\bL40\b", 181e12, "L40"),
    (r"\bL4\b", 121e12, "L4"),
    (r"\bA10\b", 125e12, "A10"),
]

# (module, pip requirement, pure Python): what the train step / sampler chain imports, checked before anything
# heavy is imported (ranges as setup.py). ml_collections needs absl and yaml; raphael_jax.sampling imports PIL.
REQUIRED = [
    ("numpy", "numpy", False),
    ("jax", "jax", True),
    ("jaxlib", "jaxlib", False),
    ("flax", "flax", True),
    ("optax", "optax", True),
    ("ml_collections", "ml-collections>=1.1.0,<1.2", True),
    ("absl", "absl-py", True),
    ("yaml", "PyYAML", False),
    ("PIL", "pillow>=11,<14", False),
]

# --dry-run: configs/raphael_3b.py shrunk to one level of 16 channels whose only RAPHAEL block is the middle one
# (self-attention, cross-attention, time-MoE, space-MoE, edge head: every part of the block, fewest ops to
# compile; XLA:CPU compile time grows with the op count, not the widths)
DRY_OVERRIDES = [
    "model.channels=(16,)", "model.num_res_blocks=1", "model.block_levels=(0,)", "model.self_attention_levels=(1,)",
    "model.head_dim=8", "model.norm_groups=4", "model.context_dim=16", "text.width=16", "text.max_len=8",
    "model.space_moe.hidden_mult=1.0", "model.space_moe.gate_hidden=16", "model.time_moe.hidden_mult=1.0",
    "model.time_moe.gate_hidden=16", "model.edge.channels=4", "data.image_size=8",
]
DRY_DEFAULTS = {"batches": "2,1", "steps": 3, "warmup": 1, "ddim_steps": 2, "ddim_runs": 2, "sample_size": 8,
                "budget_s": 240.0}
REAL_DEFAULTS = {"batches": "32,16,8,4,2,1", "steps": 10, "warmup": 2, "ddim_steps": 50, "ddim_runs": 3,
                 "sample_size": 128, "budget_s": 480.0}
PHASES = ("train", "dense", "ddim")
MIN_TIMED = 3  # timed train steps taken past the phase's own deadline (while the search window lasts)
PHASE_WEIGHT = {"train": 0.50, "dense": 0.25, "ddim": 0.22}  # shares of the budget, in this order


# --- packages ---------------------------------------------------------------------------------

def missing_modules(required=REQUIRED) -> list[tuple[str, str, bool]]:
    """The entries of ``required`` whose module cannot be found (``importlib.util.find_spec``; nothing imported)."""
    out = []
    for mod, pip_name, pure in required:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append((mod, pip_name, pure))
    return out


def missing_message(missing, python: str | None = None, machine: str | None = None) -> str:
    """ONE line naming the missing packages and how to carry them (wheels into runs/wheels, bench/gpu.sh)."""
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    machine = machine or platform.machine() or "x86_64"
    names = ", ".join(f"{m} (pip: {p}, {'pure Python' if pure else 'binary'})" for m, p, pure in missing)
    quote = lambda reqs: " ".join(f"'{r}'" if re.search(r"[<>=!~ ,]", r) else r for r in reqs)
    pure = quote(p for _, p, ok in missing if ok)
    binary = quote(p for _, p, ok in missing if not ok)
    how = []
    if pure:
        how.append(f"`pip download --no-deps -d {WHEELS_DIR} {pure}`")
    if binary:
        how.append(f"`pip download --no-deps --only-binary=:all: --python-version {python} --platform "
                   f"manylinux_2_28_{machine} -d {WHEELS_DIR} {binary}`")
    return (f"bench/gpu.py: missing Python packages: {names}. Carry them: where pip can download, "
            f"{' and '.join(how)}; copy {WHEELS_DIR}/ with the checkout; on this machine run `bash bench/gpu.sh` "
            f"(unpacks {WHEELS_DIR}/*.whl onto PYTHONPATH) or `pip install --no-index --no-deps "
            f"{WHEELS_DIR}/*.whl` (or unzip the wheels into a folder and add it to PYTHONPATH); see the "
            "docstring of bench/gpu.py.")


def parse_require(items) -> list[tuple[str, str, bool]]:
    """``--require MOD[=PIP]`` entries (extra modules to check; pure Python assumed)."""
    out = []
    for item in items or ():
        mod, _, pip_name = item.partition("=")
        out.append((mod.strip(), (pip_name or mod).strip(), True))
    return out


def check_packages(extra=()) -> None:
    """Exit 2 with one line on stderr when a module of the chain (or ``--require``) is missing; then import
    the chain itself, so a module missing deeper down is named the same way."""
    missing = missing_modules(REQUIRED + list(extra))
    if not missing:
        try:
            import raphael_jax.config  # noqa: F401
            import raphael_jax.sampling  # noqa: F401
            import raphael_jax.tools.aot  # noqa: F401
            import raphael_jax.train.state  # noqa: F401
            import raphael_jax.train.step  # noqa: F401
        except ModuleNotFoundError as e:
            top = (e.name or str(e)).split(".")[0]
            if top == "raphael_jax":
                sys.exit(f"bench/gpu.py: raphael_jax is not importable: set PYTHONPATH={ROOT} (bench/gpu.sh does)")
            missing = [(top, top, True)]
    if missing:
        print(missing_message(missing), file=sys.stderr, flush=True)
        sys.exit(2)


# --- machine ----------------------------------------------------------------------------------

def peak_flops(device_kind: str, override_tflops: float | None, dry_run: bool) -> tuple[float | None, str]:
    """(bfloat16 dense peak FLOP/s or None, where the number comes from)."""
    if override_tflops:
        return float(override_tflops) * 1e12, f"--peak-tflops {override_tflops:g}"
    for pattern, flops, label in PEAK_BF16:
        if re.search(pattern, device_kind or ""):
            return flops, f"{label} bf16 dense spec ({flops / 1e12:g} TFLOP/s)"
    if dry_run:
        return NOMINAL_CPU_PEAK, f"nominal {NOMINAL_CPU_PEAK / 1e12:g} TFLOP/s (dry run; not a spec of this CPU)"
    return None, f"unknown device kind {device_kind!r}: pass --peak-tflops"


def nvidia_smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode or not out.stdout.strip():
        return {}
    name, driver, mem = ([x.strip() for x in out.stdout.strip().splitlines()[0].split(",")] + ["", "", ""])[:3]
    return {"name": name, "driver": driver, "memory_total": mem}


def machine_info(device) -> dict:
    import flax
    import jax
    import jaxlib

    info = {"platform": device.platform, "device_kind": device.device_kind, "local_devices": jax.local_device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "python": platform.python_version(), "host_cpu": cpu_model(), "host_cores": os.cpu_count(),
            "mem_fraction_env": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")}
    try:
        info["platform_version"] = str(device.client.platform_version).replace("\n", " ").strip()
    except Exception:  # noqa: BLE001 (a private detail of the client; absent on some backends)
        pass
    stats = memory_stats(device)
    info["bytes_limit"] = stats.get("bytes_limit")
    if device.platform == "gpu":
        smi = nvidia_smi()
        info["driver"] = smi.get("driver", "unknown (no nvidia-smi)")
        if smi.get("memory_total"):
            info["memory_total"] = smi["memory_total"]
    return info


def memory_stats(device) -> dict:
    try:
        return dict(device.memory_stats() or {})
    except Exception:  # noqa: BLE001 (CPU clients may not implement it)
        return {}


# --- XLA analyses -----------------------------------------------------------------------------

def xla_memory(compiled) -> dict | None:
    """Bytes of the compiled program: arguments, outputs, aliased (donated), temporaries, and the peak
    estimate ``arguments + outputs - aliased + temporaries`` (as raphael_jax/tools/aot.py)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    rec = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(getattr(m, "alias_size_in_bytes", 0)), "temp_bytes": int(m.temp_size_in_bytes)}
    rec["peak_bytes"] = rec["argument_bytes"] + rec["output_bytes"] - rec["alias_bytes"] + rec["temp_bytes"]
    return rec


def is_oom(err: BaseException) -> bool:
    s = str(err)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower() or "Out of memory" in s


def fused_attention_fwd_flops(model_cfg, side: int) -> float:
    """Forward FLOPs per image of the U-Net's self-attentions (QK^T and PV: 4 N^2 C per block, N positions of
    width C) at a ``side`` x ``side`` input, following raphael_jax/models/unet.py's layout."""
    ch = tuple(model_cfg.channels)
    total = 0.0
    for lvl, c in enumerate(ch):
        n = (side // model_cfg.patch_size // 2**lvl) ** 2
        heads = max(1, c // model_cfg.head_dim)
        width = heads * model_cfg.head_dim
        blocks = (2 * model_cfg.num_res_blocks + 1) if model_cfg.block_levels[lvl] else 0
        if lvl == len(ch) - 1 and model_cfg.mid_block:
            blocks += 1
        if model_cfg.self_attention_levels[lvl]:
            total += blocks * 4.0 * n * n * width
    return total


def remat_enabled(value) -> bool:
    """Whether ``model.remat`` recomputes the RAPHAEL blocks' forward in the backward pass; every policy
    recomputes the fused attention (a custom call, not a saved dot)."""
    from raphael_jax.models.unet import remat_policy

    return bool(remat_policy(value)[0])


# --- batch search -----------------------------------------------------------------------------

def search_batch(candidates, compile_fn, run_fn, limit: float | None, time_left, on_oom=None, say=log):
    """The largest batch of ``candidates`` that compiles, fits ``limit`` bytes and runs.

    ``compile_fn(b) -> (compiled, info)`` (``info``: :func:`xla_memory`'s fields when known, ``batch_bytes``,
    anything else to record, e.g. ``flops``);
    ``run_fn(b, compiled) -> dict`` (the measurement); an exception for which :func:`is_oom` holds means
    "does not fit" (``on_oom()`` is called after one at run time, e.g. to rebuild a donated state).
    ``time_left()`` -> seconds left in the phase: a candidate is not started when less is left than the
    last compile took. Returns ``(batch or None, result or None, records)``, one record per candidate.
    """
    records = []
    bound = None  # (batch, non-batch bytes, batch-scaled bytes) of the last compiled candidate
    last_compile = 0.0
    for b in sorted({int(c) for c in candidates}, reverse=True):
        rec = {"batch": b}
        records.append(rec)
        if time_left() < last_compile:
            rec["result"] = "not tried: the phase's time ran out"
            say(f"  batch {b}: not tried, {time_left():.0f} s left in the phase < last compile {last_compile:.0f} s")
            continue
        if bound is not None and limit:
            b0, fixed, scaled = bound
            lower = fixed + scaled * b / b0
            if lower > limit:
                rec["result"] = (f"skipped: even a linear scaling of batch {b0}'s temporaries needs "
                                 f"{fmt_bytes(lower)} > {fmt_bytes(limit)}")
                rec["lower_bound_bytes"] = lower
                say(f"  batch {b}: {rec['result']}")
                continue
        t0 = time.time()
        try:
            compiled, mem = compile_fn(b)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            rec["result"] = f"does not fit (RESOURCE_EXHAUSTED while compiling: {str(e).splitlines()[0][:160]})"
            say(f"  batch {b}: {rec['result']}")
            continue
        last_compile = rec["compile_s"] = time.time() - t0
        mem = mem or {}
        rec.update(mem)
        peak = mem.get("peak_bytes")
        if peak is not None:
            bb = mem.get("batch_bytes", 0)
            bound = (b, peak - mem["temp_bytes"] - bb, mem["temp_bytes"] + bb)
        if peak is not None and limit and peak > limit:
            rec["result"] = f"does not fit (memory analysis: {fmt_bytes(peak)} > {fmt_bytes(limit)})"
            say(f"  batch {b}: compiled in {rec['compile_s']:.1f} s; {rec['result']}")
            del compiled
            continue
        say(f"  batch {b}: compiled in {rec['compile_s']:.1f} s, memory analysis "
            + (fmt_bytes(peak) if peak is not None else "unavailable")
            + (f" of {fmt_bytes(limit)}" if limit else " (no device memory limit known)"))
        try:
            result = run_fn(b, compiled)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            rec["result"] = f"does not fit (RESOURCE_EXHAUSTED at run time: {str(e).splitlines()[0][:160]})"
            say(f"  batch {b}: {rec['result']}")
            del compiled
            if on_oom is not None:
                on_oom()
            continue
        rec["result"] = "fits"
        return b, result, records
    return None, None, records


# --- the benchmarks ---------------------------------------------------------------------------

class Budget:
    """Deadlines (seconds since the script started) of the selected phases, in order, within ``total``."""

    def __init__(self, total: float, phases, reserve: float | None = None):
        self.total = float(total)
        reserve = max(5.0, 0.03 * total) if reserve is None else reserve
        usable = self.total - reserve - self.elapsed()
        weights = {p: PHASE_WEIGHT[p] for p in phases}
        acc, self.deadlines = self.elapsed(), {}
        for p in phases:
            acc += usable * weights[p] / sum(weights.values())
            self.deadlines[p] = acc

    @staticmethod
    def elapsed() -> float:
        return elapsed()

    def left(self, phase: str) -> float:
        return self.deadlines[phase] - self.elapsed()


class TrainBench:
    """The project's train state and jitted step for ``cfg`` on one device, timed per batch size."""

    def __init__(self, cfg, device, budget: Budget, phase: str, steps: int, warmup: int, dry_run: bool,
                 hard_phase: str | None = None):
        import jax

        from raphael_jax.diffusion.schedule import NoiseSchedule
        from raphael_jax.parallel.mesh import mesh_from_config
        from raphael_jax.parallel.rules import ShardingPlan
        from raphael_jax.train.state import abstract_train_state, make_optimizer, sharded_init
        from raphael_jax.train.step import jit_train_step, make_train_step

        self.cfg, self.budget, self.phase, self.steps, self.warmup = cfg, budget, phase, steps, warmup
        self.hard_phase = hard_phase or phase
        self.device = device
        self.jax = jax
        self.compiler_options = _CPU_FAST_COMPILE if dry_run else None
        self.plan = ShardingPlan.from_config(cfg, mesh_from_config(cfg, [device]))
        self.tx = make_optimizer(cfg)
        sched = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        t0 = time.time()
        self.graphdef, self.abstract, self.shardings, self._init = abstract_train_state(cfg, self.tx, self.plan)
        self._sharded_init = sharded_init
        self.state = sharded_init(cfg, self._init, self.shardings, self.plan)
        jax.block_until_ready(self.state)
        self.init_s = time.time() - t0
        self.n_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract["params"])))
        self.train_step = make_train_step(self.graphdef, cfg, self.tx, sched)
        self._jit_train_step = jit_train_step

    def reinit(self) -> None:
        """A new state when a failed call left the donated one deleted (compiled init is cached)."""
        leaves = self.jax.tree.leaves(self.state)
        if any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            log("  the donated state was deleted by the failed call: re-creating it")
            self.state = None
            gc.collect()
            self.state = self._sharded_init(self.cfg, self._init, self.shardings, self.plan)

    def abstract_batch(self, b: int) -> dict:
        from raphael_jax.tools.aot import abstract_batch

        return abstract_batch(self.cfg, b, self.plan)

    def make_batch(self, b: int) -> dict:
        """Random inputs of the pipeline's shapes: latents ~ N(0, 1), text and null states ~ N(0, 1), every
        text token real, random binary edge maps."""
        import numpy as np

        rng = np.random.default_rng(b)
        out = {}
        for k, sds in self.abstract_batch(b).items():
            if sds.dtype == np.bool_:
                x = np.ones(sds.shape, bool)
            elif k == "edges":
                x = (rng.random(sds.shape) < 0.1).astype(sds.dtype)
            else:
                x = rng.standard_normal(sds.shape, dtype=np.float32).astype(sds.dtype)
            out[k] = self.jax.device_put(x, sds.sharding)
        return out

    def compile(self, b: int):
        from raphael_jax.parallel.sharding import with_shardings

        jax = self.jax
        state_in = with_shardings(self.abstract, self.shardings)
        batch = self.abstract_batch(b)
        key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
        rng = jax.ShapeDtypeStruct((), key_dtype, sharding=self.plan.replicated())
        step = self._jit_train_step(self.train_step, self.plan, self.shardings, b)
        compiled = step.lower(state_in, batch, rng).compile(compiler_options=self.compiler_options)
        info = xla_memory(compiled) or {}
        info["batch_bytes"] = int(sum(math.prod(s.shape) * s.dtype.itemsize for s in batch.values()))
        info["flops"] = xla_flops(compiled)
        return compiled, info

    def run(self, b: int, compiled) -> dict:
        """Warm-up calls, then timed calls until ``steps`` or the phase deadline (at least one timed)."""
        import numpy as np

        jax = self.jax
        batch = self.make_batch(b)
        keys = [jax.device_put(jax.random.fold_in(jax.random.key(self.cfg.seed), i), self.plan.replicated())
                for i in range(self.warmup + self.steps)]
        times, metrics = [], None
        for i in range(self.warmup + self.steps):
            timed = i >= self.warmup
            if timed and times:
                med = statistics.median(times)
                soft = self.budget.left(self.phase) < med and len(times) >= MIN_TIMED
                if soft or self.budget.left(self.hard_phase) < med:
                    log(f"  batch {b}: stopping after {len(times)} timed steps (phase deadline)")
                    break
            t0 = time.perf_counter()
            self.state, metrics = compiled(self.state, batch, keys[i])
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t0
            if timed:
                times.append(dt)
            log(f"  batch {b}: {'step' if timed else 'warm-up'} {i + 1}: {dt * 1e3:.1f} ms")
        loss = float(np.asarray(metrics["loss"]))
        return {"step_times_s": times, "loss": loss}


def train_phase(name: str, phase: str, spec: str, overrides, candidates, device, budget: Budget, args, peak,
                results: dict, keep_ema: bool = False, search_phase: str | None = None) -> tuple[dict, object]:
    """Build, search the batch, time; returns (the record, and with ``keep_ema`` a host copy of the EMA params for
    the DDIM phase, else None).

    ``phase``: the budget's phase; the timed steps stop at its deadline (after at least :data:`MIN_TIMED`).
    ``search_phase`` (default ``phase``): a later phase whose deadline bounds the batch search and the timed
    steps at the latest (phase 1 may use phase 2's time: the dense model has nothing to run without a batch).
    """
    import jax
    import jax.numpy as jnp

    from raphael_jax.config import load_config
    from raphael_jax.models.attention_kernels import resolve_impl

    rec = {"config": spec, "overrides": list(overrides), "candidates": list(candidates), "status": "running"}
    results["train"][name] = rec
    cfg = load_config(os.path.join(ROOT, spec) if not os.path.isabs(spec.partition(":")[0]) else spec, overrides)
    side = int(cfg.data.image_size)
    rec.update({"latent": [side, side, int(cfg.model.in_channels)],
                "text_states": [int(cfg.text.max_len), int(cfg.model.context_dim)],
                "dtype": cfg.model.dtype, "remat": str(cfg.model.remat), "ema_decay": float(cfg.train.ema_decay)})
    attn = resolve_impl(cfg.model.attention, jnp.dtype(cfg.model.dtype), device.platform)
    rec["attention"] = f"{cfg.model.attention} -> {attn} (self-attention)"
    log(f"{name}: building {spec} ({side}x{side}x{cfg.model.in_channels} latents, text "
        f"{cfg.text.max_len}x{cfg.model.context_dim}, {cfg.model.dtype}, attention {rec['attention']}); "
        f"{budget.left(phase):.0f} s left in the phase")
    search_phase = search_phase or phase
    bench = TrainBench(cfg, device, budget, phase, args.steps, args.warmup, args.dry_run, hard_phase=search_phase)
    rec["params"] = bench.n_params
    rec["init_s"] = round(bench.init_s, 2)
    log(f"{name}: {bench.n_params / 1e6:.2f}M parameters, train state created in {bench.init_s:.1f} s; "
        f"searching the batch over {list(candidates)}")
    limit = args.bytes_limit or memory_stats(device).get("bytes_limit")
    usable = limit * (1.0 - args.memory_margin) if limit else None
    rec["bytes_limit"] = limit
    rec["usable_bytes"] = usable
    batch, result, records = search_batch(candidates, bench.compile, bench.run, usable,
                                          lambda: budget.left(search_phase), on_oom=bench.reinit)
    rec["search"] = records
    ema_host = None
    if keep_ema and bench.state is not None:
        ema_host = jax.device_get(bench.state["ema_params"])  # host copy: phase 2 needs the device memory
    if batch is None:
        rec["status"] = "no candidate batch fitted (or the phase's time ran out)"
        log(f"{name}: {rec['status']}")
    else:
        chosen = next(r for r in records if r["batch"] == batch)
        times = result["step_times_s"]
        med = statistics.median(times)
        flops = float(chosen.get("flops", float("nan")))  # XLA's cost analysis of the step that ran
        rec.update({"status": "ok", "batch": batch, "step_times_s": times, "step_s_median": med,
                    "img_per_s": batch / med, "loss_last": result["loss"], "compile_s": chosen.get("compile_s"),
                    "flops_per_step": flops})
        rec["mfu"] = flops / med / peak if peak and flops == flops else None
        fused = attn in ("cudnn", "flash")
        fwd = fused_attention_fwd_flops(cfg.model, side) * batch if fused else 0.0
        rec["fused_attention_flops_est"] = fwd * ((2.0 if remat_enabled(cfg.model.remat) else 1.0) + 2.0)
        tot = flops + rec["fused_attention_flops_est"]
        rec["mfu_incl_fused_attention"] = tot / med / peak if peak and tot == tot else None
        mfu = f"{rec['mfu'] * 100:.1f}%" if rec["mfu"] is not None else "unknown"
        log(f"{name}: batch {batch}: median step {med * 1e3:.1f} ms over {len(times)} steps, "
            f"{rec['img_per_s']:.2f} img/s, {flops / 1e12:.3f} TFLOP/step (XLA), MFU {mfu}"
            + (f", {rec['mfu_incl_fused_attention'] * 100:.1f}% with the fused attention estimate"
               if fused and rec["mfu_incl_fused_attention"] is not None else ""))
    del bench
    gc.collect()
    jax.clear_caches()
    return rec, ema_host


def ddim_phase(spec: str, overrides, ema, device, budget: Budget, args, results: dict) -> dict:
    """Guided DDIM through ``Sampler.guided_sample`` with stand-ins for the CLIP tower and the VAE."""
    import jax
    import numpy as np
    from flax import nnx

    from raphael_jax.config import load_config
    from raphael_jax.models.raphael import build_model
    from raphael_jax.parallel.mesh import make_mesh
    from raphael_jax.parallel.rules import ShardingPlan
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.state import split_model

    rec = {"status": "running", "steps": args.ddim_steps, "vae_decode": False}
    results["ddim"] = rec
    cfg = load_config(os.path.join(ROOT, spec), list(overrides))
    graphdef, _ = split_model(nnx.eval_shape(lambda: build_model(cfg, cfg.seed)))
    if ema is not None:
        params = ema
        src = "phase 1's EMA weights"
    else:
        init = jax.jit(lambda: split_model(build_model(cfg, cfg.seed))[1]).lower()
        params = init.compile(compiler_options=_CPU_FAST_COMPILE if args.dry_run else None)()
        src = "freshly initialised weights"
    side, ch = int(args.sample_size), int(cfg.model.in_channels)
    L, D = int(cfg.text.max_len), int(cfg.model.context_dim)
    rec.update({"config": spec, "latent": [side, side, ch], "image_px": side * 8,
                "guidance": float(cfg.sample.guidance), "timestep_spacing": cfg.sample.timestep_spacing,
                "weights": src, "text_states": [L, D]})

    class _TextStandIn:  # ClipText's interface as the Sampler reads it; the states are random here
        width = D
        state: dict = {}

    class _VaeStandIn:  # LatentDecoder's interface as the Sampler reads it; nothing is decoded
        latent_channels, factor = ch, 8
        state: dict = {}

    plan = ShardingPlan.from_config(cfg, make_mesh({"fsdp": 1}, [device]))
    sampler = Sampler(cfg, graphdef, params, text=_TextStandIn(), decoder=_VaeStandIn(), plan=plan)
    del params
    rng = np.random.default_rng(0)
    x_T = jax.device_put(rng.standard_normal((1, side, side, ch), dtype=np.float32), plan.replicated())
    cond = {"context": jax.device_put(rng.standard_normal((1, L, D), dtype=np.float32), plan.replicated()),
            "mask": jax.device_put(np.ones((1, L), bool), plan.replicated())}
    uncond = {"context": jax.device_put(rng.standard_normal((1, L, D), dtype=np.float32), plan.replicated()),
              "mask": jax.device_put(np.ones((1, L), bool), plan.replicated())}
    log(f"ddim: {args.ddim_steps} guided steps (guidance {cfg.sample.guidance}) on {side}x{side}x{ch} latents "
        f"({side * 8} px), {src}; compiling; {budget.left('ddim'):.0f} s left in the phase")

    def one():
        t0 = time.perf_counter()
        x0 = sampler.guided_sample(x_T, cond, uncond, num_steps=args.ddim_steps)
        jax.block_until_ready(x0)
        return time.perf_counter() - t0, x0

    first, x0 = one()
    rec["first_call_s"] = first
    log(f"ddim: first call (compile + run) {first:.1f} s")
    runs = []
    while len(runs) < args.ddim_runs:
        if runs and budget.left("ddim") < statistics.median(runs):
            log(f"ddim: stopping after {len(runs)} timed runs (phase deadline)")
            break
        dt, x0 = one()
        runs.append(dt)
        log(f"ddim: run {len(runs)}: {dt:.3f} s")
    med = statistics.median(runs)
    rec.update({"status": "ok", "runs_s": runs, "latency_s_median": med, "step_ms": med / args.ddim_steps * 1e3,
                "finite": bool(np.isfinite(np.asarray(x0)).all())})
    log(f"ddim: median {med:.3f} s per image ({rec['step_ms']:.1f} ms per step)")
    sampler = None  # noqa: F841 (frees the placed weights before the caches are cleared)
    gc.collect()
    jax.clear_caches()
    return rec


# --- report -----------------------------------------------------------------------------------

def out_paths(out: str | None, dry_run: bool) -> tuple[str, str]:
    """(markdown, json): ``--out FILE.md`` -> FILE.md + FILE.json; ``--out DIR`` -> DIR/gpu.md + DIR/gpu.json."""
    name = "gpu_dry_run" if dry_run else "gpu"
    if not out:
        out = os.path.join(ROOT, "bench", "results", f"{name}.md")
    if out.endswith(".md") or out.endswith(".json"):
        base = out.rsplit(".", 1)[0]
    else:
        base = os.path.join(out, "gpu")
    return base + ".md", base + ".json"


def goal_line(results: dict) -> str:
    moe = results["train"].get("moe", {})
    mfu = moe.get("mfu")
    if mfu is None:
        results["goal"] = {"mfu_goal": MFU_GOAL, "mfu": None, "met": None}
        return (f"Goal MFU >= {MFU_GOAL * 100:.0f}% (raphael_3b train step): unknown "
                f"({'no peak for this device' if moe.get('status') == 'ok' else 'no measurement'}).")
    met = mfu >= MFU_GOAL
    results["goal"] = {"mfu_goal": MFU_GOAL, "mfu": mfu, "met": met,
                       "mfu_incl_fused_attention": moe.get("mfu_incl_fused_attention")}
    extra = ""
    inc = moe.get("mfu_incl_fused_attention")
    if inc is not None and moe.get("fused_attention_flops_est"):
        extra = f"; {inc * 100:.1f}% counting the estimated fused-attention FLOPs XLA does not count"
    dry = " (dry run: a shrunk config on CPU against a nominal peak; says nothing about the goal)" \
        if results["mode"] == "dry-run" else ""
    return (f"Goal MFU >= {MFU_GOAL * 100:.0f}% (raphael_3b train step): **{'met' if met else 'unmet'}** "
            f"({mfu * 100:.1f}% by XLA's FLOP count{extra}){dry}.")


def _count(n) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def fmt_bytes(x) -> str:
    """``123.45 GiB`` (or MiB below 1 GiB); ``-`` for unknown."""
    if x is None:
        return "-"
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.2f} MiB"


def write_report(results: dict, md_path: str, json_path: str) -> None:
    results["wall_s"] = round(elapsed(), 1)
    goal = goal_line(results)
    m = results["machine"]
    lines = [
        "# RAPHAEL-3B on one GPU: train step (MoE and dense) and 50-step DDIM latency",
        "",
        f"Generated by `python bench/gpu.py {results['command']}` on {results['date']} "
        f"({results['wall_s']:.0f} s of a {results['budget_s']:.0f} s budget; status: {results['status']}).",
        "",
        goal,
        "",
        f"- device: {m.get('device_kind')} ({m.get('platform')}, {m.get('local_devices')} local), memory limit "
        f"{fmt_bytes(m.get('bytes_limit'))} (XLA_PYTHON_CLIENT_MEM_FRACTION={m.get('mem_fraction_env') or 'unset'})"
        + (f", driver {m['driver']}" if m.get("driver") else "")
        + (f", {m['platform_version']}" if m.get("platform_version") else ""),
        f"- jax {m.get('jax')}, jaxlib {m.get('jaxlib')}, flax {m.get('flax')}, python {m.get('python')}; host "
        f"{m.get('host_cpu')} ({m.get('host_cores')} cores)",
        f"- peak for MFU: {results['peak_source']}",
        "",
        "| model | params | latents | text states | per-device batch | median step ms | img/s | XLA TFLOP / step "
        "| MFU | fused-attention TFLOP / step (estimate) | MFU incl. it | compile s | last loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["train"].items():
        if r.get("status") != "ok":
            lines.append(f"| {name} (`{r.get('config')}`) | {_count(r.get('params'))} | "
                         f"{'x'.join(map(str, r.get('latent', [])))} | - | - | - | - | - | - | - | - | - | "
                         f"{r.get('status')} |")
            continue
        pct = lambda x: "unknown" if x is None else f"{x * 100:.1f}%"
        lines.append(
            f"| {name} (`{r['config']}`) | {_count(r['params'])} | {'x'.join(map(str, r['latent']))} | "
            f"{'x'.join(map(str, r['text_states']))} | {r['batch']} | {r['step_s_median'] * 1e3:.1f} | "
            f"{r['img_per_s']:.2f} | {r['flops_per_step'] / 1e12:.4g} | {pct(r['mfu'])} | "
            f"{r['fused_attention_flops_est'] / 1e12:.4g} | {pct(r['mfu_incl_fused_attention'])} | "
            f"{(r.get('compile_s') or 0):.1f} | {r['loss_last']:.4f} |")
    lines += ["", "Batch search (descending; memory analysis = arguments + outputs - aliased + temporaries of the "
                  "compiled step, against the usable device memory):", "",
              "| model | batch | compile s | memory analysis | usable memory | result |", "|---|---|---|---|---|---|"]
    for name, r in results["train"].items():
        for s in r.get("search", []):
            lines.append(f"| {name} | {s['batch']} | {s.get('compile_s', 0):.1f} | {fmt_bytes(s.get('peak_bytes'))} | "
                         f"{fmt_bytes(r.get('usable_bytes'))} | {s.get('result', '-')} |")
    d = results.get("ddim")
    if d:
        lines += ["", "| DDIM | latents (image px) | guidance | median latency s | ms / step | runs | first call "
                      "(compile + run) s | VAE decode |", "|---|---|---|---|---|---|---|---|"]
        if d.get("status") == "ok":
            lines.append(f"| {d['steps']} steps, [cond; uncond] | {'x'.join(map(str, d['latent']))} "
                         f"({d['image_px']}) | {d['guidance']} | {d['latency_s_median']:.3f} | {d['step_ms']:.1f} | "
                         f"{len(d['runs_s'])} | {d['first_call_s']:.1f} | not included |")
        else:
            lines.append(f"| {d.get('steps')} steps | - | - | - | - | - | - | {d.get('status')} |")
    lines += [
        "",
        "Train step: the project's `make_train_step` jitted by `jit_train_step` (state donated): timestep and noise "
        "draw, q_sample, U-Net forward with edge heads, MSE + edge focal loss, backward, clipping, AdamW, EMA; "
        "random latents and text states. img/s = batch / median step time after warm-up. MFU = XLA FLOPs / step "
        "time / peak. XLA's cost analysis counts no FLOPs for custom calls it does not model (cuDNN's fused "
        "attention), so on GPUs the self-attention is missing from it; the estimate adds 4 N^2 C per block and "
        "image forward, times (1 + remat recompute) + 2 for the backward, as XLA counts the same attention as "
        "einsums. DDIM: `Sampler.guided_sample` (the config's sample settings) on random text states, latency "
        "of the latents only (CLIP text encoding and the VAE decode are not included).",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(md_path)) or ".", exist_ok=True)
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, default=lambda o: str(o))


# --- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, shrunk config, 2 DDIM steps (the same code path)")
    p.add_argument("--config", default="configs/raphael_3b.py", help="the MoE config (repo-relative or absolute)")
    p.add_argument("--dense-variant", default="dense", help="variant of --config for phase 2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (both models)")
    p.add_argument("--batches", default=None, help="per-device batch candidates (default 32,16,8,4,2,1)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up train steps (default 2)")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps (default 50)")
    p.add_argument("--ddim-runs", type=int, default=None, help="timed DDIM runs after the compiling one (default 3)")
    p.add_argument("--sample-size", type=int, default=None, help="DDIM latent side (default 128 = 1024 px)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget in seconds (default 480)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"which of {','.join(PHASES)} to run")
    p.add_argument("--peak-tflops", type=float, default=None, help="chip bf16 dense peak (TFLOP/s) for MFU")
    p.add_argument("--bytes-limit", type=float, default=None, help="device memory limit in bytes (default: "
                   "memory_stats()['bytes_limit'])")
    p.add_argument("--memory-margin", type=float, default=0.02, help="fraction of the limit kept free")
    p.add_argument("--require", action="append", default=[], metavar="MODULE[=PIP]",
                   help="also require this module (checks the missing-package message)")
    p.add_argument("--check-imports", action="store_true", help="only check the packages, then exit")
    p.add_argument("--out", default=None, help="FILE.md or DIR (default bench/results/gpu.md / gpu.json)")
    args = p.parse_args(argv)
    for k, v in (DRY_DEFAULTS if args.dry_run else REAL_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    bad = [x for x in args.phases if x not in PHASES]
    if bad or not args.phases:
        p.error(f"--phases: unknown {bad}; choose from {','.join(PHASES)}")
    args.phases = [x for x in PHASES if x in args.phases]
    try:
        args.candidates = sorted({int(x) for x in args.batches.split(",") if x.strip()}, reverse=True)
    except ValueError:
        p.error(f"--batches {args.batches!r}: comma-separated integers")
    if not args.candidates or min(args.candidates) < 1:
        p.error("--batches needs positive integers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before anything imports jax (the package check imports the chain)
    check_packages(parse_require(args.require))
    if args.check_imports:
        log("packages: all present")
        return 0
    md_path, json_path = out_paths(args.out, args.dry_run)
    budget = Budget(args.budget_s, args.phases)
    log(f"time budget {args.budget_s:.0f} s: " + ", ".join(f"{p} until {t:.0f} s" for p, t in budget.deadlines.items())
        + f"; results to {md_path} and {json_path}")

    import jax

    if args.dry_run:
        jax.config.update("jax_platforms", "cpu")
    device = jax.local_devices()[0]
    if not args.dry_run and device.platform != "gpu":
        sys.exit(f"bench/gpu.py: no GPU: jax's first local device is {device.platform} ({device.device_kind}); "
                 "run --dry-run on CPU, or check the CUDA jaxlib plugin")
    peak, peak_src = peak_flops(device.device_kind, args.peak_tflops, args.dry_run)
    overrides = (DRY_OVERRIDES if args.dry_run else []) + list(args.set)
    results = {"mode": "dry-run" if args.dry_run else "gpu",
               "command": " ".join(sys.argv[1:] if argv is None else argv),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget_s": args.budget_s,
               "status": "running", "machine": machine_info(device), "peak_flops": peak, "peak_source": peak_src,
               "overrides": overrides, "train": {}, "deadlines_s": budget.deadlines}
    m = results["machine"]
    log(f"device {m['device_kind']} ({m['platform']}), jax {m['jax']}, memory limit {fmt_bytes(m.get('bytes_limit'))}, "
        f"peak {peak_src}")

    lock = threading.Lock()
    current = {"phase": "start"}

    def on_timeout():
        with lock:
            results["status"] = f"stopped: the {args.budget_s:.0f} s budget ran out during phase {current['phase']}"
            log(results["status"])
            try:
                write_report(results, md_path, json_path)
            finally:
                os._exit(3)

    watchdog = threading.Timer(max(1.0, args.budget_s - 2.0 - Budget.elapsed()), on_timeout)
    watchdog.daemon = True
    watchdog.start()

    def save():
        with lock:
            write_report(results, md_path, json_path)

    cfg_path = args.config
    ema = None
    try:
        if "train" in args.phases:
            current["phase"] = "train"
            _, ema = train_phase("moe", "train", cfg_path, overrides, args.candidates, device, budget, args, peak,
                                 results, keep_ema="ddim" in args.phases,
                                 search_phase="dense" if "dense" in args.phases else "train")
            save()
        if "dense" in args.phases:
            current["phase"] = "dense"
            moe = results["train"].get("moe")
            if moe is not None and moe.get("status") != "ok":
                results["train"]["dense"] = {"config": f"{cfg_path}:{args.dense_variant}", "status":
                                             "skipped: phase 1 found no batch"}
            else:
                dense_batches = [moe["batch"]] if moe else args.candidates
                dense_ov = list(overrides)
                if overrides:  # the variant sized the dense FFN on the unshrunk MoE: re-size it on the overrides
                    dense_ov.append(f"model.dense_ffn_mult={dense_mult(cfg_path, overrides)}")
                if budget.left("dense") <= 0:
                    results["train"]["dense"] = {"config": f"{cfg_path}:{args.dense_variant}",
                                                 "status": "skipped: no time left"}
                else:
                    train_phase("dense", "dense", f"{cfg_path}:{args.dense_variant}", dense_ov, dense_batches,
                                device, budget, args, peak, results)
            save()
        if "ddim" in args.phases:
            current["phase"] = "ddim"
            if budget.left("ddim") <= 0:
                results["ddim"] = {"status": "skipped: no time left", "steps": args.ddim_steps}
            else:
                ddim_phase(cfg_path, overrides, ema, device, budget, args, results)
            save()
    except BaseException as e:
        watchdog.cancel()
        with lock:
            results["status"] = f"error in phase {current['phase']}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            write_report(results, md_path, json_path)
        raise
    watchdog.cancel()
    with lock:
        results["status"] = "done"
        write_report(results, md_path, json_path)
    log(goal_line(results))
    log(f"wrote {md_path} and {json_path}")
    return 0


def dense_mult(cfg_path: str, overrides) -> float:
    """``configs/common.py``'s ``dense_ffn_mult`` of the MoE config with ``overrides`` (FLOP-matched baseline)."""
    from raphael_jax.config import config_module, load_config

    path = os.path.join(ROOT, cfg_path) if not os.path.isabs(cfg_path) else cfg_path
    common = config_module(path, "common")
    return float(common.dense_ffn_mult(load_config(path, overrides).model))


if __name__ == "__main__":
    raise SystemExit(main())
