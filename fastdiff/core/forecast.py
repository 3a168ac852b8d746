"""Forecasting reused outputs from their recent trajectory instead of holding the last one.

A reused module's output is a feature that drifts smoothly along the sampling trajectory, so
at a reused step it can be predicted from the outputs computed at the last few computed steps,
extrapolated to the current step's noise level. With ``k`` points the prediction is the
polynomial of degree ``k - 1`` through them, evaluated at the new time (for evenly spaced
steps these are the Adams–Bashforth weights ``2, -1`` and ``3, -3, 1``; for the uneven spacing
of real schedules the weights follow the actual times). ``k = 1`` is holding: the last output as
it was, bit for bit. Where fewer than ``k`` computed outputs exist yet (early in a call), the
highest order they allow is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .rules import zip_outputs

FORECASTS = {"hold": 1, "ab2": 2, "ab3": 3}
REUSING_METHODS = ("deepcache", "blockcache", "encoder", "tgate")


def forecast_name(value: Any, owner: str) -> str:
    """``value`` as one of the :data:`FORECASTS` names (case and spaces forgiven); a clear error
    naming ``owner`` and the allowed names for anything else."""
    name = value.strip().lower() if isinstance(value, str) else None
    if name not in FORECASTS:
        raise ValueError(f"{owner}: forecast must be one of {list(FORECASTS)}, got {value!r}")
    return name


def forecast_order(value: Any, owner: str) -> int:
    """The number of points a ``forecast`` name extrapolates from."""
    return FORECASTS[forecast_name(value, owner)]


def extrapolation_weights(times: Sequence[float], at: float) -> list[float]:
    """Weights ``w`` with ``sum(w[i] * f(times[i])) == f(at)`` for every polynomial ``f`` of degree
    below ``len(times)`` (Lagrange's basis evaluated at ``at``). The times must be distinct."""
    weights = []
    for i, t_i in enumerate(times):
        w = 1.0
        for j, t_j in enumerate(times):
            if j != i:
                w *= (at - t_j) / (t_i - t_j)
        weights.append(w)
    return weights


def combine(values: Sequence[Any], weights: Sequence[float]) -> Any:
    """``sum(w * v)`` over the floating-point tensors of equally shaped outputs (tensors, tuples,
    lists, dicts, dataclasses); every other leaf (flags, integer tensors, ``None``) is taken from
    ``values[0]``, the most recent. Half-precision tensors are summed in float32."""

    def weighted(tensors: list[torch.Tensor]) -> torch.Tensor:
        first = tensors[0]
        if not first.is_floating_point() or any(t.shape != first.shape for t in tensors[1:]):
            return first
        wide = torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else first.dtype
        total = first.to(wide) * weights[0]
        for tensor, weight in zip(tensors[1:], weights[1:]):
            total = total + tensor.to(wide) * weight
        return total.to(first.dtype)

    return zip_outputs(values, weighted)


def forecast(points: Sequence[tuple[float, Any]], at: float, order: int) -> Any:
    """The output predicted at time ``at`` from ``points`` (``(time, output)``, most recent first),
    using up to ``order`` of them with distinct times; one point (or ``order`` 1) holds it."""
    chosen: list[tuple[float, Any]] = []
    for time, value in points:
        if len(chosen) == order:
            break
        if all(time != t for t, _ in chosen):
            chosen.append((time, value))
    if len(chosen) < 2:
        return points[0][1]
    weights = extrapolation_weights([t for t, _ in chosen], at)
    return combine([v for _, v in chosen], weights)


@dataclasses.dataclass
class Stacked:
    """Forecasts for the several steps one batched denoiser call computes (encoder propagation's
    batched decoders), in step order: a rule that serves stacked calls puts each on its rows."""

    parts: list[Any]
