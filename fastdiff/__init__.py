"""fastdiff: faster diffusion sampling for diffusers pipelines, one line added.

    acc = fastdiff.apply(pipe, fastdiff.DeepCache(interval=3))

Names load on first use (PEP 562): ``import fastdiff`` itself imports neither torch nor
diffusers, so the command line can answer ``--help`` at once. ``fastdiff.DeepCache``,
``fastdiff.apply`` and the subpackages (``fastdiff.models``, ``fastdiff.pipelines``, ...) import
what they need when first touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the subpackage that defines it
_EXPORTS: dict[str, str] = {
    "BlockCache": "caching",
    "BlockCacheCalibration": "caching",
    "DeepCache": "caching",
    "EarlyExit": "caching",
    "EncoderPropagation": "caching",
    "TGate": "caching",
    "PatchParallel": "parallel",
    "Accelerator": "core",
    "Decision": "core",
    "Ledger": "core",
    "Method": "core",
    "Plan": "core",
    "Report": "core",
    "StepClock": "core",
    "apply": "core",
    "parse_method": "core",
    "compile_pipeline": "compilation",
}
_SUBPACKAGES = ("anatomy", "caching", "core", "evals", "models", "parallel", "pipelines", "schedulers")

__all__ = [
    "Accelerator", "BlockCache", "BlockCacheCalibration", "DeepCache", "EarlyExit", "EncoderPropagation", "TGate",
    "Decision", "Ledger", "Method", "PatchParallel", "Plan", "Report", "StepClock",
    "__version__", "apply", "compile_pipeline", "parse_method",
]

if TYPE_CHECKING:
    from . import anatomy, caching, core, evals, models, parallel, pipelines, schedulers
    from .compilation import compile_pipeline
    from .caching import BlockCache, BlockCacheCalibration, DeepCache, EarlyExit, EncoderPropagation, TGate
    from .core import Accelerator, Decision, Ledger, Method, Plan, Report, StepClock, apply, parse_method
    from .parallel import PatchParallel


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBPACKAGES})
