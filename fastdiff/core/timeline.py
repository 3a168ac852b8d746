"""How noisy the latent is at each step of a call, for plans that depend on the timestep.

Most plans are a function of the step index. A time-dependent one (early exiting) is defined on
the noise level instead — the timestep as a fraction of the training timesteps, 1 = pure noise —
so that one schedule means the same thing at 20 or 50 steps, with any timestep spacing, and in
img2img where the call starts part-way down.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch


def noise_levels(timesteps: Any, scheduler: Any) -> tuple[float, ...] | None:
    """Timesteps as fractions of the scheduler's training timesteps, clipped to [0, 1]."""
    if timesteps is None:
        return None
    if isinstance(timesteps, torch.Tensor):
        values = [float(t) for t in timesteps.reshape(-1).tolist()]
    else:
        values = [float(t) for t in timesteps]
    config = getattr(scheduler, "config", None)
    total = float(getattr(config, "num_train_timesteps", 0) or 0) or 1000.0
    return tuple(min(max(v / total, 0.0), 1.0) for v in values)


def linear_levels(num_steps: int) -> tuple[float, ...]:
    """Evenly spaced from pure noise down: the fallback when a scheduler cannot say."""
    return tuple((num_steps - s) / num_steps for s in range(num_steps))


def announced_levels(scheduler: Any, num_steps: int) -> tuple[float, ...] | None:
    """The noise levels of the call in progress (after ``set_timesteps``), when they fit ``num_steps``:
    the last ``num_steps`` of the scheduler's list (img2img runs only its tail)."""
    levels = noise_levels(getattr(scheduler, "timesteps", None), scheduler)
    if levels is None or len(levels) < num_steps:
        return None
    levels = levels[len(levels) - num_steps:]
    return levels if len(levels) == num_steps else None


def planned_levels(scheduler: Any, num_steps: int) -> tuple[float, ...]:
    """The noise levels a call with ``num_steps`` steps will visit, from a copy of its scheduler.

    A call's own plan is always made from the timesteps its pipeline set (:func:`announced_levels`);
    this is the prediction shown before a call. Flow-matching schedulers that shift by image size
    (Flux: ``use_dynamic_shifting``) cannot say without the call's ``mu``: the timesteps they were
    last set to are used when they are for ``num_steps`` steps, else the shift the pipelines use
    at the model's largest configured image (``max_shift``, e.g. Flux at 1024 px) on the
    evenly spaced sigmas those pipelines pass.
    """
    if scheduler is not None and hasattr(scheduler, "set_timesteps"):
        levels = _probe(scheduler, num_steps)
        if levels is None:
            current = noise_levels(getattr(scheduler, "timesteps", None), scheduler)
            if current is not None and len(current) == num_steps:
                return current
            config = getattr(scheduler, "config", None)
            mu = getattr(config, "max_shift", None)
            if mu is not None and "mu" in inspect.signature(scheduler.set_timesteps).parameters:
                levels = _probe(scheduler, num_steps, sigmas=list(linear_levels(num_steps)), mu=float(mu))
        if levels is not None and len(levels) == num_steps:
            return levels
    return linear_levels(num_steps)


def _probe(scheduler: Any, num_steps: int, **options: Any) -> tuple[float, ...] | None:
    try:
        probe = copy.deepcopy(scheduler)
        probe.set_timesteps(num_steps, **options)
        return noise_levels(probe.timesteps, probe)
    except Exception:  # e.g. a flow-matching scheduler that needs the image size (mu) first
        return None
