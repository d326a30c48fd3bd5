"""Train-step time and memory of the tiny model against image size and batch, on CPU, with fitted exponents.

    python bench/scaling.py --note "nothing else ran"              # 32/64/128 px at batch 8; batch 4..32 at 32 px
    python bench/scaling.py --rss --note "nothing else ran"        # + the RSS of a child process per point
    python bench/scaling.py --set model.attention=chunked --out bench/results/scaling_chunked.md
    python bench/scaling.py --sizes 16,32 --fixed-batch 2 --batches 2,4 --fixed-size 16 --rounds 2 \\
        --warmup 0 --fast-compile --set ... --out /tmp/scaling.md  # smoke test, smaller model: tests/bench

Two curves of the README's main job (``configs/tiny.py``, overridable with ``--config`` and ``--set``):
image side ``--sizes`` at the fixed batch ``--fixed-batch``, and batch ``--batches`` at the fixed side
``--fixed-size`` (a point on both curves is measured once). Each point is the project's own train step,
built as ``raphael_jax/train/loop.py`` builds it: ``make_train_step`` (timestep and noise draw,
``q_sample``, text encoder, U-Net forward, denoising + edge loss, backward, clipping, AdamW, EMA) jitted
by ``jit_train_step`` on the config's mesh with the state donated, ``data.image_size`` and
``train.batch_size`` set to the point's values.

Batches are synthetic with the shapes of the config's data: real shapes-world captions (drawn as the
config's ``data.object_weights`` say) tokenized by the world's tokenizer (``Tokenizer.train_on_world``,
as a fresh run trains it), uniform noise images in [-1, 1] and random binary edge maps (the step's
cost does not depend on the values: the space-MoE runs every expert over every position). The world
itself renders only sides >= 32, hence noise images, which also allow the 16 px smoke test.

Initialisation is slow on CPU (tracing the model, then the jitted init), so it is shared where the
model cannot differ: the model is built from ``config.model`` and ``config.text`` alone
(``raphael_jax/models/raphael.py``), so the abstract train state is traced once per config that differs
in more than ``data.image_size`` / ``train.batch_size``; and the parameters are initialised once per
distinct state layout. The tiny config's position embedding is a fixed sin-cos table computed at call
time (``raphael_jax/models/attention.py``), so no parameter depends on the image size; this is checked,
not assumed (the layouts of all points are compared: a layout that differs is initialised again, and
the report says how many initialisations there were). Each point gets its own copy of the state (the
step donates it).

Time: after ``--warmup`` calls of each, ``--rounds`` rounds with one call of every point per round
(round-robin, so machine-load drift hits all points alike); the median over rounds is reported.
Memory: XLA's ``memory_analysis()`` of each compiled step, its temp (activations and scratch),
argument, output and alias (donated state reused for the output) bytes reported separately, and
their total ``temp + argument + output - alias``; with ``--rss``, also a spawned child process per
point that builds the same step and reports its peak RSS (``VmHWM``) over everything (compilation
included), its RSS just before the step runs (after ``malloc_trim``, so the step's buffers fault in
fresh pages) and its peak RSS while the compiled step runs (the high-water mark reset via
``/proc/self/clear_refs``), and the difference. FLOPs: XLA's cost analysis (noise-free). Compilations,
and the RSS children, run ``--compile-workers`` at a time (default one per core).

Exponents: least squares of log y on log x (``fit_power_law``) for time ~ side^a, memory ~ side^b,
time ~ batch^c, memory ~ batch^d. Side, not pixel count: work proportional to the pixels gives 2.
Writes ``bench/results/scaling.md`` and the same numbers (every timed round too) as ``scaling.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/benchlib.py
from benchlib import FAST_COMPILE, ROOT, cpu_model, elapsed, log, run_child, set_clock, start_time, xla_flops  # noqa: E402

EDGE_DENSITY = 0.1   # share of edge pixels in the synthetic edge maps


def parse_ints(spec: str, name: str) -> list[int]:
    try:
        out = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{name} {spec!r}: expected comma-separated integers, e.g. 32,64,128") from None
    if not out or any(v < 1 for v in out):
        raise SystemExit(f"{name} {spec!r}: expected positive integers")
    return out


def fit_power_law(xs, ys) -> dict:
    """Fit ``y = k * x**a`` by least squares on ``log y = a log x + log k``.

    Returns ``{"exponent": a, "prefactor": k, "r2": R^2 of the log-log fit}``. ValueError unless there
    are at least two distinct x, every x and y finite and > 0, and as many x as y.
    """
    x = np.asarray(xs, np.float64)
    y = np.asarray(ys, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-D sequences of one length, got shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError(f"a power-law fit needs finite positive values, got x={x.tolist()} y={y.tolist()}")
    if len(np.unique(x)) < 2:
        raise ValueError(f"a power-law fit needs at least two distinct x, got {x.tolist()}")
    lx, ly = np.log(x), np.log(y)
    design = np.stack([lx, np.ones_like(lx)], axis=1)
    (a, c), *_ = np.linalg.lstsq(design, ly, rcond=None)
    resid = ly - (a * lx + c)
    ss_res, ss_tot = float(resid @ resid), float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"exponent": float(a), "prefactor": float(np.exp(c)), "r2": r2}


def points_of(sizes, fixed_batch, batches, fixed_size) -> list[tuple[int, int]]:
    """The (side, batch) points of both curves, each once, size curve first."""
    out = []
    for p in [(s, fixed_batch) for s in sizes] + [(fixed_size, b) for b in batches]:
        if p not in out:
            out.append(p)
    return out


# --- one point: config, synthetic batch, the project's jitted train step ------------------------

def point_config(config_spec: str, overrides, size: int, batch: int):
    from raphael_jax.config import load_config

    return load_config(config_spec, list(overrides) + [f"data.image_size={size}", f"train.batch_size={batch}"])


_TOKENIZERS: dict = {}


def world_tokenizer(cfg):
    """The shapes world's tokenizer as a fresh run trains it (``raphael_jax/train/loop.py``); None for external text."""
    if cfg.text.kind != "small":
        return None
    from raphael_jax.data.shapes.tokenizer import Tokenizer

    tok = _TOKENIZERS.get(cfg.data.seed)
    if tok is None:
        tok = _TOKENIZERS[cfg.data.seed] = Tokenizer.train_on_world(seed=cfg.data.seed)
    if tok.vocab_size > cfg.text.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} pieces but text.vocab_size={cfg.text.vocab_size}")
    return tok


def synthetic_batch(cfg, tok, size: int, batch: int, seed: int = 0) -> dict:
    """Host batch with the training data's keys, shapes and dtypes (``raphael_jax/data/shapes/pipeline.py``)."""
    from raphael_jax.data.shapes.world import make_caption, sample_objects
    from raphael_jax.train.loop import object_range

    rng = np.random.default_rng([seed, size, batch])
    out = {"image": rng.uniform(-1.0, 1.0, (batch, size, size, cfg.model.in_channels)).astype(np.float32)}
    L = cfg.text.max_len
    if tok is not None:
        lo, hi, w = object_range(cfg)
        captions = [make_caption(sample_objects(rng, lo, hi, w if hi > lo else None)) for _ in range(batch)]
        out["tokens"], out["mask"] = tok.encode(captions, L)
    else:  # external text encoders: stored states, every token real
        out["text_states"] = rng.standard_normal((batch, L, cfg.model.context_dim)).astype(np.float32)
        out["mask"] = np.ones((batch, L), bool)
    if cfg.model.edge.enabled:
        out["edges"] = (rng.random((batch, size, size)) < EDGE_DENSITY).astype(np.float32)
    return out


def model_key(cfg) -> str:
    """The config less ``data.image_size`` and ``train.batch_size``: equal keys build the same model and state."""
    d = json.loads(cfg.to_json())
    d["data"].pop("image_size", None)
    d["train"].pop("batch_size", None)
    return json.dumps(d, sort_keys=True)


def layout_key(abstract) -> tuple:
    """The train state's layout (every leaf's path, shape, dtype): equal keys share one initialisation."""
    import jax

    return tuple((jax.tree_util.keystr(p), tuple(a.shape), str(a.dtype))
                 for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0])


def xla_memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"temp": int(m.temp_size_in_bytes), "argument": int(m.argument_size_in_bytes),
           "output": int(m.output_size_in_bytes), "alias": int(getattr(m, "alias_size_in_bytes", 0) or 0)}
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


class Point:
    """One (side, batch): the config, its state (own copy, donated), batch, RNG and compiled step."""

    def __init__(self, config_spec: str, overrides, size: int, batch: int, cache: dict, fast_compile: bool = False):
        import jax

        from raphael_jax.diffusion.schedule import NoiseSchedule
        from raphael_jax.parallel.mesh import describe, mesh_from_config
        from raphael_jax.parallel.rules import ShardingPlan
        from raphael_jax.parallel.sharding import global_batch, tree_shardings
        from raphael_jax.train.state import abstract_train_state, make_optimizer, sharded_init
        from raphael_jax.train.step import jit_train_step, make_train_step, step_rng

        self.size, self.batch, self.label = size, batch, f"{size}px x {batch}"
        cfg = self.cfg = point_config(config_spec, overrides, size, batch)
        tok = world_tokenizer(cfg)
        eos_id = tok.eos_id if tok is not None else 1
        tx = make_optimizer(cfg)
        sched = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        plan = ShardingPlan.from_config(cfg, mesh_from_config(cfg))
        self.mesh = describe(plan.mesh)
        # The model and its train state are built from the config less the data and batch size (the model
        # reads config.model and config.text: raphael_jax/models/raphael.py), so points differing only in
        # those share the (slow) abstract trace; the shardings are laid out on each point's own mesh.
        mkey = model_key(cfg)
        if mkey not in cache.setdefault("abstract", {}):
            t0 = time.time()
            graphdef, abstract, _, init = abstract_train_state(cfg, tx, plan)
            cache["abstract"][mkey] = (graphdef, abstract, init)
            log(f"{self.label}: model traced (abstract train state) in {time.time() - t0:.1f} s")
        graphdef, abstract, init = cache["abstract"][mkey]
        shardings = tree_shardings(abstract, plan)
        key = layout_key(abstract)
        states = cache.setdefault("state", {})
        self.initialised = key not in states
        if self.initialised:  # jit(init) as the trainer does; kept on the host, copied to each point
            t0 = time.time()
            log(f"{self.label}: initialising the train state (jitted init; slow on CPU)")
            states[key] = jax.device_get(sharded_init(cfg, init, shardings, plan))
            log(f"{self.label}: initialised in {time.time() - t0:.1f} s")
        # a private copy per point: the step donates its state (and XLA:CPU may alias numpy memory)
        self.state = jax.device_put(jax.tree.map(np.array, states[key]), shardings)
        self.n_params = int(sum(math.prod(a.shape) for a in jax.tree.leaves(abstract["params"])))
        self.batch_arrays = global_batch(plan, synthetic_batch(cfg, tok, size, batch, cfg.seed))
        self.rng = step_rng(self.state)
        step = jit_train_step(make_train_step(graphdef, cfg, tx, sched, eos_id), plan, shardings, batch)
        self.lowered = step.lower(self.state, self.batch_arrays, self.rng)
        self.fast_compile = fast_compile and jax.default_backend() == "cpu"
        self.compiled, self.compile_s, self.memory, self.flops = None, float("nan"), {}, float("nan")
        self.times: list[float] = []
        self._jax = jax

    def compile(self) -> Point:
        """XLA compilation (releases the GIL: points compile in parallel threads)."""
        t0 = time.time()
        self.compiled = self.lowered.compile(compiler_options=FAST_COMPILE if self.fast_compile else None)
        self.compile_s = time.time() - t0
        self.memory = xla_memory(self.compiled)
        self.flops = xla_flops(self.compiled)
        self.lowered = None
        return self

    def __call__(self) -> None:
        self.state, metrics = self.compiled(self.state, self.batch_arrays, self.rng)
        self._jax.block_until_ready((self.state, metrics))

    def check_finite(self) -> None:
        self.state, metrics = self.compiled(self.state, self.batch_arrays, self.rng)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise SystemExit(f"{self.label}: train step loss is {loss}")


def attention_in_effect(cfg) -> str:
    from raphael_jax.models.attention_kernels import BLOCKED_MIN_MAP, resolve_impl

    dtype = cfg.model.dtype
    self_impl = resolve_impl(cfg.model.attention, dtype, need_map=False)
    if self_impl != resolve_impl(cfg.model.attention, dtype, need_map=False, map_size=1):
        self_impl += f" from {BLOCKED_MIN_MAP} logits per (batch, head) map, xla below"
    cross_impl = resolve_impl(cfg.model.attention, dtype, need_map=True)
    chunk = f", chunk {cfg.model.attention_chunk}" if "chunked" in (self_impl, cross_impl) else ""
    return (f"model.attention={cfg.model.attention} (runs: self-attention {self_impl}, "
            f"cross-attention {cross_impl}{chunk})")


# --- peak RSS of a child process per point ------------------------------------------------------

def _status_bytes(field: str) -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return float(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: ``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so the step's buffers fault in new
    pages instead of reusing the compiler's freed ones unseen by the RSS; no-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


NO_RSS = {"peak_all": float("nan"), "before_step": float("nan"), "peak_step": float("nan"),
          "step_increase": float("nan")}


def _child(config_spec: str, overrides, size: int, batch: int, fast_compile: bool, t_start: float, queue) -> None:
    set_clock(t_start, "child process: ")  # the parent's clock in the progress lines
    try:
        p = Point(config_spec, overrides, size, batch, {}, fast_compile).compile()
        p()  # the first call after compilation
        peak_setup = _status_bytes("VmHWM")
        _trim_heap()
        before = _status_bytes("VmRSS")
        reset = _reset_peak_rss()
        p()
        p()
        peak_step = _status_bytes("VmHWM") if reset else float("nan")
        queue.put({"peak_all": max(peak_setup, peak_step) if reset else peak_setup, "before_step": before,
                   "peak_step": peak_step, "step_increase": peak_step - before})
    except BaseException as e:  # report, never hang the parent
        queue.put(f"{type(e).__name__}: {e}")


def child_rss(config_spec: str, overrides, size: int, batch: int, fast_compile: bool = False) -> dict:
    """RSS figures (bytes) of a spawned child running the point's step; nan on failure."""
    res = run_child(_child, (config_spec, list(overrides), size, batch, fast_compile, start_time()))
    if isinstance(res, str):
        log(f"{size}px x {batch}: child failed: {res}")
        return dict(NO_RSS)
    return res


# --- report --------------------------------------------------------------------------------------

def _mib(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x / 2**20:.1f}"


def _fit_or_none(xs, ys):
    try:
        return fit_power_law(xs, ys)
    except ValueError:
        return None


def curve_fits(rows: list[dict], x_key: str) -> dict:
    """Exponents of every measured quantity of one curve (None where it cannot be fitted)."""
    xs = [r[x_key] for r in rows]
    quantities = {
        "time": [r["time_median_s"] for r in rows],
        "flops": [r["flops"] for r in rows],
        "xla_temp": [r["xla"].get("temp", float("nan")) for r in rows],
        "xla_total": [r["xla"].get("total", float("nan")) for r in rows],
        "rss_peak_step": [r["rss"]["peak_step"] for r in rows],
        "rss_step_increase": [r["rss"]["step_increase"] for r in rows],
        "rss_peak_all": [r["rss"]["peak_all"] for r in rows],
    }
    return {k: _fit_or_none(xs, v) for k, v in quantities.items()}


def _exp(fit) -> str:
    return "-" if fit is None else f"{fit['exponent']:.2f} (R² {fit['r2']:.3f})"


def write_report(path: str, res: dict) -> None:
    m = res["machine"]
    a = res["args"]
    lines = [
        "# Train-step time and memory against image size and batch (tiny model, CPU)",
        "",
        f"Generated by `python bench/scaling.py {res['command']}` on {res['date']} ({res['wall_s']:.0f} s).",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores visible; {m['devices']}; load average before the timed rounds "
        f"(1 / 5 / 15 min): {' / '.join(res['load_before'])}",
        f"- jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, numpy {m['numpy']}, python {m['python']}",
        f"- also running: {a['note']}" if a["note"] else "- also running: not stated (pass --note)",
        f"- config: `{res['config']}`" + (f" with {' '.join(f'`--set {s}`' for s in a['set'])}" if a["set"] else "")
        + f"; {res['params'] / 1e6:.3f}M parameters; mesh {res['mesh']}",
        f"- attention: `{res['attention']}`",
        f"- train step: the project's `make_train_step` jitted by `jit_train_step` (state donated); synthetic "
        f"batches (shapes-world captions, noise images, random edges); parameters initialised "
        f"{res['inits']} time(s) for {len(res['points'])} points",
        f"- time: median of {a['rounds']} round-robin rounds (one call of every point per round) after "
        f"{a['warmup']} warm-up calls of each"
        + ("; **--fast-compile: the step compiled without LLVM's expensive passes, so its times are NOT those "
           "of training**" if a["fast_compile"] else ""),
        "- memory: XLA `memory_analysis()` of the compiled step (total = temp + argument + output - alias)"
        + ("; RSS of a spawned child per point: its peak over everything (imports, init, compilation, step), "
           "its RSS just before the step (freed heap trimmed), its peak while the step runs and the increase"
           if a["rss"] else "; no child-process RSS (pass --rss)"),
        "",
        "| side px | batch | median ms / step | IQR ms | ms / image | GFLOP / step | XLA temp MiB | argument MiB | "
        "output MiB | alias MiB | XLA total MiB | child peak RSS MiB | RSS before step MiB | peak RSS in step MiB | "
        f"RSS increase in step MiB | compile s ({a['compile_workers']} at once) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["points"]:
        x, ts = r["xla"], r["times_s"]
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['time_median_s'] * 1e3:.1f} | "
            f"{np.percentile(ts, 25) * 1e3:.1f}-{np.percentile(ts, 75) * 1e3:.1f} | "
            f"{r['time_median_s'] * 1e3 / r['batch']:.2f} | {r['flops'] / 1e9:.3f} | {_mib(x.get('temp'))} | "
            f"{_mib(x.get('argument'))} | {_mib(x.get('output'))} | {_mib(x.get('alias'))} | {_mib(x.get('total'))} | "
            f"{_mib(r['rss']['peak_all'])} | {_mib(r['rss']['before_step'])} | {_mib(r['rss']['peak_step'])} | "
            f"{_mib(r['rss']['step_increase'])} | {r['compile_s']:.1f} |")
    f_s, f_b = res["fits"]["size"], res["fits"]["batch"]
    lines += [
        "",
        "Fitted exponents (least squares on log-log; R² of that fit), y ∝ x^exponent:",
        "",
        "| curve | points | time | GFLOP | XLA temp | XLA total | peak RSS in step | RSS increase in step | "
        "child peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| side (batch {a['fixed_batch']}) | {', '.join(str(s) for s in res['sizes'])} px | a = {_exp(f_s['time'])} | "
        f"{_exp(f_s['flops'])} | b = {_exp(f_s['xla_temp'])} | b = {_exp(f_s['xla_total'])} | "
        f"{_exp(f_s['rss_peak_step'])} | {_exp(f_s['rss_step_increase'])} | {_exp(f_s['rss_peak_all'])} |",
        f"| batch (side {a['fixed_size']} px) | {', '.join(str(b) for b in res['batches'])} | "
        f"c = {_exp(f_b['time'])} | "
        f"{_exp(f_b['flops'])} | d = {_exp(f_b['xla_temp'])} | d = {_exp(f_b['xla_total'])} | "
        f"{_exp(f_b['rss_peak_step'])} | {_exp(f_b['rss_step_increase'])} | {_exp(f_b['rss_peak_all'])} |",
        "",
        "Exponents are against the image side: work proportional to the pixel count gives 2 (self-attention "
        "over all positions, 4). XLA temp is the step's activations and scratch; argument and output are "
        "dominated by the train state (parameters, EMA, two AdamW moments), which does not grow with the "
        "image, so the total's exponents are damped by that constant part. The child's peak RSS also holds the "
        "interpreter, the libraries and XLA's compiler; for the RSS in the "
        "step, the child trims its freed heap and resets its high-water mark (`/proc/self/clear_refs`) once the "
        "step is compiled and has run once, so the increase is what the step's buffers add to the resident "
        "state, executables and libraries. Timings on a shared CPU are noisy; FLOPs and XLA sizes are exact.",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"),
                   help="config file (optionally :variants), default configs/tiny.py")
    p.add_argument("--sizes", default="32,64,128", help="image sides of the size curve")
    p.add_argument("--fixed-batch", type=int, default=8, help="batch of the size curve")
    p.add_argument("--batches", default="4,8,16,32", help="batches of the batch curve")
    p.add_argument("--fixed-size", type=int, default=32, help="image side of the batch curve")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (one call of every point per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each point first")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every point, e.g. model.attention=chunked")
    p.add_argument("--rss", action="store_true",
                   help="also the peak RSS of a spawned child per point (each initialises and compiles again)")
    p.add_argument("--compile-workers", type=int, default=os.cpu_count() or 1,
                   help="train steps compiled at once (threads; default: one per core)")
    p.add_argument("--fast-compile", action="store_true",
                   help="compile the step without LLVM's expensive passes (smoke tests: quicker, slower steps)")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scaling.md"),
                   help="markdown report; the JSON goes beside it with the suffix .json")
    args = p.parse_args(argv)
    sizes = parse_ints(args.sizes, "--sizes")
    batches = parse_ints(args.batches, "--batches")
    if args.fixed_batch < 1 or args.fixed_size < 1 or args.rounds < 1 or args.warmup < 0:
        raise SystemExit("--fixed-batch, --fixed-size and --rounds must be >= 1, --warmup >= 0")
    for s in args.set:
        if s.split("=", 1)[0].strip() in ("data.image_size", "train.batch_size"):
            raise SystemExit(f"--set {s}: the image side and batch are set per point (--sizes, --batches, ...)")
    config_spec = args.config
    points = points_of(sizes, args.fixed_batch, batches, args.fixed_size)

    import flax
    import jax
    import jaxlib

    log(f"{len(points)} points (side px x batch): {', '.join(f'{s}x{b}' for s, b in points)}; "
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices)")
    cache: dict = {}
    built: list[Point] = []
    for size, batch in points:
        log(f"{size}px x {batch}: building the config, the state and the lowered train step")
        pt = Point(config_spec, args.set, size, batch, cache, args.fast_compile)
        if not built:
            log(f"{attention_in_effect(pt.cfg)}; mesh {pt.mesh}")
        built.append(pt)
    inits = len(cache["state"])
    workers = max(1, min(args.compile_workers, len(built)))
    log(f"compiling {len(built)} train steps, {workers} at a time" + (" (--fast-compile)" if args.fast_compile else ""))
    with ThreadPoolExecutor(workers) as pool:
        for pt in pool.map(Point.compile, built):
            log(f"{pt.label}: compiled in {pt.compile_s:.1f} s; {pt.flops / 1e9:.3f} GFLOP; XLA temp "
                f"{_mib(pt.memory.get('temp'))} / argument {_mib(pt.memory.get('argument'))} / output "
                f"{_mib(pt.memory.get('output'))} / alias {_mib(pt.memory.get('alias'))} MiB")
    for pt in built:
        pt.check_finite()
    log("parameters " + ("identical in layout at every point: initialised once, copied to each"
                         if inits == 1 else f"differ between points: initialised {inits} times"))

    log(f"warm-up: {args.warmup} call(s) of each point")
    for _ in range(args.warmup):
        for pt in built:
            pt()
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    for r in range(args.rounds):
        for pt in built:
            t0 = time.perf_counter()
            pt()
            pt.times.append(time.perf_counter() - t0)
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{pt.label} {pt.times[-1] * 1e3:.0f} ms" for pt in built))

    rows = []
    for pt in built:
        rows.append({"size": pt.size, "batch": pt.batch, "times_s": pt.times,
                     "time_median_s": statistics.median(pt.times), "flops": pt.flops, "xla": pt.memory,
                     "compile_s": pt.compile_s,
                     "rss": dict(NO_RSS)})
    cfg0, mesh0, n_params = built[0].cfg, built[0].mesh, built[0].n_params
    del built, cache
    jax.clear_caches()
    if args.rss:  # children run `workers` at a time: each its own process, so RSS does not mix
        log(f"peak RSS: a child process per point builds, compiles and runs its step, {workers} at a time")

        def measure(row):
            row["rss"] = child_rss(config_spec, args.set, row["size"], row["batch"], args.fast_compile)
            r = row["rss"]
            log(f"{row['size']}px x {row['batch']}: child peak {_mib(r['peak_all'])} MiB; before the step "
                f"{_mib(r['before_step'])} MiB, peak in the step {_mib(r['peak_step'])} MiB "
                f"(+{_mib(r['step_increase'])})")

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(measure, rows))

    by = {(r["size"], r["batch"]): r for r in rows}
    size_rows = [by[(s, args.fixed_batch)] for s in dict.fromkeys(sizes)]
    batch_rows = [by[(args.fixed_size, b)] for b in dict.fromkeys(batches)]
    fits = {"size": curve_fits(size_rows, "size"), "batch": curve_fits(batch_rows, "batch")}
    for name, f in fits.items():
        log(f"{name} curve exponents: time {_exp(f['time'])}, XLA temp {_exp(f['xla_temp'])}, "
            f"XLA total {_exp(f['xla_total'])}, GFLOP {_exp(f['flops'])}")

    dev = jax.devices()[0]
    res = {
        "command": shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": elapsed(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "devices": f"{dev.platform} / {dev.device_kind} x {jax.device_count()}",
                    "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                    "numpy": np.__version__, "python": platform.python_version()},
        "load_before": load,
        "args": {"sizes": sizes, "fixed_batch": args.fixed_batch, "batches": batches,
                 "fixed_size": args.fixed_size, "rounds": args.rounds, "warmup": args.warmup, "set": args.set,
                 "rss": args.rss, "fast_compile": args.fast_compile, "compile_workers": workers,
                 "note": args.note},
        "config": os.path.relpath(config_spec.partition(":")[0], ROOT)
        + (":" + config_spec.partition(":")[2] if config_spec.partition(":")[2] else ""),
        "attention": attention_in_effect(cfg0), "model_attention": cfg0.model.attention,
        "mesh": mesh0, "params": n_params, "inits": inits,
        "sizes": sizes, "batches": batches, "points": rows, "fits": fits,
    }
    write_report(args.out, res)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(_json_safe(res), f, indent=1)
    log(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
