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
* An attention whose processor makes its keys itself from this process's tokens — joint
  text + image attention (SD3, Flux), rotary positions (Flux, Wan) — cannot be handed a context:
  the text stream, the rotary table and the order in the sequence are the processor's business.
  It runs as set, and where it calls ``scaled_dot_product_attention`` the image rows of its
  keys and values (normalised, rotated, exactly as the processor made them) are exchanged, and
  replaced by every patch's (or the neighbours' share). Text keys/values stay local: every
  process holds the text.
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
from torch.overrides import TorchFunctionMode

from .exchange import Exchange

_SDPA = F.scaled_dot_product_attention
_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


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
    frames: int = 1  # video transformers: token frames, each split into the same rows

    # -- a transformer's tokens: frames x rows x columns, row-major, split by rows in every frame
    @property
    def token_width(self) -> int:
        return self.width // self.patch_size

    def token_rows(self, rank: int | None = None) -> tuple[int, int]:
        """The token rows of ``rank`` (default: this process), the same in every frame."""
        start, stop = self.partition[self.rank if rank is None else rank]
        return start // self.patch_size, stop // self.patch_size

    def token_count(self, rank: int | None = None) -> int:
        start, stop = self.token_rows(rank)
        return self.frames * (stop - start) * self.token_width

    @property
    def total_tokens(self) -> int:
        return sum(self.token_count(r) for r in range(self.world_size))

    def token_range(self, rank: int | None = None) -> tuple[int, int]:
        """The tokens of ``rank`` in the full sequence, where they are contiguous (one frame)."""
        if self.frames != 1:
            raise ValueError("token_range: a patch of several frames is not contiguous; use token_index")
        start, stop = self.token_rows(rank)
        return start * self.token_width, stop * self.token_width

    def token_index(self, rank: int | None = None, device: Any = None) -> torch.Tensor:
        """Where the tokens of ``rank`` lie in the full sequence (its rows of every frame, in order)."""
        start, stop = self.token_rows(rank)
        width, rows = self.token_width, self.partition[-1][1] // self.patch_size
        frame = torch.arange(self.frames, device=device).view(-1, 1, 1) * rows * width
        row = torch.arange(start, stop, device=device).view(1, -1, 1) * width
        return (frame + row + torch.arange(width, device=device).view(1, 1, -1)).flatten()

    def in_grid_order(self, joined: torch.Tensor, dim: int) -> torch.Tensor:
        """Every process's tokens, joined in rank order along ``dim``, put back in the order of the
        full sequence (a no-op for one frame: the patches are consecutive row ranges there)."""
        if self.frames == 1:
            return joined
        order = torch.cat([self.token_index(r, joined.device) for r in range(self.world_size)])
        return joined.index_select(dim, torch.argsort(order))

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
    process's token rows — of the token sequence, or of the grid the model flattens next."""

    def __init__(self, path: str, current: Any, grid: bool = False) -> None:
        super().__init__(path, current)
        self.grid = grid

    def patched(self, call: PatchCall, module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens = self.fn_ref.original_forward(*args, **kwargs)
        if self.grid:  # B x C x [F x] H x W: the same rows of every frame
            start, stop = call.token_rows()
            return tokens[..., start:stop, :]
        if call.frames == 1:
            start, stop = call.token_range()
            return tokens[:, start:stop]
        return tokens.index_select(1, call.token_index(device=tokens.device))


class TokenGatherHook(_PatchHook):
    """On a transformer's output norm (the first layer after the blocks, however many of them
    ran): every process's tokens, so the final layer and the unpatchify see the whole image."""

    def patched(self, call: PatchCall, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        lengths = [call.token_count(r) for r in range(call.world_size)]
        tokens = call.exchange.gather_concat(None, "output", hidden_states, lengths, dim=1, fresh=True)
        return self.fn_ref.original_forward(call.in_grid_order(tokens, 1), *args, **kwargs)


class RotarySliceHook(_PatchHook):
    """On the module making a rotary table for the whole sequence: keep the text rows and this
    process's image rows, so its tokens are rotated by their places in the whole image."""

    def __init__(self, path: str, current: Any, token_dim: int, text_first: bool) -> None:
        super().__init__(path, current)
        self.token_dim = token_dim
        self.text_first = text_first

    def patched(self, call: PatchCall, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        table = self.fn_ref.original_forward(*args, **kwargs)
        if isinstance(table, torch.Tensor):
            return self._rows(call, table)
        return type(table)(self._rows(call, t) if isinstance(t, torch.Tensor) else t for t in table)

    def _rows(self, call: PatchCall, table: torch.Tensor) -> torch.Tensor:
        size, image = table.shape[self.token_dim], call.total_tokens
        if size < image:
            raise ValueError(f"PatchParallel: the rotary table of {self.path!r} has {size} rows for {image} image "
                             "tokens; the family's token layout does not describe this model")
        text = size - image
        index = call.token_index(device=table.device) + (text if self.text_first else 0)
        words = torch.arange(text, device=table.device) + (0 if self.text_first else image)
        index = torch.cat([words, index] if self.text_first else [index, words])
        return table.index_select(self.token_dim, index)


class KeyValueHook(_PatchHook):
    """On an attention whose processor makes its own keys (joint text + image attention, rotary
    positions): the processor runs as the user set it; in its ``scaled_dot_product_attention``
    call, this patch's image keys/values are exchanged and the other patches' put beside them.

    The image rows are found by count: the processor's sequence holds this process's image tokens,
    after the text when ``text_first`` (Flux: ``[text; image]``), before it otherwise (SD3), or
    alone (self-attention). Text keys/values are left as they are: every process has the text.
    """

    def __init__(self, path: str, current: Any, text_first: bool) -> None:
        super().__init__(path, current)
        self.text_first = text_first

    def patched(self, call: PatchCall, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        swap = _KeyValueSwap(lambda q, k, v: self._swap(call, q, k, v))
        with swap:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if not swap.swapped:
            processor = type(getattr(module, "processor", None)).__name__
            raise TypeError(
                f"PatchParallel: attention {self.path!r} (processor {processor}) made no call to torch's "
                "scaled_dot_product_attention over this patch's tokens, so it cannot see the other patches; "
                "use diffusers' native attention backend (the default) with patch parallelism"
            )
        return output

    def _swap(self, call: PatchCall, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        own, length = call.token_count(), key.shape[-2]
        if query.shape[-2] != length or length < own or value.shape[-2] != length:
            return None  # not the attention over this patch's tokens (an IP-adapter's, say)
        start = length - own if self.text_first else 0
        mine = torch.stack([key.narrow(-2, start, own), value.narrow(-2, start, own)])
        dim = mine.dim() - 2
        if call.mode == "pcpp":
            pieces = _partial_tokens(call, mine, dim)
        else:
            pieces = _gathered_tokens(call, call.key(self.path), "attention", mine, dim)
        # one copy each: text keys/values where the processor put them, the image's in between
        rest = length - start - own
        keys = torch.cat([key.narrow(-2, 0, start), *(p[0] for p in pieces), key.narrow(-2, start + own, rest)], dim=-2)
        values = torch.cat([value.narrow(-2, 0, start), *(p[1] for p in pieces), value.narrow(-2, start + own, rest)],
                           dim=-2)
        return keys, values


class _KeyValueSwap(TorchFunctionMode):
    """While an attention processor runs: its ``scaled_dot_product_attention`` calls go through
    ``swap(query, key, value)``, which returns new keys and values (or ``None``: leave the call)."""

    def __init__(self, swap: Any) -> None:
        super().__init__()
        self.swap = swap
        self.swapped = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not _SDPA or self.swapped:
            return func(*args, **kwargs)
        bound = {**dict(zip(_SDPA_ARGUMENTS, args)), **kwargs}
        if bound.get("attn_mask") is not None or bound.get("is_causal"):
            raise TypeError("PatchParallel: an attention mask (or causal attention) over the image tokens cannot be "
                            "split into patches")
        swapped = self.swap(bound["query"], bound["key"], bound["value"])
        if swapped is None:
            return func(*args, **kwargs)
        self.swapped += 1
        bound["key"], bound["value"] = swapped
        return func(**bound)


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


def _share(call: PatchCall, count: int) -> int:
    return max(1, math.ceil(call.neighbor_fraction * count - 1e-9))


def _partial_context(call: PatchCall, hidden: torch.Tensor, rows: list[int], width: int) -> torch.Tensor:
    """Own tokens plus the nearest ``neighbor_fraction`` of each neighbour's rows (PCPP)."""
    rank, last = call.rank, call.world_size - 1
    own = rows[rank]
    batch, _, channels = hidden.shape
    to_above = hidden[:, : _share(call, own) * width]
    to_below = hidden[:, (own - _share(call, own)) * width:]
    above_rows = _share(call, rows[rank - 1]) if rank > 0 else 0
    below_rows = _share(call, rows[rank + 1]) if rank < last else 0
    above, below = call.exchange.neighbours(
        "attention", to_above, to_below, (batch, above_rows * width, channels), (batch, below_rows * width, channels))
    return torch.cat([t for t in (above, hidden, below) if t is not None], dim=1)


def _gathered_tokens(call: PatchCall, key: Any, kind: str, mine: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Every process's tokens along ``dim`` (this one's fresh; on a stale step the others' from the
    previous step), as pieces in the order of the full sequence: padded to the longest for the
    exchange (gloo needs equal sizes) and trimmed after."""
    lengths = [call.token_count(r) for r in range(call.world_size)]
    if call.frames != 1:  # rows of every frame: not consecutive pieces, so join and reorder
        return [call.in_grid_order(call.exchange.gather_concat(key, kind, mine, lengths, dim=dim), dim)]
    most = max(lengths)
    if most > mine.shape[dim]:
        padding = list(mine.shape)
        padding[dim] = most - mine.shape[dim]
        mine = torch.cat([mine, mine.new_zeros(padding)], dim=dim)
    parts = call.exchange.gather(key, kind, mine)
    return [part.narrow(dim, 0, n) for part, n in zip(parts, lengths)]


def _partial_tokens(call: PatchCall, mine: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """This patch's tokens (along ``dim``: frames x rows x columns) and the nearest
    ``neighbor_fraction`` of each neighbour's rows in every frame (PCPP), exchanged with the
    neighbours only: the pieces ``[above,] own[, below]``."""
    rank, last, width, frames = call.rank, call.world_size - 1, call.token_width, call.frames
    rows = [b - a for a, b in (call.token_rows(r) for r in range(call.world_size))]
    grid = mine.unflatten(dim, (frames, rows[rank], width))
    share = _share(call, rows[rank])
    to_above = grid.narrow(dim + 1, 0, share).flatten(dim, dim + 2)
    to_below = grid.narrow(dim + 1, rows[rank] - share, share).flatten(dim, dim + 2)

    def shape(neighbour: int | None) -> tuple[int, ...]:
        count = 0 if neighbour is None else frames * _share(call, rows[neighbour]) * width
        return (*mine.shape[:dim], count, *mine.shape[dim + 1:])

    above, below = call.exchange.neighbours("attention", to_above, to_below, shape(rank - 1 if rank > 0 else None),
                                            shape(rank + 1 if rank < last else None))
    return [t for t in (above, mine, below) if t is not None]
