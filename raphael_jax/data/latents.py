"""The precomputed latent record format and its reader (what the trainer's ``data.kind = "latents"`` reads).

The offline pass that writes it is :mod:`raphael_jax.tools.precompute` (``raphael-precompute``): VAE
latents + CLIP text states + masks + edge maps of an image_text build, encoded once per example.

Output directory::

    meta.json                                    format, settings, buckets (pixel and latent sizes)
    null_text.npz                                text_states float32 [L, D], mask bool [L], tokens int32 [L]
    b<id>_<H>x<W>/part-<i>-of-<n>.array_record   host i's examples of bucket <id>
    done-<i>-of-<n>.json                         host i's files and record counts (written last)

Readers require every host's ``done`` file.

**Record format** (no pickle anywhere): a msgpack map ``{"arrays": {name: .npy bytes}, "text":
{name: str}, "ints": {name: int}}``. Each array is ``np.save`` output, read back with
``np.load(..., allow_pickle=False)``: ``latents`` [h, w, C] and ``text_states`` [L, D] in
``store_dtype`` (float32 or float16), ``mask`` bool [L], ``edges`` uint8 [h, w] (strength * 255).
Texts: ``caption``, ``key``; ints: ``index`` (position in the build), ``bucket``.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import grain
import msgpack
import numpy as np

from raphael_jax.data.real.buckets import BucketBatchPlan

__all__ = ["ENCODERS_FILE", "LatentsSource", "encoders_record", "make_latents_iterator", "pack_record",
           "unpack_record"]

FORMAT = "raphael_latents"
VERSION = 1
META = "meta.json"
NULL_FILE = "null_text.npz"
STORE_DTYPES = ("float32", "float16")


# What a latent run needs to be sampled, written by the trainer into the workdir (from the latents'
# meta.json) and read by ``raphael_jax.train.checkpoint.load_run``: the frozen encoders' locations and
# settings as trained.
ENCODERS_FILE = "encoders.json"
_RECORD_KEYS = ("clip", "tokenizer", "text_layer", "max_len", "text_width", "vae", "latent_channels", "vae_factor",
                "scaling_factor", "shift_factor", "latent")


def encoders_record(meta: dict, latents_dir: str | Path | None = None) -> dict:
    """The run's ``encoders.json`` from a precompute's ``meta.json``: the CLIP folder, tokenizer folder and
    hidden layer (``text_layer``) the text states came from, ``max_len``, ``text_width``; the VAE folder,
    ``latent_channels``, ``vae_factor``, ``scaling_factor`` / ``shift_factor`` the latents were scaled
    with; ``buckets``: the pixel sizes [h, w] trained on (bucket id order)."""
    missing = [k for k in _RECORD_KEYS if k not in meta]
    if missing:
        raise ValueError(f"latents meta.json lacks {missing} (written by an older raphael-precompute?)")
    rec = {"format": "raphael_encoders", "version": 1, **{k: meta[k] for k in _RECORD_KEYS}}
    buckets = meta.get("buckets", {})
    rec["buckets"] = [list(buckets[b]["image_hw"]) for b in sorted(buckets, key=int)]
    if latents_dir is not None:
        rec["latents_dir"] = str(Path(latents_dir).resolve())
    return rec


def done_name(i: int, n: int) -> str:
    """The file host ``i`` of ``n`` writes last (its files and record counts)."""
    return f"done-{i:05d}-of-{n:05d}.json"


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
        missing = [h for h in range(n) if not (self.dir / done_name(h, n)).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.dir}: host(s) {missing} of {n} have not finished the precompute")
        per_bucket: dict[int, list] = {}
        for h in range(n):
            summary = json.loads((self.dir / done_name(h, n)).read_text())
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
    ``batch_size`` is per host; batching follows :class:`~raphael_jax.data.real.buckets.BucketBatchPlan`.
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
