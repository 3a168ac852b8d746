"""Where a pipeline call is: step index, timestep and step count.

The step advances when the pipeline calls ``scheduler.step`` — the one event every denoising
loop has exactly once per iteration — so two denoiser calls in one iteration (unbatched
guidance) share a step, and repeated timesteps (second-order schedulers) do not confuse it.
Looking the timestep up in ``scheduler.timesteps`` would break on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StepClock:
    """Mutable position inside the current pipeline call; inactive between calls."""

    active: bool = False
    call_index: int = -1
    step: int = 0
    num_steps: int | None = None
    timestep: Any = None
    denoiser_calls: int = 0  # in this call
    calls_in_step: int = 0  # denoiser calls already made in the current step (unbatched guidance: 2)

    def begin_call(self) -> None:
        self.active = True
        self.call_index += 1
        self.step = 0
        self.num_steps = None
        self.timestep = None
        self.denoiser_calls = 0
        self.calls_in_step = 0

    def end_call(self) -> None:
        self.active = False
        self.step = 0
        self.num_steps = None
        self.timestep = None

    def advance(self) -> None:
        if self.active:
            self.step += 1
            self.calls_in_step = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def steps_announced(scheduler: Any) -> int | None:
    """How many loop iterations the scheduler was set up for in this call.

    img2img-style pipelines start part-way through (``begin_index``); those steps never run.
    """
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    begin = getattr(scheduler, "_begin_index", None) or 0
    return max(len(timesteps) - begin, 1)
