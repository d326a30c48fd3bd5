"""Stop requests (SIGTERM, SIGINT) turned into a checkpoint at the step boundary, agreed by every host.

The trainer (raphael_jax/train/loop.py) installs :class:`StopSignals` around its loop. The first SIGTERM
or SIGINT only sets a flag: the current step finishes, every process saves a checkpoint at that step
and the loop raises :class:`Preempted`, which ``raphael-train`` turns into exit status 128 + the signal
number (143 for SIGTERM, 130 for Ctrl-C), so a scheduler sees a failure and requeues the job; the same
command resumes. Further signals while the checkpoint is written are reported and ignored, so a
second Ctrl-C cannot leave half a checkpoint behind (orbax writes into a temporary folder and renames it
when complete, raphael_jax/train/checkpoint.py).

With several processes the hosts agree: each step, the flags of all processes are gathered
(``multihost_utils.process_allgather``) and all stop at the same step when any one was signalled
(schedulers signal hosts at slightly different times).
"""
from __future__ import annotations

import signal
import sys
import threading

import jax
import numpy as np

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint at ``step``."""

    def __init__(self, signum: int, step: int, directory: str):
        self.signum, self.step, self.directory = signum, step, directory
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint saved in "
                         f"{directory}; run the same command again to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: SIGTERM / SIGINT set :attr:`signum` instead of killing the process.

    Installs handlers only in the main thread (Python allows no other); elsewhere it never fires.
    """

    def __init__(self):
        self.signum: int | None = None
        self.saving = False
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  "(a second signal is ignored until it is written)", file=sys.stderr, flush=True)
        else:
            what = "the checkpoint is being written" if self.saving else "stopping at the end of this step"
            print(f"{signal.Signals(signum).name} ignored: {what}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def requested(self) -> int | None:
        """The signal every process stops on (0 = none): this process's, or any other's when there are
        several (a collective: every process must call it at the same step)."""
        local = self.signum or 0
        if jax.process_count() == 1:
            return local or None
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.int32(local)))
        hit = [int(f) for f in flags.ravel() if f]
        return hit[0] if hit else None
