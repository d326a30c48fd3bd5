"""Parity of the NNX CLIP text port with transformers (tiny random weights), and the CLIP tokenizer."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from raphael_jax.cli.convert import main as convert_main  # noqa: E402
from raphael_jax.convert import load_clip_text, load_converted  # noqa: E402
from raphael_jax.data.real.clip_tokenizer import load_clip_tokenizer  # noqa: E402
from raphael_jax.models.clip_text import CLIPTextConfig  # noqa: E402

TOL = 1e-5
AXES = {"vocab", "embed", "mlp", "heads", "kv", "norm", None}
# (hidden_act, eos_token_id, with projection): OpenAI CLIP (legacy eos id 2) and OpenCLIP ViT-g/H.
VARIANTS = {"openai": ("quick_gelu", 2, False), "openclip": ("gelu", 98, True)}


def _tiny_hf(act, eos, proj):
    cfg = transformers.CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act=act,
        eos_token_id=eos,
        projection_dim=12,
    )
    cls = transformers.CLIPTextModelWithProjection if proj else transformers.CLIPTextModel
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # LayerNorms start at 1/0: perturb everything so the mapping is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tmp_path_factory):
    act, eos, proj = VARIANTS[request.param]
    pt = _tiny_hf(act, eos, proj)
    d = tmp_path_factory.mktemp(request.param)
    pt.save_pretrained(d, safe_serialization=True)
    return pt, d, request.param


def _inputs(eos):
    rs = np.random.RandomState(0)
    ids = rs.randint(3, 90, (2, 9))
    ids[0, 6], ids[0, 7:] = eos, 0  # row 0: 7 real tokens then padding
    ids[1, 8] = eos
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    return ids, mask


def _run_torch(pt, ids, mask):
    with torch.no_grad():
        return pt(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)


def _err(a, b, real=None):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float((d[real] if real is not None else d).max())


def test_parity_with_transformers(saved):
    pt, d, name = saved
    act, eos, proj = VARIANTS[name]
    model, cfg = load_clip_text(d)
    assert cfg.hidden_act == act and cfg.eos_token_id == eos and (cfg.projection_dim is not None) == proj
    ids, mask = _inputs(eos)
    ref = _run_torch(pt, ids, mask)
    out = jax.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)  # padded positions are don't-care
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    errs = {
        "last": _err(out.last_hidden_state, ref.last_hidden_state, real),
        "penultimate": _err(out.hidden_states[-2], ref.hidden_states[-2], real),
        "all_layers": max(_err(a, b.numpy(), real) for a, b in zip(out.hidden_states, ref.hidden_states)),
    }
    if proj:
        errs["text_embeds"] = _err(out.text_embeds, ref.text_embeds)
        pooled_ref = pt.text_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output
        errs["pooled"] = _err(out.pooled_output, pooled_ref.detach())
    else:
        assert out.text_embeds is None
        errs["pooled"] = _err(out.pooled_output, ref.pooler_output)
    print(name, errs)
    assert max(errs.values()) < TOL, errs
    # without a padding mask (the usual SD usage) the whole sequence matches
    with torch.no_grad():
        ref_nomask = pt(torch.tensor(ids)).last_hidden_state
    assert _err(model(jnp.asarray(ids)).last_hidden_state, ref_nomask) < TOL


def test_logical_axes_on_every_param(saved):
    model, _ = load_clip_text(saved[1])
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, path
        assert set(names) <= AXES, (path, names)


def test_sharded_safetensors_and_converter_round_trip(saved, tmp_path):
    pt, d, name = saved
    sharded = tmp_path / "sharded"
    pt.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ref_model, _ = load_clip_text(d)
    model, _ = load_clip_text(sharded)
    ids, mask = _inputs(VARIANTS[name][1])
    want = ref_model(jnp.asarray(ids), jnp.asarray(mask))
    got = model(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(got.last_hidden_state), np.asarray(want.last_hidden_state))

    out_dir = tmp_path / "converted"
    assert convert_main(["clip", str(d), str(out_dir)]) == 0
    meta = json.loads((out_dir / "raphael_convert.json").read_text())
    assert meta["kind"] == "clip" and meta["config"]["hidden_act"] == VARIANTS[name][0]
    restored, cfg = load_converted(out_dir)
    assert isinstance(cfg, CLIPTextConfig) and cfg == ref_model.config
    again = restored(jnp.asarray(ids), jnp.asarray(mask))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_from_full_clip_config():
    full = {
        "architectures": ["CLIPModel"],
        "projection_dim": 1024,
        "text_config": {
            "hidden_size": 1024,
            "hidden_act": "gelu",
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "eos_token_id": 49407,
        },
    }
    cfg = CLIPTextConfig.from_hf_config(full)
    assert (cfg.hidden_size, cfg.projection_dim, cfg.hidden_act, cfg.eos_token_id) == (
        1024,
        1024,
        "gelu",
        49407,
    )
    text_only = CLIPTextConfig.from_hf_config({"architectures": ["CLIPTextModel"], "projection_dim": 768})
    assert text_only.projection_dim is None and text_only.eos_token_id == 2
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")


# ------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny but complete byte-level CLIP BPE vocabulary (every byte, with and without </w>)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = ["l o", "lo w</w>", "e r</w>", "n e", "ne w", "new er</w>", "t h", "th e</w>", "a </w>"]
    vocab = chars + [c + "</w>" for c in chars]
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in vocab:
            vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return d


def test_tokenizer_matches_transformers(tok_dir):
    tok = load_clip_tokenizer(tok_dir)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    texts = ["a lower newer", "The newer Lower!", "", "low low low low low low low low"]
    for max_len in (77, 8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, mask = tok.encode(texts, max_len=max_len)
        want = ref(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="np")
        assert ids.dtype == np.int32 and ids.shape == (4, max_len)
        np.testing.assert_array_equal(ids, want["input_ids"])
        np.testing.assert_array_equal(mask, want["attention_mask"])
        assert (ids[:, 0] == tok.bos_id).all()
        last = mask.sum(1) - 1
        assert (ids[np.arange(4), last] == tok.eos_id).all()  # EOT kept, also when truncated
        assert bool(caught) == (max_len == 8)
    assert ids[3, -1] == tok.eos_id and mask[3].all()


def test_full_clip_model_directory(tmp_path):
    """laion/CLIP-ViT-g-14-* ships a whole CLIPModel: the text tower loads, the vision tower is skipped."""
    text = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="gelu",
        eos_token_id=98,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
    torch.manual_seed(1)
    pt = transformers.CLIPModel(cfg).eval()
    pt.save_pretrained(tmp_path, safe_serialization=True)
    model, ours = load_clip_text(tmp_path)
    assert ours.projection_dim == 12 and ours.hidden_act == "gelu"
    ids, mask = _inputs(98)
    with torch.no_grad():
        want = pt.get_text_features(torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert _err(model(jnp.asarray(ids), jnp.asarray(mask)).text_embeds, want) < TOL
