"""The pure train step ``(state, batch, rng) -> (state, metrics)`` and the state it updates.

The model is used functionally: ``nnx.split`` once into a graphdef and its parameters; the state
is a plain pytree dict ``{step, params, ema_params, opt_state, rng}`` that orbax saves as is and
the scale-out code shards by the parameters' logical axis names.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from raphael_jax.diffusion.schedule import NoiseSchedule, q_sample, training_target
from raphael_jax.models.edge import edge_loss
from raphael_jax.models.raphael import RaphaelModel
from raphael_jax.models.routing import pop_intermediates
from raphael_jax.parallel import rules as rules_lib
from raphael_jax.parallel.rules import ShardingPlan
from raphael_jax.train.state import learning_rate


def empty_prompt(tokens: jax.Array, mask: jax.Array, eos_id: int):
    """Tokens and mask of the empty caption (EOS alone), shaped like ``tokens`` (for CFG dropout)."""
    empty_tok = jnp.zeros_like(tokens).at[:, 0].set(eos_id)
    empty_mask = jnp.zeros_like(mask).at[:, 0].set(True)
    return empty_tok, empty_mask


def compute_losses(model: RaphaelModel, config, sched: NoiseSchedule, batch: dict, key: jax.Array,
                   eos_id: int = 1, text_states: jax.Array | None = None, controlnet=None):
    """Denoising loss + edge focal loss for one batch; returns (total, metrics dict).

    ``batch``: image [B,H,W,C] in [-1,1] (or latents), tokens/mask (or ``text_states`` [B,L,D] for
    external encoders, as an argument or a batch entry), edges [B,H,W] (when edge supervision is on).
    With external text states, caption dropout replaces a dropped sample's states and mask with the
    batch's ``null_text_states`` [B,L,D] / ``null_mask`` [B,L] (the stored empty-prompt encoding,
    see ``raphael_jax.data.latents``); without them there is no dropout. With ``controlnet`` (a ControlNet
    run) the U-Net is driven by its residuals from the batch's edge map and the loss is the denoising loss.
    """
    x0 = batch["image"]
    b = x0.shape[0]
    k_t, k_noise, k_drop, k_route = jax.random.split(key, 4)
    t = jax.random.randint(k_t, (b,), 0, sched.num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = q_sample(sched, x0, t, noise)
    target = training_target(sched, x0, noise, t, config.diffusion.prediction)
    drop = jax.random.uniform(k_drop, (b,)) < config.train.caption_dropout
    mask = batch["mask"]
    if text_states is None and "text_states" in batch:
        text_states = batch["text_states"]
    if text_states is None:
        e_tok, e_mask = empty_prompt(batch["tokens"], mask, eos_id)
        tokens = jnp.where(drop[:, None], e_tok, batch["tokens"])
        mask = jnp.where(drop[:, None], e_mask, mask)
        context = model.encode_text(tokens, mask)
    else:
        context = text_states  # external encoders: dropout swaps in the stored null embedding
        if "null_text_states" in batch:
            null = jnp.broadcast_to(batch["null_text_states"].astype(context.dtype), context.shape)
            context = jnp.where(drop[:, None, None], null, context)
            mask = jnp.where(drop[:, None], jnp.broadcast_to(batch["null_mask"], mask.shape), mask)
    with_edges = config.model.edge.enabled and controlnet is None
    if controlnet is None:
        out = model.unet(x_t, t, context, mask, key=k_route, with_edges=with_edges)
    else:
        from raphael_jax.models.controlnet import controlled_unet_apply
        out = controlled_unet_apply(model.unet, controlnet, x_t, t, context, mask, batch["edges"][..., None],
                                    1.0, key=k_route, with_edges=False)
        pop_intermediates(controlnet)
    inter = pop_intermediates(model)
    denoise = jnp.mean((out - target) ** 2)
    e = config.model.edge
    l_edge = jnp.zeros((), jnp.float32)
    if with_edges:
        l_edge = edge_loss(inter["edge_logits"], batch["edges"], t, e.t_c, e.focal_alpha, e.focal_gamma)
    total = denoise + e.weight * l_edge
    metrics = {"loss": total, "denoise_loss": denoise, "edge_loss": l_edge}
    if inter["space_usage"]:
        usage = jnp.stack(inter["space_usage"])            # [layers, K]
        metrics["space_usage_max"] = usage.max(-1).mean()  # 1/K when balanced, 1 when collapsed
    if inter["time_usage"]:
        metrics["time_usage_max"] = jnp.stack(inter["time_usage"]).max(-1).mean()
    if inter.get("time_dropped"):  # expert-parallel time-MoE: samples over their expert's capacity skip it
        metrics["time_dropped_fraction"] = jnp.stack(inter["time_dropped"]).mean()
    return total, metrics


def make_train_step(graphdef, config, tx: optax.GradientTransformation, sched: NoiseSchedule, eos_id: int = 1):
    """Build the pure train step; jit it (with shardings and donation) where it is used.

    A step whose loss or gradient norm is not finite changes nothing but the step counter: params, EMA
    and optimizer state are kept bit for bit (``metrics["nonfinite"]`` = 1; the loop counts them and
    stops after ``train.max_nonfinite_steps`` in a row, raphael_jax/train/loop.py).

    With ``lora.rank`` > 0 the step is ``(state, batch, rng, base)``: ``state["params"]`` are the LoRA
    adapters, the only thing differentiated and updated; ``base`` (the frozen model weights) is read.
    With ``control.enabled`` likewise, ``state["params"]`` being the ControlNet's.
    """
    ema_decay = config.train.ema_decay
    lora_scale = control_graphdef = None
    if config.control.enabled:
        from raphael_jax.train.control import split_controlnet
        control_graphdef = split_controlnet(config)[0]
    if config.lora.rank:
        from raphael_jax.models.lora import adapter_scale, apply_lora
        lora_scale = adapter_scale(config.lora.alpha, config.lora.rank)

    def train_step(state: dict, batch: dict, rng: jax.Array, base=None):
        def loss_fn(params):
            if control_graphdef is not None:
                return compute_losses(nnx.merge(graphdef, base), config, sched, batch, rng, eos_id,
                                      controlnet=nnx.merge(control_graphdef, params))
            if lora_scale is not None:
                params = apply_lora(base, [(params, lora_scale)])
            model = nnx.merge(graphdef, params)
            return compute_losses(model, config, sched, batch, rng, eos_id)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema_params"], params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = learning_rate(config, state["step"])
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                     "ema_params": keep(ema, state["ema_params"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "rng": state["rng"]}
        return new_state, metrics

    return train_step


def step_rng(state: dict) -> jax.Array:
    """The step's RNG: the run key folded with the step (so resume reproduces the same noise)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def jit_train_step(train_step, plan: ShardingPlan, state_shardings, global_batch_size: int | None = None,
                   base_shardings=None):
    """``train_step`` jitted with explicit shardings, the state donated, traced under ``plan``.

    The batch (a dict of batch-major arrays) is sharded over the batch axes, the RNG and metrics
    are replicated, the state keeps ``state_shardings`` (updated in place: donated). With
    ``base_shardings`` (LoRA) the step takes the frozen base weights as a fourth, not donated, argument.
    """
    rep = plan.replicated()
    ins = (state_shardings, plan.batch_sharding(global_batch_size), rep)
    if base_shardings is not None:
        def step(state, batch, rng, base):
            with rules_lib.use(plan):
                return train_step(state, batch, rng, base)
        ins = ins + (base_shardings,)
    else:
        def step(state, batch, rng):
            with rules_lib.use(plan):
                return train_step(state, batch, rng)

    return jax.jit(step, in_shardings=ins, out_shardings=(state_shardings, rep), donate_argnums=(0,))
