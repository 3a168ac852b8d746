"""The corruption kernels of discrete diffusion, as the marginal q_t(x_t | x_0) each one defines.

Every kernel here has the interpolating form of GIDD (von Rütte et al. 2025):

    q_t(· | x_0) = α_t·onehot(x_0) + n_t,    n_t = (1 − α_t)·π_t, a distribution π_t of noise tokens

=========  ======================================  =====================================  ==============
kind       α_t                                     π_t (where the lost mass goes)         papers
=========  ======================================  =====================================  ==============
``mask``   the named noise schedule                the mask token                         MDLM, LLaDA
``uniform`` the named noise schedule               every token of the vocabulary alike    D3PM, UDLM
``hybrid`` (1 − t)/C_t, C_t = 1 + B·(t(1−t))^(γ/2)  mask (share t/C_t) and the non-mask    GIDD
                                                   tokens alike (share B·(t(1−t))^(γ/2)/C_t)
=========  ======================================  =====================================  ==============

GIDD's B = 2^γ·p_u/(1 − p_u) makes ``p_uniform`` the uniform share of all tokens at t = ½; it is
all mask at t = 1 and clean at t = 0, so a GIDD sampler starts from a masked canvas. For γ > 2
the reverse step would need negative jump rates, so γ is limited to (0, 2].

From two times s < t the exact reverse step given a clean guess x̂_0 needs only three numbers
per position (:func:`routes`): the new token is x̂_0, the current token x_t again, or a fresh
noise token from π_s, with probabilities proportional to

    x̂_0: c·α_s + a·α_s·[x_t = x̂_0]     stay: a·n_s(x_t)     noise: c·(1 − α_s)

where a = α_t/α_s and c = n_t(x_t) − a·n_s(x_t) is the chance of jumping to x_t from elsewhere.
For the mask kernel this is MDLM's ancestral step; for the uniform kernel it is the D3PM/DDIM
posterior that diffusers' ``DiscreteDDIMScheduler`` draws.
"""

from __future__ import annotations

import torch

from .noise_schedules import alpha

CORRUPTIONS = ("mask", "uniform", "hybrid")


def check_corruption(name: str) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {name!r}")


def _gidd_shares(t: torch.Tensor, p_uniform: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GIDD's (α_t, mask share, uniform share), each in float64."""
    b = 2.0 ** gamma * p_uniform / (1.0 - p_uniform)
    c = b * (t * (1.0 - t)).clamp_min(0.0) ** (gamma / 2)
    total = 1.0 + c
    return (1.0 - t) / total, t / total, c / total


def survival(kind: str, t: torch.Tensor, *, noise_schedule: str = "log-linear", eps: float = 1e-3,
             p_uniform: float = 0.0, gamma: float = 1.0) -> torch.Tensor:
    """α_t: the chance a token is still its clean self by corruption (not counting a uniform draw
    that lands on it by luck)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if kind == "hybrid":
        return _gidd_shares(t, p_uniform, gamma)[0]
    return alpha(noise_schedule, t, eps)


def noise_mass(kind: str, t: torch.Tensor, tokens: torch.Tensor, vocab: int, mask_id: int | None, *,
               noise_schedule: str = "log-linear", eps: float = 1e-3, p_uniform: float = 0.0,
               gamma: float = 1.0) -> torch.Tensor:
    """n_t(token): the marginal's noise mass on each of ``tokens`` (t broadcast against them)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=tokens.device)
    if kind == "mask":
        lost = 1.0 - alpha(noise_schedule, t, eps)
        return torch.where(tokens == mask_id, lost, torch.zeros_like(lost))
    if kind == "uniform":
        return (1.0 - alpha(noise_schedule, t, eps)) / vocab * torch.ones_like(tokens, dtype=torch.float64)
    _, masked, uniform = _gidd_shares(t, p_uniform, gamma)
    return torch.where(tokens == mask_id, masked, uniform / (vocab - 1))


def noise_distribution(kind: str, t: torch.Tensor, vocab: int, mask_id: int | None, **schedule: float | str) -> torch.Tensor:
    """π_t over the vocabulary (``t``: one time per row) as a (rows × vocab) float64 table."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    tokens = torch.arange(vocab, device=t.device).expand(t.shape[0], vocab)
    mass = noise_mass(kind, t, tokens, vocab, mask_id, **schedule)  # type: ignore[arg-type]
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-300)


def draw_noise(kind: str, t: torch.Tensor, shape: tuple[int, ...], vocab: int, mask_id: int | None,
               generator: torch.Generator | None, device: torch.device, **schedule: float | str) -> torch.Tensor:
    """Tokens from π_t (``t``: one per row). Uniform noise is ``torch.randint(0, vocab, shape)`` on the
    generator, the call diffusers' and transformers' uniform samplers make, so the same generator
    gives the same noise."""
    where = generator.device if generator is not None else device
    if kind == "uniform":
        return torch.randint(0, vocab, shape, generator=generator, device=where).to(device)
    if kind == "mask":
        return torch.full(shape, int(mask_id), dtype=torch.long, device=device)  # type: ignore[arg-type]
    t = torch.as_tensor(t, dtype=torch.float64, device=device).reshape(-1, *([1] * (len(shape) - 1)))
    _, masked, uniform = _gidd_shares(t, float(schedule.get("p_uniform", 0.0)), float(schedule.get("gamma", 1.0)))
    other = torch.randint(0, vocab - 1, shape, generator=generator, device=where).to(device)
    other = other + (other >= int(mask_id)).long()  # type: ignore[arg-type]  # every token but the mask
    draw = torch.rand(shape, generator=generator, dtype=torch.float64, device=where).to(device)
    share = masked / (masked + uniform).clamp_min(1e-300)
    return torch.where(draw < share, torch.full_like(other, int(mask_id)), other)  # type: ignore[arg-type]


def _step_terms(kind: str, t: torch.Tensor, s: torch.Tensor, current: torch.Tensor, vocab: int,
                mask_id: int | None, schedule: dict) -> tuple[torch.Tensor, ...]:
    """(α_s, a = α_t/α_s, n_s(x_t), c = n_t(x_t) − a·n_s(x_t)) per position, for times per row:
    the terms of the exact reverse step that ``routes`` and ``transition`` both weigh."""
    t = torch.as_tensor(t, dtype=torch.float64, device=current.device).reshape(-1, 1)
    s = torch.as_tensor(s, dtype=torch.float64, device=current.device).reshape(-1, 1)
    a_t, a_s = survival(kind, t, **schedule), survival(kind, s, **schedule)
    a = torch.where(a_s > 0, a_t / a_s.clamp_min(1e-300), torch.zeros_like(a_t))
    here_t = noise_mass(kind, t, current, vocab, mask_id, **schedule)
    here_s = noise_mass(kind, s, current, vocab, mask_id, **schedule)
    return a_s, a, here_s, (here_t - a * here_s).clamp_min(0.0)


def routes(kind: str, t: torch.Tensor, s: torch.Tensor, current: torch.Tensor, guess: torch.Tensor, vocab: int,
           mask_id: int | None, **schedule: float | str) -> torch.Tensor:
    """Per position, the normalised probabilities (x̂_0, stay, noise) of the exact reverse step
    from time ``t`` to ``s`` (per row) given the clean guess ``guess``; float64, (... × 3)."""
    a_s, a, here_s, jump = _step_terms(kind, t, s, current, vocab, mask_id, schedule)
    same = (current == guess).double()
    weights = torch.stack([jump * a_s + a * a_s * same, a * here_s, jump * (1.0 - a_s)], dim=-1)
    total = weights.sum(-1, keepdim=True)
    fallback = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64, device=current.device)  # no time passes: stay
    return torch.where(total > 0, weights / total.clamp_min(1e-300), fallback)


def transition(kind: str, t: torch.Tensor, s: torch.Tensor, current: torch.Tensor, probs: torch.Tensor,
               mask_id: int | None, **schedule: float | str) -> torch.Tensor:
    """p(x_s = v | x_t) = Σ_x0 p(x0 | x_t)·q(x_s = v | x_t, x0) for every v: the reverse step with the
    clean token marginalised (UDLM's and GIDD's sampler); (... × vocab) float64. Guidance combines
    two of these."""
    vocab = probs.shape[-1]
    a_s, a, here_s, jump = _step_terms(kind, t, s, current, vocab, mask_id, schedule)
    s = torch.as_tensor(s, dtype=torch.float64, device=current.device).reshape(-1)
    is_current = torch.nn.functional.one_hot(current, vocab).bool()
    # the three route weights for every possible clean token v at once
    clean = jump.unsqueeze(-1) * a_s.unsqueeze(-1) + (a * a_s).unsqueeze(-1) * is_current.double()
    stay = (a * here_s).unsqueeze(-1).expand_as(clean)
    noise = (jump * (1.0 - a_s)).unsqueeze(-1).expand_as(clean)
    total = (clean + stay + noise).clamp_min(1e-300)
    p = probs.double()
    pi_s = noise_distribution(kind, s, vocab, mask_id, **schedule).unsqueeze(1)  # rows × 1 × vocab
    out = p * clean / total
    out = out + is_current.double() * (p * stay / total).sum(-1, keepdim=True)
    out = out + pi_s * (p * noise / total).sum(-1, keepdim=True)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-300)
