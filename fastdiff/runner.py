"""One way to turn "prompt, steps, seed, size" into a call of any supported pipeline.

The CLI, the benchmark and the evaluations all generate through here, so a text-to-image
pipeline and a class-conditional one (DiT) are driven the same way and seeds mean the same.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .core.accelerator import check_composition, pipeline_default_steps
from .core.method import Method
from .media import pipeline_outputs
from .models import builtin_info, is_builtin, load_pipeline

GENERIC_PROMPT = "a photograph of an astronaut riding a horse"


def example_prompt(model: str) -> str:
    """A prompt the model understands: its built-in example, else a generic text prompt."""
    return builtin_info(model).example_prompt if is_builtin(model) else GENERIC_PROMPT


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = GENERIC_PROMPT
    steps: int | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    batch_size: int = 1
    num_frames: int | None = None
    call_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Further pipeline arguments (a built-in's ``call_options``), passed where the pipeline takes them."""

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a multiple of 8 and >= 8, got {value}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")

    def with_model_defaults(self, model: str) -> GenerationRequest:
        """Fill unset fields from a built-in model's recommended settings."""
        if not is_builtin(model):
            return self
        info = builtin_info(model)
        return replace(
            self,
            steps=self.steps or info.num_inference_steps,
            height=self.height or info.height,
            width=self.width or info.width,
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else info.guidance_scale,
            num_frames=self.num_frames or info.num_frames,
            call_options={**info.call_options, **self.call_options},
        )


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: {device!r} is not a torch device (use auto, cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise ValueError(f"dtype: {dtype!r} is not one of {['auto', *choices]}")
    return choices[dtype]


def load(model: str, device: str = "auto", dtype: str = "auto") -> DiffusionPipeline:
    """Load a pipeline by builtin name, local path or hub id, placed on the device."""
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    pipe = load_pipeline(model, torch_dtype=torch_dtype)
    return pipe.to(target)


def call_kwargs(pipe: DiffusionPipeline, request: GenerationRequest) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)``, using only the parameters that pipeline accepts."""
    params = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict[str, Any] = {}
    if "prompt" in params:
        kwargs["prompt"] = [request.prompt] * request.batch_size
        if request.negative_prompt is not None and "negative_prompt" in params:
            kwargs["negative_prompt"] = [request.negative_prompt] * request.batch_size
    elif "class_labels" in params:
        kwargs["class_labels"] = _class_labels(pipe, request.prompt) * request.batch_size
    if request.steps is not None:
        kwargs["num_inference_steps"] = request.steps
    for name in ("height", "width", "guidance_scale", "num_frames"):
        value = getattr(request, name)
        if value is not None and name in params:
            kwargs[name] = value
    kwargs.update({name: value for name, value in request.call_options.items() if name in params})
    if "clean_caption" in params and not _caption_cleaning_available():
        kwargs["clean_caption"] = False  # the pipeline would say so twice per call, then do the same
    device = getattr(pipe, "device", torch.device("cpu"))
    generator_device = "cpu" if device.type == "mps" else device
    kwargs["generator"] = torch.Generator(generator_device).manual_seed(request.seed)
    return kwargs


def _caption_cleaning_available() -> bool:
    """PixArt-style pipelines clean captions only with beautifulsoup4 and ftfy installed."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return is_bs4_available() and is_ftfy_available()


def _class_labels(pipe: DiffusionPipeline, prompt: str) -> list[int]:
    """Class-conditional pipelines take a label: an integer, or a name the pipeline knows."""
    if prompt.strip().isdigit():
        return [int(prompt)]
    labels = getattr(pipe, "labels", None) or {}
    if prompt in labels:
        return [labels[prompt]]
    if labels:
        raise ValueError(
            f"prompt: {prompt!r} is not a class of this class-conditional model; use a class index "
            f"or one of {sorted(labels)[:10]}"
        )
    return [0]


def generate(pipe: DiffusionPipeline, request: GenerationRequest, output_type: str = "pil") -> Any:
    return pipeline_outputs(pipe(**call_kwargs(pipe, request), output_type=output_type))


CALIBRATION_SEED = 10_000  # far from the seeds benchmarks and evaluations generate with


def calibration_prompts(model: str, request: GenerationRequest) -> list[str]:
    """Prompts a method calibrates on: every class of a digits model, else the request's prompt."""
    if is_builtin(model) and builtin_info(model).digits_task:
        from .models.digits import digit_prompt

        return [digit_prompt(label) for label in range(10)]
    return [request.prompt]


def prepare_methods(pipe: DiffusionPipeline, methods: Sequence[Method], request: GenerationRequest,
                    model: str = "") -> list[Method]:
    """Methods ready to apply at the request's settings (those that need a calibration get one).
    Methods that could not be applied together are refused first, before any calibration runs."""
    check_composition(pipe, methods)
    steps = request.steps or pipeline_default_steps(pipe)
    params = inspect.signature(type(pipe).__call__).parameters
    settings = {name: getattr(request, name) for name in ("height", "width", "guidance_scale", "num_frames")
                if getattr(request, name) is not None and name in params}
    settings.update({name: value for name, value in request.call_options.items() if name in params})
    return [m.prepare(pipe, steps=steps, prompts=calibration_prompts(model, request), seed=CALIBRATION_SEED,
                      **settings) for m in methods]

