"""SentencePiece tokenizer for the shapes world, with T5's id layout (pad 0, eos 1, unk 2, no bos).

`Tokenizer.train_on_world()` trains a word-level model (one token per caption word; case-folded)
on captions from the world's generator, deterministically. `encode` appends EOS and pads with 0.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from raphael_jax.data.shapes.world import all_words, make_caption, sample_objects

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
TOKENIZER_FILE = "tokenizer.model"  # the file name a run's workdir keeps its tokenizer under
_SPECIALS = 3
# Largest unigram vocabulary the world's captions support (sentencepiece refuses larger ones).
_UNIGRAM_DEFAULT_VOCAB = 40


class Tokenizer:
    """Thin wrapper over a sentencepiece model: batch encoding to fixed-length ids and masks."""

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError("Tokenizer: model must use pad_id=0, eos_id=1, unk_id=2, got "
                             f"{self._sp.pad_id()}, {self._sp.eos_id()}, {self._sp.unk_id()}")

    def __getstate__(self):  # lets grain worker processes receive the tokenizer (the proto bytes)
        return {"model_proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    # ------------------------------------------------------------------------- construction
    @classmethod
    def train_on_world(cls, vocab_size: int | None = None, seed: int = 0, num_captions: int = 5000,
                       model_type: str = "word") -> Tokenizer:
        """Train on `num_captions` world captions (1-3 objects) from `seed`; same arguments, same model.

        vocab_size None means every word plus the 3 specials for model_type "word" (one token per word),
        40 for "unigram" (mostly sub-word pieces: 2-3x longer sequences; the corpus allows at most 43).
        """
        if model_type not in ("word", "unigram"):
            raise ValueError(f"model_type must be 'word' or 'unigram', got {model_type!r}")
        if vocab_size is None:
            vocab_size = len(all_words()) + _SPECIALS if model_type == "word" else _UNIGRAM_DEFAULT_VOCAB
        captions = [make_caption(sample_objects(np.random.default_rng([seed, i, 2]), 1, 3))
                    for i in range(num_captions)]
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(captions), model_writer=writer, vocab_size=vocab_size,
                model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
                normalization_rule_name="nmt_nfkc_cf", num_threads=1, shuffle_input_sentence=False,
                character_coverage=1.0, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"Tokenizer.train_on_world: sentencepiece failed ({e})") from None
        tok = cls(writer.getvalue())
        missing = [w for w in all_words() if UNK_ID in tok._sp.encode(w)]
        if missing:
            raise ValueError(f"Tokenizer.train_on_world: words not covered {missing}; use more captions")
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a model written by `save` (a sentencepiece .model file)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer.load: no tokenizer model at {os.fspath(path)!r}")
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str | os.PathLike) -> None:
        """Write the sentencepiece model proto to `path` (creating parent folders)."""
        parent = os.path.dirname(os.fspath(path))
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "wb") as f:
            f.write(self._proto)

    @property
    def model_proto(self) -> bytes:
        """Serialized sentencepiece model."""
        return self._proto

    # ------------------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def encode(self, texts: Sequence[str], max_len: int,
               new_words: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [B, max_len], mask bool [B, max_len]); ids end with EOS, then 0-padding.

        Too long prompts are cut to max_len - 1 tokens plus EOS, with a warning naming the prompt. Words
        the vocabulary cannot spell (they become ``<unk>``: the model learned nothing for them) are named
        in a warning, never dropped silently; ``new_words`` are expected to be unknown (a fine-tuned
        subject's name, which ``<unk>`` stands for: docs/FINETUNE.md) and are not warned about.
        """
        if isinstance(texts, str):
            raise ValueError("Tokenizer.encode: expected a list of strings, got a single str")
        if max_len < 2:
            raise ValueError(f"Tokenizer.encode: max_len must be >= 2, got {max_len}")
        pieces = self._sp.encode(list(texts), out_type=int)
        ids = np.full((len(pieces), max_len), PAD_ID, np.int32)
        mask = np.zeros((len(pieces), max_len), bool)
        for i, p in enumerate(pieces):
            if UNK_ID in p:
                unknown = [w for w in texts[i].split() if UNK_ID in self._sp.encode(w, out_type=int)]
            if UNK_ID in p and not (unknown and set(w.lower() for w in unknown) <= set(new_words)):
                warnings.warn(f"Tokenizer.encode: prompt {texts[i]!r} has words outside the vocabulary, encoded "
                              f"as <unk>: {', '.join(map(repr, unknown or [texts[i]]))}", stacklevel=2)
            if len(p) + 1 > max_len:
                warnings.warn(f"Tokenizer.encode: prompt {texts[i]!r} has {len(p) + 1} tokens with EOS, "
                              f"truncated to max_len={max_len}", stacklevel=2)
                p = p[:max_len - 1]
            row = p + [EOS_ID]
            ids[i, :len(row)] = row
            mask[i, :len(row)] = True
        return ids, mask

    def decode(self, ids) -> list[str]:
        """Text of each id row, stopping at the first EOS (pads ignored)."""
        out = []
        for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]):
            row = [int(t) for t in row]
            if EOS_ID in row:
                row = row[:row.index(EOS_ID)]
            out.append(self._sp.decode([t for t in row if t != PAD_ID]))
        return out

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def eot_index(mask):
    """Index of the EOS token in each row: number of real tokens - 1 (numpy or jax arrays)."""
    return mask.sum(axis=-1).astype("int32") - 1
