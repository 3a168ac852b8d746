"""Keeping every per-step decision out of compiled code while the work itself runs compiled.

Users compile the denoiser before or after ``apply``, three ways: the whole model
(``model.compile()``, ``torch.compile(model)``) or its repeated blocks
(``compile_repeated_blocks()``, which is ``block.compile()`` on each). Were the engine's hooks
traced, every clock read, ``.item()`` and plan lookup would be a graph break, and the per-block
state (which step, which kept tensor) would be guarded on, recompiling per block and per step.

So fastdiff's hooks are never traced (``torch.compiler.disable``), and the module a hook stands
in front of runs through the compiler with the *user's own* settings: the ``torch.compile``
context found on the module, or on the nearest compiled module above it, wraps the hook's
original forward. A compiled region that contains hooked modules breaks its graph at each of
them (a bounded number, known from the plan's modules, never from the step); a hooked module
that was itself compiled is taken over: its own compiled call is set aside while fastdiff is
applied, so the hook sits outside the graph and the same module body runs compiled inside it.

Decisions then cost graphs only through shapes: a second call with the same shapes and step
count compiles nothing; another step count compiles nothing either. Methods that change the
batch a module sees (T-GATE after its gate, encoder propagation's stacked decoders) add the
graphs of those batch sizes once. Hooks inside a compiled block (T-GATE's on attention modules)
cut the block's graph into pieces, each specialised per shape: on a UNet, whose levels differ in
width and token count, that is more variants of one function than Dynamo's default
``recompile_limit`` (8) allows, past which it would silently run eagerly. So while fastdiff is
applied to a compiled denoiser the limit is at least :data:`RECOMPILE_LIMIT`, and is restored
by ``remove``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# variants of one compiled function allowed while fastdiff is applied (Dynamo's default is 8)
RECOMPILE_LIMIT = 64

__all__ = [
    "RECOMPILE_LIMIT",
    "CompileError",
    "CompileState",
    "compile_context",
    "eager",
    "graphs_compiled",
]


class CompileError(ValueError):
    """A compiled setup fastdiff cannot run without giving up the compile (say why, run nothing)."""


def _dynamo_context_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import _TorchDynamoContext
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return _TorchDynamoContext


def compile_context(compiled: Any) -> Any | None:
    """The ``torch.compile`` context (backend, mode, fullgraph, dynamic) behind a compiled callable:
    an ``OptimizedModule``, or a module's ``_compiled_call_impl``. ``None`` where it cannot be read."""
    kind = _dynamo_context_type()
    if kind is None or compiled is None:
        return None
    context = getattr(compiled, "dynamo_ctx", None)
    if isinstance(context, kind):
        return context
    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, kind):
            return value
    return None


def is_fullgraph(context: Any) -> bool:
    return bool(getattr(context, "fullgraph", False))


def graphs_compiled() -> int:
    """Graphs torch.compile has made in this process so far (differences of it count new ones)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def eager(function: Any) -> Any:
    """``function`` never traced: a compiled caller breaks its graph here and runs it as Python."""
    return torch.compiler.disable(function)


@dataclass
class _TakenOver:
    module: torch.nn.Module
    compiled_call: Any


@dataclass
class CompileState:
    """Where compilation is in force around the hooked modules of one denoiser, refreshed at the
    start of every pipeline call (a user may compile after ``apply``)."""

    taken: list[_TakenOver] = field(default_factory=list)
    # by hook id: the context in force on its module, its original forward, that forward compiled
    wrapped: dict[int, tuple[Any, Any, Any]] = field(default_factory=dict)

    active: bool = False  # compilation is in force somewhere in the denoiser
    raised_limit: tuple[int, int] | None = None  # (Dynamo's recompile_limit before, the value set)
    def refresh(self, denoiser_name: str, denoiser: torch.nn.Module, wrapper: Any,
                hooks: Iterable[tuple[torch.nn.Module, Any]]) -> None:
        """Read the compile settings in force on each hooked module, take over the compiled calls
        of hooked modules, and give every hook the compiled form of what it runs.

        ``wrapper``: an ``OptimizedModule`` the pipeline holds in place of the denoiser, if any.
        Raises :class:`CompileError` (changing nothing) where a ``fullgraph=True`` region would
        have to break at a hooked module inside it.
        """
        hooks = list(hooks)
        hooked = {id(module) for module, _ in hooks}
        names = {id(module): name for name, module in denoiser.named_modules()}
        root = compile_context(wrapper) if wrapper is not None else None
        if wrapper is not None and root is None:
            root = _unreadable(denoiser_name)
        contexts: dict[int, Any] = {}
        takeover: list[torch.nn.Module] = []
        found: list[Any] = [root] if root is not None else []

        held = {id(item.module): item for item in self.taken}

        def visit(module: torch.nn.Module, inherited: Any, fullgraph_owner: str | None) -> None:
            own_call = module.__dict__.get("_compiled_call_impl")
            if own_call is None and id(module) in held:  # taken over at an earlier call
                own_call = held[id(module)].compiled_call
            own = None
            if own_call is not None:
                own = compile_context(own_call) or _unreadable(_path(denoiser_name, names[id(module)]))
            if id(module) in hooked:
                if fullgraph_owner is not None:
                    raise CompileError(
                        f"{fullgraph_owner}: compiled with fullgraph=True around "
                        f"{_path(denoiser_name, names[id(module)])}, where fastdiff decides per step what runs; "
                        "compile with fullgraph=False, or compile the repeated blocks "
                        f"({denoiser_name}.compile_repeated_blocks(fullgraph=True))"
                    )
                if module.__dict__.get("_compiled_call_impl") is not None:
                    takeover.append(module)
            context = own or inherited
            contexts[id(module)] = context
            if own is not None:
                found.append(own)
            owner = fullgraph_owner
            if own is not None and is_fullgraph(own):  # its hooked descendants would break its graph
                owner = _path(denoiser_name, names[id(module)])
            for child in module.children():
                visit(child, context, owner)

        if root is not None and is_fullgraph(root):
            # the wrapper traces the denoiser's hooked forward itself: a break there is unavoidable
            raise CompileError(
                f"{denoiser_name}: torch.compile(..., fullgraph=True) around the whole denoiser cannot contain "
                "fastdiff's per-step decisions; compile with fullgraph=False, or compile the repeated blocks "
                f"({denoiser_name}.compile_repeated_blocks(fullgraph=True))"
            )
        visit(denoiser, root, None)
        for module in takeover:  # compiled (again) since the last look
            if id(module) in held:
                held[id(module)].compiled_call = module.__dict__["_compiled_call_impl"]
            else:
                self.taken.append(_TakenOver(module, module.__dict__["_compiled_call_impl"]))
            module._compiled_call_impl = None
        self.active = bool(found)
        if self.active and self.raised_limit is None:
            config = torch._dynamo.config
            if config.recompile_limit < RECOMPILE_LIMIT:
                self.raised_limit = (config.recompile_limit, RECOMPILE_LIMIT)
                config.recompile_limit = RECOMPILE_LIMIT
        for module, hook in hooks:
            self._wrap(hook, contexts.get(id(module)))

    def _wrap(self, hook: Any, context: Any) -> None:
        original = hook.fn_ref.original_forward
        known = self.wrapped.get(id(hook))
        if context is None:
            hook.compiled_forward = None
            self.wrapped.pop(id(hook), None)
            return
        if known is not None and known[0] is context and known[1] is original:
            hook.compiled_forward = known[2]
            return
        compiled = context(original)
        self.wrapped[id(hook)] = (context, original, compiled)
        hook.compiled_forward = compiled

    def release(self, hooks: Iterable[Any] = ()) -> None:
        """Give taken-over modules their compiled calls back (``remove``)."""
        for item in reversed(self.taken):
            if item.module.__dict__.get("_compiled_call_impl") is None:
                item.module._compiled_call_impl = item.compiled_call
        self.taken.clear()
        for hook in hooks:
            hook.compiled_forward = None
        self.wrapped.clear()
        self.active = False
        if self.raised_limit is not None:
            before, set_to = self.raised_limit
            if torch._dynamo.config.recompile_limit == set_to:  # unless someone set it meanwhile
                torch._dynamo.config.recompile_limit = before
            self.raised_limit = None


def _path(denoiser_name: str, path: str) -> str:
    return f"{denoiser_name}.{path}" if path else denoiser_name


def _unreadable(where: str) -> Any:
    """A compiled callable whose settings this torch does not expose: compile with the defaults."""
    warnings.warn(
        f"{where}: could not read its torch.compile settings; fastdiff compiles the modules it runs there "
        "with torch.compile's defaults", RuntimeWarning, stacklevel=4,
    )
    return torch.compile
