"""Offline pass: image_text build -> VAE latents + CLIP text states + masks + edge maps (array_record).

Latent diffusion spends most of a step in the frozen encoders when they run inside the trainer.
This pass runs them once per example (the paper's KL-f8 VAE and OpenCLIP ViT-g/14 text tower, Sec. 4.1):

- **latents**: ``(z - shift_factor) * scaling_factor`` of the VAE posterior's mean (``latent="mean"``,
  default) or of a sample ``mean + std * eps`` (``latent="sample"``, ``eps`` drawn from
  ``fold_in(key(seed), example index)``, so it does not depend on batching or the number of hosts);
- **text_states**: CLIP text states of the caption tokenized to ``max_len`` = 77 tokens, layer
  ``text_layer``: ``"last"`` (``last_hidden_state``, after the final LayerNorm: E_theta(y) as in the
  paper and SD 1.x), ``"penultimate"`` (``hidden_states[-2]``, no final LayerNorm: SDXL) or
  ``"penultimate_ln"`` (the final LayerNorm applied to ``hidden_states[-2]``: SD 2.x), or an int index
  into ``hidden_states``. The encoder runs without an attention mask (causal, as SD does);
- **mask**: the tokenizer's mask (True on SOT, the caption's tokens and EOT);
- **edges**: the build's pixel edge map max-pooled by the VAE factor to latent resolution.

The empty prompt's states and mask (for classifier-free caption dropout) are stored once, in
``null_text.npz``. Record format and reader: :mod:`raphael_jax.data.latents`.

Command: ``raphael-precompute`` (:mod:`raphael_jax.cli.precompute`).
"""
from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import grain
import numpy as np

from raphael_jax.convert.frozen import load_clip, load_vae
from raphael_jax.data.edges import pool_edges
from raphael_jax.data.latents import FORMAT, META, NULL_FILE, STORE_DTYPES, VERSION, done_name, pack_record
from raphael_jax.models.clip_text import TEXT_LAYERS, check_text_layer, text_states

__all__ = ["TEXT_LAYERS", "Encoders", "load_clip", "load_vae", "precompute"]


# ----------------------------------------------------------------------------------- encoders
class Encoders:
    """The frozen VAE encoder and CLIP text tower as jitted functions over numpy batches."""

    def __init__(self, vae_dir, clip_dir, tokenizer_dir=None, latent: str = "mean", text_layer="last",
                 max_len: int = 77, seed: int = 0):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from raphael_jax.data.real.clip_tokenizer import load_clip_tokenizer

        if latent not in ("mean", "sample"):
            raise ValueError(f"latent must be 'mean' or 'sample', got {latent!r}")
        self.latent, self.text_layer, self.max_len = latent, check_text_layer(text_layer), int(max_len)
        self.seed, self.dirs = int(seed), (vae_dir, clip_dir, tokenizer_dir)
        vae, self.vae_cfg = load_vae(vae_dir)
        clip, self.clip_cfg = load_clip(clip_dir)
        if self.clip_cfg.max_position_embeddings < self.max_len:
            raise ValueError(f"CLIP text tower has {self.clip_cfg.max_position_embeddings} positions, "
                             f"fewer than max_len={self.max_len}")
        self.tokenizer = load_clip_tokenizer(tokenizer_dir or clip_dir)
        if self.tokenizer.vocab_size > self.clip_cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens, the CLIP tower only "
                             f"{self.clip_cfg.vocab_size}: use the tokenizer that belongs to {clip_dir}")
        self.factor = self.vae_cfg.downsample_factor
        self.text_width = self.clip_cfg.hidden_size
        self.base_key = jax.random.key(seed)
        scale, shift = float(vae.scaling_factor), float(vae.shift_factor)
        vg, vs = nnx.split(vae)
        cg, cs = nnx.split(clip)
        self._vae_state, self._clip_state = vs, cs
        sample = latent == "sample"
        layer = self.text_layer

        def enc_images(state, x, idx, base_key):
            mean, logvar = nnx.merge(vg, state).encode(x)
            z = mean
            if sample:
                keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(idx)
                eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
                z = mean + jnp.exp(0.5 * logvar) * eps
            return ((z - shift) * scale).astype(jnp.float32)

        def enc_text(state, ids):
            return text_states(nnx.merge(cg, state), ids, layer)

        self._enc_images, self._enc_text = jax.jit(enc_images), jax.jit(enc_text)

    def images(self, images_uint8: np.ndarray, indices: np.ndarray) -> np.ndarray:
        x = images_uint8.astype(np.float32) / 127.5 - 1.0
        return np.asarray(self._enc_images(self._vae_state, x, np.asarray(indices, np.uint32), self.base_key))

    def text(self, captions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, mask = self.tokenizer.encode(list(captions), self.max_len)
        return np.asarray(self._enc_text(self._clip_state, ids)), mask.astype(bool), ids


# ----------------------------------------------------------------------------------- the pass


def precompute(dataset, vae_dir, clip_dir, out_dir, tokenizer_dir=None, latent: str = "mean",
               text_layer="last", batch_size: int = 8, host_index: int | None = None,
               host_count: int | None = None, seed: int = 0, store_dtype: str = "float32",
               max_len: int = 77, num_threads: int = 4, limit: int | None = None, verbose: bool = True,
               encoders: Encoders | None = None) -> dict:
    """Encode this host's share of an image_text build into ``out_dir``; returns this host's summary.

    Args:
      dataset: the image_text build directory (or a parent holding only one build).
      vae_dir, clip_dir: safetensors folders (diffusers AutoencoderKL / transformers CLIP text) or
        ``raphael-convert`` outputs. ``tokenizer_dir``: vocab.json + merges.txt (default clip_dir).
      latent: "mean" or "sample"; text_layer: see the module docstring.
      batch_size: examples per encoder call (one bucket per call; partial batches are padded).
      host_index, host_count: this host's share (default: jax.process_index(), jax.process_count()).
      store_dtype: "float32" or "float16" for latents and text states.
      limit: only the first ``limit`` examples of the build (before sharding; for quick checks).
      encoders: reuse loaded :class:`Encoders` (and their compiled functions); then vae_dir,
        clip_dir, tokenizer_dir, latent, text_layer, max_len and seed are taken from it.
    """
    import jax
    from array_record.python.array_record_module import ArrayRecordWriter

    from raphael_jax.data.real.pipeline import load_image_text

    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    i = jax.process_index() if host_index is None else int(host_index)
    n = jax.process_count() if host_count is None else int(host_count)
    if not 0 <= i < n:
        raise ValueError(f"need 0 <= host_index < host_count, got {i}, {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = out / done_name(i, n)
    if done.is_file():
        if verbose:
            print(f"precompute: host {i}/{n} already done ({done}); skipping")
        return json.loads(done.read_text())
    others = [p for p in glob.glob(str(out / "done-*.json")) if not p.endswith(f"-of-{n:05d}.json")]
    if others:
        raise ValueError(f"{out} holds a precompute for another host count ({others[0]}); use a new dir")

    source = load_image_text(dataset)
    meta_src = source.metadata
    buckets = [tuple(hw) for hw in meta_src.get("buckets", [])]
    enc = encoders or Encoders(vae_dir, clip_dir, tokenizer_dir, latent, text_layer, max_len, seed)
    if encoders is not None:
        vae_dir, clip_dir, tokenizer_dir = enc.dirs
        latent, seed = enc.latent, enc.seed
    f = enc.factor
    bad = [hw for hw in buckets if hw[0] % f or hw[1] % f]
    if bad:
        raise ValueError(f"bucket sizes {bad} are not divisible by the VAE factor {f}; build the dataset "
                         "with a smaller scale_divisor")
    total = len(source) if limit is None else min(len(source), int(limit))
    dtype = np.dtype(store_dtype)

    meta = {
        "format": FORMAT, "version": VERSION, "host_count": n, "dataset": str(source.path),
        "num_examples": total, "vae": os.path.abspath(vae_dir), "clip": os.path.abspath(clip_dir),
        "tokenizer": os.path.abspath(tokenizer_dir or clip_dir), "latent": latent,
        "text_layer": enc.text_layer, "max_len": enc.max_len, "text_width": enc.text_width,
        "latent_channels": enc.vae_cfg.latent_channels, "vae_factor": f,
        "scaling_factor": enc.vae_cfg.scaling_factor, "shift_factor": enc.vae_cfg.shift_factor,
        "store_dtype": store_dtype, "seed": seed, "edge_source": meta_src.get("edge_source"),
        "buckets": {str(b): {"image_hw": list(hw), "latent_hw": [hw[0] // f, hw[1] // f]}
                    for b, hw in enumerate(buckets)},
    }
    if i == 0:
        states, mask, ids = enc.text([""])
        np.savez(out / NULL_FILE, text_states=states[0], mask=mask[0], tokens=ids[0].astype(np.int32))
        (out / META).write_text(json.dumps(meta, indent=1))

    ds = grain.MapDataset.range(i, total, n).map(lambda k: (k, source[k]))
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=4 * batch_size)))
    writers: dict = {}
    files: dict[int, str] = {}
    counts: dict[int, int] = {}
    pending: dict[int, list] = {}
    t0, done_n = time.time(), 0

    def flush(b: int):
        nonlocal done_n
        items = pending.pop(b, [])
        if not items:
            return
        real = len(items)
        items = items + [items[-1]] * (batch_size - real)  # pad: one compiled shape per bucket
        idx = np.asarray([k for k, _ in items], np.int64)
        imgs = np.stack([ex["image"] for _, ex in items])
        lat = enc.images(imgs, idx)
        states, masks, _ = enc.text([ex["caption"] for _, ex in items])
        if b not in writers:
            hw = buckets[b]
            d = out / f"b{b}_{hw[0]}x{hw[1]}"
            d.mkdir(exist_ok=True)
            files[b] = str(d / f"part-{i:05d}-of-{n:05d}.array_record")
            writers[b] = ArrayRecordWriter(files[b], "group_size:1")
            counts[b] = 0
        for r in range(real):
            k, ex = items[r]
            if "edges" in ex:
                e = pool_edges(ex["edges"], f)
            else:
                e = np.zeros(lat.shape[1:3], np.float32)
            arrays = {"latents": lat[r].astype(dtype), "text_states": states[r].astype(dtype),
                      "mask": masks[r], "edges": np.round(np.clip(e, 0, 1) * 255).astype(np.uint8)}
            writers[b].write(pack_record(arrays, {"caption": ex["caption"], "key": ex.get("key", "")},
                                         {"index": k, "bucket": b}))
        counts[b] += real
        done_n += real

    for k, ex in it:
        b = int(ex["bucket"])
        pending.setdefault(b, []).append((k, ex))
        if len(pending[b]) == batch_size:
            flush(b)
            if verbose and done_n % (batch_size * 50) == 0:
                rate = done_n / max(time.time() - t0, 1e-9)
                print(f"precompute host {i}/{n}: {done_n} examples, {rate:.1f}/s", flush=True)
    for b in sorted(pending):
        flush(b)
    for w in writers.values():
        w.close()
    summary = {"host_index": i, "host_count": n, "examples": done_n,
               "files": {str(b): {"path": os.path.relpath(files[b], out), "count": counts[b]}
                         for b in sorted(files)},
               "seconds": round(time.time() - t0, 2)}
    done.write_text(json.dumps(summary, indent=1))
    if verbose:
        print(f"precompute host {i}/{n}: wrote {done_n} examples in {summary['seconds']} s to {out}")
    return summary
