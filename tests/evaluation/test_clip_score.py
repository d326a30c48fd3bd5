"""CLIP vision tower and two-tower CLIP against transformers (tiny random weights); CLIP preprocessing
against CLIPImageProcessor; the CLIP score against a hand computation from transformers' embeddings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from raphael_jax.convert.clip_full import (  # noqa: E402
    ClipImageProcessing,
    load_clip_model,
    load_clip_vision,
    load_image_processor_config,
)
from raphael_jax.convert.safetensors_io import ConversionError  # noqa: E402
from raphael_jax.evaluation.clip_score import ClipScorer, clip_preprocess, clip_score_from_embeddings  # noqa: E402

TOL = 1e-5
IMAGE_SIZE = 30
CAPTIONS = ["a lower newer", "the newer lower", "low new the"]


def _tok_files(d):
    """A tiny but complete byte-level CLIP BPE vocabulary (as tests/convert/test_clip_port.py)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = ["l o", "lo w</w>", "e r</w>", "n e", "ne w", "new er</w>", "t h", "th e</w>", "a </w>"]
    vocab = chars + [c + "</w>" for c in chars]
    for m in merges:
        if m.replace(" ", "") not in vocab:
            vocab.append(m.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def _perturb(model):
    with torch.no_grad():  # LayerNorms start at 1/0: perturb everything so the mapping is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=6,
    hidden_act="quick_gelu",
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    n_vocab = _tok_files(d)
    text = dict(
        vocab_size=n_vocab,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="quick_gelu",
        eos_token_id=n_vocab - 1,
        bos_token_id=n_vocab - 2,
        pad_token_id=n_vocab - 1,
    )
    cfg = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=12)
    torch.manual_seed(0)
    pt = _perturb(transformers.CLIPModel(cfg))
    with torch.no_grad():  # these random towers give negative cosines for the test pairs: flip them positive
        pt.visual_projection.weight.neg_()
    pt.save_pretrained(d, safe_serialization=True)
    proc = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    proc.save_pretrained(d)
    return pt, d


def _err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_clip_model_parity_with_transformers(clip_dir):
    pt, d = clip_dir
    model = load_clip_model(d)
    assert model.vision_model.config.image_size == IMAGE_SIZE and model.vision_model.config.projection_dim == 12
    tok = transformers.CLIPTokenizer.from_pretrained(str(d))
    enc = tok(CAPTIONS, padding="max_length", max_length=16, return_tensors="np")
    pixels = np.random.RandomState(0).randn(2, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)
    with torch.no_grad():
        want = pt(
            input_ids=torch.tensor(enc["input_ids"]),
            attention_mask=torch.tensor(enc["attention_mask"]),
            pixel_values=torch.tensor(pixels),
        )
        want_img = pt.get_image_features(pixel_values=torch.tensor(pixels))
        want_vis = pt.vision_model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    out = jax.jit(lambda m, i, p, a: m(i, p, a))(
        model,
        jnp.asarray(enc["input_ids"]),
        jnp.asarray(pixels.transpose(0, 2, 3, 1)),
        jnp.asarray(enc["attention_mask"]),
    )
    vis = model.vision_model(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    errs = {
        "image_embeds": _err(out.image_embeds, want.image_embeds),
        "text_embeds": _err(out.text_embeds, want.text_embeds),
        "logits_per_image": _err(out.logits_per_image, want.logits_per_image) / float(np.exp(model.logit_scale[...])),
        "image_features": _err(model.get_image_features(jnp.asarray(pixels.transpose(0, 2, 3, 1))), want_img),
        "last_hidden_state": _err(vis.last_hidden_state, want_vis.last_hidden_state),
        "pooled": _err(vis.pooled_output, want_vis.pooler_output),
        "hidden_states": max(_err(a, b) for a, b in zip(vis.hidden_states, want_vis.hidden_states)),
    }
    print("CLIP parity", errs)
    assert max(errs.values()) < TOL, errs
    assert float(model.logit_scale[...]) == pytest.approx(float(pt.logit_scale.detach()), abs=1e-7)


def test_vision_only_directories(tmp_path):
    cfg = transformers.CLIPVisionConfig(**VISION, projection_dim=10)
    torch.manual_seed(1)
    pt = _perturb(transformers.CLIPVisionModelWithProjection(cfg))
    pt.save_pretrained(tmp_path, safe_serialization=True)
    model, ours = load_clip_vision(tmp_path)
    assert ours.projection_dim == 10
    pixels = np.random.RandomState(1).randn(2, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)
    with torch.no_grad():
        want = pt(pixel_values=torch.tensor(pixels)).image_embeds
    assert _err(model(jnp.asarray(pixels.transpose(0, 2, 3, 1))).image_embeds, want) < TOL
    with pytest.raises(ConversionError, match="not a full transformers CLIPModel"):
        load_clip_model(tmp_path)
    with pytest.raises(ValueError, match="expected pixels"):
        model(jnp.zeros((1, 32, 32, 3)))


def test_preprocessing_matches_clip_image_processor(clip_dir):
    _, d = clip_dir
    proc = load_image_processor_config(d)
    assert proc == ClipImageProcessing(resize=IMAGE_SIZE, crop=IMAGE_SIZE)
    ref = transformers.CLIPImageProcessor.from_pretrained(str(d))
    rs = np.random.RandomState(0)
    for shape in [(45, 37, 3), (20, 64, 3), (30, 30, 3), (256, 256, 3)]:
        im = rs.randint(0, 256, shape).astype(np.uint8)
        want = ref(images=im, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        got = clip_preprocess(im, proc)
        assert got.shape == want.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert _err(got, want) < 1e-5, shape


def test_clip_score_against_hand_computation(clip_dir):
    pt, d = clip_dir
    scorer = ClipScorer.from_pretrained(d, batch_size=2)  # model, tokenizer and preprocessing from the folder
    rs = np.random.RandomState(3)
    images = [rs.randint(0, 256, (40, 52, 3)).astype(np.uint8) for _ in CAPTIONS]
    # by hand, with transformers only: processor -> CLIPModel features -> 100 * max(cos, 0), mean
    proc = transformers.CLIPImageProcessor.from_pretrained(str(d))
    tok = transformers.CLIPTokenizer.from_pretrained(str(d))
    pixels = torch.tensor(proc(images=images, return_tensors="np")["pixel_values"])
    enc = tok(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = pt.get_image_features(pixel_values=pixels).numpy().astype(np.float64)
        txt = pt.get_text_features(**enc).numpy().astype(np.float64)
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    want = 100 * np.maximum(cos, 0)
    assert _err(scorer.image_embeddings(images), img) < TOL and _err(scorer.text_embeddings(CAPTIONS), txt) < TOL
    got = scorer.scores(images, CAPTIONS)
    print("CLIP scores", got, "hand", want)
    assert (want > 0).all() and np.abs(got - want).max() < 1e-3
    assert scorer(images, CAPTIONS) == pytest.approx(want.mean(), abs=1e-3)
    # the max(., 0): opposite embeddings score 0, equal ones 100
    np.testing.assert_allclose(
        clip_score_from_embeddings([[1.0, 2.0], [1.0, 0.0]], [[-1.0, -2.0], [3.0, 0.0]]), [0.0, 100.0]
    )
    with pytest.raises(ValueError, match="captions"):
        scorer.scores(images, CAPTIONS[:2])


def test_clip_score_command_on_a_folder_of_pngs(clip_dir, tmp_path, capsys):
    """raphael-eval clip-score: the prompts come from the PNG text chunks; grids and prompt-less files are skipped."""
    from PIL import Image

    from raphael_jax.cli.eval import main
    from raphael_jax.sampling import save_png

    _, d = clip_dir
    rs = np.random.RandomState(5)
    images = [rs.randint(0, 256, (32, 32, 3)).astype(np.uint8) for _ in CAPTIONS]
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, (im, cap) in enumerate(zip(images, CAPTIONS)):
        save_png(im, str(folder / f"sample_{i:04d}.png"), cap, {"seed": 0})
    save_png(np.concatenate(images, 1), str(folder / "grid.png"), " | ".join(CAPTIONS))
    Image.fromarray(images[0]).save(folder / "no_prompt.png")
    out = tmp_path / "clip.json"
    assert main(["clip-score", str(folder), "--clip-model", str(d), "--batch-size", "2", "--json", str(out)]) == 0
    want = ClipScorer.from_pretrained(d, batch_size=2).scores(images, CAPTIONS)
    printed = capsys.readouterr().out
    assert f"CLIP score: {want.mean():.3f} (3 images, 1 without a prompt skipped)" in printed
    res = json.loads(out.read_text())
    assert res["num_images"] == 3 and res["skipped"] == ["no_prompt.png"]
    np.testing.assert_allclose([res["scores"][f"sample_{i:04d}.png"] for i in range(3)], want, atol=1e-4)
    assert res["clip_score"] == pytest.approx(float(want.mean()), abs=1e-4)
    # with the grid included it is scored too (against the joined prompts)
    assert main(["clip-score", str(folder), "--clip-model", str(d), "--exclude", "no_prompt*"]) == 0
    assert "(4 images)" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["clip-score", str(empty), "--clip-model", str(d)]) == 2
    assert "no *.png file with a 'prompt' PNG text chunk" in capsys.readouterr().err
