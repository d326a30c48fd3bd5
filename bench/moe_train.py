"""Train-step cost of the space-MoE against its number of experts and the dense baselines.

    python bench/moe_train.py --note "nothing else ran"           # tiny config: experts=0, dense, 2/4/6/8 experts
    python bench/moe_train.py --experts 2,4 --baselines dense --rounds 1 --warmup 1 \\
        --set model.channels="(8, 16)" ... --out /tmp/moe_train.md             # smoke (tests/bench/test_moe_train.py)

Times the project's own train step, built as the trainer builds it (``raphael_jax.train.loop``:
``abstract_train_state`` + ``sharded_init`` on the config's mesh, ``jit_train_step(make_train_step(...))``
with the state donated): timestep and noise draw, ``q_sample``, text encoder, U-Net with router noise,
denoising + edge losses, backward, clipping, AdamW, EMA. Every variant gets the same batch (one
batch of the config's shapes-world stream, rendered here without the data loader's threads), the
same seed and the same config apart from its variant switch (``configs/common.py``):

- baselines (``--baselines``, ``;``-separated variant strings): ``experts=0`` (the space-MoE replaced by
  the ablation's plain FFN of ``model.ffn_mult`` x width, time-MoE kept: the paper's "no space
  experts" and bench/moe_inference.py's 0-expert row) and ``dense`` (both MoEs replaced by one FFN of
  the RAPHAEL block's active width at the config's expert count, ``dense_ffn_mult``: the FLOP-matched
  dense model). ``experts=6,dense`` would be the dense model matched to 6 experts.
- ``experts=K`` for every K of ``--experts``.

Each variant is built and compiled once; calls are interleaved round-robin after warm-up (one call of
each per round) so load drifts hit them alike; the report gives medians, IQRs, XLA cost-analysis
FLOPs of the compiled step and ratios to each baseline. Writes ``bench/results/moe_train.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/benchlib.py
from benchlib import FAST_COMPILE, ROOT, cpu_model, elapsed, log  # noqa: E402

PAPER_EXPERTS, PAPER_INFERENCE_COST = 6, 0.24  # RAPHAEL (Xue et al. 2023) Sec. 4 / Fig. 6c: +24% inference at 6


def variant_config(config_spec: str, variant: str, overrides):
    """``configs/x.py[:base]`` with ``variant`` appended to its variant list."""
    from raphael_jax.config import load_config

    path, _, arg = config_spec.partition(":")
    return load_config(f"{path}:{','.join(a for a in (arg, variant) if a)}", list(overrides))


def make_batch(cfg, tokenizer) -> dict:
    """One host batch of the config's training stream (``raphael_jax.train.loop.make_data_iterator``'s examples
    and preprocessing), built without the loader's prefetch threads (they would run during the timing)."""
    from raphael_jax.data.shapes.pipeline import Preprocess
    from raphael_jax.data.shapes.world import example
    from raphael_jax.train.loop import object_range

    if cfg.data.kind != "shapes":
        raise SystemExit(f"bench/moe_train.py times shapes-world configs; this one has data.kind={cfg.data.kind!r}")
    lo, hi, w = object_range(cfg)
    prep = Preprocess(tokenizer, cfg.text.max_len, cfg.model.edge.source if cfg.model.edge.enabled else None)
    rows = [prep.map(example(cfg.data.seed, i, cfg.data.image_size, lo, hi, w if hi > lo else None))
            for i in range(cfg.train.batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class TrainStep:
    """One variant: its state (born sharded on the config's mesh) and its compiled, donating train step."""

    def __init__(self, cfg, tokenizer, host_batch: dict, fast_compile: bool = False, base=None):
        """``base``: the frozen model weights of a LoRA / ControlNet config (bench/finetune_step.py)."""
        import jax

        from raphael_jax.diffusion.schedule import NoiseSchedule
        from raphael_jax.parallel.mesh import describe, mesh_from_config
        from raphael_jax.parallel.rules import ShardingPlan
        from raphael_jax.parallel.sharding import global_batch
        from raphael_jax.train.state import abstract_train_state, make_optimizer, sharded_init
        from raphael_jax.train.step import jit_train_step, make_train_step

        t0 = time.time()
        tx = make_optimizer(cfg)
        sched = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        plan = ShardingPlan.from_config(cfg, mesh_from_config(cfg))
        graphdef, _, shardings, init = abstract_train_state(cfg, tx, plan)
        self.state = sharded_init(cfg, init, shardings, plan)
        self.init_s = time.time() - t0
        self.params = int(sum(x.size for x in jax.tree.leaves(self.state["params"])))
        self.mesh = describe(plan.mesh)
        batch = {k: v for k, v in host_batch.items() if k != "edges" or cfg.model.edge.enabled}
        self.batch = global_batch(plan, batch)
        self.rng = jax.random.fold_in(jax.random.key(cfg.seed), 0)
        base_shardings = None
        self.extra = ()
        if base is not None:
            from raphael_jax.parallel.sharding import tree_shardings
            base_shardings = tree_shardings(base, plan)
            self.extra = (jax.device_put(base, base_shardings),)
        step = jit_train_step(make_train_step(graphdef, cfg, tx, sched, tokenizer.eos_id), plan, shardings,
                              cfg.train.batch_size, base_shardings)
        t0 = time.time()
        cpu = jax.default_backend() == "cpu"
        self.compiled = step.lower(self.state, self.batch, self.rng, *self.extra).compile(
            compiler_options=FAST_COMPILE if fast_compile and cpu else None)
        self.compile_s = time.time() - t0
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        self.flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
        self.times: list[float] = []
        self._jax = jax

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch, self.rng, *self.extra)
        self._jax.block_until_ready((self.state, metrics))
        dt = time.perf_counter() - t0
        if not np.isfinite(float(metrics["loss"])):
            raise SystemExit("the train step's loss is not finite")
        return dt


def _med(ts) -> float:
    return statistics.median(ts) * 1e3


def _iqr(ts) -> str:
    return f"{np.percentile(ts, 25) * 1e3:.1f}-{np.percentile(ts, 75) * 1e3:.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b and np.isfinite(a) and np.isfinite(b) else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
    p.add_argument("--experts", default="2,4,6,8", help="space-expert counts to time")
    p.add_argument("--baselines", default="experts=0;dense",
                   help="';'-separated variant strings of configs/common.py to compare against")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (one call of each variant per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all")
    p.add_argument("--fast-compile", action="store_true",
                   help="compile the steps without LLVM's expensive passes (smoke tests only: slower programs)")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "moe_train.md"))
    args = p.parse_args(argv)
    experts = [int(k) for k in args.experts.split(",") if k.strip()]
    baselines = [b.strip() for b in args.baselines.split(";") if b.strip()]
    if any(k < 1 for k in experts):
        raise SystemExit("--experts: counts must be >= 1 (experts=0 is a baseline: --baselines experts=0)")
    if args.rounds < 1 or args.warmup < 0:
        raise SystemExit("--rounds must be >= 1 and --warmup >= 0")
    variants = baselines + [f"experts={k}" for k in experts]
    if len(set(variants)) != len(variants):
        raise SystemExit(f"variants repeat: {variants}")

    import jax

    from raphael_jax.data.shapes.tokenizer import Tokenizer

    cfgs = {v: variant_config(args.config, v, args.set) for v in variants}
    first = cfgs[variants[0]]
    tokenizer = Tokenizer.train_on_world(seed=first.data.seed)
    if tokenizer.vocab_size > first.text.vocab_size:
        raise SystemExit(f"the world tokenizer has {tokenizer.vocab_size} pieces, text.vocab_size is "
                         f"{first.text.vocab_size}")
    host_batch = make_batch(first, tokenizer)
    runs = {}
    for v in variants:
        cfg = cfgs[v]
        if (cfg.train.batch_size, cfg.data.image_size, cfg.text.max_len) != \
                (first.train.batch_size, first.data.image_size, first.text.max_len):
            raise SystemExit(f"variant {v} changes the batch shape; variants must differ in the model only")
        r = runs[v] = TrainStep(cfg, tokenizer, host_batch, args.fast_compile)
        log(f"{v}: {r.params / 1e6:.3f}M params, {r.flops / 1e9:.3f} GFLOP/step (init {r.init_s:.0f} s, "
            f"compile {r.compile_s:.0f} s, mesh {r.mesh})")
    for _ in range(args.warmup):
        for r in runs.values():
            r()
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    for i in range(args.rounds):
        for r in runs.values():
            r.times.append(r())
        if (i + 1) % max(1, args.rounds // 5) == 0 or i + 1 == args.rounds:
            last = ", ".join(f"{v} {r.times[-1] * 1e3:.0f} ms" for v, r in runs.items())
            log(f"round {i + 1}/{args.rounds}: {last}")

    med = {v: _med(r.times) for v, r in runs.items()}
    dev = jax.devices()[0]
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    cfg0 = cfgs[f"experts={experts[-1]}"] if experts else first
    sm, tm = cfg0.model.space_moe, cfg0.model.time_moe
    lines = [
        "# Train-step cost against the number of space experts",
        "",
        f"Generated by `python bench/moe_train.py {cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({elapsed():.0f} s).",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores visible; jax {jax.__version__}, device {dev.platform} / "
        f"{dev.device_kind} ({jax.device_count()} devices), mesh {runs[variants[0]].mesh}",
        f"- load average before the timed rounds (1 / 5 / 15 min): {' / '.join(load)}",
        f"- also running: {args.note}" if args.note else "- also running: not stated (pass --note)",
        f"- config: `{os.path.relpath(args.config, ROOT)}` {' '.join(args.set)}; batch {first.train.batch_size} of "
        f"{first.data.image_size}x{first.data.image_size} shapes-world images with their captions, "
        f"{first.text.max_len} text positions; space experts {sm.hidden_mult} x dim wide, time-MoE "
        f"{tm.num_experts} experts {tm.hidden_mult} x dim; `experts=0`: plain FFN of {first.model.ffn_mult} x dim "
        "in place of the space-MoE; `dense`: one FFN of `dense_ffn_mult` x dim in place of both MoEs",
        f"- the project's jitted train step (`raphael_jax.train.step`, as `raphael_jax.train.loop` builds it, state "
        f"donated); median of {args.rounds} round-robin rounds after {args.warmup} warm-up calls of each"
        + ("; **compiled with --fast-compile (no expensive LLVM passes): a smoke run, not a measurement**"
           if args.fast_compile else ""),
        "",
        "| variant | params | GFLOP / step | median ms / step | IQR ms | "
        + " | ".join(f"time vs {b} | FLOPs vs {b}" for b in baselines) + " |",
        "|---|---|---|---|---|" + "---|---|" * len(baselines),
    ]
    for v, r in runs.items():
        cells = [f"{_ratio(med[v], med[b])} | {_ratio(r.flops, runs[b].flops)}" for b in baselines]
        lines.append(f"| {v} | {r.params:,} | {r.flops / 1e9:.5g} | {med[v]:.1f} | {_iqr(r.times)} | "
                     + " | ".join(cells) + " |")
    paper = f"Paper (RAPHAEL, Xue et al. 2023, Sec. 4 / Fig. 6c): {PAPER_EXPERTS} space experts cost " \
            f"+{PAPER_INFERENCE_COST * 100:.0f}% inference time against none (3B model, GPU)."
    ours = []
    k6 = f"experts={PAPER_EXPERTS}"
    for b in baselines:
        if k6 in runs:
            ours.append(f"{k6} vs {b}: **{(med[k6] / med[b] - 1) * 100:+.1f}%** train-step time, "
                        f"{(runs[k6].flops / runs[b].flops - 1) * 100:+.1f}% FLOPs")
    lines += ["", paper + (" Ours (train step, not inference): " + "; ".join(ours) + "." if ours else
                           f" (no {k6} row in this run)"),
              "",
              "Our space-MoE runs every expert over every image position (the exact efficient form, "
              "`raphael_jax/models/moe.py`), so its FLOPs grow linearly with the number of experts whatever "
              "the routing; `bench/moe_coverage.py` measures how many of those (position, expert) pairs a "
              "dispatch would need. FLOPs: XLA's cost analysis of the compiled step (every op, optimizer and "
              "EMA included). Timings on a CPU shared with other work are noisy; the FLOP ratios are exact."]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    for v in runs:
        print(f"{v}: median {med[v]:.1f} ms, {runs[v].flops / 1e9:.3f} GFLOP")
    if ours:
        print(paper, "Ours:", "; ".join(ours))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
