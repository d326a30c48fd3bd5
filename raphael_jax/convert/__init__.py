"""Weight import from public PyTorch releases (safetensors only, never pickle).

- :func:`load_clip_text` (transformers CLIP text tower) and :func:`load_autoencoder` (diffusers
  AutoencoderKL) map a ``save_pretrained`` directory onto our NNX modules.
- ``raphael-convert clip|vae SRC_DIR OUT_DIR`` (:func:`convert`, in :mod:`raphael_jax.convert.orbax`)
  converts once to an orbax checkpoint; :func:`load_converted` restores it. See docs/CONVERT.md.
- :func:`convert_esrgan_weights` (``raphael-convert esrgan``) turns a Real-ESRGAN generator ``.pth`` into
  safetensors once; :func:`load_rrdbnet` loads it into the upscaler's RRDBNet, :func:`save_rrdbnet` writes
  one back in the published layout (:mod:`raphael_jax.convert.esrgan`).
"""

from raphael_jax.convert.clip import load_clip_text
from raphael_jax.convert.esrgan import convert_esrgan_weights, load_rrdbnet, save_rrdbnet
from raphael_jax.convert.orbax import convert, load_converted, save_converted
from raphael_jax.convert.safetensors_io import ConversionError
from raphael_jax.convert.vae import load_autoencoder

__all__ = [
    "ConversionError",
    "convert",
    "convert_esrgan_weights",
    "load_autoencoder",
    "load_clip_text",
    "load_converted",
    "load_rrdbnet",
    "save_converted",
    "save_rrdbnet",
]
