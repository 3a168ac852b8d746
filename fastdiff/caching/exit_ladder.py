"""Where a denoiser can exit early, and what a skipped module hands on.

A transformer (DiT, PixArt) exits after its first ``k`` blocks: the blocks after them pass their
input through to the final layer. A UNet cannot simply stop: its decoder needs the encoder's skip
connections and must return to full resolution. So a UNet "exits" by dropping its innermost
part — the last down layers, the mid block and the up layers that consume those down layers'
skip connections — as one piece. Inside the dropped piece every tensor is the piece's input, so
the piece is the identity exactly when its input and output shapes agree in the full network;
only those pieces are offered as exits. Depth is counted in units: a transformer block, or on a
UNet one down layer (resnet with its attention, or a downsampler) paired with the up layer that
consumes its skip connection, plus the mid block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook

from ..anatomy import Anatomy, BlockIO, UNetParts, anatomy_of
from ..core.hooks import InstalledHook, install_hook, uninstall_hook
from ..core.rules import ReuseRule, first_input


class ConcatHalfRule(ReuseRule):
    """A skipped up-path resnet: it was given ``cat([hidden, skip])`` and hands on ``hidden``.

    Inside a dropped piece both halves are copies of the piece's input, so the first half is it.
    """

    def skip(self, args: tuple, kwargs: dict) -> Any:
        tensor = first_input(args, kwargs)
        return tensor[:, : tensor.shape[1] // 2]


class TupleRule(ReuseRule):
    """A skipped attention model (``Transformer2DModel``): its callers index ``[0]`` of a tuple,
    or read ``.sample`` when they asked for a dict."""

    def skip(self, args: tuple, kwargs: dict) -> Any:
        tensor = first_input(args, kwargs)
        if kwargs.get("return_dict", True) is False:
            return (tensor,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=tensor)


IDENTITY = ReuseRule()
CONCAT_HALF = ConcatHalfRule()
TUPLE = TupleRule()


@dataclass
class _Unit:
    paths: list[str]
    in_channels: int
    out_channels: int
    resample: int  # 1 when the unit halves (down) or doubles (up) the resolution


@dataclass
class ExitLadder:
    """The exits of one denoiser: ``skipped[k]`` lists the modules dropped when ``k`` units are kept.

    ``depth`` units in all; keeping ``depth`` drops nothing. ``rules`` says what each droppable
    module hands on. ``entries``/``exits`` name, for each exit, the module whose input enters the
    dropped piece and the module whose output leaves it (calibration measures between them).
    """

    kind: str
    depth: int
    skipped: dict[int, list[str]] = field(default_factory=dict)
    rules: dict[str, ReuseRule] = field(default_factory=dict)
    entries: dict[int, str] = field(default_factory=dict)
    exits: dict[int, str] = field(default_factory=dict)

    @property
    def allowed(self) -> list[int]:
        """Kept depths that are valid exits, shallowest first (``depth`` itself always is)."""
        return sorted(self.skipped) + [self.depth]

    def at_least(self, fraction: float) -> int:
        """The shallowest valid exit that keeps at least ``fraction`` of the depth."""
        want = fraction * self.depth - 1e-9
        return next(k for k in self.allowed if k >= want)


class PassThroughRule(ReuseRule):
    """A skipped transformer block hands on what it was given, in the layout it returns: the
    image stream, or on an MMDiT block the (text, image) pair in its own tuple order."""

    def __init__(self, io: BlockIO) -> None:
        self.io = io

    def skip(self, args: tuple, kwargs: dict) -> Any:
        return self.io.passthrough(args, kwargs)


def exit_ladder(denoiser: torch.nn.Module, method: str = "EarlyExit") -> ExitLadder:
    anatomy = anatomy_of(denoiser, method)
    if anatomy.is_unet:
        return _unet_ladder(denoiser, anatomy.unet, method)
    return _transformer_ladder(anatomy)


def _transformer_ladder(anatomy: Anatomy) -> ExitLadder:
    """Keep the first ``k`` blocks of the whole sequence (Flux: dual-stream blocks first, then the
    single-stream ones); the rest hand their input on to the output layer."""
    paths = anatomy.block_paths_in_order
    count = len(paths)
    ladder = ExitLadder("transformer", count, rules={b.path: PassThroughRule(b.io) for b in anatomy.blocks})
    for kept in range(1, count):
        ladder.skipped[kept] = paths[kept:]
        ladder.entries[kept] = paths[kept]
        ladder.exits[kept] = paths[-1]
    return ladder


def _channels(module: torch.nn.Module, *names: str) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    return None


def _unet_units(unet: torch.nn.Module, parts: UNetParts, method: str) -> tuple[list[_Unit], list[_Unit]]:
    def unsupported(what: str) -> TypeError:
        return TypeError(f"{method}: {type(unet).__name__} has a {what} whose channels cannot be read; "
                         "UNets built from diffusers' resnet/attention blocks are supported")

    modules = dict(unet.named_modules())
    down: list[_Unit] = []
    for prefix in parts.down:
        block = modules[prefix]
        attentions = getattr(block, "attentions", None) or []
        for j, resnet in enumerate(getattr(block, "resnets", None) or []):
            cin, cout = _channels(resnet, "in_channels"), _channels(resnet, "out_channels")
            if cin is None or cout is None:
                raise unsupported(f"{prefix}.resnets.{j}")
            paths = [f"{prefix}.resnets.{j}"] + ([f"{prefix}.attentions.{j}"] if j < len(attentions) else [])
            down.append(_Unit(paths, cin, cout, 0))
        samplers = list(getattr(block, "downsamplers", None) or [])
        if samplers:
            cin = _channels(samplers[0], "channels", "in_channels")
            cout = _channels(samplers[-1], "out_channels")
            if cin is None or cout is None:
                raise unsupported(f"{prefix}.downsamplers")
            down.append(_Unit([f"{prefix}.downsamplers.{k}" for k in range(len(samplers))], cin, cout, 1))
    up: list[_Unit] = []
    for prefix in parts.up:
        block = modules[prefix]
        resnets = list(getattr(block, "resnets", None) or [])
        attentions = getattr(block, "attentions", None) or []
        samplers = list(getattr(block, "upsamplers", None) or [])
        for j, resnet in enumerate(resnets):
            cout = _channels(resnet, "out_channels")
            if cout is None:
                raise unsupported(f"{prefix}.resnets.{j}")
            paths = [f"{prefix}.resnets.{j}"] + ([f"{prefix}.attentions.{j}"] if j < len(attentions) else [])
            last = j == len(resnets) - 1
            if last:
                paths += [f"{prefix}.upsamplers.{k}" for k in range(len(samplers))]
            up.append(_Unit(paths, 0, cout, 1 if last and samplers else 0))
    if len(up) != len(down) + 1:
        raise TypeError(
            f"{method}: {type(unet).__name__}'s up path consumes {len(up)} skip connections but its down path "
            f"makes {len(down) + 1}; only UNets whose up layers mirror the down layers are supported"
        )
    return down, up


def _unet_ladder(unet: torch.nn.Module, parts: UNetParts, method: str) -> ExitLadder:
    down, up = _unet_units(unet, parts, method)
    mid = dict(unet.named_modules())[parts.mid] if parts.mid else None
    mid_units = 1 if mid is not None else 0
    depth = len(down) + mid_units
    rules: dict[str, ReuseRule] = {}
    for unit in down:
        for path in unit.paths:
            rules[path] = TUPLE if ".attentions." in path else IDENTITY
    for unit in up:
        for path in unit.paths:
            rules[path] = TUPLE if ".attentions." in path else CONCAT_HALF if ".resnets." in path else IDENTITY
    if mid is not None:
        rules[parts.mid] = IDENTITY
    ladder = ExitLadder("unet", depth, rules=rules)
    for m in range(len(down) + 1):  # m down/up pairs dropped around the mid block
        if m == 0:
            if mid is None:
                continue
            resnets = getattr(mid, "resnets", None) or []
            cin = _channels(resnets[0], "in_channels") if resnets else None
            cout = _channels(resnets[-1], "out_channels") if resnets else None
            if cin is None or cin != cout:
                continue
            entry = exit_ = parts.mid
        else:
            inner_down, inner_up = down[len(down) - m:], up[:m]
            if inner_down[0].in_channels != inner_up[-1].out_channels:
                continue
            if sum(u.resample for u in inner_down) != sum(u.resample for u in inner_up):
                continue
            entry, exit_ = inner_down[0].paths[0], inner_up[-1].paths[-1]
        paths = [p for u in down[len(down) - m:] for p in u.paths]
        paths += [parts.mid] if parts.mid else []
        paths += [p for u in up[:m] for p in u.paths]
        kept = depth - m - mid_units
        ladder.skipped[kept] = paths
        ladder.entries[kept] = entry
        ladder.exits[kept] = exit_
    return ladder


class _SkipHook(ModelHook):
    def __init__(self, rule: ReuseRule) -> None:
        super().__init__()
        self.rule = rule

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.rule.skip(args, kwargs)


_TRAINING_HOOK = "fastdiff.early_exit.exiting"


@contextlib.contextmanager
def exiting(denoiser: torch.nn.Module, kept: int, ladder: ExitLadder | None = None) -> Iterator[None]:
    """Run ``denoiser`` with only ``kept`` units, outside any pipeline call (training, probing).

    Gradients flow through the kept units as usual; the dropped ones are not called at all.
    """
    ladder = ladder or exit_ladder(denoiser)
    if kept not in ladder.allowed:
        raise ValueError(f"kept: {kept} is not an exit of this {ladder.kind}; allowed: {ladder.allowed}")
    modules = dict(denoiser.named_modules())
    hooked: list[InstalledHook] = []
    try:
        for path in ladder.skipped.get(kept, []):
            hooked.append(install_hook(modules[path], _SkipHook(ladder.rules[path]), _TRAINING_HOOK))
        yield
    finally:
        for item in reversed(hooked):
            uninstall_hook(item)
