"""DeepCache: run the whole UNet every few steps, only its shallow branch in between.

Deep UNet features change slowly across steps while the shallow skip branch carries the
detail, so between full steps every block deeper than the chosen branch returns the output
it produced at the last full step. ``branch`` numbers the skip branches from the shallowest
(0) down, three per resolution level, exactly as the authors' release does; ``interval=N``
runs the full network at steps 0, N, 2N, ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..anatomy import Anatomy, anatomy_of
from ..core.forecast import forecast_name
from ..core.method import Method
from ..core.plan import Decision
from ..core.rules import ReuseRule
from .block_cache import BlockRule

MODES = ("uniform", "nonuniform")
LAYERS_PER_LEVEL = 3  # branch ids per resolution level: the up blocks' resnet count in SD-style UNets


def centered_full_steps(num_steps: int, count: int, center: int, power: float) -> list[int]:
    """``count`` step indices, denser around ``center``: the non-uniform 1:N schedule.

    Points evenly spaced in ``sign(u)|u|^(1/power)`` around ``center`` map back to steps packed
    near it; the exponent is relaxed until ``count`` distinct steps come out.
    """
    count = max(1, min(count, num_steps))
    if count == 1:
        return [0]
    center = min(max(center, 0), num_steps - 1)
    p = power
    while p > 1.0:
        low, high = -(center ** (1 / p)), (num_steps - 1 - center) ** (1 / p)
        picks = {0}
        for k in range(count):
            u = low + (high - low) * k / (count - 1)
            step = center + math.copysign(abs(u) ** p, u)
            picks.add(min(num_steps - 1, max(0, round(step))))
        if len(picks) == count:
            return sorted(picks)
        p -= 0.02
    return sorted({round(k * (num_steps - 1) / (count - 1)) for k in range(count)})


@dataclass
class DeepCache(Method):
    """Reuse the deep UNet features between full steps.

    Args:
        interval: a full UNet pass every ``interval`` steps (1 = vanilla).
        branch: the skip branch that stays live, 0 = shallowest (the fastest).
        mode: ``"uniform"`` (steps 0, interval, 2·interval, ...) or ``"nonuniform"`` (as many
            full steps, packed around ``center``, where features change fastest).
        center: the step the non-uniform schedule clusters around (default 30 % of the steps).
        power: how strongly the non-uniform schedule clusters (> 1).
        forecast: how a reused output is given back: ``"hold"`` (as last computed), ``"ab2"`` or
            ``"ab3"`` (extrapolated to the step's noise level from the last 2 or 3 computed ones).
    """

    spec_name = "deepcache"
    spec_keys = ("interval", "branch")

    interval: int = 3
    branch: int = 0
    mode: str = "uniform"
    center: int | None = None
    power: float = 1.4
    forecast: str = "hold"

    def __post_init__(self) -> None:
        self.forecast = forecast_name(self.forecast, "DeepCache")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"DeepCache: interval must be an integer >= 1, got {self.interval!r}")
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"DeepCache: branch must be an integer >= 0, got {self.branch!r}")
        if self.mode not in MODES:
            raise ValueError(f"DeepCache: mode must be one of {MODES}, got {self.mode!r}")
        if not self.power > 1.0:
            raise ValueError(f"DeepCache: power must be > 1, got {self.power!r}")
        if self.center is not None and self.center < 0:
            raise ValueError(f"DeepCache: center must be >= 0, got {self.center!r}")

    def _branch(self, levels: int) -> tuple[int, int]:
        if self.branch >= levels * LAYERS_PER_LEVEL:
            raise ValueError(
                f"DeepCache: branch={self.branch} is deeper than this UNet has "
                f"({levels} levels: allowed 0..{levels * LAYERS_PER_LEVEL - 1})"
            )
        return divmod(self.branch, LAYERS_PER_LEVEL)

    def _transformer_paths(self, anatomy: Anatomy) -> list[str]:
        paths = anatomy.block_paths_in_order
        count = len(paths)
        if 2 * self.branch >= count:
            raise ValueError(
                f"DeepCache: branch={self.branch} keeps {2 * self.branch} of the {count} transformer blocks live, "
                f"leaving none to cache; allowed 0..{(count - 1) // 2}"
            )
        return paths[self.branch:count - self.branch]

    def modules(self, denoiser: torch.nn.Module) -> list[str]:
        """Maximal subtrees deeper than the branch, in execution order.

        On a transformer the blocks between the first ``branch`` and the last ``branch`` are
        cached, counted over all its stages (Flux: its dual-stream blocks, then its single-stream
        ones); each keeps what it adds to each stream it hands on (image, and text on MMDiT
        blocks), so the live blocks around them still see the current step.
        """
        anatomy = anatomy_of(denoiser, "DeepCache")
        if not anatomy.is_unet:
            return self._transformer_paths(anatomy)
        unet = anatomy.unet
        modules = dict(denoiser.named_modules())
        level, layer = self._branch(len(unet.down))
        paths: list[str] = []
        for i, prefix in enumerate(unet.down):
            block = modules[prefix]
            if i > level or (i == level and layer == 0):
                paths.append(prefix)
            elif i == level:
                for j in range(len(block.resnets)):
                    if j >= layer:
                        paths += _layer_paths(block, prefix, j)
                for j, _ in enumerate(getattr(block, "downsamplers", None) or []):
                    if len(block.resnets) >= layer:
                        paths.append(f"{prefix}.downsamplers.{j}")
        if unet.mid is not None:
            paths.append(unet.mid)
        for u, prefix in enumerate(unet.up):
            depth = len(unet.up) - u - 1  # the authors count up blocks from the output end
            if depth > level:
                paths.append(prefix)
            elif depth == level:
                block = modules[prefix]
                count = len(block.resnets)
                for j in range(count):
                    if count - j - 1 > layer:
                        paths += _layer_paths(block, prefix, j)
        return paths

    def full_steps(self, num_steps: int) -> list[int]:
        if self.mode == "uniform":
            return list(range(0, num_steps, self.interval))
        count = math.ceil(num_steps / self.interval)
        center = self.center if self.center is not None else round(0.3 * num_steps)
        return centered_full_steps(num_steps, count, center, self.power)

    def reuse_rule(self, denoiser: torch.nn.Module, path: str) -> ReuseRule | None:
        anatomy = anatomy_of(denoiser, "DeepCache")
        return None if anatomy.is_unet else BlockRule(residual=True, alignment=None, io=anatomy.io(path))

    def schedule(self, denoiser: torch.nn.Module, num_steps: int) -> Mapping[str, Sequence[Decision]]:
        full = set(self.full_steps(num_steps))
        row = tuple(Decision.COMPUTE if s in full else Decision.REUSE for s in range(num_steps))
        return {path: row for path in self.modules(denoiser)}


def _layer_paths(block: torch.nn.Module, prefix: str, j: int) -> list[str]:
    paths = [f"{prefix}.resnets.{j}"]
    attentions = getattr(block, "attentions", None)
    if attentions is not None and j < len(attentions):
        paths.append(f"{prefix}.attentions.{j}")
    return paths
