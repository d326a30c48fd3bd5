"""LoRA: low-rank adapters on the denoiser's weights, trained alone on a frozen base (paper App. 7.8).

An adapted kernel ``W`` becomes ``W + s * (alpha / rank) * A @ B`` with ``A`` [in, rank] (Gaussian,
std 1/sqrt(in)) and ``B`` [rank, out] (zeros: a fresh adapter changes nothing). The adapters live in
their own parameter tree, keyed by the dotted path of the kernel they adapt, and are applied as a weight
delta on the parameter tree (:func:`apply_lora`), so one rule covers every kernel layout of the model:

- dense kernels [in, out] (attention projections, router layers, text encoder);
- expert banks [E, in, out]: one adapter per expert, ``A`` [E, in, r] and ``B`` [E, r, out];
- convolutions [kh, kw, in, out]: ``A`` [kh, kw, in, r] (a kh x kw conv into the rank) and ``B`` [r, out]
  (a 1x1 conv out of it), the LoCon factorisation.

flax's ``nnx.LoRA`` / ``nnx.LoRALinear`` wrap one ``nnx.Linear``; they do not fit the stacked expert
weights (an einsum over an ``nnx.Param`` of shape [E, in, out]) nor the convolutions, and swapping modules
would change the model's graph and so its checkpoints. A delta on the parameters leaves the model, its
checkpoints and its sharding untouched: each adapter factor carries the logical axis names of the kernel
side it spans (``A`` the input names, ``B`` the output names, the rank axis replicated), so it is sharded
like the weight it adapts (raphael_jax/parallel/sharding.py).

Files: raphael_jax/convert/lora_file.py writes and reads them (safetensors, with the adapter config in
the header metadata).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Named groups of ``lora.targets``; any other entry is a regular expression ("re:...") over the dotted
# parameter paths (raphael_jax/models/unet.py, block.py, moe.py name them).
TARGET_GROUPS = {
    "attention": r"^unet\..*\.attn_(self|cross)\.(q|k|v|out)\.kernel$",
    "experts": r"^unet\..*\.(space|time)_moe\.experts\.w[12]$",
    "gates": r"^unet\..*\.(space|time)_moe\.gate\.fc[12]\.kernel$",
    "convs": r"^unet\..*\.conv[12]\.kernel$",                # the ResBlocks' 3x3 convolutions
    "projections": r"^unet\..*\.proj_(in|out)\.kernel$",     # the RAPHAEL blocks' in/out projections
    "text": r"^text\..*\.(q|k|v|out|fc1|fc2)\.kernel$",        # the small trainable text encoder
}


class LoraError(ValueError):
    """An adapter file or config that does not fit (one line naming the file or key)."""


def path_key(path) -> str:
    """Dotted name of a parameter-tree path: ``unet.down.3.attn_cross.q.kernel``."""
    parts = []
    for p in path:
        k = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        if str(k) in ("value", ".value"):
            continue
        parts.append(str(k))
    return ".".join(parts)


def target_patterns(targets: Sequence[str]) -> list[re.Pattern]:
    out = []
    for t in targets:
        if t in TARGET_GROUPS:
            out.append(re.compile(TARGET_GROUPS[t]))
        elif isinstance(t, str) and t.startswith("re:"):
            try:
                out.append(re.compile(t[3:]))
            except re.error as e:
                raise LoraError(f"lora.targets: bad regular expression {t!r} ({e})") from None
        else:
            raise LoraError(f"lora.targets: unknown target {t!r}; use one of {sorted(TARGET_GROUPS)} or 're:<regex>'")
    return out


def _layout(key: str, shape: tuple[int, ...]) -> int:
    """Leading batch dims of a kernel (1 for an expert bank [E, in, out], else 0)."""
    if len(shape) == 3 and ".experts." in f".{key}":
        return 1
    if len(shape) in (2, 4):
        return 0
    raise LoraError(f"lora: cannot adapt {key} of shape {shape} (dense [in, out], experts [E, in, out] or "
                    "conv [kh, kw, in, out] only)")


def _names(v) -> tuple | None:
    if isinstance(v, nnx.Variable):
        meta = v.get_metadata()
        return meta.get("out_sharding") or meta.get("sharding_names")
    return None


def _leaves(params) -> dict[str, object]:
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {path_key(p): v for p, v in flat}


def matched_keys(params, targets: Sequence[str]) -> list[str]:
    """The dotted paths of the kernels ``targets`` select, sorted; LoraError when a target selects none."""
    pats = target_patterns(targets)
    keys = sorted(_leaves(params))
    out = []
    for t, pat in zip(targets, pats):
        hits = [k for k in keys if pat.search(k)]
        if not hits:
            raise LoraError(f"lora.targets: {t!r} selects no parameter of this model")
        out.extend(hits)
    return sorted(set(out))


def init_adapters(params, targets: Sequence[str], rank: int, key: jax.Array) -> dict:
    """``{kernel path: {"a": Param, "b": Param}}`` for every targeted kernel of ``params`` (an ``nnx.State``
    of Params or ShapeDtypeStructs); ``B`` starts at zero so the adapted model equals the base."""
    if rank < 1:
        raise LoraError(f"lora.rank must be >= 1, got {rank}")
    leaves = _leaves(params)
    out = {}
    for i, k in enumerate(matched_keys(params, targets)):
        v = leaves[k]
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        shape, dtype = tuple(value.shape), jnp.float32
        lead = _layout(k, shape)
        names = _names(v) or (None,) * len(shape)
        fan_in = math.prod(shape[lead:-1])
        a = jax.random.normal(jax.random.fold_in(key, i), shape[:-1] + (rank,), dtype) / math.sqrt(fan_in)
        b = jnp.zeros(shape[:lead] + (rank, shape[-1]), dtype)
        out[k] = {"a": nnx.Param(a, out_sharding=tuple(names[:-1]) + (None,)),
                  "b": nnx.Param(b, out_sharding=tuple(names[:lead]) + (None, names[-1]))}
    return out


def _value(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x


def delta(a, b, lead: int) -> jax.Array:
    """``A @ B`` contracted over the rank: [.., in.., r] x [.., r, out] -> the kernel's shape."""
    a, b = _value(a), _value(b)
    if lead:
        return jnp.einsum("e...r,ero->e...o", a, b)
    return jnp.tensordot(a, b, axes=1)


def apply_lora(params, adapters: Sequence[tuple[Mapping, float]]):
    """``params`` with every adapted kernel replaced by ``W + sum_i scale_i * A_i @ B_i`` (a new tree;
    ``params`` is not changed). ``adapters``: (adapter tree, scale) pairs, scale already including
    alpha / rank (:func:`adapter_scale`)."""
    by_key: dict[str, list] = {}
    for tree, scale in adapters:
        for k, ab in tree.items():
            by_key.setdefault(k, []).append((ab, scale))
    seen = set()

    def one(path, v):
        k = path_key(path)
        if k not in by_key:
            return v
        seen.add(k)
        w = _value(v)
        lead = _layout(k, tuple(w.shape))
        for ab, scale in by_key[k]:
            w = w + (scale * delta(ab["a"], ab["b"], lead)).astype(w.dtype)
        return v.replace(w) if isinstance(v, nnx.Variable) else w

    out = jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    missing = sorted(set(by_key) - seen)
    if missing:
        raise LoraError(f"lora: the adapters name {len(missing)} kernel(s) this model does not have "
                        f"(e.g. {missing[0]}): they were trained on another model")
    return out


def adapter_scale(alpha: float, rank: int, scale: float = 1.0) -> float:
    """The factor an adapter's ``A @ B`` is multiplied by: ``scale * alpha / rank`` (alpha 0 means rank)."""
    return float(scale) * (float(alpha) if alpha else float(rank)) / float(rank)


def merge_lora(params, adapters: Sequence[tuple[Mapping, float]]):
    """A merged copy of the base weights (jitted :func:`apply_lora`; the base arrays are not donated)."""
    return jax.jit(apply_lora)(params, [(jax.tree.map(_value, t, is_leaf=lambda x: isinstance(x, nnx.Variable)), s)
                                        for t, s in adapters])


# ----------------------------------------------------------------------------------- files

def adapter_bytes(adapters: Mapping) -> int:
    return int(sum(np.asarray(_value(x)).nbytes for ab in adapters.values() for x in ab.values()))


def check_fits(adapters: Mapping, params, source: str) -> None:
    """LoraError unless each adapter's ``A @ B`` has the shape of the kernel it adapts in ``params``."""
    leaves = _leaves(params)
    for k, ab in adapters.items():
        if k not in leaves:
            raise LoraError(f"{source}: adapts {k}, which this model does not have (trained on another model)")
        shape = tuple(_value(leaves[k]).shape)
        lead = _layout(k, shape)
        a, b = np.shape(_value(ab["a"])), np.shape(_value(ab["b"]))
        want_a, want_b = shape[:-1] + (a[-1],), shape[:lead] + (a[-1], shape[-1])
        if tuple(a) != want_a or tuple(b) != want_b:
            raise LoraError(f"{source}: {k} is {shape} in this model but the adapter is {tuple(a)} x {tuple(b)} "
                            "(trained on another model)")


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` of ``raphael-sample --lora``: (file, scale); scale 1 when absent."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass  # a ':' inside the path
    return arg, 1.0
