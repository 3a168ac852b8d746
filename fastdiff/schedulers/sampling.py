"""Choosing tokens from logits, in float64.

Gumbel-max in float32 cannot draw noise above about 16.6 (−log(−log(1 − 2⁻²⁴))): tokens whose
logit trails the best by more than that are never sampled, which silently lowers the
temperature. Every draw here is float64 (cap ≈ 36.7).
"""

from __future__ import annotations

import torch


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform float64 noise drawn on the generator's device (CPU generators work for GPU logits)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=where).to(device)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Float64 logits with everything outside the ``top_k`` / nucleus ``top_p`` set to −inf."""
    logits = logits.double()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


SAMPLING = ("gumbel", "multinomial")


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
                  top_k: int | None = None, top_p: float | None = None,
                  sampling: str = "gumbel") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens drawn from ``softmax(logits / temperature)`` (argmax at temperature 0) and their
    confidence: the probability the untempered, filtered distribution gives them.

    ``sampling="multinomial"`` draws as diffusers' and transformers' discrete samplers do
    (``torch.multinomial`` over float32 probabilities of the tempered logits in their own dtype),
    so the same generator gives the same tokens as theirs; the default draws Gumbel-max in float64."""
    if sampling == "multinomial" and temperature > 0:
        tempered = logits / temperature
        if top_k is not None or top_p is not None:
            tempered = filter_logits(tempered, top_k, top_p).to(logits.dtype)
        probs = torch.softmax(tempered.float(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        where = generator.device if generator is not None else flat.device
        tokens = torch.multinomial(flat.to(where), 1, generator=generator).to(flat.device).reshape(logits.shape[:-1])
        confidence = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
        return tokens, confidence.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logits = filter_logits(logits, top_k, top_p)
    if temperature > 0:
        gumbel = -torch.log(-torch.log(uniform(tuple(logits.shape), generator, logits.device).clamp_min(1e-300)))
        tokens = torch.argmax(logits / temperature + gumbel, dim=-1)
    else:
        tokens = torch.argmax(logits, dim=-1)
    confidence = torch.softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, confidence
