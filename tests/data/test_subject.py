"""The new kind (ring), the analyzer's ring rule, the fine-tuning subject set and its unseen-context prompts."""
import warnings

import numpy as np
import pytest

from raphael_jax.config import load_config
from raphael_jax.data.shapes import analyzer
from raphael_jax.data.shapes.subject import SubjectSource, subject_objects, unseen_prompts
from raphael_jax.data.shapes.world import (
    ALL_KINDS,
    COLOURS,
    KINDS,
    PLACES,
    SIZES,
    ShapeObject,
    all_words,
    make_caption,
    parse_caption,
    render,
    sample_objects,
    shape_mask,
)


def test_ring_is_new_and_the_base_world_is_unchanged():
    assert "ring" in ALL_KINDS and "ring" not in KINDS and "ring" not in all_words()  # the tokenizer never sees it
    rng = np.random.default_rng(0)
    assert all(o.kind in KINDS for _ in range(200) for o in sample_objects(rng, 1, 3))
    m = shape_mask("ring", 9)
    assert not m[4, 4] and m[0, 4] and m.sum() < shape_mask("circle", 9).sum()
    assert parse_caption("a big red ring at the top") == [ShapeObject("red", "ring", "big", "top")]
    assert make_caption([ShapeObject("red", "ring", "big", "top")], places=False) == "a big red ring"


@pytest.mark.parametrize("size", SIZES)
def test_analyzer_scores_rings_only_among_all_kinds(size):
    rng = np.random.default_rng(1)
    for colour in COLOURS:
        for place in PLACES:
            ring = ShapeObject(colour, "ring", size, place)
            img = render([ring], 32, rng)
            assert all(analyzer.analyze(img, [ring], kinds=ALL_KINDS)[0].values())
            # the base analyzer (KINDS) has no ring: it calls it something else
            assert not analyzer.analyze(img, [ring])[0]["kind"]
            for kind in KINDS:  # and the ring rule does not take the old kinds for rings
                obj = ShapeObject(colour, kind, size, place)
                assert analyzer.analyze(render([obj], 32, rng), [obj], kinds=ALL_KINDS)[0]["kind"], obj
    with pytest.raises(ValueError, match="kinds must hold"):
        analyzer.analyze(img, [ring], kinds=("ring",))


def test_subject_set_is_narrow_fixed_and_reshuffled():
    sj = load_config("configs/tiny_ring.py").data.subject
    objs = subject_objects(sj, 0)
    assert len(objs) == 32 and {o.kind for o in objs} == {"ring"}
    assert {o.colour for o in objs} <= set(sj.colours) and {o.place for o in objs} <= set(sj.places)
    assert {o.size for o in objs} == set(sj.sizes)
    src = SubjectSource(sj, 0, 32)
    epoch0 = [src[i]["caption"] for i in range(32)]
    epoch1 = [src[i]["caption"] for i in range(32, 64)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(src.captions) and epoch0 != epoch1
    np.testing.assert_array_equal(src[5]["image"], SubjectSource(sj, 0, 32)[5]["image"])  # deterministic
    prompts = unseen_prompts(sj, 200, 1234)
    assert len(prompts) == 200 and all(len(p) == 1 and p[0].kind == "ring" for p in prompts)
    assert not any(p[0].colour in sj.colours or p[0].place in sj.places for p in prompts)
    assert {p[0].size for p in prompts} == set(SIZES)


def test_the_subject_name_encodes_as_unk_without_a_warning():
    from raphael_jax.data.shapes.tokenizer import Tokenizer

    tok = Tokenizer.train_on_world()
    with pytest.warns(UserWarning, match="outside the vocabulary"):
        ids, _ = tok.encode(["a big red ring at the top"], 16)
    assert tok.unk_id in ids[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids2, _ = tok.encode(["a big red ring at the top"], 16, new_words=("ring",))
    np.testing.assert_array_equal(ids, ids2)
    with pytest.warns(UserWarning, match="'star'"):  # other unknown words are still reported
        tok.encode(["a big red star at the top"], 16, new_words=("ring",))
