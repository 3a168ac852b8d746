"""Patch-aware layers: what a convolution, a GroupNorm and a self-attention need from the other
patches, as diffusers hooks on the existing modules (the user's attention processors keep running).

* A ``k×k`` convolution gets the ``(k-1)/2`` rows above and below its patch from the neighbours
  (zeros at the image border, exactly its own zero padding) and runs without vertical padding.
* A GroupNorm combines each process's per-group count, mean and biased variance (float64) into
  the whole image's, and normalises with them, as ``nn.GroupNorm`` does.
* A self-attention keeps its queries local and takes keys/values from a context: every patch's
  input tokens (DistriFusion, sync) or its own plus the nearest ``neighbor_fraction`` of each
  neighbour's rows (PCPP). The context goes in as ``encoder_hidden_states``, which the processor
  turns into keys and values as for any attention.
Cross-attention and per-token layers need nothing and are not hooked.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from .exchange import Exchange


@dataclass
class PatchCall:
    """One denoiser call split into patches: who owns which rows, and how to reach the others."""

    rank: int
    world_size: int
    partition: list[tuple[int, int]]  # latent rows per process
    width: int  # latent columns
    exchange: Exchange
    mode: str  # "sync" | "distrifusion" | "pcpp"
    neighbor_fraction: float
    prefix: Any = None
    ordinals: Counter = field(default_factory=Counter)
    patch_size: int = 1  # transformers: latent rows per token row

    def token_range(self, rank: int | None = None) -> tuple[int, int]:
        """A transformer's tokens of ``rank`` (default: this process) in the full row-major sequence."""
        start, stop = self.partition[self.rank if rank is None else rank]
        per_row = self.width // self.patch_size
        return start // self.patch_size * per_row, stop // self.patch_size * per_row

    def key(self, path: str) -> tuple:
        n = self.ordinals[path]
        self.ordinals[path] += 1
        return (self.prefix, path, n)

    def rows(self, own_rows: int) -> list[int]:
        """Every process's rows at the resolution where this process has ``own_rows``."""
        start, stop = self.partition[self.rank]
        factor = (stop - start) // own_rows
        return [(b - a) // factor for a, b in self.partition]

    def rows_and_width(self, own_tokens: int) -> tuple[list[int], int]:
        """For a token sequence: every process's rows and the row width at this resolution."""
        start, stop = self.partition[self.rank]
        factor = round(math.sqrt((stop - start) * self.width / own_tokens))
        return [(b - a) // factor for a, b in self.partition], self.width // factor


class _PatchHook(ModelHook):
    def __init__(self, path: str, current: Any) -> None:
        super().__init__()
        self.path = path
        self.current = current  # () -> PatchCall | None: the split denoiser call in progress

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        call = self.current()
        if call is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.patched(call, module, *args, **kwargs)

    def patched(self, call: PatchCall, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class ConvHook(_PatchHook):
    def patched(self, call: PatchCall, module: torch.nn.Conv2d, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        pad = module.padding[0]
        if pad == 0:
            return self.fn_ref.original_forward(x, *args, **kwargs)
        key = call.key(self.path)
        top, bottom = x[..., :pad, :], x[..., -pad:, :]
        if call.mode == "pcpp":
            above, below = call.exchange.neighbours("conv", top, bottom, tuple(bottom.shape), tuple(top.shape))
        else:
            parts = call.exchange.gather(key, "conv", torch.cat([top, bottom], dim=-2))
            above = parts[call.rank - 1][..., pad:, :] if call.rank > 0 else None
            below = parts[call.rank + 1][..., :pad, :] if call.rank < call.world_size - 1 else None
        zeros = torch.zeros_like(top)
        extended = torch.cat([zeros if above is None else above, x, zeros if below is None else below], dim=-2)
        return F.conv2d(extended, module.weight, module.bias, module.stride, (0, module.padding[1]),
                        module.dilation, module.groups)


class GroupNormHook(_PatchHook):
    def patched(self, call: PatchCall, module: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        batch, groups = x.shape[0], module.num_groups
        # this patch's per-group mean and biased variance from ATen's own (vectorised, accurate)
        # GroupNorm kernel, whose normalised output is not used; the patches' statistics are combined
        # in float64 as (count, mean, variance), which needs no E[x²] - mean² cancellation
        _, mean, rstd = torch.ops.aten.native_group_norm(x.contiguous(), None, None, batch, x.shape[1], x[0, 0].numel(), groups,
                                                         module.eps)
        mean, variance = mean.double().reshape(batch, groups), rstd.double().reshape(batch, groups) ** -2 - module.eps
        count = torch.full_like(mean, float(x[0].numel() // groups))
        stats = torch.stack([count, mean, variance], dim=-1)
        parts = torch.stack(call.exchange.gather(call.key(self.path), "groupnorm", stats))
        counts, means, variances = parts.unbind(-1)
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        variance = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        rstd = torch.rsqrt(variance + module.eps)
        # normalise and apply the affine map in one pass: x * scale + shift, per sample and channel
        per_group = x.shape[1] // groups
        scale = rstd.repeat_interleave(per_group, dim=1)
        shift = -mean.repeat_interleave(per_group, dim=1) * scale
        if module.affine:
            scale = scale * module.weight.double()
            shift = shift * module.weight.double() + module.bias.double()
        shape = (batch, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(x.dtype).reshape(shape), x, scale.to(x.dtype).reshape(shape))


class SelfAttentionHook(_PatchHook):
    def patched(self, call: PatchCall, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any,
                **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if (args or kwargs.get("encoder_hidden_states") is not None or hidden_states.dim() not in (3, 4)
                or getattr(module, "spatial_norm", None) is not None):
            return forward(hidden_states, *args, **kwargs)
        tokens = hidden_states.flatten(2).transpose(1, 2) if hidden_states.dim() == 4 else hidden_states
        if getattr(module, "group_norm", None) is not None:
            # keys/values come from the normalised tokens (a VAE's attention normalises inside)
            tokens = module.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        count = tokens.shape[1]
        rows, width = call.rows_and_width(count)
        if call.mode == "pcpp":
            context = _partial_context(call, tokens, rows, width)
        else:
            context = call.exchange.gather_concat(call.key(self.path), "attention", tokens,
                                                  [r * width for r in rows], dim=1)
        return forward(hidden_states, **{**kwargs, "encoder_hidden_states": context})


class TokenSliceHook(_PatchHook):
    """On a transformer's patch embedding: embed the full latent (positions stay right), keep this
    process's token rows."""

    def patched(self, call: PatchCall, module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens = self.fn_ref.original_forward(*args, **kwargs)
        start, stop = call.token_range()
        return tokens[:, start:stop]


class TokenGatherHook(_PatchHook):
    """On a transformer's output norm (the first layer after the blocks, however many of them
    ran): every process's tokens, so the final layer and the unpatchify see the whole image."""

    def patched(self, call: PatchCall, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        lengths = [b - a for a, b in (call.token_range(r) for r in range(call.world_size))]
        tokens = call.exchange.gather_concat(None, "output", hidden_states, lengths, dim=1, fresh=True)
        return self.fn_ref.original_forward(tokens, *args, **kwargs)


class DecoderHook(ModelHook):
    """On a VAE's decoder: each process decodes its rows of the latent (every layer exchanging
    synchronously, so the image is exact) and the image rows are gathered to every process."""

    def __init__(self, start: Any) -> None:
        super().__init__()
        self.start = start  # (sample) -> PatchCall | None: opens the split, None when it cannot

    def new_forward(self, module: torch.nn.Module, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        call = self.start(sample)
        if call is None:
            return forward(sample, *args, **kwargs)
        start, stop = call.partition[call.rank]
        try:
            image = forward(sample[:, :, start:stop].contiguous(), *args, **kwargs)
        finally:
            self.start(None)
        scale = image.shape[-2] // (stop - start)
        lengths = [(b - a) * scale for a, b in call.partition]
        return call.exchange.gather_concat(None, "output", image, lengths, dim=-2, fresh=True)


def _partial_context(call: PatchCall, hidden: torch.Tensor, rows: list[int], width: int) -> torch.Tensor:
    """Own tokens plus the nearest ``neighbor_fraction`` of each neighbour's rows (PCPP)."""
    def share(count: int) -> int:
        return max(1, math.ceil(call.neighbor_fraction * count - 1e-9))

    rank, last = call.rank, call.world_size - 1
    own = rows[rank]
    batch, _, channels = hidden.shape
    to_above = hidden[:, : share(own) * width]
    to_below = hidden[:, (own - share(own)) * width:]
    above_rows = share(rows[rank - 1]) if rank > 0 else 0
    below_rows = share(rows[rank + 1]) if rank < last else 0
    above, below = call.exchange.neighbours(
        "attention", to_above, to_below, (batch, above_rows * width, channels), (batch, below_rows * width, channels))
    return torch.cat([t for t in (above, hidden, below) if t is not None], dim=1)
