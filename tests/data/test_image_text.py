"""Real-data path: caption cleaning, aspect buckets, the image_text tfds build, per-bucket grain batches,
the VAE/CLIP precompute (tiny random diffusers / transformers models) and training on its output."""

import hashlib
import io
import json
import math
import os
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image
from references.latent_fixtures import LATENT_SMALL  # tests/ is on sys.path (conftest)

from raphael_jax.data.real.buckets import (
    BUCKETS,
    BucketBatchPlan,
    nearest_bucket,
    resize_to_bucket,
    scaled_buckets,
)
from raphael_jax.data.real.captions import CaptionFilter, clean_caption

DIV = 16  # buckets / 16: 28x52 ... 52x28 pixels
SMALL = scaled_buckets(DIV)


# ------------------------------------------------------------------------------------------------ captions
@pytest.mark.parametrize("raw, want", [
    ("A <b>red</b> car at https://example.com/x?y=1 &amp; more", "A red car at & more"),
    ("tall tower, contact me.name+tag@example.co.uk now", "tall tower, contact now"),
    ("  a   square\n\twith  www.foo.com/bar spaces ", "a square with spaces"),
    ("<a href='http://x.y'>link text</a><br/>next line", "link text next line"),
    ("&lt;i&gt;escaped&lt;/i&gt; tags", "escaped tags"),
    ("mailto:bob@x.org ftp://files.x.org/a.zip HTTP://LOUD.COM", ""),
    ("3 < 5 and 7 > 2", "3 < 5 and 7 > 2"),  # not tags
    (b"bytes caption", "bytes caption"),
    (None, ""),
])
def test_clean_caption(raw, want):
    assert clean_caption(raw) == want


def test_caption_filter():
    f = CaptionFilter()  # aesthetic >= 4.7, watermark <= 0.5
    assert f.check("a cat", {}) == ("a cat", "ok")  # no columns: no filtering
    assert f.check("a cat", {"aesthetic": 4.7}) == ("a cat", "ok")
    assert f.check("a cat", {"AESTHETIC_SCORE": 4.69}) == (None, "low_aesthetic")
    assert f.check("a cat", {"pwatermark": 0.51}) == (None, "watermark")
    assert f.check("a cat", {"pwatermark": "0.5", "aesthetic": float("nan")}) == ("a cat", "ok")
    assert f.check("a cat", {"aesthetic": None, "pwatermark": ""}) == ("a cat", "ok")
    assert f.check("http://only.a.url", {}) == (None, "empty_caption")
    assert CaptionFilter(None, None).check("a cat", {"aesthetic": 1.0, "pwatermark": 1.0})[1] == "ok"
    a, w = CaptionFilter.scores({"Aesthetic": "5.5"})
    assert a == 5.5 and math.isnan(w)


# ------------------------------------------------------------------------------------------------ buckets
def test_nearest_bucket_hand_computed():
    # log-ratio rule; expectations computed by hand from the bucket ratios h/w:
    # 0.538 0.667 0.727 1 0.9 1.111 1.375 1.5 1.857
    cases = {
        (100, 200): 0,  # 0.5: |ln .5 - ln .538| = .074 < .288 (0.667)
        (70, 100): 2,   # 0.7: .038 to 0.727 vs .049 to 0.667
        (640, 640): 3, (90, 100): 4, (100, 90): 5,
        (100, 95): 3,   # 1.053: .051 to 1 vs .054 to 1.111
        (335, 200): 8,  # 1.675: log .103 to 1.857 vs .110 to 1.5 (linear distance would pick 1.5)
        (300, 100): 8, (30, 90): 0, (67, 40): 8, (60, 40): 7, (40, 60): 1, (129, 100): 6,
    }
    for (h, w), b in cases.items():
        assert nearest_bucket(h, w) == b, (h, w)
        assert nearest_bucket(h, w, SMALL) == b  # scaling keeps every ratio exactly
    assert SMALL[0] == (28, 52) and SMALL[3] == (40, 40) and SMALL[8] == (52, 28)
    assert scaled_buckets(8)[0] == (56, 104) and scaled_buckets(1) == BUCKETS
    with pytest.raises(ValueError):
        scaled_buckets(3)
    arr, b = resize_to_bucket(Image.new("RGBA", (50, 100), (255, 0, 0, 0)), SMALL)  # w=50, h=100: 2.0
    assert b == 8 and arr.shape == (52, 28, 3) and arr.dtype == np.uint8
    assert (arr == 255).all()  # transparent -> white background


def test_bucket_batch_plan():
    ids = np.array([0, 3, 3, 0, 8, 3, 0, 0, 3, 3, 0, 1])  # 5x bucket 0, 5x bucket 3, 1x 8, 1x 1
    plan = BucketBatchPlan(ids, batch_size=2, seed=1)
    assert plan.batches_per_epoch == 4 and plan.unused_buckets == [1, 8]
    seen = []
    for k in range(plan.batches_per_epoch):
        batch = plan[k]
        assert len(set(ids[batch])) == 1  # one bucket per batch
        seen += list(batch)
    assert len(set(seen)) == 8  # no repeats within an epoch
    assert [list(plan[k]) for k in range(8)] == [list(BucketBatchPlan(ids, 2, seed=1)[k]) for k in range(8)]
    assert any(list(plan[k]) != list(BucketBatchPlan(ids, 2, seed=2)[k]) for k in range(4))
    assert [list(plan[k]) for k in range(4)] != [list(plan[k]) for k in range(4, 8)]  # reshuffled epochs
    # two hosts: same bucket at each step, disjoint halves of one global batch
    h0, h1 = BucketBatchPlan(ids, 1, seed=1, shard_index=0, shard_count=2), BucketBatchPlan(ids, 1, 1, 1, 2)
    for k in range(8):
        assert ids[h0[k][0]] == ids[h1[k][0]] and h0[k][0] != h1[k][0]
        assert sorted([h0[k][0], h1[k][0]]) == sorted(plan[k])
    with pytest.raises(ValueError, match="no bucket"):
        BucketBatchPlan(ids, batch_size=6)


# ------------------------------------------------------------------------------------------------ tfds build
def _noise_image(h, w, seed, mode="RGB"):
    rs = np.random.RandomState(seed)
    a = rs.randint(0, 10, (h, w, 3))
    a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] += rs.randint(200, 246, 3)  # a bright box: clear edges
    im = Image.fromarray(a.astype(np.uint8))
    return im.convert(mode) if mode != "RGB" else im


def _save(im, path, fmt):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


# key -> (bucket, cleaned caption) of the examples that must survive
EXPECTED = {
    "0.0/wide.jpg": (0, "A red car at & more"),
    "0.0/tall.png": (8, "tall tower, contact now"),
    "0.0/square.png": (3, "a square with spaces"),
    "0.0/near.jpg": (4, "almost square"),
    "0.0/grey.jpg": (2, "a grey picture"),
    "0.0/sub/odd.png": (0, "very wide"),
    "1.0/a.png": (1, "good one"),
    "1.0/d.png": (7, "no scores at all"),
    "2.0/shard.tar/000": (0, "from txt"),
    "2.0/shard.tar/001": (3, "from json"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    photos, meta, shards = root / "photos", root / "meta", root / "shards"
    (photos / "sub").mkdir(parents=True)
    meta.mkdir()
    shards.mkdir()
    items = [  # name, (h, w), mode, format, caption
        ("wide.jpg", (40, 80), "RGB", "JPEG", "A <b>red</b> car at https://example.com/x?y=1 &amp; more"),
        ("tall.png", (67, 40), "RGB", "PNG", "tall tower, contact me.name+tag@example.co.uk now"),
        ("square.png", (50, 50), "RGBA", "PNG", "  a   square\n\twith  www.foo.com/bar spaces "),
        ("near.jpg", (45, 50), "RGB", "JPEG", "almost square"),
        ("grey.jpg", (35, 50), "L", "JPEG", "a grey picture"),
        ("sub/odd.png", (30, 90), "RGB", "PNG", "very wide"),
        ("urlonly.png", (30, 30), "RGB", "PNG", "http://spam.com <br/> info@spam.com"),
    ]
    for i, (name, (h, w), mode, fmt, cap) in enumerate(items):
        _save(_noise_image(h, w, i, mode), photos / name, fmt)
        (photos / name).with_suffix(".txt").write_text(cap)
    (photos / "broken.jpg").write_bytes(b"this is not an image")
    (photos / "broken.txt").write_text("a broken file")
    good = _save(_noise_image(40, 40, 9), photos / "tmp.jpg", "JPEG")
    (photos / "tmp.jpg").unlink()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "truncated.txt").write_text("a truncated file")
    _save(_noise_image(30, 30, 10), photos / "nocap.png", "PNG")  # no caption: skipped

    rows = [
        {"file_name": "a.png", "caption": "good one", "aesthetic": 5.0, "pwatermark": 0.1},
        {"file_name": "b.png", "caption": "too plain", "aesthetic": 4.0},
        {"file_name": "c.png", "caption": "stamped", "pwatermark": 0.9},
        {"file_name": "d.png", "caption": "no scores at all"},
        {"file_name": "e.png", "caption": "file is missing"},
    ]
    sizes = [("a.png", (40, 60)), ("b.png", (40, 40)), ("c.png", (40, 40)), ("d.png", (60, 40))]
    for i, (n, hw) in enumerate(sizes):
        _save(_noise_image(*hw, 20 + i), meta / n, "PNG")
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    with tarfile.open(shards / "shard.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for key, hw, fmt, ext, extra in [
            ("000", (40, 80), "JPEG", "jpg", {"txt": b"from txt"}),
            ("001", (50, 50), "PNG", "png",
             {"json": json.dumps({"caption": "from json", "AESTHETIC_SCORE": 6.1,
                                  "pwatermark": 0.2}).encode()}),
            ("002", (50, 50), "JPEG", "jpg",
             {"json": json.dumps({"caption": "ugly", "AESTHETIC_SCORE": 3.0}).encode()}),
        ]:
            buf = io.BytesIO()
            _noise_image(*hw, 30 + int(key)).save(buf, format=fmt)
            add(f"{key}.{ext}", buf.getvalue())
            for e, data in extra.items():
                add(f"{key}.{e}", data)
    return [str(photos), str(meta), str(shards / "shard.tar")]


def _tree_digest(paths):
    out = {}
    for p in paths:
        files = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
        for f in files:
            st = os.stat(f)
            out[f] = (st.st_size, st.st_mtime_ns, hashlib.sha1(open(f, "rb").read()).hexdigest())
    return out


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    from raphael_jax.data.real.builder import build_image_text_dataset

    before = _tree_digest(sources)
    data_dir = tmp_path_factory.mktemp("tfds")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        builder = build_image_text_dataset(data_dir, sources, name="test", scale_divisor=DIV)
    assert _tree_digest(sources) == before  # the sources are never modified
    return builder, [str(w.message) for w in caught]


def test_build_filters_cleans_and_buckets(built):
    from raphael_jax.data.real.pipeline import load_image_text
    from raphael_jax.data.real.sources import decode_edges, decode_image

    builder, messages = built
    assert any("skipped 2 unreadable" in m for m in messages), messages
    src = load_image_text(builder.data_dir)
    meta = src.metadata
    assert meta["stats"] == {"kept": 10, "unreadable": 2, "no_caption": 1, "missing_file": 1,
                             "empty_caption": 1, "low_aesthetic": 2, "watermark": 1}
    assert len(src) == 10
    got = {}
    for i in range(len(src)):
        r = src.raw(i)
        key = r["key"].decode()
        h, w = int(r["height"]), int(r["width"])
        assert (h, w) == SMALL[int(r["bucket"])]
        assert int(r["bucket"]) == src.bucket_ids[i]  # the metadata index matches the records
        img = decode_image(r["image"], h, w)
        edges = decode_edges(r["edges"])
        assert img.shape == (h, w, 3) and edges.shape == (h, w)
        assert set(np.unique(edges)) <= {0.0, 1.0} and edges.sum() > 0  # Canny of the box
        got[key] = (int(r["bucket"]), r["caption"].decode())
    assert got == EXPECTED
    r = src.raw([k for k in range(10) if src.raw(k)["key"] == b"2.0/shard.tar/001"][0])
    assert r["aesthetic"] == pytest.approx(6.1) and r["watermark"] == pytest.approx(0.2)
    assert int(r["orig_height"]) == 50
    assert np.isnan(src.raw(0)["aesthetic"])
    ex = src[0]
    assert ex["image"].dtype == np.uint8 and isinstance(ex["caption"], str)
    assert ex["edges"].dtype == np.float32


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny byte-level CLIP BPE vocabulary (as in test_clip_port)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = ["a </w>", "t h", "th e</w>", "o n", "on e</w>", "r e", "re d</w>"]
    vocab = chars + [c + "</w>" for c in chars]
    for m in merges:
        if m.replace(" ", "") not in vocab:
            vocab.append(m.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    d = tmp_path_factory.mktemp("clip")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return d


def test_image_text_batches_per_bucket_and_resume(built, tok_dir):
    from raphael_jax.data.real.clip_tokenizer import load_clip_tokenizer
    from raphael_jax.data.real.pipeline import make_image_text_iterator

    builder, _ = built
    tok = load_clip_tokenizer(tok_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # buckets with a single example are never served
        kw = dict(tokenizer=tok, seed=0, include_captions=True)
        it = make_image_text_iterator(builder.data_dir, batch_size=2, **kw)
        batches = [next(it) for _ in range(4)]
        state = it.get_state()
        nxt = next(it)
        it2 = make_image_text_iterator(builder.data_dir, batch_size=2, **kw)
        it2.set_state(state)
        again = next(it2)
        # host 1 of 2 gets the other half of the same global batches
        h1 = make_image_text_iterator(builder.data_dir, batch_size=1, tokenizer=tok, seed=0, shard_index=1,
                                      shard_count=2, include_captions=True)
        h0 = make_image_text_iterator(builder.data_dir, batch_size=1, tokenizer=tok, seed=0, shard_index=0,
                                      shard_count=2, include_captions=True)
    for b in batches:
        bucket = int(b["bucket"][0])
        assert (b["bucket"] == bucket).all() and bucket in (0, 3)  # the only buckets with >= 2 examples
        assert b["image"].shape == (2, *SMALL[bucket], 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["edges"].shape == (2, *SMALL[bucket])
        assert b["tokens"].shape == (2, 77) and b["mask"].dtype == bool
        assert (b["tokens"][:, 0] == tok.bos_id).all()
    for k in nxt:
        if k == "caption":
            assert nxt[k] == again[k]
        else:
            np.testing.assert_array_equal(nxt[k], again[k])
    for _ in range(3):
        a, c = next(h0), next(h1)
        assert a["image"].shape == c["image"].shape and a["caption"] != c["caption"]


# ------------------------------------------------------------------------------------------------ precompute
@pytest.fixture(scope="module")
def weights(tok_dir, tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    vae_dir = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(vae_dir, safe_serialization=True)
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      hidden_act="gelu", eos_token_id=vocab["<|endoftext|>"],
                                      bos_token_id=vocab["<|startoftext|>"])
    clip = transformers.CLIPTextModel(cfg).eval()
    clip_dir = tmp_path_factory.mktemp("clipw")
    clip.save_pretrained(clip_dir, safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):
        (clip_dir / f).write_text((tok_dir / f).read_text())
    return str(vae_dir), str(clip_dir)


@pytest.fixture(scope="module")
def latents(built, weights, tmp_path_factory):
    from raphael_jax.tools.precompute import Encoders, precompute

    builder, _ = built
    vae_dir, clip_dir = weights
    enc = Encoders(vae_dir, clip_dir, latent="mean", text_layer="last")
    one = tmp_path_factory.mktemp("latents1")
    two = tmp_path_factory.mktemp("latents2")
    precompute(builder.data_dir, vae_dir, clip_dir, one, batch_size=2, host_index=0, host_count=1,
               encoders=enc, verbose=False)
    for h in (1, 0):  # hosts in any order
        precompute(builder.data_dir, vae_dir, clip_dir, two, batch_size=2, host_index=h, host_count=2,
                   encoders=enc, verbose=False)
    return str(one), str(two), enc


def test_precompute_records_and_reader(latents, built):
    from raphael_jax.data.latents import LatentsSource
    from raphael_jax.data.real.pipeline import load_image_text
    from raphael_jax.tools.precompute import precompute

    one, two, enc = latents
    builder, _ = built
    src = LatentsSource(one)
    assert len(src) == 10 and src.meta["latent_channels"] == 4 and src.meta["vae_factor"] == 2
    assert src.meta["text_width"] == 32 and src.meta["text_layer"] == "last"
    images = load_image_text(builder.data_dir)
    for i in range(len(src)):
        r = src[i]
        h, w = SMALL[r["bucket"]]
        assert r["latents"].shape == (h // 2, w // 2, 4) and r["latents"].dtype == np.float32
        assert r["text_states"].shape == (77, 32) and r["mask"].shape == (77,) and r["mask"].dtype == bool
        assert r["edges"].shape == (h // 2, w // 2) and r["edges"].max() == 1.0
        assert int(src.bucket_ids[i]) == r["bucket"]
        ex = images[r["index"]]
        assert ex["caption"] == r["caption"] and ex["key"] == r["key"]
    # the stored values are the encoders' outputs for that example (first record checked fully)
    r = src[0]
    ex = images[r["index"]]
    want = enc.images(ex["image"][None], np.array([r["index"]]))[0]
    np.testing.assert_allclose(r["latents"], want, atol=1e-5)
    states, mask, _ = enc.text([r["caption"]])
    np.testing.assert_allclose(r["text_states"], states[0], atol=1e-5)
    np.testing.assert_array_equal(r["mask"], mask[0])
    null, null_mask, _ = enc.text([""])
    np.testing.assert_allclose(src.null_text_states, null[0], atol=1e-6)
    assert src.null_mask.sum() == 2  # SOT, EOT
    # two hosts wrote disjoint halves whose union is the single-host result
    src2 = LatentsSource(two)
    by_index = {src[i]["index"]: src[i] for i in range(len(src))}
    assert sorted(src2[i]["index"] for i in range(len(src2))) == sorted(by_index)
    for i in range(len(src2)):
        r2 = src2[i]
        np.testing.assert_allclose(r2["latents"], by_index[r2["index"]]["latents"], atol=1e-5)
    done = [f for f in os.listdir(two) if f.startswith("done-")]
    assert sorted(done) == ["done-00000-of-00002.json", "done-00001-of-00002.json"]
    # a finished host is skipped on re-run
    assert precompute(builder.data_dir, "unused", "unused", two, host_index=0, host_count=2,
                      verbose=False)["host_count"] == 2


def test_command_lines(sources, weights, tmp_path, capsys):
    """raphael-data image-text and raphael-precompute --config (dirs from data.*)."""
    from raphael_jax.cli import data as data_cli
    from raphael_jax.cli import precompute
    from raphael_jax.data.latents import LatentsSource
    from raphael_jax.data.real.pipeline import load_image_text

    tar = sources[2]
    assert data_cli.main(["image-text", tar, "--data-dir", str(tmp_path / "tfds"), "--name", "cli",
                          "--scale-divisor", "16", "--image-format", "jpeg", "--edge-source", "none"]) == 0
    assert "'kept': 2" in capsys.readouterr().out
    build = tmp_path / "tfds" / "image_text" / "cli" / "1.0.0"
    src = load_image_text(tmp_path / "tfds")  # the only build below: found
    assert len(src) == 2 and "edges" not in src[0] and src[0]["image"].shape == (28, 52, 3)
    vae_dir, clip_dir = weights
    out = tmp_path / "lat"
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "small_latent.py")
    assert precompute.main(["--config", config, "--set", f"data.tfds_dir={build}", "--set", f"data.vae_dir={vae_dir}",
                            "--set", f"data.clip_dir={clip_dir}", "--set", f"data.latents_dir={out}",
                            "--text-layer", "penultimate", "--latent", "sample", "--store-dtype", "float16",
                            "--host-index", "0", "--host-count", "1", "--batch-size", "2"]) == 0
    lat = LatentsSource(out)
    assert len(lat) == 2 and lat.meta["text_layer"] == "penultimate" and lat.meta["latent"] == "sample"
    assert lat[0]["edges"].max() == 0.0  # built without edges
    import msgpack  # records are msgpack + .npy, readable without raphael_jax
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    rec = msgpack.unpackb(ArrayRecordDataSource(lat._paths)[0], raw=False)
    assert np.load(io.BytesIO(rec["arrays"]["latents"]), allow_pickle=False).dtype == np.float16


def test_latents_iterator(latents):
    from raphael_jax.data.latents import make_latents_iterator

    one, _, _ = latents
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = make_latents_iterator(one, batch_size=2, seed=0, expect_text_width=32, expect_latent_channels=4)
        with pytest.raises(ValueError, match="context_dim"):
            make_latents_iterator(one, batch_size=2, expect_text_width=1024)
    state = it.get_state()
    first = next(it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = make_latents_iterator(one, batch_size=2, seed=0)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["image"], first["image"])  # resumes exactly
    for _ in range(3):
        b = next(it)
        assert set(b) == {"image", "text_states", "mask", "edges", "null_text_states", "null_mask"}
        assert b["image"].shape[0] == 2 and b["image"].shape[-1] == 4 and b["image"].dtype == np.float32
        assert b["image"].shape[1:3] in ((14, 26), (20, 20))  # buckets 0 and 3 at /16, VAE factor 2
        assert b["edges"].shape == b["image"].shape[:3] and b["text_states"].shape == (2, 77, 32)
        assert b["mask"].dtype == bool and b["null_text_states"].shape == (2, 77, 32)


def test_caption_dropout_uses_null_states():
    """compute_losses with external text states: a dropped sample gets the stored null states and mask."""
    import jax
    from flax import nnx

    from raphael_jax.config import load_config
    from raphael_jax.diffusion.schedule import NoiseSchedule
    from raphael_jax.train.step import compute_losses

    seen = {}

    class Probe(nnx.Module):  # stands in for the model: records what the U-Net would be given
        def unet(self, x_t, t, context, mask, **kw):
            seen["context"], seen["mask"] = np.asarray(context), np.asarray(mask)
            return x_t

    rs = np.random.RandomState(0)
    n = 16
    b = {"image": rs.randn(n, 4, 4, 4).astype(np.float32), "edges": np.zeros((n, 4, 4), np.float32),
         "text_states": rs.randn(n, 77, 8).astype(np.float32), "mask": rs.rand(n, 77) < 0.5,
         "null_text_states": np.broadcast_to(rs.randn(77, 8).astype(np.float32), (n, 77, 8)),
         "null_mask": np.broadcast_to(np.arange(77) < 2, (n, 77))}
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "small_latent.py")

    def run(p, batch):
        cfg = load_config(config, [f"train.caption_dropout={p}", "model.edge.enabled=False"])
        sched = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        loss, _ = compute_losses(Probe(), cfg, sched, batch, jax.random.key(3))
        assert np.isfinite(float(loss))
        ctx, mask = seen["context"], seen["mask"]
        own = [np.array_equal(ctx[i], batch["text_states"][i]) and np.array_equal(mask[i], batch["mask"][i])
               for i in range(n)]
        null = [np.array_equal(ctx[i], b["null_text_states"][i]) and np.array_equal(mask[i], b["null_mask"][i])
                for i in range(n)]
        return np.array(own), np.array(null)

    own, null = run(0.5, b)
    assert (own ^ null).all() and 0 < null.sum() < n  # every row is its own or the null, both occur
    assert run(1.0, b)[1].all() and run(0.0, b)[0].all()
    plain = {k: b[k] for k in ("image", "edges", "text_states", "mask")}
    assert run(1.0, plain)[0].all()  # without stored null states there is no dropout


def test_train_on_precomputed_latents(latents, tmp_path):
    from raphael_jax.config import load_config
    from raphael_jax.train.loop import train_and_evaluate

    one, _, _ = latents
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "small_latent.py"),
                      LATENT_SMALL + [f"data.latents_dir={one}", "train.sample_every=0"])
    assert cfg.text.kind == "external" and cfg.model.in_channels == 4
    work = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = train_and_evaluate(cfg, work, num_steps=4)
    assert int(state["step"]) == 4
    lines = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in lines)
    assert not os.path.exists(os.path.join(work, "tokenizer.model"))  # no shapes tokenizer for latents
    from raphael_jax.train.checkpoint import RunCheckpoints

    ck = RunCheckpoints(work, async_save=False)
    assert ck.latest_step() == 4
    assert json.load(open(os.path.join(ck.directory, "4", "data", "metadata")))  # the latents position
    ck.close()
