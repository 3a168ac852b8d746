"""Filling the masks of any canvas with the scheduler: infilling, puzzles, held-out reconstruction.

The text pipeline writes a continuation after a prompt; a task with blanks anywhere (a Sudoku
grid, a span cut out of a document) needs the same sampler loop on the canvas as it is. This
loop asks the model only about the canvases that still have blanks, and counts each one's calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .discrete_diffusion import DiscreteDiffusionScheduler


@torch.no_grad()
def fill_masks(logits_of: Callable[[torch.Tensor], torch.Tensor], canvas: torch.Tensor,
               scheduler: DiscreteDiffusionScheduler, steps: int | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(filled canvas, model calls per row) for a (batch × length) ``canvas`` whose masks
    (``scheduler.config.mask_token_id``) are to be filled; nothing else changes.

    ``steps=None``: one token per step for the quota samplers (each row's time starts at
    masks/N on an N-step grid, N the most masks of any row, so the quota is one), and as many
    steps as the adaptive samplers need. ``logits_of(rows)`` returns the model's logits."""
    if scheduler.config.corruption != "mask":
        raise ValueError(f"fill_masks fills mask tokens; the scheduler's corruption is "
                         f"{scheduler.config.corruption!r}")
    mask_id = int(scheduler.config.mask_token_id) if scheduler.config.mask_token_id is not None else None
    if mask_id is None:
        raise ValueError("fill_masks: the scheduler has no mask_token_id")
    canvas = canvas.clone()
    active = canvas == mask_id
    most = max(int(active.sum(1).max()), 1)
    scheduler.set_timesteps(steps or most)
    if steps is None and not scheduler.adaptive:
        t = active.sum(1).double() / most
    else:
        t = torch.ones(canvas.shape[0], dtype=torch.float64)
    t = t.to(canvas.device)
    calls = torch.zeros(canvas.shape[0], dtype=torch.long, device=canvas.device)
    for _ in range(max(steps or 0, canvas.shape[1]) + 1):  # the last grid step decides the rest
        open_ = (canvas == mask_id).any(1)
        if not bool(open_.any()):
            break
        rows = open_.nonzero().squeeze(1)
        out = scheduler.step(logits_of(canvas[rows]), t[rows], canvas[rows], active=active[rows], generator=generator)
        canvas[rows], t[rows] = out.prev_sample, out.next_timestep
        calls[rows] += 1
    return canvas, calls
