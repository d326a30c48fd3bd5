"""raphael_jax: RAPHAEL text-to-image diffusion (space-MoE, time-MoE, edge supervision) in JAX/Flax NNX."""
import flax

# Parameters carry logical axis names only; sharding is applied by the trainer through jit
# out_shardings (raphael_jax.parallel), never eagerly at variable creation.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
