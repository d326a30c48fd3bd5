"""CLIP BPE tokenizer (transformers' ``CLIPTokenizer``) from a local directory, fixed length 77.

The directory holds ``vocab.json`` and ``merges.txt`` (plus, optionally, ``tokenizer_config.json``
/ ``special_tokens_map.json``), e.g. the ``tokenizer`` / ``tokenizer_2`` folder of an SD pipeline.
OpenAI CLIP pads with ``<|endoftext|>``; the OpenCLIP tokenizers of SD2 / SDXL pad with ``!``
(id 0); the pad token is read from the directory. Every row is

    [<|startoftext|>, tokens..., <|endoftext|>, pad, ..., pad]          (length max_len)

and a row longer than ``max_len`` keeps its first ``max_len - 2`` tokens and still ends with
``<|endoftext|>`` (the pooled token), with a ``warnings.warn``.

A missing folder or file raises ``FileNotFoundError``, a truncated or corrupt ``vocab.json`` /
``merges.txt`` (or tokenizer config) a one-line :class:`TokenizerError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["TOKENIZER_FILES", "ClipTokenizer", "TokenizerError", "check_tokenizer_files", "load_clip_tokenizer"]

TOKENIZER_FILES = ("vocab.json", "merges.txt")
_FIX = "re-download it or copy the tokenizer folder again"


class TokenizerError(ValueError):
    """A tokenizer folder whose files are truncated, corrupt or of another kind; the message names the file."""


def check_tokenizer_files(path: str | Path) -> None:
    """Checks ``path/vocab.json`` (a JSON object token -> id) and ``path/merges.txt`` (a header line, then two
    symbols per line) before transformers reads them, so a bad file is named instead of failing deep inside."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer folder (it holds vocab.json and merges.txt)")
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {' and '.join(missing)}: copy the CLIP tokenizer files there")
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{vocab_file} is not a CLIP vocabulary (truncated or corrupt? {e}): {_FIX}") from None
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
        raise TokenizerError(f"{vocab_file} is not a CLIP vocabulary (a JSON object of token -> id): {_FIX}")
    try:
        lines = merges_file.read_text(encoding="utf-8").strip().split("\n")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{merges_file} is not a BPE merges file (not UTF-8: {e}): {_FIX}") from None
    # the lines transformers' CLIPTokenizer reads: line 1 is the '#version' header, at most 48895 merges follow
    for n, line in enumerate(lines[1 : 49152 - 256 - 2 + 1], 2):
        if len(line.split()) != 2:
            raise TokenizerError(f"{merges_file}:{n}: {line[:40]!r} is not a BPE merge (two symbols per line; "
                                 f"truncated or corrupt?): {_FIX}")


class ClipTokenizer:
    """Wraps ``transformers.CLIPTokenizer`` (the slow, reference implementation)."""

    def __init__(self, path: str | Path):
        check_tokenizer_files(path)  # before importing transformers: a bad folder fails fast
        from transformers import CLIPTokenizer

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
            self.bos_id = int(self.tokenizer.bos_token_id)
            self.eos_id = int(self.tokenizer.eos_token_id)
            self.pad_id = int(self.tokenizer.pad_token_id)
        except (OSError, ValueError, TypeError, KeyError) as e:  # e.g. a corrupt tokenizer_config.json
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TokenizerError(f"{path}: not a CLIP tokenizer folder ({type(e).__name__}: {first[:160]}): "
                                 f"{_FIX}") from None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id (``</w>`` marks a word end), e.g. for labelling region masks."""
        return str(self.tokenizer.convert_ids_to_tokens(int(token_id)))

    def encode(self, texts: Sequence[str] | str, max_len: int = 77) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, both int32 [B, max_len]; mask is 1 on SOT, tokens and EOT.

        Longer texts are truncated (keeping EOT last) with a warning naming how many rows.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (SOT and EOT), got {max_len}")
        rows = self.tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        ids = np.full((len(rows), max_len), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), max_len), dtype=np.int32)
        truncated = 0
        for i, row in enumerate(rows):
            if len(row) > max_len - 2:
                truncated += 1
                row = row[: max_len - 2]
            full = [self.bos_id, *row, self.eos_id]
            ids[i, : len(full)] = full
            mask[i, : len(full)] = 1
        if truncated:
            warnings.warn(
                f"{truncated} of {len(rows)} text(s) longer than {max_len} tokens were truncated "
                f"(the end-of-text token is kept last)",
                stacklevel=2,
            )
        return ids, mask


def load_clip_tokenizer(path: str | Path) -> ClipTokenizer:
    """The tokenizer in ``path`` (a directory with vocab.json and merges.txt)."""
    return ClipTokenizer(path)
