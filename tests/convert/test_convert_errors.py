"""Import errors are clear, complete, and leave the output directory untouched."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from raphael_jax.cli.convert import main  # noqa: E402
from raphael_jax.convert import ConversionError, load_clip_text, load_converted  # noqa: E402

WEIGHTS = "model.safetensors"
DROP = "text_model.encoder.layers.1.mlp.fc2.bias"
EXTRA = "text_model.encoder.layers.2.mlp.fc1.weight"
BAD = "text_model.encoder.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = transformers.CLIPTextConfig(
        vocab_size=99,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
    torch.manual_seed(0)
    pt = transformers.CLIPTextModel(cfg).eval()
    good = tmp_path_factory.mktemp("good")
    pt.save_pretrained(good, safe_serialization=True)
    pickled = tmp_path_factory.mktemp("pickled")
    pt.save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    return good, pickled


def _edited(good, dst, edit):
    shutil.copytree(good, dst)
    tensors = load_file(str(dst / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS))
    return dst


def _run_cli(capsys, src, out):
    code = main(["clip", str(src), str(out)])
    return code, capsys.readouterr().err


def test_pickle_only_directory(tiny, tmp_path, capsys):
    _, pickled = tiny
    with pytest.raises(ConversionError) as e:
        load_clip_text(pickled)
    msg = str(e.value)
    assert "\n" not in msg and "pytorch_model.bin" in msg and "--from-pickle" in msg
    assert "never unpickles" in msg
    code, err = _run_cli(capsys, pickled, tmp_path / "out")
    assert code == 2 and "--from-pickle" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case, edit, expect",
    [
        ("missing", lambda t: t.pop(DROP), ["missing tensors (1)", f"{DROP} (expected [16])"]),
        (
            "unexpected",
            lambda t: t.update({EXTRA: np.zeros((24, 16), np.float32)}),
            ["unexpected tensors (1)", f"{EXTRA} [24, 16]"],
        ),
        (
            "wrong_shape",
            lambda t: t.update({BAD: t[BAD][:, :15].copy()}),
            ["wrong shapes (1)", f"{BAD}: expected [16, 16], found [16, 15]"],
        ),
    ],
)
def test_bad_tensors(tiny, tmp_path, capsys, case, edit, expect):
    src = _edited(tiny[0], tmp_path / case, edit)
    with pytest.raises(ConversionError) as e:
        load_clip_text(src)
    for s in expect:
        assert s in str(e.value), str(e.value)
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory stays empty
    code, err = _run_cli(capsys, src, out)
    assert code == 2 and expect[-1] in err
    assert list(out.iterdir()) == []


def test_all_problems_in_one_error(tiny, tmp_path):
    def edit(t):
        t.pop(DROP)
        t[EXTRA] = np.zeros((24, 16), np.float32)
        t[BAD] = t[BAD][:, :15].copy()

    src = _edited(tiny[0], tmp_path / "all", edit)
    with pytest.raises(ConversionError) as e:
        load_clip_text(src)
    msg = str(e.value)
    assert "3 problem(s)" in msg and DROP in msg and EXTRA in msg and BAD in msg


def test_refuses_non_empty_out_dir_and_from_pickle(tiny, tmp_path, capsys):
    good, pickled = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "user_data.txt").write_text("keep me")
    code, err = _run_cli(capsys, good, out)
    assert code == 2 and "not an empty directory" in err
    assert [p.name for p in out.iterdir()] == ["user_data.txt"]

    converted = tmp_path / "from_pickle"
    assert main(["clip", str(pickled), str(converted), "--from-pickle"]) == 0
    assert (converted / "source" / WEIGHTS).is_file() and not (pickled / WEIGHTS).exists()
    a, _ = load_converted(converted)
    b, _ = load_clip_text(converted / "source")  # the safetensors copy loads like the original
    c, _ = load_clip_text(good)
    ids = jnp.asarray(np.arange(1, 9)[None] % 99)
    outs = [np.asarray(m(ids).last_hidden_state) for m in (a, b, c)]
    np.testing.assert_array_equal(outs[0], outs[2])
    np.testing.assert_array_equal(outs[1], outs[2])
