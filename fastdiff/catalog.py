"""The names the command line shows before anything heavy loads: methods and their spec syntax,
built-in models, text samplers.

``fastdiff --help`` should answer at once, but the registries that own these names
(:data:`fastdiff.core.method.METHODS`, :data:`fastdiff.models.BUILTIN_MODELS`,
:data:`fastdiff.schedulers.SAMPLERS`) live in modules that import torch, diffusers and
transformers, which take seconds to load. So the names are repeated here as plain data, and
``tests/test_catalog.py`` checks them against the registries so the two cannot drift apart.
This module imports nothing beyond the standard library.
"""

from __future__ import annotations

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "DEFAULT_TEXT_MODEL",
    "FORECASTING_METHODS",
    "FORECASTS",
    "METHOD_MODULES",
    "METHOD_SPECS",
    "SAMPLERS",
    "SAMPLER_ALIASES",
    "TEXT_MODELS",
    "method_help",
    "model_help",
    "sampler_names",
]

# name -> (an example spec, what the method does); in the order a newcomer meets them
METHOD_SPECS: dict[str, tuple[str, str]] = {
    "deepcache": ("deepcache:interval=3,branch=0", "reuse the deep UNet features"),
    "blockcache": ("blockcache:budget=0.4", "per-block reuse, calibrated"),
    "encoder": ("encoder", "UNet encoder at key steps only"),
    "tgate": ("tgate:gate_step=10", "cache cross-attention late on"),
    "earlyexit": ("earlyexit:schedule=auto", "skip deep blocks while noisy"),
    "patch": ("patch:mode=pcpp", "split images over processes"),
}
# importing these registers every method above with the spec parser
METHOD_MODULES: tuple[str, ...] = ("fastdiff.caching", "fastdiff.parallel")
# reusing methods may predict a reused output from its recent trajectory instead of holding it
FORECASTS: tuple[str, ...] = ("hold", "ab2", "ab3")
FORECASTING_METHODS: tuple[str, ...] = ("deepcache", "blockcache", "encoder", "tgate")

# name -> one line, in the registry's order
BUILTIN_MODELS: dict[str, str] = {
    "tiny-sd": "Stable Diffusion 1.x layout, tiny",
    "tiny-sdxl": "SDXL layout, tiny",
    "tiny-pixart": "PixArt-alpha (T5 encoder), tiny, 256 px",
    "tiny-dit": "class-conditional DiT, tiny",
    "tiny-sd3": "SD3.5-medium layout (MMDiT), tiny",
    "tiny-flux": "FLUX.1-dev layout, tiny",
    "tiny-wan": "Wan 2.1 text-to-video layout, tiny, 5 frames",
    "sd15-arch": "the exact SD 1.5 UNet, random weights (speed)",
    "sd3-arch": "the exact SD3.5-medium transformer, random weights (speed)",
    "wan-arch": "the exact Wan 2.1 1.3B transformer, random weights (speed)",
    "digits": "trained handwritten digits, SD 1.x pipeline (quality)",
    "digits-sd3": "trained handwritten digits, SD3 pipeline (quality)",
}
DEFAULT_MODEL = "digits"

TEXT_MODELS: dict[str, str] = {
    "pydoc-mdlm": "trained masked diffusion LM of Python docstrings",
    "sudoku-mdlm": "trained Sudoku solver: the prompt is a puzzle (81 cells of 0-9, 0 for a blank)",
}
DEFAULT_TEXT_MODEL = "pydoc-mdlm"

SAMPLERS: tuple[str, ...] = ("mdlm", "first-hitting", "low-confidence", "random", "threshold", "rdm", "margin",
                             "entropy-bound", "posterior")
SAMPLER_ALIASES: dict[str, str] = {
    "ancestral": "mdlm", "fhs": "first-hitting", "llada": "low-confidence", "llada-random": "random",
    "fast-dllm": "threshold", "reparameterized": "rdm", "top-margin": "margin", "eb": "entropy-bound",
    "ddim": "posterior", "d3pm": "posterior", "udlm": "posterior",
}


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
            for row in rows]


def method_help() -> str:
    """The ``--method`` spec syntax as a table, for the help of every command that takes one."""
    lines = ["methods (--method SPEC, repeatable; SPEC is name[:key=value,...]):",
             *_table([(name, example, what) for name, (example, what) in METHOD_SPECS.items()]),
             f"  {', '.join(FORECASTING_METHODS)} also take forecast={'|'.join(FORECASTS)},",
             "  e.g. deepcache:interval=3,forecast=ab2 (every option: docs/methods.md)"]
    return "\n".join(lines)


def model_help() -> str:
    """The built-in models as a table (each runs offline; no download)."""
    return "\n".join(["built-in models (--model NAME, offline):", *_table(list(BUILTIN_MODELS.items()))])


def sampler_names() -> str:
    """Every sampler, its aliases in brackets."""
    aliases: dict[str, list[str]] = {}
    for alias, name in sorted(SAMPLER_ALIASES.items()):
        aliases.setdefault(name, []).append(alias)
    return ", ".join(f"{name} ({'/'.join(aliases[name])})" if name in aliases else name for name in SAMPLERS)
