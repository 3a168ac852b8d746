"""fastdiff: faster diffusion sampling for diffusers pipelines, one line added.

    acc = fastdiff.apply(pipe, fastdiff.DeepCache(interval=3))
"""

from .caching import BlockCache, BlockCacheCalibration, DeepCache, EarlyExit, EncoderPropagation, TGate
from .parallel import PatchParallel
from .core import (
    Accelerator,
    Decision,
    Ledger,
    Method,
    Plan,
    Report,
    StepClock,
    apply,
    parse_method,
)

__version__ = "0.1.0"

__all__ = [
    "Accelerator", "BlockCache", "BlockCacheCalibration", "DeepCache", "EarlyExit", "EncoderPropagation", "TGate", "Decision", "Ledger", "Method", "PatchParallel", "Plan", "Report", "StepClock",
    "__version__", "apply", "parse_method",
]
