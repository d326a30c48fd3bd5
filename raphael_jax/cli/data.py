"""``raphael-data``: build the tfds datasets (array_record, no TensorFlow).

    raphael-data image-text /data/laion_shards --data-dir /data/tfds --name laion_a47 --min-aesthetic 4.7
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from raphael_jax.data.real.builder import build_image_text_dataset
from raphael_jax.data.real.sources import IMAGE_FORMATS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m raphael_jax.data.real.sources",
        description="Build the image_text tfds dataset (array_record) from image folders / wds shards.")
    p.add_argument("sources", nargs="+", help="directories, .tar shards or globs of them")
    p.add_argument("--data-dir", required=True,
                   help="tfds data_dir; the build lands in DATA_DIR/image_text/NAME/1.0.0")
    p.add_argument("--name", default=None, help="config name (default: derived from the sources and options)")
    p.add_argument("--scale-divisor", type=int, default=1, help="divide the bucket sizes (1, 2, 4, ..., 64)")
    p.add_argument("--min-aesthetic", type=float, default=4.7, help="keep aesthetic >= this (negative: off)")
    p.add_argument("--max-watermark", type=float, default=0.5,
                   help="keep watermark probability <= this (negative: off)")
    p.add_argument("--edge-source", default="canny", help="edge map source name, or 'none'")
    p.add_argument("--image-format", default="png", choices=IMAGE_FORMATS)
    p.add_argument("--jpeg-quality", type=int, default=95)
    a = p.parse_args(argv)
    b = build_image_text_dataset(
        a.data_dir, a.sources, name=a.name, scale_divisor=a.scale_divisor,
        min_aesthetic=None if a.min_aesthetic < 0 else a.min_aesthetic,
        max_watermark=None if a.max_watermark < 0 else a.max_watermark,
        edge_source=None if a.edge_source.lower() == "none" else a.edge_source,
        image_format=a.image_format, jpeg_quality=a.jpeg_quality)
    meta = json.loads((Path(b.data_dir) / "metadata.json").read_text())
    print(f"built {b.data_dir}: {meta['stats']}")
    print(f"bucket counts: {meta['bucket_counts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
