"""Patch parallelism: one image, split into row patches, one process each.

Every process runs the same pipeline call with the same seed, so the latent and the scheduler
agree everywhere. At each denoiser call this method hands the denoiser only this process's rows;
the patch-aware layers (:mod:`.layers`) fetch what they need from the other patches; the noise
prediction patches are gathered back into the full latent on every process, and the pipeline's
scheduler step runs on it as usual. Nothing in the pipeline is copied.

Modes:

* ``"sync"`` — every layer exchanges fresh data at every step: the single-process result, up to
  float reduction order.
* ``"distrifusion"`` — the first ``warmup_steps`` steps are exchanged synchronously; after that
  each layer works with the other patches' activations from the previous step, sent
  asynchronously in a few flat buffers per step (``bucket_mb``) while the step goes on.
* ``"pcpp"`` — synchronous, but only with the two neighbouring processes: convolutions get their
  halo rows, self-attention sees its own patch plus the nearest ``neighbor_fraction`` of each
  neighbour's rows. Far fewer bytes than an all-gather.

Transformers are split into token rows (in every frame, for video), as their anatomy's
:class:`~fastdiff.anatomy.TokenLayout` describes: the tokens are cut after the patch embedding and
joined before the output norm; text tokens and a rotary table's text rows stay with every process.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..anatomy import Anatomy, TokenLayout, anatomy_of
from ..core.method import Method
from ..caching.tgate import guidance_batched
from ..core.rules import denoiser_sample, main_tensor, map_batched, with_main_tensor
from .exchange import Exchange
from .group import DEFAULT_TIMEOUT_S, ProcessGroup, process_group
from .layers import (
    ConvHook,
    DecoderHook,
    GroupNormHook,
    KeyValueHook,
    PatchCall,
    RotarySliceHook,
    SelfAttentionHook,
    TokenGatherHook,
    TokenSliceHook,
)
from .split import row_partition

if TYPE_CHECKING:
    from ..core.accelerator import Accelerator

MODES = ("distrifusion", "pcpp", "sync")
_WARNED_ONE_PROCESS = False


@dataclass(frozen=True)
class _Halves:
    """This process's side of a guidance split: its half's group, its rank there, and its partner."""

    part: int  # 0: unconditional half, 1: conditional
    group: Any
    rank: int
    size: int
    peers: list[int]
    partner: int


def _make_halves(group: ProcessGroup) -> _Halves | None:
    if group.world_size < 2 or group.world_size % 2:
        return None
    half = group.world_size // 2
    ranks = [list(range(half)), list(range(half, group.world_size))]
    handles = [dist.new_group(r) for r in ranks]  # every process creates both, in the same order
    part = group.rank // half
    return _Halves(part, handles[part], group.rank - part * half, half, ranks[part],
                   group.rank + half if part == 0 else group.rank - half)


def _replace_sample(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    name = "sample" if "sample" in kwargs else "hidden_states"
    return args, {**kwargs, name: value}


class Unsplittable(TypeError, ValueError):
    """A denoiser whose image this method cannot split (its family has no token layout). A
    ``ValueError`` too, so front ends that check a request before starting processes report it."""


# how a guidance style that is not a batch keeps split_guidance from splitting, in words
_NO_GUIDANCE_BATCH = {
    "calls": "the {family} family's pipelines run classifier-free guidance as two denoiser calls per step, not a batch",
    "embedded": "the {family} family is guidance-distilled (the scale is an input of the model): no unconditional batch",
}


def _row_unit(denoiser: torch.nn.Module) -> int:
    """The fewest latent rows a patch can have: a UNet's total downsampling, a transformer's patch size."""
    anatomy = anatomy_of(denoiser, "PatchParallel")
    if anatomy.tokens is not None:
        return int(anatomy.tokens.patch[-2])
    modules = dict(denoiser.named_modules())
    return 2 ** sum(1 for path in anatomy.unet.down if getattr(modules[path], "downsamplers", None))


def _splittable(denoiser: torch.nn.Module) -> Anatomy:
    """The anatomy of a denoiser whose rows this method can split, or a clear refusal."""
    anatomy = anatomy_of(denoiser, "PatchParallel")
    if anatomy.is_unet or anatomy.tokens is not None:
        return anatomy
    raise Unsplittable(
        f"PatchParallel: {anatomy.denoiser} ({anatomy.family}) cannot be split into patches: fastdiff.anatomy does "
        f"not describe how its image tokens lie (no token layout for the {anatomy.family} family). PatchParallel "
        "splits UNets (SD 1.x/2.x, SDXL) and the transformers of DiT, PixArt, SD3/SD3.5, Flux and Wan"
    )


# diffusers attention backends that run torch's scaled_dot_product_attention, where the keys and
# values of joint / rotary attention are exchanged; the others (flash, sage, xformers...) call
# their own kernels, which a patch cannot see into
SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math", "_native_npu",
                 "_native_xla")


def check_attention_backends(denoiser: torch.nn.Module, paths: Sequence[str]) -> None:
    """Refuse, before any call, an attention backend whose kernel the key/value exchange cannot reach."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:  # pragma: no cover - diffusers without the dispatcher
        return
    active = _AttentionBackendRegistry._active_backend
    modules = dict(denoiser.named_modules())
    for path in paths:
        processor = getattr(modules.get(path), "processor", None)
        backend = getattr(processor, "_attention_backend", None) or active
        name = getattr(backend, "value", backend)
        if name not in SDPA_BACKENDS:
            raise ValueError(
                f"PatchParallel: attention {path!r} runs on the {name!r} attention backend; its keys and values "
                f"are exchanged inside torch's scaled_dot_product_attention, so use one of {list(SDPA_BACKENDS)} "
                "(set_attention_backend(...) or attention_backend(...))"
            )


def _exchanged_attention(anatomy: Anatomy) -> list[str]:
    tokens = anatomy.tokens
    if tokens is None or not _keys_from_processor(tokens):
        return []
    return [*anatomy.attention_paths("joint"), *anatomy.attention_paths("self")]


def _keys_from_processor(tokens: TokenLayout) -> bool:
    """Whether the attention processors make the keys from this process's tokens themselves (text
    joined in attention, rotary positions): then a patch sees the others at the attention call."""
    return tokens.text == "joint" or tokens.rotary is not None


def _latent_rows(pipe: Any, denoiser: torch.nn.Module, height: int | None) -> int:
    """Latent rows of a call at ``height`` pixels (the pipeline's default size without one)."""
    scale = int(getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None) or 8)
    parameters = inspect.signature(type(pipe).__call__).parameters
    if "height" in parameters:
        if height is None and isinstance(parameters["height"].default, int):
            height = parameters["height"].default  # Wan: 480
        if height is None and isinstance(getattr(pipe, "default_sample_size", None), int):
            height = pipe.default_sample_size * scale  # SD3, Flux: from the transformer's config
        if height is not None:
            return height // scale
    size = getattr(denoiser.config, "sample_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"PatchParallel: cannot tell the latent height of {type(pipe).__name__}; give --height")
    return size


def _in_split_layout(anatomy: Anatomy, sample: torch.Tensor) -> bool:
    """Whether the denoiser input is what this family's split expects: a latent of rows (4-d), a
    video latent (5-d), or packed tokens (3-d)."""
    tokens = anatomy.tokens
    if tokens is None or not (tokens.packed or tokens.frames):
        return sample.dim() == 4
    return sample.dim() == (3 if tokens.packed else 5)


def _token_grid(anatomy: Anatomy, sample: torch.Tensor, kwargs: dict) -> tuple[int, int, int]:
    """``(token frames, latent rows, latent columns)`` of one denoiser call."""
    tokens = anatomy.tokens
    if tokens is None or not tokens.packed:
        frames = sample.shape[-3] // tokens.patch[0] if tokens is not None and tokens.frames else 1
        return frames, sample.shape[-2], sample.shape[-1]
    ids = kwargs.get(tokens.positions)
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"PatchParallel: {anatomy.denoiser} was called on packed tokens without "
                         f"`{tokens.positions}`, which says where each lies; cannot split its rows")
    ids = ids.reshape(-1, ids.shape[-1])
    rows, columns = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if rows * columns != sample.shape[1] or ids.shape[0] != sample.shape[1]:
        raise ValueError(f"PatchParallel: the {sample.shape[1]} packed tokens of {anatomy.denoiser} are not one "
                         f"{rows} x {columns} grid (reference-image tokens beside the image?); cannot split their rows")
    return 1, rows * tokens.patch[-2], columns * tokens.patch[-1]


def _layer_hooks(root: torch.nn.Module, current: Any, as_modules: bool = False,
                 self_attention: bool = True) -> list[tuple[Any, Any]]:
    """Patch-aware hooks for every k×k convolution, GroupNorm and (``self_attention``)
    self-attention under ``root``."""
    from diffusers.models.attention_processor import Attention

    hooks: list[tuple[Any, Any]] = []
    for path, module in root.named_modules():
        target = module if as_modules else path
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] > 1:
            if module.padding_mode != "zeros" or isinstance(module.padding, str) or module.dilation[0] != 1:
                raise TypeError(f"PatchParallel: convolution {path!r} has padding/dilation it cannot split")
            hooks.append((target, ConvHook(path, current)))
        elif isinstance(module, torch.nn.GroupNorm):
            hooks.append((target, GroupNormHook(path, current)))
        elif self_attention and isinstance(module, Attention) and not module.is_cross_attention:
            hooks.append((target, SelfAttentionHook(path, current)))
    return hooks


def _token_hooks(anatomy: Anatomy, current: Any) -> list[tuple[Any, Any]]:
    """A transformer's split: its tokens cut after the embedding and joined before the output
    norm; its rotary table cut to this process's rows; its joint (and, where the processor makes
    the keys, self-) attention given the other patches' keys and values."""
    tokens = anatomy.tokens
    hooks: list[tuple[Any, Any]] = [
        (tokens.embed, TokenSliceHook(tokens.embed, current, grid=tokens.embed_output == "grid")),
        (tokens.output_norm, TokenGatherHook(tokens.output_norm, current)),
    ]
    if tokens.rotary is not None:
        hooks.append((tokens.rotary, RotarySliceHook(tokens.rotary, current, tokens.rotary_token_dim, tokens.text_first)))
    if _keys_from_processor(tokens):
        for path in (*anatomy.attention_paths("joint"), *anatomy.attention_paths("self")):
            hooks.append((path, KeyValueHook(path, current, tokens.text_first)))
    return hooks


@dataclass
class PatchParallel(Method):
    """Split each image into row patches over the launched processes.

    Args:
        mode: ``"distrifusion"`` (stale activations after the warm-up), ``"pcpp"`` (neighbours
            only, partial attention context) or ``"sync"`` (exact).
        warmup_steps: DistriFusion's synchronous steps; ``>=`` the step count means every step is
            synchronous (the same as ``mode="sync"``).
        neighbor_fraction: PCPP's share of each neighbouring patch's rows that self-attention sees.
        split_guidance: off by default, so that every process takes a row patch and ``mode``
            decides how patches exchange. On: with classifier-free guidance and an even number of
            processes, half of them compute the unconditional branch and half the conditional
            one, each half splitting its image into patches; the halves swap results at every
            step. With two processes that is a pure guidance split (no patches, nothing for
            ``mode`` to do): exact and the least traffic, but it cannot use more than two
            processes per image on its own. Without guidance or with an odd number of processes
            every process takes both halves. :meth:`describe_split` says which split a call gets.
        timeout: seconds a process waits for the others before failing (a crashed peer).
        bucket_mb: DistriFusion sends its stale activations in flat buffers of about this many MiB,
            each as soon as it fills, so early layers' data travels while later layers compute;
            ``0`` sends one buffer per step, at its end.
    """

    spec_name = "patch"
    spec_keys = ("mode",)
    wrap_order = 90  # innermost: splits whatever batch the other methods settled on

    mode: str = "distrifusion"
    warmup_steps: int = 4
    neighbor_fraction: float = 0.5
    split_guidance: bool = False
    timeout: float = DEFAULT_TIMEOUT_S
    bucket_mb: float = 16.0
    _group: ProcessGroup | None = field(default=None, init=False, repr=False, compare=False)
    _halves: _Halves | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"PatchParallel: mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"PatchParallel: warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0.0 < self.neighbor_fraction <= 1.0:
            raise ValueError(f"PatchParallel: neighbor_fraction must be in (0, 1], got {self.neighbor_fraction!r}")
        if isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, (int, float)) or not self.bucket_mb >= 0:
            raise ValueError(f"PatchParallel: bucket_mb must be a number >= 0 (0: one buffer per step), got {self.bucket_mb!r}")
        if not self.timeout > 0:
            raise ValueError(f"PatchParallel: timeout must be > 0 seconds, got {self.timeout!r}")

    @property
    def group(self) -> ProcessGroup:
        """The group joined when the method was installed (``_join``): only then is the denoiser's
        device, and with it the backend, known."""
        if self._group is None:
            raise RuntimeError("PatchParallel: no process group yet; it is joined when fastdiff.apply installs "
                               "the method on a pipeline")
        return self._group

    def _join(self, denoiser: torch.nn.Module) -> ProcessGroup:
        """The group, joined on the denoiser's side: a pipeline on the CPU exchanges over gloo even
        where CUDA is there, one on a GPU over NCCL."""
        if self._group is None:
            parameter = next(denoiser.parameters(), None)
            where = "cpu" if parameter is None or parameter.device.type == "cpu" else "auto"
            self._group = process_group(self.timeout, requested=where)
        return self._group

    # -- before anything runs ------------------------------------------------------------------
    def describe_split(self, pipe: Any, world_size: int, *, height: int | None = None,
                       guidance_scale: float | None = None) -> str:
        """How ``world_size`` processes will share a call of ``pipe`` at ``height`` (pixels), in words;
        raises ``ValueError`` when they cannot (more patches than latent rows, or a denoiser family
        it cannot split). Front ends call it before starting processes or the first denoiser call,
        so the mistake costs nothing."""
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is None or world_size <= 1:
            return "one process: no split"
        anatomy = _splittable(denoiser)
        rows = _latent_rows(pipe, denoiser, height)
        unit = _row_unit(denoiser)
        if anatomy.tokens is not None and anatomy.tokens.packed:
            rows -= rows % unit  # the pipeline packs whole tokens (Flux rounds the height down)
        if guidance_scale is None:
            parameter = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
            guidance_scale = parameter.default if parameter is not None else None
        guided = isinstance(guidance_scale, (int, float)) and guidance_scale > 1
        fallback = self._split_guidance_fallback(anatomy, world_size, guided)
        halves = self.split_guidance and fallback is None
        patches = world_size // 2 if halves else world_size
        if patches > 1:
            row_partition(rows, patches, unit, tokens=anatomy.tokens is not None)  # raises when the latent is too short
        if halves and patches == 1:
            return (f"guidance split: {world_size} processes take one classifier-free guidance half each, "
                    f"no row patches (mode {self.mode!r} has nothing to exchange)")
        frames = ", the same rows of every frame" if anatomy.tokens is not None and anatomy.tokens.frames else ""
        where = f"{patches} row patches of a {rows}-row latent{frames} ({self.mode})"
        if halves:
            return f"guidance split into 2 halves, each in {where}"
        return where if fallback is None else f"{where}; split_guidance falls back to splitting patches only: {fallback}"

    def _split_guidance_fallback(self, anatomy: Anatomy, processes: int, guided: bool) -> str | None:
        """Why ``split_guidance`` cannot split these calls (``None``: it can, or was not asked)."""
        if not self.split_guidance:
            return None
        if anatomy.guidance in _NO_GUIDANCE_BATCH:
            return _NO_GUIDANCE_BATCH[anatomy.guidance].format(family=anatomy.family)
        if processes < 2 or processes % 2:
            return f"{processes} processes (needs an even number >= 2)"
        if not guided:
            return "this call has no classifier-free guidance batch"
        return None

    # -- the Method contract ----------------------------------------------------------------
    def compile_refusal(self) -> str | None:
        return ("every convolution, normalisation and attention layer exchanges with the other processes "
                "as it runs, so a compiled graph would break at each of them; run the patch-parallel "
                "denoiser uncompiled")

    def modules(self, denoiser: torch.nn.Module) -> list[str]:
        return []  # claims nothing: its layers sit inside whatever other methods reuse or skip

    def schedule(self, denoiser: torch.nn.Module, num_steps: int) -> dict:
        return {}

    def module_hooks(self, runtime: Accelerator, denoiser: torch.nn.Module) -> list[tuple[Any, Any]]:
        anatomy = _splittable(denoiser)
        if self._join(denoiser).world_size == 1:
            global _WARNED_ONE_PROCESS
            if not _WARNED_ONE_PROCESS:
                _WARNED_ONE_PROCESS = True
                warnings.warn("PatchParallel: one process (not launched with torchrun/accelerate): nothing to split, "
                              "the pipeline runs as usual", stacklevel=3)
            return []
        runtime.ledger.processes = self.group.world_size  # its report tells split work from saved work
        if self.split_guidance and self.group.world_size % 2 == 0 and anatomy.guidance == "batch":
            gated = [m.name for m in runtime.methods if m.name == "tgate"]
            if gated:
                raise ValueError(
                    "PatchParallel(split_guidance=True) and TGate cannot be combined: each process would see one "
                    "guidance half, and T-GATE keeps the mean of both halves' cross-attention at its gate; use "
                    "split_guidance=False (row patches) with TGate"
                )
        if self.split_guidance and self._halves is None:
            self._halves = _make_halves(self.group)
        state = runtime.call_state

        def current() -> PatchCall | None:
            # a FLOP-counting shadow pass (Ledger) measures local work only and exchanges nothing
            return None if runtime.measuring is not None else state(self).get("patch")

        check_attention_backends(denoiser, _exchanged_attention(anatomy))
        hooks: list[tuple[Any, Any]] = self._decoder_hooks(runtime)
        tokens = anatomy.tokens
        if tokens is not None:
            hooks += _token_hooks(anatomy, current)
        hooks += _layer_hooks(denoiser, current, self_attention=tokens is None or not _keys_from_processor(tokens))
        return hooks

    def _decoder_hooks(self, runtime: Accelerator) -> list[tuple[Any, Any]]:
        """The VAE decode split into row patches too: at 512 px and up it is a large share of a call."""
        from diffusers.models.autoencoders.vae import Decoder

        decoder = getattr(getattr(runtime.pipe, "vae", None), "decoder", None)
        if not isinstance(decoder, Decoder):  # AutoencoderKL's 2D decoder; others decode whole
            return []
        state, group = runtime.call_state, self.group

        def current() -> PatchCall | None:
            return state(self).get("vae") if runtime.clock.active else None

        def start(sample: torch.Tensor | None) -> PatchCall | None:
            if sample is None or not runtime.clock.active or sample.dim() != 4 or sample.shape[-2] < group.world_size:
                state(self)["vae"] = None
                return None
            exchange = Exchange(group.rank, group.world_size,
                                lambda kind, sent, received, s: runtime.record_comm(f"vae {kind}", sent, received, s),
                                keep_latest=False, context=" (VAE decode)")
            call = PatchCall(group.rank, group.world_size, row_partition(sample.shape[-2], group.world_size),
                             sample.shape[-1], exchange, "sync", 1.0)
            state(self)["vae"] = call
            return call

        return [(decoder, DecoderHook(start))] + [(module, hook) for module, hook in
                                                  _layer_hooks(decoder, current, as_modules=True)]

    def wrap_denoiser(self, runtime: Accelerator, forward: Any, args: tuple, kwargs: dict) -> Any:
        group = self.group
        sample = denoiser_sample(args, kwargs)
        anatomy = anatomy_of(runtime.denoiser, "PatchParallel")
        if group.world_size == 1 or sample is None or not _in_split_layout(anatomy, sample):
            return forward(*args, **kwargs)
        state = runtime.call_state(self)
        steps = runtime.clock.num_steps or 0
        batch = sample.shape[0]
        exchange = state.get("exchange")
        if exchange is None:
            check_attention_backends(runtime.denoiser, _exchanged_attention(anatomy))  # the backend may have changed since apply
            halves = self._guidance_split(runtime, batch)
            state["halves"] = halves
            rank, size = (halves.rank, halves.size) if halves else (group.rank, group.world_size)
            exchange = state["exchange"] = Exchange(
                rank, size, runtime.record_comm, keep_latest=self.mode == "distrifusion",
                group=halves.group if halves else None, peers=halves.peers if halves else None,
                bucket_bytes=int(self.bucket_mb * 2**20) if self.bucket_mb > 0 else None)
            self._check_agreement(runtime, exchange, sample, args, kwargs)
            if self.mode == "distrifusion" and self.warmup_steps >= steps:
                warnings.warn(f"PatchParallel: warmup_steps={self.warmup_steps} covers all {steps} steps, so every "
                              "step exchanges synchronously (exact, no stale activations)", stacklevel=2)
        halves = state["halves"]
        if halves is not None and batch % 2:
            # guidance dropped part-way (T-GATE after its gate): both halves compute the same
            # whole batch, each still patched among its own members, and nothing is swapped
            halves = None
        if halves is not None:
            half = batch // 2
            take = lambda t: t[halves.part * half:(halves.part + 1) * half]  # noqa: E731
            args, kwargs = map_batched(args, batch, take), map_batched(kwargs, batch, take)
            sample = denoiser_sample(args, kwargs)
        if exchange.world_size == 1:  # a half of one process: the guidance split is all there is
            output = forward(*args, **kwargs)
            full = main_tensor(output)
        else:
            output, full = self._patched_call(runtime, forward, args, kwargs, sample, exchange)
        if full is None:
            return output
        if halves is not None:
            other = exchange.swap("guidance", full, halves.partner)
            full = torch.cat([full, other] if halves.part == 0 else [other, full])
        return with_main_tensor(output, full)

    def _patched_call(self, runtime: Accelerator, forward: Any, args: tuple, kwargs: dict, sample: torch.Tensor,
                      exchange: Exchange) -> tuple[Any, torch.Tensor | None]:
        """Run this process's rows; return the output and its main tensor gathered to full height."""
        state = runtime.call_state(self)
        step, steps = runtime.clock.step, runtime.clock.num_steps or 0
        unit = _row_unit(runtime.denoiser)
        anatomy = anatomy_of(runtime.denoiser, "PatchParallel")
        transformer = not anatomy.is_unet
        frames, rows, width = _token_grid(anatomy, sample, kwargs)
        partition = row_partition(rows, exchange.world_size, unit, tokens=transformer)
        exchange.context = f" (step {step})"
        exchange.stale = self.mode == "distrifusion" and step >= self.warmup_steps
        exchange.send_stale = step + 1 < steps
        start, stop = partition[exchange.rank]
        if transformer:  # the patch embedding sees the whole latent and keeps this process's tokens
            patch_args, patch_kwargs = args, kwargs
        else:
            patch_args, patch_kwargs = _replace_sample(args, kwargs, sample[:, :, start:stop].contiguous())
        state["patch"] = PatchCall(exchange.rank, exchange.world_size, partition, width, exchange,
                                   self.mode, self.neighbor_fraction, prefix=runtime.clock.calls_in_step,
                                   patch_size=unit if transformer else 1, frames=frames)
        try:
            output = forward(*patch_args, **patch_kwargs)
        finally:
            state["patch"] = None
        if exchange.stale and exchange.send_stale:
            exchange.flush()
        else:
            exchange.finish()
        patch = main_tensor(output)
        if transformer or patch is None:  # a transformer gathered its tokens before its output norm
            return output, patch
        return output, exchange.gather_concat(None, "output", patch, [b - a for a, b in partition], dim=-2, fresh=True)

    def _guidance_split(self, runtime: Accelerator, batch: int) -> _Halves | None:
        if not self.split_guidance:
            return None
        anatomy = anatomy_of(runtime.denoiser, "PatchParallel")
        reason = self._split_guidance_fallback(anatomy, self.group.world_size, True)
        if reason is None and (not guidance_batched(runtime) or batch % 2):
            reason = "this call has no classifier-free guidance batch"
        if reason is None:
            return self._halves
        warnings.warn(f"PatchParallel: split_guidance falls back to splitting patches only: {reason}", stacklevel=3)
        return None

    # -- helpers ------------------------------------------------------------------------------
    def _check_agreement(self, runtime: Accelerator, exchange: Exchange, sample: torch.Tensor, args: tuple,
                         kwargs: dict) -> None:
        """Every process must be making the same call: same method, steps, shapes and inputs."""
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        mine = {
            "methods": [m.spec() for m in runtime.methods],
            "steps": runtime.clock.num_steps,
            "latent": tuple(sample.shape),
            "latent sum": float(sample.double().sum()),
            "prompt embedding sum": float(context.double().sum()) if isinstance(context, torch.Tensor) else None,
        }
        everyone: list[Any] = [None] * self.group.world_size
        exchange._run("the check that all processes make the same call",
                      lambda: dist.all_gather_object(everyone, mine))
        for rank, theirs in enumerate(everyone):
            if theirs != mine:
                differing = sorted(k for k in mine if theirs.get(k) != mine.get(k))
                raise ValueError(
                    f"PatchParallel: process {rank} makes a different call from process {self.group.rank} "
                    f"(differs in {', '.join(differing)}); start every process with the same arguments, prompts and seed"
                )
