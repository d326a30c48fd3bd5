"""Tokenizer, grain pipeline (checkpointable, sharded) and the tfds array_record builder."""

import json
import warnings

import numpy as np
import pytest

from raphael_jax.data.edges import canny
from raphael_jax.data.shapes import pipeline as P
from raphael_jax.data.shapes import world as S
from raphael_jax.data.shapes.tokenizer import Tokenizer, eot_index

MAX_LEN = S.max_caption_words(3) + 1


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_on_world()


# -------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_layout_and_encode(tok):
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == len(S.all_words()) + 3
    caps = ["a big red circle at the top left and a small blue square in the center",
            "a small white triangle at the bottom"]
    ids, mask = tok.encode(caps, MAX_LEN)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (2, MAX_LEN)
    n = [len(c.split()) + 1 for c in caps]  # word-level: one token per word, plus EOS
    assert list(mask.sum(1)) == n and list(eot_index(mask)) == [k - 1 for k in n]
    assert ids[0, n[0] - 1] == tok.eos_id and (ids[0, n[0]:] == 0).all()
    assert not (ids[mask] == tok.unk_id).any() and not (ids[mask] == tok.pad_id).any()
    assert tok.decode(ids) == caps
    assert np.array_equal(tok.encode([caps[1].upper()], MAX_LEN)[0], tok.encode([caps[1]], MAX_LEN)[0])
    assert tok.encode(["a purple dog"], 8)[0][0, 2] == tok.unk_id
    with pytest.raises(ValueError, match="single str"):
        tok.encode(caps[0], MAX_LEN)


def test_tokenizer_covers_every_caption(tok):
    rng = np.random.default_rng(9)
    caps = [S.make_caption(S.sample_objects(rng, 1, 3)) for _ in range(300)]
    ids, mask = tok.encode(caps, MAX_LEN)
    assert not (ids == tok.unk_id).any() and mask.sum(1).max() <= MAX_LEN


def test_tokenizer_truncation_warns(tok):
    cap = "a big red circle at the top left and a small blue square at the bottom"
    with pytest.warns(UserWarning, match="a big red circle at the top left and a small"):
        ids, mask = tok.encode([cap], 5)
    assert mask.all() and ids[0, -1] == tok.eos_id and eot_index(mask)[0] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode([cap], MAX_LEN)


def test_tokenizer_names_unknown_words(tok):
    with pytest.warns(UserWarning, match=r"outside the vocabulary, encoded as <unk>: 'dragon', 'zq'"):
        ids, mask = tok.encode(["a purple dragon zq"], MAX_LEN)
    assert (ids[0][mask[0]] == tok.unk_id).any()  # still encoded (as <unk>), and reported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(["a purple circle", ""], MAX_LEN)  # known words, and the empty (unconditional) prompt


def test_tokenizer_deterministic_save_load(tok, tmp_path):
    again = Tokenizer.train_on_world()
    assert again.model_proto == tok.model_proto
    caps = [S.example(0, i)["caption"] for i in range(20)]
    path = tmp_path / "sub" / "shapes.model"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert np.array_equal(loaded.encode(caps, MAX_LEN)[0], tok.encode(caps, MAX_LEN)[0])
    with pytest.raises(FileNotFoundError, match="no tokenizer model"):
        Tokenizer.load(tmp_path / "missing.model")
    uni = Tokenizer.train_on_world(model_type="unigram")
    ids, mask = uni.encode(caps, 128)  # sub-word pieces: longer than word-level
    assert mask.sum(1).max() > MAX_LEN
    assert not (ids == uni.unk_id).any()
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        Tokenizer.train_on_world(vocab_size=500)


# --------------------------------------------------------------------------------------- pipeline

def test_source_random_access():
    src = P.ShapesWorldSource(seed=3, image_size=32, size=100)
    assert len(src) == 100
    ex = src[42]
    ref = S.example(3, 42, 32)
    assert np.array_equal(ex["image"], ref["image"]) and ex["caption"] == ref["caption"]
    with pytest.raises(IndexError):
        src[100]
    with pytest.raises(ValueError, match="min_objects"):
        P.ShapesWorldSource(min_objects=2, max_objects=1)


def _it(tok, **kw):
    args = dict(seed=0, image_size=32, min_objects=1, max_objects=3, batch_size=4, tokenizer=tok,
                max_len=MAX_LEN, num_threads=0)
    args.update(kw)
    return P.make_train_iterator(**args)


def test_batches_match_generator(tok):
    it = _it(tok, include_captions=True)
    b = next(it)
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["tokens"].shape == (4, MAX_LEN) and b["tokens"].dtype == np.int32 and b["mask"].dtype == bool
    assert b["edges"].shape == (4, 32, 32) and b["edges"].dtype == np.float32
    assert set(np.unique(b["edges"])) <= {0.0, 1.0} and b["image"].min() >= -1 and b["image"].max() <= 1
    b2 = next(it)
    ex = S.example(0, 6, 32)  # second batch, third element
    assert np.array_equal(b2["image"][2], ex["image"].astype(np.float32) / 127.5 - 1.0)
    assert np.array_equal(b2["edges"][2], canny(ex["image"]))
    assert np.array_equal(b2["tokens"][2], tok.encode([ex["caption"]], MAX_LEN)[0][0])
    assert b2["caption"][2] == ex["caption"]


def test_iterator_state_round_trip(tok):
    it = _it(tok, num_threads=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # JSON-able, as stored next to checkpoints
    expected = [next(it) for _ in range(3)]
    resumed = _it(tok, num_threads=2)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(3)]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_shards_are_disjoint(tok):
    shards = [_it(tok, shard_index=i, shard_count=3, include_captions=True, edge_source=None)
              for i in range(3)]
    seen = []
    for i, it in enumerate(shards):
        b = next(it)
        assert "edges" not in b
        imgs = [x.tobytes() for x in b["image"]]
        seen.append(set(imgs))
        for j in range(4):  # shard i holds stream indices i, i + 3, i + 6, ...
            assert b["caption"][j] == S.example(0, i + 3 * j, 32)["caption"]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(ValueError, match="shard_index"):
        _it(tok, shard_index=3, shard_count=3)


def test_object_weights_and_bad_edge_source(tok):
    b = next(_it(tok, object_weights=(0, 0, 1), batch_size=8, edge_source=None))
    n_and = (b["tokens"] == tok.encode(["and"], 2)[0][0, 0]).sum(1)
    assert (n_and == 2).all()  # three objects -> two "and"s
    with pytest.raises(ValueError, match="unknown edge source"):
        _it(tok, edge_source="hed")


# ------------------------------------------------------------------------------------------- tfds

def test_tfds_build_and_read_back(tok, tmp_path):
    from raphael_jax.data.shapes import tfds as T

    with pytest.raises(FileNotFoundError, match="build_shapes_dataset"):
        T.load_shapes_split(tmp_path, "train", image_size=32, num_train=12, num_test=4)
    builder = T.build_shapes_dataset(tmp_path, image_size=32, num_train=12, num_test=4, seed=2)
    assert builder.info.splits["train"].num_examples == 12 and builder.info.splits["test"].num_examples == 4
    kw = dict(image_size=32, num_train=12, num_test=4, seed=2)
    train, test = T.load_shapes_split(tmp_path, "train", **kw), T.load_shapes_split(tmp_path, "test", **kw)
    for i in range(12):
        ref = S.example(2, i, 32)
        assert np.array_equal(train[i]["image"], ref["image"]) and train[i]["caption"] == ref["caption"]
        assert train[i]["index"] == i
    for i in range(4):
        assert np.array_equal(test[i]["image"], S.example(2, i, 32, stream=1)["image"])
    with pytest.raises(ValueError, match="unknown split"):
        T.load_shapes_split(tmp_path, "validation", **kw)
    # grain reads the stored split into the same batches as the on-the-fly pipeline.
    stored = next(iter(P.shapes_dataset(train, 4, tok, MAX_LEN)))
    live = next(P.make_train_iterator(2, 32, 1, 3, 4, tok, MAX_LEN, num_threads=0))
    for k in live:
        np.testing.assert_array_equal(stored[k], live[k])
    # Rebuilding is a no-op.
    T.build_shapes_dataset(tmp_path, image_size=32, num_train=12, num_test=4, seed=2)
