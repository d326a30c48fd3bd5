"""``raphael-aot``: AOT-compile the train step of a config for N virtual devices (nothing is allocated).

    raphael-aot --config configs/raphael_3b.py --devices 64 --mesh fsdp=-1,expert=2 --batch 2048 --encoders

See :mod:`raphael_jax.tools.aot` and docs/SCALE_OUT.md.
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="raphael-aot",
                                description="AOT-compile the train step of a config for N virtual devices.")
    p.add_argument("--config", required=True, help="config file[:variant]")
    p.add_argument("--devices", type=int, required=True, help="number of (virtual CPU) devices")
    p.add_argument("--mesh", default="data=-1", help="axis sizes, e.g. fsdp=-1,expert=2 (default data=-1)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default train.batch_size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--hlo-out", default=None, help="write the compiled HLO text here")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--encoders", action="store_true",
                   help="also report the frozen CLIP text tower and VAE sharded by the same rules")
    p.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="XLA option for this compile, e.g. xla_backend_optimization_level=0 (LLVM only: "
                        "faster on CPU, same partitioning, memory and cost analysis)")
    args = p.parse_args(argv)

    from raphael_jax.tools.aot import parse_compiler_options, parse_kv, run, use_virtual_cpu_devices

    use_virtual_cpu_devices(args.devices)  # before anything starts jax
    from raphael_jax.config import load_config

    overrides = list(args.set)
    if args.batch is not None:
        overrides.append(f"train.batch_size={args.batch}")
    config = load_config(args.config, overrides)
    rep = run(config, args.devices, parse_kv(args.mesh), config.train.batch_size, hlo_out=args.hlo_out,
              encoders=args.encoders, compiler_options=parse_compiler_options(args.compiler_option))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
