"""``raphael-data``: build the tfds datasets (array_record, no TensorFlow).

    raphael-data image-text /data/laion_shards --data-dir /data/tfds --name laion_a47 --min-aesthetic 4.7
    raphael-data shapes --data-dir /data/tfds --image-size 32 --num-train 1000 --num-test 100
    raphael-data shapes-folder /data/shapes64 --num 5000 --image-size 64
    raphael-data image-text /data/shapes64 --data-dir /data/tfds --buckets 64x64

``image-text``: :func:`raphael_jax.data.real.builder.build_image_text_dataset` (docs/DATA_REAL.md);
``shapes``: the shapes-world splits, :func:`raphael_jax.data.shapes.tfds.build_shapes_dataset` (docs/DATA.md);
``shapes-folder``: the world as a LAION-style image folder,
:func:`raphael_jax.data.shapes.folder.write_shapes_folder` (docs/DATA_REAL.md).

Bad input (a missing or empty source folder, sources without one readable captioned image, a data dir
that is a file, a non-empty output folder) is refused with one line and exit status 2 before anything is
written (``--debug``: the traceback). Unreadable images among good ones are skipped, counted in the
printed stats and named in a ``raphael-data: warning:`` line.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

from raphael_jax.cli import add_debug_flag, run_guarded


def parse_buckets(text: str) -> tuple[tuple[int, int], ...]:
    """``"64x64,32x64"`` -> ((64, 64), (32, 64)) (h x w pixels); argparse.ArgumentTypeError if malformed."""
    from raphael_jax.data.real.buckets import check_buckets

    out = []
    for item in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if m is None:
            raise argparse.ArgumentTypeError(f"expected HxW[,HxW...] (e.g. 64x64), got {text!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    try:
        return check_buckets(out)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from raphael_jax.data.real.sources import IMAGE_FORMATS

    p = argparse.ArgumentParser(prog="raphael-data",
                                description="Build the tfds datasets (array_record, no TensorFlow).")
    sub = p.add_subparsers(dest="what", required=True)
    it = sub.add_parser(
        "image-text", help="image_text dataset from image folders / wds shards",
        description="Build the image_text tfds dataset (array_record) from image folders / wds shards.")
    it.add_argument("sources", nargs="+", help="directories, .tar shards or globs of them")
    it.add_argument("--data-dir", required=True,
                    help="tfds data_dir; the build lands in DATA_DIR/image_text/NAME/1.0.0")
    it.add_argument("--name", default=None, help="config name (default: derived from the sources and options)")
    it.add_argument("--scale-divisor", type=int, default=1, help="divide the bucket sizes (1, 2, 4, ..., 64)")
    it.add_argument("--buckets", type=parse_buckets, default=None, metavar="HxW[,HxW...]",
                    help="custom bucket sizes in pixels instead of the paper's nine (e.g. 64x64; "
                    "not with --scale-divisor)")
    it.add_argument("--min-aesthetic", type=float, default=4.7, help="keep aesthetic >= this (negative: off)")
    it.add_argument("--max-watermark", type=float, default=0.5,
                    help="keep watermark probability <= this (negative: off)")
    it.add_argument("--edge-source", default="canny", help="edge map source name, or 'none'")
    it.add_argument("--image-format", default="png", choices=IMAGE_FORMATS)
    it.add_argument("--jpeg-quality", type=int, default=95)
    sh = sub.add_parser(
        "shapes", help="shapes_world dataset: fixed train / test splits of the captioned-shapes world",
        description="Build the shapes_world tfds dataset (array_record): train example i is the world's "
        "example(seed, i, stream 0), test example i is example(seed, i, stream 1). A no-op if already built.")
    sh.add_argument("--data-dir", required=True,
                    help="tfds data_dir; the build lands in DATA_DIR/shapes_world/CONFIG/1.0.0")
    sh.add_argument("--image-size", type=int, default=32)
    sh.add_argument("--num-train", type=int, default=1000)
    sh.add_argument("--num-test", type=int, default=100)
    sh.add_argument("--min-objects", type=int, default=1)
    sh.add_argument("--max-objects", type=int, default=3)
    sh.add_argument("--seed", type=int, default=0)
    sf = sub.add_parser(
        "shapes-folder", help="the shapes world as a LAION-style image folder (png + txt + metadata.jsonl)",
        description="Write examples 0..NUM-1 of the shapes world (stream 0) as OUT/000000.png, OUT/000000.txt, "
        "... and OUT/metadata.jsonl (caption and scene objects per image), a folder the image-text build "
        "reads (use --buckets SxS there). OUT must be new or empty.")
    sf.add_argument("out", help="output directory (new or empty)")
    sf.add_argument("--num", type=int, required=True, help="number of examples")
    sf.add_argument("--image-size", type=int, default=64)
    sf.add_argument("--seed", type=int, default=0)
    sf.add_argument("--min-objects", type=int, default=1)
    sf.add_argument("--max-objects", type=int, default=1)
    return add_debug_flag(p)


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    return run_guarded(p.prog, a.debug, lambda: _run(p, a), system_exit=True)


def _run(p: argparse.ArgumentParser, a) -> int:
    if a.what == "shapes":
        from raphael_jax.data.shapes.tfds import build_shapes_dataset, make_config

        try:
            make_config(a.image_size, a.num_train, a.num_test, a.min_objects, a.max_objects, a.seed)
        except ValueError as e:
            p.error(str(e))
        b = build_shapes_dataset(a.data_dir, image_size=a.image_size, num_train=a.num_train, num_test=a.num_test,
                                 min_objects=a.min_objects, max_objects=a.max_objects, seed=a.seed)
        splits = {name: int(split.num_examples) for name, split in b.info.splits.items()}
        print(f"built {b.data_dir}: {splits}")
        return 0
    if a.what == "shapes-folder":
        from raphael_jax.data.shapes.folder import write_shapes_folder

        info = write_shapes_folder(a.out, a.num, image_size=a.image_size, seed=a.seed,
                                   min_objects=a.min_objects, max_objects=a.max_objects)
        print(f"wrote {info['num']} examples ({info['image_size']}x{info['image_size']}) to {info['out_dir']}")
        return 0

    from raphael_jax.data.real.builder import build_image_text_dataset, make_config

    kwargs = dict(scale_divisor=a.scale_divisor, buckets=a.buckets,
                  min_aesthetic=None if a.min_aesthetic < 0 else a.min_aesthetic,
                  max_watermark=None if a.max_watermark < 0 else a.max_watermark,
                  edge_source=None if a.edge_source.lower() == "none" else a.edge_source,
                  image_format=a.image_format, jpeg_quality=a.jpeg_quality)
    try:
        make_config(a.sources, name=a.name, **kwargs)
    except ValueError as e:
        p.error(str(e))
    with warnings.catch_warnings():  # the skipped images are reported below, with their paths
        warnings.filterwarnings("ignore", message="image_text: skipped")
        b = build_image_text_dataset(a.data_dir, a.sources, name=a.name, **kwargs)
    meta = json.loads((Path(b.data_dir) / "metadata.json").read_text())
    print(f"built {b.data_dir}: {meta['stats']}")
    print(f"bucket counts: {meta['bucket_counts']}")
    if meta["stats"].get("unreadable"):
        named = "; ".join(meta.get("unreadable", [])) or "see the stats"
        print(f"{p.prog}: warning: skipped {meta['stats']['unreadable']} unreadable image(s) (truncated or corrupt; "
              f"re-download or delete them): {named}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
