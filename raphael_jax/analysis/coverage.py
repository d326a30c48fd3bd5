"""Space-expert coverage: how much of the image each space expert is actually needed on.

The space-MoE (:class:`raphael_jax.models.moe.SpaceMoE`) computes, per layer and per image, the
per-expert token counts ``C_k[j] = sum_{i: route(i)=k} w_i M_hat[j, i]`` (``M_hat_i``: token ``i``'s
thresholded region mask, ``w_i`` its gate weight, zero on unrouted padding) and its exact efficient
form ``sum_k C_k[j] e_k(h_j) + (T_k - C_k[j]) e_k(0)`` runs every expert ``e_k`` over every position
``j``. Where ``C_k[j] = 0`` the expert contributes only the per-image constant ``T_k e_k(0)``: a
dispatch that ran ``e_k`` only where its count is nonzero would spend the fraction of nonzero
``(position, expert)`` pairs of the exact form's expert FLOPs. This module measures that fraction.

**Coverage** of expert ``k`` in one layer for one image: the share of positions ``j`` with
``C_k[j] > 0``, i.e. covered by the region mask of at least one routed token that took expert ``k``;
the **union** is the share covered by any routed token (any expert). Gate weights are positive
(softmax probabilities, or 1), so ``C_k[j] > 0`` exactly when such a token exists: coverage is read
from the region masks and routes the model sows with ``record_masks`` (``region_masks`` [B, n_x,
n_y] and ``space_route`` [B, n_y], -1 on unrouted tokens; ``raphael_jax.models.routing``), the same
recording ``Sampler.routing`` and the notebook use, with the layers named and ordered as the path
analysis names them (``raphael_jax.analysis.paths``).

Two sources of U-Net inputs (router noise off, as at inference):

- ``"sample"``: the real DDIM loop with classifier-free guidance (``Sampler.guided_sample`` with a
  recording denoiser, as ``PathRecorder.time_routes_over_ddim``): every step's ``[cond; uncond]``
  batch. The prompts' half is the main result; the empty prompt's half is reported apart.
- ``"data"``: world scenes of the evaluation stream with their captions, noised by ``q_sample`` to
  timesteps spread evenly over each range (the inputs training sees; pixel runs only).

Results are averaged over prompts (and DDIM steps / timesteps) per block and per timestep range.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raphael_jax.analysis.paths import _module_paths, _short_layer
from raphael_jax.models.moe import SpaceMoE
from raphael_jax.models.routing import _path_key, pop_intermediates

DEFAULT_EDGES = (0, 250, 500, 750, 1000)
SOURCES = ("sample", "data")
EVAL_STREAM = 1  # the world's evaluation stream (scenes the trainer never draws)


# ------------------------------------------------------------------------------------------ core

def expert_coverage(masks, routes, num_experts: int):
    """Per-expert and union coverage of one space-MoE layer.

    ``masks``: binary region masks [B, n_x, n_y] (``M_hat``); ``routes``: int [B, n_y], the expert of
    every text token, -1 for tokens not routed (padding). Returns ``(per_expert [B, K], union [B])``:
    the share of the ``n_x`` positions where expert ``k``'s token count is nonzero, and where any
    expert's is.
    """
    masks = jnp.asarray(masks, jnp.float32)
    onehot = jax.nn.one_hot(jnp.asarray(routes), num_experts, dtype=jnp.float32)  # route -1: all zeros
    counts = jnp.einsum("bnl,blk->bnk", masks, onehot)                              # unweighted C_k [B, N, K]
    covered = counts > 0
    return covered.mean(axis=1), covered.any(axis=-1).mean(axis=1)


def check_edges(edges, num_timesteps: int) -> tuple[int, ...]:
    """Timestep range edges ``(0, ..., num_timesteps)``, strictly increasing: ranges ``[e_i, e_{i+1})``."""
    e = tuple(int(x) for x in edges)
    if len(e) < 2 or e[0] != 0 or e[-1] != num_timesteps or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"timestep range edges must increase strictly from 0 to {num_timesteps}, got {list(e)}")
    return e


def summarize(timesteps, per_expert, union, edges, positions, expert_cost) -> dict:
    """Average per-evaluation coverage by timestep range and layer.

    ``timesteps`` int [M] (one per recorded image evaluation), ``per_expert`` [M, n_layers, K],
    ``union`` [M, n_layers]; ``positions`` [n_layers] (n_x of each layer), ``expert_cost``
    [n_layers] (FLOPs of one expert at one position). Returns numpy arrays: ``coverage`` [R, n_layers, K]
    and ``union`` [R, n_layers] (means over the evaluations in each range), ``routed`` [R, n_layers]
    (mean share of experts with nonzero coverage anywhere, i.e. taken by some token), ``count`` [R],
    and the nonzero-pair fractions: ``pairs`` [R, n_layers] (mean over experts), ``pairs_positions``
    [R] and ``pairs_flops`` [R] (over layers, weighted by positions and by expert FLOPs), plus
    ``overall`` (the same over every evaluation, every range).
    """
    t = np.asarray(timesteps)
    cov = np.asarray(per_expert, np.float64)
    uni = np.asarray(union, np.float64)
    if cov.ndim != 3 or uni.shape != cov.shape[:2] or t.shape != cov.shape[:1]:
        raise ValueError(f"shapes do not fit: timesteps {t.shape}, per_expert {cov.shape}, union {uni.shape}")
    n_pos = np.asarray(positions, np.float64)
    w_pos = n_pos / n_pos.sum()
    w_flop = n_pos * np.asarray(expert_cost, np.float64)
    w_flop = w_flop / w_flop.sum()
    edges = tuple(edges)
    if t.size and (t.min() < edges[0] or t.max() >= edges[-1]):
        raise ValueError(f"timesteps {t.min()}..{t.max()} fall outside the ranges {edges[0]}..{edges[-1]}")
    idx = np.searchsorted(np.asarray(edges), t, side="right") - 1
    r, nl, k = len(edges) - 1, cov.shape[1], cov.shape[2]
    out = {"coverage": np.full((r, nl, k), np.nan), "union": np.full((r, nl), np.nan),
           "routed": np.full((r, nl), np.nan), "count": np.bincount(idx, minlength=r)[:r]}

    def stats(sel):
        c = cov[sel].mean(0)
        pairs = c.mean(-1)
        return {"coverage": c, "union": uni[sel].mean(0), "routed": (cov[sel] > 0).mean((0, 2)), "pairs": pairs,
                "pairs_positions": float(pairs @ w_pos), "pairs_flops": float(pairs @ w_flop)}

    out["pairs"] = np.full((r, nl), np.nan)
    out["pairs_positions"] = np.full(r, np.nan)
    out["pairs_flops"] = np.full(r, np.nan)
    for i in range(r):
        sel = idx == i
        if sel.any():
            s = stats(sel)
            for name in ("coverage", "union", "routed", "pairs", "pairs_positions", "pairs_flops"):
                out[name][i] = s[name]
    out["overall"] = stats(np.ones(len(t), bool)) if len(t) else None
    return out


# ------------------------------------------------------------------------------------ recording

class CoverageRecorder:
    """Records space-expert coverage of a trained run's U-Net (a :class:`raphael_jax.sampling.Sampler`'s
    parameters, config and text side), layer by layer, per image evaluation.

    ``layers``: the space-MoE layers in forward order (names as ``PathRecorder.space_layers``);
    ``positions``: image positions per layer; ``expert_cost``: FLOPs of one expert at one position
    (``2 * 2 * dim * hidden``: the two matmuls).
    """

    def __init__(self, sampler, batch_size: int = 64):
        self.sampler = sampler
        self.config = sampler.config
        self.batch_size = int(batch_size)
        model = nnx.merge(sampler.graphdef, sampler.params)
        found = sorted(((p, m) for p, m in nnx.iter_graph(model) if isinstance(m, SpaceMoE)),
                       key=lambda e: _path_key(e[0]))
        self.layers = _module_paths(model, SpaceMoE)
        if not self.layers:
            raise ValueError("this model has no space-MoE layers (space_moe.enabled=False): nothing to cover")
        ks = {int(m.experts.num_experts) for _, m in found}
        if len(ks) != 1:
            raise ValueError(f"space-MoE layers with different numbers of experts: {sorted(ks)}")
        self.num_experts = ks.pop()
        self.expert_cost = [4 * int(m.experts.w1.shape[1]) * int(m.experts.w1.shape[2]) for _, m in found]
        self.positions: list[int] | None = None  # known after the first forward pass
        gd, k = sampler.graphdef, self.num_experts
        n_layers = len(self.layers)

        def record(model, x, t, ctx, mask):
            out = model.unet(x, t, ctx, mask, record_masks=True, with_edges=False)
            inter = pop_intermediates(model)
            masks, routes = inter["region_masks"], inter["space_route"]
            if len(masks) != n_layers or len(routes) != n_layers:
                raise RuntimeError(f"recorded {len(masks)} region masks and {len(routes)} routes for "
                                   f"{n_layers} space-MoE layers")
            per, union = zip(*(expert_coverage(m, r, k) for m, r in zip(masks, routes, strict=True)))
            aux = {"expert": jnp.stack(per, 1), "union": jnp.stack(union, 1),  # [B, n_layers, K], [B, n_layers]
                   "positions": jnp.asarray([m.shape[1] for m in masks], jnp.int32)}
            return out, aux

        def forward(params, x, t, ctx, mask):
            return record(nnx.merge(gd, params), x, t, ctx, mask)[1]

        def denoise(params, x, t, ctx):
            return record(nnx.merge(gd, params), x, t, ctx["context"], ctx["mask"])

        self._forward = jax.jit(forward)
        self._denoise = denoise  # static argument of ddim_sample: one callable, one compiled loop

    def _set_positions(self, positions) -> None:
        pos = [int(p) for p in np.asarray(positions).reshape(-1, len(self.layers))[0]]
        if self.positions is not None and pos != self.positions:
            raise RuntimeError(f"layer sizes changed between batches: {self.positions} -> {pos}")
        self.positions = pos

    def _batches(self, n: int):
        mult = self.sampler.batch_multiple
        size = -(-min(self.batch_size, max(n, 1)) // mult) * mult
        for start in range(0, n, size):
            yield start, min(n - start, size), size

    def record(self, x_t, t, cond: dict) -> tuple[np.ndarray, np.ndarray]:
        """One U-Net pass on model inputs ``x_t`` [B, ...] at timesteps ``t`` int [B] with text states
        ``cond`` (``Sampler.encode``: ``{"context", "mask"}``); returns ``(per_expert [B, n_layers, K],
        union [B, n_layers])``."""
        aux = jax.tree.map(np.asarray, self._forward(self.sampler.params, x_t, t, cond["context"], cond["mask"]))
        self._set_positions(aux["positions"])
        return aux["expert"], aux["union"]

    # -------------------------------------------------------------------------------- sources
    def over_ddim(self, prompts, num_steps: int | None = None, guidance: float | None = None, seed: int = 0,
                  height: int | None = None, width: int | None = None) -> dict:
        """Coverage at every DDIM step of sampling ``prompts`` with guidance (the run's sampler settings).

        Returns ``{"timesteps": [M], "expert": [M, n_layers, K], "union": [M, n_layers]}`` for the prompts
        (one entry per prompt and step) and the same under ``"uncond"`` for the empty prompt's half.
        """
        prompts = list(prompts)
        s = self.sampler
        cond, uncond = {"t": [], "expert": [], "union": []}, {"t": [], "expert": [], "union": []}
        for start, n, size in self._batches(len(prompts)):
            chunk = prompts[start:start + n] + [""] * (size - n)
            x_T = s.noise(seed, np.arange(start, start + size), height, width)
            _, traj = s.guided_sample(x_T, s.encode(chunk), s.encode([""] * size), num_steps=num_steps,
                                      guidance=guidance, denoise_fn=self._denoise, has_aux=True,
                                      return_trajectory=True)
            aux = jax.tree.map(np.asarray, traj["aux"])  # [S, 2*size, ...]
            self._set_positions(aux["positions"])
            ts = np.asarray(traj["timesteps"])
            for rec, lo in ((cond, 0), (uncond, size)):
                sl = slice(lo, lo + n)
                rec["t"].append(np.repeat(ts, n))
                rec["expert"].append(aux["expert"][:, sl].reshape(-1, *aux["expert"].shape[2:]))
                rec["union"].append(aux["union"][:, sl].reshape(-1, aux["union"].shape[-1]))
        return {"timesteps": np.concatenate(cond["t"]), "expert": np.concatenate(cond["expert"]),
                "union": np.concatenate(cond["union"]),
                "uncond": {"timesteps": np.concatenate(uncond["t"]), "expert": np.concatenate(uncond["expert"]),
                           "union": np.concatenate(uncond["union"])}}

    def over_data(self, images, prompts, timesteps, seed: int = 0) -> dict:
        """Coverage of world images (model input space, [-1, 1]) noised to each of ``timesteps``.

        Every image is evaluated with its prompt at every timestep (``q_sample`` with noise keyed by
        ``seed``). Returns ``{"timesteps": [M], "expert": [M, n_layers, K], "union": [M, n_layers]}``.
        """
        from raphael_jax.diffusion.schedule import q_sample

        images = np.asarray(images, np.float32)
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        s = self.sampler
        out = {"t": [], "expert": [], "union": []}
        for start, n, size in self._batches(len(prompts)):
            x0 = np.zeros((size, *images.shape[1:]), np.float32)
            x0[:n] = images[start:start + n]
            cond = s.encode(prompts[start:start + n] + [""] * (size - n))
            for i, t in enumerate(timesteps):
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), start), i)
                tb = jnp.full((size,), int(t), jnp.int32)
                x_t = q_sample(s.sched, s.put_batch(x0), tb, jax.random.normal(key, x0.shape))
                expert, union = self.record(x_t, tb, cond)
                out["t"].append(np.full(n, int(t)))
                out["expert"].append(expert[:n])
                out["union"].append(union[:n])
        return {"timesteps": np.concatenate(out["t"]), "expert": np.concatenate(out["expert"]),
                "union": np.concatenate(out["union"])}


def range_timesteps(edges, per_range: int) -> list[int]:
    """``per_range`` timesteps spread evenly over each range ``[e_i, e_{i+1})`` (bin midpoints)."""
    if per_range < 1:
        raise ValueError(f"need at least one timestep per range, got {per_range}")
    out = []
    for lo, hi in zip(edges, edges[1:]):
        out += sorted({int(lo + (j + 0.5) * (hi - lo) / per_range) for j in range(per_range)})
    return out


def measure_coverage(sampler, *, num_prompts: int = 100, seed: int = 0, objects=None, source: str = "sample",
                     edges=None, timesteps_per_range: int = 4, num_steps: int | None = None,
                     guidance: float | None = None, batch_size: int = 64, recorder: CoverageRecorder | None = None,
                     verbose: bool = False) -> dict:
    """The coverage study of one run: ``num_prompts`` world scenes of the evaluation stream (``objects``:
    (min, max) objects per scene, default the run's training range), per block and timestep range.

    Returns ``{"summary": summarize(...), "uncond": summarize(...) or None, "layers", "positions",
    "expert_cost", "num_experts", "edges", "source", ...}`` (numpy arrays; see :func:`coverage_markdown`).
    """
    from raphael_jax.data.shapes.world import example, make_caption, sample_prompts

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    config = sampler.config
    T = int(config.diffusion.num_timesteps)
    edges = check_edges(DEFAULT_EDGES if edges is None and T == 1000 else (edges or (0, T)), T)
    if objects is None:
        w = tuple(config.data.object_weights)
        nz = [i + 1 for i, x in enumerate(w) if x > 0]
        objects = (nz[0], nz[-1])
    lo, hi = (int(v) for v in objects)
    rec = recorder or CoverageRecorder(sampler, batch_size)
    meta = {"layers": rec.layers, "num_experts": rec.num_experts, "expert_cost": rec.expert_cost, "edges": edges,
            "source": source, "num_prompts": int(num_prompts), "objects": (lo, hi), "seed": int(seed),
            "step": int(getattr(sampler, "step", -1))}
    if source == "sample":
        prompts = [make_caption(o) for o in sample_prompts(num_prompts, seed=seed, min_objects=lo, max_objects=hi)]
        raw = rec.over_ddim(prompts, num_steps=num_steps, guidance=guidance, seed=seed)
        meta["guidance"] = float(config.sample.guidance if guidance is None else guidance)
        meta["ddim_steps"] = int(num_steps or config.sample.num_steps)
    else:
        if sampler.latent:
            raise ValueError("source='data' noises world images in pixel space: pixel runs only (use 'sample')")
        size = int(config.data.image_size)
        exs = [example(seed, i, size, lo, hi, stream=EVAL_STREAM) for i in range(num_prompts)]
        prompts = [e["caption"] for e in exs]
        images = np.stack([e["image"].astype(np.float32) / 127.5 - 1.0 for e in exs])
        ts = range_timesteps(edges, timesteps_per_range)
        raw = rec.over_data(images, prompts, ts, seed=seed)
        meta["timesteps"] = ts
    meta["positions"] = rec.positions
    meta["prompts"] = prompts
    summary = summarize(raw["timesteps"], raw["expert"], raw["union"], edges, rec.positions, rec.expert_cost)
    unc = raw.get("uncond")
    meta["uncond"] = (summarize(unc["timesteps"], unc["expert"], unc["union"], edges, rec.positions,
                                rec.expert_cost) if unc is not None else None)
    meta["summary"] = summary
    if verbose:
        o = summary["overall"]
        print(f"coverage over {len(prompts)} prompts ({source}): nonzero (position, expert) pairs "
              f"{o['pairs_positions']:.3f} of all, {o['pairs_flops']:.3f} of the expert FLOPs", flush=True)
    return meta


# ------------------------------------------------------------------------------------------ report

def _f(x) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.3f}"


def coverage_markdown(res: dict) -> str:
    """Markdown tables of :func:`measure_coverage`: per block x timestep range, then per range, then overall."""
    s, k, edges = res["summary"], res["num_experts"], res["edges"]
    names = [_short_layer(n) for n in res["layers"]]
    ranges = [f"[{a}, {b})" for a, b in zip(edges, edges[1:])]
    lines = ["| t range | block | positions | " + " | ".join(f"expert {e}" for e in range(k))
             + " | union | nonzero pairs | experts routed |",
             "|---|---|---|" + "---|" * k + "---|---|---|"]
    for i, rname in enumerate(ranges):
        for li, name in enumerate(names):
            lines.append(f"| {rname} | {name} | {res['positions'][li]} | "
                         + " | ".join(_f(c) for c in s["coverage"][i, li])
                         + f" | {_f(s['union'][i, li])} | {_f(s['pairs'][i, li])} | {_f(s['routed'][i, li])} |")
    lines += ["", "| t range | evaluations | nonzero pairs (by positions) | nonzero pairs (by expert FLOPs) | "
              "mean union |", "|---|---|---|---|---|"]
    w = np.asarray(res["positions"], np.float64)
    for i, rname in enumerate(ranges):
        mu = float(s["union"][i] @ w / w.sum()) if s["count"][i] else float("nan")
        lines.append(f"| {rname} | {int(s['count'][i])} | {_f(s['pairs_positions'][i])} | {_f(s['pairs_flops'][i])} "
                     f"| {_f(mu)} |")
    o = s["overall"]
    if o is not None:
        mu = float(o["union"] @ w / w.sum())
        lines.append(f"| all | {int(s['count'].sum())} | **{_f(o['pairs_positions'])}** | **{_f(o['pairs_flops'])}** "
                     f"| {_f(mu)} |")
    u = res.get("uncond")
    if u is not None and u["overall"] is not None:
        uo = u["overall"]
        both_p = (o["pairs_positions"] + uo["pairs_positions"]) / 2
        both_f = (o["pairs_flops"] + uo["pairs_flops"]) / 2
        lines += ["", f"Empty prompt (the unconditional half of every guided step): nonzero pairs "
                  f"{_f(uo['pairs_positions'])} by positions, {_f(uo['pairs_flops'])} by expert FLOPs, mean union "
                  f"{_f(float(uo['union'] @ w / w.sum()))}, experts routed "
                  f"{_f(float(uo['routed'].mean()))}. Whole guided batch (prompts and empty prompt "
                  f"alike): **{_f(both_p)}** of the pairs, **{_f(both_f)}** of the expert FLOPs."]
    return "\n".join(lines)
