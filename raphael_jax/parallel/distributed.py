"""Multi-host start-up: ``jax.distributed.initialize`` from the environment when a cluster is present.

Sources, first match wins:

* explicit variables ``RAPHAEL_COORDINATOR`` (host:port), ``RAPHAEL_NUM_PROCESSES``,
  ``RAPHAEL_PROCESS_ID`` (``launch/local_multihost.sh`` sets them; any cluster can);
* SLURM with several tasks (``launch/gpu_slurm.sbatch``): jax reads ``SLURM_*`` and gives each
  task the GPU ``SLURM_LOCALID``;
* Cloud TPU pods (``RAPHAEL_TPU_POD=1``, set by ``launch/tpu_pod.sh``, or ``TPU_WORKER_HOSTNAMES``
  listing more than one host): jax discovers the coordinator from the TPU metadata;
* ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``): jax's own variables.

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
    if "RAPHAEL_COORDINATOR" in env:
        jax.distributed.initialize(coordinator_address=env["RAPHAEL_COORDINATOR"],
                                   num_processes=int(env["RAPHAEL_NUM_PROCESSES"]),
                                   process_id=int(env["RAPHAEL_PROCESS_ID"]))
        return True
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = env.get("RAPHAEL_TPU_POD") == "1" or \
        len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if slurm or tpu_pod or "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize()
        return True
    return False


