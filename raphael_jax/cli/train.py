"""``raphael-train --config configs/tiny.py[:variant] --workdir DIR [--set key=value ...]``.

Trains (resuming from the workdir's newest intact checkpoint) with
:func:`raphael_jax.train.loop.train_and_evaluate`; ``jax.distributed`` is initialized from the environment
first (pods, SLURM, launch/local_multihost.sh).

Exit status: 0 done; 2 bad input (config, flags, a workdir trained with another config, nothing intact
to resume), one line on stderr; 1 the run failed (non-finite steps; a checkpoint could not be written,
e.g. a full disk: the earlier ones are intact); 128 + N stopped by signal N after
saving a checkpoint (143 SIGTERM, 130 Ctrl-C): a scheduler requeues it and the same command resumes.
``--debug`` shows the traceback instead of the one line.
"""
from __future__ import annotations

import argparse
import os
import sys


def workdir_problem(workdir: str) -> str | None:
    """Why ``workdir`` cannot hold a run (a file there, an unwritable folder), or None."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--workdir {workdir} is a file, not a run folder"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"--workdir {workdir}: {existing} is a file, so the run folder cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--workdir {workdir}: {existing} is not writable"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="raphael-train",
                                description="Train RAPHAEL (resumes from the workdir's latest checkpoint).")
    p.add_argument("--config", default="configs/tiny.py", help="config file, optionally :variant (ablations)")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, tokenizer, TensorBoard)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.num_steps=100")
    p.add_argument("--steps", type=int, default=None, help="stop at this step (default train.num_steps)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a workdir with a config that differs in more than steps / intervals / sampling")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    from raphael_jax.parallel.distributed import maybe_initialize

    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be a positive step number, got {args.steps}")

    def fail(msg: str) -> int:
        print(f"raphael-train: error: {msg}", file=sys.stderr, flush=True)
        return 2

    try:
        multi = maybe_initialize()  # before anything touches JAX's backends (load_config may)
    except ValueError as e:  # a malformed RAPHAEL_* variable
        if args.debug:
            raise
        return fail(str(e).splitlines()[0])
    if not multi:
        return _train(args, fail)
    # Several processes: a failing one leaves at once, so that the others are stopped within the heartbeat
    # timeout instead of waiting at jax's shutdown barrier (raphael_jax/parallel/distributed.py).
    import jax

    from raphael_jax.parallel.distributed import exit_now, peer_failure

    where = f"process {jax.process_index()} of {jax.process_count()}"
    try:
        status = _train(args, fail)
    except Exception as e:
        lost = peer_failure(e)
        if lost is None or args.debug:
            import traceback

            traceback.print_exc()
        else:
            print(f"raphael-train: error: {where}: another process failed or stopped answering ({lost}); "
                  "see its log for the cause", file=sys.stderr, flush=True)
        exit_now(1)
    if status not in (0, 128 + 15, 128 + 2):  # done and preempted (all processes agree) shut down normally
        exit_now(status)
    return status


def _train(args, fail) -> int:
    from raphael_jax.config import ConfigError, load_config
    from raphael_jax.train.checkpoint import CheckpointWriteError
    from raphael_jax.train.loop import ConfigMismatchError, NonFiniteError, train_and_evaluate
    from raphael_jax.train.preemption import Preempted

    try:
        config = load_config(args.config, args.set)
    except (ConfigError, KeyError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        return fail(str(e.args[0] if isinstance(e, KeyError) else e).splitlines()[0])
    problem = workdir_problem(args.workdir)
    if problem:
        return fail(problem)
    try:
        train_and_evaluate(config, args.workdir, num_steps=args.steps, allow_config_change=args.allow_config_change)
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        return e.exit_code
    except (ConfigError, ConfigMismatchError, FileNotFoundError, NotADirectoryError) as e:
        if args.debug:
            raise
        return fail(str(e).splitlines()[0])
    except NonFiniteError as e:
        if args.debug:
            raise
        print(f"raphael-train: error: {e}", file=sys.stderr, flush=True)
        return 1
    except CheckpointWriteError as e:
        if args.debug:
            raise
        print(f"raphael-train: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # orbax's writer threads stopped mid-write: leaving through interpreter shutdown would print their
        # errors after this line (or wait on them); the earlier checkpoints are already intact on disk
        os._exit(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
