"""The commands: one thin module per console script (setup.py ``entry_points``), each ``main(argv=None) -> int``.

Every module parses its arguments with argparse, calls library functions and prints; no other module
of the package parses arguments or defines ``main``. ``python -m raphael_jax.cli.<name>`` runs the same.

| command | module |
|---|---|
| ``raphael-train`` | :mod:`raphael_jax.cli.train` |
| ``raphael-sample`` | :mod:`raphael_jax.cli.sample` |
| ``raphael-eval`` (alignment, subject, control, report, upscale, probe, fid, ...) | :mod:`raphael_jax.cli.eval` |
| ``raphael-params`` | :mod:`raphael_jax.cli.params` |
| ``raphael-aot`` | :mod:`raphael_jax.cli.aot` |
| ``raphael-paths`` | :mod:`raphael_jax.cli.paths` |
| ``raphael-ablate`` | :mod:`raphael_jax.cli.ablate` |
| ``raphael-precompute`` | :mod:`raphael_jax.cli.precompute` |
| ``raphael-convert`` (clip, vae, inception, esrgan) | :mod:`raphael_jax.cli.convert` |
| ``raphael-data`` (image-text, shapes, shapes-folder) | :mod:`raphael_jax.cli.data` |
| ``raphael-train-vae`` | :mod:`raphael_jax.cli.train_vae` |
| ``raphael-train-upscaler`` | :mod:`raphael_jax.cli.train_upscaler` |
| ``raphael-upscale`` | :mod:`raphael_jax.cli.upscale` |

Bad input (arguments, config values, missing or wrong folders, corrupt files) is answered with one line,
``<command>: error: <what is wrong and what to do>``, and exit status 2, before anything is written;
``--debug`` shows the traceback instead. ``raphael-sample``, ``raphael-eval``, ``raphael-convert``,
``raphael-data``, ``raphael-upscale`` and ``raphael-train-upscaler`` share :func:`run_guarded` and
:func:`add_debug_flag` below (this module holds no
command, so it is not a console script).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

__all__ = ["BAD_INPUT", "add_debug_flag", "error_line", "require_run", "run_guarded"]

#: What a command answers with one line and exit status 2 (bad arguments, files, folders, corrupt weights):
#: ``ValueError`` (ConversionError, TokenizerError, json errors), ``OSError`` (missing / unreadable files),
#: ``KeyError`` (config keys). Anything else is a bug and keeps its traceback.
BAD_INPUT = (ValueError, OSError, KeyError)


def add_debug_flag(parser: argparse.ArgumentParser, _sub: bool = False) -> argparse.ArgumentParser:
    """``--debug`` on ``parser`` and on every subcommand under it (``raphael-data --debug image-text ...`` and
    ``raphael-data image-text ... --debug`` both work). Call after all subcommands are added."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if _sub else False,
                        help="show the traceback instead of the one-line error")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                add_debug_flag(sub, _sub=True)
    return parser


def _lines(e: BaseException) -> list[str]:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return [s for s in text.strip().splitlines() if s.strip()] or [type(e).__name__]


def error_line(prog: str, e: BaseException) -> str:
    """``prog: error: <the message's first line>`` (a KeyError without its quotes; the type for an empty one)."""
    lines = _lines(e)
    return f"{prog}: error: {lines[0].rstrip(':')} (listed above)" if len(lines) > 1 else f"{prog}: error: {lines[0]}"


def run_guarded(prog: str, debug: bool, body: Callable[[], int | None], *, system_exit: bool = False) -> int:
    """``body()``'s exit status (None: 0); :data:`BAD_INPUT` raised in it becomes ``prog: error: ...`` on stderr
    and exit status 2: returned, or raised as ``SystemExit(2)`` with ``system_exit`` (the commands whose
    refusals always exited like argparse's ``error``). With ``debug`` the exception propagates with its traceback.

    A multi-line message (e.g. the list of missing tensors of a ConversionError) prints its detail lines
    first, so the error line is always the last line.
    """
    try:
        status = body()
    except BAD_INPUT as e:
        if debug:
            raise
        for line in _lines(e)[1:]:
            print(line, file=sys.stderr)
        print(error_line(prog, e), file=sys.stderr, flush=True)
        if system_exit:
            raise SystemExit(2) from None
        return 2
    return 0 if status is None else int(status)


def require_run(workdir: str) -> None:
    """FileNotFoundError unless ``workdir`` is a raphael-train run folder (it has ``checkpoints/``); checked
    before anything is loaded, so a wrong path is never created or written."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        what = ("is a file" if os.path.isfile(workdir) else "does not exist" if not os.path.exists(workdir)
                else "no checkpoints/ folder")
        raise FileNotFoundError(f"--workdir {workdir} holds no checkpoints ({what}): give the --workdir of a "
                                "trained raphael-train run")
