"""The contract every acceleration method fulfils, and the ``name:key=value`` spec syntax.

A method is a dataclass of its parameters. It never touches a pipeline itself: it names the
denoiser modules it claims and the decision for each step, and the engine does the rest. That
is what makes composition checkable and removal exact.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .forecast import REUSING_METHODS, forecast_order
from .plan import Decision
from .rules import ReuseRule

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from .accelerator import Accelerator

METHODS: dict[str, type[Method]] = {}


class Method:
    """Base class: subclasses set ``spec_name`` and implement ``modules`` and ``schedule``."""

    spec_name: ClassVar[str] = ""
    spec_keys: ClassVar[tuple[str, ...]] = ()  # parameters always shown in spec(), even at default
    # methods that change the denoiser call nest in this order, lowest outermost: a method that
    # reads the guidance halves must see the batch before one that stacks steps into it
    wrap_order: ClassVar[int] = 50

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.spec_name:
            METHODS[cls.spec_name] = cls

    @property
    def name(self) -> str:
        return self.spec_name or type(self).__name__

    def modules(self, denoiser: torch.nn.Module) -> list[str]:
        """Paths (as in ``named_modules``) this method claims; raises if the denoiser is unsupported."""
        raise NotImplementedError

    def schedule(self, denoiser: torch.nn.Module, num_steps: int) -> Mapping[str, Sequence[Decision]]:
        """The decision for each claimed module at each of ``num_steps`` steps."""
        raise NotImplementedError

    def claims_before_prepare(self, denoiser: torch.nn.Module) -> list[str] | None:
        """The modules this method will claim once :meth:`prepare` has run, when known without
        running it (``None``: unknown until then). Front ends check composition with it before a
        long calibration, so a conflict costs nothing."""
        return self.modules(denoiser)

    # -- optional refinements; the defaults make a method a pure plan -----------------------
    def timed_schedule(self, denoiser: torch.nn.Module, noise_levels: Sequence[float]) -> Mapping[str, Sequence[Decision]]:
        """The decisions when they depend on how noisy each step is (timestep over the training
        timesteps, 1 = pure noise; one entry per step). Override instead of :meth:`schedule`."""
        return self.schedule(denoiser, len(noise_levels))

    @property
    def forecast_order(self) -> int:
        """How many computed outputs a reused output is extrapolated from (1: held as it is); set by
        the ``forecast`` parameter of the methods that reuse."""
        return forecast_order(getattr(self, "forecast", "hold"), type(self).__name__)

    def reuse_rule(self, denoiser: torch.nn.Module, path: str) -> ReuseRule | None:
        """How ``path``'s output is kept and given back (``None``: as computed, same shapes only)."""
        return None

    def module_hooks(self, runtime: Accelerator, denoiser: torch.nn.Module) -> list[tuple[Any, Any]]:
        """Extra ``(path or module, diffusers ModelHook)`` pairs this method needs beside the plan
        (e.g. layers that exchange data between processes; a path names a denoiser module, other
        pipeline modules are given directly); installed and removed with everything else, inside
        the reuse hooks, so a module that is reused or skipped runs none of them."""
        return []

    def step_barriers(self, num_steps: int) -> set[int]:
        """Steps whose work must run in their own denoiser call: this method's behaviour changes
        there in ways the plan does not show (e.g. T-GATE's gate), so another method must not
        compute them ahead inside an earlier call."""
        return set()

    def compile_refusal(self) -> str | None:
        """Why this method cannot run on a compiled denoiser, or ``None`` where it can."""
        return None

    def preferred_steps(self) -> int | None:
        """The step count this method was prepared for, if any (a calibrated schedule)."""
        return None

    def prepare(self, pipe: DiffusionPipeline, *, steps: int, prompts: Sequence[str], **call_kwargs: Any) -> Method:
        """A ready-to-apply version of this method for ``pipe`` at ``steps`` (e.g. calibrated).

        Front ends (CLI, benchmarks) call this before :func:`apply`; the default needs nothing.
        """
        return self

    def wrap_denoiser(self, runtime: Accelerator, forward: Any, args: tuple, kwargs: dict) -> Any:
        """Run (or answer) one denoiser call; the place for changes at the denoiser boundary."""
        return forward(*args, **kwargs)

    def after_scheduler_step(self, runtime: Accelerator, args: tuple, kwargs: dict, output: Any) -> Any:
        """See (and possibly change) what the pipeline's ``scheduler.step`` returned."""
        return output

    def overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(Method, name)

    def spec(self) -> str:
        """The inverse of :func:`parse_method`; fields declared with ``repr=False`` (loaded data,
        per-call state) are not parameters and are left out."""
        values = ",".join(
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.repr and (f.default is dataclasses.MISSING or getattr(self, f.name) != f.default
                           or f.name in self.spec_keys)
        )
        return f"{self.spec_name}:{values}" if values else self.spec_name


def _coerce(text: str, annotation: Any, where: str) -> Any:
    hint = annotation
    if isinstance(hint, str):
        hint = {"int": int, "float": float, "bool": bool, "str": str}.get(hint.split("|")[0].strip(), str)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        hint = options[0]
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if hint in (int, float, str):
            return hint(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a valid {hint.__name__}") from None
    return text


def _register_builtin_methods() -> None:
    """Each method registers itself when its module is imported; ``import fastdiff`` imports
    none of them eagerly, so the parser imports them before it looks a name up."""
    import importlib

    from ..catalog import METHOD_MODULES

    for module in METHOD_MODULES:
        importlib.import_module(module)


def parse_method(spec: str) -> Method:
    """Build a method from ``name`` or ``name:key=value,key=value`` (the CLI's ``--method``)."""
    _register_builtin_methods()
    name, _, params = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise ValueError(f"--method {spec!r}: unknown method {name!r}; allowed: {sorted(METHODS)}")
    cls = METHODS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--method {spec!r}: expected key=value, got {item!r}")
        if key == "forecast" and key not in fields:
            raise ValueError(
                f"--method {spec!r}: {name} does not reuse outputs, so there is nothing to forecast; "
                f"forecast is a parameter of {list(REUSING_METHODS)}"
            )
        if key not in fields:
            raise ValueError(f"--method {spec!r}: {name} has no parameter {key!r}; allowed: {sorted(fields)}")
        kwargs[key] = _coerce(value.strip(), fields[key], f"--method {spec!r}, {key}")
    return cls(**kwargs)
