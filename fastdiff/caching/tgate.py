"""T-GATE: cross-attention converges early, so compute it until a gate step and reuse it after.

Before the gate ("semantics planning") everything runs, except that self-attention is computed
in the warm-up steps and then every ``sp_interval`` steps and reused in between. At the last
step before the gate each cross-attention (and self-attention) output is kept as the mean of
its unconditional and conditional halves. After the gate ("fidelity improving") cross-attention
returns that mean, classifier-free guidance is dropped — the denoiser runs on one half of the
batch and its output is given to the pipeline as both halves, so the pipeline's own guidance
formula returns it unchanged — and self-attention is recomputed every ``fi_interval`` steps.

Hooks sit on the ``Attention`` modules' forward, never on their processors, so LoRA,
IP-Adapter and SDPA/xformers processors set by the user keep running.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..anatomy import anatomy_of
from ..core.method import Method
from ..core.plan import Decision
from ..core.rules import ReuseRule, denoiser_sample, first_input, main_tensor, map_batched, tile_batch, with_main_tensor

if TYPE_CHECKING:
    from ..core.accelerator import Accelerator

HALVES = ("cond", "uncond")


def attention_paths(denoiser: torch.nn.Module, method: str = "TGate") -> tuple[list[str], list[str]]:
    """(self-attention, cross-attention) module paths of a denoiser, from its anatomy.

    Joint attention (SD3, Flux: text and image tokens in one attention, the text stream updated
    by every block) is neither: there is no text-only attention output to keep at the gate, and
    no guidance batch to drop on guidance-distilled Flux, so T-GATE refuses those families.
    """
    anatomy = anatomy_of(denoiser, method)
    cross = list(anatomy.attention_paths("cross"))
    if not cross:
        joint = anatomy.attention_paths("joint")
        why = (f"its {len(joint)} attention modules are joint attention over text and image tokens together, "
               "whose text part changes in every block: there is no cross-attention output to keep at the gate"
               if joint else "it has no cross-attention (it is not text-conditioned)")
        raise TypeError(f"{method} needs a denoiser with cross-attention (text conditioning); "
                        f"{anatomy.denoiser} ({anatomy.family}) has none: {why}")
    return list(anatomy.attention_paths("self")), cross


def gate_rows(num_steps: int, gate_step: int, sp_interval: int, fi_interval: int,
              warm_up: int) -> tuple[tuple[Decision, ...], tuple[Decision, ...]]:
    """(self-attention row, cross-attention row) of the release's schedule, step by step."""
    self_row: list[Decision] = []
    cross_row: list[Decision] = []
    for step in range(num_steps):
        if step < gate_step - 1:
            cross_row.append(Decision.COMPUTE)
            computes = step <= warm_up or step % sp_interval == 0
        elif step == gate_step - 1:
            cross_row.append(Decision.COMPUTE)
            computes = True
        else:
            cross_row.append(Decision.REUSE)
            computes = step % fi_interval == 0
        self_row.append(Decision.COMPUTE if computes else Decision.REUSE)
    return tuple(self_row), tuple(cross_row)


class _GateLive:
    """What the rules need to know about the current call: is guidance batched into halves?"""

    def __init__(self) -> None:
        self.halves = False
        self.batch = 0  # the guidance batch of the denoiser call (another method may stack steps after it)


class GateRule(ReuseRule):
    """At the last step before the gate keep the mean of the guidance halves; give it back to any
    call whose batch it fits (after the gate the batch is one half)."""

    def __init__(self, live: _GateLive, gate_step: int) -> None:
        self.live = live
        self.gate_step = gate_step

    def keep(self, args: tuple, kwargs: dict, output: Any, step: int) -> Any:
        tensor = main_tensor(output)
        if step == self.gate_step - 1 and self.live.halves and tensor is not None and tensor.shape[0] % 2 == 0:
            batch = self.live.batch
            if batch and tensor.shape[0] > batch and tensor.shape[0] % batch == 0:
                tensor = tensor[:batch]  # steps stacked behind this one (batched decoders): this step's rows
            uncond, cond = tensor.chunk(2)
            return with_main_tensor(output, (uncond + cond) / 2)
        return output

    def restore(self, kept: Any, args: tuple, kwargs: dict, step: int, signature: tuple,
                kept_signature: tuple | None) -> Any | None:
        tensor, current = main_tensor(kept), first_input(args, kwargs)
        if tensor is None or not isinstance(current, torch.Tensor):
            return kept if signature == kept_signature else None
        if tensor.shape[1:] != current.shape[1:] or tensor.device != current.device or tensor.dtype != current.dtype:
            return None
        if tensor.shape[0] == current.shape[0]:
            return kept
        if tensor.shape[0] and current.shape[0] % tensor.shape[0] == 0:  # steps stacked into one call
            return tile_batch(kept, current.shape[0] // tensor.shape[0])
        return None


@dataclass
class TGate(Method):
    """Cache cross-attention after ``gate_step`` and drop guidance; self-attention on intervals.

    Args:
        gate_step: the first step that reuses cross-attention (the release's default, 10).
        sp_interval: before the gate, self-attention is recomputed every this many steps.
        fi_interval: after the gate, self-attention is recomputed every this many steps.
        warm_up: self-attention is computed at every step up to and including this one.
        keep_half: which guidance half runs after the gate: ``"cond"`` (the prompt's; default)
            or ``"uncond"`` (what the authors' release runs). On SD 1.x/2.x and PixArt the two
            give the same images (their only use of the text is the cached cross-attention);
            on SDXL the pooled text embedding differs.
    """

    spec_name = "tgate"
    spec_keys = ("gate_step",)
    wrap_order = 10  # halves the guidance batch before anything stacks steps into it

    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2
    keep_half: str = "cond"
    _live: _GateLive = field(default_factory=_GateLive, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("gate_step", "sp_interval", "fi_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TGate: {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.warm_up, bool) or not isinstance(self.warm_up, int) or self.warm_up < 0:
            raise ValueError(f"TGate: warm_up must be an integer >= 0, got {self.warm_up!r}")
        if self.keep_half not in HALVES:
            raise ValueError(f"TGate: keep_half must be one of {HALVES}, got {self.keep_half!r}")

    def modules(self, denoiser: torch.nn.Module) -> list[str]:
        self_attn, cross_attn = attention_paths(denoiser)
        return self_attn + cross_attn

    def schedule(self, denoiser: torch.nn.Module, num_steps: int) -> Mapping[str, Sequence[Decision]]:
        if self.gate_step > num_steps:
            raise ValueError(
                f"TGate: gate_step={self.gate_step} is outside the {num_steps} steps of this call "
                f"(allowed: 1..{num_steps})"
            )
        self_row, cross_row = gate_rows(num_steps, self.gate_step, self.sp_interval, self.fi_interval, self.warm_up)
        self_attn, cross_attn = attention_paths(denoiser)
        return {**{p: self_row for p in self_attn}, **{p: cross_row for p in cross_attn}}

    def reuse_rule(self, denoiser: torch.nn.Module, path: str) -> ReuseRule:
        return GateRule(self._live, self.gate_step)

    def step_barriers(self, num_steps: int) -> set[int]:
        # the mean is kept at gate_step - 1 and guidance is dropped from gate_step on
        return {self.gate_step - 1, self.gate_step}

    def wrap_denoiser(self, runtime: Accelerator, forward: Any, args: tuple, kwargs: dict) -> Any:
        halves = guidance_batched(runtime)
        sample = denoiser_sample(args, kwargs)
        batch = sample.shape[0] if sample is not None and sample.dim() else 0
        self._live.halves = halves and batch % 2 == 0 and batch > 0
        self._live.batch = batch
        if not self._live.halves or runtime.clock.step < self.gate_step:
            return forward(*args, **kwargs)
        part = 1 if self.keep_half == "cond" else 0
        half = lambda tensor: tensor.chunk(2)[part]  # noqa: E731
        output = forward(*map_batched(args, batch, half), **map_batched(kwargs, batch, half))
        return _doubled(output)


def guidance_batched(runtime: Accelerator) -> bool:
    """Whether this call batches classifier-free guidance as [unconditional, conditional].

    SD-style pipelines say so (``do_classifier_free_guidance``); others (PixArt) decide from
    ``guidance_scale > 1`` inside their call, so the call's own argument is read.
    """
    flag = getattr(type(runtime.pipe), "do_classifier_free_guidance", None)
    if isinstance(flag, property):
        try:
            return bool(runtime.pipe.do_classifier_free_guidance)
        except AttributeError:  # read before the pipeline set its guidance scale
            pass
    scale = runtime.call_arguments.get("guidance_scale")
    return isinstance(scale, (int, float)) and scale > 1.0


def _doubled(output: Any) -> Any:
    """The denoiser output given as both guidance halves, so ``u + g·(c − u)`` returns it as is."""
    tensor = main_tensor(output)
    if tensor is None:
        return output
    return with_main_tensor(output, torch.cat([tensor, tensor]))
