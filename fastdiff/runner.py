"""One way to turn "prompt, steps, seed, size" into a call of any supported pipeline.

The CLI, the benchmark and the evaluations all generate through here, so a text-to-image
pipeline and a class-conditional one (DiT) are driven the same way and seeds mean the same.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
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
    with _loading_bars_off(is_builtin(model)):
        pipe = load_pipeline(model, torch_dtype=torch_dtype)
    return pipe.to(target)


@contextmanager
def _loading_bars_off(off: bool) -> Iterator[None]:
    """No loading bars for a built-in: its weights ship in the package and load in a moment, and
    the bars (diffusers' per component, transformers' per weight file) would be the only lines
    printed before an error about the request, or before the one line of a result."""
    from transformers.utils import logging as transformers_logging

    from .core.progress import all_bars_off

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if off:
        transformers_logging.disable_progress_bar()
    try:
        with all_bars_off(off):
            yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


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


class RequestError(ValueError):
    """A request this pipeline cannot run (too many steps for its scheduler, a class it does not
    have, a size that cannot fit in memory). The message starts with the command-line option it
    is about (``--steps: ...``), which is also the request field's name."""


def _class_labels(pipe: DiffusionPipeline, prompt: str) -> list[int]:
    """Class-conditional pipelines take a label: an integer in the model's range, or a name the
    pipeline knows. Anything else would fail deep in the embedding lookup with an IndexError."""
    labels = getattr(pipe, "labels", None) or {}
    count = class_count(pipe)
    allowed = f"a class index 0-{count - 1}" if count else "a class index"
    if labels:
        named = sorted(labels.items(), key=lambda item: item[1])
        allowed += " or a class name: " + ", ".join(f"{name} ({index})" for name, index in named[:10])
        allowed += ", ..." if len(named) > 10 else ""
    text = prompt.strip()
    if text.lstrip("+-").isdigit():
        label = int(text)
        if label < 0 or (count is not None and label >= count):
            raise RequestError(f"--prompt: class {label} is out of range for this class-conditional model; "
                               f"give {allowed}")
        return [label]
    if prompt in labels:
        return [labels[prompt]]
    if labels:
        raise RequestError(f"--prompt: {prompt!r} is not a class of this class-conditional model; give {allowed}")
    return [0]


def class_count(pipe: DiffusionPipeline) -> int | None:
    """How many classes a class-conditional denoiser embeds (DiT: ``num_embeds_ada_norm``; the
    label one past them is the unconditional one guidance uses); None when it does not say."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    config = getattr(denoiser, "config", None)
    for key in ("num_embeds_ada_norm", "num_class_embeds", "num_classes"):
        value = config.get(key) if config is not None and hasattr(config, "get") else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _scheduler_runs(scheduler: Any, steps: int) -> bool:
    """Whether ``scheduler`` gets through a whole call of ``steps`` steps: a dry run of a copy on
    a one-element sample. The limit is the scheduler's own arithmetic (DDIM with a step offset
    indexes past its training timesteps at their full count, multistep solvers run out of
    distinct noise levels sooner), so running it is the one test that holds for every scheduler."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    sample = torch.zeros(1, 1, 1, 1)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = type(scheduler).from_config(scheduler.config)
            options = {"mu": 1.0} if probe.config.get("use_dynamic_shifting") else {}  # required then; any value
            probe.set_timesteps(steps, **options)
            for t in probe.timesteps:
                model_input = probe.scale_model_input(sample, t) if hasattr(probe, "scale_model_input") else sample
                sample = probe.step(torch.zeros_like(model_input), t, sample, return_dict=False)[0]
    except Exception:  # noqa: BLE001 - any failure of the dry run is the answer "no"
        return False
    finally:
        diffusers_logging.set_verbosity(level)
    return True


STEPS_PER_TRAINING_TIMESTEP = 10
"""Step counts are limited to this many times the scheduler's training timesteps even where it
would run more (flow matching's continuous noise levels): past that, no two steps differ in a
way the model was trained to tell apart, while the dry run and the call's arrays grow with the
count (a billion steps would fail allocating them)."""


def steps_limit(scheduler: Any) -> int:
    config = getattr(scheduler, "config", None)
    trained = config.get("num_train_timesteps") if config is not None and hasattr(config, "get") else None
    return STEPS_PER_TRAINING_TIMESTEP * int(trained or 1000)


def max_steps(scheduler: Any, steps: int) -> int | None:
    """None when ``scheduler`` runs ``steps`` steps; else the most it runs below that (found by
    doubling from a few steps, then bisection), and never more than :func:`steps_limit`. A
    scheduler the dry run cannot drive even at a few steps is not judged (None): that is no
    reason to refuse a request."""
    if scheduler is None or not hasattr(scheduler, "set_timesteps"):
        return None
    limit = steps_limit(scheduler)
    if steps > limit:
        return max_steps(scheduler, limit) or limit
    if _scheduler_runs(scheduler, steps):
        return None
    if steps > 1 and _scheduler_runs(scheduler, steps - 1):
        return steps - 1  # the usual case: the training timestep count, one past an offset
    low, high = min(steps - 2, 4), steps - 1
    if low < 1 or not _scheduler_runs(scheduler, low):
        return None
    # doubling first: a run that fails stops where it fails, so small probes keep the search short
    while 2 * low < high and _scheduler_runs(scheduler, 2 * low):
        low *= 2
    high = min(high, 2 * low)
    while high - low > 1:
        middle = (low + high) // 2
        if _scheduler_runs(scheduler, middle):
            low = middle
        else:
            high = middle
    return low


def check_steps(pipe: DiffusionPipeline, steps: int) -> None:
    """Refuse a step count the pipeline's scheduler cannot run, naming the most it can."""
    scheduler = getattr(pipe, "scheduler", None)
    most = max_steps(scheduler, steps)
    if most is not None:
        trained = scheduler.config.get("num_train_timesteps")
        beyond = (f"; past {STEPS_PER_TRAINING_TIMESTEP} steps per training timestep none differ"
                  if most == steps_limit(scheduler) else "")
        raise RequestError(
            f"--steps: {steps} steps is more than this pipeline's {type(scheduler).__name__} can run"
            + (f" (trained on {trained} timesteps)" if trained else "") + f"; at most {most}{beyond}")


def _format_bytes(value: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value / 2**10:.1f} KiB"


def free_memory_bytes(device: torch.device) -> int | None:
    """What the device can still give out: free GPU memory, or the system's available memory
    (Linux ``MemAvailable``) for the CPU; None where it is not known."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        from .parallel.group import available_memory_bytes

        return available_memory_bytes()
    return None


def pixel_bytes(pipe: DiffusionPipeline | None) -> int:
    """Bytes per output pixel a call needs at least, whatever the model: the decoded image in
    float32 twice (the VAE's output and the post-processed copy) and, with a VAE, its decoder's
    widest full-resolution activation twice (the input and output of its last convolutions).
    A lower bound: a request it refuses cannot run; one it passes may still need more."""
    per_pixel = 2 * 3 * 4
    vae = getattr(pipe, "vae", None) if pipe is not None else None
    config = getattr(vae, "config", None)
    channels = getattr(config, "block_out_channels", None) or [getattr(config, "base_dim", None)]  # Wan: base_dim
    if channels[0]:
        dtype = getattr(vae, "dtype", torch.float32)
        per_pixel += 2 * int(channels[0]) * torch.empty((), dtype=dtype).element_size()
    return per_pixel


def check_memory(request: GenerationRequest, device: torch.device, pipe: DiffusionPipeline | None = None) -> None:
    """Refuse a size that cannot fit in the memory the device has free, with the numbers and the
    largest square size that could (checked against a lower bound, see :func:`pixel_bytes`)."""
    if request.height is None or request.width is None:
        return
    if pipe is not None and "height" not in inspect.signature(type(pipe).__call__).parameters:
        return  # a fixed-size model (DiT): the request's size is not used
    free = free_memory_bytes(device)
    if free is None:
        return
    images = request.batch_size * (request.num_frames or 1)
    per_pixel = pixel_bytes(pipe) * images
    need = request.height * request.width * per_pixel
    if need <= free:
        return
    side = int((free / per_pixel) ** 0.5) // 8 * 8
    what = f"{request.height}x{request.width}" + (f" x {images} images" if images > 1 else "")
    raise RequestError(
        f"--height/--width: {what} needs at least {_format_bytes(need)} of memory (the decoded image"
        + (" and the VAE decoder's full-size activations" if pipe is not None and getattr(pipe, "vae", None) else "")
        + f"), but {device.type} has {_format_bytes(free)} free; "
        + (f"at most about {side}x{side} fits" if side >= 8 else "no size fits"))


def check_request(pipe: DiffusionPipeline, request: GenerationRequest) -> None:
    """Everything about a request that can be judged on the loaded pipeline before any call:
    the step count its scheduler can run, the class label of a class-conditional model, and the
    memory the size needs. Each failure is a :class:`RequestError` naming the option."""
    check_steps(pipe, request.steps or pipeline_default_steps(pipe))
    check_prompt(pipe, request.prompt)
    check_memory(request, getattr(pipe, "device", torch.device("cpu")), pipe)


def check_prompt(pipe: DiffusionPipeline, prompt: str) -> None:
    """A class-conditional pipeline's prompt must name one of its classes; text prompts are free."""
    if "class_labels" in inspect.signature(type(pipe).__call__).parameters:
        _class_labels(pipe, prompt)


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

