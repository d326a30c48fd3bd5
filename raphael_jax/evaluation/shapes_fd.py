"""Shapes Frechet distance (SFD): an FID-like distribution distance for the captioned-shapes world.

The FID Inception was trained on ImageNet photos and says little about 32x32 coloured shapes on
black. SFD uses the same Frechet distance (:func:`raphael_jax.evaluation.fid.frechet_distance`)
in the feature space of a small CNN trained on the world itself: on single-object scenes it learns
to classify the object's colour (8), kind (3), size (2) and place (9) from the image, so its
penultimate layer encodes exactly the attributes captions talk about. SFD is NOT comparable with
FID numbers; report it as "SFD" with the feature net file it used.

    features(x) = SiLU(W_f flatten(conv stack(x)))                      [B, feature_dim]
    SFD(gen, real) = ||mu_g - mu_r||^2 + Tr(C_g + C_r - 2 (C_g C_r)^(1/2))

Commands (``raphael_jax.cli.eval``)::

    raphael-eval sfd train --out weights/shapes_fd.safetensors   # 800 steps, ~80 s of CPU
    raphael-eval sfd score --net weights/shapes_fd.safetensors --workdir RUN

``score`` (:func:`score_run`) samples held-out prompts (stream 1) with the run's EMA weights and
compares them with the world's own renderings of the same held-out scenes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from raphael_jax.data.shapes.world import COLOURS, KINDS, PLACES, SIZES, example
from raphael_jax.evaluation.fid import FeatureExtractor, feature_statistics, frechet_distance

__all__ = [
    "HEADS",
    "ShapesFeatureNet",
    "ShapesNetConfig",
    "labelled_batch",
    "load_feature_net",
    "real_images",
    "save_feature_net",
    "score_run",
    "shapes_frechet_distance",
    "train_feature_net",
]

FORMAT = "raphael_jax.shapes_fd/1"
HEADS = {"colour": len(COLOURS), "kind": len(KINDS), "size": len(SIZES), "place": len(PLACES)}


@dataclasses.dataclass(frozen=True)
class ShapesNetConfig:
    image_size: int = 32  # inputs are resized to this (bilinear) first
    widths: tuple[int, ...] = (32, 64, 64)  # conv widths; each after the first halves the resolution
    feature_dim: int = 64

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ShapesFeatureNet(nnx.Module):
    """conv3x3 -> [conv3x3 stride 2]* -> flatten -> dense (features) -> four attribute heads."""

    def __init__(self, cfg: ShapesNetConfig = ShapesNetConfig(), *, rngs: nnx.Rngs):
        self.config = cfg
        w = cfg.widths
        self.stem = nnx.Conv(3, w[0], (3, 3), padding="SAME", rngs=rngs)
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
                for a, b in zip(w, w[1:] + w[-1:])
            ]
        )
        side = cfg.image_size // 2 ** len(self.convs)
        self.dense = nnx.Linear(side * side * w[-1], cfg.feature_dim, rngs=rngs)
        self.heads = nnx.Dict({k: nnx.Linear(cfg.feature_dim, n, rngs=rngs) for k, n in HEADS.items()})

    def features(self, x: jax.Array) -> jax.Array:
        """Features of float NHWC images in [-1, 1] at any size."""
        s = self.config.image_size
        if x.shape[1:3] != (s, s):
            x = jax.image.resize(x, (x.shape[0], s, s, x.shape[3]), "linear")
        h = jax.nn.silu(self.stem(x))
        for conv in self.convs:
            h = jax.nn.silu(conv(h))
        return jax.nn.silu(self.dense(h.reshape(h.shape[0], -1)))

    def features_uint8(self, images: jax.Array) -> jax.Array:
        return self.features(images.astype(jnp.float32) / 127.5 - 1.0)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


# ------------------------------------------------------------------------------------------- data


def labelled_batch(seed: int, start: int, batch_size: int, image_size: int = 32, stream: int = 0):
    """Single-object scenes ``start .. start+batch_size-1`` of the world stream: uint8 images and
    int32 labels per attribute."""
    images, labels = [], {k: [] for k in HEADS}
    colours = list(COLOURS)
    for i in range(start, start + batch_size):
        ex = example(seed, i, image_size, min_objects=1, max_objects=1, stream=stream)
        o = ex["objects"][0]
        images.append(ex["image"])
        labels["colour"].append(colours.index(o.colour))
        labels["kind"].append(KINDS.index(o.kind))
        labels["size"].append(SIZES.index(o.size))
        labels["place"].append(o.place_index)
    return np.stack(images), {k: np.asarray(v, np.int32) for k, v in labels.items()}


def real_images(
    num: int,
    seed: int = 1234,
    image_size: int = 32,
    min_objects: int = 1,
    max_objects: int = 3,
    stream: int = 1,
) -> tuple[np.ndarray, list[str], list]:
    """``num`` world renderings (held-out stream 1 by default): images, captions, object lists."""
    exs = [example(seed, i, image_size, min_objects, max_objects, stream=stream) for i in range(num)]
    return np.stack([e["image"] for e in exs]), [e["caption"] for e in exs], [e["objects"] for e in exs]


# --------------------------------------------------------------------------------------- training


def _loss(model: ShapesFeatureNet, x, labels):
    logits = model(x)
    losses = {k: optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[k]).mean() for k in HEADS}
    acc = {k: (logits[k].argmax(-1) == labels[k]).mean() for k in HEADS}
    return sum(losses.values()), acc


def _numpy_init(cfg: ShapesNetConfig, seed: int):
    """LeCun-normal kernels and zero biases drawn with numpy: JAX's random init compiles slowly on CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ShapesFeatureNet(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(state):
        shape = tuple(var.shape)
        if path[-1] == "kernel":
            value = rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[:-1])), shape)
        else:
            value = np.zeros(shape)
        flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
    return graphdef, nnx.from_flat_state(flat)


def train_feature_net(
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    cfg: ShapesNetConfig = ShapesNetConfig(),
    eval_size: int = 512,
    log_every: int = 100,
    verbose: bool = True,
) -> tuple[ShapesFeatureNet, dict[str, Any]]:
    """Trains the feature net on single-object scenes (stream 0, seed ``seed``); returns it with
    held-out accuracies (stream 1) per attribute."""
    graphdef, params = _numpy_init(cfg, seed)
    tx = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), max(steps, 2)),
        weight_decay=1e-4,
    )
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, labels):
        def loss_fn(p):
            return _loss(nnx.merge(graphdef, p), x, labels)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, acc

    t0 = time.time()
    to_x = lambda im: jnp.asarray(im, jnp.float32) / 127.5 - 1.0
    for i in range(steps):
        images, labels = labelled_batch(seed, i * batch_size, batch_size, cfg.image_size)
        params, opt, loss, acc = step(params, opt, to_x(images), labels)
        if verbose and (i + 1) % log_every == 0:
            print(
                f"step {i + 1}/{steps} loss {float(loss):.4f} "
                + " ".join(f"{k} {float(v):.2f}" for k, v in acc.items())
                + f" ({(i + 1) / (time.time() - t0):.1f} steps/s)",
                flush=True,
            )
    model = nnx.merge(graphdef, params)
    images, labels = labelled_batch(seed, 0, eval_size, cfg.image_size, stream=1)
    _, acc = jax.jit(lambda p, x, y: _loss(nnx.merge(graphdef, p), x, y))(params, to_x(images), labels)
    metrics = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "seconds": time.time() - t0,
        "heldout_accuracy": {k: float(v) for k, v in acc.items()},
    }
    return model, metrics


# ---------------------------------------------------------------------------------------- file io


def save_feature_net(model: ShapesFeatureNet, path: str | Path, metrics: dict | None = None) -> Path:
    """safetensors with the parameters (``stem.kernel``, ...) and the config in the metadata."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tensors = {".".join(str(p) for p in k): np.asarray(v[...]) for k, v in flat}
    meta = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "metrics": json.dumps(metrics or {}),
    }
    save_file(tensors, str(path), metadata=meta)
    return path


def load_feature_net(path: str | Path) -> tuple[ShapesFeatureNet, dict[str, Any]]:
    """The net and its training metrics, from :func:`save_feature_net`'s file (FileNotFoundError / a one-line
    ValueError naming the file when it is missing, corrupt or another kind of file)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (train the net with `raphael-eval sfd train --out FILE`)")
    hint = "train it again with `raphael-eval sfd train --out FILE`"
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a shapes feature net (format {meta.get('format')!r}): {hint}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file (truncated or corrupt? "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}): {hint}") from None
    raw = json.loads(meta["config"])
    cfg = ShapesNetConfig(**{**raw, "widths": tuple(raw["widths"])})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ShapesFeatureNet(cfg, rngs=nnx.Rngs(0))))
    flat = list(nnx.to_flat_state(state))
    names = {".".join(str(p) for p in k) for k, _ in flat}
    if names != set(tensors):
        raise ValueError(
            f"{path}: tensors do not match the net: missing {sorted(names - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - names)}"
        )
    new = [(k, v.replace(jnp.asarray(tensors[".".join(str(p) for p in k)], v.dtype))) for k, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(new)), json.loads(meta.get("metrics", "{}"))


# -------------------------------------------------------------------------------------------- SFD


def shapes_frechet_distance(extract, images_a: np.ndarray, images_b: np.ndarray) -> float:
    """SFD between two sets of uint8 images; ``extract`` is a :class:`FeatureExtractor` (or a net)."""
    if isinstance(extract, ShapesFeatureNet):
        extract = FeatureExtractor(extract, batch_size=256)
    return frechet_distance(*feature_statistics(extract(images_a)), *feature_statistics(extract(images_b)))


def score_run(
    net_path: str | Path,
    workdir: str | Path,
    *,
    num: int = 1000,
    objects: tuple[int, int] = (1, 3),
    seed: int = 1234,
    guidance: float | None = None,
    num_steps: int | None = None,
) -> tuple[float, Path]:
    """SFD of a run's samples (latest checkpoint, EMA weights) for ``num`` held-out scenes of
    ``objects = (min, max)`` objects against the world's renderings of the same scenes.

    Writes ``WORKDIR/eval/sfd_step{N}.json`` and returns ``(sfd, that path)``; ``guidance`` /
    ``num_steps`` None: the run's config.
    """
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.checkpoint import load_run

    lo, hi = objects
    net, _ = load_feature_net(net_path)
    sampler = Sampler.from_run(load_run(workdir))
    real, captions, _ = real_images(num, seed, sampler.config.data.image_size, lo, hi)
    gen = sampler.sample(captions, seed=seed, guidance=guidance, num_steps=num_steps)
    sfd = shapes_frechet_distance(net, gen, real)
    out = Path(workdir) / "eval" / f"sfd_step{sampler.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "sfd": sfd,
                "num": num,
                "objects": [lo, hi],
                "net": str(net_path),
                "guidance": guidance,
                "steps": num_steps,
                "step": sampler.step,
            },
            indent=1,
        )
    )
    return sfd, out
