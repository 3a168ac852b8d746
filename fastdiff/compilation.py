"""``compile_pipeline``: the two ways users compile a denoiser, as one call (the CLI's ``--compile``).

``regional`` compiles each repeated block once for all its copies: what diffusers'
``compile_repeated_blocks()`` does, and what fastdiff's per-block decisions fit best (the
decisions sit between blocks, outside every graph). Where the class declares no repeated blocks
(SD3, PixArt, DiT in diffusers 0.42), the anatomy's block classes are compiled instead, so every
family has a regional compile. ``full`` compiles the whole denoiser (``model.compile()``); with
fastdiff applied its graph breaks at each module fastdiff decides for, a number fixed by the plan.

Either may come before or after :func:`fastdiff.apply`; the engine reads what was compiled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .core.accelerator import compiled_wrapper, find_denoiser

COMPILE_MODES = ("none", "regional", "full")

__all__ = ["COMPILE_MODES", "compile_pipeline", "regional_block_classes"]


def regional_block_classes(denoiser: torch.nn.Module) -> tuple[str, ...]:
    """The block classes a regional compile compiles: diffusers' ``_repeated_blocks`` where the
    class declares them, otherwise the classes of the blocks fastdiff's anatomy lists."""
    declared = tuple(getattr(denoiser, "_repeated_blocks", None) or ())
    if declared:
        return declared
    from .anatomy import anatomy_of

    anatomy = anatomy_of(denoiser, "--compile regional")
    modules = dict(denoiser.named_modules())
    return tuple(dict.fromkeys(type(modules[block.path]).__name__ for block in anatomy.blocks))


def compile_pipeline(pipe: DiffusionPipeline, mode: str = "regional",
                     options: Mapping[str, Any] | None = None) -> list[str]:
    """Compile ``pipe``'s denoiser in place: ``"regional"`` (its repeated blocks), ``"full"`` (the
    whole model) or ``"none"``; ``options`` go to ``torch.compile`` (``mode``, ``backend``,
    ``dynamic``, ``fullgraph``...). Returns the compiled modules' paths. Compilation itself happens
    at the first call (its time is the first call's extra time)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile: must be one of {list(COMPILE_MODES)}, got {mode!r}")
    name, denoiser = find_denoiser(pipe)
    if mode == "none":
        return []
    if compiled_wrapper(getattr(pipe, name)) is not None or _compiled(denoiser):
        raise ValueError(f"compile: the pipeline's {name} is already compiled")
    kwargs = dict(options or {})
    if mode == "full":
        denoiser.compile(**kwargs)
        return [name]
    classes = set(regional_block_classes(denoiser))
    compiled = []
    for path, module in denoiser.named_modules():
        if type(module).__name__ in classes:
            module.compile(**kwargs)
            compiled.append(f"{name}.{path}")
    if not compiled:
        raise ValueError(f"compile: no block of classes {sorted(classes)} found in the {name}")
    return compiled


def _compiled(denoiser: torch.nn.Module) -> bool:
    return any(module.__dict__.get("_compiled_call_impl") is not None for module in denoiser.modules())
