"""Masking schedules of masked diffusion: α(t), the chance that a token is still unmasked at time
t ∈ [0, 1] (α(0) = 1: clean text; α(1) ≈ 0: all masked).

Named explicitly, because two different curves are both called "cosine" in the literature:
MDLM's (α ≈ cos(πt/2)) and MaskGIT's (the masked share is cos(π/2 · progress), so
α = 1 − sin(πt/2)). At t = 0.5 the first has 71 % of tokens unmasked, the second 29 %.
"""

from __future__ import annotations

import math

import torch

NOISE_SCHEDULES = ("log-linear", "linear", "mdlm-cosine", "maskgit-cosine")


def _check(name: str) -> None:
    if name not in NOISE_SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {name!r}")


def alpha(name: str, t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """α(t) in float64. ``eps``: log-linear and MDLM cosine keep α(1) = eps (σ stays finite)."""
    _check(name)
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)
    if name == "linear":
        return 1.0 - t
    if name == "log-linear":  # σ(t) = −log(1 − (1 − eps)·t), the MDLM default
        return 1.0 - (1.0 - eps) * t
    if name == "mdlm-cosine":  # σ(t) = −log(eps + (1 − eps)·cos(πt/2))
        return eps + (1.0 - eps) * torch.cos(t * math.pi / 2)
    return 1.0 - torch.sin(t * math.pi / 2)  # maskgit-cosine


def time_of(name: str, a: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The inverse: the time at which α equals ``a`` (for the first-hitting sampler's jumps)."""
    _check(name)
    a = torch.as_tensor(a, dtype=torch.float64)
    if name == "linear":
        t = 1.0 - a
    elif name == "log-linear":
        t = (1.0 - a) / (1.0 - eps)
    elif name == "mdlm-cosine":
        t = torch.acos(((a - eps) / (1.0 - eps)).clamp(-1.0, 1.0)) * 2 / math.pi
    else:
        t = torch.asin((1.0 - a).clamp(-1.0, 1.0)) * 2 / math.pi
    return t.clamp(0.0, 1.0)


def sigma(name: str, t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Total noise σ(t) = −log α(t): the time input of MDLM-style models."""
    return -torch.log(alpha(name, t, eps).clamp_min(1e-12))
