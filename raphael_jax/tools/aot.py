"""Ahead-of-time compile of the train step for a mesh of N virtual devices, without allocating the model.

    raphael-aot --config configs/raphael_3b.py --devices 64 --mesh fsdp=-1,expert=2 --batch 2048
    raphael-aot --config configs/tiny.py --devices 8 --mesh data=2,expert=4 --batch 32

The state is only ``eval_shape``-d; the step is lowered with the state's shardings, the batch
sharded over the batch axes and the state donated, then compiled by XLA:CPU for ``--devices``
virtual CPU devices (``jax_num_cpu_devices``; the command must run before anything else starts
jax). It prints, per device: parameter / EMA / optimizer bytes (from the shardings, exact), the
compiled program's argument, output, alias and temporary bytes (``memory_analysis``: the
temporaries are the activations and workspace), FLOPs and bytes accessed per step
(``cost_analysis``), and the collectives in the compiled HLO (count, result bytes, group size).
``--json`` writes the same numbers. docs/SCALE_OUT.md has the table for the 3B model.

Caveat: the numbers come from XLA:CPU's SPMD partitioner and buffer assignment. The partitioning
(and so the parameter/optimizer bytes and the collectives) is the one TPU/GPU would get; the
temporary bytes are an estimate (the TPU and GPU compilers fuse and schedule differently).
"""
from __future__ import annotations

import math
import re
import time

# HBM per chip in GiB: TPU spec sheets (GiB); NVIDIA as nvidia-smi reports it (80GB H100 = 81559 MiB)
HBM_GIB = {"TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32,
           "A100 40GB": 40, "A100 80GB": 80, "H100 80GB": 79.6, "H200": 140.4, "B200": 179}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def parse_kv(items: str) -> dict[str, int]:
    """``"fsdp=-1,expert=2"`` -> ``{"fsdp": -1, "expert": 2}`` (mesh axis sizes)."""
    out = {}
    for part in [p for p in (items or "").split(",") if p.strip()]:
        k, _, v = part.partition("=")
        out[k.strip()] = int(v)
    return out


def _shape_bytes(type_str: str) -> int:
    total = 0
    for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_str):
        if dt in _DTYPE_BYTES:
            n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            total += n * _DTYPE_BYTES[dt]
    return total


def _group_size(line: str) -> int | None:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"source_target_pairs=\{([^}]*)\}", line)
    if m:
        return None
    return None


def collectives(hlo_text: str) -> dict[str, dict]:
    """{op: {count, bytes, group_sizes}} over the compiled HLO (async ``-start`` ops counted once)."""
    out: dict[str, dict] = {}
    for line in hlo_text.splitlines():
        line = line.strip()
        m = re.match(r"(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z\-]+)\(", line)
        if not m:
            continue
        op = m.group(2)
        base = op[:-6] if op.endswith("-start") else op
        if base not in COLLECTIVES or op.endswith("-done"):
            continue
        rec = out.setdefault(base, {"count": 0, "bytes": 0, "group_sizes": set()})
        rec["count"] += 1
        rec["bytes"] += _shape_bytes(m.group(1))
        g = _group_size(line)
        if g:
            rec["group_sizes"].add(g)
    for rec in out.values():
        rec["group_sizes"] = sorted(rec["group_sizes"])
    return out


def abstract_batch(config, global_batch: int, plan):
    """ShapeDtypeStructs of one global training batch for ``config`` (what the data pipeline yields)."""
    import jax
    import jax.numpy as jnp

    b, s = global_batch, config.data.image_size
    m = config.model
    sd = jax.ShapeDtypeStruct
    shard = plan.batch_sharding(b)
    L = config.text.max_len
    batch = {"image": sd((b, s, s, m.in_channels), jnp.float32, sharding=shard),
             "mask": sd((b, L), jnp.bool_, sharding=shard)}
    if config.text.kind == "external":
        batch["text_states"] = sd((b, L, m.context_dim), jnp.float32, sharding=shard)
        if config.train.caption_dropout > 0:
            batch["null_text_states"] = sd((b, L, m.context_dim), jnp.float32, sharding=shard)
            batch["null_mask"] = sd((b, L), jnp.bool_, sharding=shard)
    else:
        batch["tokens"] = sd((b, L), jnp.int32, sharding=shard)
    if m.edge.enabled:
        batch["edges"] = sd((b, s, s), jnp.float32, sharding=shard)
    return batch


def frozen_encoder_bytes(plan, text_width: int) -> dict[str, tuple[int, int]]:
    """{name: (total bytes, bytes per device)} of the frozen CLIP text tower and KL-f8 VAE (bf16), sharded
    by ``plan``."""
    import jax.numpy as jnp
    from flax import nnx

    from raphael_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from raphael_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
    from raphael_jax.parallel.sharding import per_device_bytes, tree_shardings

    # OpenCLIP ViT-g/14 text tower: width 1024, 24 layers, 16 heads, MLP 4096 (text_width selects it)
    clip = CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=24,
                          num_attention_heads=max(1, text_width // 64), hidden_act="gelu")
    out = {}
    for name, make in ((f"CLIP text (width {text_width}, 24 layers)",
                        lambda: CLIPTextTransformer(clip, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
                       ("KL-f8 VAE", lambda: AutoencoderKL(AutoencoderKLConfig(), param_dtype=jnp.bfloat16,
                                                          rngs=nnx.Rngs(0)))):
        state = nnx.state(nnx.eval_shape(make), nnx.Param)
        total = sum(math.prod(x.shape) * x.dtype.itemsize for x in __import__("jax").tree.leaves(state))
        out[name] = (total, per_device_bytes(state, tree_shardings(state, plan)))
    return out


def _gib(x) -> str:
    return f"{x / 2**30:8.3f} GiB"


def run(config, devices: int, mesh_spec: dict, global_batch: int, hlo_out: str | None = None,
        encoders: bool = False, verbose: bool = True, compiler_options: dict | None = None) -> dict:
    """Lower and compile ``config``'s train step for ``devices`` virtual devices; return the report dict."""
    import jax

    from raphael_jax.diffusion.schedule import NoiseSchedule
    from raphael_jax.parallel.mesh import describe, make_mesh, resolve_mesh_shape
    from raphael_jax.parallel.rules import ShardingPlan
    from raphael_jax.parallel.sharding import per_device_bytes, with_shardings
    from raphael_jax.train.state import abstract_train_state, make_optimizer
    from raphael_jax.train.step import jit_train_step, make_train_step

    if len(jax.devices()) < devices:
        raise RuntimeError(f"need {devices} devices, jax has {len(jax.devices())} (run raphael-aot in a "
                           "fresh process, or set jax_num_cpu_devices before jax starts)")
    shape = resolve_mesh_shape({**{"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, **mesh_spec}, devices)
    if math.prod(shape.values()) != devices:
        raise ValueError(f"mesh {shape} does not use all {devices} devices")
    mesh = make_mesh(shape, jax.devices()[:devices])
    plan = ShardingPlan.from_config(config, mesh)
    tx = make_optimizer(config)
    sched = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.num_timesteps)
    t0 = time.time()
    graphdef, abstract, shardings, _ = abstract_train_state(config, tx, plan)
    state_in = with_shardings(abstract, shardings)
    batch = abstract_batch(config, global_batch, plan)
    key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    rng = jax.ShapeDtypeStruct((), key_dtype, sharding=plan.replicated())
    step = jit_train_step(make_train_step(graphdef, config, tx, sched), plan, shardings, global_batch)
    lowered = step.lower(state_in, batch, rng)
    t_lower = time.time() - t0
    t1 = time.time()
    compiled = lowered.compile(compiler_options=compiler_options or None)
    t_compile = time.time() - t1
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = cost or {}
    hlo = compiled.as_text()
    if hlo_out:
        with open(hlo_out, "w") as f:
            f.write(hlo)
    coll = collectives(hlo)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
    rep = {
        "config_params": n_params, "devices": devices, "mesh": shape, "global_batch": global_batch,
        "per_device_batch": global_batch // plan.axis_size(plan.batch_axes()),
        "dtype": config.model.dtype, "remat": config.model.remat, "attention": config.model.attention,
        "attention_chunk": config.model.attention_chunk,
        "image_size": config.data.image_size,
        "params_bytes": per_device_bytes(abstract["params"], shardings["params"]),
        "ema_bytes": per_device_bytes(abstract["ema_params"], shardings["ema_params"]),
        "opt_bytes": per_device_bytes(abstract["opt_state"], shardings["opt_state"]),
        "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
        "flops_per_device": float(cost.get("flops", float("nan"))),
        "bytes_accessed_per_device": float(cost.get("bytes accessed", float("nan"))),
        "collectives": coll, "lower_s": round(t_lower, 1), "compile_s": round(t_compile, 1),
        "sharding_fallbacks": [list(map(str, f)) for f in plan.fallbacks if f[0].startswith("params/")],
    }
    peak = rep["argument_bytes"] + rep["output_bytes"] - rep["alias_bytes"] + rep["temp_bytes"]
    rep["peak_bytes"] = peak
    rep["fits"] = {k: peak < 0.9 * v * 2**30 for k, v in HBM_GIB.items()}
    if encoders and config.text.kind == "external":
        enc = frozen_encoder_bytes(plan, config.model.context_dim)
        rep["frozen_encoders"] = {k: {"total_bytes": a, "per_device_bytes": b} for k, (a, b) in enc.items()}
    if verbose:
        s = config.data.image_size
        size = f"{n_params / 1e9:.3f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
        print(f"config: {size} parameters, {config.model.dtype} activations, remat "
              f"{config.model.remat}, attention {config.model.attention} (chunk {config.model.attention_chunk}), "
              f"{s}x{s}x{config.model.in_channels} inputs, global batch {global_batch} "
              f"({rep['per_device_batch']} per device)")
        print(f"mesh: {describe(mesh)}; lowered in {t_lower:.1f} s, compiled in {t_compile:.1f} s")
        print("per-device memory:")
        print(f"  parameters        {_gib(rep['params_bytes'])}")
        print(f"  EMA parameters    {_gib(rep['ema_bytes'])}")
        print(f"  optimizer state   {_gib(rep['opt_bytes'])}")
        print(f"  arguments (state + batch) {_gib(rep['argument_bytes'])}, outputs "
              f"{_gib(rep['output_bytes'])}, aliased (donated) {_gib(rep['alias_bytes'])}")
        print(f"  temporaries (activations, workspace) {_gib(rep['temp_bytes'])}")
        print(f"  peak estimate     {_gib(peak)}")
        print(f"FLOPs per step: {rep['flops_per_device']:.4g} per device, "
              f"{rep['flops_per_device'] * devices:.4g} total; bytes accessed "
              f"{rep['bytes_accessed_per_device']:.4g} per device")
        print("collectives in the compiled step (count, result bytes, replica group sizes):")
        for op in COLLECTIVES:
            if op in coll:
                c = coll[op]
                print(f"  {op:20s} {c['count']:5d}  {_gib(c['bytes'])}  groups {c['group_sizes']}")
        fits = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in rep["fits"].items())
        print(f"fits (peak < 90% of HBM): {fits}")
        if rep["sharding_fallbacks"]:
            print(f"{len(rep['sharding_fallbacks'])} parameter dims stay replicated on mesh axes they do not "
                  f"divide, e.g. {rep['sharding_fallbacks'][:3]}")
        for k, v in rep.get("frozen_encoders", {}).items():
            print(f"frozen {k}: {_gib(v['total_bytes'])} in all, {_gib(v['per_device_bytes'])} per device")
    return rep


def parse_compiler_options(items) -> dict:
    """``["KEY=VALUE", ...]`` -> XLA compile options; ``true`` / ``false`` and integers are converted."""
    opts = {}
    for item in items:
        k, _, v = item.partition("=")
        opts[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.lstrip("-").isdigit() else v)
    return opts


def use_virtual_cpu_devices(devices: int) -> None:
    """``devices`` virtual CPU devices for jax (``jax_platforms=cpu``, ``jax_num_cpu_devices``), unless a
    jax backend is already running (then the devices jax has are used)."""
    import jax

    try:
        from jax._src import xla_bridge
        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a private API: absent in some jax release, assume not started
        started = False
    if not started:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", devices)
