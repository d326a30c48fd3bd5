"""``check_torch_file`` tells a torch.save file from anything else without torch and without unpickling,
so a wrong .pth is named as such on machines without torch (the Python 3.12 smoke job has none)."""

import pickle
import sys
import zipfile

import pytest

from raphael_jax.convert import ConversionError
from raphael_jax.convert.safetensors_io import check_torch_file, read_pickle_tensors
from raphael_jax.evaluation.inception import convert_pytorch_fid_weights


def _legacy_stream() -> bytes:
    """The head of a pre-1.6 ``torch.save`` stream: the magic number pickled with protocol 2, then more."""
    return pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)


def test_accepts_both_torch_layouts(tmp_path):
    z = tmp_path / "new.pth"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(_legacy_stream())
    check_torch_file(z)
    check_torch_file(legacy)


def test_accepts_what_torch_writes(tmp_path):
    torch = pytest.importorskip("torch")
    for name, zipped in (("zip.pth", True), ("old.pth", False)):
        torch.save({"w": torch.zeros(2)}, tmp_path / name, _use_new_zipfile_serialization=zipped)
        check_torch_file(tmp_path / name)


@pytest.mark.parametrize("content, why", [
    (b"", "neither a torch zip archive"),
    (b"\x80\x02 not a torch zip file", "neither a torch zip archive"),
    (pickle.dumps({"a": 1}, protocol=2), "neither a torch zip archive"),
    (b"PK\x03\x04 truncated", "neither a torch zip archive"),
    ("zip-without-data", "a zip archive without data.pkl"),
])
def test_refuses_other_files(tmp_path, content, why):
    path = tmp_path / "bad.pth"
    if content == "zip-without-data":
        with zipfile.ZipFile(path, "w") as f:
            f.writestr("archive/version", b"3")
    else:
        path.write_bytes(content)
    with pytest.raises(ConversionError, match=why) as e:
        check_torch_file(path, "re-download it")
    assert "bad.pth is not a PyTorch weights file" in str(e.value) and "\n" not in str(e.value)


def test_wrong_file_is_named_before_torch_is_needed(tmp_path, monkeypatch):
    """With torch unimportable, a corrupt .pth gets the corrupt-file error, not "needs torch"; a well-formed
    one then gets "needs torch"."""
    monkeypatch.setitem(sys.modules, "torch", None)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02 not a torch zip file")
    with pytest.raises(ConversionError, match="bad.pth is not a PyTorch weights file"):
        convert_pytorch_fid_weights(bad, tmp_path / "out.safetensors")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ConversionError, match="pytorch_model.bin is not a PyTorch weights file"):
        read_pickle_tensors(tmp_path / "src", "pytorch_model")
    good = tmp_path / "good.pth"
    good.write_bytes(_legacy_stream())
    with pytest.raises(ConversionError, match="needs torch"):
        convert_pytorch_fid_weights(good, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
