"""``raphael-precompute``: encode an image_text build with the VAE and CLIP text tower (array_record).

    raphael-precompute --dataset DATA_DIR/image_text/NAME/1.0.0 \\
        --vae weights/sd-vae-ft-mse --clip weights/clip-vit-g-14 --out latents/NAME
    raphael-precompute --config configs/small_latent.py   # dirs from data.*
"""
from __future__ import annotations

import argparse

from raphael_jax.data.latents import STORE_DTYPES
from raphael_jax.tools.precompute import precompute


def _from_config(spec: str, overrides) -> dict:
    from raphael_jax.config import load_config

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
    p.add_argument("--vae", help="VAE folder (diffusers safetensors or raphael-convert output)")
    p.add_argument("--clip", help="CLIP text folder (transformers safetensors or raphael-convert output)")
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
