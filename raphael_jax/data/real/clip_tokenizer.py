"""CLIP BPE tokenizer (transformers' ``CLIPTokenizer``) from a local directory, fixed length 77.

The directory holds ``vocab.json`` and ``merges.txt`` (plus, optionally, ``tokenizer_config.json``
/ ``special_tokens_map.json``), e.g. the ``tokenizer`` / ``tokenizer_2`` folder of an SD pipeline.
OpenAI CLIP pads with ``<|endoftext|>``; the OpenCLIP tokenizers of SD2 / SDXL pad with ``!``
(id 0); the pad token is read from the directory. Every row is

    [<|startoftext|>, tokens..., <|endoftext|>, pad, ..., pad]          (length max_len)

and a row longer than ``max_len`` keeps its first ``max_len - 2`` tokens and still ends with
``<|endoftext|>`` (the pooled token), with a ``warnings.warn``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["ClipTokenizer", "load_clip_tokenizer"]


class ClipTokenizer:
    """Wraps ``transformers.CLIPTokenizer`` (the slow, reference implementation)."""

    def __init__(self, path: str | Path):
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        self.bos_id = int(self.tokenizer.bos_token_id)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id)

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
