"""Self-attention forward + backward time of each CPU-capable kernel, against torch's fused SDPA.

    python bench/attention.py --note "nothing else ran"                   # B32 N1024 H4 D16: vs_diffusers' shape
    python bench/attention.py --shape 2x64x2x8 --rounds 2 --out /tmp/a.md  # smoke test (tests/bench)

Each kernel of ``raphael_jax/models/attention_kernels.py`` that runs on CPU (``xla``, ``chunked`` and
``blocked`` with ``--chunk`` queries per block) computes ``grad(sum(attention(q, k, v)^2))`` for q, k, v
[B, N, H, D] float32, jitted; torch computes the same with ``scaled_dot_product_attention`` (its fused
CPU kernel) and with the explicit softmax, both limited to ``--threads`` threads. The gradients are
checked against ``xla`` (largest absolute difference reported) before timing. After one warm-up call
of each, ``--rounds`` rounds call every variant once (round-robin); medians are reported with the
peak-memory estimate XLA gives for each compiled step (temporaries).
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, cpu_model, log, write_lines  # noqa: E402

JAX_IMPLS = ("xla", "chunked", "blocked")


def jax_variants(q, k, v, chunk: int) -> dict:
    import jax
    import jax.numpy as jnp

    from raphael_jax.models.attention_kernels import dot_product_attention

    out = {}
    for impl in JAX_IMPLS:
        def grads(q, k, v, impl=impl):
            att = lambda q, k, v: dot_product_attention(q, k, v, impl=impl, chunk=chunk)[0]  # noqa: E731
            return jax.grad(lambda *a: jnp.sum(att(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

        compiled = jax.jit(grads).lower(q, k, v).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        out[f"jax {impl}" + (f" (chunk {chunk})" if impl != "xla" and chunk < q.shape[1] else "")] = (
            lambda c=compiled: [np.asarray(g) for g in jax.block_until_ready(c(q, k, v))], temp)
    return out


def torch_variants(qn, kn, vn, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)

    def run(fused: bool):
        q, k, v = (torch.tensor(a.transpose(0, 2, 1, 3), requires_grad=True) for a in (qn, kn, vn))  # [B, H, N, D]
        if fused:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        (o ** 2).sum().backward()
        return [t.grad.numpy().transpose(0, 2, 1, 3) for t in (q, k, v)]

    return {"torch sdpa (fused)": (lambda: run(True), None), "torch explicit softmax": (lambda: run(False), None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="32x1024x4x16", help="BxNxHxD")
    p.add_argument("--chunk", type=int, default=1024, help="queries per block of chunked / blocked "
                   "(model.attention_chunk; its default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses all cores)")
    p.add_argument("--no-torch", action="store_true", help="skip torch (not installed)")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "attention.md"))
    args = p.parse_args(argv)
    try:
        b, n, h, d = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        p.error(f"--shape must be BxNxHxD, got {args.shape!r}")
    import jax.numpy as jnp

    r = np.random.RandomState(0)
    qn, kn, vn = (r.randn(b, n, h, d).astype(np.float32) for _ in range(3))
    variants = jax_variants(*(jnp.asarray(a) for a in (qn, kn, vn)), args.chunk)
    if not args.no_torch:
        variants.update(torch_variants(qn, kn, vn, args.threads))
    ref = None
    diffs = {}
    for name, (fn, _) in variants.items():
        g = fn()
        ref = g if ref is None else ref
        diffs[name] = max(float(np.abs(a - b_).max()) for a, b_ in zip(g, ref, strict=True))
        log(f"{name}: warm-up done, max |grad - jax xla| {diffs[name]:.2e}")
    times = {name: [] for name in variants}
    for i in range(args.rounds):
        for name, (fn, _) in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        log(f"round {i + 1}/{args.rounds}")
    base = statistics.median(times[next(iter(variants))])
    lines = [f"# Attention forward + backward: B {b}, N {n}, H {h}, D {d}, float32",
             "", f"Machine: {cpu_model()}; {os.cpu_count()} cores; torch threads {args.threads}. "
             f"{args.note}", "",
             f"Command: `python bench/attention.py {shlex.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| kernel | median ms | vs jax xla | XLA temp MiB | max abs grad diff |", "|---|---|---|---|---|"]
    for name, (_, temp) in variants.items():
        med = statistics.median(times[name])
        tmp = "" if temp is None else f"{temp / 2**20:.0f}"
        lines.append(f"| {name} | {1000 * med:.0f} | {med / base:.2f}x | {tmp} | {diffs[name]:.1e} |")
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
