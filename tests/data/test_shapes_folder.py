"""The shapes world as a LAION-style folder through the real image-text path: the folder writer, custom
bucket lists in the image_text build and ``raphael-data``, the one-token-per-word CLIP vocabulary and
the random CLIP text tower (raphael_jax/data/shapes/folder.py, clip_vocab.py, raphael_jax/tools/tiny_clip.py)."""

import hashlib
import json
import os
import warnings

import numpy as np
import pytest

from raphael_jax.data.shapes.world import ShapeObject, all_words, example

SIZE, NUM, SEED = 32, 12, 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from raphael_jax.data.shapes.folder import write_shapes_folder

    out = tmp_path_factory.mktemp("shapes") / "laion"
    info = write_shapes_folder(out, NUM, image_size=SIZE, seed=SEED, min_objects=1, max_objects=3)
    return out, info


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    from raphael_jax.data.real.builder import build_image_text_dataset

    out, _ = folder
    data_dir = tmp_path_factory.mktemp("tfds")
    # default filters (aesthetic >= 4.7, watermark <= 0.5): rows without scores must all pass
    builder = build_image_text_dataset(data_dir, out, buckets=[(SIZE, SIZE)])
    return builder


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    from raphael_jax.data.shapes.clip_vocab import write_clip_vocab

    return write_clip_vocab(tmp_path_factory.mktemp("vocab"))


def _tree(root):
    return {p: hashlib.sha1((root / p).read_bytes()).hexdigest() for p in sorted(os.listdir(root))}


# ------------------------------------------------------------------------------------------------ folder
def test_folder_layout_and_determinism(folder, tmp_path):
    from PIL import Image

    from raphael_jax.data.shapes.folder import write_shapes_folder

    out, info = folder
    assert info["num"] == NUM and info["image_size"] == SIZE and info["stream"] == 0
    names = sorted(os.listdir(out))
    assert names == sorted([f"{i:06d}.png" for i in range(NUM)] + [f"{i:06d}.txt" for i in range(NUM)]
                           + ["metadata.jsonl"])
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == NUM
    for i, row in enumerate(rows):
        ex = example(SEED, i, image_size=SIZE, min_objects=1, max_objects=3)
        assert row["file_name"] == f"{i:06d}.png" and row["caption"] == ex["caption"]
        assert (out / f"{i:06d}.txt").read_text() == ex["caption"]
        assert [ShapeObject(**o) for o in row["objects"]] == ex["objects"]
        assert (row["seed"], row["stream"], row["index"]) == (SEED, 0, i)
        with Image.open(out / row["file_name"]) as im:
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), ex["image"])
    assert {len(r["objects"]) for r in rows} == {1, 2, 3}
    again = tmp_path / "again"
    write_shapes_folder(again, NUM, image_size=SIZE, seed=SEED, min_objects=1, max_objects=3)
    assert _tree(again) == _tree(out)  # byte-identical
    before = _tree(out)
    with pytest.raises(ValueError, match="not an empty directory"):
        write_shapes_folder(out, 2, image_size=SIZE)
    assert _tree(out) == before  # nothing overwritten
    for bad in (dict(num=0), dict(num=2, image_size=16), dict(num=2, min_objects=2, max_objects=1)):
        with pytest.raises(ValueError):
            write_shapes_folder(tmp_path / "bad", **bad)


def test_folder_round_trips_through_the_build(built, folder):
    from raphael_jax.data.real.pipeline import load_image_text

    out, _ = folder
    with open(os.path.join(built.data_dir, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["stats"] == {"kept": NUM, "unreadable": 0, "no_caption": 0, "missing_file": 0,
                             "empty_caption": 0, "low_aesthetic": 0, "watermark": 0}
    assert meta["buckets"] == [[SIZE, SIZE]] and meta["bucket_counts"] == {"0": NUM}
    assert meta["bucket_ids"] == "0" * NUM and meta["scale_divisor"] == 1
    assert built.builder_config.name.startswith(f"laion_b{SIZE}x{SIZE}_")
    src = load_image_text(built.data_dir)
    assert len(src) == NUM
    for i in range(NUM):
        ex, want = src[i], example(SEED, i, image_size=SIZE, min_objects=1, max_objects=3)
        assert ex["key"] == f"0.0/{i:06d}.png" and ex["bucket"] == 0
        assert ex["caption"] == want["caption"]
        np.testing.assert_array_equal(ex["image"], want["image"])  # stored unresized, lossless
        assert ex["edges"].shape == (SIZE, SIZE)


class _StubEncoders:
    """Stands in for tools.precompute.Encoders (no weights, no jit): latents = 2x2-mean-pooled pixels."""

    dirs, latent, seed, factor, text_layer, max_len, text_width = ("vae", "clip", None), "mean", 0, 2, "last", 8, 4
    vae_cfg = type("Cfg", (), {"latent_channels": 3, "scaling_factor": 1.0, "shift_factor": 0.0})

    def images(self, images, indices):
        x = images.astype(np.float32)
        return (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4

    def text(self, captions):
        n = len(captions)
        return np.zeros((n, 8, 4), np.float32), np.ones((n, 8), bool), np.zeros((n, 8), np.int32)


def test_precompute_reads_custom_buckets(built, tmp_path):
    """tools/precompute.py takes the pixel sizes from the build's metadata["buckets"], unchanged."""
    from raphael_jax.data.latents import LatentsSource
    from raphael_jax.tools.precompute import precompute

    out = tmp_path / "lat"
    precompute(built.data_dir, "vae", "clip", out, batch_size=4, host_index=0, host_count=1,
               encoders=_StubEncoders(), verbose=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["buckets"] == {"0": {"image_hw": [SIZE, SIZE], "latent_hw": [SIZE // 2, SIZE // 2]}}
    assert os.listdir(out / f"b0_{SIZE}x{SIZE}")
    lat = LatentsSource(out)
    assert len(lat) == NUM and lat[0]["latents"].shape == (SIZE // 2, SIZE // 2, 3)


# ------------------------------------------------------------------------------------------------ buckets
def test_custom_bucket_validation(folder):
    from raphael_jax.data.real.buckets import check_buckets, nearest_bucket
    from raphael_jax.data.real.builder import make_config

    out, _ = folder
    assert check_buckets([[64, 64], (32, np.int64(64))]) == ((64, 64), (32, 64))
    for bad, msg in [([], "at least one"), ([(0, 32)], "positive ints"), ([(32,)], "positive ints"),
                     ([(32.0, 32)], "positive ints"), ([(True, 32)], "positive ints"), ("64x64", "list"),
                     ([(32, 32), (32, 32)], "unique"), (5, "list"),
                     ([(8 * (i + 1), 8) for i in range(11)], "at most 10")]:
        with pytest.raises(ValueError, match=msg):
            check_buckets(bad)
        with pytest.raises(ValueError):
            make_config(out, buckets=bad)
    with pytest.raises(ValueError, match="not both"):
        make_config(out, buckets=[(32, 32)], scale_divisor=2)
    # the nearest-bucket rule applies to a custom list: square to 0, wide to 1
    assert nearest_bucket(30, 30, ((32, 32), (32, 64))) == 0 and nearest_bucket(30, 70, ((32, 32), (32, 64))) == 1
    # names and settings hashes: custom lists differ, the nine-bucket name is what it was before
    a, b = make_config(out, buckets=[(32, 32)]), make_config(out, buckets=[(64, 64)])
    assert a.name != b.name and a.buckets == ((32, 32),) and a.name.startswith("laion_b32x32_")
    assert make_config(out, buckets=[(8 * (i + 1), 8) for i in range(4)]).name.startswith("laion_b4_")
    plain = make_config(out, scale_divisor=16)
    old = dict(sources=(os.path.abspath(out),), scale_divisor=16, min_aesthetic=4.7, max_watermark=0.5,
               edge_source="canny", image_format="png", jpeg_quality=95)
    digest = hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:8]
    assert plain.name == f"laion_d16_{digest}" and plain.buckets is None


def test_command_lines(tmp_path, capsys):
    from raphael_jax.cli import data as data_cli

    assert data_cli.parse_buckets("64x64") == ((64, 64),)
    assert data_cli.parse_buckets("32x64, 64X32") == ((32, 64), (64, 32))
    src = tmp_path / "shapes"
    assert data_cli.main(["shapes-folder", str(src), "--num", "3", "--image-size", "32", "--max-objects", "2"]) == 0
    assert len(os.listdir(src)) == 7
    capsys.readouterr()
    tfds_dir = str(tmp_path / "tfds")
    for bad in (["--buckets", "64x"], ["--buckets", "0x64"], ["--buckets", "64x64,64x64"], ["--buckets", ""],
                ["--buckets", "32x32", "--scale-divisor", "2"]):
        with pytest.raises(SystemExit) as e:
            data_cli.main(["image-text", str(src), "--data-dir", tfds_dir, *bad])
        assert e.value.code == 2, bad
    with pytest.raises(SystemExit) as e:  # refuses a non-empty folder
        data_cli.main(["shapes-folder", str(src), "--num", "3"])
    assert e.value.code == 2
    assert data_cli.main(["image-text", str(src), "--data-dir", tfds_dir, "--name", "cli", "--buckets", "32x32",
                          "--edge-source", "none"]) == 0
    printed = capsys.readouterr().out
    assert "'kept': 3" in printed and "{'0': 3}" in printed


# ------------------------------------------------------------------------------------------------ CLIP
def test_vocab_one_token_per_word(vocab_dir, tmp_path):
    from raphael_jax.data.real.clip_tokenizer import load_clip_tokenizer
    from raphael_jax.data.shapes.clip_vocab import write_clip_vocab

    tok = load_clip_tokenizer(vocab_dir)
    vocab = json.loads((vocab_dir / "vocab.json").read_text())
    assert tok.vocab_size == len(vocab) and tok.bos_id == vocab["<|startoftext|>"]
    for w in all_words():
        ids, mask = tok.encode(w)
        assert list(ids[0, :3]) == [tok.bos_id, vocab[w + "</w>"], tok.eos_id] and mask.sum() == 3
    for i in range(100):
        caption = example(0, i, min_objects=1, max_objects=3)["caption"]
        ids, mask = tok.encode(caption)
        want = [tok.bos_id] + [vocab[w + "</w>"] for w in caption.split()] + [tok.eos_id]
        assert list(ids[0, :len(want)]) == want and int(mask.sum()) == len(want)
    ids, _ = tok.encode("a zebra")  # other words still tokenize (into smaller pieces)
    assert ids[0, 1] == vocab["a</w>"] and ids[0, 2] != tok.eos_id
    with pytest.raises(ValueError, match="exists"):
        write_clip_vocab(vocab_dir)
    with pytest.raises(ValueError, match="lowercase"):
        write_clip_vocab(tmp_path / "v", ["Red"])
    small = write_clip_vocab(tmp_path / "v2", ["red", "redder", "reddish"])
    t2 = load_clip_tokenizer(small)
    v2 = json.loads((small / "vocab.json").read_text())
    assert list(t2.encode("reddish red redder")[0][0, 1:4]) == [v2["reddish</w>"], v2["red</w>"], v2["redder</w>"]]


def test_random_clip_loads_in_jax(vocab_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from raphael_jax.data.real.clip_tokenizer import load_clip_tokenizer
    from raphael_jax.tools.precompute import load_clip
    from raphael_jax.tools.tiny_clip import write_random_clip

    d = write_random_clip(tmp_path / "clip", vocab_dir, hidden_size=32, num_layers=2, num_heads=4,
                          intermediate_size=64, seed=1)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(d))
    with pytest.raises(ValueError, match="not an empty directory"):
        write_random_clip(d, vocab_dir)
    tok = load_clip_tokenizer(d)
    ids, _ = tok.encode(example(0, 5, max_objects=3)["caption"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, cfg = load_clip(d)
        ref = transformers.CLIPTextModel.from_pretrained(str(d), local_files_only=True).eval()
    assert cfg.vocab_size == tok.vocab_size and cfg.hidden_size == 32
    got = np.asarray(model(ids).last_hidden_state)
    with torch.no_grad():
        want = ref(torch.as_tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
    assert got.shape == (1, 77, 32)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # the same arguments give the same weights
    again = write_random_clip(tmp_path / "clip2", vocab_dir, hidden_size=32, num_layers=2, num_heads=4,
                              intermediate_size=64, seed=1)
    assert (again / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
