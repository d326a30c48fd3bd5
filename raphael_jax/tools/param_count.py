"""Parameter count of any config per component, without allocating it (``nnx.eval_shape``).

    raphael-params --config configs/raphael_3b.py
    raphael-params --all            # every config in configs/

Components: U-Net trunk (everything not listed below), space experts, time experts, gates (text
and time routers), edge heads, and the trainable text encoder when the config has one.
"""
from __future__ import annotations

import glob
import os

from flax import nnx

COMPONENTS = ("unet_trunk", "space_experts", "time_experts", "gates", "edge_heads", "text_encoder")


def component_of(path: tuple) -> str:
    names = [str(p) for p in path]
    if names and names[0] == "text":
        return "text_encoder"
    if "gate" in names:
        return "gates"
    if "edge_head" in names:
        return "edge_heads"
    if "experts" in names and "space_moe" in names:
        return "space_experts"
    if "experts" in names and "time_moe" in names:
        return "time_experts"
    return "unet_trunk"


def count_params(config) -> dict[str, int]:
    """{component: number of parameters} plus ``denoiser`` (all but the text encoder) and ``total``."""
    from raphael_jax.models.raphael import RaphaelModel

    abstract = nnx.eval_shape(lambda: RaphaelModel(config, rngs=nnx.Rngs(0)))
    counts = dict.fromkeys(COMPONENTS, 0)
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        size = 1
        for d in var.shape:
            size *= d
        counts[component_of(path)] += size
    counts["denoiser"] = sum(v for k, v in counts.items() if k != "text_encoder")
    counts["total"] = counts["denoiser"] + counts["text_encoder"]
    return counts


def format_table(rows: dict[str, dict[str, int]]) -> str:
    cols = COMPONENTS + ("denoiser", "total")
    head = "| config | " + " | ".join(cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    lines = [head, sep]
    for name, c in rows.items():
        lines.append(f"| {name} | " + " | ".join(_human(c[k]) for k in cols) + " |")
    return "\n".join(lines)


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def config_files() -> list[str]:
    """Every ``configs/*.py`` next to the package (``base.py`` and the variants in ``common.py`` excluded),
    sorted."""
    here = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    skip = ("base.py", "common.py")
    return sorted(f for f in glob.glob(os.path.join(here, "*.py")) if os.path.basename(f) not in skip)


def config_name(spec: str) -> str:
    """The table's row name of a ``file.py[:variant]`` spec: the file relative to the working directory."""
    return os.path.relpath(spec.split(":")[0]) + (":" + spec.split(":", 1)[1] if ":" in spec else "")
