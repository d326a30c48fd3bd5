"""CLIP score (Hessel et al. 2021, w = 100): text-image alignment of generated images.

    CLIPScore(I, c) = 100 * max(cos(E_img(I), E_txt(c)), 0)

averaged over the images, with E_img / E_txt the projected CLIP embeddings
(:class:`~raphael_jax.models.clip_vision.CLIPModel`). Images go through CLIP's preprocessing
exactly as transformers' ``CLIPImageProcessor`` does it: shorter side resized to ``resize`` with
PIL bicubic (longer side ``int(resize * long / short)``), center crop ``crop`` (top/left
``(size - crop) // 2``), /255, then (x - mean) / std. Captions are tokenized with the CLIP BPE
tokenizer (:mod:`raphael_jax.data.real.clip_tokenizer`), truncated to the text tower's 77 positions.

The paper reports CLIP score only inside the Fig. 6b trade-off curves and does not name the CLIP
model (the paper, Sec. 4 and Fig. 6b); torchmetrics and most papers use ViT-L/14
(``openai/clip-vit-large-patch14``), which :class:`ClipScorer` loads with ``from_pretrained``.

:func:`score_folder` scores a folder of PNGs against the prompts in their ``prompt`` text chunk, as
``raphael-sample`` and ``raphael-eval coco-fid --out`` write them (``raphael-eval clip-score``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from raphael_jax.convert.clip_full import ClipImageProcessing, load_clip_model, load_image_processor_config
from raphael_jax.models.clip_vision import CLIPModel

__all__ = ["ClipScorer", "clip_preprocess", "clip_score_from_embeddings", "prompted_images", "score_folder"]


def _resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < size or w < size:  # transformers pads with zeros around a too-small image
        out = np.zeros((max(h, size), max(w, size), image.shape[2]), image.dtype)
        top, left = -(-(out.shape[0] - h) // 2), -(-(out.shape[1] - w) // 2)
        out[top : top + h, left : left + w] = image
        image, h, w = out, out.shape[0], out.shape[1]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def clip_preprocess(images: np.ndarray | Sequence[np.ndarray], proc: ClipImageProcessing) -> np.ndarray:
    """uint8 HWC image(s) -> float32 CLIP pixels [B, crop, crop, 3] (NHWC)."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    mean, std = np.asarray(proc.mean, np.float32), np.asarray(proc.std, np.float32)
    out = []
    for im in images:
        im = np.asarray(im)
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"expected uint8 [H, W, 3] images, got {im.dtype} {im.shape}")
        im = _center_crop(_resize_shorter(im, proc.resize), proc.crop)
        x = im.astype(np.float32) * np.float32(1 / 255)
        out.append((x - mean) / std)
    return np.stack(out).astype(np.float32)


def clip_score_from_embeddings(image_embeds, text_embeds) -> np.ndarray:
    """Per pair: 100 * max(cos(image_embeds[i], text_embeds[i]), 0), float64 [N]."""
    a, b = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return 100.0 * np.maximum(cos, 0.0)


class ClipScorer:
    """Computes CLIP scores of (image, caption) pairs with a :class:`CLIPModel` and its tokenizer.

    Args:
      model: the two-tower CLIP (``load_clip_model``).
      tokenizer: anything with ``encode(texts, max_len) -> (ids, mask)`` (``ClipTokenizer``).
      processing: image preprocessing (default: CLIP's, at the vision tower's ``image_size``).
      batch_size: images per compiled call (padded; one program per batch size).
    """

    def __init__(
        self, model: CLIPModel, tokenizer, processing: ClipImageProcessing | None = None, batch_size: int = 32
    ):
        size = model.vision_model.config.image_size
        self.processing = processing or ClipImageProcessing(resize=size, crop=size)
        if self.processing.crop != size:
            raise ValueError(f"crop {self.processing.crop} != the vision tower's image_size {size}")
        self.tokenizer = tokenizer
        self.max_len = model.text_model.config.max_position_embeddings
        self.batch_size = batch_size
        graphdef, state = nnx.split(model)
        self._state = state
        self._image = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_image_features(x))
        self._text = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).get_text_features(i, m))

    @classmethod
    def from_pretrained(
        cls, clip_dir: str | Path, tokenizer_dir: str | Path | None = None, **kw
    ) -> ClipScorer:
        """A transformers CLIPModel directory (safetensors, vocab.json, merges.txt,
        preprocessor_config.json); the tokenizer files may live in ``tokenizer_dir``."""
        from raphael_jax.data.real.clip_tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer(tokenizer_dir or clip_dir)  # first: a bad folder fails before the model
        model = load_clip_model(clip_dir)
        proc = load_image_processor_config(clip_dir, model.vision_model.config.image_size)
        return cls(model, tokenizer, proc, **kw)

    def _padded(self, fn, *arrays):
        n = arrays[0].shape[0]
        out = []
        for start in range(0, n, self.batch_size):
            chunk = [a[start : start + self.batch_size] for a in arrays]
            k = chunk[0].shape[0]
            if k < self.batch_size:
                chunk = [np.concatenate([c, np.repeat(c[-1:], self.batch_size - k, axis=0)]) for c in chunk]
            out.append(np.asarray(fn(self._state, *map(jnp.asarray, chunk)))[:k])
        return np.concatenate(out)

    def image_embeddings(self, images) -> np.ndarray:
        """Projected image embeddings [N, P] of uint8 HWC images (any sizes)."""
        return self._padded(self._image, clip_preprocess(images, self.processing))

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        ids, mask = self.tokenizer.encode(list(captions), self.max_len)
        return self._padded(self._text, np.asarray(ids, np.int32), np.asarray(mask, np.int32))

    def scores(self, images, captions: Sequence[str]) -> np.ndarray:
        """Per-image CLIP scores [N] (image i against caption i)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return clip_score_from_embeddings(self.image_embeddings(images), self.text_embeddings(captions))

    def __call__(self, images, captions: Sequence[str]) -> float:
        """Mean CLIP score of the pairs."""
        return float(self.scores(images, captions).mean())


def prompted_images(
    folder: str | Path, pattern: str = "*.png", exclude: Sequence[str] = ("grid*.png",)
) -> tuple[list[tuple[Path, str]], list[Path]]:
    """``([(file, prompt), ...], [files without a prompt])`` of the files in ``folder`` matching
    ``pattern`` and none of ``exclude`` (sorted by name); the prompt is the PNG ``prompt`` text chunk."""
    found, missing = [], []
    for path in sorted(Path(folder).glob(pattern)):
        if not path.is_file() or any(fnmatch.fnmatch(path.name, x) for x in exclude):
            continue
        with Image.open(path) as im:
            prompt = getattr(im, "text", {}).get("prompt")
        if prompt is None:
            missing.append(path)
        else:
            found.append((path, prompt))
    return found, missing


def score_folder(
    scorer: ClipScorer,
    folder: str | Path,
    *,
    pattern: str = "*.png",
    exclude: Sequence[str] = ("grid*.png",),
    chunk: int = 256,
) -> dict[str, Any]:
    """CLIP scores of the images in ``folder`` against the prompts stored in them (:func:`prompted_images`).

    Images are read ``chunk`` at a time. Returns ``{"clip_score": mean, "num_images", "scores": {file
    name: score}, "skipped": [names of files without a prompt]}``; raises ``ValueError`` when no
    image has a prompt.
    """
    found, missing = prompted_images(folder, pattern, exclude)
    if not found:
        raise ValueError(f"{folder}: no {pattern} file with a 'prompt' PNG text chunk")
    scores = []
    for start in range(0, len(found), chunk):
        part = found[start : start + chunk]
        images = []
        for path, _ in part:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
        scores.append(scorer.scores(images, [prompt for _, prompt in part]))
    s = np.concatenate(scores)
    return {
        "clip_score": float(s.mean()),
        "num_images": len(found),
        "scores": {path.name: float(v) for (path, _), v in zip(found, s)},
        "skipped": [path.name for path in missing],
    }
