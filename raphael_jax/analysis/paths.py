"""Diffusion-path analysis (paper sec. 3.1, App. 7.5): which space expert each word takes, layer by layer.

A word's **path** is the vector of its space-expert indices, one entry per space-MoE layer in
forward order (down path, middle, up path). The text gate sees only the token's contextual
embedding ``E(y_i)``, so at inference (no router noise) the path does not depend on the image,
the timestep or the image position, only on the word and its caption context.

The study, adapted to the captioned-shapes world:

1. **Templates.** For a word category (``colour``, ``kind``, also ``size`` and ``place``) draw
   ``n`` caption contexts from the world (1-3 objects, from the evaluation stream 1; scenes the
   trainer never draws, words it has seen) and blank one object's word of that category: ``"a big {}
   circle at the top left and a small blue square in the center"``. Every word of the category fills
   every template (a paired design, as the paper's 100 GPT templates x 100 adjectives), so words
   differ only by themselves.
2. **Record.** One forward pass of the U-Net per prompt batch with routing sown by name
   (``raphael_jax.models.routing``); the word's path is the ``space_route`` column of its token.
3. **Classify.** Predict the word from its path with gradient-boosted trees (scikit-learn's
   ``HistGradientBoostingClassifier`` with the layers as categorical features; the paper used
   XGBoost) under stratified 5-fold cross-validation; report the accuracy against chance
   (1 / number of words; the design is balanced).
4. **Plot.** Route diagrams (paper Fig. 4): per word, how often each expert is taken at each layer
   and the most frequent path. Time-expert usage over the DDIM steps per block (paper Fig. 9).

**Words of several tokens.** The shapes world's word-level tokenizer gives every word one token,
except the place names ("top left" is two words, so two tokens). A word that spans several tokens
(several words, or sub-word pieces under a ``unigram`` tokenizer) is represented by its **last**
token by default (``token="last"``): in a causal text encoder such as CLIP's (the paper's) only the
last piece has seen the whole word; our small encoder is bidirectional, so every piece sees it.
``token="first"`` takes the first piece instead. So "top left" is read at "left" (and "top" at
"top"): two place names that share their last word are told apart only by their context.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raphael_jax.data.shapes.world import (
    COLOURS,
    KINDS,
    PLACES,
    SIZES,
    ShapeObject,
    make_caption,
    sample_objects,
    sample_prompts,
)
from raphael_jax.models.moe import SpaceMoE, TimeMoE
from raphael_jax.models.routing import _path_key, pop_intermediates

CATEGORIES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "kind": tuple(KINDS),
    "size": tuple(SIZES),
    "place": tuple(PLACES),
}
TEMPLATE_STREAM = 3  # world streams: 0 training, 1 evaluation prompts, 2 tokenizer corpus
TOKEN_CHOICES = ("last", "first")


# ----------------------------------------------------------------------------------------- templates

def _fill(category: str, word: str) -> str:
    """The caption text a word stands for in its slot (place names carry their preposition)."""
    if category == "place":
        return "in the center" if word == "center" else f"at the {word}"
    return word


def _slot_phrase(obj: ShapeObject, category: str) -> str:
    parts = {"size": obj.size, "colour": obj.colour, "kind": obj.kind}
    where = "in the center" if obj.place == "center" else f"at the {obj.place}"
    if category == "place":
        where = "{}"
    else:
        parts[category] = "{}"
    return f"a {parts['size']} {parts['colour']} {parts['kind']} {where}"


@dataclasses.dataclass(frozen=True)
class Template:
    """A world caption with one slot ``{}``; ``fill(word)`` gives the caption (always a valid one)."""

    text: str
    category: str
    objects: tuple[ShapeObject, ...]
    slot: int  # which object's word is blanked

    def fill(self, word: str) -> str:
        return self.text.replace("{}", _fill(self.category, word))

    def word_span(self, word: str) -> tuple[str, str]:
        """(text before the word, text up to and including the word) of the filled caption."""
        i = self.text.index("{}")
        fill = _fill(self.category, word)
        j = fill.rindex(word)
        before = self.text[:i] + fill[:j]
        return before, before + word


def make_templates(category: str, num: int, seed: int = 0, max_objects: int = 3) -> list[Template]:
    """``num`` slot captions for ``category`` drawn from the world's template stream (deterministic).

    Scenes have 1..``max_objects`` objects and the blanked object is drawn uniformly, so the word sits
    at every position of one-, two- and three-object captions. Filled with the object's own word a
    template is exactly the world's caption of that scene. (For ``place`` a filled-in place can
    coincide with another object's cell: a caption the world never writes, harmless for routing.)
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown word category {category!r}; expected one of {list(CATEGORIES)}")
    if num < 1:
        raise ValueError(f"need at least one template, got {num}")
    out = []
    for i in range(num):
        rng = np.random.default_rng([int(seed), i, TEMPLATE_STREAM])
        objs = tuple(sample_objects(rng, 1, max_objects))
        slot = int(rng.integers(len(objs)))
        text = " and ".join(_slot_phrase(o, category) if k == slot else make_caption([o])
                            for k, o in enumerate(objs))
        t = Template(text, category, objs, slot)
        # the filled template of the object's own word is exactly the world's caption
        own = getattr(objs[slot], category)
        assert t.fill(own) == make_caption(list(objs)), (t.text, own)
        out.append(t)
    return out


# ------------------------------------------------------------------------------------- token lookup

def _num_pieces(tokenizer, text: str, max_len: int) -> int:
    if not text.strip():
        return 0
    _, mask = tokenizer.encode([text], max_len)
    return int(mask.sum()) - 1  # without EOS


def word_token_index(tokenizer, template: Template, word: str, max_len: int, token: str = "last") -> int:
    """Index of the token that stands for ``word`` in ``template.fill(word)`` (see module docstring)."""
    if token not in TOKEN_CHOICES:
        raise ValueError(f"token must be one of {TOKEN_CHOICES}, got {token!r}")
    before, upto = template.word_span(word)
    n_before = _num_pieces(tokenizer, before, max_len)
    n_upto = _num_pieces(tokenizer, upto, max_len)
    if n_upto <= n_before:
        raise ValueError(f"word {word!r} has no token of its own in {template.fill(word)!r}")
    full, _ = tokenizer.encode([template.fill(word)], max_len)
    head, _ = tokenizer.encode([upto], max_len)
    if n_upto > max_len - 1 or not np.array_equal(full[0, :n_upto], head[0, :n_upto]):
        raise ValueError(f"cannot locate {word!r} in {template.fill(word)!r}: the tokenization of the "
                         "caption does not extend that of its start (or the caption is truncated)")
    return n_upto - 1 if token == "last" else n_before


# -------------------------------------------------------------------------------------- recording

def _module_paths(model, cls) -> list[str]:
    found = [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, cls)]
    found.sort(key=lambda e: _path_key(e[0]))
    return ["/".join(str(p) for p in path) for path, _ in found]


class PathRecorder:
    """Records space routes (per token, per space-MoE layer) and time routes of a trained model.

    ``PathRecorder(sampler)`` takes a :class:`raphael_jax.sampling.Sampler` (``Sampler.from_run(load_run(dir))``):
    its EMA parameters, config and tokenizer. Only the small trainable text encoder is supported
    (the shapes world); routes come from a jitted U-Net forward pass that sows them by name.
    """

    def __init__(self, sampler, batch_size: int = 128, timestep: int = 500):
        self.sampler = sampler
        self.config = sampler.config
        self.tokenizer = sampler.tokenizer
        self.batch_size = batch_size
        self.timestep = timestep
        if self.config.text.kind != "small":
            raise ValueError("path analysis needs the model's own text encoder (text.kind='small')")
        model = nnx.merge(sampler.graphdef, sampler.params)
        self.space_layers = _module_paths(model, SpaceMoE)
        self.time_layers = _module_paths(model, TimeMoE)
        m = self.config.model
        self.num_space_experts = int(m.space_moe.num_experts) if m.space_moe.enabled else 0
        self.num_time_experts = int(m.time_moe.num_experts) if m.time_moe.enabled else 0
        gd = sampler.graphdef

        def forward(params, x, t, tokens, mask):
            model = nnx.merge(gd, params)
            ctx = model.encode_text(tokens, mask)
            model.unet(x, t, ctx, mask, with_edges=False)
            inter = pop_intermediates(model)
            return inter["space_route"], inter["time_route"]

        def denoise(params, x, t, ctx):
            model = nnx.merge(gd, params)
            out = model.unet(x, t, ctx["context"], ctx["mask"], with_edges=False)
            routes = pop_intermediates(model)["time_route"]
            return out, (jnp.stack(routes) if routes else jnp.zeros((0, x.shape[0]), jnp.int32))

        self._forward = jax.jit(forward)
        self._denoise = denoise  # static argument of ddim_sample: one callable, one compilation

    def space_routes(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """(routes int [N, n_layers, L] with -1 on padding, token mask bool [N, L]) for ``prompts``."""
        if not self.space_layers:
            raise ValueError("this model has no space-MoE layers (space_moe.enabled=False): "
                             "no paths to record")
        prompts = list(prompts)
        routes, masks = [], []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            n = len(chunk)
            pad = min(self.batch_size, -(-n // 32) * 32) - n  # few batch shapes, few compilations
            tokens, mask = self.sampler.tokenize(chunk + [""] * pad)
            x = jnp.zeros(self.sampler.image_shape(n + pad))
            t = jnp.full((n + pad,), self.timestep, jnp.int32)
            space, _ = self._forward(self.sampler.params, x, t, tokens, mask)
            if len(space) != len(self.space_layers):
                raise RuntimeError(f"recorded {len(space)} space routes for {len(self.space_layers)} layers")
            routes.append(np.stack([np.asarray(r) for r in space], axis=1)[:n])
            masks.append(np.asarray(mask)[:n])
        return np.concatenate(routes), np.concatenate(masks)

    def word_paths(self, category: str, templates: list[Template], words=None, token: str = "last") -> dict:
        """Paths of every word of ``category`` in every template.

        Returns ``{"words": [...], "paths": int [n_words, n_templates, n_layers], "token_index":
        int [n_words, n_templates], "prompts": [[...]]}``.
        """
        words = tuple(words or CATEGORIES[category])
        max_len = self.config.text.max_len
        prompts, index = [], []
        for w in words:
            for tpl in templates:
                prompts.append(tpl.fill(w))
                index.append(word_token_index(self.tokenizer, tpl, w, max_len, token))
        routes, _ = self.space_routes(prompts)
        idx = np.asarray(index)
        paths = routes[np.arange(len(prompts)), :, idx]  # [N, n_layers]
        if (paths < 0).any():
            raise RuntimeError("a word token was not routed (padding?)")
        nw, nt = len(words), len(templates)
        return {"words": list(words), "paths": paths.reshape(nw, nt, -1), "token_index": idx.reshape(nw, nt),
                "prompts": [prompts[i * nt:(i + 1) * nt] for i in range(nw)]}

    def time_routes_over_ddim(self, prompts, num_steps: int | None = None, guidance: float | None = None,
                              seed: int = 0) -> dict:
        """Time routes of every time-MoE block at every DDIM step while sampling ``prompts``.

        Runs the real sampler loop (``ddim_sample(has_aux=True, return_trajectory=True)``, CFG batch
        ``[cond; uncond]``) and returns ``{"timesteps": [S], "layers": [...], "routes": int [S, n_blocks,
        2B], "mode": int [S, n_blocks], "agreement": fraction of samples on the mode route,
        "usage": [n_blocks, K] share of DDIM steps each expert handles (over all samples)}``.
        """
        if not self.time_layers:
            raise ValueError("this model has no time-MoE layers (time_moe.enabled=False)")
        guidance = self.config.sample.guidance if guidance is None else guidance
        prompts = list(prompts)
        n = len(prompts)
        s = self.sampler
        x_T = s.initial_noise(jax.random.key(seed), n)
        _, traj = s.guided_sample(x_T, s.encode(prompts), s.encode([""] * n), num_steps=num_steps, guidance=guidance,
                                  denoise_fn=self._denoise, has_aux=True, return_trajectory=True)
        routes = np.asarray(traj["aux"])  # [S, n_blocks, 2B]
        k = self.num_time_experts
        counts = np.stack([(routes == e).sum(axis=2) for e in range(k)], axis=-1)  # [S, n_blocks, K]
        mode = counts.argmax(-1)
        agreement = float((routes == mode[..., None]).mean())
        usage = counts.sum(0) / counts.sum((0, 2))[:, None]
        return {"timesteps": np.asarray(traj["timesteps"]).tolist(), "layers": self.time_layers,
                "routes": routes, "mode": mode, "agreement": agreement, "usage": usage,
                "num_experts": k, "guidance": float(guidance), "num_prompts": n}


# ------------------------------------------------------------------------------------ classification

def classify_paths(paths, labels, folds: int = 5, seed: int = 0, max_iter: int = 100,
                   n_threads: int | None = 1) -> dict:
    """Predict each path's word with gradient-boosted trees under stratified ``folds``-fold CV.

    ``paths`` int [N, n_layers] (expert per layer, treated as categorical features); ``labels`` [N].
    Returns accuracy (mean over folds), per-fold accuracies, chance (1 / number of words), the
    majority-class rate, the confusion matrix (rows true, columns predicted, pooled over folds) and
    the number of distinct paths. ``n_threads`` caps the OpenMP threads of the trees (None: all
    cores); one thread is fast at these sizes and does not spin-wait on a busy machine.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    X = np.asarray(paths, np.int64)
    if X.ndim != 2 or X.shape[1] < 1:
        raise ValueError(f"paths must be [N, n_layers] with n_layers >= 1, got shape {X.shape}")
    if (X < 0).any() or X.max() >= 255:
        raise ValueError("expert indices must be in [0, 255)")
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    per_class = np.bincount(y)
    if len(classes) < 2:
        raise ValueError("need at least two words to classify")
    if per_class.min() < folds:
        raise ValueError(f"every word needs at least folds={folds} paths, got {per_class.min()}")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_acc, confusion = [], np.zeros((len(classes), len(classes)), np.int64)
    with threadpool_limits(limits=n_threads, user_api="openmp"):
        for train, test in cv.split(X, y):
            clf = HistGradientBoostingClassifier(categorical_features=np.ones(X.shape[1], bool),
                                                 max_iter=max_iter, min_samples_leaf=5, early_stopping=False,
                                                 random_state=seed)
            clf.fit(X[train], y[train])
            pred = clf.predict(X[test])
            fold_acc.append(float((pred == y[test]).mean()))
            np.add.at(confusion, (y[test], pred), 1)
    return {"accuracy": float(np.mean(fold_acc)), "accuracy_std": float(np.std(fold_acc)),
            "fold_accuracies": fold_acc, "chance": 1.0 / len(classes),
            "majority": float(per_class.max() / per_class.sum()), "num_paths": int(len(y)),
            "num_words": int(len(classes)), "words": [str(c) for c in classes],
            "confusion": confusion.tolist(), "distinct_paths": int(len({tuple(r) for r in X}))}


def analyze_category(recorder: PathRecorder, category: str, num_templates: int = 100, seed: int = 0,
                     max_objects: int = 3, token: str = "last", folds: int = 5) -> dict:
    """Templates -> paths -> cross-validated word classification for one category (JSON-ready)."""
    templates = make_templates(category, num_templates, seed, max_objects)
    rec = recorder.word_paths(category, templates, token=token)
    words, paths = rec["words"], rec["paths"]
    labels = np.repeat(np.asarray(words), paths.shape[1])
    cls = classify_paths(paths.reshape(-1, paths.shape[-1]), labels, folds=folds, seed=seed)
    distinct = {w: int(len({tuple(p) for p in paths[i]})) for i, w in enumerate(words)}
    return {"category": category, "words": words, "templates": [t.text for t in templates], "token": token,
            "paths": paths.tolist(), "token_index": rec["token_index"].tolist(), "classification": cls,
            "distinct_paths_per_word": distinct}


# ------------------------------------------------------------------------------------------- plots

def _short_layer(name: str) -> str:
    """'unet/down/3/space_moe' -> 'down3'; 'unet/mid_attn/space_moe' -> 'mid'."""
    parts = [p for p in name.split("/") if p not in ("unet", "space_moe", "time_moe")]
    return re.sub(r"_attn$", "", "".join(parts))


def plot_route_diagram(words, paths, num_experts: int, layers, path: str, title: str = "") -> str:
    """Fig. 4-style route diagram: per word, the share of contexts taking each expert at each layer
    (shaded cells) and the most frequent expert per layer (line). ``paths`` int [n_words, n_ctx, n_layers]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = np.asarray(paths)
    nw, _, nl = paths.shape
    cols = min(4, nw)
    rows = int(np.ceil(nw / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(0.45 * nl * cols + 1.5, 1.9 * rows + 0.8), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= nw:
            ax.axis("off")
            continue
        freq = np.stack([(paths[i] == e).mean(0) for e in range(num_experts)])  # [K, n_layers]
        ax.imshow(freq, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
        ax.plot(np.arange(nl), freq.argmax(0), "-o", color="tab:red", lw=1.5, ms=3)
        n_distinct = len({tuple(p) for p in paths[i]})
        ax.set_title(f"{words[i]}  ({n_distinct} paths)", fontsize=9)
        ax.set_yticks(range(num_experts))
        ax.set_xticks(range(nl))
        ax.set_xticklabels([_short_layer(n) for n in layers], fontsize=6, rotation=90)
        ax.tick_params(axis="y", labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("space expert", fontsize=8)
    fig.suptitle(title or "diffusion paths: share of contexts per expert and layer (line: most frequent)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_time_usage(time_rec: dict, path: str) -> str:
    """Fig. 9-style plot: for each time-MoE block, the expert taken at each DDIM step (noisiest first),
    and each expert's share of the steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    mode = np.asarray(time_rec["mode"]).T  # [n_blocks, S]
    usage = np.asarray(time_rec["usage"])  # [n_blocks, K]
    k = int(time_rec["num_experts"])
    nb, s = mode.shape
    colours = [plt.get_cmap("tab10")(e % 10) for e in range(k)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.45 * nb + 1.8), gridspec_kw={"width_ratios": [3, 1.2]})
    a1.imshow(mode, cmap=ListedColormap(colours), vmin=-0.5, vmax=k - 0.5, aspect="auto",
              interpolation="nearest")
    ts = time_rec["timesteps"]
    ticks = np.linspace(0, s - 1, min(s, 6)).round().astype(int)
    a1.set_xticks(ticks)
    a1.set_xticklabels([f"{i + 1}\nt={ts[i]}" for i in ticks], fontsize=7)
    a1.set_xlabel("DDIM step (noisiest first)")
    names = [_short_layer(n) for n in time_rec["layers"]]
    a1.set_yticks(range(nb))
    a1.set_yticklabels(names, fontsize=7)
    a1.set_title("time expert per DDIM step", fontsize=9)
    left = np.zeros(nb)
    for e in range(k):
        a2.barh(range(nb), usage[:, e], left=left, color=colours[e], label=f"expert {e}")
        left += usage[:, e]
    a2.set_xlim(0, 1)
    a2.set_yticks(range(nb))
    a2.set_yticklabels(names, fontsize=7)
    a2.invert_yaxis()
    a2.set_xlabel("share of DDIM steps")
    a2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(k, 4), frameon=False)
    a2.set_title("time-expert usage", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- study

def summary_table(results: dict) -> str:
    """Markdown table of :func:`analyze_category` results ``{category: result}``."""
    lines = ["| words | n words | paths | distinct paths | accuracy (5-fold) | chance |",
             "|---|---|---|---|---|---|"]
    for cat, r in results.items():
        c = r["classification"]
        lines.append(f"| {cat} | {c['num_words']} | {c['num_paths']} | {c['distinct_paths']} | "
                     f"{c['accuracy']:.3f} +- {c['accuracy_std']:.3f} | {c['chance']:.3f} |")
    return "\n".join(lines)


def path_study(recorder: PathRecorder, out_dir: str, *, workdir: str, categories=("colour", "kind"),
               templates: int = 100, max_objects: int = 3, token: str = "last", folds: int = 5, seed: int = 0,
               time_prompts: int = 8, ddim_steps: int | None = None, guidance: float | None = None,
               ema: bool = True) -> dict:
    """The whole study of one run (``raphael-paths``), written to the existing folder ``out_dir``.

    Per category: :func:`analyze_category` and its route diagram ``routes_<category>.png``, all in
    ``paths.json`` (skipped without space-MoE layers); time routes of ``time_prompts`` sampled prompts
    over the DDIM steps in ``time_experts.json`` / ``time_experts.png`` (skipped without time-MoE
    layers); ``summary.md``. ``workdir`` and ``ema`` are recorded in the outputs.

    Returns ``{"categories": {category: result}, "time": time summary or None}``.
    """
    sampler = recorder.sampler
    meta = {"workdir": os.path.abspath(workdir), "step": int(sampler.step), "ema": ema,
            "space_layers": recorder.space_layers, "num_space_experts": recorder.num_space_experts,
            "token": token, "templates": templates, "max_objects": max_objects,
            "folds": folds, "seed": seed,
            "classifier": "sklearn HistGradientBoostingClassifier (layers as categorical features)"}
    results = {}
    if recorder.space_layers:
        for cat in categories:
            t0 = time.time()
            r = analyze_category(recorder, cat, templates, seed, max_objects, token, folds)
            c = r["classification"]
            print(f"{cat:>7}: {c['num_words']} words x {templates} contexts, {c['distinct_paths']} "
                  f"distinct paths, accuracy {c['accuracy']:.3f} +- {c['accuracy_std']:.3f} "
                  f"(chance {c['chance']:.3f})  [{time.time() - t0:.1f}s]", flush=True)
            png = plot_route_diagram(r["words"], r["paths"], recorder.num_space_experts, recorder.space_layers,
                                     os.path.join(out_dir, f"routes_{cat}.png"),
                                     title=f"{cat} words: space expert per layer over {templates} "
                                     f"contexts (step {sampler.step}; line: most frequent)")
            r["plot"] = os.path.basename(png)
            results[cat] = r
        with open(os.path.join(out_dir, "paths.json"), "w") as f:
            json.dump({**meta, "categories": results}, f)
    else:
        print("no space-MoE layers: skipping the path study")
    time_summary = None
    if recorder.time_layers:
        objs = sample_prompts(time_prompts, seed=seed, min_objects=1, max_objects=max_objects)
        prompts = [make_caption(o) for o in objs]
        tr = recorder.time_routes_over_ddim(prompts, num_steps=ddim_steps, guidance=guidance, seed=seed)
        plot_time_usage(tr, os.path.join(out_dir, "time_experts.png"))
        time_summary = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in tr.items()
                        if k != "routes"}
        time_summary["prompts"] = prompts
        with open(os.path.join(out_dir, "time_experts.json"), "w") as f:
            json.dump(time_summary, f, indent=1)
        print(f"time routes over {len(tr['timesteps'])} DDIM steps: {tr['agreement']:.3f} of samples on the "
              "step's mode route (the time gate sees only t)")
    else:
        print("no time-MoE layers: skipping the time-expert plot")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(f"# Diffusion paths of `{workdir}` (step {sampler.step})\n\n")
        if results:
            f.write(f"Word classification from paths ({folds}-fold CV, {templates} contexts per "
                    f"word, token: {token}).\n\n{summary_table(results)}\n\n")
            f.write("".join(f"![{c}]({r['plot']})\n" for c, r in results.items()))
        if time_summary:
            f.write("\nTime-expert share of DDIM steps per block:\n\n| block | "
                    + " | ".join(f"expert {e}" for e in range(time_summary["num_experts"])) + " |\n|---|"
                    + "---|" * time_summary["num_experts"] + "\n")
            for name, u in zip(time_summary["layers"], time_summary["usage"]):
                f.write(f"| {name} | " + " | ".join(f"{x:.2f}" for x in u) + " |\n")
            f.write("\n![time experts](time_experts.png)\n")
    return {"categories": results, "time": time_summary}
