"""Weight import from public PyTorch releases (safetensors only, never pickle).

- :func:`load_clip_text` (transformers CLIP text tower) and :func:`load_autoencoder` (diffusers
  AutoencoderKL) map a ``save_pretrained`` directory onto our NNX modules.
- ``raphael-convert clip|vae SRC_DIR OUT_DIR`` (:func:`convert`, in :mod:`raphael_jax.convert.orbax`)
  converts once to an orbax checkpoint; :func:`load_converted` restores it. See docs/CONVERT.md.
"""

from raphael_jax.convert.clip import load_clip_text
from raphael_jax.convert.orbax import convert, load_converted, save_converted
from raphael_jax.convert.safetensors_io import ConversionError
from raphael_jax.convert.vae import load_autoencoder

__all__ = [
    "ConversionError",
    "convert",
    "load_autoencoder",
    "load_clip_text",
    "load_converted",
    "save_converted",
]
