"""Drop-in diffusers pipelines: the same classes, plus ``from_pretrained(..., acceleration=[...])``.

``from fastdiff.pipelines import StableDiffusionXLPipeline`` gives a subclass of diffusers'
class of that name (any pipeline diffusers exports works), so the call signature and outputs
are diffusers' own; the accelerator handle is ``pipe.acceleration``. The generic loaders work
the same way: ``DiffusionPipeline.from_pretrained`` and the ``AutoPipelineFor...`` classes pick
the pipeline class from the model (a built-in name, a folder or a hub id) as diffusers does, and
return the drop-in of that class.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import diffusers
from diffusers import DiffusionPipeline as _DiffusionPipeline

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
        elif cls._fastdiff_wraps is _DiffusionPipeline:
            # diffusers reads the class from the folder only for a class named DiffusionPipeline
            # of its own module; the drop-in is chosen after loading
            pipe = _adopt(_DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, *args, **kwargs))
        else:
            pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]
        if methods:
            apply(pipe, *methods, count_flops=count_flops)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: _DiffusionPipeline, *, acceleration: Method | Sequence[Method] | None = None,
                  count_flops: bool = False, **kwargs: Any) -> Any:
        if cls._fastdiff_wraps is _DiffusionPipeline:  # the same class as ``pipeline``, as a drop-in
            pipe = _adopt(drop_in(_wrapped(type(pipeline))).from_pipe(pipeline, **kwargs))
        else:
            pipe = super().from_pipe(pipeline, **kwargs)  # type: ignore[misc]
        methods = _as_methods(acceleration)
        if methods:
            apply(pipe, *methods, count_flops=count_flops)
        return pipe


class AutoPipelineDropIn:
    """diffusers' ``AutoPipelineFor...`` loaders (the task's pipeline class chosen from the model),
    returning that class's drop-in and taking ``acceleration=``; a built-in model is loaded by name
    and converted to the task's class with the same components (``from_pipe``)."""

    _fastdiff_wraps: type

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any,
                        acceleration: Method | Sequence[Method] | None = None, count_flops: bool = False,
                        **kwargs: Any) -> Any:
        from ..models import BUILTIN_MODELS, build_builtin

        name = pretrained_model_name_or_path
        if isinstance(name, str) and name in BUILTIN_MODELS:
            built = build_builtin(name, torch_dtype=kwargs.get("torch_dtype") or _float32())
            pipe = cls._fastdiff_wraps.from_pipe(built)
        else:
            pipe = cls._fastdiff_wraps.from_pretrained(name, *args, **kwargs)
        return _accelerated(_adopt(pipe), acceleration, count_flops)

    @classmethod
    def from_pipe(cls, pipeline: _DiffusionPipeline, *, acceleration: Method | Sequence[Method] | None = None,
                  count_flops: bool = False, **kwargs: Any) -> Any:
        pipe = cls._fastdiff_wraps.from_pipe(pipeline, **kwargs)
        return _accelerated(_adopt(pipe), acceleration, count_flops)


def _accelerated(pipe: Any, acceleration: Method | Sequence[Method] | None, count_flops: bool) -> Any:
    methods = _as_methods(acceleration)
    if methods:
        apply(pipe, *methods, count_flops=count_flops)
    return pipe


def _wrapped(cls: type) -> type:
    """The diffusers class behind a pipeline's class, which may be a drop-in and may be
    accelerated (``apply`` gives the pipeline a same-named subclass)."""
    cls = getattr(cls, "_fastdiff_base", cls)
    return getattr(cls, "_fastdiff_wraps", cls)


def _adopt(pipe: Any) -> Any:
    """Make a pipeline that diffusers built an instance of its class's drop-in, in place."""
    if isinstance(pipe, AcceleratedPipelineMixin) or not isinstance(pipe, _DiffusionPipeline):
        return pipe
    pipe.__class__ = drop_in(type(pipe))
    if type(pipe).__name__ == "DiffusionGemmaPipeline" and hasattr(pipe, "model"):
        from .block_diffusion import accept_past_key_values

        accept_past_key_values(pipe.model)  # what the drop-in's __init__ does
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
    if not (isinstance(base, type) and issubclass(base, _DiffusionPipeline)):
        raise TypeError(f"{base!r} is not a diffusers pipeline class")
    extra = _accepting_past_key_values(base) if base.__name__ == "DiffusionGemmaPipeline" else {}
    return type(base.__name__, (AcceleratedPipelineMixin, base),
                {"__module__": __name__, "__qualname__": base.__name__, "__doc__": base.__doc__,
                 "_fastdiff_wraps": base, **extra})


def _auto_drop_in(base: type) -> type:
    return type(base.__name__, (AutoPipelineDropIn,),
                {"__module__": __name__, "__qualname__": base.__name__, "__doc__": base.__doc__,
                 "_fastdiff_wraps": base})


def __getattr__(name: str) -> type:
    base = getattr(diffusers, name, None) if not name.startswith("_") else None
    if isinstance(base, type) and issubclass(base, _DiffusionPipeline):
        cls = drop_in(base)
    elif name.startswith("AutoPipelineFor") and isinstance(base, type) and hasattr(base, "from_pipe"):
        cls = _auto_drop_in(base)
    else:
        raise AttributeError(
            f"fastdiff.pipelines has no {name!r}: it mirrors diffusers' pipeline classes "
            "(e.g. DiffusionPipeline, StableDiffusionXLPipeline, PixArtAlphaPipeline, AutoPipelineForText2Image)"
        )
    globals()[name] = cls
    return cls
