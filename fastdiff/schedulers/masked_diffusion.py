"""The scheduler's former module name: :mod:`.discrete_diffusion` holds it now."""

from .discrete_diffusion import *  # noqa: F403
from .discrete_diffusion import ALIASES, SAMPLERS, MaskedDiffusionScheduler, MaskedDiffusionSchedulerOutput, sampler_name

__all__ = ["ALIASES", "SAMPLERS", "MaskedDiffusionScheduler", "MaskedDiffusionSchedulerOutput", "sampler_name"]
