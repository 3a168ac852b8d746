"""How a module's output is kept at a computed step and given back at a reused one.

The default keeps the output as it is. Methods refine this without touching the hook: Block
Caching keeps only what a block adds to its input and corrects it by a fitted scale and shift;
encoder propagation serves one kept output to a batch that stacks several steps. Calibration
runs observe every computed output through the same door.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch


def input_signature(args: tuple, kwargs: dict) -> tuple:
    """Shapes, dtypes and devices of the tensor inputs: a cached output is valid only for the same."""
    parts: list[Any] = []

    def visit(name: Any, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    parts.append(((name, i), tuple(item.shape), item.dtype, item.device))

    for i, value in enumerate(args):
        visit(i, value)
    for key, value in kwargs.items():
        visit(key, value)
    return tuple(parts)


def batch_multiple(signature: tuple, kept: tuple) -> int | None:
    """``r`` when every input is ``r`` copies of the kept inputs' batch (same names and trailing
    shapes, leading dimension ``r`` times larger); ``None`` otherwise."""
    if len(signature) != len(kept):
        return None
    ratio: int | None = None
    for (name, shape, dtype, device), (kname, kshape, kdtype, kdevice) in zip(signature, kept):
        if name != kname or dtype != kdtype or device != kdevice or len(shape) != len(kshape):
            return None
        if not shape:
            if shape != kshape:
                return None
            continue
        if shape[1:] != kshape[1:] or kshape[0] == 0 or shape[0] % kshape[0]:
            return None
        r = shape[0] // kshape[0]
        if ratio is None:
            ratio = r
        elif ratio != r:
            return None
    return ratio


def main_tensor(output: Any) -> torch.Tensor | None:
    """The hidden states a block hands on: the output itself, or the first item of a tuple/dataclass."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        first = getattr(output, dataclasses.fields(output)[0].name)
        return first if isinstance(first, torch.Tensor) else None
    return None


def with_main_tensor(output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with its main tensor replaced (same container type)."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, (tuple, list)):
        return type(output)([tensor, *output[1:]])
    name = dataclasses.fields(output)[0].name
    return dataclasses.replace(output, **{name: tensor})


def first_input(args: tuple, kwargs: dict) -> Any:
    """The hidden states a block was called on (first positional or ``hidden_states``)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(iter(kwargs.values()), None)


def tile_batch(value: Any, times: int) -> Any:
    """Every tensor in ``value`` repeated ``times`` along the batch (leading) dimension."""
    if times == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat(times, *([1] * (value.dim() - 1))) if value.dim() else value
    if isinstance(value, (tuple, list)):
        return type(value)(tile_batch(v, times) for v in value)
    if isinstance(value, dict):
        return {k: tile_batch(v, times) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: tile_batch(getattr(value, f.name), times) for f in dataclasses.fields(value)}
        )
    return value


def zip_outputs(values: Sequence[Any], leaf: Callable[[list[torch.Tensor]], Any]) -> Any:
    """Equally structured outputs (tensors, tuples, lists, dicts, dataclasses) walked together:
    each place that holds tensors in all of them becomes ``leaf(those tensors)``; every other
    leaf, and any place where the structures disagree, is taken from ``values[0]``."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if any(not isinstance(v, torch.Tensor) for v in values[1:]):
            return first
        return leaf(list(values))
    if isinstance(first, (tuple, list)):
        if any(not isinstance(v, type(first)) or len(v) != len(first) for v in values[1:]):
            return first
        items = [zip_outputs([v[i] for v in values], leaf) for i in range(len(first))]
        return type(first)(items) if isinstance(first, list) or type(first) is tuple else type(first)(*items)
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values[1:]):
            return first
        return type(first)({k: zip_outputs([v[k] for v in values], leaf) for k in first})
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        names = [f.name for f in dataclasses.fields(first)]
        return dataclasses.replace(first, **{n: zip_outputs([getattr(v, n) for v in values], leaf) for n in names})
    return first


def cat_batch(parts: list[Any]) -> Any:
    """Equally structured outputs joined along the batch (leading) dimension, in order."""
    return zip_outputs(parts, lambda tensors: torch.cat(tensors) if tensors[0].dim() else tensors[0])


class ReuseRule:
    """Keep the output as computed; give it back only to inputs of the same shapes."""

    observes = False  # True: ``keep`` is called at every computed step, even when nothing is reused
    forecasts = True  # False: what is given back is held even when the method forecasts
    serves_stacked = False  # True: ``restore`` accepts a Stacked forecast for a call that computes several steps

    def keep(self, args: tuple, kwargs: dict, output: Any, step: int) -> Any:
        return output

    def restore(self, kept: Any, args: tuple, kwargs: dict, step: int, signature: tuple,
                kept_signature: tuple | None) -> Any | None:
        """The output to use at a reused step, or ``None`` when ``kept`` does not fit these inputs."""
        return kept if signature == kept_signature else None

    def skip(self, args: tuple, kwargs: dict) -> Any:
        """The output at a skipped step: by default the input passed through."""
        return first_input(args, kwargs)

    def reset(self) -> None:
        """Forget per-call state (called at the start and end of each pipeline call)."""


DEFAULT_RULE = ReuseRule()


def denoiser_sample(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The latent a denoiser was called on: first positional, ``sample`` (UNets) or ``hidden_states``
    (transformers)."""
    value = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    return value if isinstance(value, torch.Tensor) else None


def map_batched(value: Any, batch: int, fn: Any) -> Any:
    """``fn`` applied to every tensor whose leading dimension is ``batch`` (recursively in tuples,
    lists and dicts); everything else as it is. How a method reshapes one denoiser call's batch."""
    if isinstance(value, torch.Tensor):
        return fn(value) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(map_batched(v, batch, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_batched(v, batch, fn) for k, v in value.items()}
    return value
