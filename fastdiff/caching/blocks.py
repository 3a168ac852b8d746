"""Which modules of a denoiser count as "blocks", at the granularity a method asks for.

Block Caching gives each block its own schedule, so the list must follow the order the
denoiser runs them in (plans and plots read top to bottom like the network) and must name
modules that return hidden states a later block consumes.
"""

from __future__ import annotations

import torch

GRANULARITIES = ("layer", "attention", "block")


def is_unet(denoiser: torch.nn.Module) -> bool:
    return hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks")


def is_transformer(denoiser: torch.nn.Module) -> bool:
    return isinstance(getattr(denoiser, "transformer_blocks", None), torch.nn.ModuleList)


def _layers(block: torch.nn.Module, prefix: str, attention_only: bool) -> list[str]:
    """A UNet block's resnets and attentions interleaved as they run, then its resamplers."""
    resnets = list(getattr(block, "resnets", None) or [])
    attentions = list(getattr(block, "attentions", None) or [])
    paths: list[str] = []
    mid = prefix == "mid_block"
    if mid and resnets and not attention_only:
        paths.append(f"{prefix}.resnets.0")  # the mid block opens with a resnet, then (attention, resnet) pairs
    for j in range(max(len(resnets) - (1 if mid else 0), len(attentions))):
        r = j + 1 if mid else j
        if not mid and r < len(resnets) and not attention_only:
            paths.append(f"{prefix}.resnets.{r}")
        if j < len(attentions) and attentions[j] is not None:
            paths.append(f"{prefix}.attentions.{j}")
        if mid and r < len(resnets) and not attention_only:
            paths.append(f"{prefix}.resnets.{r}")
    if not attention_only:
        for name in ("downsamplers", "upsamplers"):
            for k, _ in enumerate(getattr(block, name, None) or []):
                paths.append(f"{prefix}.{name}.{k}")
    return paths


def block_paths(denoiser: torch.nn.Module, granularity: str, method: str = "BlockCache") -> list[str]:
    """Module paths (as in ``named_modules``) in execution order."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"{method}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if is_transformer(denoiser):
        return [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
    if not is_unet(denoiser):
        raise TypeError(
            f"{method} acts on UNet denoisers (down_blocks/up_blocks) and transformer denoisers "
            f"(transformer_blocks); got {type(denoiser).__name__}"
        )
    mid = getattr(denoiser, "mid_block", None)
    if granularity == "block":
        return (
            [f"down_blocks.{i}" for i in range(len(denoiser.down_blocks))]
            + (["mid_block"] if mid is not None else [])
            + [f"up_blocks.{i}" for i in range(len(denoiser.up_blocks))]
        )
    attention_only = granularity == "attention"
    paths: list[str] = []
    for i, block in enumerate(denoiser.down_blocks):
        paths += _layers(block, f"down_blocks.{i}", attention_only)
    if mid is not None:
        paths += _layers(mid, "mid_block", attention_only)
    for i, block in enumerate(denoiser.up_blocks):
        paths += _layers(block, f"up_blocks.{i}", attention_only)
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
