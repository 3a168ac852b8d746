"""Schedulers for discrete diffusion language models (diffusers-style, one class for every sampler)."""

from .corruption import CORRUPTIONS
from .discrete_diffusion import (
    ALIASES,
    SAMPLERS,
    DiscreteDiffusionScheduler,
    DiscreteDiffusionSchedulerOutput,
    MaskedDiffusionScheduler,
    MaskedDiffusionSchedulerOutput,
    sampler_name,
)
from .noise_schedules import NOISE_SCHEDULES, alpha, sigma, time_of

__all__ = ["ALIASES", "CORRUPTIONS", "DiscreteDiffusionScheduler", "DiscreteDiffusionSchedulerOutput",
           "MaskedDiffusionScheduler", "MaskedDiffusionSchedulerOutput", "NOISE_SCHEDULES", "SAMPLERS", "alpha",
           "sampler_name", "sigma", "time_of"]
