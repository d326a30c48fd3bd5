"""Configs: every shipped config with every variant, the base defaults of restored runs, validation."""
import glob
import json
import os
import time

import pytest

from raphael_jax.config import (
    ConfigError,
    ConfigWarning,
    apply_overrides,
    base_config,
    config_module,
    from_saved,
    load_config,
    validate,
)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TINY = os.path.join(CONFIGS, "tiny.py")
SHIPPED = sorted(f for f in glob.glob(os.path.join(CONFIGS, "*.py")) if not f.endswith("common.py"))
common = config_module(TINY, "common")


def test_shipped_configs_load_fast_and_validate():
    assert len(SHIPPED) >= 6
    for path in SHIPPED:
        t0 = time.perf_counter()
        cfg = load_config(path)
        assert time.perf_counter() - t0 < 1.0, path  # no model is built
        validate(cfg)
        assert "variant" not in cfg  # the record of the applied variants is checked, then removed
        # every config has every key of the base (nothing reads config.get(key, default))
        assert set(_flat(cfg.to_dict())) >= set(_flat(base_config().to_dict())), path


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# one example per variant and what it must have done (c: the variant's config, plain: without it)
EXAMPLES = {
    "full": ("full", lambda c, plain: c.to_json() == plain.to_json()),
    "no_space_moe": ("no_space_moe", lambda c, plain: not c.model.space_moe.enabled and c.model.time_moe.enabled),
    "no_time_moe": ("no_time_moe", lambda c, plain: not c.model.time_moe.enabled and c.model.space_moe.enabled),
    "no_moe": ("no_moe", lambda c, plain: not c.model.space_moe.enabled and not c.model.time_moe.enabled),
    "no_edge": ("no_edge", lambda c, plain: not c.model.edge.enabled and plain.model.edge.enabled),
    "dense": ("dense", lambda c, plain: c.model.dense_ffn_mult == common.dense_ffn_mult(plain.model) > 0),
    "experts": ("experts=3", lambda c, plain: c.model.space_moe.num_experts == 3 and c.model.space_moe.enabled),
    "time_experts": ("time_experts=2", lambda c, plain: c.model.time_moe.num_experts == 2),
    "alpha": ("alpha=0.35", lambda c, plain: c.model.space_moe.alpha == 0.35),
    "tc": ("tc=123", lambda c, plain: c.model.edge.t_c == 123),
    "multi": ("multi", lambda c, plain: tuple(c.data.object_weights) == (1.0, 1.0, 1.0)),
}


def test_every_variant_has_an_example():
    assert set(EXAMPLES) == set(common.VARIANTS)


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_config_applies_every_variant(path):
    plain = load_config(path)
    for arg, check in EXAMPLES.values():
        assert check(load_config(f"{path}:{arg}"), plain), (path, arg)
    both = load_config(f"{path}:dense,no_edge")
    assert both.model.dense_ffn_mult > 0 and not both.model.edge.enabled
    assert not load_config(f"{path}:experts=0").model.space_moe.enabled
    assert not load_config(f"{path}:time_experts=0").model.time_moe.enabled


def test_dense_is_sized_on_the_other_switches():
    a, b = load_config(f"{TINY}:dense,experts=2"), load_config(f"{TINY}:experts=2, dense")
    assert a.to_json() == b.to_json() and a.model.space_moe.num_experts == 2
    assert a.model.dense_ffn_mult == a.model.time_moe.hidden_mult + 2 * a.model.space_moe.hidden_mult


@pytest.mark.parametrize("arg, match", [
    ("no_space", "unknown config variant 'no_space'; known: full, no_space_moe"),
    ("dense,bogus=3", "unknown config variant 'bogus=3'.*experts=N.*alpha=X"),
    ("experts=two", "experts=N needs an integer"),
    ("alpha=", "alpha=X needs a number"),
    ("experts", "experts=N needs an integer"),
    ("no_edge=1", "no_edge takes no value"),
    ("alpha=1.5", "model.space_moe.alpha=1.5"),  # applied, then refused by validate
])
def test_bad_variants_are_one_clear_error(arg, match):
    with pytest.raises(ConfigError, match=match):
        load_config(f"{TINY}:{arg}")


def test_a_config_ignoring_its_variant_argument_is_refused(tmp_path):
    ignores = tmp_path / "ignores.py"
    ignores.write_text("from raphael_jax.config import base_config\n\n"
                       "def get_config(arg=None):\n    return base_config()\n")
    assert load_config(str(ignores)).model.edge.enabled  # without variants it loads
    with pytest.raises(ConfigError, match=f"{ignores} ignores its variant argument 'dense,no_edge'"):
        load_config(f"{ignores}:dense,no_edge")
    fixed = tmp_path / "fixed.py"
    fixed.write_text("from raphael_jax.config import base_config, config_module\n"
                     f"common = config_module({TINY!r}, 'common')\n\n"
                     "def get_config(arg=None):\n    return common.with_variants(base_config(), 'no_edge')\n")
    with pytest.raises(ConfigError, match="applied the variants 'no_edge'"):
        load_config(f"{fixed}:dense")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config(str(empty))


def test_configs_build_on_each_other_with_variants():
    # small.py starts from tiny.py (loaded without variants) and applies its own at the end
    small = load_config(os.path.join(CONFIGS, "small.py:no_edge"))
    assert not small.model.edge.enabled and small.model.channels == (64, 128, 256)
    assert load_config(os.path.join(CONFIGS, "base.py:dense,no_edge")).model.dense_ffn_mult > 0


# --- validation -------------------------------------------------------------------------------

# (key, bad value, expected substring of the error; extra settings making the case)
RULES = [
    # unknown enum values
    ("diffusion.schedule", "quadratic", "must be one of 'scaled_linear'", {}),
    ("diffusion.prediction", "x0", "must be one of 'epsilon', 'v'", {}),
    ("text.kind", "clip", "must be one of 'small', 'external'", {}),
    ("data.kind", "imagenet", "must be one of 'shapes', 'latents', 'subject'", {}),
    ("model.dtype", "float16", "must be one of 'float32', 'bfloat16'", {}),
    ("model.space_moe.gate_grad", "sign", "must be one of 'prob'", {}),
    ("model.time_moe.gate_grad", "sign", "must be one of 'prob'", {}),
    ("model.space_moe.average", "max", "must be one of 'real', 'all'", {}),
    ("model.time_moe.impl", "scatter", "must be one of 'gather', 'ragged'", {}),
    ("model.edge.token", "cls", "must be one of 'eot', 'mean'", {}),
    ("model.edge.source", "sobel", "must be one of 'canny', 'outline'", {}),
    ("train.lr_schedule", "linear", "must be one of 'constant', 'cosine'", {}),
    ("sample.timestep_spacing", "uniform", "must be one of 'leading', 'trailing'", {}),
    ("data.latent_mode", "mode", "must be one of 'mean', 'sample'", {}),
    ("data.text_layer", "first", "or an int index", {}),
    # fine-tuning: the subject data and the LoRA adapters
    ("data.subject.kind", "star", "must be one of 'circle', 'square', 'triangle', 'ring'", {}),
    ("data.subject.colours", ("red", "pink"), "non-empty tuple of 'red'", {}),
    ("data.subject.places", (), "non-empty tuple of 'top left'", {}),
    ("data.subject.num_images", 0, "integer >= 1", {}),
    ("lora.rank", -1, "integer >= 0", {}),
    ("lora.rank", 4, "needs train.init_from", {}),
    ("lora.alpha", -1.0, "number >= 0", {}),
    ("lora.targets", ("attention", "mlp"), "non-empty tuple of 'attention', 'experts'", {}),
    ("lora.targets", (), "non-empty tuple of 'attention'", {}),
    # non-positive sizes
    ("model.channels", (32, 0, 64), "non-empty tuple of integers >= 1", {}),
    ("model.channels", (), "non-empty tuple of integers >= 1", {}),
    ("model.in_channels", 0, "integer >= 1", {}),
    ("model.patch_size", 0, "integer >= 1", {}),
    ("model.num_res_blocks", 0, "integer >= 1", {}),
    ("model.head_dim", 0, "integer >= 1", {}),
    ("model.context_dim", 0, "integer >= 1", {}),
    ("model.norm_groups", -8, "integer >= 1", {}),
    ("model.space_moe.num_experts", 0, "integer >= 1", {}),
    ("model.time_moe.num_experts", -1, "integer >= 1", {}),
    ("model.space_moe.hidden_mult", 0.0, "number > 0", {}),
    ("model.time_moe.hidden_mult", -1.0, "number > 0", {}),
    ("model.space_moe.gate_hidden", 0, "integer >= 1", {}),
    ("model.time_moe.gate_hidden", 0, "integer >= 1", {}),
    ("model.ffn_mult", 0.0, "number > 0", {}),
    ("model.dense_ffn_mult", -1.0, "number >= 0", {}),
    ("model.edge.channels", 0, "integer >= 1", {}),
    ("model.edge.num_layers", 1, "integer >= 2", {}),
    ("text.vocab_size", 0, "integer >= 1", {}),
    ("text.width", 0, "integer >= 1", {}),
    ("text.num_layers", 0, "integer >= 1", {}),
    ("text.num_heads", 0, "integer >= 1", {}),
    ("text.max_len", 0, "integer >= 1", {}),
    ("data.image_size", 0, "integer >= 1", {}),
    ("train.batch_size", 0, "integer >= 1", {}),
    ("train.num_steps", 0, "integer >= 1", {}),
    ("diffusion.num_timesteps", 0, "integer >= 1", {}),
    ("sample.num_steps", 0, "integer >= 1", {}),
    ("eval.num_prompts", 0, "integer >= 1", {}),
    ("eval.batch_size", 0, "integer >= 1", {}),
    ("train.log_every", 0, "integer >= 1", {}),
    ("train.checkpoint_every", 0, "integer >= 1", {}),
    ("train.sample_every", -1, "integer >= 0", {}),
    ("train.max_to_keep", 0, "integer >= 1", {}),
    ("train.batch_size", 2.5, "must be an integer", {}),
    # shapes that do not fit together
    ("model.channels", (32, 60, 64), "divide by model.norm_groups=8", {}),
    ("model.channels", (32, 64, 80), "divide by model.head_dim=32", {}),
    ("model.block_levels", (1, 1), "one entry per level of model.channels", {}),
    ("model.self_attention_levels", (0, 1, 1, 1), "one entry per level of model.channels", {}),
    ("data.image_size", 36, "must divide by model.patch_size * 2**(levels - 1) = 8", {}),
    ("text.width", 48, "must equal model.context_dim=64", {}),
    ("text.num_heads", 3, "must divide text.width=64", {}),
    # ranges
    ("model.space_moe.alpha", 0.0, "in (0, 1]", {}),
    ("model.space_moe.alpha", 1.5, "in (0, 1]", {}),
    ("model.edge.t_c", 1001, "in [0, diffusion.num_timesteps=1000]", {}),
    ("model.edge.t_c", -1, "integer >= 0", {}),
    ("model.edge.focal_alpha", 1.5, "in [0, 1]", {}),
    ("model.edge.focal_gamma", -1.0, ">= 0", {}),
    ("model.space_moe.router_noise", -0.1, ">= 0", {}),
    ("train.ema_decay", 1.0, "in [0, 1)", {}),
    ("train.ema_decay", -0.1, "in [0, 1)", {}),
    ("train.caption_dropout", 1.5, "in [0, 1]", {}),
    ("train.caption_dropout", -0.1, "in [0, 1]", {}),
    ("train.learning_rate", 0.0, "number > 0", {}),
    ("train.learning_rate", float("nan"), "number > 0", {}),
    ("train.warmup_steps", -1, "integer >= 0", {}),
    ("train.lr_final_fraction", 1.5, "in [0, 1]", {}),
    ("train.b2", 1.0, "in [0, 1)", {}),
    ("train.grad_clip", -1.0, ">= 0", {}),
    ("train.weight_decay", -0.1, ">= 0", {}),
    ("sample.num_steps", 1001, "in [1, diffusion.num_timesteps=1000]", {}),
    ("sample.guidance", -1.0, ">= 0", {}),
    ("sample.eta", -0.5, ">= 0", {}),
    ("sample.guidance_rescale", 2.0, "in [0, 1]", {}),
    ("text.embed_init_std", 0.0, "number > 0", {}),
    ("data.object_weights", (1.0, 0.0), "3 non-negative numbers", {}),
    ("data.object_weights", (0.0, 0.0, 0.0), "one positive", {}),
    ("data.object_weights", (1.0, -1.0, 0.0), "3 non-negative numbers", {}),
    # scale-out
    ("parallel.mesh.data", 0, "positive integer or -1", {}),
    ("parallel.mesh.fsdp", -2, "positive integer or -1", {}),
    ("parallel.mesh", {"data": -1, "fsdp": -1, "expert": 1, "tensor": 1}, "at most one axis may be -1", {}),
    ("parallel.mesh", {"data": -1, "pipeline": 2}, "unknown axis 'pipeline'", {}),
    ("parallel.num_devices", -1, "integer >= 0", {}),
    ("parallel.rules.batch", ("data", "pipe"), "tuple of mesh axes", {}),
    ("parallel.time_capacity_factor", -1.0, ">= 0", {}),
    ("train.batch_size", 30, "must divide by 4, the product of the fixed parallel.mesh axes",
     {"parallel.mesh.fsdp": 4}),
    ("train.batch_size", 12, "must divide by 8", {"parallel.mesh.data": 2, "parallel.mesh.expert": 4}),
]


def _set(cfg, key, value):
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with cfg.ignore_type():
        node[leaf] = value


@pytest.mark.parametrize("key, value, match, extra", RULES, ids=[f"{r[0]}={r[1]!r}" for r in RULES])
def test_validate_names_the_key_and_the_rule(key, value, match, extra):
    cfg = load_config(TINY).unlock()
    for k, v in extra.items():
        _set(cfg, k, v)
    validate(cfg)  # the extra settings alone are fine
    _set(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(key) and match in msg, msg


def test_validate_names_a_missing_key():
    cfg = load_config(TINY).unlock()
    del cfg.train["lr_schedule"]
    with pytest.raises(ConfigError, match=r"^train.lr_schedule: missing"):
        validate(cfg)


def test_load_config_validates_after_overrides():
    with pytest.raises(ConfigError, match="model.space_moe.alpha=0.0"):
        load_config(TINY, ["model.space_moe.alpha=0"])
    with pytest.raises(ConfigError, match="model.channels"):
        load_config(TINY, ["model.channels=abc"])  # wrong type: one line naming the key
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(TINY, ["model.chanels=(1, 2)"])


@pytest.mark.parametrize("overrides", [
    ["train.caption_dropout=1.0"],  # an unconditional model is a legal (if odd) choice
    ["train.ema_decay=0.0", "train.warmup_steps=0", "train.sample_every=0"],
    ["model.space_moe.alpha=1.0", "model.edge.t_c=0"],
    ["model.edge.t_c=1000", "sample.num_steps=1000"],
    ["parallel.mesh.data=2", "parallel.mesh.fsdp=-1", "parallel.mesh.expert=2", "train.batch_size=4"],
    ["diffusion.schedule=squaredcos_cap_v2", "diffusion.prediction=v_prediction"],
    ["data.text_layer=-2", "data.latent_mode=sample"],
    ["model.dtype=bfloat16", "model.time_moe.impl=ragged", "model.space_moe.gate_grad=straight_through"],
    ["train.lr_schedule=cosine", "train.lr_final_fraction=0.1"],
    ["data.object_weights=(0, 1, 2)", "model.edge.source=canny"],
    ["model.channels=(16, 32)", "model.block_levels=(1, 1)", "model.self_attention_levels=(0, 1)",
     "model.head_dim=16", "text.width=32", "model.context_dim=32", "data.image_size=16"],
    ["text.kind=external", "text.width=1024"],  # an external encoder's width is checked by the trainer
])
def test_valid_overrides_pass(overrides):
    cfg = load_config(TINY, overrides)
    assert cfg.is_locked


def test_data_text_layer_override_stays_a_string():
    cfg = load_config(TINY, ["data.text_layer=-2", "train.init_from=runs/tiny"])
    assert cfg.data.text_layer == "-2" and cfg.train.init_from == "runs/tiny"
    c = base_config()
    apply_overrides(c, ["model.edge.token='mean'"])
    assert c.model.edge.token == "mean"


# --- restored runs ----------------------------------------------------------------------------

def test_from_saved_round_trip():
    cfg = load_config(os.path.join(CONFIGS, "small_latent.py"), ["data.latents_dir=/data/latents"])
    back = from_saved(json.loads(cfg.to_json()))
    assert back.to_json() == cfg.to_json()
    assert isinstance(back.model.channels, tuple) and back.data.latents_dir == "/data/latents"


def test_from_saved_fills_keys_an_old_run_lacks_with_the_defaults():
    saved = json.loads(load_config(TINY).to_json())
    for group, key in [("sample", "guidance_rescale"), ("sample", "use_clipped_model_output"),
                       ("model", "text_temb"), ("train", "lr_schedule"), ("train", "lr_final_fraction"),
                       ("text", "embed_init_std")]:
        del saved[group][key]
    del saved["data"]  # the whole group
    saved["parallel"]["mesh"].pop("tensor")
    cfg = from_saved(saved)
    base = base_config()
    assert cfg.sample.guidance_rescale == 0.0 and cfg.sample.use_clipped_model_output is True
    assert cfg.model.text_temb is False and cfg.train.lr_schedule == "constant"
    assert cfg.train.lr_final_fraction == 0.0 and cfg.text.embed_init_std == 1.0
    assert cfg.data.to_dict() == base.data.to_dict() and cfg.data.latents_dir == ""
    assert cfg.parallel.mesh.tensor == 1
    assert cfg.model.channels == (32, 64, 64) and cfg.diffusion.prediction == "v"  # the run's own values


def test_from_saved_drops_unknown_keys_with_one_warning():
    saved = json.loads(load_config(TINY).to_json())
    saved["train"]["old_knob"] = 3
    saved["legacy"] = {"a": 1}
    with pytest.warns(ConfigWarning, match=r"dropped: train.old_knob, legacy$"):
        cfg = from_saved(saved)
    assert "old_knob" not in cfg.train and "legacy" not in cfg


def test_from_saved_validates():
    saved = json.loads(load_config(TINY).to_json())
    saved["model"]["space_moe"]["alpha"] = 0.0
    with pytest.raises(ConfigError, match=r"^model.space_moe.alpha=0.0"):
        from_saved(saved)
    saved = json.loads(load_config(TINY).to_json())
    saved["model"]["edge"] = 3
    with pytest.raises(ConfigError, match="saved config model.edge=3"):
        from_saved(saved)


# --- the allowed sets match the code ----------------------------------------------------------

def test_allowed_values_match_the_modules():
    from raphael_jax import config
    from raphael_jax.models import moe, unet
    from raphael_jax.tools import precompute
    from raphael_jax.train import state

    assert set(config.MODEL_DTYPES) == set(unet.DTYPES)
    assert config.GATE_GRAD_MODES == moe.GATE_GRAD_MODES
    assert config.LR_SCHEDULES == state.LR_SCHEDULES
    assert config.TEXT_LAYERS == precompute.TEXT_LAYERS
    from raphael_jax.models import lora
    assert config.LORA_TARGETS == tuple(lora.TARGET_GROUPS)
