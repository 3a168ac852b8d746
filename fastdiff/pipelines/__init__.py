"""Drop-in diffusers pipelines: the same classes, plus ``from_pretrained(..., acceleration=[...])``.

``from fastdiff.pipelines import StableDiffusionXLPipeline`` gives a subclass of diffusers'
class of that name (any pipeline diffusers exports works), so the call signature and outputs
are diffusers' own; the accelerator handle is ``pipe.acceleration``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import diffusers
from diffusers import DiffusionPipeline

from ..core.accelerator import Accelerator, apply
from ..core.method import Method
from .masked_diffusion_lm import (
    MaskedDiffusionLMPipeline,
    MaskedDiffusionLMPipelineOutput,
)

__all__ = ["AcceleratedPipelineMixin", "MaskedDiffusionLMPipeline", "MaskedDiffusionLMPipelineOutput", "drop_in"]


def _as_methods(acceleration: Method | Sequence[Method] | None) -> list[Method]:
    if acceleration is None:
        return []
    if isinstance(acceleration, Method):
        return [acceleration]
    return list(acceleration)


class AcceleratedPipelineMixin:
    """Adds the ``acceleration=`` keyword to the loaders diffusers users already call."""

    acceleration: Accelerator | None = None
    _fastdiff_wraps: type

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any,
                        acceleration: Method | Sequence[Method] | None = None, count_flops: bool = False,
                        **kwargs: Any) -> Any:
        from ..models import BUILTIN_MODELS

        methods = _as_methods(acceleration)
        if isinstance(pretrained_model_name_or_path, str) and pretrained_model_name_or_path in BUILTIN_MODELS:
            pipe = _builtin_as(cls, pretrained_model_name_or_path, kwargs)
        else:
            pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]
        if methods:
            apply(pipe, *methods, count_flops=count_flops)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, *, acceleration: Method | Sequence[Method] | None = None,
                  count_flops: bool = False, **kwargs: Any) -> Any:
        pipe = super().from_pipe(pipeline, **kwargs)  # type: ignore[misc]
        methods = _as_methods(acceleration)
        if methods:
            apply(pipe, *methods, count_flops=count_flops)
        return pipe


def _builtin_as(cls: type, name: str, kwargs: dict) -> Any:
    """A built-in model loaded through a drop-in class must be of that class's kind."""
    from ..models import build_builtin

    built = build_builtin(name, torch_dtype=kwargs.get("torch_dtype") or _float32())
    if not isinstance(built, cls._fastdiff_wraps):
        raise ValueError(
            f"model {name!r} is a {type(built).__name__}, not a {cls.__name__}; "
            f"load it with fastdiff.pipelines.{type(built).__name__}"
        )
    built.__class__ = drop_in(type(built))
    return built


def _float32() -> Any:
    import torch

    return torch.float32


def _accepting_past_key_values(base: type) -> dict[str, Any]:
    """diffusers' DiffusionGemmaPipeline on transformers 5.24 (see ``accept_past_key_values``); the
    signature stays the base class's, which diffusers reads to find the pipeline's components."""

    @functools.wraps(base.__init__)
    def __init__(self: Any, model: Any, *args: Any, **kwargs: Any) -> None:
        from .block_diffusion import accept_past_key_values

        base.__init__(self, accept_past_key_values(model), *args, **kwargs)

    return {"__init__": __init__}


@functools.cache
def drop_in(base: type) -> type:
    """The fastdiff subclass of a diffusers pipeline class (cached: one per base class)."""
    if not (isinstance(base, type) and issubclass(base, DiffusionPipeline)):
        raise TypeError(f"{base!r} is not a diffusers pipeline class")
    extra = _accepting_past_key_values(base) if base.__name__ == "DiffusionGemmaPipeline" else {}
    return type(base.__name__, (AcceleratedPipelineMixin, base),
                {"__module__": __name__, "__qualname__": base.__name__, "__doc__": base.__doc__,
                 "_fastdiff_wraps": base, **extra})


def __getattr__(name: str) -> type:
    base = getattr(diffusers, name, None) if not name.startswith("_") else None
    if not (isinstance(base, type) and issubclass(base, DiffusionPipeline)):
        raise AttributeError(
            f"fastdiff.pipelines has no {name!r}: it mirrors diffusers' pipeline classes "
            "(e.g. StableDiffusionPipeline, StableDiffusionXLPipeline, PixArtAlphaPipeline, DiTPipeline)"
        )
    cls = drop_in(base)
    globals()[name] = cls
    return cls
