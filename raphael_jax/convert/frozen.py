"""Load the frozen encoders a latent run uses: the VAE and the CLIP text tower.

Each accepts either a safetensors ``save_pretrained`` folder (diffusers ``AutoencoderKL`` /
transformers CLIP text model) or a ``raphael-convert`` output (an orbax checkpoint with
``raphael_convert.json``). The precompute pass (:mod:`raphael_jax.tools.precompute`), the sampler
(:mod:`raphael_jax.sampling`) and the trainer's previews all load them here.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["load_clip", "load_vae"]


def _is_conversion(path) -> bool:
    return (Path(path) / "raphael_convert.json").is_file()


def _check_dir(path, what: str, hint: str) -> None:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} folder {str(path)!r} does not exist{hint}")


def load_vae(path, hint: str = ""):
    """(AutoencoderKL, AutoencoderKLConfig) from a diffusers folder or a ``raphael-convert vae`` output.

    ``hint`` is appended to the missing-folder error (e.g. which flag overrides the location)."""
    _check_dir(path, "VAE", hint)
    if _is_conversion(path):
        from raphael_jax.convert.orbax import load_converted
        return load_converted(path)
    from raphael_jax.convert.vae import load_autoencoder
    return load_autoencoder(path)


def load_clip(path, hint: str = ""):
    """(CLIPTextTransformer, CLIPTextConfig) from a transformers folder or a ``raphael-convert clip`` output."""
    _check_dir(path, "CLIP text", hint)
    if _is_conversion(path):
        from raphael_jax.convert.orbax import load_converted
        return load_converted(path)
    from raphael_jax.convert.clip import load_clip_text
    return load_clip_text(path)
