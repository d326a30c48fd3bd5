"""The paper's Fig. 6 ablations on the shapes world: train every variant at equal budget, evaluate, report.

    raphael-ablate --root runs/ablate --config configs/tiny.py --variants fig6b,dense,experts \\
        --steps 2200 --docs docs/ablations

Every variant (``configs/common.py`` switches: ``full``, ``no_space_moe``,
``no_time_moe``, ``no_edge``, ``dense``, ``experts=N``, ``alpha=X``, ``tc=N``; ``+`` combines
switches, e.g. ``no_edge+experts=2``) trains in its own workdir ``<root>/<variant>`` with the same
config, seed, batch and number of steps, then is evaluated at each guidance weight (paper: 1.5, 3,
4.5, 6, 7.5, 9) with the shapes-world alignment score (``raphael_jax.evaluation.alignment``) on
1-, 2- and 3-object held-out prompts, plus the shapes Frechet distance (SFD,
``raphael_jax.evaluation.shapes_fd``) when a feature net is given (``--sfd-net``). Writes ``ablations.md``
(tables), ``ablations.json`` and plots (Fig. 6a/b/c analogues) to ``--docs``.

Interruptions are cheap: training resumes from each workdir's checkpoints
(``train_and_evaluate``), a variant already trained to ``--steps`` is skipped, and each
(variant, guidance) evaluation is cached as JSON in ``<workdir>/eval/`` and reused. Variants whose
configs come out identical (``experts=4`` is ``full`` in configs/tiny.py) share one run.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time

GROUPS: dict[str, tuple[str, ...]] = {
    "fig6b": ("full", "no_space_moe", "no_time_moe", "no_edge"),      # component ablation
    "dense": ("dense",),                                              # FLOP-matched dense FFN
    "experts": ("experts=0", "experts=2", "experts=4", "experts=6", "experts=8"),  # Fig. 6c
    "alpha": ("alpha=0.05", "alpha=0.1", "alpha=0.2", "alpha=0.4", "alpha=0.8"),  # Fig. 6a (left)
    "tc": ("tc=0", "tc=250", "tc=500", "tc=750", "tc=1000"),          # Fig. 6a (right); tc=0: no edge loss
}
GROUP_ORDER = ("fig6b", "dense", "experts", "alpha", "tc")
GUIDANCE = (1.5, 3.0, 4.5, 6.0, 7.5, 9.0)


def expand_variants(spec: str) -> list[str]:
    """Group names (``fig6b``, ``dense``, ``experts``, ``alpha``, ``tc``, ``all``) and single variants,
    comma-separated, into an ordered list without repeats."""
    out: list[str] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        names = ([v for g in GROUP_ORDER for v in GROUPS[g]] if item == "all"
                 else GROUPS.get(item, (item,)))
        for n in names:
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no variants given")
    return out


def slug(variant: str) -> str:
    return variant.replace("=", "-").replace("+", "__").replace("/", "_")


@dataclasses.dataclass
class Variant:
    name: str
    config: object
    workdir: str
    same_as: str | None = None  # an earlier variant with an identical config (shares its run)


def variant_config(config_spec: str, variant: str, overrides=()):
    """Config for ``variant`` (``+``-combined switches) on top of ``config_spec`` (``file.py[:arg]``)."""
    from raphael_jax.config import load_config

    path, _, base_arg = config_spec.partition(":")
    arg = ",".join(a for a in (base_arg, variant.replace("+", ",")) if a)
    return load_config(f"{path}:{arg}", list(overrides))


def plan(config_spec: str, variants, root: str, steps: int | None = None, seed: int | None = None,
         overrides=()) -> list[Variant]:
    """One :class:`Variant` per name; equal configs (after the switches) share the first one's workdir."""
    extra = list(overrides)
    if steps is not None:
        extra.append(f"train.num_steps={int(steps)}")
    if seed is not None:
        extra.append(f"seed={int(seed)}")
    out, seen = [], {}
    for name in variants:
        cfg = variant_config(config_spec, name, extra)
        key = cfg.to_json()
        if key in seen:
            first = seen[key]
            out.append(Variant(name, cfg, first.workdir, same_as=first.name))
        else:
            v = Variant(name, cfg, os.path.join(root, slug(name)))
            seen[key] = v
            out.append(v)
    return out


def trained_step(workdir: str) -> int:
    from raphael_jax.train.checkpoint import RunCheckpoints

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return 0
    ck = RunCheckpoints(workdir, async_save=False)
    step = ck.latest_step()
    ck.close()
    return int(step or 0)


# keys a resumed or extended run may legitimately differ in from its variant's config
_RUN_KEYS_FREE = ("train.num_steps", "train.init_from")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, val in d.items():
        if isinstance(val, dict):
            out.update(_flat(val, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = val
    return out


def check_run_config(v: Variant) -> None:
    """Refuse a workdir whose checkpoints hold a run of another config (a reused or mistyped
    ``--root``, a run symlinked in by hand): its numbers would be reported under the wrong name."""
    from raphael_jax.train.checkpoint import RunCheckpoints

    if v.same_as or not os.path.isdir(os.path.join(v.workdir, "checkpoints")):
        return
    ck = RunCheckpoints(v.workdir, async_save=False)  # one manager: the step and the config
    try:
        if not ck.latest_step():
            return
        saved = _flat(json.loads(ck.restore_config().to_json()))
    finally:
        ck.close()
    want = _flat(json.loads(v.config.to_json()))
    diff = sorted(k for k in set(saved) | set(want)
                  if k not in _RUN_KEYS_FREE and saved.get(k, "<missing>") != want.get(k, "<missing>"))
    if diff:
        shown = ", ".join(f"{k}={saved.get(k, '<missing>')!r} (want {want.get(k, '<missing>')!r})"
                          for k in diff[:4])
        raise ValueError(f"{v.workdir} holds a run of another config than variant {v.name!r}: {shown}"
                         + (f" and {len(diff) - 4} more" if len(diff) > 4 else ""))


def _init_from(v: Variant, init_root: str, variants: list[Variant]) -> str:
    """The workdir under ``init_root`` holding a finished run of ``v``'s config (curricula)."""
    names = [v.name] + [u.name for u in variants if u.workdir == v.workdir and u.name != v.name]
    for n in names:
        cand = os.path.join(init_root, slug(n))
        if trained_step(cand) > 0:
            return cand
    raise FileNotFoundError(f"--init-from-root {init_root}: no trained run for variant {v.name!r} "
                            f"(looked for {[slug(n) for n in names]})")


def train_variant(v: Variant, init_root: str | None = None, variants=()) -> str:
    """Train ``v`` up to its ``train.num_steps`` (resuming); returns 'done', 'trained' or 'shared'."""
    import jax

    from raphael_jax.train.loop import train_and_evaluate

    if v.same_as:
        return "shared"
    steps = int(v.config.train.num_steps)
    have = trained_step(v.workdir)
    if have >= steps:
        return "done"
    cfg = v.config
    if init_root:
        cfg = cfg.copy_and_resolve_references()
        cfg.unlock()
        cfg.train.init_from = _init_from(v, init_root, list(variants))
        cfg.lock()
    print(f"=== train {v.name} in {v.workdir} ({have} -> {steps} steps)", flush=True)
    train_and_evaluate(cfg, v.workdir, num_steps=steps)
    jax.clear_caches()
    return "trained"


# --------------------------------------------------------------------------------- evaluation

def load_sfd(net_path: str | None, objects=(1, 2, 3)):
    """SFD hook: ``fn(sampler, num, seed, guidance, num_steps) -> float``, or None without a feature net.

    Uses ``raphael_jax.evaluation.shapes_fd`` (optional): the Frechet distance, in the feature space
    of a small CNN trained on the world (``--sfd-net``, from ``raphael-eval sfd train``), between the
    run's samples for ``num`` held-out scenes of ``min(objects)`` to ``max(objects)`` objects and the
    world's renderings of the same scenes.
    """
    if not net_path:
        return None
    try:
        mod = importlib.import_module("raphael_jax.evaluation.shapes_fd")
    except ImportError as e:
        raise ValueError(f"--sfd-net: raphael_jax.evaluation.shapes_fd is unavailable ({e})") from None
    if not os.path.isfile(net_path):
        raise FileNotFoundError(f"--sfd-net {net_path}: no such file (train one: raphael-eval sfd train "
                                "--out weights/shapes_fd.safetensors)")
    net, _ = mod.load_feature_net(net_path)
    lo, hi = min(objects), max(objects)

    def sfd(sampler, num: int, seed: int, guidance: float, num_steps: int) -> float:
        real, captions, _ = mod.real_images(num, seed, sampler.config.data.image_size, lo, hi)
        gen = sampler.sample(captions, seed=seed, guidance=guidance, num_steps=num_steps)
        return float(mod.shapes_frechet_distance(net, gen, real))

    sfd.net_path = os.path.abspath(net_path)
    sfd.objects = f"{lo}-{hi}"
    return sfd


def _cache_path(workdir: str, step: int, guidance: float, num_prompts: int, num_steps: int, seed: int) -> str:
    return os.path.join(workdir, "eval", f"ablate_step{step}_g{guidance:g}_n{num_prompts}_ddim{num_steps}"
                        f"_seed{seed}.json")


def evaluate_variant(v: Variant, guidances, num_prompts: int, objects=(1, 2, 3), num_steps: int | None = None,
                     seed: int | None = None, sfd=None, sfd_samples: int | None = None) -> dict:
    """``{guidance: cached-or-fresh result}`` for a trained variant; each guidance cached as JSON.

    A result holds ``results`` (per object count, ``raphael_jax.data.shapes.analyzer.score``) and ``sfd``
    (``load_sfd``; None without a feature net).
    """
    from raphael_jax.evaluation.alignment import evaluate_alignment

    step = trained_step(v.workdir)
    cfg = v.config
    num_steps = int(num_steps or cfg.sample.num_steps)
    seed = int(cfg.eval.seed if seed is None else seed)
    sampler = None
    out = {}
    for g in guidances:
        path = _cache_path(v.workdir, step, g, num_prompts, num_steps, seed)
        cached = json.load(open(path)) if os.path.exists(path) else None
        need = [n for n in objects if cached is None or f"{n}_object" not in cached["results"]]
        need_sfd = sfd is not None and (cached is None or cached.get("sfd") is None
                                        or cached.get("sfd_net") != sfd.net_path
                                        or cached.get("sfd_objects", "1-3") != sfd.objects)
        if not need and not need_sfd:
            out[g] = cached
            continue
        if sampler is None:
            from raphael_jax.sampling import Sampler
            from raphael_jax.train.checkpoint import load_run
            sampler = Sampler.from_run(load_run(v.workdir))
        res = dict(cached or {"variant": v.name, "step": step, "guidance": g, "num_prompts": num_prompts,
                              "num_steps": num_steps, "seed": seed, "results": {}, "sfd": None})
        if need:
            print(f"--- eval {v.name} step {step} guidance {g}: objects {need}", flush=True)
            res["results"].update(evaluate_alignment(sampler, num_prompts=num_prompts, seed=seed,
                                                     objects=tuple(need), guidance=g, num_steps=num_steps))
        if need_sfd:
            n = sfd_samples or num_prompts * 3
            res["sfd"] = sfd(sampler, n, seed, g, num_steps)
            res["sfd_samples"] = n
            res["sfd_net"] = sfd.net_path
            res["sfd_objects"] = sfd.objects
            print(f"--- SFD {v.name} guidance {g}: {res['sfd']:.4f}", flush=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, path)  # never leave a half-written cache behind
        out[g] = res
    return out


# ------------------------------------------------------------------------------------- metrics

def headline(res: dict) -> dict:
    """Summary numbers of one (variant, guidance) result.

    ``align``: objects right in every attribute, mean over the evaluated object counts;
    ``cp_multi``: multi-object prompts with every object right in colour and place (mean of the
    2- and 3-object values); per-count values as ``all_<n>`` and ``cp_<n>``.
    """
    r = res["results"]
    out = {}
    alls, cps = [], []
    for key, v in sorted(r.items()):
        n = key.split("_")[0]
        out[f"all_{n}"] = v["all"]
        alls.append(v["all"])
        cp = v.get("colour_and_place_all")
        if cp is not None and not math.isnan(cp):
            out[f"cp_{n}"] = cp
            cps.append(cp)
    for a in ("colour", "place", "kind", "size"):
        vals = [v[a] for v in r.values()]
        out[a] = sum(vals) / len(vals) if vals else float("nan")
    out["align"] = sum(alls) / len(alls) if alls else float("nan")
    out["cp_multi"] = sum(cps) / len(cps) if cps else float("nan")
    out["sfd"] = res.get("sfd")
    return out


def _fmt(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def _noise_note(n: int) -> str:
    """How far apart two entries must be to mean something: the binomial standard error at n."""
    se = {p: math.sqrt(p * (1 - p) / n) for p in (0.5, 0.9, 0.95)}
    return (f"One seed per variant, {n} prompts per entry: the standard error of a proportion p is "
            f"sqrt(p(1-p)/{n}) = {se[0.5]:.3f} at p = 0.5, {se[0.9]:.3f} at 0.9, {se[0.95]:.3f} at 0.95; "
            "differences under about twice that are noise. The same prompts and noise seeds are used for "
            "every variant and guidance weight.")


def write_report(variants: list[Variant], evals: dict, docs: str, meta: dict) -> list[str]:
    """``ablations.md`` + ``ablations.json`` + plots in ``docs``; returns the written paths."""
    os.makedirs(docs, exist_ok=True)
    rows = []
    for v in variants:
        for g, res in sorted(evals.get(v.name, {}).items()):
            rows.append({"variant": v.name, "guidance": g, "same_as": v.same_as, **headline(res)})
    counts = sorted({int(k.split("_")[1]) for r in rows for k in r if k.startswith("all_")})
    multi = [n for n in counts if n > 1]
    have_sfd = any(r["sfd"] is not None for r in rows)
    written = []
    md = [f"# Ablations on the shapes world ({meta['config']})", "",
          "Paper Fig. 6 on the captioned-shapes world. Every variant trains with the same config, seed, "
          f"batch and number of steps ({meta['steps']}); evaluated on {meta['num_prompts']} held-out prompts "
          f"per object count with {meta['ddim_steps']} DDIM steps at each guidance weight w.", "",
          "`align`: objects right in colour, place, kind and size (mean over object counts); `cp k-obj`: "
          "k-object prompts with every object right in colour and place; colour/place/kind/size: per-object "
          "accuracy (mean over object counts)" + ("; `SFD`: feature-space Frechet distance (lower is better)"
                                                  if have_sfd else "") + ".", "",
          _noise_note(int(meta["num_prompts"])), "",
          f"Generated by `{meta['command']}` on {meta['date']}.", ""]
    # best guidance per variant
    md += ["## Best guidance per variant (by `align`)", ""]
    head = ["variant", "w*", "align"] + [f"all {n}-obj" for n in counts] + [f"cp {n}-obj" for n in multi]
    head += ["SFD"] if have_sfd else []
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        vr = [r for r in rows if r["variant"] == v.name]
        if not vr:
            md.append(f"| {v.name} | not evaluated |" + " |" * (len(head) - 2))
            continue
        b = max(vr, key=lambda r: -1 if math.isnan(r["align"]) else r["align"])
        name = v.name + (f" (= {v.same_as})" if v.same_as else "")
        cells = [name, f"{b['guidance']:g}", _fmt(b["align"])] + [_fmt(b.get(f"all_{n}")) for n in counts]
        cells += [_fmt(b.get(f"cp_{n}")) for n in multi] + ([_fmt(b["sfd"], 4)] if have_sfd else [])
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "## Every variant and guidance weight", ""]
    head = ["variant", "w", "align", "colour", "place", "kind", "size"] + [f"cp {n}-obj" for n in multi]
    head += ["SFD"] if have_sfd else []
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['guidance']:g}"]
        cells += [_fmt(r[k]) for k in ("align", "colour", "place", "kind", "size")]
        cells += [_fmt(r.get(f"cp_{n}")) for n in multi] + ([_fmt(r["sfd"], 4)] if have_sfd else [])
        md.append("| " + " | ".join(cells) + " |")
    plots = plot_ablations(rows, docs, have_sfd)
    if plots:
        md += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    path = os.path.join(docs, "ablations.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    written.append(path)
    jpath = os.path.join(docs, "ablations.json")
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "rows": rows, "variants": [
            {"name": v.name, "workdir": v.workdir, "same_as": v.same_as} for v in variants]}, f, indent=1)
    written.append(jpath)
    return written + [os.path.join(docs, p) for p in plots]


def plot_ablations(rows: list[dict], docs: str, have_sfd: bool) -> list[str]:
    """Fig. 6b (alignment against distance, or against w without SFD, across guidance weights for the
    component variants), Fig. 6c (metric against the number of space experts) and Fig. 6a (alpha, T_c)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_var: dict[str, list[dict]] = {}
    for r in rows:
        by_var.setdefault(r["variant"], []).append(r)
    written = []
    metrics = [("align", "align (all attributes right)"),
               ("cp_multi", "colour & place, multi-object prompts")]

    comp = [v for v in GROUPS["fig6b"] + GROUPS["dense"] if v in by_var]
    swept = {v for g in ("experts", "alpha", "tc") for v in GROUPS[g]}
    comp += [v for v in by_var if v not in comp and v not in swept]
    if comp:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, (m, label) in zip(axes, metrics):
            for v in comp:
                rs = sorted((r for r in by_var[v] if not have_sfd or r["sfd"] is not None),
                            key=lambda r: r["guidance"])
                xs = [r["sfd"] if have_sfd else r["guidance"] for r in rs]
                ys = [r[m] for r in rs]
                ax.plot(xs, ys, "-o", ms=4, label=v)
                if have_sfd:
                    for x, y, r in zip(xs, ys, rs):
                        ax.annotate(f"{r['guidance']:g}", (x, y), fontsize=6, xytext=(2, 2),
                                    textcoords="offset points")
            ax.set_xlabel("SFD (lower is better; labels: guidance w)" if have_sfd else "guidance weight w")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("component ablation across guidance weights (paper Fig. 6b)", fontsize=10)
        fig.tight_layout()
        p = "ablation_components.png"
        fig.savefig(os.path.join(docs, p), dpi=120)
        plt.close(fig)
        written.append(p)

    def sweep(group: str, xlabel: str, fname: str, title: str):
        pts = []
        for v in GROUPS[group]:
            if v in by_var:
                pts.append((float(v.split("=")[1]), by_var[v]))
        if len(pts) < 2:
            return
        ncols = 3 if have_sfd else 2
        fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.8))
        gs = sorted({r["guidance"] for _, rs in pts for r in rs})
        panels = metrics + ([("sfd", "SFD (lower is better)")] if have_sfd else [])
        for ax, (m, label) in zip(axes, panels):
            for g in gs:
                xy = [(x, r[m]) for x, rs in pts for r in rs if r["guidance"] == g and r[m] is not None]
                if xy:
                    ax.plot(*zip(*sorted(xy)), "-o", ms=4, label=f"w={g:g}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(docs, fname), dpi=120)
        plt.close(fig)
        written.append(fname)

    sweep("experts", "space experts (0: no space-MoE)", "ablation_experts.png",
          "number of space experts (paper Fig. 6c)")
    sweep("alpha", "region threshold alpha", "ablation_alpha.png", "space-MoE alpha (paper Fig. 6a)")
    sweep("tc", "edge-loss threshold T_c (0: no edge loss)", "ablation_tc.png", "T_c (paper Fig. 6a)")
    return written


# ------------------------------------------------------------------------------------------- run

def run(*, root: str, config: str = "configs/tiny.py", variants: str = "fig6b", steps: int | None = None,
        seed: int | None = None, overrides=(), init_from_root: str | None = None, guidance=GUIDANCE,
        objects=(1, 2, 3), num_prompts: int | None = None, ddim_steps: int | None = None,
        seed_eval: int | None = None, sfd_net: str | None = None, sfd_samples: int | None = None,
        docs: str = "docs/ablations", mode: str = "all", command: str = "raphael-ablate") -> dict:
    """Plan, train, evaluate and report the variants (``raphael-ablate``; see the module docstring).

    Args:
      root: one workdir per variant under this folder.
      config: base config (``file.py[:switches]``); variants: groups and variants (:func:`expand_variants`).
      steps, seed, overrides: training steps, model seed and config overrides of every variant.
      init_from_root: curriculum: start each variant from its trained run under this root.
      guidance, objects: guidance weights and object counts of the evaluation.
      num_prompts, ddim_steps, seed_eval: prompts per object count, DDIM steps, evaluation seed
        (None: the config's eval.num_prompts, sample.num_steps, eval.seed).
      sfd_net, sfd_samples: SFD feature net (None: no SFD) and its number of scenes (default 3 x num_prompts).
      docs: where the table and plots go.
      mode: ``all``, ``list`` (plan only), ``train`` (train only), ``eval`` (evaluate finished runs) or
        ``report`` (tables and plots from cached evaluations).
      command: the command line recorded in the report.

    Returns ``{variant: {guidance: result}}`` (empty for ``list`` and ``train``).
    """
    if mode not in ("all", "list", "train", "eval", "report"):
        raise ValueError(f"unknown mode {mode!r}")
    plans = plan(config, expand_variants(variants), root, steps, seed, overrides)
    objects = tuple(int(x) for x in objects)
    guidances = tuple(float(x) for x in guidance)
    total = int(plans[0].config.train.num_steps)
    for v in plans:
        note = f" (same config as {v.same_as})" if v.same_as else ""
        print(f"{v.name:>14}: {v.workdir}  trained to step {trained_step(v.workdir)}/{total}{note}")
    if mode == "list":
        return {}
    for v in plans:
        check_run_config(v)
    sfd = load_sfd(sfd_net, objects)
    evals = {}
    for v in plans:
        if mode in ("all", "train"):
            status = train_variant(v, init_from_root, plans)
            print(f"{v.name}: {status}", flush=True)
        if mode == "train":
            continue
        have = trained_step(v.workdir)
        if have < total:
            print(f"{v.name}: trained to {have}/{total} steps, not evaluated")
            continue
        if have > total:
            print(f"warning: {v.name} was trained to {have} > {total} steps; evaluating step {have}")
        n = num_prompts or int(v.config.eval.num_prompts)
        if mode == "report":
            evals[v.name] = _cached_evals(v, guidances, n, ddim_steps, seed_eval, have)
        else:
            evals[v.name] = evaluate_variant(v, guidances, n, objects, ddim_steps, seed_eval, sfd, sfd_samples)
    if mode == "train":
        return {}
    cfg0 = plans[0].config
    meta = {"config": config, "root": os.path.abspath(root), "steps": total,
            "seed": int(cfg0.seed), "batch_size": int(cfg0.train.batch_size),
            "num_prompts": num_prompts or int(cfg0.eval.num_prompts),
            "ddim_steps": int(ddim_steps or cfg0.sample.num_steps), "guidance": list(guidances),
            "objects": list(objects), "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    written = write_report(plans, evals, docs, meta)
    print("wrote " + ", ".join(written))
    return evals


def _cached_evals(v: Variant, guidances, num_prompts: int, ddim_steps: int | None, seed_eval: int | None,
                  step: int) -> dict:
    num_steps = int(ddim_steps or v.config.sample.num_steps)
    seed = int(v.config.eval.seed if seed_eval is None else seed_eval)
    out = {}
    for g in guidances:
        p = _cache_path(v.workdir, step, g, num_prompts, num_steps, seed)
        if os.path.exists(p):
            out[g] = json.load(open(p))
    return out
