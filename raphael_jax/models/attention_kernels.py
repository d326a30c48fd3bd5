"""Scaled dot-product attention with implementations chosen by config and backend.

One function, :func:`dot_product_attention`, computes ``softmax(Q K^T / sqrt(d)) V`` per head for
q [B, N, H, D] and k, v [B, L, H, D] (an optional key mask [B, L], True = real token), and on request
the paper's head-averaged map ``M = mean_heads softmax(Q K^T / sqrt(d))`` [B, N, L] (RAPHAEL Sec. 3:
the space-MoE region masks and the edge head read M, so cross-attention needs it explicitly).

Implementations (``model.attention``):

* ``xla``: the logits and probabilities of every head materialised (einsums + softmax in float32).
  Memory O(B H N L) in the forward pass and again in the backward pass.
* ``chunked``: the same arithmetic over blocks of ``model.attention_chunk`` queries (``lax.map``), each
  block rematerialised in the backward pass (``jax.checkpoint``), so the live attention memory is
  O(B H chunk L) in training and inference. Runs on every backend; the CPU fallback and the
  reference the fused kernels are tested against (tests/models/test_attention_kernels.py).
* ``blocked``: one (batch, head) pair at a time (``lax.map``), in blocks of queries of about 2^20 logits
  (at most ``model.attention_chunk`` queries), with a flash-style custom VJP: the forward keeps only the
  output and each row's max and normaliser, the backward recomputes one block's probabilities at a
  time (dS = P * (dP - rowsum(dO * O)), as in FlashAttention's backward). Memory: one block's logits in
  flight, O(B H N) saved. On CPUs 2-2.5x faster than ``xla`` forward + backward, since each block's map
  stays in cache (bench/attention.py, bench/results/attention.md). Self-attention only, like the fused
  kernels.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash kernel on
  NVIDIA GPUs (bfloat16 / float16 inputs).
* ``flash``: the Pallas TPU flash-attention kernel (``jax.experimental.pallas.ops.tpu``); tested on
  CPU in Pallas' TPU interpret mode. It tiles the keys in blocks of 128: key lengths that are not a
  multiple of 128 run ``chunked``.
* ``auto`` (default): ``cudnn`` on GPUs for 16-bit inputs, ``flash`` on TPUs, ``blocked`` on CPUs (``xla`` for
  cross-attention, whose maps over a few text tokens are small, and for maps under 128 x 128 logits per
  pair, where ``xla`` is faster: bench/results/attention.md), ``xla`` otherwise.

The fused kernels (and ``blocked``) never return the probabilities, so they serve self-attention only; a call that
asks for the map (cross-attention) runs ``xla`` when that was chosen and ``chunked`` otherwise, so
its memory stays bounded by the chunk (the map itself, [B, N, L] with L text tokens, is small).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["ATTENTION_IMPLS", "dot_product_attention", "resolve_impl"]

_FUSED = ("cudnn", "flash", "blocked")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "blocked", "cudnn", "flash")  # = config.ATTENTION_IMPLS (tested)
FLASH_BLOCK = 128
BLOCKED_MAP = 1 << 20  # blocked: queries per block such that one block's logits are ~4 MiB (cache-sized)
BLOCKED_MIN_MAP = 128 * 128  # auto runs ``blocked`` on CPUs from this many logits per (batch, head) pair
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_impl(impl: str, dtype=jnp.float32, platform: str | None = None, *, need_map: bool = False,
                 map_size: int | None = None) -> str:
    """The implementation that runs for ``impl`` on ``platform`` (default: JAX's default backend).

    ``auto`` picks ``cudnn`` on GPUs for 16-bit inputs, ``flash`` on TPUs, ``blocked`` on CPUs (``xla``
    for calls that need the map, and for maps of fewer than ``BLOCKED_MIN_MAP`` = N x L logits per pair,
    where one loop step per pair costs more than it saves), else ``xla``. A call that needs the
    head-averaged map gets ``chunked`` in place of a fused kernel or ``blocked``. An explicit fused
    kernel on a backend that lacks it is a ValueError naming the config key.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    platform = platform or jax.default_backend()
    if impl == "auto":
        if platform == "gpu" and jnp.dtype(dtype) in _HALF:
            impl = "cudnn"
        elif platform == "tpu":
            impl = "flash"
        elif platform == "cpu":
            small = need_map or (map_size is not None and map_size < BLOCKED_MIN_MAP)
            impl = "xla" if small else "blocked"  # maps over few text tokens are small: no recompute
        else:
            impl = "xla"
    elif impl == "cudnn" and platform != "gpu":
        raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU; this backend is {platform!r} "
                         "(use 'auto', 'xla' or 'chunked')")
    elif impl == "cudnn" and jnp.dtype(dtype) not in _HALF:
        raise ValueError(f"model.attention='cudnn' needs bfloat16 or float16 inputs, got {jnp.dtype(dtype)} "
                         "(set model.dtype='bfloat16', or use 'auto')")
    elif impl == "flash" and platform not in ("tpu", "cpu"):  # cpu: Pallas TPU interpret mode (tests)
        raise ValueError(f"model.attention='flash' is the Pallas TPU kernel; this backend is {platform!r} "
                         "(use 'auto', 'cudnn', 'xla' or 'chunked')")
    if need_map and impl in _FUSED:
        impl = "chunked"
    return impl


def _dense(q, k, v, mask, need_map: bool):
    """The materialised form: returns (out [B, n, H, D], head-mean probabilities [B, n, L] or None)."""
    logits = jnp.einsum("bnhd,blhd->bhnl", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhnl,blhd->bnhd", probs.astype(v.dtype), v)
    return out, (probs.mean(axis=1) if need_map else None)


def _chunked(q, k, v, mask, need_map: bool, chunk: int):
    b, n, h, d = q.shape
    c = max(1, min(int(chunk), n))
    if c == n:
        return jax.checkpoint(_dense, static_argnums=(4,))(q, k, v, mask, need_map)
    pad = (-n) % c
    blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, (n + pad) // c, c, h, d).swapaxes(0, 1)

    @jax.checkpoint
    def block(qc):
        return _dense(qc, k, v, mask, need_map)

    out, probs = jax.lax.map(block, blocks)  # [n_blocks, B, c, ...]
    out = out.swapaxes(0, 1).reshape(b, n + pad, h, d)[:, :n]
    if need_map:
        probs = probs.swapaxes(0, 1).reshape(b, n + pad, -1)[:, :n]
    return out, probs


def _pair_forward(q, k, v, valid):
    """One (batch, head) pair: q [N, D], k, v [L, D], valid [L] float (1 = attend).

    Returns (out [N, D] float32, row max m [N], row normaliser z [N]).
    """
    s = jnp.einsum("nd,ld->nl", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    s = jnp.where(valid > 0, s, jnp.finfo(jnp.float32).min)
    m = s.max(-1)
    e = jnp.exp(s - m[:, None])
    z = e.sum(-1)
    return jnp.einsum("nl,ld->nd", e, v.astype(jnp.float32)) / z[:, None], m, z


@jax.custom_vjp
def _blocked_pairs(q, k, v, valid):
    """q [P, N, D], k, v [P, L, D], valid [P, L]: attention of each of the P pairs, one at a time."""
    return _blocked_fwd(q, k, v, valid)[0]


def _blocked_fwd(q, k, v, valid):
    out, m, z = jax.lax.map(lambda a: _pair_forward(*a), (q, k, v, valid))
    out = out.astype(v.dtype)
    return out, (q, k, v, valid, out, m, z)


def _blocked_bwd(res, d_out):
    q, k, v, valid, out, m, z = res
    scale = 1.0 / math.sqrt(q.shape[-1])

    def pair(a):
        qq, kk, vv, va, oo, mm, zz, do = a
        f32 = jnp.float32
        s = jnp.einsum("nd,ld->nl", qq, kk, preferred_element_type=f32) * scale
        s = jnp.where(va > 0, s, jnp.finfo(f32).min)
        p = jnp.exp(s - mm[:, None]) / zz[:, None]
        do = do.astype(f32)
        dv = jnp.einsum("nl,nd->ld", p, do)
        dp = jnp.einsum("nd,ld->nl", do, vv.astype(f32))
        ds = p * (dp - jnp.sum(do * oo.astype(f32), -1, keepdims=True)) * scale
        ds = jnp.where(va > 0, ds, 0.0)  # masked keys get no gradient (matters for rows with none left)
        dq = jnp.einsum("nl,ld->nd", ds, kk.astype(f32))
        dk = jnp.einsum("nl,nd->ld", ds, qq.astype(f32))
        return dq.astype(qq.dtype), dk.astype(kk.dtype), dv.astype(vv.dtype)

    dq, dk, dv = jax.lax.map(pair, (q, k, v, valid, out, m, z, d_out))
    return dq, dk, dv, jnp.zeros_like(valid)


_blocked_pairs.defvjp(_blocked_fwd, _blocked_bwd)


def _blocked(q, k, v, mask, chunk: int):
    """Pairs of (batch, head), and within a pair blocks of queries (each block sees every key): ``chunk``
    queries at most, fewer when the keys are many, so that a block holds about ``BLOCKED_MAP`` logits."""
    b, n, h, d = q.shape
    n_kv = k.shape[1]
    c = max(1, min(int(chunk), n, max(8, BLOCKED_MAP // n_kv // 8 * 8)))
    nb = -(-n // c)  # query blocks per pair
    pad = nb * c - n
    fold = lambda x: x.swapaxes(1, 2).reshape(b * h, x.shape[1], d)  # noqa: E731  [B*H, tokens, D]
    qf = jnp.pad(fold(q), ((0, 0), (0, pad), (0, 0))).reshape(b * h * nb, c, d)
    kf, vf = (jnp.repeat(fold(x), nb, axis=0) for x in (k, v))  # every block of a pair sees its keys
    valid = jnp.ones((b, n_kv), jnp.float32) if mask is None else mask.astype(jnp.float32)
    valid = jnp.repeat(jnp.broadcast_to(valid[:, None, :], (b, h, n_kv)).reshape(b * h, n_kv), nb, axis=0)
    out = _blocked_pairs(qf, kf, vf, valid).reshape(b * h, nb * c, d)[:, :n]
    return out.reshape(b, h, n, d).swapaxes(1, 2)


def _cudnn(q, k, v, mask):
    m = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn")


def _flash(q, k, v, mask):
    from jax.experimental.pallas.ops.tpu.flash_attention import BlockSizes, SegmentIds, flash_attention

    b, n, h, d = q.shape
    seg = None
    if mask is not None:  # padded keys get segment 0, queries segment 1: they never attend to padding
        seg = SegmentIds(q=jnp.ones((b, n), jnp.int32), kv=mask.astype(jnp.int32))
    bq, bk = min(n, FLASH_BLOCK), FLASH_BLOCK
    sizes = BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                       block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk,
                       block_k_dq=bk, block_q_dq=bq)
    out = flash_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), segment_ids=seg,
                          sm_scale=1.0 / math.sqrt(d), block_sizes=sizes)
    return out.swapaxes(1, 2)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                          impl: str = "xla", chunk: int = 1024, need_map: bool = False,
                          platform: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Attention of q [B, N, H, D] over k, v [B, L, H, D]; mask [B, L] bool (True = attend).

    Returns (out [B, N, H, D] in v's dtype, head-averaged probabilities [B, N, L] float32 when
    ``need_map`` else None). ``impl`` as in the module docs (resolved by :func:`resolve_impl`);
    ``chunk`` is the query block of ``chunked``.
    """
    impl = resolve_impl(impl, q.dtype, platform, need_map=need_map, map_size=q.shape[1] * k.shape[1])
    if impl == "flash" and k.shape[1] % FLASH_BLOCK:
        impl = "chunked"  # the Pallas TPU kernel tiles the keys in blocks of 128
    if impl == "xla":
        return _dense(q, k, v, mask, need_map)
    if impl == "chunked":
        return _chunked(q, k, v, mask, need_map, chunk)
    if impl == "blocked":
        return _blocked(q, k, v, mask, chunk), None
    if impl == "cudnn":
        return _cudnn(q, k, v, mask), None
    return _flash(q, k, v, mask), None
