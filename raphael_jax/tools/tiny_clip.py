"""A randomly initialised, small transformers CLIP text tower saved as a local folder.

``write_random_clip(out_dir, vocab_dir)`` builds ``transformers.CLIPTextModel`` (torch) with the
vocabulary of ``vocab_dir`` (``vocab.json`` + ``merges.txt``, e.g. from
``raphael_jax/data/shapes/clip_vocab.py``), saves it with ``save_pretrained(...,
safe_serialization=True)`` (config.json + model.safetensors) and copies the tokenizer files beside
it, so that one folder serves both ``raphael_jax.tools.precompute.load_clip`` and
``raphael_jax.data.real.clip_tokenizer.load_clip_tokenizer``. With it the real-data path (the
precompute of docs/DATA_REAL.md, section 4) runs end to end without downloading the paper's
OpenCLIP ViT-g/14 text tower (Sec. 4.1). The weights are a pure function of the arguments.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["write_random_clip"]

TOKENIZER_FILES = ("vocab.json", "merges.txt")
OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def write_random_clip(out_dir, vocab_dir, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int = 256, max_position_embeddings: int = 77, seed: int = 0,
                      hidden_act: str = "quick_gelu") -> Path:
    """Write a random CLIP text tower with ``vocab_dir``'s vocabulary to ``out_dir``; returns ``out_dir``.

    ``out_dir`` is created; an existing non-empty one is refused. The vocabulary size and the
    bos / eos ids come from ``vocab_dir/vocab.json`` (``<|startoftext|>``, ``<|endoftext|>``).
    Needs torch (the ``test`` extra of setup.py).
    """
    try:
        import torch
    except ImportError:
        raise ImportError("write_random_clip needs torch: pip install -e '.[test]' (the test extra)") from None
    import transformers
    src, out = Path(os.fspath(vocab_dir)), Path(os.fspath(out_dir))
    missing = [f for f in TOKENIZER_FILES if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"write_random_clip: {src} lacks {', '.join(missing)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"write_random_clip: {out} exists and is not an empty directory; give a new one")
    if hidden_size % num_heads:
        raise ValueError(f"write_random_clip: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    vocab = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        if tok not in vocab:
            raise ValueError(f"write_random_clip: {src / 'vocab.json'} has no {tok}")
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings, hidden_act=hidden_act,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's torch RNG
        torch.manual_seed(int(seed))
        model = transformers.CLIPTextModel(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES + OPTIONAL_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, out / f)
    return out
