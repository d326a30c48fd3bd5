"""Train-step time of LoRA (ranks 1, 4, 16) and ControlNet against full fine-tuning, and the trained sizes.

    python bench/finetune_step.py --note "nothing else ran"      # tiny config, the tiny_ring LoRA targets

The step is the trainer's own (bench/moe_train.py's ``TrainStep``: ``abstract_train_state`` + ``sharded_init``,
``jit_train_step(make_train_step(...))``, state donated); LoRA and ControlNet steps also take the frozen
base weights (random here: the time does not depend on their values). Calls are interleaved round-robin
after warm-up; the report gives medians, IQRs, the trained parameter count against the base's and the
ratio to full fine-tuning. Writes ``bench/results/finetune_step.md``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, cpu_model, elapsed, log  # noqa: E402
from moe_train import TrainStep, _iqr, _med, make_batch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
    p.add_argument("--ranks", default="1,4,16")
    p.add_argument("--targets", default="('attention', 'experts', 'convs')",
                   help="lora.targets (configs/tiny_ring.py's)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "finetune_step.md"))
    args = p.parse_args(argv)
    import jax
    from flax import nnx

    from raphael_jax.config import load_config
    from raphael_jax.data.shapes.tokenizer import Tokenizer
    from raphael_jax.models.raphael import build_model

    full_cfg = load_config(args.config, args.set)
    tok = Tokenizer.train_on_world(seed=full_cfg.data.seed)
    batch = make_batch(full_cfg, tok)
    base = nnx.split(build_model(full_cfg, full_cfg.seed), nnx.Param)[1]
    n_base = sum(x.size for x in jax.tree.leaves(base))
    variants = {"full fine-tuning": (full_cfg, None)}
    for r in [int(x) for x in args.ranks.split(",") if x.strip()]:
        lora = [*args.set, f"lora.rank={r}", f"lora.targets={args.targets}", "train.init_from=unused"]
        variants[f"LoRA rank {r}"] = (load_config(args.config, lora), base)
    control = [*args.set, "control.enabled=True", "train.init_from=unused"]
    variants["ControlNet"] = (load_config(args.config, control), base)
    steps = {}
    for name, (cfg, b) in variants.items():
        log(f"building {name}")
        steps[name] = TrainStep(cfg, tok, batch, base=b)
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    for i in range(args.rounds):
        for s in steps.values():
            s.times.append(s())
        log(f"round {i + 1}/{args.rounds}")
    ref = _med(steps["full fine-tuning"].times)
    cmd = " ".join(["python bench/finetune_step.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# Fine-tuning train step ({os.path.relpath(args.config, ROOT)}, batch {full_cfg.train.batch_size})", "",
             f"Machine: {cpu_model()}, CPU. {args.note}".strip(), "", f"`{cmd}`",
             "", f"LoRA targets {args.targets}; {args.rounds} interleaved rounds after {args.warmup} warm-up.",
             "",
             "| variant | trained parameters | of the base | median ms | IQR ms | time / full |",
             "|---|---|---|---|---|---|"]
    for name, s in steps.items():
        lines.append(f"| {name} | {s.params:,} | {100 * s.params / n_base:.1f}% | {_med(s.times):.1f} | "
                     f"{_iqr(s.times)} | {_med(s.times) / ref:.3f} |")
    lines += ["", f"Base: {n_base:,} parameters. Total {elapsed():.0f} s."]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
