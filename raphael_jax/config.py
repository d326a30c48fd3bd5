"""Configs: the base every run starts from, loading ``configs/<name>.py[:variants]``, overrides, validation.

- :func:`base_config` holds every field the code reads, with the paper's choices where it gives
  them. Config files (``configs/*.py``) edit a copy of it; a run restored from its checkpoint
  (:func:`from_saved`) is merged onto it, so an old run missing a recent key gets that key's
  default and the code never needs ``config.get(key, default)``. It lives in the package so a run
  loads where the ``configs/`` folder is absent (pip install, Colab).
- :func:`load_config` ``("configs/tiny.py:no_edge,experts=2", overrides)`` runs the file's
  ``get_config(arg)``, checks that the file applied the variants it was given (the ablation
  switches live beside the configs, in ``configs/common.py``; every ``get_config`` ends with its
  ``with_variants(config, arg)``, which records them in ``config.variant``), applies
  ``key.sub=value`` overrides, then :func:`validate`.
- :func:`validate` checks every key against how the code uses it, before any model is built, and
  raises :class:`ConfigError` with one line naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import math
import numbers
import os
import sys
import warnings

import ml_collections

# The key ``with_variants`` (configs/common.py) records the applied variants under; load_config
# compares it with the requested variants and removes it (configs stay equal iff they act equal).
VARIANT_KEY = "variant"

# Allowed values of the enum-like keys whose allowed sets live in modules too heavy to import
# here (loading a config builds nothing); tests/test_config.py pins them to those modules.
MODEL_DTYPES = ("float32", "bfloat16")                  # raphael_jax.models.unet.DTYPES
ATTENTION_IMPLS = ("auto", "xla", "chunked", "blocked", "cudnn", "flash")  # raphael_jax/models/attention_kernels.py
REMAT_POLICIES = ("none", "full", "dots")  # raphael_jax/models/unet.py:REMAT_POLICIES
GATE_GRAD_MODES = ("prob", "straight_through", "none")  # raphael_jax.models.moe.GATE_GRAD_MODES
SPACE_AVERAGES = ("real", "all")                        # raphael_jax.models.moe.SpaceMoE
TIME_MOE_IMPLS = ("gather", "ragged")                   # raphael_jax.models.moe.TimeMoE
EDGE_TOKENS = ("eot", "mean")                           # raphael_jax.models.edge.select_token_map
TEXT_KINDS = ("small", "external")                      # raphael_jax.models.raphael.RaphaelModel
DATA_KINDS = ("shapes", "latents", "subject")           # raphael_jax.train.loop.make_data_iterator
LORA_TARGETS = ("attention", "experts", "gates", "convs", "projections", "text")  # raphael_jax.models.lora
LR_SCHEDULES = ("constant", "cosine")                   # raphael_jax.train.state.LR_SCHEDULES
LATENT_MODES = ("mean", "sample")                       # raphael_jax.tools.precompute.Encoder
TEXT_LAYERS = ("last", "penultimate", "penultimate_ln")  # raphael_jax.models.clip_text.TEXT_LAYERS


class ConfigError(ValueError):
    """A config value the code cannot use; the message is one line naming the key."""


class ConfigWarning(UserWarning):
    """A saved run's config held keys :func:`base_config` does not know (they were dropped)."""


def base_config() -> ml_collections.ConfigDict:
    """Every field the code reads, with the paper's choices where it gives them (unlocked copy).

    ``configs/*.py`` start from it (``configs/base.py`` is it plus the variants); saved runs are
    merged onto it (:func:`from_saved`).
    """
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- denoiser -------------------------------------------------------------------------
    m = c.model = ml_collections.ConfigDict()
    m.in_channels = 3            # 3 for pixels, 4 for KL-f8 latents
    m.patch_size = 1             # space-to-depth stem (pixel models)
    m.channels = (32, 64, 64)
    m.num_res_blocks = 1
    m.block_levels = (1, 1, 1)   # a RAPHAEL block after each ResNet block of these levels
    m.self_attention_levels = (0, 1, 1)
    m.mid_block = True
    m.head_dim = 32
    m.norm_groups = 8
    m.context_dim = 64           # d_y: text token width
    m.text_temb = False          # add the pooled text to the ResBlocks' timestep embedding (Imagen/SDXL style)
    m.pos_embed = False          # 2D sin-cos position embedding on the cross-attention queries
    m.ffn_mult = 4.0             # plain FFN replacing a switched-off MoE
    m.dense_ffn_mult = 0.0       # > 0: dense baseline (both MoEs -> one FFN of this width)
    m.dtype = "float32"          # compute dtype: float32 | bfloat16
    m.remat = "none"             # RAPHAEL-block rematerialisation: none | full (nothing saved) | dots (matmuls saved)
    m.attention = "auto"         # auto|xla|chunked|blocked|cudnn|flash (raphael_jax/models/attention_kernels.py)
    m.attention_chunk = 1024     # queries per block of the chunked kernel (and cross-attention beside fused ones)
    s = m.space_moe = ml_collections.ConfigDict()
    s.enabled = True
    s.num_experts = 6            # paper: 6
    s.hidden_mult = 4.0
    s.gate_hidden = 64
    s.alpha = 0.2                # paper: region threshold alpha = 0.2
    s.router_noise = 1.0         # std of the gate-logit noise, training only
    s.gate_grad = "prob"         # prob | straight_through | none
    s.average = "real"           # real: mean over real tokens; all: the paper's 1/n_y
    t = m.time_moe = ml_collections.ConfigDict()
    t.enabled = True
    t.num_experts = 4            # paper: 4
    t.hidden_mult = 4.0
    t.gate_hidden = 64
    t.router_noise = 1.0
    t.gate_grad = "prob"
    t.impl = "gather"            # gather | ragged
    e = m.edge = ml_collections.ConfigDict()
    e.enabled = True
    e.channels = 32
    e.num_layers = 5             # paper: 5 conv layers
    e.token = "eot"              # eot (pooled token) | mean
    e.t_c = 500                  # paper: edge loss only for t < T_c
    e.focal_alpha = 0.5
    e.focal_gamma = 2.0
    e.weight = 1.0
    e.source = "canny"           # raphael_jax.data.edges.EDGE_SOURCES: canny | outline

    # --- text encoder ---------------------------------------------------------------------
    tx = c.text = ml_collections.ConfigDict()
    tx.kind = "small"            # small (trainable, shapes world) | external (CLIP / precomputed)
    tx.vocab_size = 64
    tx.width = 64                # = model.context_dim
    tx.num_layers = 2
    tx.num_heads = 4
    tx.max_len = 32
    tx.embed_init_std = 1.0      # token/position embedding init std (T5's 1.0; GPT/CLIP use 0.02)

    # --- diffusion ------------------------------------------------------------------------
    d = c.diffusion = ml_collections.ConfigDict()
    d.num_timesteps = 1000
    d.schedule = "scaled_linear"  # scaled_linear | linear | cosine
    d.prediction = "epsilon"      # epsilon (paper) | v

    # --- data -----------------------------------------------------------------------------
    da = c.data = ml_collections.ConfigDict()
    da.kind = "shapes"            # shapes (generated world) | latents (raphael-precompute output)
    da.image_size = 32
    da.object_weights = (1.0, 0.0, 0.0)   # relative frequency of 1-, 2-, 3-object scenes
    da.seed = 0
    # real image-text data (configs/small_latent.py, docs/DATA_REAL.md); "" = not set
    da.latents_dir = ""           # raphael-precompute output, read by the trainer (data.kind="latents")
    da.tfds_dir = ""              # image_text build read by raphael-precompute
    da.vae_dir = ""               # VAE weights for raphael-precompute
    da.clip_dir = ""              # CLIP text weights for raphael-precompute
    da.tokenizer_dir = ""         # "" = clip_dir
    da.latent_mode = "mean"       # mean | sample (of the VAE posterior)
    da.text_layer = "last"        # last | penultimate | penultimate_ln | int index
    da.caption_places = True      # captions name each object's place (False: ControlNet runs, control gives layout)
    # data.kind="subject": a few fixed images of one kind in a narrow set of contexts, the "new subject"
    # of fine-tuning (raphael_jax/data/shapes/subject.py, docs/FINETUNE.md)
    sj = da.subject = ml_collections.ConfigDict()
    sj.kind = "ring"              # a kind of raphael_jax.data.shapes.world.ALL_KINDS
    sj.colours = ("red", "blue")
    sj.sizes = ("big",)
    sj.places = ("center", "left")
    sj.num_images = 32

    # --- training -------------------------------------------------------------------------
    tr = c.train = ml_collections.ConfigDict()
    tr.batch_size = 32
    tr.num_steps = 1000
    tr.learning_rate = 1e-4       # paper (Table 2): 1e-4, AdamW (0.9, 0.999), weight decay 0
    tr.warmup_steps = 200
    tr.lr_schedule = "constant"   # after warm-up: constant | cosine (decays to lr_final_fraction * lr at num_steps)
    tr.lr_final_fraction = 0.0
    tr.weight_decay = 0.0
    tr.b1 = 0.9
    tr.b2 = 0.999
    tr.grad_clip = 1.0            # global-norm clipping; 0 = none
    tr.ema_decay = 0.999
    tr.caption_dropout = 0.1      # empty prompt for classifier-free guidance
    tr.log_every = 50
    tr.checkpoint_every = 500
    tr.sample_every = 1000        # 0 = no sample previews
    tr.max_to_keep = 2
    tr.init_from = ""             # workdir whose latest params/EMA initialize a new run (curricula)
    tr.max_nonfinite_steps = 20   # stop after this many steps in a row with a non-finite loss or gradient

    # --- LoRA fine-tuning (raphael_jax/models/lora.py, docs/FINETUNE.md) ---------------------
    lo = c.lora = ml_collections.ConfigDict()
    lo.rank = 0                   # 0: off (every weight trains); >= 1: only adapters on train.init_from's EMA weights
    lo.alpha = 0.0                # the adapters' A @ B is scaled by alpha / rank; 0 means alpha = rank (scale 1)
    lo.targets = ("attention", "experts")  # groups of raphael_jax.models.lora.TARGET_GROUPS or "re:<regex>"

    # --- ControlNet (raphael_jax/models/controlnet.py, docs/FINETUNE.md) -------------------------
    co = c.control = ml_collections.ConfigDict()
    co.enabled = False            # train a ControlNet on train.init_from's frozen model, the batch's edge maps
                                  # (model.edge.source) as the control image
    co.scale = 1.0                # conditioning scale when sampling (raphael-sample --control-scale)

    # --- scale-out (raphael_jax.parallel, docs/SCALE_OUT.md) ------------------------------
    p = c.parallel = ml_collections.ConfigDict()
    # Mesh over the physical axes, outermost first (data crosses hosts / DCN, tensor is innermost).
    # -1 fills the devices left over (at most one axis); with parallel.num_devices=0 a -1 axis
    # stops at the largest size that still divides the global batch (single-process runs only).
    p.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
    p.num_devices = 0             # 0: every device (multi-process runs always use all of them)
    # Logical axis -> mesh axes. Parameters: embed/context/conv_in are FSDP-sharded over
    # fsdp (and expert, which carries data in the dense layers); mlp/heads/gate/conv_out/vocab
    # over tensor; the expert dim of the expert banks over expert. Activations: batch over
    # every data-like axis. A mesh axis is used once per array (the first dim that names it
    # wins) and is dropped from a dim it does not divide (the dim then stays replicated on it).
    p.rules = ml_collections.ConfigDict({
        "batch": ("data", "fsdp", "expert"),
        "embed": ("fsdp", "expert"),
        "context": ("fsdp", "expert"),
        "conv_in": ("fsdp", "expert"),
        "mlp": ("tensor",),
        "heads": ("tensor",),
        "kv": (),
        "gate": ("tensor",),
        "conv_out": ("tensor",),
        "vocab": ("tensor",),
        "expert": ("expert",),
        "norm": (),
    })
    # Time-MoE expert parallelism: per (device, expert) capacity = ceil(factor * local batch / K)
    # samples; a sample over capacity skips the time-MoE (residual only). 0 = never drop
    # (capacity = local batch: exact, costs K x the buffer and expert FLOPs).
    p.time_capacity_factor = 2.0

    # --- sampling / evaluation ------------------------------------------------------------
    sa = c.sample = ml_collections.ConfigDict()
    sa.num_steps = 50
    sa.guidance = 3.0
    sa.eta = 0.0
    sa.timestep_spacing = "trailing"  # first step at t = T-1 (Lin et al. 2024); "leading" = diffusers' default
    sa.use_clipped_model_output = True  # eps re-derived from the clipped x0 (raphael_jax.sampling.ddim_options)
    sa.guidance_rescale = 0.0           # Lin et al. 2024 CFG rescale phi (diffusers' guidance_rescale)
    sa.clip_x0 = -1.0                   # |x0| bound while sampling: 0 = no clipping, -1 = auto (1 for pixel
                                        # runs, none for latent runs: scaled latents are not in [-1, 1])
    sa.vae_tile = 128                   # latent runs: decode in tiles of this many latent pixels when a side
                                        # is larger (raphael_jax.models.vae_tiling); 0 = never tile
    ev = c.eval = ml_collections.ConfigDict()
    ev.num_prompts = 200
    ev.seed = 1234
    ev.batch_size = 100
    return c


# --- loading ------------------------------------------------------------------------------

def split_variants(arg: str | None) -> list[str]:
    """``"dense, no_edge"`` -> ``["dense", "no_edge"]`` (the comma-separated variant argument)."""
    return [p.strip() for p in (arg or "").split(",") if p.strip()]


def _exec_file(path: str, module_name: str):
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def config_module(this_file: str, name: str):
    """The module ``<dir of this_file>/<name>.py``, loaded once per path (config files are loaded by
    path, not as a package: ``common = config_module(__file__, "common")`` in ``configs/*.py``)."""
    path = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config helper module not found: {path}")
    module_name = f"_raphael_config_{name}_{hashlib.sha1(path.encode()).hexdigest()[:12]}"
    module = sys.modules.get(module_name)
    if module is None:
        mod_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[module_name] = module
        try:
            mod_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return module


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = (), *, validator=None) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py`` or ``path/to/config.py:variants`` (``get_config(variants)``), then
    apply ``key.sub=value`` overrides (values parsed as Python literals, else kept as strings) and
    :func:`validate` (or ``validator``: another trainer's config, e.g. the upscaler's). Returns a locked
    ConfigDict."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    module = _exec_file(path, f"_raphael_config_{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]}")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg=None)")
    config = module.get_config(arg) if arg else module.get_config()
    config.unlock()
    want = ",".join(split_variants(arg))
    got = config[VARIANT_KEY] if VARIANT_KEY in config else None
    if got is None and want:
        raise ConfigError(f"{path} ignores its variant argument {want!r}: its get_config(arg) must end with "
                          "with_variants(config, arg) of configs/common.py")
    if got is not None:
        if got != want:
            raise ConfigError(f"{path}: get_config({want!r}) applied the variants {got!r}; it must end with "
                              "with_variants(config, arg) of configs/common.py, applied once")
        del config[VARIANT_KEY]
    apply_overrides(config, overrides)
    (validator or validate)(config)
    config.lock()
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    """Apply ``key.sub=value`` items: the value is a Python literal, else the raw string (a string
    field always takes the raw text, so ``data.text_layer=-2`` stays ``"-2"``)."""
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"unknown config key {key!r} (no {p!r})")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"unknown config key {key!r}")
        old = node[parts[-1]]
        if isinstance(old, str) and not isinstance(value, str):
            value = raw
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[parts[-1]] = value
        except TypeError:
            raise ConfigError(f"override {key}={value!r}: {key} takes a {type(old).__name__} "
                              f"(now {old!r})") from None


def sibling_config(this_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``<dir of this_file>/<name>.py``, unlocked (lets config files build on
    one another)."""
    path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
    return load_config(f"{path}:{arg}" if arg else path).unlock()


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's config as saved in its checkpoint (JSON: lists for tuples) merged onto :func:`base_config`.

    Keys the run lacks (added to the code after it was trained) take the current defaults. Keys
    :func:`base_config` does not know (removed from the code, or added by hand) are dropped with one
    :class:`ConfigWarning` naming them: nothing reads them. The result is validated.
    """

    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return tuple(fix(x) for x in v)
        return v

    merged = fix(json.loads(base_config().to_json()))  # (to_dict would sort the keys)
    dropped: list[str] = []

    def merge(into: dict, src: dict, prefix: str) -> None:
        for k, v in src.items():
            key = prefix + k
            if k == VARIANT_KEY and not prefix:
                continue
            if k not in into:
                dropped.append(key)
            elif isinstance(into[k], dict) != isinstance(v, dict):
                raise ConfigError(f"saved config {key}={v!r}: base_config() has "
                                  f"{'a group of keys' if isinstance(into[k], dict) else 'a single value'} there")
            elif isinstance(v, dict):
                merge(into[k], v, key + ".")
            else:
                into[k] = v

    if hasattr(saved, "to_dict"):  # a ConfigDict
        saved = saved.to_dict()
    merge(merged, fix(dict(saved)), "")
    if dropped:
        warnings.warn(f"the run's config has keys raphael_jax.config.base_config() does not know, dropped: "
                      f"{', '.join(dropped)}", ConfigWarning, stacklevel=2)
    config = ml_collections.ConfigDict(merged)
    validate(config)
    return config


# --- validation ---------------------------------------------------------------------------

def _get(config, key: str):
    node = config
    for p in key.split("."):
        if p not in node:
            raise ConfigError(f"{key}: missing (every config has the keys of raphael_jax.config.base_config())")
        node = node[p]
    return node


def _fail(key: str, value, allowed: str):
    raise ConfigError(f"{key}={value!r}: {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(c, key: str, lo: int | None = None):
    v = _get(c, key)
    if not _is_int(v) or (lo is not None and v < lo):
        _fail(key, v, "must be an integer" + ("" if lo is None else f" >= {lo}"))
    return v


def _num(c, key: str, lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False):
    v = _get(c, key)
    bad = not _is_num(v)
    if not bad and lo is not None:
        bad = v <= lo if lo_open else v < lo
    if not bad and hi is not None:
        bad = v >= hi if hi_open else v > hi
    if bad:
        if lo is not None and hi is not None:
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            rng = f"{'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            rng = f"{'<' if hi_open else '<='} {hi:g}"
        else:
            rng = "finite"
        _fail(key, v, f"must be a number {rng}")
    return v


def _choice(c, key: str, allowed):
    v = _get(c, key)
    if not isinstance(v, str) or v not in allowed:
        _fail(key, v, f"must be one of {', '.join(map(repr, allowed))}")
    return v


def _ints(c, key: str, lo: int):
    v = _get(c, key)
    if not isinstance(v, (tuple, list)) or not v or not all(_is_int(x) and x >= lo for x in v):
        _fail(key, v, f"must be a non-empty tuple of integers >= {lo}")
    return tuple(v)


def validate(config) -> None:
    """Check every key the code reads against how it uses it; raise :class:`ConfigError` (one line
    naming the key, the bad value and what is allowed) at the first bad one."""
    # lazily: cheap modules (numpy / jax already imported by the package) holding the allowed sets
    from raphael_jax.data.edges import EDGE_SOURCES
    from raphael_jax.diffusion import schedule as sched_mod
    from raphael_jax.diffusion.ddim import TIMESTEP_SPACINGS
    from raphael_jax.parallel.mesh import MESH_AXES

    c = config
    _int(c, "seed")

    # --- model ----------------------------------------------------------------------------
    _int(c, "model.in_channels", 1)
    patch = _int(c, "model.patch_size", 1)
    channels = _ints(c, "model.channels", 1)
    _int(c, "model.num_res_blocks", 1)
    for key in ("model.block_levels", "model.self_attention_levels"):
        v = _ints(c, key, 0)
        if len(v) != len(channels):
            _fail(key, v, f"needs one entry per level of model.channels={channels} ({len(channels)})")
    head_dim = _int(c, "model.head_dim", 1)
    groups = _int(c, "model.norm_groups", 1)
    for ch in channels:
        if ch % groups:
            _fail("model.channels", channels, f"every entry must divide by model.norm_groups={groups} (GroupNorm)")
        if ch % head_dim:
            _fail("model.channels", channels, f"every entry must divide by model.head_dim={head_dim} "
                                              "(attention heads of that width)")
    context_dim = _int(c, "model.context_dim", 1)
    _num(c, "model.ffn_mult", 0, lo_open=True)
    _num(c, "model.dense_ffn_mult", 0)
    _choice(c, "model.dtype", MODEL_DTYPES)
    _choice(c, "model.attention", ATTENTION_IMPLS)
    if not isinstance(_get(c, "model.remat"), bool):  # runs saved before the policies: True = full
        _choice(c, "model.remat", REMAT_POLICIES)
    _int(c, "model.attention_chunk", 1)
    for moe in ("space_moe", "time_moe"):
        _int(c, f"model.{moe}.num_experts", 1)
        _num(c, f"model.{moe}.hidden_mult", 0, lo_open=True)
        _int(c, f"model.{moe}.gate_hidden", 1)
        _num(c, f"model.{moe}.router_noise", 0)
        _choice(c, f"model.{moe}.gate_grad", GATE_GRAD_MODES)
    _num(c, "model.space_moe.alpha", 0, 1, lo_open=True)
    _choice(c, "model.space_moe.average", SPACE_AVERAGES)
    _choice(c, "model.time_moe.impl", TIME_MOE_IMPLS)
    _int(c, "model.edge.channels", 1)
    _int(c, "model.edge.num_layers", 2)
    _choice(c, "model.edge.token", EDGE_TOKENS)
    _num(c, "model.edge.focal_alpha", 0, 1)
    _num(c, "model.edge.focal_gamma", 0)
    _num(c, "model.edge.weight", 0)
    _choice(c, "model.edge.source", tuple(EDGE_SOURCES))

    # --- text -----------------------------------------------------------------------------
    kind = _choice(c, "text.kind", TEXT_KINDS)
    for key in ("vocab_size", "width", "num_layers", "num_heads", "max_len"):
        _int(c, f"text.{key}", 1)
    _num(c, "text.embed_init_std", 0, lo_open=True)
    if kind == "small":
        width, heads = c.text.width, c.text.num_heads
        if width % heads:
            _fail("text.num_heads", heads, f"must divide text.width={width}")
        if width != context_dim:
            _fail("text.width", width, f"must equal model.context_dim={context_dim} (the small text encoder's "
                                       "states are the cross-attention context)")

    # --- diffusion ------------------------------------------------------------------------
    T = _int(c, "diffusion.num_timesteps", 1)
    _choice(c, "diffusion.schedule", sched_mod.BETA_SCHEDULES + tuple(sched_mod._KIND_ALIASES))
    _choice(c, "diffusion.prediction", sched_mod.PREDICTIONS + tuple(sched_mod._PREDICTION_ALIASES))
    _int(c, "model.edge.t_c", 0)
    if c.model.edge.t_c > T:
        _fail("model.edge.t_c", c.model.edge.t_c, f"must be in [0, diffusion.num_timesteps={T}]")

    # --- data -----------------------------------------------------------------------------
    _choice(c, "data.kind", DATA_KINDS)
    size = _int(c, "data.image_size", 1)
    factor = patch * 2 ** (len(channels) - 1)
    if size % factor:
        _fail("data.image_size", size, f"must divide by model.patch_size * 2**(levels - 1) = {factor} "
                                       f"(the stem and {len(channels) - 1} downsamplings)")
    w = _get(c, "data.object_weights")
    if (not isinstance(w, (tuple, list)) or len(w) != 3 or not all(_is_num(x) and x >= 0 for x in w)
            or not any(x > 0 for x in w)):
        _fail("data.object_weights", w, "must be 3 non-negative numbers (1-, 2-, 3-object scenes), one positive")
    _int(c, "data.seed")
    for key in ("latents_dir", "tfds_dir", "vae_dir", "clip_dir", "tokenizer_dir"):
        if not isinstance(_get(c, f"data.{key}"), str):
            _fail(f"data.{key}", _get(c, f"data.{key}"), "must be a path string ('' = not set)")
    _choice(c, "data.latent_mode", LATENT_MODES)
    layer = _get(c, "data.text_layer")
    if not (_is_int(layer) or (isinstance(layer, str) and (layer in TEXT_LAYERS or layer.lstrip("-").isdigit()))):
        _fail("data.text_layer", layer, f"must be one of {', '.join(map(repr, TEXT_LAYERS))} or an int index")

    # --- train ----------------------------------------------------------------------------
    batch = _int(c, "train.batch_size", 1)
    _int(c, "train.num_steps", 1)
    _num(c, "train.learning_rate", 0, lo_open=True)
    _int(c, "train.warmup_steps", 0)
    _choice(c, "train.lr_schedule", LR_SCHEDULES)
    _num(c, "train.lr_final_fraction", 0, 1)
    _num(c, "train.weight_decay", 0)
    _num(c, "train.b1", 0, 1, hi_open=True)
    _num(c, "train.b2", 0, 1, hi_open=True)
    _num(c, "train.grad_clip", 0)
    _num(c, "train.ema_decay", 0, 1, hi_open=True)
    _num(c, "train.caption_dropout", 0, 1)
    _int(c, "train.log_every", 1)
    _int(c, "train.checkpoint_every", 1)
    _int(c, "train.sample_every", 0)
    _int(c, "train.max_to_keep", 1)
    _int(c, "train.max_nonfinite_steps", 1)
    if not isinstance(_get(c, "train.init_from"), str):
        _fail("train.init_from", c.train.init_from, "must be a workdir path string ('' = none)")
    sj = _get(c, "data.subject")
    from raphael_jax.data.shapes import world  # numpy only

    _choice(c, "data.subject.kind", world.ALL_KINDS)
    for key, allowed in (("colours", tuple(world.COLOURS)), ("sizes", world.SIZES), ("places", tuple(world.PLACES))):
        v = sj[key]
        if not isinstance(v, (tuple, list)) or not v or any(x not in allowed for x in v):
            _fail(f"data.subject.{key}", v, f"must be a non-empty tuple of {', '.join(map(repr, allowed))}")
    _int(c, "data.subject.num_images", 1)

    # --- LoRA -----------------------------------------------------------------------------
    rank = _int(c, "lora.rank", 0)
    _num(c, "lora.alpha", 0)
    targets = _get(c, "lora.targets")
    if (not isinstance(targets, (tuple, list)) or not targets
            or any(not isinstance(t, str) or (t not in LORA_TARGETS and not t.startswith("re:")) for t in targets)):
        _fail("lora.targets", targets, f"must be a non-empty tuple of {', '.join(map(repr, LORA_TARGETS))} "
                                       "or 're:<regex>' strings")
    if rank and not c.train.init_from:
        _fail("lora.rank", rank, "needs train.init_from (the base run the adapters fine-tune; it is only read)")
    if not isinstance(_get(c, "data.caption_places"), bool):
        _fail("data.caption_places", c.data.caption_places, "must be True or False")
    if not isinstance(_get(c, "control.enabled"), bool):
        _fail("control.enabled", c.control.enabled, "must be True or False")
    _num(c, "control.scale", 0)
    if c.control.enabled and not c.train.init_from:
        _fail("control.enabled", True, "needs train.init_from (the base run the ControlNet controls; it is only read)")
    if c.control.enabled and rank:
        _fail("control.enabled", True, "train a ControlNet and LoRA adapters in separate runs (lora.rank=0 here)")
    if c.control.enabled and c.data.kind == "subject":
        _fail("control.enabled", True, "a ControlNet trains on scenes with their edge maps, not on data.kind='subject'")
    if rank and c.data.kind == "latents" and "text" in targets:
        _fail("lora.targets", targets, "'text' adapts the small text encoder; latent runs use external text states")

    # --- parallel -------------------------------------------------------------------------
    mesh = dict(_get(c, "parallel.mesh"))
    for axis, n in mesh.items():
        if axis not in MESH_AXES:
            _fail("parallel.mesh", mesh, f"unknown axis {axis!r}; the axes are {', '.join(MESH_AXES)}")
        if not _is_int(n) or not (n > 0 or n == -1):
            _fail(f"parallel.mesh.{axis}", n, "must be a positive integer or -1 (the devices left over)")
    if sum(n == -1 for n in mesh.values()) > 1:
        _fail("parallel.mesh", mesh, "at most one axis may be -1")
    _int(c, "parallel.num_devices", 0)
    rules = dict(_get(c, "parallel.rules"))
    for name, axes in rules.items():
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if not isinstance(axes, (tuple, list)) or any(a not in MESH_AXES for a in axes):
            _fail(f"parallel.rules.{name}", rules[name], f"must be a tuple of mesh axes ({', '.join(MESH_AXES)})")
    if "batch" not in rules:
        _fail("parallel.rules", rules, "needs a 'batch' rule (the mesh axes the batch is split over)")
    batch_axes = (rules["batch"],) if isinstance(rules["batch"], str) else tuple(rules["batch"] or ())
    fixed = {a: mesh.get(a, 1) for a in batch_axes if mesh.get(a, 1) > 0}
    n = math.prod(fixed.values())
    if batch % n:
        _fail("train.batch_size", batch, f"must divide by {n}, the product of the fixed parallel.mesh axes "
                                         f"{fixed} that parallel.rules.batch maps the batch to")
    _num(c, "parallel.time_capacity_factor", 0)

    # --- sampling / evaluation ------------------------------------------------------------
    steps = _int(c, "sample.num_steps", 1)
    if steps > T:
        _fail("sample.num_steps", steps, f"must be in [1, diffusion.num_timesteps={T}]")
    _num(c, "sample.guidance", 0)
    _num(c, "sample.eta", 0)
    _choice(c, "sample.timestep_spacing", TIMESTEP_SPACINGS)
    if not isinstance(_get(c, "sample.use_clipped_model_output"), bool):
        _fail("sample.use_clipped_model_output", c.sample.use_clipped_model_output, "must be True or False")
    _num(c, "sample.guidance_rescale", 0, 1)
    clip_x0 = _get(c, "sample.clip_x0")
    if not _is_num(clip_x0) or (clip_x0 < 0 and clip_x0 != -1):
        _fail("sample.clip_x0", clip_x0, "must be a number >= 0 (0 = no clipping) or -1 (auto)")
    tile = _int(c, "sample.vae_tile", 0)
    if 0 < tile < 8:
        _fail("sample.vae_tile", tile, "must be 0 (never tile) or at least 8 latent pixels")
    _int(c, "eval.num_prompts", 1)
    _int(c, "eval.batch_size", 1)
    _int(c, "eval.seed")
