"""Multi-host start-up: ``jax.distributed.initialize`` from the environment when a cluster is present.

Sources, first match wins:

* explicit variables ``RAPHAEL_COORDINATOR`` (host:port), ``RAPHAEL_NUM_PROCESSES``,
  ``RAPHAEL_PROCESS_ID`` (``launch/local_multihost.sh`` sets them; any cluster can);
* SLURM with several tasks (``launch/gpu_slurm.sbatch``): jax reads ``SLURM_*`` and gives each
  task the GPU ``SLURM_LOCALID``;
* Cloud TPU pods (``RAPHAEL_TPU_POD=1``, set by ``launch/tpu_pod.sh``, or ``TPU_WORKER_HOSTNAMES``
  listing more than one host): jax discovers the coordinator from the TPU metadata;
* ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``): jax's own variables.

A process that fails leaves at once (:func:`exit_now`); the others are stopped within
``RAPHAEL_HEARTBEAT_TIMEOUT`` seconds (default 100) with jax's message that another task died, or at
once when a collective loses its peer (:func:`peer_failure`: ``raphael-train`` says so in one line).

``RAPHAEL_LOCAL_DEVICES=N`` gives a CPU process N virtual devices (``jax_num_cpu_devices``; set it
instead of ``XLA_FLAGS`` in multi-process CPU runs). Single-process runs do nothing.
"""
from __future__ import annotations

import os

import jax


def _cpu_devices_from_env(env) -> None:
    n = env.get("RAPHAEL_LOCAL_DEVICES")
    if n:
        jax.config.update("jax_num_cpu_devices", int(n))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def maybe_initialize() -> bool:
    """Initialize ``jax.distributed`` when the environment describes a multi-process job.

    Must run before anything touches a jax backend. Returns whether it initialized.
    """
    env = os.environ
    _cpu_devices_from_env(env)
    timeouts = _timeouts(env)
    if "RAPHAEL_COORDINATOR" in env:
        jax.distributed.initialize(coordinator_address=env["RAPHAEL_COORDINATOR"],
                                   num_processes=int(env["RAPHAEL_NUM_PROCESSES"]),
                                   process_id=int(env["RAPHAEL_PROCESS_ID"]), **timeouts)
        return True
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = env.get("RAPHAEL_TPU_POD") == "1" or \
        len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if slurm or tpu_pod or "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(**timeouts)
        return True
    return False


def _timeouts(env) -> dict:
    """``RAPHAEL_HEARTBEAT_TIMEOUT`` (seconds, default 100: how long a silent process is waited for before
    the others are stopped) and ``RAPHAEL_INIT_TIMEOUT`` (default 300: how long start-up waits for every
    process to join) for ``jax.distributed.initialize``."""
    out = {}
    for var, arg in (("RAPHAEL_HEARTBEAT_TIMEOUT", "heartbeat_timeout_seconds"),
                     ("RAPHAEL_INIT_TIMEOUT", "initialization_timeout")):
        if env.get(var):
            value = int(env[var])
            if value < 1:
                raise ValueError(f"{var}={env[var]} must be a positive number of seconds")
            out[arg] = value
    return out


# What a collective or the coordination service says when another process died or stopped answering.
PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "heartbeat timeout", "timed out",
                "unhealthy", "Gloo", "coordination service", "Socket closed", "DEADLINE_EXCEEDED", "UNAVAILABLE")


def peer_failure(e: BaseException) -> str | None:
    """The first line of ``e`` when it says another process of a multi-process run failed, else None."""
    text = str(e)
    if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError", "RuntimeError") and \
            any(m in text for m in PEER_FAILURE):
        return text.strip().splitlines()[0][:300]
    return None


def exit_now(status: int) -> None:
    """Leave a multi-process run at once with ``status``: flush the output and ``os._exit``.

    A process that fails must not wait at ``jax.distributed``'s shutdown barrier (``atexit``): the others
    may be blocked in a collective waiting for it, and would wait until the barrier's timeout. Gone, it
    stops sending heartbeats, and the coordination service stops the others within the heartbeat timeout
    (a collective that loses its peer fails at once on CPU).
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


