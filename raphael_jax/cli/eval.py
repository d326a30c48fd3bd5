"""``raphael-eval``: evaluate a trained run or a set of images.

    raphael-eval alignment --workdir runs/tiny --objects 1,2,3 [--num-prompts 200] [--guidance W]
    raphael-eval subject --workdir runs/ring_lora [--subject-of RUN] [--num-prompts 200]
    raphael-eval control --workdir runs/tiny_control [--num-prompts 200] [--scale 1.0]
    raphael-eval report subject runs/tiny runs/ring/lora4 runs/ring/full
    raphael-eval probe --workdir runs/tiny [--timesteps 999,950,800,500,200] [--num 64]
    raphael-eval fid stats coco/val2014 ref.npz --weights weights/fid_inception.safetensors --size 256 --center-crop
    raphael-eval fid distance generated/ ref.npz --weights weights/fid_inception.safetensors
    raphael-eval coco-fid --workdir runs/raphael --annotations coco/annotations/captions_val2014.json \\
        --coco-images coco/val2014 --ref-stats coco/fid_stats_val2014_256.npz \\
        --inception-weights weights/fid_inception.safetensors --out runs/raphael/eval/coco_fid30k
    raphael-eval sfd train --out weights/shapes_fd.safetensors
    raphael-eval sfd score --net weights/shapes_fd.safetensors --workdir runs/tiny
    raphael-eval clip-score runs/tiny/samples --clip-model weights/clip-vit-l-14

See docs/EVALUATION.md and the library modules in ``raphael_jax.evaluation``. Bad input (a folder that is
no trained run, missing or corrupt weights / tokenizer / statistics files, an existing output file) is
refused with one line and exit status 2 before anything is loaded or written (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from raphael_jax.cli import add_debug_flag, require_run, run_guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raphael-eval", description="Evaluate a trained RAPHAEL run.")
    sub = p.add_subparsers(dest="what", required=True)

    a = sub.add_parser("alignment", help="shapes-world text-image alignment of held-out prompts")
    a.add_argument("--workdir", required=True)
    a.add_argument("--objects", default="1,2,3", help="object counts to evaluate, e.g. 1 or 1,2,3")
    a.add_argument("--num-prompts", type=int, default=None, help="prompts per object count (config eval.num_prompts)")
    a.add_argument("--guidance", type=float, default=None, help="CFG weight (config sample.guidance)")
    a.add_argument("--steps", type=int, default=None, help="DDIM steps (config sample.num_steps)")
    a.add_argument("--seed", type=int, default=None, help="prompt and noise seed (config eval.seed)")
    a.add_argument("--set", action="append", default=[], metavar="sample.KEY=VALUE",
                   help="override a sampler setting of the run's config, e.g. sample.timestep_spacing=leading")
    _encoder_args(a)

    sj = sub.add_parser("subject", help="a fine-tuned subject in unseen colours and places, and retention",
                        description="The fine-tuning measurement (docs/FINETUNE.md): the subject kind in colours "
                        "and places it was not fine-tuned in, over-fitting to the training contexts, and "
                        "retention of the base world's kinds.")
    sj.add_argument("--workdir", required=True, help="the run to score (a LoRA or full fine-tuning run, or a base)")
    sj.add_argument("--subject-of", default=None,
                    help="the fine-tuning run whose data.subject defines the contexts (default: --workdir's)")
    sj.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                    help="apply these adapters to --workdir's weights first (as raphael-sample --lora)")
    sj.add_argument("--num-prompts", type=int, default=None, help="prompts per part (config eval.num_prompts)")
    sj.add_argument("--guidance", type=float, default=None)
    sj.add_argument("--steps", type=int, default=None)
    sj.add_argument("--seed", type=int, default=None, help="prompt and noise seed (config eval.seed)")
    sj.add_argument("--tag", default="", help="suffix of the result file name")

    cn = sub.add_parser("control", help="a ControlNet run: does the layout follow the control image?",
                        description="The ControlNet measurement (docs/FINETUNE.md): place accuracy of 1-2 object "
                        "scenes drawn from their edge maps with place-free prompts, with other colours, and at "
                        "control scale 0 (the base model).")
    cn.add_argument("--workdir", required=True, help="a ControlNet run (control.enabled)")
    cn.add_argument("--num-prompts", type=int, default=None, help="scenes (config eval.num_prompts)")
    cn.add_argument("--scale", type=float, default=None, help="control scale (config control.scale)")
    cn.add_argument("--guidance", type=float, default=None)
    cn.add_argument("--steps", type=int, default=None)
    cn.add_argument("--seed", type=int, default=None, help="scene and noise seed (config eval.seed)")

    up = sub.add_parser("upscale", help="an upscaler's PSNR and analyzer scores against bicubic upscaling",
                        description="Held-out shapes-world scenes (test stream 2) downscaled, degraded or rendered "
                        "small, upscaled, and compared with their HR renders (raphael_jax/evaluation/upscale.py).")
    up.add_argument("--weights", required=True, help="RRDBNet safetensors (raphael-train-upscaler's generator, or "
                    "raphael-convert esrgan)")
    up.add_argument("--seed", type=int, default=1234, help="test scenes' seed (default 1234)")
    up.add_argument("--num", type=int, default=256, help="test scenes (default 256)")
    up.add_argument("--hr-size", type=int, default=128, help="HR side in pixels (default 128)")
    up.add_argument("--inputs", default=",".join(("bicubic", "degraded", "render")),
                    help="comma-separated input kinds: bicubic, degraded, render")
    up.add_argument("--out", default=None, help="new JSON file for the result (default: print only)")
    up.add_argument("--grid", default=None, help="new PNG: input / bicubic / upscaler / HR of 4 render scenes")
    up.add_argument("--tile-check", default="48:16", metavar="TILE:HALO",
                    help="also compare tiled with untiled upscaling of 8 test scenes rendered at --hr-size "
                    "(default 48:16; 'none' to skip)")

    rp = sub.add_parser("report", help="markdown table of the subject / control measurements' saved results",
                        description="Markdown tables of `raphael-eval subject` (a base and its fine-tuned runs) or "
                        "`raphael-eval control` results, from the runs' eval/*.json (launch/finetune_ring.sh).")
    rp.add_argument("kind", choices=("subject", "control"))
    rp.add_argument("runs", nargs="+", help="subject: BASE RUN [RUN ...]; control: RUN")
    rp.add_argument("--seed", type=int, default=1234, help="the results of this seed (the test seed eval.seed)")

    pr = sub.add_parser("probe", help="one-step x0 recovery from noised held-out images, per timestep")
    pr.add_argument("--workdir", required=True)
    pr.add_argument("--timesteps", default="999,950,800,500,200")
    pr.add_argument("--num", type=int, default=64)

    f = sub.add_parser("fid", help="FID statistics of a folder / tfds split, or FID between two sources",
                       description="Frechet Inception Distance: pool3 features, their statistics, the distance.")
    fsub = f.add_subparsers(dest="cmd", required=True)
    fs = fsub.add_parser("stats", help="stats SRC OUT.npz: statistics of a folder of images or tfds:NAME[:SPLIT]")
    fs.add_argument("a", help="folder of images or tfds:NAME[:SPLIT]")
    fs.add_argument("b", help="output .npz")
    fd = fsub.add_parser("distance", help="distance A B: FID between two of folder, tfds:NAME[:SPLIT], .npz")
    fd.add_argument("a", help="folder of images, tfds:NAME[:SPLIT], or an .npz")
    fd.add_argument("b", help="second source")
    for c in (fs, fd):
        c.add_argument("--weights", required=True,
                       help="FID Inception safetensors (raphael-convert inception ...)")
        c.add_argument("--batch-size", type=int, default=50)
        c.add_argument("--size", type=int, default=None, help="resize images to SIZExSIZE first (PIL bicubic)")
        c.add_argument("--center-crop", action="store_true", help="square center crop before --size")
        c.add_argument("--max-images", type=int, default=None)
        c.add_argument("--data-dir", default=None, help="tfds data_dir")
        c.add_argument("--channel-divisor", type=int, default=1, help=argparse.SUPPRESS)  # tests only

    _coco_fid_parser(sub.add_parser("coco-fid", help="COCO zero-shot FID-30k of a text-to-image sampler",
                                    description="COCO zero-shot FID-30k of a text-to-image sampler."))

    s = sub.add_parser("sfd", help="shapes Frechet distance: train the feature net, or score a run",
                       description="Shapes Frechet distance (SFD): train the feature net, or score a run.")
    ssub = s.add_subparsers(dest="cmd", required=True)
    t = ssub.add_parser("train", help="train the feature net on single-object scenes")
    t.add_argument("--out", required=True, help="new .safetensors file")
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--image-size", type=int, default=32)
    sc = ssub.add_parser("score", help="SFD of a run's samples against renderings of the same held-out scenes")
    sc.add_argument("--net", required=True, help="feature net from `train`")
    sc.add_argument("--workdir", required=True)
    sc.add_argument("--num", type=int, default=1000, help="held-out scenes")
    sc.add_argument("--objects", default="1,3", help="min,max objects per scene")
    sc.add_argument("--seed", type=int, default=1234)
    sc.add_argument("--guidance", type=float, default=None)
    sc.add_argument("--steps", type=int, default=None)

    c = sub.add_parser("clip-score", help="mean CLIP score of PNGs against the prompts in their metadata",
                       description="Mean CLIP score of a folder of PNGs (raphael-sample or coco-fid --out "
                       "images) against the captions stored in their 'prompt' PNG text chunk.")
    c.add_argument("folder", help="folder of PNGs with a 'prompt' text chunk")
    c.add_argument("--clip-model", required=True, help="transformers CLIPModel directory (safetensors)")
    c.add_argument("--tokenizer", default=None, help="folder with vocab.json + merges.txt (default --clip-model)")
    c.add_argument("--pattern", default="*.png", help="file name pattern")
    c.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="skip file names matching this; repeatable (default: grid*.png)")
    c.add_argument("--batch-size", type=int, default=32, help="images per CLIP call")
    c.add_argument("--json", default=None, help="write the mean and per-image scores here")
    return add_debug_flag(p)


def _encoder_args(p) -> None:
    """--clip / --vae / --tokenizer: a latent run's frozen encoders when not where encoders.json says."""
    p.add_argument("--clip", default=None, help="latent runs: CLIP text folder (default: the run's recorded one)")
    p.add_argument("--vae", default=None, help="latent runs: VAE folder (default: the run's recorded one)")
    p.add_argument("--tokenizer", default=None, help="latent runs: CLIP tokenizer folder (default: --clip)")


def _load_sampler(args):
    """The run's Sampler (EMA weights); a folder that is no run, or a bad encoder folder, raises (one line)."""
    require_run(args.workdir)
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.checkpoint import load_run

    return Sampler.from_run(load_run(args.workdir, weights="ema"), clip_dir=getattr(args, "clip", None),
                            vae_dir=getattr(args, "vae", None), tokenizer_dir=getattr(args, "tokenizer", None))


def _coco_fid_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("captions and reference")
    src.add_argument("--annotations", help="captions_val2014.json")
    src.add_argument("--tfds", help="tfds NAME[:SPLIT] for captions (and reference images), e.g. coco_captions:val")
    src.add_argument("--tfds-data-dir", default=None)
    src.add_argument("--coco-images", help="folder of the val2014 images (reference statistics)")
    src.add_argument("--ref-stats", help="reference statistics .npz: read if it exists, else computed and written")
    src.add_argument("--ref-images", choices=["all", "drawn"], default="all",
                     help="reference statistics over the whole folder or only the drawn captions' images")
    src.add_argument("--ref-max-images", type=int, default=None)
    src.add_argument("--num", type=int, default=30000, help="number of captions / images")
    src.add_argument("--seed", type=int, default=0, help="caption draw seed")
    src.add_argument("--any-caption", action="store_true", help="draw captions, not images (repeats allowed)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--sampler", default=None, help="workdir:DIR | noise | py:MODULE:FACTORY")
    gen.add_argument("--workdir", default=None, help="shorthand for --sampler workdir:DIR")
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--steps", type=int, default=None, help="DDIM steps")
    gen.add_argument("--sample-seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=50, help="images per sampler call, per host")
    gen.add_argument("--image-size", type=int, default=256, help="images are resized to this (square) for FID")
    gen.add_argument("--height", type=int, default=None, help="generation height (default: the run's)")
    gen.add_argument("--width", type=int, default=None, help="generation width (default: the run's)")
    _encoder_args(gen)
    ev = p.add_argument_group("metrics")
    ev.add_argument("--inception-weights", required=True, help="FID Inception safetensors")
    ev.add_argument("--inception-channel-divisor", type=int, default=1, help=argparse.SUPPRESS)  # tests only
    ev.add_argument("--fid-batch-size", type=int, default=50)
    ev.add_argument("--clip-model", default=None, help="transformers CLIPModel directory: also report CLIP score")
    p.add_argument("--out", default=None, help="directory for images/, generated_stats.npz and fid.json")


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    run = {"alignment": _alignment, "subject": _subject, "control": _control, "report": _report,
           "upscale": _upscale, "probe": _probe,
           "fid": _fid, "coco-fid": _coco_fid, "sfd": _sfd, "clip-score": _clip_score}[args.what]
    return run_guarded(p.prog, args.debug, lambda: run(p, args))


def _alignment(p: argparse.ArgumentParser, args) -> int:
    from raphael_jax.config import apply_overrides
    from raphael_jax.evaluation.alignment import evaluate_alignment, save_results

    if any(not kv.startswith("sample.") for kv in args.set):
        p.error("--set only overrides sample.* settings (the weights fix everything else)")
    try:
        objects = tuple(int(x) for x in args.objects.split(","))
    except ValueError:
        p.error(f"--objects must be comma-separated integers, got {args.objects!r}")
    if any(not 1 <= n <= 3 for n in objects):
        p.error("--objects: the shapes world has 1 to 3 objects per scene")
    sampler = _load_sampler(args)
    cfg = sampler.config
    try:
        apply_overrides(cfg, args.set)
    except (KeyError, ValueError) as e:
        p.error(f"--set: {e}")
    guidance = cfg.sample.guidance if args.guidance is None else args.guidance
    step = int(sampler.step)
    print(f"alignment of {args.workdir} at step {step}, guidance {guidance}, "
          f"{args.steps or cfg.sample.num_steps} DDIM steps")
    results = evaluate_alignment(sampler, num_prompts=args.num_prompts or cfg.eval.num_prompts,
                                 seed=cfg.eval.seed if args.seed is None else args.seed, objects=objects,
                                 guidance=guidance, num_steps=args.steps)
    tag = "_".join(kv.split(".", 1)[1].replace("=", "-") for kv in args.set)
    print("saved", save_results(args.workdir, step, guidance, results, tag=tag))
    return 0


def _subject(p: argparse.ArgumentParser, args) -> int:
    import dataclasses

    from raphael_jax.evaluation.subject import evaluate_subject
    from raphael_jax.sampling import Sampler, subject_words
    from raphael_jax.train.checkpoint import RunCheckpoints, load_run

    if args.num_prompts is not None and args.num_prompts < 1:
        p.error("--num-prompts must be at least 1")
    require_run(args.workdir)
    source = args.subject_of or args.workdir
    if args.subject_of:
        require_run(args.subject_of)
        ck = RunCheckpoints(args.subject_of, async_save=False)
        try:
            src_cfg = ck.restore_config()
        finally:
            ck.close()
    run = load_run(args.workdir, weights="ema")
    if not args.subject_of:
        src_cfg = run.config
    if src_cfg.data.kind != "subject":
        raise ValueError(f"{source} was not fine-tuned on a subject (data.kind={src_cfg.data.kind!r}): "
                         "give --subject-of a fine-tuning run")
    if run.config.data.kind == "latents":
        raise ValueError(f"{args.workdir} is a latent run: the subject measurement scores shapes-world pixels")
    if args.lora:
        from raphael_jax.models.lora import merge_lora
        from raphael_jax.train.finetune import load_lora_files
        adapters = load_lora_files(args.lora, run.ema_params, source_of=lambda f: f"--lora {f}")
        run = dataclasses.replace(run, ema_params=merge_lora(run.ema_params, adapters))
    sampler = Sampler.from_run(run)
    sampler.new_words = subject_words(src_cfg)
    cfg = run.config
    guidance = cfg.sample.guidance if args.guidance is None else args.guidance
    seed = cfg.eval.seed if args.seed is None else args.seed
    print(f"subject measurement of {args.workdir} at step {run.step} (subject of {source}: "
          f"{src_cfg.data.subject.kind} in {', '.join(src_cfg.data.subject.colours)} / "
          f"{', '.join(src_cfg.data.subject.sizes)} / {', '.join(src_cfg.data.subject.places)}), seed {seed}")
    results = evaluate_subject(sampler, src_cfg.data.subject, num_prompts=args.num_prompts or cfg.eval.num_prompts,
                               seed=seed, guidance=guidance, num_steps=args.steps)
    out_dir = os.path.join(args.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"subject_step{run.step}_seed{seed}{'_' + args.tag if args.tag else ''}.json")
    with open(path, "w") as f:
        json.dump({"step": run.step, "seed": seed, "guidance": guidance, "subject_of": os.path.abspath(source),
                   "lora": list(args.lora), "results": results}, f, indent=1)
    print("saved", path)
    return 0


def _control(p: argparse.ArgumentParser, args) -> int:
    from raphael_jax.evaluation.control import evaluate_control

    if args.num_prompts is not None and args.num_prompts < 1:
        p.error("--num-prompts must be at least 1")
    if args.scale is not None and args.scale < 0:
        p.error("--scale must be >= 0")
    sampler = _load_sampler(args)
    if sampler.control is None:
        raise ValueError(f"{args.workdir} is not a ControlNet run (control.enabled); see docs/FINETUNE.md")
    if sampler.latent:
        raise ValueError(f"{args.workdir} is a latent run: the control measurement scores shapes-world pixel runs")
    cfg = sampler.config
    seed = cfg.eval.seed if args.seed is None else args.seed
    scale = cfg.control.scale if args.scale is None else args.scale
    print(f"control measurement of {args.workdir} at step {sampler.step}, scale {scale}, seed {seed}")
    results = evaluate_control(sampler, num_prompts=args.num_prompts or cfg.eval.num_prompts, seed=seed,
                               scale=scale, guidance=args.guidance, num_steps=args.steps)
    out_dir = os.path.join(args.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"control_step{sampler.step}_seed{seed}_s{scale:g}.json")
    with open(path, "w") as f:
        json.dump({"step": sampler.step, "seed": seed, "scale": scale, "results": results}, f, indent=1)
    print("saved", path)
    return 0


def _upscale(p: argparse.ArgumentParser, args) -> int:
    from raphael_jax.evaluation.upscale import INPUTS

    inputs = tuple(k.strip() for k in args.inputs.split(",") if k.strip())
    if not inputs or any(k not in INPUTS for k in inputs):
        p.error(f"--inputs: expected some of {', '.join(INPUTS)}, got {args.inputs!r}")
    if args.num < 2:
        p.error("--num must be at least 2")
    tile_check = None
    if args.tile_check != "none":
        parts = args.tile_check.split(":")
        tile_check = tuple(int(v) for v in parts) if len(parts) == 2 and all(v.isdigit() for v in parts) else None
        if tile_check is None or tile_check[0] <= 2 * tile_check[1]:
            p.error(f"--tile-check: expected TILE:HALO with TILE > 2 HALO >= 0, or none; got {args.tile_check!r}")
    for path, suffix in ((args.out, ".json"), (args.grid, ".png")):
        if path is not None:
            _check_new_file(path, suffix)
    from raphael_jax.convert.esrgan import load_rrdbnet
    from raphael_jax.evaluation.upscale import evaluate_upscaler, example_grid, report_markdown

    model = load_rrdbnet(args.weights)
    t0 = time.perf_counter()
    result = evaluate_upscaler(model, seed=args.seed, num=args.num, hr_size=args.hr_size, inputs=inputs,
                               progress=lambda kind, r: print(f"{kind}: PSNR {r['psnr_upscaler']:.2f} dB "
                                                              f"(bicubic {r['psnr_bicubic']:.2f})", flush=True))
    result["weights"] = os.path.abspath(args.weights)
    if tile_check is not None:
        from raphael_jax.evaluation.upscale import tiling_agreement

        result["tiling"] = tiling_agreement(model, seed=args.seed, size=args.hr_size, tile=tile_check[0],
                                            halo=tile_check[1])
    print(report_markdown(result))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print("saved", args.out)
    if args.grid:
        from raphael_jax.sampling import save_png

        save_png(example_grid(model, seed=args.seed, hr_size=args.hr_size), args.grid,
                 "input (nearest) | bicubic | upscaler | HR", {"weights": result["weights"]})
        print("saved", args.grid)
    return 0


def _report(p: argparse.ArgumentParser, args) -> int:
    from raphael_jax.tools.finetune_report import control_table, subject_table

    if args.kind == "subject":
        if len(args.runs) < 2:
            p.error("report subject needs BASE and at least one fine-tuned RUN")
        print(subject_table(args.runs[0], args.runs[1:], args.seed))
    else:
        if len(args.runs) != 1:
            p.error("report control takes one RUN")
        print(control_table(args.runs[0], args.seed))
    return 0


def _probe(p: argparse.ArgumentParser, args) -> int:
    from raphael_jax.evaluation.denoise_probe import denoise_probe

    try:
        timesteps = tuple(int(t) for t in args.timesteps.split(","))
    except ValueError:
        p.error(f"--timesteps must be comma-separated integers, got {args.timesteps!r}")
    if args.num < 1:
        p.error("--num must be at least 1")
    sampler = _load_sampler(args)
    if sampler.latent:
        p.error("probe: the one-step probe noises rendered shapes-world images (pixel runs only); "
                "use `raphael-eval alignment` for latent runs")
    res = denoise_probe(sampler, timesteps, args.num)
    print(f"one-step x0 from x_t, {args.num} held-out single-object scenes, step {sampler.step}")
    for t, r in res.items():
        print(f"  t={t:4d}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
    return 0


def _fid(p: argparse.ArgumentParser, args) -> int:
    import jax

    from raphael_jax.evaluation.fid import FeatureExtractor, frechet_distance, save_stats, statistics_of
    from raphael_jax.evaluation.inception import InceptionConfig, load_inception
    from raphael_jax.parallel.distributed import maybe_initialize

    for src in (args.a,) if args.cmd == "stats" else (args.a, args.b):
        _check_fid_source(src)
    if args.cmd == "stats":
        _check_new_file(args.b, ".npz")
    maybe_initialize()
    net = load_inception(args.weights, InceptionConfig(channel_divisor=args.channel_divisor))
    extract = FeatureExtractor(net, args.batch_size)
    kw = dict(data_dir=args.data_dir, size=args.size, center_crop=args.center_crop, batch_size=args.batch_size,
              max_images=args.max_images)
    mu1, s1, n1 = statistics_of(args.a, extract, **kw)
    if args.cmd == "stats":
        if jax.process_index() == 0:
            save_stats(args.b, mu1, s1, n1, source=args.a, size=args.size, center_crop=args.center_crop)
            print(f"\nwrote {args.b} ({n1} images)")
        return 0
    mu2, s2, _ = statistics_of(args.b, extract, **kw)
    fid = frechet_distance(mu1, s1, mu2, s2)
    if jax.process_index() == 0:
        print(f"\nFID: {fid:.4f}")
    return 0


def _check_fid_source(src: str) -> None:
    """A folder of images, an existing .npz or tfds:NAME[:SPLIT]; raises (one line) before Inception loads."""
    if src.startswith("tfds:"):
        return
    if src.endswith(".npz"):
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src}: no such statistics file (write one with `raphael-eval fid stats`)")
    elif not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such folder of images (give a folder, an .npz or tfds:NAME[:SPLIT])")


def _check_new_file(path: str, suffix: str) -> None:
    """An output file to create: it must end with ``suffix`` and not exist (never overwritten)."""
    if not path.endswith(suffix):
        raise ValueError(f"{path}: the output must be a {suffix} file")
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; refusing to overwrite it: remove it or give a new name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{path}: {parent} is a file, so {path} cannot be written")


def _coco_fid(p: argparse.ArgumentParser, args) -> int:
    import jax

    from raphael_jax.evaluation.caption_samplers import make_sampler
    from raphael_jax.evaluation.coco_captions import draw_captions, load_coco_captions, load_coco_captions_tfds
    from raphael_jax.evaluation.coco_fid import evaluate_coco_fid, log, reference_statistics
    from raphael_jax.evaluation.fid import FeatureExtractor
    from raphael_jax.evaluation.inception import InceptionConfig, load_inception
    from raphael_jax.parallel.distributed import maybe_initialize

    if args.workdir and not args.sampler:
        args.sampler = f"workdir:{args.workdir}"
    if not args.sampler:
        p.error("give --sampler (or --workdir)")
    if not (args.annotations or args.tfds):
        p.error("give --annotations captions_val2014.json or --tfds coco_captions:val")
    if not ((args.ref_stats and Path(args.ref_stats).is_file()) or args.coco_images or args.tfds):
        p.error("no reference: give --ref-stats FILE.npz (existing), --coco-images DIR or --tfds")
    if args.sampler.startswith("workdir:"):
        require_run(args.sampler.partition(":")[2])
    if not Path(args.inception_weights).is_file():
        raise FileNotFoundError(f"--inception-weights {args.inception_weights}: no such file "
                                "(make it with `raphael-convert inception`)")
    maybe_initialize()
    t0 = time.time()
    entries = (
        load_coco_captions(args.annotations)
        if args.annotations
        else load_coco_captions_tfds(*(args.tfds.partition(":")[::2]), data_dir=args.tfds_data_dir)
    )
    drawn = draw_captions(entries, args.num, args.seed, one_per_image=not args.any_caption)
    log(f"{len(drawn)} captions drawn (seed {args.seed}) from {len(entries)}; "
        f"{jax.process_count()} host(s), {jax.device_count()} device(s)")
    net = load_inception(args.inception_weights, InceptionConfig(channel_divisor=args.inception_channel_divisor))
    extract = FeatureExtractor(net, args.fid_batch_size)
    ref = reference_statistics(
        extract, drawn, ref_stats=args.ref_stats, coco_images=args.coco_images, ref_images=args.ref_images,
        ref_max_images=args.ref_max_images, tfds=args.tfds, tfds_data_dir=args.tfds_data_dir,
        image_size=args.image_size, batch_size=args.fid_batch_size)
    sampler = make_sampler(args.sampler, image_size=args.image_size, seed=args.sample_seed,
                           guidance=args.guidance, num_steps=args.steps, factory_args=args, height=args.height,
                           width=args.width, clip_dir=args.clip, vae_dir=args.vae, tokenizer_dir=args.tokenizer)
    scorer = None
    if args.clip_model:
        from raphael_jax.evaluation.clip_score import ClipScorer

        scorer = ClipScorer.from_pretrained(args.clip_model)
    if args.out and jax.process_index() == 0:
        os.makedirs(args.out, exist_ok=True)
        (Path(args.out) / "captions.json").write_text(json.dumps(drawn))
    result = evaluate_coco_fid(sampler, drawn, extract, ref, batch_size=args.batch_size, image_size=args.image_size,
                               out_dir=args.out, clip_scorer=scorer)
    result.update(sampler=args.sampler, caption_seed=args.seed, sample_seed=args.sample_seed,
                  guidance=args.guidance, steps=args.steps, seconds=time.time() - t0,
                  inception_weights=str(args.inception_weights))
    if jax.process_index() == 0:
        line = f"FID-{len(drawn)}: {result['fid']:.4f}"
        if "clip_score" in result:
            line += f"  CLIP score: {result['clip_score']:.3f}"
        print(line, flush=True)
        if args.out:
            (Path(args.out) / "fid.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _sfd(p: argparse.ArgumentParser, args) -> int:
    from raphael_jax.evaluation.shapes_fd import ShapesNetConfig, save_feature_net, score_run, train_feature_net

    if args.cmd == "train":
        _check_new_file(args.out, ".safetensors")
        model, metrics = train_feature_net(
            args.steps, args.batch_size, args.lr, args.seed, ShapesNetConfig(image_size=args.image_size)
        )
        save_feature_net(model, args.out, metrics)
        print(f"wrote {args.out}; held-out accuracy {metrics['heldout_accuracy']}")
        return 0
    try:
        lo, hi = (int(v) for v in args.objects.split(","))
    except ValueError:
        p.error(f"--objects takes min,max, got {args.objects!r}")
    if not 1 <= lo <= hi:
        p.error(f"--objects takes min,max with 1 <= min <= max, got {args.objects!r}")
    if not os.path.isfile(args.net):
        raise FileNotFoundError(f"--net {args.net}: no such file (train one with `raphael-eval sfd train --out FILE`)")
    require_run(args.workdir)
    sfd, out = score_run(args.net, args.workdir, num=args.num, objects=(lo, hi), seed=args.seed,
                         guidance=args.guidance, num_steps=args.steps)
    print(f"SFD ({args.num} held-out scenes, {lo}-{hi} objects): {sfd:.4f}  -> {out}")
    return 0


def _clip_score(p: argparse.ArgumentParser, args) -> int:
    from raphael_jax.evaluation.clip_score import ClipScorer, score_folder

    if not os.path.isdir(args.folder):
        p.error(f"{args.folder}: no such folder")
    exclude = ("grid*.png",) if args.exclude is None else tuple(args.exclude)
    scorer = ClipScorer.from_pretrained(args.clip_model, args.tokenizer, batch_size=args.batch_size)
    res = score_folder(scorer, args.folder, pattern=args.pattern, exclude=exclude)
    skipped = f", {len(res['skipped'])} without a prompt skipped" if res["skipped"] else ""
    print(f"CLIP score: {res['clip_score']:.3f} ({res['num_images']} images{skipped})")
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "folder": os.path.abspath(args.folder),
                                               "clip_model": str(args.clip_model)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
