"""Encoder propagation (Faster Diffusion): the UNet encoder runs only at key steps.

The encoder's features (conv_in, down blocks, mid block) barely change between adjacent steps
while the decoder's do, so at non-key steps the decoder runs on the encoder features kept from
the last key step, with the current step's time embedding. Consequences this module uses:

- the UNet output at a non-key step no longer depends on that step's latent, so the decoders
  of a run of non-key steps can all be computed in one batched call (``batch_decoders``); the
  engine serves the results as the pipeline asks for them;
- skipping the encoder thins out the fine texture the latent carries, which the paper restores
  by adding a little of the initial noise back in the late steps (``noise_injection``).

``key_steps="paper"`` is the authors' set for 50-step DDIM on Stable Diffusion
(0, 1, 2, 3, 5, 10, 15, 25, 35); for another step count every key step k maps to
round(k · steps / 50). ``interval=k`` gives key steps 0, k, 2k, ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..anatomy import anatomy_of
from ..core.forecast import Stacked, forecast_name
from ..core.method import Method
from ..core.plan import Decision
from ..core.rules import ReuseRule, batch_multiple, cat_batch, denoiser_sample, first_input, map_batched, tile_batch

if TYPE_CHECKING:
    from ..core.accelerator import Accelerator

PAPER_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)
PAPER_STEPS = 50
# denoiser inputs that come from another network each step: their future values are unknown
PER_STEP_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual",
                      "down_intrablock_additional_residuals")


def scale_key_steps(key_steps: Sequence[int], from_steps: int, to_steps: int) -> list[int]:
    """A key-step set for ``from_steps`` moved to ``to_steps`` by proportion (always keeps step 0)."""
    scaled = {min(to_steps - 1, round(k * to_steps / from_steps)) for k in key_steps}
    return sorted(scaled | {0})


def parse_key_steps(value: str | Sequence[int]) -> str | tuple[int, ...]:
    """``"paper"`` or explicit steps: a sequence, or text such as ``"0/1/2/5/10"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "paper":
            return "paper"
        try:
            return tuple(int(part) for part in text.replace(" ", "/").split("/") if part)
        except ValueError:
            raise ValueError(
                f"EncoderPropagation: key_steps must be 'paper' or step indices like '0/1/2/5', got {value!r}"
            ) from None
    return tuple(int(k) for k in value)


class _EncoderLive:
    """The batch of one step in the denoiser call in progress (a batched call stacks several)."""

    def __init__(self) -> None:
        self.step_batch = 0
        self.kept_batch = 0  # per-step batch of the features kept at the last key step


class EncoderRule(ReuseRule):
    """Gives the kept encoder output back, tiled when a batched-decoder call stacks several steps.

    Features kept for another per-step batch (another method halved the guidance batch since
    the key step) do not fit and are computed afresh. Forecast features come one per stacked
    step and are joined in step order.
    """

    serves_stacked = True

    def __init__(self, live: _EncoderLive) -> None:
        self.live = live

    def reset(self) -> None:
        self.live.kept_batch = 0

    def keep(self, args: tuple, kwargs: dict, output: Any, step: int) -> Any:
        x = first_input(args, kwargs)
        if isinstance(x, torch.Tensor) and x.dim():
            self.live.kept_batch = x.shape[0]
        return output

    def restore(self, kept: Any, args: tuple, kwargs: dict, step: int, signature: tuple,
                kept_signature: tuple | None) -> Any | None:
        kept_batch = next((shape[0] for _, shape, _, _ in kept_signature or () if shape), None)
        if self.live.step_batch and kept_batch != self.live.step_batch:
            return None
        stacked = kept.parts if isinstance(kept, Stacked) else None
        if signature == kept_signature:
            return kept if stacked is None else None
        times = batch_multiple(signature, kept_signature or ())
        if times is None:
            return None
        if stacked is not None:
            return cat_batch(stacked) if len(stacked) == times else None
        return tile_batch(kept, times)


@dataclass
class EncoderPropagation(Method):
    """Run the UNet encoder at key steps only and propagate its features to the other steps.

    Args:
        key_steps: ``"paper"`` (scaled to the step count), or explicit step indices (must include 0).
        interval: instead of ``key_steps``, a key step every ``interval`` steps.
        batch_decoders: compute the decoders of consecutive non-key steps in one batched call.
        max_batch_steps: at most this many steps per batched decoder call (bounds memory).
        noise_injection: add ``injection_strength`` × the initial noise to the latent after every
            step whose next timestep is below ``injection_below`` × the training timesteps.
        forecast: how a reused output is given back: ``"hold"`` (as last computed), ``"ab2"`` or
            ``"ab3"`` (extrapolated to the step's noise level from the last 2 or 3 computed ones).
    """

    spec_name = "encoder"

    key_steps: str | tuple[int, ...] = "paper"
    interval: int | None = None
    batch_decoders: bool = False
    max_batch_steps: int = 8
    noise_injection: bool = False
    injection_strength: float = 0.003
    injection_below: float = 0.5
    forecast: str = "hold"
    _live: _EncoderLive = field(default_factory=_EncoderLive, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.forecast = forecast_name(self.forecast, "EncoderPropagation")
        self.key_steps = parse_key_steps(self.key_steps)
        if self.interval is not None:
            if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
                raise ValueError(f"EncoderPropagation: interval must be an integer >= 1, got {self.interval!r}")
            if self.key_steps != "paper":
                raise ValueError("EncoderPropagation: give key_steps or interval, not both")
        if isinstance(self.key_steps, tuple):
            if not self.key_steps:
                raise ValueError("EncoderPropagation: key_steps is empty; it must include step 0")
            if min(self.key_steps) < 0:
                raise ValueError(f"EncoderPropagation: key_steps must be >= 0, got {list(self.key_steps)}")
            if 0 not in self.key_steps:
                raise ValueError(
                    f"EncoderPropagation: key_steps must include step 0 (nothing is kept before it), "
                    f"got {list(self.key_steps)}"
                )
        if isinstance(self.max_batch_steps, bool) or not isinstance(self.max_batch_steps, int) or self.max_batch_steps < 1:
            raise ValueError(f"EncoderPropagation: max_batch_steps must be an integer >= 1, got {self.max_batch_steps!r}")
        if not self.injection_strength >= 0:
            raise ValueError(f"EncoderPropagation: injection_strength must be >= 0, got {self.injection_strength!r}")
        if not 0 <= self.injection_below <= 1:
            raise ValueError(f"EncoderPropagation: injection_below must be in [0, 1], got {self.injection_below!r}")

    def spec(self) -> str:
        text = super().spec()
        if isinstance(self.key_steps, tuple):
            text = text.replace(f"key_steps={self.key_steps}", "key_steps=" + "/".join(map(str, self.key_steps)))
        return text

    # -- plan ----------------------------------------------------------------------------------
    def key_steps_for(self, num_steps: int) -> list[int]:
        if self.interval is not None:
            return list(range(0, num_steps, self.interval))
        if self.key_steps == "paper":
            return scale_key_steps(PAPER_KEY_STEPS, PAPER_STEPS, num_steps)
        outside = [k for k in self.key_steps if k >= num_steps]
        if outside:
            raise ValueError(
                f"EncoderPropagation: key_steps {outside} are outside [0, {num_steps}) for a {num_steps}-step call"
            )
        return sorted(set(self.key_steps))

    def modules(self, denoiser: torch.nn.Module) -> list[str]:
        anatomy = anatomy_of(denoiser, "EncoderPropagation")
        if anatomy.unet is None:
            raise TypeError(
                f"EncoderPropagation needs a UNet with an encoder/decoder split (conv_in, down blocks and mid block "
                f"feeding the up blocks through skip connections, e.g. UNet2DConditionModel); "
                f"{anatomy.denoiser} ({anatomy.family}) is a transformer, whose blocks all feed the next: there is "
                "no encoder whose features a decoder could reuse"
            )
        return list(anatomy.unet.encoder)

    def schedule(self, denoiser: torch.nn.Module, num_steps: int) -> Mapping[str, Sequence[Decision]]:
        keys = set(self.key_steps_for(num_steps))
        row = tuple(Decision.COMPUTE if s in keys else Decision.REUSE for s in range(num_steps))
        return {path: row for path in self.modules(denoiser)}

    def reuse_rule(self, denoiser: torch.nn.Module, path: str) -> ReuseRule:
        return EncoderRule(self._live)

    # -- batched decoders ----------------------------------------------------------------------
    def wrap_denoiser(self, runtime: Accelerator, forward: Any, args: tuple, kwargs: dict) -> Any:
        sample = denoiser_sample(args, kwargs)
        self._live.step_batch = sample.shape[0] if sample is not None and sample.dim() else 0
        if not self.batch_decoders:
            return forward(*args, **kwargs)
        state = runtime.call_state(self)
        step, ordinal = runtime.clock.step, runtime.clock.calls_in_step
        served = state.setdefault("served", {})
        ready = served.pop((step, ordinal), None)
        if ready is not None:
            expected_sample, output = ready
            if sample is not None and tuple(sample.shape) == expected_sample:
                runtime.answer_call()  # computed inside an earlier step's batched call
                return output
        entry = anatomy_of(runtime.denoiser, "EncoderPropagation").unet.conv_in  # the encoder's first module
        if runtime.decision(entry) is not Decision.REUSE or runtime.clock.num_steps is None:
            return forward(*args, **kwargs)
        # stacking is only right when every stacked step reuses the same kept encoder features
        run = self._run_length(runtime, step, entry) if self._live.kept_batch == self._live.step_batch else 1
        batched = _batched_inputs(runtime, args, kwargs, step, run) if run > 1 else None
        if batched is None:
            return forward(*args, **kwargs)
        b_args, b_kwargs, batch = batched
        runtime.stacked_steps = tuple(range(step, step + run))
        try:
            output = forward(*b_args, **b_kwargs)
        finally:
            runtime.stacked_steps = None
        chunks = _split_output(output, batch, run)
        sample_shape = tuple(sample.shape)
        for i in range(1, run):
            served[(step + i, ordinal)] = (sample_shape, chunks[i])
        return chunks[0]

    def _run_length(self, runtime: Accelerator, step: int, entry: str) -> int:
        """Non-key steps from ``step`` up to the next key step, capped by ``max_batch_steps``."""
        plan = runtime.call_plan
        length = 1
        while (length < self.max_batch_steps and step + length < plan.num_steps
               and plan.decision(entry, step + length) is Decision.REUSE
               and runtime.can_stack(self, step, step + length)):
            length += 1
        return length

    # -- prior noise injection -----------------------------------------------------------------
    def after_scheduler_step(self, runtime: Accelerator, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.noise_injection or self.injection_strength == 0:
            return output
        state = runtime.call_state(self)
        sample = kwargs.get("sample", args[2] if len(args) > 2 else None)
        if "initial" not in state and isinstance(sample, torch.Tensor):
            state["initial"] = sample.detach().clone()
        scheduler = runtime.pipe.scheduler
        upcoming = _timestep_at(scheduler, runtime.clock.step + 1)
        train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000)
        initial = state.get("initial")
        if upcoming is None or initial is None or not upcoming < self.injection_below * train_steps:
            return output
        if isinstance(output, tuple):
            return (output[0] + self.injection_strength * initial.to(output[0].dtype), *output[1:])
        output.prev_sample = output.prev_sample + self.injection_strength * initial.to(output.prev_sample.dtype)
        return output


def _timestep_at(scheduler: Any, step: int) -> float | None:
    """The timestep the pipeline's loop passes at ``step`` of this call (None past the end)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    index = (getattr(scheduler, "_begin_index", None) or 0) + step
    return float(timesteps[index]) if index < len(timesteps) else None


def _batched_inputs(runtime: Accelerator, args: tuple, kwargs: dict, step: int,
                    run: int) -> tuple[tuple, dict, int] | None:
    """The denoiser inputs of steps ``step .. step+run-1`` stacked along the batch, step-major.

    Only what is known now can be stacked: refuse (``None``) when the call carries per-step
    residuals from another network (ControlNet, T2I-Adapter) or a timestep that is not the
    scheduler's own for this step.
    """
    if any(kwargs.get(name) is not None for name in PER_STEP_RESIDUALS):
        return None
    sample = denoiser_sample(args, kwargs)
    if sample is None:
        return None
    batch = sample.shape[0]
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    current = _timestep_at(runtime.pipe.scheduler, step)
    if timestep is None or current is None:
        return None
    given = timestep.reshape(-1)[0].item() if isinstance(timestep, torch.Tensor) else float(timestep)
    if given != current:
        return None
    futures = [_timestep_at(runtime.pipe.scheduler, step + i) for i in range(run)]
    if any(t is None for t in futures):
        return None
    dtype = timestep.dtype if isinstance(timestep, torch.Tensor) else runtime.pipe.scheduler.timesteps.dtype
    stacked = torch.tensor(futures, dtype=dtype, device=sample.device).repeat_interleave(batch)

    def tile(value: Any) -> Any:
        return map_batched(value, batch, lambda tensor: tile_batch(tensor, run))

    new_args = list(args)
    new_kwargs = {k: tile(v) for k, v in kwargs.items() if k not in ("sample", "timestep")}
    if args:
        new_args[0] = tile_batch(sample, run)
    else:
        new_kwargs["sample"] = tile_batch(sample, run)
    if len(args) > 1:
        new_args[1] = stacked
    else:
        new_kwargs["timestep"] = stacked
    for i in range(2, len(new_args)):
        new_args[i] = tile(new_args[i])
    return tuple(new_args), new_kwargs, batch


def _split_output(output: Any, batch: int, run: int) -> list[Any]:
    """One denoiser output per stacked step, each of the original container type."""
    if isinstance(output, torch.Tensor):
        return list(output.split(batch))
    if isinstance(output, tuple):
        parts = output[0].split(batch)
        return [(part, *output[1:]) for part in parts]
    name = next(iter(output.keys())) if hasattr(output, "keys") else "sample"
    parts = getattr(output, name).split(batch)
    return [type(output)(**{name: part}) for part in parts]
