"""``raphael-sample --workdir DIR --prompt "..." --num 8 --out DIR``: PNGs with prompt and settings as metadata.

Samples with the run's EMA weights (DDIM + CFG, :class:`raphael_jax.sampling.Sampler`); writes
``sample_{i:04d}.png`` per image and ``grid.png`` (one row per prompt), never overwriting a file.
Latent runs load the CLIP text tower, tokenizer and VAE recorded in ``DIR/encoders.json``;
``--clip`` / ``--vae`` / ``--tokenizer`` point at them when the weights moved. ``--height`` /
``--width`` choose the image size (latent runs: any of the trained buckets, e.g. 448x832; default
the most square one). ``--lora FILE[:SCALE]`` (repeatable) applies LoRA adapters (a fine-tuning run's
``lora.safetensors``, docs/FINETUNE.md) to a merged copy of the weights. A ControlNet run (``control.enabled``)
samples under ``--control IMAGE`` (its edge map, by the run's ``model.edge.source``: Canny or outlines; with
``--control-map`` the image is the single-channel map itself) at ``--control-scale`` (default
``control.scale``). ``--upscale WEIGHTS`` also writes every sample upscaled by a Real-ESRGAN-style RRDBNet
(``sample_NNNN_x4.png``; the paper's 4096 x 6144 outputs, docs/UPSCALE.md). Exit status 2 with one error
line for bad arguments, a folder that is no trained run, a wrong adapter, control or upscaler file, or
missing / corrupt encoder or tokenizer files (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import os

from raphael_jax.cli import add_debug_flag, require_run, run_guarded


def main(argv=None) -> int:
    from raphael_jax.models.upscale_tiling import DEFAULT_HALO

    p = argparse.ArgumentParser(prog="raphael-sample",
                                description="Sample images from a trained RAPHAEL run (EMA weights, DDIM + CFG).")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for several")
    p.add_argument("--num", type=int, default=8, help="images per prompt")
    p.add_argument("--out", required=True, help="output folder (files are never overwritten)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the run's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the run's)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images per sampling call (over all local devices)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--clip", default=None, help="CLIP text folder (latent runs; default: the recorded one)")
    p.add_argument("--vae", default=None, help="VAE folder (latent runs; default: the recorded one)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (default: --clip, else the recorded one)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA adapters to apply (a run's lora.safetensors), scaled (default 1); repeat for several")
    p.add_argument("--control", default=None, metavar="IMAGE",
                   help="ControlNet runs: the control image (its edges are taken, as in training)")
    p.add_argument("--control-map", action="store_true",
                   help="--control is already the single-channel control map (white = edge), not a picture")
    p.add_argument("--control-scale", type=float, default=None, help="ControlNet strength (default control.scale)")
    p.add_argument("--upscale", default=None, metavar="WEIGHTS",
                   help="also write every sample upscaled by this RRDBNet (.safetensors: raphael-convert esrgan or "
                   "raphael-train-upscaler) as sample_NNNN_xS.png")
    p.add_argument("--upscale-tile", type=int, default=None,
                   help="tile side in pixels for --upscale (default raphael-upscale's; 0: whole images)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the weights over the local devices (models that do not fit one device)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be at least 1")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    for prompt in args.prompt:
        if not prompt.strip():
            p.error("--prompt must not be empty (use a caption such as 'a big red circle at the top left')")
    if args.control_scale is not None and args.control_scale < 0:
        p.error("--control-scale must be >= 0")
    if (args.control_map or args.control_scale is not None) and not args.control:
        p.error("--control-map / --control-scale need --control IMAGE")
    if args.upscale_tile is not None and not args.upscale:
        p.error("--upscale-tile needs --upscale WEIGHTS")
    if args.upscale_tile is not None and args.upscale_tile != 0 and args.upscale_tile <= 2 * DEFAULT_HALO:
        p.error(f"--upscale-tile must exceed {2 * DEFAULT_HALO} (twice the tiles' halo), or be 0 for whole images")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a folder")
    return run_guarded(p.prog, args.debug, lambda: _sample(args), system_exit=True)


def _sample(args) -> int:
    """Loads the run (one-line errors for a wrong folder or corrupt files), samples, writes the PNGs."""
    require_run(args.workdir)
    from raphael_jax.sampling import Sampler, image_grid, local_plan, save_png
    from raphael_jax.train.checkpoint import load_run

    plan = None
    if args.fsdp:
        from raphael_jax.train.checkpoint import RunCheckpoints

        ck = RunCheckpoints(args.workdir, async_save=False)
        plan = local_plan(ck.restore_config(args.step))
        ck.close()
    upscaler = None
    if args.upscale:  # loaded (and checked) before sampling, so a bad file fails fast
        from raphael_jax.convert.esrgan import load_rrdbnet
        upscaler = load_rrdbnet(args.upscale)
    run = load_run(args.workdir, args.step, weights="ema", plan=plan)
    if args.lora:  # merged into a copy of the weights, sharded like them
        import dataclasses

        from raphael_jax.models.lora import merge_lora
        from raphael_jax.train.finetune import load_lora_files

        adapters, metas = load_lora_files(args.lora, run.ema_params, source_of=lambda f: f"--lora {f}",
                                          with_meta=True)
        run = dataclasses.replace(run, ema_params=merge_lora(run.ema_params, adapters))
        print(f"applied {len(adapters)} LoRA adapter(s): {', '.join(args.lora)}")
    sampler = Sampler.from_run(run, clip_dir=args.clip, vae_dir=args.vae, tokenizer_dir=args.tokenizer,
                               plan=plan, shard_params=args.fsdp)
    if args.lora:  # the adapters' subject names are expected to be unknown words
        from raphael_jax.sampling import subject_words
        for meta in metas:
            sampler.new_words += subject_words(run.config, meta.get("subject") or {})
    height, width = sampler.check_size(args.height, args.width)
    if sampler.buckets and (height, width) not in sampler.buckets:
        print(f"note: {height}x{width} is not one of the run's trained sizes {sampler.buckets}")
    hint = None
    if args.control:
        if sampler.control is None:
            raise ValueError(f"--control: {args.workdir} is not a ControlNet run (train one with "
                             "--set control.enabled=True, docs/FINETUNE.md)")
        from raphael_jax.data.edges import get_edge_source, pool_edges
        from raphael_jax.models.controlnet import control_image
        hint = control_image(args.control, height, width, mode="map" if args.control_map else "canny",
                             edge_fn=get_edge_source(run.config.model.edge.source))
        if sampler.factor > 1:  # latent runs: max-pooled to the latents' resolution, as raphael-precompute does
            hint = pool_edges(hint[..., 0], sampler.factor)[..., None]
    elif sampler.control is not None:
        print("note: a ControlNet run sampled without --control gives its base model's images")
    prompts = [pr for pr in args.prompt for _ in range(args.num)]
    print(f"sampling {len(prompts)} images of {height}x{width} from step {sampler.step} of {args.workdir}",
          flush=True)
    images = sampler.sample(prompts, seed=args.seed, num_steps=args.steps, guidance=args.guidance, eta=args.eta,
                            batch_size=args.batch_size, height=height, width=width, hint=hint,
                            control_scale=args.control_scale)
    os.makedirs(args.out, exist_ok=True)
    meta = {**sampler.settings(seed=args.seed, guidance=args.guidance, num_steps=args.steps, eta=args.eta,
                               height=height, width=width), "workdir": os.path.abspath(args.workdir)}
    if args.lora:
        meta["lora"] = list(args.lora)
    if args.control:
        meta.update(control=os.path.abspath(args.control), control_scale=sampler.control_scale
                    if args.control_scale is None else args.control_scale)
    written = []
    for i, (pr, im) in enumerate(zip(prompts, images)):
        path = _free_path(args.out, f"sample_{i:04d}.png")
        save_png(im, path, pr, {**meta, "index": i})
        written.append(path)
    if upscaler is not None:
        written += _write_upscaled(upscaler, images, prompts, args, meta)
    grid_path = _free_path(args.out, "grid.png")
    save_png(image_grid(images, cols=args.num), grid_path, " | ".join(args.prompt), meta)
    print(f"wrote {len(written)} images and {grid_path}")
    return 0


def _write_upscaled(model, images, prompts, args, meta) -> list[str]:
    """Each sample upscaled (tiled, :func:`raphael_jax.models.upscale_tiling.upscale_picture`) as sample_NNNN_xS.png."""
    from raphael_jax.models.upscale_tiling import DEFAULT_TILE, UpscaleProgress, upscale_picture
    from raphael_jax.sampling import save_png

    tile = DEFAULT_TILE if args.upscale_tile is None else args.upscale_tile
    written = []
    for i, (pr, im) in enumerate(zip(prompts, images)):
        big = upscale_picture(model, im, tile=tile, progress=UpscaleProgress(f"upscaling sample {i}", every=30.0))
        path = _free_path(args.out, f"sample_{i:04d}_x{model.scale}.png")
        save_png(big, path, pr, {**meta, "index": i, "upscale": os.path.abspath(args.upscale)})
        written.append(path)
    print(f"upscaled {len(written)} images x{model.scale} with {args.upscale}", flush=True)
    return written


def _free_path(folder: str, name: str) -> str:
    """``folder/name``, or ``name`` with a numeric suffix when that file exists (never overwrite)."""
    path = os.path.join(folder, name)
    stem, ext = os.path.splitext(name)
    k = 1
    while os.path.exists(path):
        path = os.path.join(folder, f"{stem}_{k}{ext}")
        k += 1
    return path


if __name__ == "__main__":
    raise SystemExit(main())
