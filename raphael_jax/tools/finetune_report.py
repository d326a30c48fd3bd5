"""Markdown tables of the fine-tuning measurements (launch/finetune_ring.sh, launch/tiny_control.sh).

    raphael-eval report subject BASE RUN [RUN ...]   # raphael-eval subject results
    raphael-eval report control RUN                   # raphael-eval control results

Reads each run's newest ``eval/subject_*`` / ``eval/control_*`` JSON of one seed (``--seed``, default 1234, the
test seed ``eval.seed``; the tuning used 99), its
``metrics.jsonl`` (steps/s) and, for LoRA runs, the size of ``lora.safetensors`` against the base's weights.
"""
from __future__ import annotations

import glob
import json
import os


def _newest(pattern: str) -> dict:
    files = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no result matches {pattern}")
    with open(files[-1]) as f:
        return json.load(f)


def _rate(workdir: str) -> float | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    rates = [json.loads(line).get("steps_per_sec") for line in open(path) if line.strip()]
    rates = [r for r in rates if r]
    return rates[-1] if rates else None


def _ci(p: float, n: int) -> str:
    """Half-width of the normal-approximation 95% interval of a proportion ``p`` over ``n`` trials."""
    return f"±{1.96 * (p * (1 - p) / max(n, 1)) ** 0.5:.3f}"


def _base_bytes(base: str) -> int:
    import jax

    from raphael_jax.train.checkpoint import load_run
    return sum(x.size * 4 for x in jax.tree.leaves(load_run(base, weights="ema").ema_params))


def subject_table(base: str, runs: list[str], seed: int = 1234) -> str:
    rows = ["| run | trained | size | steps/s | ring kind, unseen ctx (big / small) | colour, place (unseen) "
            "| colour / place collapse | retention colour / place / kind / all |",
            "|---|---|---|---|---|---|---|---|"]
    base_bytes = _base_bytes(base)
    for wd in [base] + runs:
        pat = os.path.join(wd, "eval", f"subject_step*_seed{seed}.json")
        res = _newest(pat)["results"]
        u, r = res["unseen"], res["retention"]
        lora = os.path.join(wd, "lora.safetensors")
        if wd == base:
            what, size = "base (not fine-tuned)", "-"
        elif os.path.isfile(lora):
            from raphael_jax.convert.lora_file import load_adapters
            meta = load_adapters(lora)[1]
            n = os.path.getsize(lora)
            what = f"LoRA r{meta['rank']} ({', '.join(meta['targets'])})"
            size = f"{n / 1024:.0f} KiB ({100 * n / base_bytes:.1f}% of base)"
        else:
            what, size = "full fine-tuning", f"{base_bytes / 1024:.0f} KiB (100%)"
        rate = _rate(wd) if wd != base else None
        big, small = u.get("kind_seen_size", float("nan")), u.get("kind_unseen_size", float("nan"))
        rows.append(f"| {os.path.basename(wd.rstrip('/'))} | {what} | {size} | "
                    f"{'-' if rate is None else f'{rate:.2f}'} | {u['kind']:.3f} {_ci(u['kind'], u['num_objects'])} "
                    f"({big:.3f} / {small:.3f}) | "
                    f"{u['colour']:.3f}, {u['place']:.3f} | "
                    f"{u['colour_collapse']:.3f} / {u['place_collapse']:.3f} | {r['colour']:.3f} / {r['place']:.3f} / "
                    f"{r['kind']:.3f} {_ci(r['kind'], r['num_objects'])} / {r['all']:.3f} |")
    return "\n".join(rows)


def control_table(run: str, seed: int = 1234) -> str:
    res = _newest(os.path.join(run, "eval", f"control_step*_seed{seed}_s*.json"))
    rows = [f"step {res['step']}, control scale {res['scale']}, seed {res['seed']}", "",
            "| part | place | colour | kind | size | all | layout (any colour) | exact layout | prompts (objects) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for k, v in res["results"].items():
        rows.append(f"| {k} | {v['place']:.3f} | {v['colour']:.3f} | {v['kind']:.3f} | {v['size']:.3f} | "
                    f"{v['all']:.3f} | {v.get('layout', float('nan')):.3f} | {v.get('layout_exact', float('nan')):.3f} "
                    f"| {v['num_prompts']} ({v['num_objects']}) |")
    return "\n".join(rows)
