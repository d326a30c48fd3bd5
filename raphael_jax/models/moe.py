"""RAPHAEL's mixtures of experts: space-MoE routed by text tokens, time-MoE routed by the timestep.

Both are top-1 mixtures of GELU feed-forward experts behind a GELU gate network (paper sec. 3.1,
App. 7.3). The paper's hard ``argmax`` gives the gate no gradient; ``gate_grad`` chooses how it
learns:

* ``"prob"`` (default): the routed expert's output is scaled by its softmax probability p, as in
  Switch Transformers. The gate learns through p; outputs shrink by p (< 1).
* ``"straight_through"``: scaled by ``p / stop_gradient(p)``: the forward value is exactly the
  paper's (weight 1) and the gate still gets the gradient of the probability-scaled form.
* ``"none"``: weight 1 and no gate gradient (the paper read literally; the gate stays at its init
  plus noise).

Router noise ``epsilon ~ N(0, router_noise^2)`` is added to the gate logits during training only
(when a ``key`` is passed), against mode collapse. There is no load-balancing loss (the paper has
none); expert usage is recorded so it can be watched.

Routing statistics are sown as ``nnx.Intermediate`` values under fixed names (see
``raphael_jax.models.routing``): ``space_route`` [B, n_y], ``space_usage`` [K], ``region_masks``
[B, n_x, n_y] (only with ``record_masks``), ``time_route`` [B], ``time_usage`` [K].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from raphael_jax.models.layers import dense
from raphael_jax.parallel import expert_parallel, rules

GATE_GRAD_MODES = ("prob", "straight_through", "none")


class Router(nnx.Module):
    """Gate network ``G``: FFN with GELU to ``K`` logits, plus noise, top-1.

    ``route = argmax softmax(G(x) + eps)``; returns (route int32 [...], weight [...], probs [..., K])
    where ``weight`` multiplies the routed expert's output according to ``gate_grad`` and is read
    from the noise-free ``probs = softmax(G(x))`` (noisy weights would make the training-time output
    scale differ from inference, where there is no noise).
    """

    def __init__(self, in_dim: int, hidden: int, num_experts: int, *, router_noise: float = 1.0,
                 gate_grad: str = "prob", rngs: nnx.Rngs, dtype=None):
        if gate_grad not in GATE_GRAD_MODES:
            raise ValueError(f"gate_grad must be one of {GATE_GRAD_MODES}, got {gate_grad!r}")
        if num_experts < 1:
            raise ValueError(f"a router needs at least one expert, got num_experts={num_experts}")
        self.fc1 = dense(in_dim, hidden, ("context", "gate"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(hidden, num_experts, ("gate", None), rngs=rngs, dtype=dtype)
        self.num_experts = num_experts
        self.router_noise = router_noise
        self.gate_grad = gate_grad

    def logits(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x))).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None):
        logits = self.logits(x)
        probs = jax.nn.softmax(logits, axis=-1)
        noisy = logits
        if key is not None and self.router_noise > 0:
            noisy = logits + self.router_noise * jax.random.normal(key, logits.shape, jnp.float32)
        # the noise picks the route; the weight is the noise-free probability of that route, so the
        # output scale seen in training (noisy routes) matches inference (no noise)
        route = jnp.argmax(noisy, axis=-1).astype(jnp.int32)
        p = jnp.take_along_axis(probs, route[..., None], axis=-1)[..., 0]
        if self.gate_grad == "prob":
            weight = p
        elif self.gate_grad == "straight_through":
            weight = p / jax.lax.stop_gradient(p)
        else:
            weight = jnp.ones_like(p)
        return route, weight, probs


TextGate = Router  # gate on a text token's embedding E(y_i) (space-MoE)
TimeGate = Router  # gate on the timestep embedding E'(t) (time-MoE)


def _expert_init(key, shape, dtype=jnp.float32):
    # fan-in scaling per expert: shape [K, fan_in, fan_out]
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                             batch_axis=(0,))(key, shape, dtype)


class ExpertBank(nnx.Module):
    """``K`` GELU FFN experts stored stacked so they shard over the ``expert`` axis.

    ``e_k(x) = W2[k] gelu(W1[k] x + b1[k]) + b2[k]``; W1 [K, D, H], W2 [K, H, D].
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
        self.w1 = nnx.Param(_expert_init(rngs.params(), (num_experts, dim, hidden)),
                            out_sharding=("expert", "embed", "mlp"))
        self.b1 = nnx.Param(jnp.zeros((num_experts, hidden)), out_sharding=("expert", "mlp"))
        self.w2 = nnx.Param(_expert_init(rngs.params(), (num_experts, hidden, dim)),
                            out_sharding=("expert", "mlp", "embed"))
        self.b2 = nnx.Param(jnp.zeros((num_experts, dim)), out_sharding=("expert", "embed"))
        self.dtype = dtype

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def _p(self, v):
        return v[...] if self.dtype is None else v[...].astype(self.dtype)


    def at_zero(self) -> jax.Array:
        """``e_k(0)`` for every expert [K, D]: the output on a masked-out (zeroed) position."""
        return jnp.einsum("kh,khd->kd", jax.nn.gelu(self._p(self.b1)), self._p(self.w2)) + self._p(self.b2)


def region_masks(attn: jax.Array, alpha: float) -> jax.Array:
    """Binary per-token region masks from the cross-attention map (paper eq. for space-MoE).

    ``M_hat[j, i] = 1 if M[j, i] >= alpha * max_j' M[j', i]`` with ``attn = M`` [B, n_x, n_y];
    stop-gradient (the threshold is not differentiable). Returns float32 [B, n_x, n_y].
    """
    attn = jax.lax.stop_gradient(attn.astype(jnp.float32))
    eta = alpha * attn.max(axis=1, keepdims=True)
    return (attn >= eta).astype(jnp.float32)


class SpaceMoE(nnx.Module):
    """Space-MoE: each text token ``i`` is routed to one expert, applied to its region of the image.

    ``SpaceMoE(h) = 1/n * sum_i w_i e_{route(y_i)}(h o M_hat_i)``, ``route(y_i) = argmax softmax(G(E(y_i)) + eps)``
    where ``M_hat_i`` is token i's binary region mask (``region_masks``), ``o`` multiplies every
    channel of an image position by the mask, ``w_i`` is the gate weight (see ``gate_grad``) and
    ``n`` is the number of real (non-padding) text tokens with ``average="real"`` (padding tokens
    are not routed), or all ``n_y`` positions with ``average="all"`` (the paper's plain 1/n_y,
    padding tokens routed like any other).

    Efficient exact form (experts act position-wise): with per-expert weighted mask counts
    ``C_k[j] = sum_{i: route(i)=k} w_i M_hat[j, i]`` and totals ``T_k = sum_{i: route(i)=k} w_i``,
    ``sum_i w_i e_{r(i)}(h o M_hat_i)[j] = sum_k C_k[j] e_k(h_j) + (T_k - C_k[j]) e_k(0)``.
    Every expert runs once over the image tokens and the combine is folded into its second matmul,
    so cost is bounded by the number of experts, not of text tokens.
    """

    def __init__(self, dim: int, context_dim: int, num_experts: int, hidden: int, gate_hidden: int, *,
                 alpha: float = 0.2, router_noise: float = 1.0, gate_grad: str = "prob",
                 average: str = "real", rngs: nnx.Rngs, dtype=None):
        if average not in ("real", "all"):
            raise ValueError(f"space_moe.average must be 'real' or 'all', got {average!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"space_moe.alpha must be in (0, 1], got {alpha}")
        self.gate = TextGate(context_dim, gate_hidden, num_experts, router_noise=router_noise,
                             gate_grad=gate_grad, rngs=rngs, dtype=dtype)
        self.experts = ExpertBank(num_experts, dim, hidden, rngs=rngs, dtype=dtype)
        self.alpha = alpha
        self.average = average

    def route(self, context: jax.Array, context_mask: jax.Array, key: jax.Array | None = None):
        """Routes and the per-token weights (zero on padding with ``average='real'``)."""
        route, weight, _ = self.gate(context, key)
        real = context_mask.astype(jnp.float32) if self.average == "real" else jnp.ones_like(weight)
        return route, weight * real, real

    def __call__(self, h: jax.Array, attn: jax.Array, context: jax.Array, context_mask: jax.Array,
                 key: jax.Array | None = None, record_masks: bool = False) -> jax.Array:
        """h [B, n_x, D]; attn [B, n_x, n_y] (head-averaged cross-attention); context [B, n_y, C]."""
        masks = region_masks(attn, self.alpha)
        route, tok_w, real = self.route(context, context_mask, key)
        k = self.experts.num_experts
        onehot = jax.nn.one_hot(route, k, dtype=jnp.float32) * tok_w[..., None]  # [B, L, K]
        counts = jnp.einsum("bnl,blk->bnk", masks, onehot)                      # C_k [B, N, K]
        totals = onehot.sum(axis=1)                                             # T_k [B, K]
        ex = self.experts
        w1, b1, w2, b2 = (ex._p(v) for v in (ex.w1, ex.b1, ex.w2, ex.b2))
        plan = rules.current()
        if expert_parallel.layout_active(plan, (w1, b1, w2, b2)):
            out = expert_parallel.space_moe(plan, rules.constrain(h, ("batch", None, None)), counts, totals,
                                            (w1, b1, w2, b2))
        else:
            act = jax.nn.gelu(jnp.einsum("bnd,kdh->bnkh", h, w1) + b1)
            c = counts.astype(act.dtype)
            out = jnp.einsum("bnkh,khd->bnd", act * c[..., None], w2) + jnp.einsum("bnk,kd->bnd", c, b2)
            rest = (totals[:, None, :] - counts).astype(act.dtype)
            out = out + jnp.einsum("bnk,kd->bnd", rest, ex.at_zero())
        n = jnp.maximum(real.sum(axis=1), 1.0)
        out = out / n[:, None, None].astype(out.dtype)

        routed = (real > 0)
        usage = (jax.nn.one_hot(route, k) * routed[..., None]).sum((0, 1)) / jnp.maximum(routed.sum(), 1)
        self.sow(nnx.Intermediate, "space_route", jnp.where(routed, route, -1))
        self.sow(nnx.Intermediate, "space_usage", usage)
        if record_masks:
            self.sow(nnx.Intermediate, "region_masks", masks)
        return out


class TimeMoE(nnx.Module):
    """Time-MoE: ``h' = w * te_{t_router(t)}(h_c)``, ``t_router(t) = argmax softmax(G'(E'(t)) + eps)``.

    Top-1 per sample (every token of a sample shares its timestep). Only the routed expert's FLOPs
    are spent per sample: ``impl="gather"`` multiplies each sample by its own expert's weights
    (batched matmul over gathered weights, exact FLOPs on every backend); ``impl="ragged"`` sorts
    samples by expert and uses ``jax.lax.ragged_dot`` (grouped matmul kernels on GPU/TPU; XLA:CPU
    lowers it densely).
    """

    def __init__(self, dim: int, temb_dim: int, num_experts: int, hidden: int, gate_hidden: int, *,
                 router_noise: float = 1.0, gate_grad: str = "prob", impl: str = "gather",
                 rngs: nnx.Rngs, dtype=None):
        if impl not in ("gather", "ragged"):
            raise ValueError(f"time_moe.impl must be 'gather' or 'ragged', got {impl!r}")
        self.gate = TimeGate(temb_dim, gate_hidden, num_experts, router_noise=router_noise,
                             gate_grad=gate_grad, rngs=rngs, dtype=dtype)
        self.experts = ExpertBank(num_experts, dim, hidden, rngs=rngs, dtype=dtype)
        self.impl = impl

    def __call__(self, h: jax.Array, temb: jax.Array, key: jax.Array | None = None) -> jax.Array:
        route, weight, _ = self.gate(temb, key)  # [B]
        ex = self.experts
        w1, b1, w2, b2 = (ex._p(v) for v in (ex.w1, ex.b1, ex.w2, ex.b2))
        b, n, d = h.shape
        plan = rules.current()
        if expert_parallel.layout_active(plan, (w1, b1, w2, b2)):
            out, dropped = expert_parallel.time_moe(plan, rules.constrain(h, ("batch", None, None)), route,
                                                    weight, (w1, b1, w2, b2))
            self.sow(nnx.Intermediate, "time_route", route)
            self.sow(nnx.Intermediate, "time_usage", jax.nn.one_hot(route, ex.num_experts).mean(0))
            self.sow(nnx.Intermediate, "time_dropped", dropped)
            return out  # already scaled by the gate weight
        if self.impl == "gather":
            act = jax.nn.gelu(jnp.einsum("bnd,bdh->bnh", h, w1[route]) + b1[route][:, None])
            out = jnp.einsum("bnh,bhd->bnd", act, w2[route]) + b2[route][:, None]
        else:
            order = jnp.argsort(route, stable=True)
            inv = jnp.argsort(order)
            sizes = jnp.bincount(route, length=ex.num_experts).astype(jnp.int32) * n
            rs = route[order]
            hs = h[order].reshape(b * n, d)
            act = jax.nn.gelu(jax.lax.ragged_dot(hs, w1, sizes) + jnp.repeat(b1[rs], n, axis=0))
            out = jax.lax.ragged_dot(act, w2, sizes) + jnp.repeat(b2[rs], n, axis=0)
            out = out.reshape(b, n, d)[inv]
        self.sow(nnx.Intermediate, "time_route", route)
        self.sow(nnx.Intermediate, "time_usage", jax.nn.one_hot(route, ex.num_experts).mean(0))
        return out * weight[:, None, None].astype(out.dtype)
