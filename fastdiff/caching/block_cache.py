"""Block Caching: every block gets its own schedule, calibrated from how much its output moves.

Blocks change at very different rates across the denoising trajectory (the paper's change
curves), so one interval for the whole network either wastes work on slow blocks or damages
fast ones. A short calibration run measures each block's relative L1 change from step to step;
a block then reuses its cached output until the accumulated change passes δ.

Two refinements, both training-free here:
- ``cache="residual"`` keeps only what a block adds to its input (its output minus its input,
  when the shapes agree) and adds that to the *fresh* input at reused steps, so changes made
  upstream still flow through. ``cache="output"`` reuses the whole output, as the paper does.
- ``align=True`` corrects cached values by a per-channel scale and shift per step, fitted by
  least squares on the calibration run (cached vs. freshly computed) instead of trained.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.forecast import forecast_name
from ..core.method import Method
from ..core.plan import Decision, Plan
from ..anatomy import BlockIO, anatomy_of
from ..anatomy.base import SINGLE_STREAM
from ..core.rules import ReuseRule
from .block_schedule import kept_fraction, schedule_from_changes, threshold_for_budget
from .blocks import GRANULARITIES, block_paths, fingerprint

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

CACHE_MODES = ("residual", "output")
BUDGET_WEIGHTS = ("evaluations", "flops")
FORMAT = "fastdiff.blockcache/1"


def cached_quantity(args: tuple, kwargs: dict, output: Any, residual: bool,
                    io: BlockIO = SINGLE_STREAM) -> tuple[torch.Tensor | None, bool]:
    """The tensor a block keeps of its image stream: the stream itself, or it minus the block's
    input stream (residual)."""
    main = io.image_of(output)
    if main is None:
        return None, False
    if residual:
        x = io.image_in(args, kwargs)
        if isinstance(x, torch.Tensor) and x.shape == main.shape:
            return main - x, True
    return main, False


def text_quantity(args: tuple, kwargs: dict, output: Any, residual: bool,
                   io: BlockIO) -> tuple[torch.Tensor | None, bool]:
    """The same for a dual-stream block's text stream (MMDiT), which the next block reads too."""
    text = io.text_of(output)
    if text is None:
        return None, False
    if residual:
        x = io.text_in(args, kwargs)
        if isinstance(x, torch.Tensor) and x.shape == text.shape:
            return text - x, True
    return text, False


def channel_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """Per-channel values shaped to broadcast over ``like``: (B, C, H, W) or (B, tokens, C)."""
    if like.dim() == 4 and like.shape[1] == values.numel():
        return values.view(1, -1, 1, 1)
    if like.dim() == 3 and like.shape[-1] == values.numel():
        return values.view(1, 1, -1)
    return None


Fitted = Mapping[int, tuple[Sequence[float], Sequence[float]]]  # step -> (scale, shift) per channel


class BlockRule(ReuseRule):
    """Keeps a block's output (or residual) and gives it back, scaled and shifted per channel if
    fitted. A dual-stream block (MMDiT) keeps its text stream the same way, with its own fit:
    the next block reads both streams, so a stale text stream is as visible as a stale image."""

    def __init__(self, residual: bool, alignment: Fitted | None, io: BlockIO = SINGLE_STREAM,
                 text_alignment: Fitted | None = None) -> None:
        self.residual = residual
        self.io = io
        self.alignment = {int(k): v for k, v in (alignment or {}).items()}
        self.text_alignment = {int(k): v for k, v in (text_alignment or {}).items()}
        self._moved: dict[tuple[str, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(self, args: tuple, kwargs: dict, output: Any, step: int) -> Any:
        quantity, is_residual = cached_quantity(args, kwargs, output, self.residual, self.io)
        text = text_quantity(args, kwargs, output, self.residual, self.io)
        container = None if isinstance(output, torch.Tensor) and quantity is not None else output
        return (quantity, is_residual, container, text)

    def _align(self, tensor: torch.Tensor, step: int, stream: str = "image") -> torch.Tensor:
        fitted = (self.alignment if stream == "image" else self.text_alignment).get(step)
        if fitted is None:
            return tensor
        key = (stream, step, tensor.device, tensor.dtype)
        if key not in self._moved:
            self._moved[key] = (torch.tensor(fitted[0], device=tensor.device, dtype=tensor.dtype),
                                torch.tensor(fitted[1], device=tensor.device, dtype=tensor.dtype))
        scale, shift = self._moved[key]
        scale_v, shift_v = channel_view(scale, tensor), channel_view(shift, tensor)
        if scale_v is None or shift_v is None:
            return tensor
        return tensor * scale_v + shift_v

    def restore(self, kept: Any, args: tuple, kwargs: dict, step: int, signature: tuple,
                kept_signature: tuple | None) -> Any | None:
        if signature != kept_signature:
            return None
        quantity, is_residual, container, (text, text_residual) = kept
        if quantity is None:
            return container
        value = self._align(quantity, step)
        if is_residual:
            value = self.io.image_in(args, kwargs) + value
        if text is not None:
            text = self._align(text, step, "text")
            if text_residual:
                text = self.io.text_in(args, kwargs) + text
        if container is None:
            return value
        if value is quantity and text is None:
            return container
        return self.io.rebuild(container, value, text)


@dataclass
class BlockCacheCalibration:
    """What a calibration run measured: each block's change per step, and (optionally) the fitted
    per-channel scale/shift of the schedule it was fitted for. Saved as JSON; tied to one denoiser
    architecture and one step count."""

    denoiser: str
    fingerprint: str
    num_steps: int
    granularity: str
    cache: str
    modules: list[str]
    change: dict[str, list[float]]
    flops: dict[str, float] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    seed: int = 0
    aligned_rows: dict[str, str] | None = None  # the schedule the alignment was fitted for
    alignment: dict[str, dict[str, list[list[float]]]] | None = None  # module -> step -> [scale, shift]
    text_alignment: dict[str, dict[str, list[list[float]]]] | None = None  # the same for dual-stream blocks' text

    def rows(self, threshold: float) -> dict[str, tuple[Decision, ...]]:
        return schedule_from_changes(self.change, threshold)

    def threshold_for(self, budget: float, by: str = "evaluations") -> float:
        return threshold_for_budget(self.change, budget, self.flops if by == "flops" else None)

    def check(self, denoiser: torch.nn.Module, num_steps: int | None = None) -> None:
        """Refuse to run a calibration on another architecture or step count."""
        if fingerprint(denoiser) != self.fingerprint:
            raise ValueError(
                f"BlockCache: this calibration was made for another denoiser ({self.denoiser}, fingerprint "
                f"{self.fingerprint}); this pipeline has {type(denoiser).__name__} (fingerprint "
                f"{fingerprint(denoiser)}). Calibrate again with BlockCache.calibrate(pipe, prompts, steps=...)"
            )
        if num_steps is not None and num_steps != self.num_steps:
            raise ValueError(
                f"BlockCache: calibrated for {self.num_steps} steps, but the pipeline runs {num_steps}; "
                f"call it with num_inference_steps={self.num_steps} or calibrate for {num_steps} steps"
            )

    # -- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> BlockCacheCalibration:
        if data.get("format") != FORMAT:
            raise ValueError(f"calibration: not a BlockCache calibration (format {data.get('format')!r}, expected {FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> BlockCacheCalibration:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration: no file {str(path)!r}")
        expected = ("expected the JSON file `fastdiff calibrate --out` or BlockCacheCalibration.save writes, "
                    f"format {FORMAT!r}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            reason = (f"not valid JSON at line {exc.lineno}, column {exc.colno}"
                      if isinstance(exc, json.JSONDecodeError) else "not text")
            raise ValueError(f"calibration: {str(path)!r} is not a calibration file ({reason}); {expected}") from None
        if not isinstance(data, dict):
            raise ValueError(f"calibration: {str(path)!r} is not a calibration file (JSON {type(data).__name__}, "
                             f"not an object); {expected}")
        return cls.from_dict(data)  # which names the format it expected

    def plot(self, path: str | Path, threshold: float | None = None) -> None:
        """The per-block change curves (the paper's figure), with the computed steps marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 5))
        rows = self.rows(threshold) if threshold is not None else None
        cmap = plt.get_cmap("viridis")
        for i, module in enumerate(self.modules):
            color = cmap(i / max(len(self.modules) - 1, 1))
            ys = self.change[module]
            ax.plot(range(1, self.num_steps), ys[1:], color=color, lw=1, label=module if len(self.modules) <= 16 else None)
            if rows is not None:
                computed = [s for s, d in enumerate(rows[module]) if d is Decision.COMPUTE and s > 0]
                ax.scatter(computed, [ys[s] for s in computed], color=color, s=8)
        ax.set_xlabel("denoising step")
        ax.set_ylabel("relative L1 change from the previous step")
        ax.set_yscale("log")
        title = f"{self.denoiser}, {self.num_steps} steps, {len(self.modules)} blocks ({self.granularity})"
        ax.set_title(title + (f"; dots: recomputed at δ={threshold:.3g}" if threshold is not None else ""))
        if len(self.modules) <= 16:
            ax.legend(fontsize=6, ncol=2)
        else:
            ax.text(0.01, 0.01, "colour: block order, dark = first (input side), yellow = last (output side)",
                    transform=ax.transAxes, fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@dataclass
class BlockCache(Method):
    """Per-block reuse on a calibrated schedule.

    Args:
        threshold: δ, the accumulated relative change a block may drift before it recomputes.
        budget: alternatively, the share of block evaluations to keep, in (0, 1]; δ is chosen to meet it.
        granularity: ``"layer"`` (each resnet, attention and resampler), ``"attention"`` (attention
            layers only, as in the paper) or ``"block"`` (whole down/mid/up blocks). Transformer
            denoisers always use their transformer blocks.
        cache: ``"residual"`` (keep what a block adds to its input) or ``"output"`` (keep its output).
        align: correct cached values with the per-channel scale/shift fitted during calibration.
        budget_by: what ``budget`` counts: ``"evaluations"`` or block ``"flops"``.
        calibration: a :class:`BlockCacheCalibration` or the path of one saved as JSON; without
            one, :meth:`calibrate` (or the CLI, which calls :meth:`prepare`) measures it.
        forecast: how a reused output is given back: ``"hold"`` (as last computed), ``"ab2"`` or
            ``"ab3"`` (extrapolated to the step's noise level from the last 2 or 3 computed ones).
    """

    spec_name = "blockcache"

    threshold: float | None = None
    budget: float | None = None
    granularity: str = "layer"
    cache: str = "residual"
    align: bool = False
    budget_by: str = "evaluations"
    calibration: BlockCacheCalibration | str | None = field(default=None, repr=False)
    forecast: str = "hold"

    def __post_init__(self) -> None:
        self.forecast = forecast_name(self.forecast, "BlockCache")
        if self.threshold is not None and self.budget is not None:
            raise ValueError("BlockCache: give threshold or budget, not both")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"BlockCache: threshold must be > 0, got {self.threshold!r}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"BlockCache: budget must be in (0, 1], got {self.budget!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"BlockCache: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"BlockCache: cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.budget_by not in BUDGET_WEIGHTS:
            raise ValueError(f"BlockCache: budget_by must be one of {BUDGET_WEIGHTS}, got {self.budget_by!r}")
        if isinstance(self.calibration, (str, Path)):
            self.calibration = BlockCacheCalibration.load(self.calibration)
        if self.calibration is not None:
            if self.calibration.granularity != self.granularity or self.calibration.cache != self.cache:
                # the calibration decides what was measured: adopt it
                self.granularity, self.cache = self.calibration.granularity, self.calibration.cache
            if self.align and not self.calibration.alignment:
                raise ValueError("BlockCache: align=True needs a calibration made with align=True")

    # -- the method contract -----------------------------------------------------------------
    @property
    def effective_threshold(self) -> float:
        calibration = self._calibration()
        if self.threshold is not None:
            return self.threshold
        if self.budget is not None:
            return calibration.threshold_for(self.budget, self.budget_by)
        return DEFAULT_THRESHOLD

    def _calibration(self) -> BlockCacheCalibration:
        if self.calibration is None:
            raise ValueError(
                "BlockCache needs a calibration: use BlockCache.calibrate(pipe, prompts, steps=N, threshold=δ), "
                "or pass calibration='file.json' saved from one"
            )
        assert isinstance(self.calibration, BlockCacheCalibration)
        return self.calibration

    def modules(self, denoiser: torch.nn.Module) -> list[str]:
        calibration = self._calibration()
        calibration.check(denoiser)
        return list(calibration.modules)

    def claims_before_prepare(self, denoiser: torch.nn.Module) -> list[str] | None:
        if self.calibration is None:
            return block_paths(denoiser, self.granularity)  # what a calibration will measure and claim
        return self.modules(denoiser)

    def rows(self) -> dict[str, tuple[Decision, ...]]:
        return self._calibration().rows(self.effective_threshold)

    def schedule(self, denoiser: torch.nn.Module, num_steps: int) -> Mapping[str, Sequence[Decision]]:
        self._calibration().check(denoiser, num_steps)
        rows = self.rows()
        if self.align:
            fitted = {m: "".join(d.symbol for d in r) for m, r in rows.items()}
            if fitted != self._calibration().aligned_rows:
                raise ValueError(
                    "BlockCache: the alignment was fitted for another schedule (threshold/budget changed); "
                    "calibrate again with align=True for this threshold"
                )
        return rows

    def reuse_rule(self, denoiser: torch.nn.Module, path: str) -> ReuseRule:
        alignment = text_alignment = None
        if self.align:
            alignment = (self._calibration().alignment or {}).get(path)
            text_alignment = (self._calibration().text_alignment or {}).get(path)
        return BlockRule(self.cache == "residual", alignment, anatomy_of(denoiser, "BlockCache").io(path),
                         text_alignment)

    def preferred_steps(self) -> int | None:
        return None if self.calibration is None else self._calibration().num_steps

    def kept_fraction(self, by: str = "evaluations") -> float:
        calibration = self._calibration()
        return kept_fraction(self.rows(), calibration.flops if by == "flops" else None)

    def plan(self) -> Plan:
        return Plan.merge(self._calibration().num_steps, [(self.name, self.rows())])

    def prepare(self, pipe: DiffusionPipeline, *, steps: int, prompts: Sequence[str], **call_kwargs: Any) -> BlockCache:
        if self.calibration is not None:
            return self
        from .block_calibration import calibrate

        ready = calibrate(pipe, prompts, steps=steps, threshold=self.threshold, budget=self.budget,
                          granularity=self.granularity, cache=self.cache, align=self.align,
                          budget_by=self.budget_by, **call_kwargs)
        ready.forecast = self.forecast
        return ready

    @classmethod
    def calibrate(cls, pipe: DiffusionPipeline, prompts: Sequence[str], steps: int = 50, threshold: float | None = None,
                  budget: float | None = None, **options: Any) -> BlockCache:
        """Run ``pipe`` on ``prompts`` for ``steps`` steps, measure every block, and return a ready
        BlockCache (its ``calibration`` can be saved and reused). See
        :func:`fastdiff.caching.block_calibration.calibrate` for the options."""
        from .block_calibration import calibrate

        return calibrate(pipe, prompts, steps=steps, threshold=threshold, budget=budget, **options)


DEFAULT_THRESHOLD = 0.1
