"""Offline pass: image_text build -> VAE latents + CLIP text states + masks + edge maps (array_record).

Latent diffusion spends most of a step in the frozen encoders when they run inside the trainer.
This pass runs them once per example (PAPER.md sections 1 and 6: KL-f8 VAE, OpenCLIP ViT-g/14):

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
``null_text.npz``.

Output directory (``out_dir``)::

    meta.json                                    format, settings, buckets (pixel and latent sizes)
    null_text.npz                                text_states float32 [L, D], mask bool [L], tokens int32 [L]
    b<id>_<H>x<W>/part-<i>-of-<n>.array_record   host i's examples of bucket <id>
    done-<i>-of-<n>.json                         host i's files and record counts (written last)

Host ``i`` of ``n`` (``--host-index/--host-count``, default ``jax.process_index()/process_count()``)
processes examples ``i, i + n, ...`` of the build and writes only its own files; host 0 also writes
``meta.json`` and ``null_text.npz``. A host whose ``done`` file exists is skipped, so re-running after a
failure redoes only unfinished hosts. Readers require every host's ``done`` file.

**Record format** (no pickle anywhere): a msgpack map ``{"arrays": {name: .npy bytes}, "text":
{name: str}, "ints": {name: int}}``. Each array is ``np.save`` output, read back with
``np.load(..., allow_pickle=False)``: ``latents`` [h, w, C] and ``text_states`` [L, D] in
``store_dtype`` (float32 or float16), ``mask`` bool [L], ``edges`` uint8 [h, w] (strength * 255).
Texts: ``caption``, ``key``; ints: ``index`` (position in the build), ``bucket``.

Reading for training: :func:`make_latents_iterator` (the trainer's ``data.kind = "latents"``).

Command (also the ``raphael-precompute`` console script)::

    python -m raphael_jax.data.precompute --dataset DATA_DIR/image_text/NAME/1.0.0 \\
        --vae weights/sd-vae-ft-mse --clip weights/clip-vit-g-14 --out latents/NAME
    python -m raphael_jax.data.precompute --config configs/small_latent.py   # dirs from data.*
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import time
import warnings
from pathlib import Path

import grain
import msgpack
import numpy as np

from raphael_jax.data.buckets import BucketBatchPlan
from raphael_jax.data.edges import pool_edges

__all__ = [
    "LatentsSource",
    "load_clip",
    "load_vae",
    "make_latents_iterator",
    "pack_record",
    "precompute",
    "unpack_record",
]

FORMAT = "raphael_latents"
VERSION = 1
META = "meta.json"
NULL_FILE = "null_text.npz"
TEXT_LAYERS = ("last", "penultimate", "penultimate_ln")
STORE_DTYPES = ("float32", "float16")


# ----------------------------------------------------------------------------------- records
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def pack_record(arrays: dict, text: dict | None = None, ints: dict | None = None) -> bytes:
    """One record: msgpack of .npy bytes per array plus plain strings and ints (no pickle)."""
    return msgpack.packb({"arrays": {k: _npy(np.asarray(v)) for k, v in arrays.items()},
                          "text": dict(text or {}), "ints": {k: int(v) for k, v in (ints or {}).items()}},
                         use_bin_type=True)


def unpack_record(data: bytes) -> dict:
    """Inverse of :func:`pack_record`: a flat dict of numpy arrays, strs and ints."""
    rec = msgpack.unpackb(data, raw=False)
    out = {k: np.load(io.BytesIO(v), allow_pickle=False) for k, v in rec["arrays"].items()}
    out.update(rec.get("text", {}))
    out.update(rec.get("ints", {}))
    return out


# ----------------------------------------------------------------------------------- encoders
def _is_conversion(path) -> bool:
    return (Path(path) / "raphael_convert.json").is_file()


def load_vae(path):
    """(AutoencoderKL, config) from a diffusers safetensors folder or a ``convert.cli vae`` output."""
    if _is_conversion(path):
        from raphael_jax.convert import load_converted
        return load_converted(path)
    from raphael_jax.convert import load_autoencoder
    return load_autoencoder(path)


def load_clip(path):
    """(CLIPTextTransformer, config) from a transformers safetensors folder or a convert.cli output."""
    if _is_conversion(path):
        from raphael_jax.convert import load_converted
        return load_converted(path)
    from raphael_jax.convert import load_clip_text
    return load_clip_text(path)


def _check_text_layer(text_layer):
    if isinstance(text_layer, str) and text_layer.lstrip("-").isdigit():
        text_layer = int(text_layer)
    if not isinstance(text_layer, int) and text_layer not in TEXT_LAYERS:
        raise ValueError(f"text_layer must be one of {TEXT_LAYERS} or an int index, got {text_layer!r}")
    return text_layer


class Encoders:
    """The frozen VAE encoder and CLIP text tower as jitted functions over numpy batches."""

    def __init__(self, vae_dir, clip_dir, tokenizer_dir=None, latent: str = "mean", text_layer="last",
                 max_len: int = 77, seed: int = 0):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from raphael_jax.data.clip_tokenizer import load_clip_tokenizer

        if latent not in ("mean", "sample"):
            raise ValueError(f"latent must be 'mean' or 'sample', got {latent!r}")
        self.latent, self.text_layer, self.max_len = latent, _check_text_layer(text_layer), int(max_len)
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
            m = nnx.merge(cg, state)
            out = m(ids)
            if layer == "last":
                h = out.last_hidden_state
            elif layer == "penultimate":
                h = out.hidden_states[-2]
            elif layer == "penultimate_ln":
                h = m.final_layer_norm(out.hidden_states[-2])
            else:
                h = out.hidden_states[layer]
            return h.astype(jnp.float32)

        self._enc_images, self._enc_text = jax.jit(enc_images), jax.jit(enc_text)

    def images(self, images_uint8: np.ndarray, indices: np.ndarray) -> np.ndarray:
        x = images_uint8.astype(np.float32) / 127.5 - 1.0
        return np.asarray(self._enc_images(self._vae_state, x, np.asarray(indices, np.uint32), self.base_key))

    def text(self, captions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, mask = self.tokenizer.encode(list(captions), self.max_len)
        return np.asarray(self._enc_text(self._clip_state, ids)), mask.astype(bool), ids


# ----------------------------------------------------------------------------------- the pass
def _done_name(i: int, n: int) -> str:
    return f"done-{i:05d}-of-{n:05d}.json"


def precompute(dataset, vae_dir, clip_dir, out_dir, tokenizer_dir=None, latent: str = "mean",
               text_layer="last", batch_size: int = 8, host_index: int | None = None,
               host_count: int | None = None, seed: int = 0, store_dtype: str = "float32",
               max_len: int = 77, num_threads: int = 4, limit: int | None = None, verbose: bool = True,
               encoders: Encoders | None = None) -> dict:
    """Encode this host's share of an image_text build into ``out_dir``; returns this host's summary.

    Args:
      dataset: the image_text build directory (or a parent holding only one build).
      vae_dir, clip_dir: safetensors folders (diffusers AutoencoderKL / transformers CLIP text) or
        ``raphael_jax.convert.cli`` outputs. ``tokenizer_dir``: vocab.json + merges.txt (default clip_dir).
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

    from raphael_jax.data.image_text import load_image_text

    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    i = jax.process_index() if host_index is None else int(host_index)
    n = jax.process_count() if host_count is None else int(host_count)
    if not 0 <= i < n:
        raise ValueError(f"need 0 <= host_index < host_count, got {i}, {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = out / _done_name(i, n)
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


# ----------------------------------------------------------------------------------- reading
class LatentsSource:
    """Random-access view of a precompute output: item i is a dict of numpy arrays (float32
    ``latents`` [h,w,C], ``text_states`` [L,D], bool ``mask`` [L], float32 ``edges`` [h,w] in [0,1]),
    ``caption``, ``key``, ``index``, ``bucket``. ``bucket_ids`` gives every item's bucket without reading."""

    def __init__(self, latents_dir):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.dir = Path(latents_dir)
        meta_path = self.dir / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.dir}: no {META}; run raphael-precompute first")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a {FORMAT} directory (format {self.meta.get('format')!r})")
        n = int(self.meta["host_count"])
        missing = [h for h in range(n) if not (self.dir / _done_name(h, n)).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.dir}: host(s) {missing} of {n} have not finished the precompute")
        per_bucket: dict[int, list] = {}
        for h in range(n):
            summary = json.loads((self.dir / _done_name(h, n)).read_text())
            for b, entry in summary["files"].items():
                per_bucket.setdefault(int(b), []).append((str(self.dir / entry["path"]), int(entry["count"])))
        paths, ids = [], []
        for b in sorted(per_bucket):
            for p, c in per_bucket[b]:
                paths.append(p)
                ids.append(np.full(c, b, np.int64))
        if not paths:
            raise ValueError(f"{self.dir}: the precompute wrote no examples")
        self._paths = paths
        self._source = ArrayRecordDataSource(paths)
        self.bucket_ids = np.concatenate(ids)
        if len(self._source) != len(self.bucket_ids):
            raise ValueError(f"{self.dir}: files hold {len(self._source)} records, "
                             f"the done files say {len(self.bucket_ids)}")
        with np.load(self.dir / NULL_FILE, allow_pickle=False) as z:
            self.null_text_states = z["text_states"].astype(np.float32)
            self.null_mask = z["mask"].astype(bool)

    def __getstate__(self):
        return {"dir": self.dir}

    def __setstate__(self, state):
        self.__init__(state["dir"])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> dict:
        r = unpack_record(self._source[int(index)])
        r["latents"] = r["latents"].astype(np.float32)
        r["text_states"] = r["text_states"].astype(np.float32)
        r["mask"] = r["mask"].astype(bool)
        r["edges"] = r["edges"].astype(np.float32) / 255.0
        return r


class CollateLatents(grain.transforms.Map):
    """Host batch of indices (one bucket) -> image, text_states, mask, edges, null_text_states, null_mask."""

    def __init__(self, source: LatentsSource, include_null: bool = True, include_captions: bool = False):
        self.source, self.include_null, self.include_captions = source, include_null, include_captions

    def map(self, indices) -> dict:
        exs = [self.source[int(i)] for i in indices]
        b = len(exs)
        out = {"image": np.stack([e["latents"] for e in exs]),
               "text_states": np.stack([e["text_states"] for e in exs]),
               "mask": np.stack([e["mask"] for e in exs]),
               "edges": np.stack([e["edges"] for e in exs])}
        if self.include_null:
            null, null_mask = self.source.null_text_states, self.source.null_mask
            out["null_text_states"] = np.broadcast_to(null, (b, *null.shape))
            out["null_mask"] = np.broadcast_to(null_mask, (b, *null_mask.shape))
        if self.include_captions:
            out["caption"] = [e["caption"] for e in exs]
        return out


def make_latents_iterator(latents_dir, batch_size: int, seed: int = 0, shard_index: int = 0,
                          shard_count: int = 1, num_threads: int = 2, prefetch_buffer_size: int = 4,
                          include_null: bool = True, include_captions: bool = False,
                          expect_text_width: int | None = None,
                          expect_latent_channels: int | None = None) -> grain.DatasetIterator:
    """Checkpointable iterator of per-bucket host batches of precomputed data.

    Batches: image float32 [B,h,w,C] (scaled latents), text_states float32 [B,L,D], mask bool [B,L],
    edges float32 [B,h,w], and (include_null) null_text_states [B,L,D] / null_mask [B,L]: the empty
    prompt, broadcast over the batch, for classifier-free caption dropout in the train step.
    ``batch_size`` is per host; batching follows :class:`~raphael_jax.data.buckets.BucketBatchPlan`.
    """
    source = LatentsSource(latents_dir)
    m = source.meta
    if expect_text_width is not None and int(m["text_width"]) != int(expect_text_width):
        raise ValueError(f"{latents_dir}: text states are {m['text_width']} wide but the model expects "
                         f"{expect_text_width} (set model.context_dim = text.width = {m['text_width']})")
    if expect_latent_channels is not None and int(m["latent_channels"]) != int(expect_latent_channels):
        raise ValueError(f"{latents_dir}: latents have {m['latent_channels']} channels but the model expects "
                         f"{expect_latent_channels} (model.in_channels)")
    plan = BucketBatchPlan(source.bucket_ids, batch_size, seed, shard_index, shard_count)
    if plan.unused_buckets:
        warnings.warn(f"{latents_dir}: buckets {plan.unused_buckets} hold fewer than {plan.global_batch} "
                      "examples and are never served", stacklevel=2)
    ds = grain.MapDataset.source(plan).map(CollateLatents(source, include_null, include_captions))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch_buffer_size)))


# ----------------------------------------------------------------------------------- command
def _from_config(spec: str, overrides) -> dict:
    from raphael_jax.config_lib import load_config

    c = load_config(spec, overrides)
    d = c.data
    get = lambda k, default=None: d[k] if k in d else default
    return {"dataset": get("tfds_dir"), "vae": get("vae_dir"), "clip": get("clip_dir"),
            "tokenizer": get("tokenizer_dir") or None, "out": get("latents_dir"),
            "latent": get("latent_mode", "mean"), "text_layer": get("text_layer", "last"),
            "max_len": int(c.text.max_len), "seed": int(c.data.seed)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="raphael-precompute",
        description="Encode an image_text build with the VAE and CLIP text tower into array_record files.")
    p.add_argument("--config", default=None, help="take the directories from data.* of this config (see "
                   "configs/small_latent.py); the flags below override them")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--dataset", help="image_text build directory (DATA_DIR/image_text/NAME/1.0.0)")
    p.add_argument("--vae", help="VAE folder (diffusers safetensors or convert.cli output)")
    p.add_argument("--clip", help="CLIP text folder (transformers safetensors or convert.cli output)")
    p.add_argument("--tokenizer", help="folder with vocab.json + merges.txt (default: --clip)")
    p.add_argument("--out", help="output directory (the trainer's data.latents_dir)")
    p.add_argument("--latent", choices=("mean", "sample"))
    p.add_argument("--text-layer", help="last | penultimate | penultimate_ln | an int index")
    p.add_argument("--max-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--store-dtype", choices=STORE_DTYPES, default="float32")
    p.add_argument("--host-index", type=int, default=None, help="default: jax.process_index()")
    p.add_argument("--host-count", type=int, default=None, help="default: jax.process_count()")
    p.add_argument("--num-threads", type=int, default=4, help="image decoding threads")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples (quick checks)")
    a = p.parse_args(argv)
    s = {"dataset": None, "vae": None, "clip": None, "tokenizer": None, "out": None, "latent": "mean",
         "text_layer": "last", "max_len": 77, "seed": 0}
    if a.config:
        s.update(_from_config(a.config, a.set))
    for k in s:
        v = getattr(a, k)
        if v is not None:
            s[k] = v
    missing = [k for k in ("dataset", "vae", "clip", "out") if not s[k]]
    if missing:
        p.error(f"missing {', '.join('--' + m for m in missing)} (or the matching data.* config values)")
    if a.host_index is None and a.host_count is None:
        from raphael_jax.parallel.distributed import maybe_initialize
        maybe_initialize()
    precompute(s["dataset"], s["vae"], s["clip"], s["out"], tokenizer_dir=s["tokenizer"], latent=s["latent"],
               text_layer=s["text_layer"], batch_size=a.batch_size, host_index=a.host_index,
               host_count=a.host_count, seed=s["seed"], store_dtype=a.store_dtype, max_len=s["max_len"],
               num_threads=a.num_threads, limit=a.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
