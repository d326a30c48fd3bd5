"""tensorflow_datasets builder writing fixed shapes-world splits as array_record files (no TensorFlow).

Train example i is `example(seed, i, stream=0)`, test example i is `example(seed, i, stream=1)`, so
the test split never overlaps the on-the-fly training stream of the same seed. Images are stored as
raw uint8 tensors (tfds Image features need TensorFlow); read splits with `as_data_source`
(`load_shapes_split` below), e.g. into `pipeline.shapes_dataset`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from raphael_jax.data.shapes.world import check_image_size, example

SPLIT_STREAMS = {"train": 0, "test": 1}


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """Which scenes a build holds; the config name encodes every field."""

    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 3
    num_train: int = 1000
    num_test: int = 100
    seed: int = 0


def make_config(image_size: int = 32, num_train: int = 1000, num_test: int = 100, min_objects: int = 1,
                max_objects: int = 3, seed: int = 0) -> ShapesWorldConfig:
    """A validated config named like 's32_o1-3_n1000-100_seed0'."""
    check_image_size(image_size)
    if not 1 <= min_objects <= max_objects <= 9:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}")
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    name = f"s{image_size}_o{min_objects}-{max_objects}_n{num_train}-{num_test}_seed{seed}"
    return ShapesWorldConfig(name=name, version=ShapesWorld.VERSION, image_size=int(image_size),
                             min_objects=int(min_objects), max_objects=int(max_objects),
                             num_train=int(num_train), num_test=int(num_test), seed=int(seed))


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """The captioned-shapes world: image uint8 [S,S,3], caption text, index in its split's stream."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [ShapesWorldConfig(name="s32_o1-3_n1000-100_seed0", version=VERSION)]

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' default resolves package modules through `importlib_resources`, which is not installed.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural scenes of 1-3 coloured shapes on black with checkable captions.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=None,
            disable_shuffling=True,  # position i in a split is stream index i
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        splits = {"train": self._generate_examples("train", c.num_train)}
        if c.num_test > 0:
            splits["test"] = self._generate_examples("test", c.num_test)
        return splits

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        for i in range(n):
            ex = example(c.seed, i, c.image_size, c.min_objects, c.max_objects, stream=SPLIT_STREAMS[split])
            yield i, {"image": ex["image"], "caption": ex["caption"], "index": i}


def build_shapes_dataset(data_dir: str | os.PathLike, image_size: int = 32, num_train: int = 1000,
                         num_test: int = 100, min_objects: int = 1, max_objects: int = 3,
                         seed: int = 0) -> ShapesWorld:
    """Build (offline; a no-op if already built) the splits under data_dir and return the builder."""
    config = make_config(image_size, num_train, num_test, min_objects, max_objects, seed)
    builder = ShapesWorld(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


class _DecodedSource:
    """Random-access view of a tfds data source with captions as str."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> dict:
        ex = dict(self._source[index])
        cap = ex["caption"]
        ex["caption"] = cap.decode("utf-8") if isinstance(cap, bytes) else str(cap)
        return ex


def load_shapes_split(data_dir: str | os.PathLike, split: str = "train", image_size: int = 32,
                      num_train: int = 1000, num_test: int = 100, min_objects: int = 1, max_objects: int = 3,
                      seed: int = 0) -> _DecodedSource:
    """Random-access source {image uint8, caption str, index} of a built split; FileNotFoundError if none."""
    config = make_config(image_size, num_train, num_test, min_objects, max_objects, seed)
    builder = ShapesWorld(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    if not builder.is_prepared():
        raise FileNotFoundError(f"load_shapes_split: no {config.name} build under {os.fspath(data_dir)!r}; "
                                "run build_shapes_dataset first")
    if split not in builder.info.splits:
        raise ValueError(f"load_shapes_split: unknown split {split!r}; have {sorted(builder.info.splits)}")
    return _DecodedSource(builder.as_data_source(split=split))
