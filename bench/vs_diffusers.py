"""Our dense U-Net against diffusers' PyTorch ``UNet2DConditionModel`` at matched shape, float32 on CPU.

    python bench/vs_diffusers.py                                   # 32x32 batch 32 and 64x64 batch 4, all cores
    python bench/vs_diffusers.py --shapes 32x32:32 --threads 8 --attention chunked --note "nothing else ran"
    python bench/vs_diffusers.py --small --shapes 16x16:2 --rounds 1 --out /tmp/vs.md   # smoke test (tests/bench)

One process builds both denoisers at the same shape and times, for each ``--shapes`` entry:

- a full train step: ours is the project's own jitted step (``raphael_jax.train.step.make_train_step``:
  timestep and noise draw, ``q_sample``, U-Net forward, MSE, backward, global-norm clipping, AdamW,
  EMA update; state donated as in ``jit_train_step``); theirs does the same work in PyTorch
  (``torch.optim.AdamW``, ``clip_grad_norm_`` and a ``_foreach_lerp_`` EMA, matching ``configs/base.py``'s
  ``train.grad_clip`` / ``train.ema_decay``);
- one guided sampling step: the U-Net on the ``[cond; uncond]`` batch of 2B, the guidance combine, then
  the DDIM update (ours: ``raphael_jax.diffusion.ddim.ddim_step``, as ``bench/moe_inference.py``; theirs:
  the same arithmetic in a few tensor ops), under ``torch.no_grad()`` in eval mode.

Calls are interleaved round-robin after warm-up (one call of each per round, median over rounds), so
machine-load drift hits both alike. torch gets ``torch.set_num_threads(--threads)``; XLA:CPU uses every
core whatever ``--threads`` says (the report says so when they differ).

Our model: ``configs/base.py:dense,no_edge`` with the overrides of :func:`our_overrides` (channels
(64, 128), 2 ResBlocks per level, a RAPHAEL block (self-attention, cross-attention, dense FFN of 6x)
on level 0 and in the middle, head width 16, external text states [B, 16, 128]); only the U-Net has
parameters. Theirs: ``CrossAttnDownBlock2D, DownBlock2D`` / ``UpBlock2D, CrossAttnUpBlock2D`` with the
default ``UNetMidBlock2DCrossAttn``, ``block_out_channels=(64, 128)``, ``layers_per_block=2``,
``cross_attention_dim=128``. diffusers reads ``attention_head_dim`` as the NUMBER of heads per level
(``diffusers/models/unets/unet_2d_condition.py``: ``num_attention_heads = num_attention_heads or
attention_head_dim``), so it gets ``(64 // 16, 128 // 16) = (4, 8)``: heads of width 16 on level 0
and in the middle block, as ours. The parameter counts must agree within 10% (the run stops otherwise).

FLOPs: ours from XLA's cost analysis of the compiled step (every op: matmuls, convolutions, element-wise
ops, the optimizer and EMA updates; when self-attention runs a looping kernel, ``blocked`` or
``chunked``, whose loop bodies XLA counts once, from the lowered step of the ``model.attention=xla``
twin, the same arithmetic unrolled); theirs from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions and attention only, with formulas added for CPU's fused attention kernels, which it does not
know; the train step over forward + backward). The per-FLOP ratio is
``(ours_time / ours_flops) / (theirs_time / theirs_flops)``. Memory: XLA's compiled sizes of our train
step, and the peak RSS of a spawned child process that builds one model and runs one train step (ours
includes the compilation). Writes ``bench/results/vs_diffusers.md``.

Run it on a quiet machine: with ``--threads`` equal to cores busy with other work, torch's OpenMP
barriers stall for whole scheduler time slices (a 2-core machine shared with a training run measured
the --small diffusers train step at 9 s with 2 threads, 0.15 s with 1).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/benchlib.py
from benchlib import FAST_COMPILE as _CPU_FAST_COMPILE
from benchlib import ROOT, cpu_model, elapsed, log, run_child, xla_flops  # noqa: E402

PARAM_TOLERANCE = 0.10  # |ours - theirs| / theirs allowed
TEXT_LEN = 16
T0, T_PREV = 500, 460   # the sampling step timed (as bench/moe_inference.py)
LOOP_KERNELS = ("blocked", "chunked")  # attention kernels that loop (lax.map): XLA counts their bodies once


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """``"32x32:32,64x64:4"`` -> ``[(32, 32), (64, 4)]`` (image side, batch); images are square."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            hw, b = part.split(":")
            h, w = (int(v) for v in hw.lower().split("x"))
            b = int(b)
        except ValueError:
            raise SystemExit(f"--shapes entry {part!r}: expected HxW:BATCH, e.g. 32x32:32") from None
        if h != w:
            raise SystemExit(f"--shapes entry {part!r}: only square images (the config has one data.image_size)")
        out.append((h, b))
    return out


def dims(small: bool) -> dict:
    """The matched shape, shared by both models (``--small`` shrinks the channels of both alike)."""
    return {"channels": (32, 64) if small else (64, 128), "head_dim": 16, "groups": 32, "context": 128,
            "layers": 2, "ffn_mult": 6.0, "in_channels": 3}


# --- ours -------------------------------------------------------------------------------------

def our_overrides(size: int, d: dict, attention: str | None, chunk: int | None) -> list[str]:
    ov = ["model.patch_size=1", f"model.channels={d['channels']}", f"model.num_res_blocks={d['layers']}",
          "model.block_levels=(1, 0)", "model.self_attention_levels=(1, 1)", f"model.head_dim={d['head_dim']}",
          f"model.norm_groups={d['groups']}", f"model.context_dim={d['context']}",
          f"model.dense_ffn_mult={d['ffn_mult']}", "text.kind=external", f"text.width={d['context']}",
          f"text.max_len={TEXT_LEN}", f"data.image_size={size}", f"model.in_channels={d['in_channels']}"]
    if attention:
        ov.append(f"model.attention={attention}")
    if chunk:
        ov.append(f"model.attention_chunk={chunk}")
    return ov


def our_config(size: int, d: dict, attention: str | None = None, chunk: int | None = None):
    from raphael_jax.config import load_config

    return load_config(os.path.join(ROOT, "configs", "base.py") + ":dense,no_edge",
                       our_overrides(size, d, attention, chunk))


def fake_inputs(size: int, batch: int, d: dict) -> dict:
    """The same numbers for both models (NHWC here; torch gets them transposed)."""
    rng = np.random.default_rng(0)
    return {"image": rng.uniform(-1, 1, (batch, size, size, d["in_channels"])).astype(np.float32),
            "text_states": rng.standard_normal((batch, TEXT_LEN, d["context"])).astype(np.float32),
            "null_states": rng.standard_normal((batch, TEXT_LEN, d["context"])).astype(np.float32),
            "mask": np.ones((batch, TEXT_LEN), bool),
            "noise": rng.standard_normal((batch, size, size, d["in_channels"])).astype(np.float32)}


class OursTrain:
    """The project's train step, jitted with the state donated; each call advances the state."""

    def __init__(self, cfg, inputs: dict):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from raphael_jax.diffusion.schedule import NoiseSchedule
        from raphael_jax.models.raphael import build_model
        from raphael_jax.train.state import init_state, make_optimizer, split_model
        from raphael_jax.train.step import make_train_step

        # built jitted, as raphael_jax.train.state.abstract_train_state / sharded_init (eager init is slow)
        abstract = nnx.eval_shape(lambda: build_model(cfg, cfg.seed))
        self.n_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract.unet, nnx.Param))))
        graphdef, _ = split_model(abstract)
        init = jax.jit(lambda: split_model(build_model(cfg, cfg.seed))[1]).lower()
        params = init.compile(compiler_options=_CPU_FAST_COMPILE if jax.default_backend() == "cpu" else None)()
        self.graphdef = graphdef
        self.sample_params = jax.tree.map(jnp.copy, params)  # the train state's buffers are donated
        tx = make_optimizer(cfg)
        sched = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        self.state = init_state(cfg, params, tx)
        # external text states (text.kind=external), every token real; no null states: no caption dropout
        self.batch = {"image": jnp.asarray(inputs["image"]), "text_states": jnp.asarray(inputs["text_states"]),
                      "mask": jnp.asarray(inputs["mask"])}
        self.rng = jax.random.key(0)
        step = jax.jit(make_train_step(graphdef, cfg, tx, sched), donate_argnums=(0,))
        self.compiled = step.lower(self.state, self.batch, self.rng).compile()
        self._jax = jax

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        self._jax.block_until_ready((self.state, metrics))


def sample_step_fn(cfg, graphdef):
    """The jitted guided DDIM step: U-Net on [cond; uncond] (2B), guidance, ``ddim_step``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from raphael_jax.diffusion.ddim import ddim_step
    from raphael_jax.diffusion.schedule import NoiseSchedule

    sched = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    pred = cfg.diffusion.prediction

    @jax.jit
    def step(params, x, t, t_prev, ctx, mask, w):
        model = nnx.merge(graphdef, params)
        b = x.shape[0]
        out2 = model.unet(jnp.concatenate([x, x]), jnp.full((2 * b,), t, jnp.int32), ctx, mask, with_edges=False)
        out = out2[b:] + w * (out2[:b] - out2[b:])
        return ddim_step(sched, out, t, t_prev, x, pred)[0]

    return step


def sample_args(cfg, params, inputs: dict) -> tuple:
    import jax.numpy as jnp

    ctx = jnp.concatenate([jnp.asarray(inputs["text_states"]), jnp.asarray(inputs["null_states"])])
    mask = jnp.concatenate([jnp.asarray(inputs["mask"])] * 2)
    return (params, jnp.asarray(inputs["noise"]), jnp.int32(T0), jnp.int32(T_PREV), ctx, mask,
            jnp.float32(cfg.sample.guidance))


class OursSample:
    """One guided DDIM step (``sample_step_fn``), compiled."""

    def __init__(self, cfg, graphdef, params, inputs: dict):
        import jax

        self.args = sample_args(cfg, params, inputs)
        self.compiled = sample_step_fn(cfg, graphdef).lower(*self.args).compile()
        self._jax = jax

    def __call__(self):
        self._jax.block_until_ready(self.compiled(*self.args))


def loop_free_flops(size: int, d: dict, inputs: dict) -> tuple[float, float]:
    """XLA's FLOPs of our train and sampling steps with ``model.attention=xla``, from the lowered (not
    compiled) programs. XLA's cost analysis counts a while loop's body once, so the loop kernels
    (``blocked``, ``chunked``) hide most of their attention FLOPs; the same arithmetic without the loop
    gives the count the per-FLOP ratio needs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from raphael_jax.diffusion.schedule import NoiseSchedule
    from raphael_jax.models.raphael import build_model
    from raphael_jax.train.state import init_state, make_optimizer, split_model
    from raphael_jax.train.step import make_train_step

    cfg = our_config(size, d, "xla")
    abstract = nnx.eval_shape(lambda: build_model(cfg, cfg.seed))
    graphdef, params = split_model(abstract)
    tx = make_optimizer(cfg)
    state = jax.eval_shape(lambda p: init_state(cfg, p, tx), params)
    batch = {"image": jnp.asarray(inputs["image"]), "text_states": jnp.asarray(inputs["text_states"]),
             "mask": jnp.asarray(inputs["mask"])}
    sched = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    train = jax.jit(make_train_step(graphdef, cfg, tx, sched)).lower(state, batch, jax.random.key(0))
    sample = sample_step_fn(cfg, graphdef).lower(*sample_args(cfg, params, inputs))
    return xla_flops(train), xla_flops(sample)


def xla_memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": getattr(m, "alias_size_in_bytes", 0)}


# --- theirs -----------------------------------------------------------------------------------

def diffusers_kwargs(size: int, d: dict) -> dict:
    heads = tuple(c // d["head_dim"] for c in d["channels"])  # diffusers: attention_head_dim = number of heads
    return {"sample_size": size, "in_channels": d["in_channels"], "out_channels": d["in_channels"],
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": d["channels"], "layers_per_block": d["layers"],
            "cross_attention_dim": d["context"], "attention_head_dim": heads, "norm_num_groups": d["groups"]}


def build_theirs(size: int, d: dict):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**diffusers_kwargs(size, d)).float()
    return unet, int(sum(p.numel() for p in unet.parameters()))


def scaled_linear_abar(T: int = 1000, start: float = 0.00085, end: float = 0.012) -> np.ndarray:
    """alphas_cumprod of the ``scaled_linear`` schedule (``raphael_jax/diffusion/schedule.py``)."""
    betas = np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


class TheirsTrain:
    """timestep + noise draw, q_sample, forward, MSE (epsilon target), backward, clipping, AdamW, EMA."""

    def __init__(self, unet, cfg_train: dict, inputs: dict, T: int):
        import torch

        self.torch = torch
        self.unet = unet.train()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=cfg_train["lr"], betas=(cfg_train["b1"], cfg_train["b2"]),
                                     weight_decay=cfg_train["weight_decay"])
        self.clip = cfg_train["grad_clip"]
        self.ema_decay = cfg_train["ema_decay"]
        self.x0 = torch.from_numpy(inputs["image"]).permute(0, 3, 1, 2).contiguous()
        self.ctx = torch.from_numpy(inputs["text_states"])
        self.mask = torch.from_numpy(inputs["mask"])
        self.abar = torch.from_numpy(scaled_linear_abar(T))
        self.T = T
        self.gen = torch.Generator().manual_seed(0)

    def loss(self):
        torch = self.torch
        b = self.x0.shape[0]
        t = torch.randint(0, self.T, (b,), generator=self.gen)
        noise = torch.randn(self.x0.shape, generator=self.gen)
        a = self.abar[t].view(b, 1, 1, 1)
        x_t = a.sqrt() * self.x0 + (1.0 - a).sqrt() * noise
        out = self.unet(x_t, t, encoder_hidden_states=self.ctx, encoder_attention_mask=self.mask).sample
        return torch.mean((out - noise) ** 2)

    def forward_backward(self):
        self.loss().backward()

    def __call__(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        self.forward_backward()
        if self.clip and self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)


class TheirsSample:
    """U-Net on [cond; uncond] (2B), guidance, DDIM update (eta 0, epsilon prediction)."""

    def __init__(self, unet, inputs: dict, guidance: float, T: int):
        import copy

        import torch

        self.torch = torch
        self.unet = copy.deepcopy(unet).eval()
        self.x = torch.from_numpy(inputs["noise"]).permute(0, 3, 1, 2).contiguous()
        self.ctx = torch.cat([torch.from_numpy(inputs["text_states"]), torch.from_numpy(inputs["null_states"])])
        self.mask = torch.cat([torch.from_numpy(inputs["mask"])] * 2)
        abar = scaled_linear_abar(T)
        self.a_t, self.a_prev = float(abar[T0]), float(abar[T_PREV])
        self.w = guidance

    def __call__(self):
        torch = self.torch
        with torch.no_grad():
            b = self.x.shape[0]
            t = torch.full((2 * b,), T0, dtype=torch.long)
            out2 = self.unet(torch.cat([self.x, self.x]), t, encoder_hidden_states=self.ctx,
                             encoder_attention_mask=self.mask).sample
            eps = out2[b:] + self.w * (out2[:b] - out2[b:])
            x0 = (self.x - (1.0 - self.a_t) ** 0.5 * eps) / self.a_t**0.5
            return self.a_prev**0.5 * x0 + (1.0 - self.a_prev) ** 0.5 * eps


def _flop_mapping() -> dict:
    """FlopCounterMode formulas for the CPU fused-attention kernels it does not know (counted as SDPA)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

        out[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return out


def torch_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_flop_mapping())
    with counter:
        fn()
    return float(counter.get_total_flops())


# --- peak RSS of a child running one train step ----------------------------------------------

def _peak_rss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` of its own address space. Not ``ru_maxrss``: Linux carries the
    parent's high-water mark over fork + exec into it, so a spawned child reports at least the parent's size."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _child(kind: str, size: int, batch: int, d: dict, attention, chunk, threads: int, cfg_train: dict, queue):
    try:
        inputs = fake_inputs(size, batch, d)
        if kind == "ours":
            OursTrain(our_config(size, d, attention, chunk), inputs)()
        else:
            import torch

            torch.set_num_threads(threads)
            unet, _ = build_theirs(size, d)
            TheirsTrain(unet, cfg_train, inputs, cfg_train["T"])()
        queue.put(_peak_rss_bytes())
    except BaseException as e:  # report, never hang the parent
        queue.put(f"{type(e).__name__}: {e}")


def child_peak_rss(kind: str, *args) -> float:
    """Peak RSS (bytes) of a spawned child that builds one model and runs one train step; nan on failure."""
    res = run_child(_child, (kind, *args))
    if isinstance(res, str):
        log(f"  {kind} child failed: {res}")
        return float("nan")
    return float(res)


# --- main -------------------------------------------------------------------------------------

def _med(ts) -> float:
    return statistics.median(ts) * 1e3


def _iqr(ts) -> str:
    return f"{np.percentile(ts, 25) * 1e3:.1f}-{np.percentile(ts, 75) * 1e3:.1f}"


def _mib(x) -> str:
    return "-" if x is None or x != x else f"{x / 2**20:.0f}"


def run_shape(size: int, batch: int, args, d: dict) -> dict:
    import jax
    import torch

    from raphael_jax.models.attention_kernels import resolve_impl

    label = f"{size}x{size}:{batch}"
    log(f"{label}: building ours (configs/base.py:dense,no_edge) and compiling its train and sampling steps")
    cfg = our_config(size, d, args.attention, args.attention_chunk)
    inputs = fake_inputs(size, batch, d)
    ours_train = OursTrain(cfg, inputs)
    ours_sample = OursSample(cfg, ours_train.graphdef, ours_train.sample_params, inputs)
    log(f"{label}: building diffusers UNet2DConditionModel")
    unet, n_theirs = build_theirs(size, d)
    n_ours = ours_train.n_params
    rel = abs(n_ours - n_theirs) / n_theirs
    log(f"{label}: parameters ours {n_ours:,} / diffusers {n_theirs:,} ({rel * 100:.2f}% apart)")
    if rel > PARAM_TOLERANCE:
        raise SystemExit(f"parameter counts not matched: ours {n_ours:,} vs diffusers {n_theirs:,} differ by "
                         f"{rel * 100:.1f}% > {PARAM_TOLERANCE * 100:.0f}%; the shapes of the two models diverged "
                         f"(ours: {our_overrides(size, d, None, None)}; diffusers: {diffusers_kwargs(size, d)})")
    tc = cfg.train
    cfg_train = {"lr": tc.learning_rate, "b1": tc.b1, "b2": tc.b2, "weight_decay": tc.weight_decay,
                 "grad_clip": tc.grad_clip, "ema_decay": tc.ema_decay, "T": cfg.diffusion.num_timesteps}
    theirs_train = TheirsTrain(unet, cfg_train, inputs, cfg.diffusion.num_timesteps)
    theirs_sample = TheirsSample(unet, inputs, cfg.sample.guidance, cfg.diffusion.num_timesteps)

    fns = {"ours_train": ours_train, "theirs_train": theirs_train, "ours_sample": ours_sample,
           "theirs_sample": theirs_sample}
    log(f"{label}: warm-up ({args.warmup} calls each)")
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    flops = {"ours_train": xla_flops(ours_train.compiled), "ours_sample": xla_flops(ours_sample.compiled)}
    if resolve_impl(cfg.model.attention, map_size=(size * size) ** 2) in LOOP_KERNELS:  # level 0: every pixel
        flops["ours_train"], flops["ours_sample"] = loop_free_flops(size, d, inputs)
        log(f"{label}: our FLOPs counted on the model.attention=xla twin (the attention kernel loops)")
    flops |= {"theirs_train": torch_flops(theirs_train.forward_backward),
              "theirs_sample": torch_flops(theirs_sample)}
    theirs_train.opt.zero_grad(set_to_none=True)
    log(f"{label}: GFLOP train ours {flops['ours_train'] / 1e9:.3f} / diffusers {flops['theirs_train'] / 1e9:.3f}; "
        f"sample ours {flops['ours_sample'] / 1e9:.3f} / diffusers {flops['theirs_sample'] / 1e9:.3f}")

    times = {k: [] for k in fns}
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    for r in range(args.rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        log(f"{label}: round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms"
                                                                  for k, v in times.items()))
    mem = xla_memory(ours_train.compiled)
    del ours_train, ours_sample, theirs_train, theirs_sample, fns, unet
    jax.clear_caches()
    rss = {"ours": float("nan"), "theirs": float("nan")}
    if not args.no_rss:
        for kind in ("ours", "theirs"):
            log(f"{label}: peak RSS of a child process running one {kind} train step")
            rss[kind] = child_peak_rss(kind, size, batch, d, args.attention, args.attention_chunk, args.threads,
                                       cfg_train)
    res = {"label": label, "size": size, "batch": batch, "params": {"ours": n_ours, "theirs": n_theirs},
           "flops": flops, "times": times, "mem": mem, "rss": rss, "load": load,
           "attention": cfg.model.attention, "torch_threads": torch.get_num_threads()}
    for step in ("train", "sample"):
        o, t = _med(times[f"ours_{step}"]), _med(times[f"theirs_{step}"])
        res[f"{step}_time_ratio"] = o / t
        res[f"{step}_flop_ratio"] = (o / flops[f"ours_{step}"]) / (t / flops[f"theirs_{step}"])
        log(f"{label}: {step} median ours {o:.1f} ms / diffusers {t:.1f} ms = {o / t:.3f}x; per FLOP "
            f"{res[f'{step}_flop_ratio']:.3f}x")
    return res


def write_report(path: str, results: list[dict], args, argv, d: dict) -> None:
    import diffusers
    import flax
    import jax
    import torch

    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    ncpu = os.cpu_count()
    threads_line = f"torch.set_num_threads({args.threads}); XLA:CPU uses its default (every core)"
    if args.threads < ncpu:
        threads_line += f" -- XLA is NOT limited to {args.threads} thread(s), torch is"
    lines = [
        "# Our dense U-Net against diffusers' UNet2DConditionModel (CPU, float32)",
        "",
        f"Generated by `python bench/vs_diffusers.py {cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({elapsed():.0f} s).",
        "",
        f"- machine: {cpu_model()}, {ncpu} cores visible; threads: {threads_line}",
        f"- jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, numpy {np.__version__}, python {platform.python_version()}",
        "- load average before the timed rounds (1 / 5 / 15 min): "
        + "; ".join(f"{r['label']}: {' / '.join(r['load'])}" for r in results),
        f"- also running: {args.note}" if args.note else "- also running: not stated (pass --note)",
        f"- shape: channels {d['channels']}, {d['layers']} ResBlocks per level, attention on level 0 and in the "
        f"middle, head width {d['head_dim']}, GroupNorm {d['groups']}, text states [B, {TEXT_LEN}, {d['context']}]"
        f"{' (--small)' if args.small else ''}; our attention kernel: `model.attention="
        f"{results[0]['attention'] if results else '?'}`"
        + (f", chunk {args.attention_chunk}" if args.attention_chunk else ""),
        f"- median of {args.rounds} round-robin rounds after {args.warmup} warm-up calls of each",
        "",
        "| shape (side:batch) | model | params (M) | train GFLOP | train ms | train IQR ms | sample GFLOP | "
        "sample ms | sample IQR ms | peak RSS of a child process running one step (MiB) | "
        "XLA train step temp / args / outputs (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for who, name in (("ours", "ours (raphael_jax)"), ("theirs", "diffusers")):
            tt, ts = r["times"][f"{who}_train"], r["times"][f"{who}_sample"]
            mem = r["mem"] if who == "ours" else {}
            mem_s = (f"{_mib(mem.get('temp'))} / {_mib(mem.get('argument'))} / {_mib(mem.get('output'))}"
                     if mem else "-")
            lines.append(f"| {r['label']} | {name} | {r['params'][who] / 1e6:.3f} | "
                         f"{r['flops'][f'{who}_train'] / 1e9:.3f} | {_med(tt):.1f} | {_iqr(tt)} | "
                         f"{r['flops'][f'{who}_sample'] / 1e9:.3f} | {_med(ts):.1f} | {_iqr(ts)} | "
                         f"{_mib(r['rss'][who])} | {mem_s} |")
    lines += [
        "",
        "| shape (side:batch) | params ours / diffusers | train time ours / diffusers | train per-FLOP ours / "
        "diffusers | sample time ours / diffusers | sample per-FLOP ours / diffusers |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['label']} | {r['params']['ours'] / r['params']['theirs']:.3f} | "
                     f"{r['train_time_ratio']:.3f} | {r['train_flop_ratio']:.3f} | "
                     f"{r['sample_time_ratio']:.3f} | {r['sample_flop_ratio']:.3f} |")
    lines += [
        "",
        "Train step: timestep and noise draw, q_sample, forward, MSE, backward, global-norm clipping, AdamW and "
        "the EMA update, in both (ours: `raphael_jax.train.step.make_train_step`, jitted, state donated). "
        "Sampling step: the U-Net on the [cond; uncond] batch of 2B, guidance, one DDIM update. FLOPs: ours are "
        "XLA's cost analysis of the compiled step (every op, the optimizer included; when self-attention runs "
        "a looping kernel, `blocked` or `chunked`, whose loop bodies XLA counts once, of the lowered step with "
        "`model.attention=xla`, the same arithmetic unrolled); diffusers' are "
        "`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention only; train: forward + "
        "backward), so ours count more of the same work and the per-FLOP ratio leans in our favour by that "
        "margin. Peak RSS: `VmHWM` of a spawned child that builds one model and runs one train step (ours "
        "includes XLA's compilation); it includes the interpreter and the imported libraries.",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="32x32:32,64x64:4", help="comma-separated HxW:BATCH entries")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (XLA: all cores)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one call of each step per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default=None, help="our model.attention (auto|xla|chunked|blocked); default: config")
    p.add_argument("--attention-chunk", type=int, default=None, help="our model.attention_chunk; default: config")
    p.add_argument("--small", action="store_true", help="channels (32, 64) for both models (smoke tests)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "vs_diffusers.md"))
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    ncpu = os.cpu_count()
    log(f"torch threads {args.threads} of {ncpu} cores" +
        (f"; XLA:CPU is NOT limited to {args.threads} thread(s)" if args.threads < ncpu else ""))
    d = dims(args.small)
    results = [run_shape(size, batch, args, d) for size, batch in shapes]
    write_report(args.out, results, args, argv, d)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
