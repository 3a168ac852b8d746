"""Schedulers for masked diffusion language models (diffusers-style, one class for every sampler)."""

from .masked_diffusion import (
    SAMPLERS,
    MaskedDiffusionScheduler,
    MaskedDiffusionSchedulerOutput,
    sampler_name,
)
from .noise_schedules import NOISE_SCHEDULES, alpha, sigma, time_of

__all__ = ["MaskedDiffusionScheduler", "MaskedDiffusionSchedulerOutput", "NOISE_SCHEDULES", "SAMPLERS", "alpha",
           "sampler_name", "sigma", "time_of"]
