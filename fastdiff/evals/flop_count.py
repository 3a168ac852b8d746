"""Denoiser FLOPs of a pipeline call, counted the same way whatever accelerates it.

fastdiff's FLOP counter run around each denoiser call (a hook on the denoiser, outermost)
counts exactly the work that was done, whether fastdiff's plan, a diffusers cache or cache-dit
decided to skip the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..core.flops import total_flop_counter

HOOK_NAME = "fastdiff_flop_count"


class _CountDenoiserCalls(ModelHook):
    _is_stateful = False

    def __init__(self, on_call: Callable[[], Any] | None) -> None:
        super().__init__()
        self.total = 0
        self.on_call = on_call

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        counter = total_flop_counter()
        with counter:
            output = self.fn_ref.original_forward(*args, **kwargs)
        self.total += counter.get_total_flops()
        if self.on_call is not None:
            self.on_call()
        return output


def count_denoiser_flops(denoiser: torch.nn.Module, run: Callable[[], Any],
                         on_call: Callable[[], Any] | None = None) -> int:
    """FLOPs of every call of ``denoiser`` while ``run()`` runs; ``on_call`` after each call (a
    progress bar's update: counting a whole batch takes a while)."""
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    hook = _CountDenoiserCalls(on_call)
    registry.register_hook(hook, HOOK_NAME)
    try:
        run()
    finally:
        registry.remove_hook(HOOK_NAME, recurse=False)
    return hook.total
