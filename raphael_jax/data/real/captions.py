"""Caption cleaning and metadata filters for real image-text data (the paper, Sec. 4 training details).

The paper keeps LAION pairs whose aesthetic score is at least 4.7, removes watermarked images and
cleans captions of URLs, HTML tags and e-mail addresses. Here:

- :func:`clean_caption` removes HTML tags (``<b>``, ``<br/>``, ``<a href=...>``; the text between
  tags is kept), decodes HTML entities (``&amp;`` -> ``&``), removes URLs (``http://``,
  ``https://``, ``ftp://``, ``mailto:`` and ``www.`` forms, up to the next whitespace) and e-mail
  addresses (``name@host.tld``), then collapses runs of whitespace to one space and strips the
  ends. Punctuation left dangling by a removed URL is kept (a caption is never otherwise rewritten).
- :class:`CaptionFilter` applies the optional metadata filters. A filter acts on an example only
  when that example's metadata holds the column with a value (see ``AESTHETIC_COLUMNS`` and
  ``WATERMARK_COLUMNS`` for the accepted names, matched case-insensitively); an example without
  the column, or with null / NaN there, is not filtered by it. A caption that is empty after
  cleaning is always dropped.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "AESTHETIC_COLUMNS",
    "CAPTION_COLUMNS",
    "WATERMARK_COLUMNS",
    "CaptionFilter",
    "clean_caption",
    "find_column",
]

# Column names accepted for each field (LAION parquet / img2dataset json use the upper-case or
# "pwatermark" spellings). Matched case-insensitively, first hit wins.
CAPTION_COLUMNS = ("caption", "text", "prompt")
AESTHETIC_COLUMNS = ("aesthetic", "aesthetic_score", "aesthetics")
WATERMARK_COLUMNS = ("pwatermark", "watermark", "watermark_prob", "watermark_probability", "p_watermark")

_TAG = re.compile(r"<!--.*?-->|<!\w[^<>]*>|</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>", re.DOTALL)
_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bmailto:|\bwww\.)\S+", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_SPACE = re.compile(r"\s+")


def clean_caption(text: str | bytes | None) -> str:
    """The caption without HTML tags, URLs and e-mail addresses, whitespace collapsed (may be '')."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = _TAG.sub(" ", str(text))
    text = html.unescape(text)
    text = _TAG.sub(" ", text)  # tags that were written as entities (&lt;b&gt;)
    text = _URL.sub(" ", text)
    text = _EMAIL.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def find_column(meta: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    """The key of ``meta`` matching one of ``names`` (case-insensitive, in ``names`` order), or None."""
    lower = {str(k).lower(): k for k in meta}
    for n in names:
        if n in lower:
            return lower[n]
    return None


def _number(value) -> float | None:
    """A float, or None for null / NaN / empty / non-numeric values."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


@dataclasses.dataclass(frozen=True)
class CaptionFilter:
    """Which examples to keep; ``None`` switches a threshold off.

    Attributes:
      min_aesthetic: keep examples whose aesthetic score is >= this (paper: 4.7).
      max_watermark: keep examples whose watermark probability is <= this (the paper removes
        watermarked images without a threshold; 0.5 is the usual LAION cut, used by SD).
    """

    min_aesthetic: float | None = 4.7
    max_watermark: float | None = 0.5

    def check(self, caption: str | bytes | None,
              meta: Mapping[str, Any] | None = None) -> tuple[str | None, str]:
        """``(cleaned caption, "ok")`` or ``(None, reason)`` with reason one of ``empty_caption``,
        ``low_aesthetic``, ``watermark``."""
        meta = meta or {}
        if self.min_aesthetic is not None:
            col = find_column(meta, AESTHETIC_COLUMNS)
            score = _number(meta[col]) if col is not None else None
            if score is not None and score < self.min_aesthetic:
                return None, "low_aesthetic"
        if self.max_watermark is not None:
            col = find_column(meta, WATERMARK_COLUMNS)
            p = _number(meta[col]) if col is not None else None
            if p is not None and p > self.max_watermark:
                return None, "watermark"
        cleaned = clean_caption(caption)
        if not cleaned:
            return None, "empty_caption"
        return cleaned, "ok"

    @staticmethod
    def scores(meta: Mapping[str, Any] | None) -> tuple[float, float]:
        """(aesthetic, watermark) from the metadata, NaN where absent."""
        meta = meta or {}
        out = []
        for names in (AESTHETIC_COLUMNS, WATERMARK_COLUMNS):
            col = find_column(meta, names)
            v = _number(meta[col]) if col is not None else None
            out.append(float("nan") if v is None else v)
        return out[0], out[1]
