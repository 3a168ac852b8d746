"""UNets (Stable Diffusion 1.x/2.x, SDXL, and their img2img / inpaint / ControlNet pipelines).

A UNet's cacheable units are its layers: each down/up block's resnets and attention models
interleaved as they run, then its resamplers (``layer``), only the attention models
(``attention``), or whole down/mid/up blocks (``block``). Every layer hands on its first output.
"""

from __future__ import annotations

import torch

from .base import Anatomy, UNetParts, register_family

GRANULARITIES = ("layer", "attention", "block")


def _layers(block: torch.nn.Module, prefix: str, attention_only: bool) -> list[str]:
    """A block's resnets and attentions interleaved as they run, then its resamplers."""
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


def _unet(unet: torch.nn.Module) -> Anatomy:
    from diffusers.models.attention_processor import Attention

    parts = UNetParts(
        conv_in="conv_in",
        down=tuple(f"down_blocks.{i}" for i in range(len(unet.down_blocks))),
        mid="mid_block" if getattr(unet, "mid_block", None) is not None else None,
        up=tuple(f"up_blocks.{i}" for i in range(len(unet.up_blocks))),
    )
    modules = dict(unet.named_modules())

    def layer_paths(granularity: str) -> list[str]:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity == "block":
            return [*parts.down, *((parts.mid,) if parts.mid else ()), *parts.up]
        paths: list[str] = []
        for path in (*parts.down, *((parts.mid,) if parts.mid else ()), *parts.up):
            paths += _layers(modules[path], path, granularity == "attention")
        return paths

    attention: dict[str, list[str]] = {"self": [], "cross": []}
    for path, module in modules.items():
        if isinstance(module, Attention):
            name = path.rsplit(".", 1)[-1]
            if getattr(module, "is_cross_attention", False) or name == "attn2":
                attention["cross"].append(path)
            elif name == "attn1":
                attention["self"].append(path)
    return Anatomy(
        family="unet", denoiser=type(unet).__name__, blocks=(),
        attention={k: tuple(v) for k, v in attention.items()}, time_embedding=("time_embedding",),
        unet=parts, layer_paths=layer_paths,
    )


register_family("unet", ["UNet2DConditionModel"], _unet,
                "StableDiffusion(XL)Pipeline and their img2img, inpaint and ControlNet variants")
