"""grain input pipeline for the shapes world: on-the-fly examples -> model-ready numpy batches.

Each host reads the examples at indices shard_index, shard_index + shard_count, ... of one seeded
stream, so shards are disjoint and the whole stream is reproducible. The returned iterator's
`get_state()` / `set_state()` give the exact position for checkpoints (a small JSON-able dict).
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from raphael_jax.data.edges import get_edge_source
from raphael_jax.data.shapes.tokenizer import Tokenizer
from raphael_jax.data.shapes.world import check_image_size, example

# Default length of the on-the-fly stream: effectively infinite for training.
STREAM_SIZE = 2**40


class ShapesWorldSource:
    """Random-access grain data source: item i is example(seed, i, ...) as {image uint8 HWC, caption str}."""

    def __init__(self, seed: int = 0, image_size: int = 32, min_objects: int = 1, max_objects: int = 3,
                 size: int = STREAM_SIZE, object_weights: Sequence[float] | None = None, stream: int = 0,
                 places: bool = True):
        check_image_size(image_size)
        if not 1 <= min_objects <= max_objects <= 9:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.seed, self.image_size = int(seed), int(image_size)
        self.size, self.stream, self.places = int(size), int(stream), bool(places)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.object_weights = None if object_weights is None else tuple(float(w) for w in object_weights)
        example(0, 0, self.image_size, self.min_objects, self.max_objects, self.object_weights)  # validate

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index) -> dict:
        i = int(index)
        if not 0 <= i < self.size:
            raise IndexError(f"ShapesWorldSource: index {index} out of range [0, {self.size})")
        ex = example(self.seed, i, self.image_size, self.min_objects, self.max_objects,
                     self.object_weights, self.stream, self.places)
        return {"image": ex["image"], "caption": ex["caption"]}

    def __repr__(self) -> str:
        return (f"ShapesWorldSource(seed={self.seed}, image_size={self.image_size}, min_objects="
                f"{self.min_objects}, max_objects={self.max_objects}, size={self.size}, "
                f"object_weights={self.object_weights}, stream={self.stream})")


class Preprocess(grain.transforms.Map):
    """Example -> {image float32 [-1,1] HWC, tokens int32 [L], mask bool [L], edges float32 HW}."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, edge_source: str | None = "canny",
                 include_captions: bool = False, new_words: Sequence[str] = ()):
        self.tokenizer, self.max_len, self.include_captions = tokenizer, int(max_len), include_captions
        self.new_words = tuple(new_words)
        self.edge_fn = None if edge_source is None else get_edge_source(edge_source)

    def map(self, ex: dict) -> dict:
        caption = ex["caption"]
        if isinstance(caption, bytes):  # raw tfds data sources give bytes
            caption = caption.decode("utf-8")
        ids, mask = self.tokenizer.encode([caption], self.max_len, self.new_words)
        out = {"image": ex["image"].astype(np.float32) / 127.5 - 1.0, "tokens": ids[0], "mask": mask[0]}
        if self.edge_fn is not None:
            out["edges"] = np.asarray(self.edge_fn(ex["image"]), np.float32)
        if self.include_captions:
            out["caption"] = caption
        return out


def shapes_dataset(source, batch_size: int, tokenizer: Tokenizer, max_len: int,
                   edge_source: str | None = "canny", shard_index: int = 0, shard_count: int = 1,
                   include_captions: bool = False, drop_remainder: bool = True,
                   new_words: Sequence[str] = ()) -> grain.MapDataset:
    """MapDataset of batches over this host's shard of any random-access source of {image, caption}."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    ds = ds.map(Preprocess(tokenizer, max_len, edge_source, include_captions, new_words))
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def make_train_iterator(seed: int, image_size: int, min_objects: int, max_objects: int, batch_size: int,
                        tokenizer: Tokenizer, max_len: int, edge_source: str | None = "canny",
                        shard_index: int = 0, shard_count: int = 1,
                        object_weights: Sequence[float] | None = None, stream: int = 0,
                        num_threads: int = 2, prefetch_buffer_size: int = 8, num_workers: int = 0,
                        include_captions: bool = False, source=None, new_words: Sequence[str] = ()
                        ) -> grain.DatasetIterator:
    """Checkpointable iterator of host-local batches from the on-the-fly shapes world.

    Batches: image float32 [B,H,W,3] in [-1,1], tokens int32 [B,L], mask bool [B,L], edges float32
    [B,H,W] in {0,1} (absent if edge_source is None), caption (only with include_captions).
    `object_weights` weighs how often min..max objects appear. `num_threads` reader threads prefetch up
    to `prefetch_buffer_size` batches; `num_workers` > 0 adds grain multiprocessing workers. ``source``
    replaces the world's stream (the fine-tuning subject, raphael_jax/data/shapes/subject.py), whose
    ``new_words`` encode as ``<unk>`` without a warning.
    """
    if source is None:
        source = ShapesWorldSource(seed, image_size, min_objects, max_objects, object_weights=object_weights,
                                   stream=stream)
    ds = shapes_dataset(source, batch_size, tokenizer, max_len, edge_source, shard_index, shard_count,
                        include_captions, new_words=new_words)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch_buffer_size))
    if num_workers > 0:
        from absl import flags  # grain workers read absl flags; parse them when absl.app did not
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it_ds)
