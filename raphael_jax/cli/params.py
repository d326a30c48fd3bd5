"""``raphael-params``: parameter count of configs per component, without allocating them.

    raphael-params --config configs/raphael_3b.py
    raphael-params --all            # every config in configs/

See :mod:`raphael_jax.tools.param_count`.
"""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="raphael-params", description="Parameter count per component (no allocation).")
    p.add_argument("--config", action="append", default=[], help="config file[:variant]; repeatable")
    p.add_argument("--all", action="store_true", help="every configs/*.py next to the package")
    args = p.parse_args(argv)
    from raphael_jax.config import load_config
    from raphael_jax.tools.param_count import config_files, config_name, count_params, format_table

    specs = list(args.config)
    if args.all:
        specs += config_files()
    if not specs:
        p.error("give --config FILE or --all")
    rows = {config_name(spec): count_params(load_config(spec)) for spec in specs}
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
