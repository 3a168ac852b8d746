"""The two diffusers hooks the engine installs: one on the denoiser, one per claimed module.

Both are ``diffusers.hooks.ModelHook`` subclasses registered through ``HookRegistry`` so they
stack with diffusers' own hooks (offloading, its caches) and come off cleanly. Neither is ever
traced by ``torch.compile`` (see :mod:`fastdiff.core.compiled`): a compiled caller breaks its
graph at the hook, and the module behind the hook runs through ``compiled_forward`` when the
user compiled it or a module around it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .compiled import eager
from .forecast import Stacked, forecast
from .plan import Decision
from .rules import DEFAULT_RULE, ReuseRule, input_signature

if TYPE_CHECKING:
    from .accelerator import Accelerator

CLOCK_HOOK = "fastdiff.clock"
REUSE_HOOK = "fastdiff.reuse"


@dataclass
class InstalledHook:
    """Enough to take one hook off again and leave the module exactly as it was found."""

    module: torch.nn.Module
    name: str
    created_registry: bool
    had_forward: bool


def install_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> InstalledHook:
    installed = InstalledHook(module, name, not hasattr(module, "_diffusers_hook"), "forward" in module.__dict__)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return installed


def uninstall_hook(item: InstalledHook) -> None:
    """Remove the hook; drop the registry and instance ``forward`` only if nobody else's hooks remain."""
    registry = getattr(item.module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(item.name, recurse=False)
    if registry.hooks:  # someone else's hooks remain: their forward chain stays as it is
        return
    if item.created_registry:
        del item.module._diffusers_hook
    if not item.had_forward:
        item.module.__dict__.pop("forward", None)


def tensor_bytes(value: Any) -> int:
    """Memory held by the tensors in a module output (tensor, tuple, list, dict or dataclass)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if hasattr(value, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


def module_forward(hook: ModelHook) -> Any:
    """What the hook runs for its module: the compiled form where compilation is in force. (While
    FLOPs are counted, :class:`DenoiserClockHook` runs the whole call with the compiler stood down.)"""
    compiled = getattr(hook, "compiled_forward", None)
    return hook.fn_ref.original_forward if compiled is None else compiled


class DenoiserClockHook(ModelHook):
    """Tells the engine a denoiser call is starting and what it cost; counts FLOPs when asked.

    It is the outermost denoiser boundary: the arguments it sees are the pipeline's own, before
    any method halves the batch, stacks steps or answers from stored outputs, so this is where
    what vanilla would have run for the call is measured.
    """

    def __init__(self, runtime: Accelerator) -> None:
        super().__init__()
        self.runtime = runtime
        self.compiled_forward: Any = None

    @eager
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        runtime = self.runtime
        forward = module_forward(self)
        if not runtime.clock.active or runtime.measuring is not None:
            return forward(*args, **kwargs)
        runtime.denoiser_started(args, kwargs)
        counter = runtime.flop_counter()
        # FLOPs are counted as operators dispatch, which compiled kernels do not: counting runs eagerly
        with contextlib.nullcontext() if counter is None else torch.compiler.set_stance("force_eager"):
            vanilla = runtime.vanilla_flops(forward, args, kwargs)
            start = time.perf_counter()
            if counter is None:
                output = runtime.run_denoiser(forward, args, kwargs)
            else:
                with counter:
                    output = runtime.run_denoiser(forward, args, kwargs)
        runtime.denoiser_finished(time.perf_counter() - start, counter, vanilla)
        return output


class ReuseHook(ModelHook):
    """Executes the plan for one module: compute (and keep), give the kept output back, or pass through.

    The latest kept output is held (one per denoiser call of a step), with the signature of
    the inputs that produced it; a forecasting method (``order`` > 1) holds its last ``order``
    and gives back their extrapolation to the current step's time. What is kept and how it is
    given back is the method's :class:`~fastdiff.core.rules.ReuseRule`; by default a REUSE whose
    inputs changed shape (another batch size or resolution) computes instead.
    """

    _is_stateful = True

    def __init__(self, runtime: Accelerator, path: str, method: str, rule: ReuseRule | None = None,
                 order: int = 1) -> None:
        super().__init__()
        self.runtime = runtime
        self.path = path
        self.method = method
        self.rule = rule or DEFAULT_RULE
        self.order = order
        # the latest kept output per denoiser call of a step (its ordinal): pipelines that run
        # guidance as separate calls (Wan, Flux's true CFG) must not be given each other's
        self.kept: dict[int, tuple[Any, tuple, int | None, int]] = {}  # value, signature, FLOPs, bytes
        # with forecasting: the earlier kept outputs too, (time, value, signature, bytes), newest first
        self.history: dict[int, list[tuple[float, Any, tuple, int]]] = {}
        self.cached_flops: int | None = None  # of the kept output last given back
        # what this module costs when the whole denoiser runs vanilla, by the denoiser call's input
        # signature: what a SKIP saves (a skipped module's own inputs may not be what it would have seen)
        self.vanilla_flops: dict[tuple, int] = {}
        self.compiled_forward: Any = None

    @property
    def cached_bytes(self) -> int:
        if self.order > 1:
            return sum(point[3] for points in self.history.values() for point in points)
        return sum(entry[3] for entry in self.kept.values())

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.clear()
        return module

    def clear(self) -> None:
        self.kept.clear()
        self.history.clear()
        self.cached_flops = None
        self.rule.reset()

    @eager
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        runtime = self.runtime
        forward = module_forward(self)
        if not runtime.clock.active:
            return forward(*args, **kwargs)
        if runtime.measuring is not None:
            before = runtime.flops_so_far()
            output = forward(*args, **kwargs)
            if before is not None:
                self.vanilla_flops[runtime.measuring] = runtime.flops_so_far() - before
            return output
        decision = runtime.decision(self.path)
        step = runtime.clock.step
        signature = input_signature(args, kwargs)
        start = time.perf_counter()
        flops = None
        saved = None
        output = None
        ordinal = runtime.clock.calls_in_step
        entry = self.kept.get(ordinal) if decision is Decision.REUSE else None
        if entry is not None:
            value = entry[0] if self.order == 1 else self._forecast(ordinal, entry, step)
            output = self.rule.restore(value, args, kwargs, step, signature, entry[1])
            self.cached_flops = entry[2]
        if output is not None:
            decision = Decision.REUSE
        elif decision is Decision.SKIP:
            output = self.rule.skip(args, kwargs)
            if runtime.count_flops:
                saved = self.vanilla_flops.get(runtime.denoiser_signature)
        else:
            decision = Decision.COMPUTE
            before = runtime.flops_so_far()
            output = forward(*args, **kwargs)
            if before is not None:
                flops = runtime.flops_so_far() - before
            keeps = runtime.keeps_output(self.path)
            if keeps or self.rule.observes:
                kept = self.rule.keep(args, kwargs, output, step)
                if keeps:
                    self.kept[ordinal] = (kept, signature, flops, tensor_bytes(kept))
                    if self.order > 1:
                        self._remember(ordinal, step, kept, signature)
        runtime.module_finished(self, decision, time.perf_counter() - start, flops, saved)
        return output

    def _remember(self, ordinal: int, step: int, kept: Any, signature: tuple) -> None:
        points = self.history.setdefault(ordinal, [])
        points.insert(0, (self.runtime.step_time(step), kept, signature, tensor_bytes(kept)))
        del points[self.order:]

    def _forecast(self, ordinal: int, entry: tuple, step: int) -> Any:
        """The kept output extrapolated to this step's time from the points kept for the same
        inputs; one per step when the call computes several steps at once."""
        points = [(t, v) for t, v, sig, _ in self.history.get(ordinal, ()) if sig == entry[1]]
        if len(points) < 2:
            return entry[0]
        steps = self.runtime.stacked_steps
        if steps and len(steps) > 1 and getattr(self.rule, "serves_stacked", False):
            return Stacked([forecast(points, self.runtime.step_time(s), self.order) for s in steps])
        return forecast(points, self.runtime.step_time(step), self.order)
