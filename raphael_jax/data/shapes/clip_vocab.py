"""A tiny CLIP byte-level BPE vocabulary in which every word of the shapes world is one token.

``write_clip_vocab(out_dir)`` writes ``vocab.json`` and ``merges.txt`` in the layout of an OpenAI
CLIP tokenizer folder (what transformers' ``CLIPTokenizer`` and
``raphael_jax/data/real/clip_tokenizer.py`` read): the 256 byte-unicode characters, the same with
``</w>`` (end of word), one token per merge result, then ``<|startoftext|>`` and
``<|endoftext|>``. The merges are chosen so that CLIP's BPE turns each given word (default: every
word a world caption can use, :func:`raphael_jax.data.shapes.world.all_words`) into the single token
``word</w>``; a world caption therefore encodes as SOT, one id per word, EOT. Other text still
tokenizes (down to bytes). Used with a randomly initialised CLIP text tower
(``raphael_jax/tools/tiny_clip.py``) to run the real-data path (docs/DATA_REAL.md) on the shapes world.

Construction: words are added one by one; for each, CLIP's BPE (reimplemented in :func:`bpe`) is run
with the merges so far, and merges joining the resulting pieces left to right are appended. Merges
added later have higher ranks than all earlier ones, and BPE applies the lowest-ranked pair
present, so an earlier word, which already ends as one token under the earlier merges, is unchanged.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from raphael_jax.data.shapes.world import all_words

__all__ = ["SOT", "EOT", "bpe", "byte_unicode", "clip_merges", "write_clip_vocab"]

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_WORD = re.compile(r"[a-z]+")


def byte_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible map of the 256 byte values onto printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one pre-tokenized word (lowercase letters): the pieces, the last ending in ``</w>``."""
    table = byte_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    parts = chars[:-1] + [chars[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        best = min(pairs)[0]
        first, second = next((parts[i], parts[i + 1]) for r, i in pairs if r == best)
        merged, i = [], 0
        while i < len(parts):  # merge every occurrence of the pair, left to right
            if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _check_words(words: Iterable[str]) -> list[str]:
    out = []
    for w in words:
        if not isinstance(w, str) or not _WORD.fullmatch(w):
            raise ValueError(f"write_clip_vocab: words must be lowercase ASCII letters, got {w!r}")
        if w not in out:
            out.append(w)
    if not out:
        raise ValueError("write_clip_vocab: need at least one word")
    return out


def clip_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Merges (in rank order) under which CLIP's BPE makes each of ``words`` one token ``word</w>``."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in _check_words(words):
        parts = bpe(w, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
        if bpe(w, ranks) != [w + "</w>"]:  # cannot happen (module docstring); checked all the same
            raise AssertionError(f"clip_merges: {w!r} is not one token")
    return merges


def write_clip_vocab(out_dir, words: Iterable[str] | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` to ``out_dir`` (created; refused if either file exists).

    ``words``: lowercase ASCII words to make single tokens (default: the shapes world's
    :func:`~raphael_jax.data.shapes.world.all_words`). Returns ``out_dir`` as a Path.
    """
    words = _check_words(all_words() if words is None else words)
    out = Path(os.fspath(out_dir))
    for f in ("vocab.json", "merges.txt"):
        if (out / f).exists():
            raise ValueError(f"write_clip_vocab: {out / f} exists; give a new directory")
    merges = clip_merges(words)
    chars = list(byte_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [SOT, EOT]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                    encoding="utf-8")
    return out
