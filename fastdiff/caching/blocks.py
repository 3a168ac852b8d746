"""Which modules of a denoiser count as "blocks", at the granularity a method asks for.

Block Caching gives each block its own schedule, so the list must follow the order the
denoiser runs them in (plans and plots read top to bottom like the network) and must name
modules that return hidden states a later block consumes.
"""

from __future__ import annotations

import torch

from ..anatomy import GRANULARITIES, anatomy_of

__all__ = ["GRANULARITIES", "block_paths", "fingerprint"]


def block_paths(denoiser: torch.nn.Module, granularity: str, method: str = "BlockCache") -> list[str]:
    """Module paths (as in ``named_modules``) in execution order: a transformer's blocks over all
    its stages (``granularity`` is a UNet's choice), or a UNet's layers at ``granularity``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"{method}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    paths = anatomy_of(denoiser, method).paths(granularity)
    if not paths:
        raise ValueError(f"{method}: granularity={granularity!r} finds no modules in {type(denoiser).__name__}")
    return paths


def fingerprint(denoiser: torch.nn.Module) -> str:
    """Identifies a denoiser architecture (class, config and parameter count), not its weights."""
    import hashlib
    import json

    config = dict(getattr(denoiser, "config", {}) or {})
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    text = json.dumps(
        {"class": type(denoiser).__name__, "config": config,
         "parameters": sum(p.numel() for p in denoiser.parameters())},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]
