"""T-GATE: cross-attention converges early, so compute it until a gate step and reuse it after.

Before the gate ("semantics planning") everything runs, except that self-attention is computed
in the warm-up steps and then every ``sp_interval`` steps and reused in between. At the last
step before the gate each cross-attention (and self-attention) output is kept as the mean of
its unconditional and conditional branches. After the gate ("fidelity improving")
cross-attention returns that mean, classifier-free guidance is dropped, and self-attention is
recomputed every ``fi_interval`` steps.

How guidance is dropped depends on how the pipeline runs it, which is read from the first
step's denoiser calls (see :func:`guidance_layout`):

- one call on a doubled batch (SD, SDXL, PixArt): the denoiser runs on one half and its output
  is given to the pipeline as both halves;
- two calls per step, conditional first (Wan): only the first call runs; the second is answered
  with its output and recorded in the ledger as a reused denoiser call. Either way the
  pipeline's own guidance formula ``u + g·(c − u)`` returns the conditional prediction.

Joint attention (SD3, Flux and the other MMDiTs) is not cross-attention: text and image tokens
attend together and the text tokens are themselves updated by every block, so there is no
text-conditioning output that stops changing; those denoisers are refused (see
:func:`attention_paths`).

Hooks sit on the ``Attention`` modules' forward, never on their processors, so LoRA,
IP-Adapter and SDPA/xformers processors set by the user keep running.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..anatomy import anatomy_of
from ..core.forecast import forecast_name
from ..core.method import Method
from ..core.plan import Decision
from ..core.rules import ReuseRule, denoiser_sample, first_input, main_tensor, map_batched, tile_batch, with_main_tensor

if TYPE_CHECKING:
    from ..core.accelerator import Accelerator

HALVES = ("cond", "uncond")
BATCHED, SEPARATE, NO_GUIDANCE = "batched", "separate", "none"  # guidance layouts


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
    """What the rules need to know about the denoiser call in progress."""

    def __init__(self) -> None:
        self.layout = NO_GUIDANCE  # how this pipeline runs classifier-free guidance (see ``guidance_layout``)
        self.batch = 0  # the guidance batch of the call (another method may stack steps after it)
        self.ordinal = 0  # which denoiser call of the step this is (separate guidance calls: 0 cond, 1 uncond)


class GateRule(ReuseRule):
    """Keeps what an attention module produced at the last step before the gate and, from the
    gate on, gives back its mean over the two guidance branches: the two halves of one batched
    call, or the outputs of the step's two separate calls. The mean is formed at the first reuse,
    once the pipeline's guidance layout is known (it is only certain after step 0's calls)."""

    def __init__(self, live: _GateLive, gate_step: int, forecasts: bool = True) -> None:
        self.live = live
        self.gate_step = gate_step
        self.forecasts = forecasts
        self.at_gate: dict[int, Any] = {}  # per denoiser call of the step before the gate
        self.mean: Any = None

    def reset(self) -> None:
        self.at_gate.clear()
        self.mean = None

    def keep(self, args: tuple, kwargs: dict, output: Any, step: int) -> Any:
        if step == self.gate_step - 1:
            tensor, batch = main_tensor(output), self.live.batch
            if tensor is not None and batch and tensor.shape[0] > batch and tensor.shape[0] % batch == 0:
                output = with_main_tensor(output, tensor[:batch])  # steps stacked behind this one: this step's rows
            self.at_gate[self.live.ordinal] = output
            self.mean = None
        elif step >= self.gate_step:  # computed again after the gate (self-attention): that is what is reused now
            self.at_gate.clear()
            self.mean = None
        return output

    def _gate_mean(self) -> Any:
        if self.mean is None and self.at_gate:
            self.mean = _branch_mean(self.at_gate, self.live.layout)
            if self.mean is not None:
                self.at_gate.clear()
        return self.mean

    def restore(self, kept: Any, args: tuple, kwargs: dict, step: int, signature: tuple,
                kept_signature: tuple | None) -> Any | None:
        if step >= self.gate_step:
            mean = self._gate_mean()
            kept = kept if mean is None else mean
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


def _branch_mean(at_gate: Mapping[int, Any], layout: str) -> Any:
    """The mean over the guidance branches of what was kept at the gate, in the first kept
    output's container; ``None`` where there is nothing to average (no guidance)."""
    first = at_gate.get(0)
    tensor = main_tensor(first)
    if tensor is None:
        return None
    if layout == BATCHED and tensor.shape[0] % 2 == 0 and tensor.shape[0]:
        uncond, cond = tensor.chunk(2)
        return with_main_tensor(first, (uncond + cond) / 2)
    other = main_tensor(at_gate.get(1))
    if layout == SEPARATE and other is not None and other.shape == tensor.shape:
        return with_main_tensor(first, (tensor + other) / 2)
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
            on SDXL the pooled text embedding differs. Pipelines that run guidance as two
            separate denoiser calls (Wan) make the conditional call first, and only the first
            call of a step runs after the gate: ``"uncond"`` is refused there.
        forecast: how a reused output is given back: ``"hold"`` (as last computed), ``"ab2"`` or
            ``"ab3"`` (extrapolated to the step's noise level from the last 2 or 3 computed ones).
            It applies to self-attention reused between its recomputations; the cross-attention
            kept at the gate (the mean of the guidance branches) is held for the rest of the call,
            as T-GATE means it: extrapolating it over every remaining step would run far from its
            points.
    """

    spec_name = "tgate"
    spec_keys = ("gate_step",)
    wrap_order = 10  # halves the guidance batch before anything stacks steps into it

    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2
    keep_half: str = "cond"
    forecast: str = "hold"
    _live: _GateLive = field(default_factory=_GateLive, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.forecast = forecast_name(self.forecast, "TGate")
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
        return GateRule(self._live, self.gate_step, forecasts=path not in attention_paths(denoiser)[1])

    def step_barriers(self, num_steps: int) -> set[int]:
        # the mean is kept at gate_step - 1 and guidance is dropped from gate_step on
        return {self.gate_step - 1, self.gate_step}

    def wrap_denoiser(self, runtime: Accelerator, forward: Any, args: tuple, kwargs: dict) -> Any:
        step, ordinal = runtime.clock.step, runtime.clock.calls_in_step
        sample = denoiser_sample(args, kwargs)
        batch = sample.shape[0] if sample is not None and sample.dim() else 0
        state = runtime.call_state(self)
        layout = guidance_layout(runtime, state, sample)
        self._live.layout, self._live.batch, self._live.ordinal = layout, batch, ordinal
        if layout == SEPARATE and self.keep_half != "cond":
            raise ValueError(
                f"TGate(keep_half={self.keep_half!r}) cannot be honoured on {type(runtime.pipe).__name__}: it runs "
                "classifier-free guidance as two separate denoiser calls per step, the conditional one first, and "
                "after the gate T-GATE computes only the first call of each step; use keep_half='cond'"
            )
        if step < self.gate_step:
            return forward(*args, **kwargs)
        if layout == BATCHED and batch and batch % 2 == 0:
            part = 1 if self.keep_half == "cond" else 0
            half = lambda tensor: tensor.chunk(2)[part]  # noqa: E731
            output = forward(*map_batched(args, batch, half), **map_batched(kwargs, batch, half))
            return _doubled(output)
        if layout == SEPARATE:
            return self._first_call_only(runtime, forward, args, kwargs, state, ordinal, sample)
        return forward(*args, **kwargs)

    def _first_call_only(self, runtime: Accelerator, forward: Any, args: tuple, kwargs: dict, state: dict,
                         ordinal: int, sample: torch.Tensor | None) -> Any:
        """Guidance dropped on a pipeline that makes one denoiser call per guidance branch: the
        step's first (conditional) call runs, the second is answered with its output, so the
        pipeline's ``uncond + g·(cond − uncond)`` returns the conditional prediction."""
        shape = None if sample is None else tuple(sample.shape)
        if ordinal == 0:
            output = forward(*args, **kwargs)
            state["first call"] = (shape, output)
            return output
        first = state.pop("first call", None)
        if ordinal != 1 or first is None or first[0] != shape:
            return forward(*args, **kwargs)
        runtime.answer_call()
        return first[1]


def guidance_layout(runtime: Accelerator, state: dict, sample: torch.Tensor | None) -> str:
    """How the pipeline call in progress runs classifier-free guidance, read from what it does
    rather than from its class name.

    ``"separate"``: guidance is on and step 0 made two denoiser calls (Wan: conditional, then
    unconditional). ``"batched"``: guidance is on, step 0 made one call, and that call's batch is
    two equal halves — the same latents twice, as every ``cat([latents] * 2)`` pipeline passes
    them (SD, SDXL, PixArt). ``"none"`` otherwise (no guidance, or guidance distilled into the
    model as an input, as on Flux). During step 0's first call a second call may still come; no
    decision depends on the layout before the gate, which is at step 1 at the earliest.
    """
    clock = runtime.clock
    guided = guidance_batched(runtime)
    if clock.step == 0:
        state["calls in step 0"] = clock.calls_in_step + 1
        if clock.calls_in_step == 0:
            state["equal halves"] = bool(
                guided and sample is not None and sample.dim() and sample.shape[0] % 2 == 0
                and torch.equal(*sample.chunk(2)))
    if not guided:
        return NO_GUIDANCE
    calls = state.get("calls in step 0", 1)
    if calls == 2:
        return SEPARATE
    if calls == 1 and state.get("equal halves"):
        return BATCHED
    return NO_GUIDANCE


def guidance_batched(runtime: Accelerator) -> bool:
    """Whether classifier-free guidance is on in this call (batched into halves or not: see
    :func:`guidance_layout` for which).

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
