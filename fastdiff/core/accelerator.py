"""``apply``: attach methods to a pipeline atomically, and the handle that undoes it.

The pipeline's own ``__call__`` is never copied: the instance is moved to a subclass whose
``__call__`` brackets the original one, so the engine knows where each call starts and ends
(reset the clock, drop cached tensors) whatever the pipeline's signature.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import ModelHook
from torch.utils.flop_counter import FlopCounterMode

from .clock import StepClock, steps_announced
from .compiled import CompileError, CompileState
from .flops import total_flop_counter
from .forecast import FORECASTS
from .hooks import CLOCK_HOOK, REUSE_HOOK, DenoiserClockHook, InstalledHook, ReuseHook, install_hook, uninstall_hook
from .ledger import Ledger, ModuleEvent, Report
from .method import Method
from .plan import Decision, Plan
from .rules import input_signature
from .timeline import announced_levels, linear_levels, planned_levels

DENOISER_NAMES = ("unet", "transformer")
ATTRIBUTE = "acceleration"


def compiled_wrapper(module: Any) -> Any:
    """The ``OptimizedModule`` that ``torch.compile(model)`` returns, or ``None``."""
    return module if isinstance(getattr(module, "_orig_mod", None), torch.nn.Module) else None


def find_denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    """The network called once per step; methods act on its submodules (inside the
    ``torch.compile(model)`` wrapper where the pipeline holds one)."""
    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(
            f"pipe: expected a diffusers DiffusionPipeline, got {type(pipe).__name__}; "
            "load one with e.g. StableDiffusionPipeline.from_pretrained(...)"
        )
    for name in DENOISER_NAMES:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            wrapper = compiled_wrapper(module)
            return name, (module if wrapper is None else wrapper._orig_mod)
    raise TypeError(
        f"pipe: {type(pipe).__name__} has no denoiser fastdiff can accelerate "
        f"(looked for components {list(DENOISER_NAMES)})"
    )


@functools.cache
def _accelerated_class(cls: type) -> type:
    """A same-named subclass whose ``__call__`` runs the original inside the engine's call bracket."""
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        accelerator = self.__dict__.get(ATTRIBUTE)
        if accelerator is None:
            return original(self, *args, **kwargs)
        with accelerator.pipeline_call(args, kwargs):
            return original(self, *args, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
         "__doc__": cls.__doc__, "_fastdiff_base": cls},
    )


class Accelerator:
    """Handle returned by :func:`apply`: the plan, the ledger, and ``remove()``."""

    def __init__(self, pipe: DiffusionPipeline, methods: Sequence[Method], *, count_flops: bool = False,
                 default_steps: int | None = None) -> None:
        self.pipe = pipe
        self.denoiser_name, self.denoiser = find_denoiser(pipe)
        self.methods = list(methods)
        self.count_flops = count_flops
        self.clock = StepClock()
        self.ledger = Ledger()
        preferred = next((n for m in self.methods if (n := m.preferred_steps()) is not None), None)
        self.default_steps = default_steps or preferred or pipeline_default_steps(pipe)
        self._timed = [m for m in self.methods if m.overrides("timed_schedule")]
        self._wrappers = sorted((m for m in self.methods if m.overrides("wrap_denoiser")), key=lambda m: m.wrap_order)
        self._step_watchers = [m for m in self.methods if m.overrides("after_scheduler_step")]
        self._call_state: dict[int, dict[str, Any]] = {}
        self.call_arguments: dict[str, Any] = {}  # of the pipeline call in progress, by name
        self._plans: dict[Any, Plan] = {}
        self._plan: Plan | None = None
        self._last_plan: Plan | None = None
        self._installed: list[InstalledHook] = []
        self._hooks: list[tuple[torch.nn.Module, ModelHook]] = []  # every hook fastdiff installed, with its module
        self.compile_state = CompileState()
        self._reuse_hooks: list[ReuseHook] = []
        self._counter: FlopCounterMode | None = None
        # while a vanilla shadow pass is counted: its input signature (hooks record their cost under it)
        self.measuring: tuple | None = None
        self._shadow_counter: FlopCounterMode | None = None
        self.denoiser_signature: tuple | None = None  # of the innermost denoiser call in progress
        # what the unmodified denoiser runs, by input signature: measured once per shape, kept for
        # the life of the handle (a vanilla call's cost depends on nothing but its input shapes)
        self._vanilla: dict[tuple, int] = {}
        self._answered = False  # the denoiser call in progress is answered without running it
        # the noise level of each step of the call in progress: the time forecasts extrapolate in
        self._levels: tuple[float, ...] = ()
        # the steps the denoiser call in progress computes at once (a method that stacks several
        # steps into one batch says so); None: just the clock's step
        self.stacked_steps: tuple[int, ...] | None = None

    # -- plan -----------------------------------------------------------------------------
    def plan_for(self, num_steps: int, noise_levels: Sequence[float] | None = None) -> Plan:
        """The plan of a call with ``num_steps`` steps. Methods whose decisions depend on the
        timestep see ``noise_levels`` (default: those the pipeline's scheduler would visit)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        key: Any = num_steps
        if self._timed:
            if noise_levels is None or len(noise_levels) != num_steps:
                noise_levels = planned_levels(getattr(self.pipe, "scheduler", None), num_steps)
            key = (num_steps, tuple(noise_levels))
        if key not in self._plans:
            plan = Plan.merge(num_steps, ((m.name, self._rows(m, num_steps, noise_levels)) for m in self.methods))
            for method in self.methods:
                check_forecast(method, plan)
            self._plans[key] = plan
        return self._plans[key]

    def _rows(self, method: Method, num_steps: int, noise_levels: Sequence[float] | None) -> Any:
        if method in self._timed and noise_levels is not None:
            return method.timed_schedule(self.denoiser, noise_levels)
        return method.schedule(self.denoiser, num_steps)

    @property
    def plan(self) -> Plan:
        """The plan of the last call's step count (before any call: the pipeline's default)."""
        if self._last_plan is not None:
            return self._last_plan
        return self.plan_for(self.default_steps)

    @property
    def call_plan(self) -> Plan:
        """The plan of the call in progress (outside a call: as :attr:`plan`)."""
        return self._plan or self.plan

    def report(self, call: int | None = -1) -> Report:
        return self.ledger.report(call)

    # -- install / remove -----------------------------------------------------------------
    def _claims(self) -> dict[str, Method]:
        return claimed_modules(self.denoiser_name, self.denoiser, self.methods)

    def _register(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        self._installed.append(install_hook(module, hook, name))
        self._hooks.append((module, hook))

    @property
    def compiled(self) -> bool:
        """Whether compilation is in force anywhere in the denoiser (as of the last call or ``apply``)."""
        return self.compile_state.active

    def refresh_compile(self) -> None:
        """Find what the user compiled (before or after ``apply``) and route each hooked module's own
        work through it; refuse, before any work, what cannot run compiled."""
        wrapper = compiled_wrapper(getattr(self.pipe, self.denoiser_name, None))
        if wrapper is not None and wrapper._orig_mod is not self.denoiser:
            wrapper = None
        self.compile_state.refresh(self.denoiser_name, self.denoiser, wrapper, self._hooks)
        if self.compile_state.active:
            for method in self.methods:
                reason = method.compile_refusal()
                if reason:
                    raise CompileError(f"{type(method).__name__} cannot run with a compiled {self.denoiser_name}: "
                                       f"{reason}")

    def attach(self) -> None:
        """Validate everything first, then hook; any failure undoes what was done."""
        if ATTRIBUTE in self.pipe.__dict__:
            raise ValueError(
                "pipe: already accelerated; call pipe.acceleration.remove() first, or pass all methods "
                "to one fastdiff.apply(...)"
            )
        registry = getattr(self.denoiser, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(CLOCK_HOOK) is not None:
            raise ValueError(
                f"pipe: its {self.denoiser_name} is already accelerated through another pipeline that shares it "
                "(e.g. one made with from_pipe or **components); call .acceleration.remove() on that pipeline first"
            )
        owners = self._claims()
        self.plan_for(self.default_steps)
        try:
            self._register(self.denoiser, DenoiserClockHook(self), CLOCK_HOOK)
            modules = dict(self.denoiser.named_modules())
            for method in self.methods:  # inner to the reuse hooks: a reused module runs none of them
                for target, hook in method.module_hooks(self, self.denoiser):
                    module = modules[target] if isinstance(target, str) else target
                    self._register(module, hook, f"fastdiff.{method.spec_name or method.name}")
            for path, owner in owners.items():
                rule = owner.reuse_rule(self.denoiser, path)
                order = owner.forecast_order if rule is None or rule.forecasts else 1
                hook = ReuseHook(self, path, owner.name, rule, order)
                self._register(modules[path], hook, REUSE_HOOK)
                self._reuse_hooks.append(hook)
            self.refresh_compile()
            self.pipe.__dict__[ATTRIBUTE] = self
            self.pipe.__class__ = _accelerated_class(type(self.pipe))
        except BaseException:
            self._detach()
            raise
        finally:
            _invalidate_registry_cache(self.denoiser)

    def _detach(self) -> None:
        self.compile_state.release(hook for _, hook in self._hooks)
        for item in reversed(self._installed):
            uninstall_hook(item)
        self._installed.clear()
        self._hooks.clear()
        self._reuse_hooks.clear()
        base = getattr(type(self.pipe), "_fastdiff_base", None)
        if base is not None and self.pipe.__dict__.get(ATTRIBUTE) is self:
            self.pipe.__class__ = base
        if self.pipe.__dict__.get(ATTRIBUTE) is self:
            del self.pipe.__dict__[ATTRIBUTE]
        _invalidate_registry_cache(self.denoiser)

    def remove(self) -> None:
        """Take every hook off; the pipeline then produces exactly what it produced before ``apply``."""
        if self.clock.active:
            raise RuntimeError("remove() called during a pipeline call")
        self._detach()

    @property
    def attached(self) -> bool:
        return self.pipe.__dict__.get(ATTRIBUTE) is self

    # -- runtime: called by the hooks -----------------------------------------------------
    @contextlib.contextmanager
    def pipeline_call(self, args: tuple = (), kwargs: dict | None = None) -> Iterator[None]:
        if self.clock.active:  # a pipeline calling itself: the outer call owns the clock
            yield
            return
        self.refresh_compile()
        self.call_arguments = _bound_arguments(type(self.pipe), args, kwargs or {})
        scheduler = getattr(self.pipe, "scheduler", None)
        observed = _observe_steps(scheduler, self)
        self.clock.begin_call()
        self._call_state.clear()
        self.ledger.start_call(self.clock.call_index)
        self._plan = None
        try:
            yield
        finally:
            self.clock.end_call()
            if observed is not None:
                scheduler.__dict__.pop("step", None)
            for hook in self._reuse_hooks:
                hook.clear()
            self._call_state.clear()
            self._counter = None

    def denoiser_started(self, args: tuple, kwargs: dict) -> None:
        clock = self.clock
        clock.timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if self._plan is None:
            scheduler = getattr(self.pipe, "scheduler", None)
            steps = steps_announced(scheduler, clock.timestep) or self.default_steps
            clock.num_steps = steps
            levels = announced_levels(scheduler, steps)
            self._plan = self._last_plan = self.plan_for(steps, levels if self._timed else None)
            self._levels = levels or linear_levels(steps)

    def step_time(self, step: int) -> float:
        """The noise level of ``step`` in the call in progress (1 = pure noise), the time reused
        outputs are forecast in; past the announced steps, the last spacing continued."""
        levels = self._levels
        if not levels:
            return float(-step)
        if step < len(levels):
            return float(levels[step])
        spacing = levels[-1] - levels[-2] if len(levels) > 1 else -1.0
        return float(levels[-1] + spacing * (step - len(levels) + 1))

    def run_denoiser(self, forward: Any, args: tuple, kwargs: dict) -> Any:
        """One denoiser call, through every method that acts at the denoiser boundary."""
        call = forward
        if self.count_flops and self.call_plan.count(Decision.SKIP):
            call = self._counted(forward)
        for method in reversed(self._wrappers):
            call = functools.partial(_wrapped_call, method, self, call)
        return call(*args, **kwargs)

    def can_stack(self, method: Method, step: int, later: int) -> bool:
        """Whether ``method`` may compute step ``later``'s denoiser work inside step ``step``'s call:
        every other method's modules decide the same at both, and no method marks ``later``."""
        plan = self.call_plan
        if later >= plan.num_steps:
            return False
        if any(later in other.step_barriers(plan.num_steps) for other in self.methods if other is not method):
            return False
        return all(plan.decision(module, step) is plan.decision(module, later)
                   for module, owner in plan.owners.items() if owner != method.name)

    def call_state(self, method: Method) -> dict[str, Any]:
        """Scratch space of ``method`` for the current pipeline call (emptied at its start and end)."""
        return self._call_state.setdefault(id(method), {})

    def scheduler_stepped(self, args: tuple, kwargs: dict, output: Any) -> Any:
        for method in self._step_watchers:
            output = method.after_scheduler_step(self, args, kwargs, output)
        self.clock.advance()
        return output

    def answer_call(self) -> None:
        """Tell the engine that the denoiser call in progress is being answered without running the
        denoiser (from a batched earlier call, or a dropped guidance call): the Ledger counts it as
        answered, not as a denoiser call (NFE)."""
        self._answered = True

    def denoiser_finished(self, seconds: float, counter: FlopCounterMode | None, vanilla: int | None = None) -> None:
        clock = self.clock
        clock.calls_in_step += 1
        flops = counter.get_total_flops() if counter is not None else None
        self._counter = None
        if flops is not None and vanilla is None and not self.methods:
            vanilla = flops  # nothing is applied: this call is the vanilla one
        answered, self._answered = self._answered, False
        self.ledger.record_step(clock.call_index, clock.step, _as_float(clock.timestep), seconds, flops,
                                denoiser_calls=0 if answered else 1, flops_vanilla=vanilla, answered=int(answered))

    def vanilla_flops(self, forward: Any, args: tuple, kwargs: dict) -> int | None:
        """What the unmodified denoiser would run on the pipeline's own arguments of this call.

        Asked at the outermost denoiser boundary, before any method changes the batch or answers
        from stored outputs: the reference "saved" and the ideal speedup are measured against.
        ``None`` when not counting, and when no method is applied (the call's own count is it).
        """
        if not self.count_flops or not self.methods:
            return None
        key = input_signature(args, kwargs)
        if key not in self._vanilla:
            self._vanilla[key] = self._shadow_pass(forward, args, kwargs, key)
        return self._vanilla[key]

    def _shadow_pass(self, forward: Any, args: tuple, kwargs: dict, key: tuple) -> int:
        """Run the denoiser once as vanilla (every fastdiff hook passes through while ``measuring``
        is set; patch layers exchange nothing) and return its FLOPs. Its output is dropped and its
        operators are hidden from every FLOP counter in effect, the ledger's and any a caller put
        around the pipeline, so the measurement never shows up as work run. Hooked modules record
        their own vanilla cost under ``key`` on the way (what a SKIP there saves)."""
        counter = total_flop_counter()
        self.measuring, self._shadow_counter = key, counter
        try:
            with _hidden_from_flop_counters(), torch.no_grad(), counter:
                forward(*args, **kwargs)
        finally:
            self.measuring, self._shadow_counter = None, None
        return counter.get_total_flops()

    def flop_counter(self) -> FlopCounterMode | None:
        self._counter = total_flop_counter() if self.count_flops else None
        return self._counter

    def record_comm(self, kind: str, sent: int, received: int, seconds: float) -> None:
        """Bytes exchanged with other processes in the current step (patch parallelism)."""
        self.ledger.record_comm(self.clock.call_index, self.clock.step, kind, sent, received, seconds)

    def flops_so_far(self) -> int | None:
        """Running FLOP total of the denoiser call in progress (of the shadow pass, while one is
        measuring); hooks difference it around a module."""
        counter = self._shadow_counter if self.measuring is not None else self._counter
        return None if counter is None else counter.get_total_flops()

    def _counted(self, forward: Any) -> Any:
        """The innermost denoiser call, preceded (once per input signature) by a vanilla shadow pass
        whose FLOPs every hooked module records: the only way to know what a module that is skipped
        would have cost there. Where no method changed the arguments, the pass made at the outer
        boundary for the same signature already recorded it, and none is run here."""

        def call(*args: Any, **kwargs: Any) -> Any:
            key = input_signature(args, kwargs)
            self.denoiser_signature = key
            if self._counter is not None and key not in self._vanilla:
                self._vanilla[key] = self._shadow_pass(forward, args, kwargs, key)
            return forward(*args, **kwargs)

        return call

    def decision(self, path: str) -> Decision:
        plan = self._plan
        return Decision.COMPUTE if plan is None else plan.decision(path, self.clock.step)

    def keeps_output(self, path: str) -> bool:
        return self._plan is not None and self._plan.reuses(path)

    def module_finished(self, hook: ReuseHook, decision: Decision, seconds: float, flops: int | None,
                        skipped_flops: int | None = None) -> None:
        if decision is Decision.COMPUTE and hook.cached_bytes:
            held = sum(h.cached_bytes for h in self._reuse_hooks)
            self.ledger.note_cache_bytes(self.clock.call_index, held)
        event = ModuleEvent(self.clock.call_index, self.clock.step, hook.path, hook.method, decision, seconds)
        if decision is Decision.COMPUTE:
            event.flops = flops
        elif decision is Decision.SKIP:
            event.flops_saved = skipped_flops
        elif self.count_flops:
            event.flops_saved = hook.cached_flops
        self.ledger.modules.append(event)

    def __repr__(self) -> str:
        methods = ", ".join(m.spec() for m in self.methods) or "no methods"
        return f"Accelerator({type(self.pipe).__name__}.{self.denoiser_name}: {methods})"


def claimed_modules(denoiser_name: str, denoiser: torch.nn.Module, methods: Sequence[Method],
                    before_prepare: bool = False) -> dict[str, Method]:
    """Which method owns each claimed module; two methods claiming one module is an error naming
    both. ``before_prepare``: use what methods will claim once prepared, where they know it."""
    available = dict(denoiser.named_modules())
    owners: dict[str, Method] = {}
    for method in methods:
        paths = method.claims_before_prepare(denoiser) if before_prepare else method.modules(denoiser)
        for path in paths or ():
            if path not in available:
                raise ValueError(f"{method.name}: module {path!r} does not exist in the {denoiser_name}")
            if path in owners:
                raise ValueError(
                    f"methods {owners[path].name!r} and {method.name!r} both claim module {path!r} of the "
                    f"{denoiser_name}; combine methods that act on different modules"
                )
            owners[path] = method
    return owners


def check_forecast(method: Method, plan: Plan) -> None:
    """A forecast needs as many computed outputs before some reuse as it has points; a plan that
    never gets there would silently forecast with fewer, so it is refused."""
    order = method.forecast_order
    if order <= 1:
        return
    available = 0
    reuses = False
    for module, row in plan.rows.items():
        if plan.owners.get(module) != method.name:
            continue
        computed = 0
        for decision in row:
            if decision is Decision.COMPUTE:
                computed += 1
            elif decision is Decision.REUSE:
                reuses = True
                available = max(available, computed)
    if reuses and available < order:
        lower = [name for name, points in FORECASTS.items() if points <= max(available, 1)]
        raise ValueError(
            f"{type(method).__name__}: forecast={method.forecast!r} extrapolates from {order} computed outputs, "
            f"but in a {plan.num_steps}-step call the plan computes at most {available} before a reuse; "
            f"allowed here: {lower}"
        )


def check_composition(pipe: DiffusionPipeline, methods: Sequence[Method]) -> None:
    """Refuse methods that cannot be applied together before any of them is prepared (calibrated)."""
    denoiser_name, denoiser = find_denoiser(pipe)
    claimed_modules(denoiser_name, denoiser, methods, before_prepare=True)


def _bound_arguments(cls: type, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The pipeline call's arguments by name, defaults included (what methods may consult)."""
    try:
        bound = inspect.signature(getattr(cls, "_fastdiff_base", cls).__call__).bind(None, *args, **kwargs)
    except TypeError:
        return dict(kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(arguments)), None)  # self
    extra = arguments.pop("kwargs", None)
    if isinstance(extra, dict):
        arguments.update(extra)
    return arguments


def _wrapped_call(method: Method, runtime: Accelerator, inner: Any, *args: Any, **kwargs: Any) -> Any:
    return method.wrap_denoiser(runtime, inner, args, kwargs)


def _observe_steps(scheduler: Any, runtime: Accelerator) -> Any:
    """Shadow ``scheduler.step`` for one call so each loop iteration advances the clock."""
    if scheduler is None or "step" in getattr(scheduler, "__dict__", {}):
        return None
    original = scheduler.step

    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        return runtime.scheduler_stepped(args, kwargs, original(*args, **kwargs))

    scheduler.__dict__["step"] = step
    return step


def pipeline_default_steps(pipe: Any) -> int:
    parameter = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    if parameter is not None and isinstance(parameter.default, int):
        return parameter.default
    return 50


@contextlib.contextmanager
def _hidden_from_flop_counters() -> Iterator[None]:
    """Take every FLOP counter off torch's dispatch-mode stack for the duration (other modes stay
    in their order), so the operators run meanwhile are counted by none of them. torch has no
    public way to pause a counter; its own ``_disable_current_modes`` would drop every mode."""
    from torch.utils import _python_dispatch as dispatch
    from torch.utils import flop_counter

    kinds: tuple[type, ...] = (FlopCounterMode,)
    pushed = getattr(flop_counter, "_FlopCounterMode", None)  # what FlopCounterMode pushes, torch >= 2.4
    if pushed is not None:
        kinds += (pushed,)
    stack = dispatch._get_current_dispatch_mode_stack()
    if not any(isinstance(mode, kinds) for mode in stack):
        yield
        return
    popped = [dispatch._pop_mode() for _ in range(len(stack))]  # top of the stack first
    kept = [mode for mode in reversed(popped) if not isinstance(mode, kinds)]
    for mode in kept:
        dispatch._push_mode(mode)
    try:
        yield
    finally:
        for _ in kept:
            dispatch._pop_mode()
        for mode in reversed(popped):
            dispatch._push_mode(mode)


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0])
    return float(value)


def _invalidate_registry_cache(module: torch.nn.Module) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def apply(pipe: DiffusionPipeline, *methods: Method, count_flops: bool = False) -> Accelerator:
    """Accelerate ``pipe`` in place with ``methods``; returns the handle (also ``pipe.acceleration``).

    Nothing is changed unless everything validates and installs: on error the pipeline is as it was.
    """
    for i, method in enumerate(methods):
        if not isinstance(method, Method):
            raise TypeError(
                f"methods[{i}]: expected a fastdiff method such as fastdiff.DeepCache(...), "
                f"got {type(method).__name__}"
            )
    accelerator = Accelerator(pipe, methods, count_flops=count_flops)
    accelerator.attach()
    return accelerator
