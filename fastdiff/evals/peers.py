"""Other projects' caches, run by the quality harness on the same pipeline, prompts and seeds.

A speed-quality claim means little unless it is set against what a diffusers user would switch
on instead: diffusers' own caches (`FirstBlockCache`, `TaylorSeerCache`, `MagCache`,
`FasterCache`, `PyramidAttentionBroadcast`), cache-dit's DBCache (with and without its
TaylorSeer calibrator), and the authors' DeepCache and T-GATE releases for UNets. Each peer is
enabled the way its own documentation says; where a pipeline does not open diffusers' cache
context (SD3, PixArt: their denoisers have no ``enable_cache``), a hook opens it around every
denoiser call and resets the cache state when a new pipeline call starts — what a user would
have to add by hand. A peer that fails on a pipeline is reported with its error, not hidden.

Specs read like method specs: ``fbc`` (its 2-3 settings spanning its speed range),
``fbc:threshold=0.1`` (one setting), ``all`` (every peer's settings).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook

from ..core.accelerator import find_denoiser

PEERS_EXTRA = "peers"


@dataclass(frozen=True)
class PeerOption:
    default: int | float
    help: str
    minimum: int | float = 1  # the smallest value the peer accepts

    def parse(self, name: str, peer: str, text: str) -> int | float:
        kind = type(self.default)
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"peer {peer}: {name}={text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < self.minimum:
            raise ValueError(f"peer {peer}: {name}={text!r} is below {self.minimum}")
        return value


@dataclass
class PeerContext:
    """What a peer may need to know about the run it joins."""

    steps: int
    guidance_scale: float | None = None
    calibrate: Callable[[DiffusionPipeline], Any] | None = None  # one untimed call on calibration prompts


@dataclass
class Enabled:
    """A peer switched on: how to undo it, and the call to use instead of ``pipe(...)`` if any."""

    remove: Callable[[], None]
    call: Callable[..., Any] | None = None


Enabler = Callable[[DiffusionPipeline, Mapping[str, Any], PeerContext], Enabled]


@dataclass(frozen=True)
class Peer:
    name: str
    title: str
    module: str  # what must be importable
    distribution: str  # what pip installs it as
    options: Mapping[str, PeerOption]
    sweep: tuple[Mapping[str, Any], ...]
    enable: Enabler = field(repr=False)
    needs: str = "transformer"  # "transformer" or "unet"

    def check_installed(self) -> None:
        if importlib.util.find_spec(self.module) is None:
            raise ValueError(
                f"peer {self.name} needs {self.distribution}, which is not installed: "
                f"pip install -e \".[{PEERS_EXTRA}]\" (or pip install {self.distribution})"
            )

    def cannot_run(self, pipe: DiffusionPipeline) -> str | None:
        """Why this peer cannot run on ``pipe`` at all, before trying (None: try it)."""
        name, _ = find_denoiser(pipe)
        if self.needs == "unet" and name != "unet":
            return f"needs a UNet denoiser; {type(pipe).__name__} has a {name}"
        if self.needs == "transformer" and name != "transformer":
            return f"needs a transformer denoiser; {type(pipe).__name__} has a {name}"
        if self.needs == "unet" and "StableDiffusionPipeline" not in {c.__name__ for c in type(pipe).__mro__}:
            return f"the release supports StableDiffusionPipeline, not {type(pipe).__name__}"
        return None


@dataclass(frozen=True)
class PeerSetting:
    peer: Peer
    options: Mapping[str, Any]

    def spec(self) -> str:
        return f"{self.peer.name}:" + ",".join(f"{k}={v}" for k, v in self.options.items())

    def enable(self, pipe: DiffusionPipeline, context: PeerContext) -> Enabled:
        return self.peer.enable(pipe, self.options, context)


# --------------------------------------------------------------------------- diffusers' caches


class _CacheContextOpener(ModelHook):
    """Opens diffusers' cache context around each denoiser call of a pipeline that does not.

    The cache hooks keep their state per context name; a new pipeline call starts from fresh
    state, as ``maybe_free_model_hooks`` does for CacheMixin models. A new call is when the
    scheduler has not stepped yet (its ``step_index`` is None: reset once, however many denoiser
    calls that first step makes); for schedulers that do not say, when the timestep goes up.
    """

    _is_stateful = False

    def __init__(self, scheduler: Any) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.timestep: float | None = None
        self._fresh = False  # already reset for the call in progress

    def _new_call(self, now: float | None) -> bool:
        if hasattr(self.scheduler, "step_index"):
            if self.scheduler.step_index is not None:
                self._fresh = False
                return False
            return not self._fresh
        return self.timestep is None or (now is not None and now > self.timestep)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        timestep = kwargs.get("timestep")  # diffusers pipelines pass it by name
        now = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else timestep
        if self._new_call(now):
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()
            self._fresh = True
        self.timestep = now
        _set_cache_context(module, CacheContext("cond"))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        from diffusers.hooks.hooks import _set_cache_context

        _set_cache_context(module, None)
        return output


def _registries(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, HookRegistry]]:
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None:
            yield sub, registry


def _hook_names(module: torch.nn.Module) -> set[tuple[int, str]]:
    return {(id(sub), name) for sub, registry in _registries(module) for name in registry.hooks}


def _enable_diffusers_cache(pipe: DiffusionPipeline, make_config: Callable[[Callable[[], float]], Any],
                            apply_fn: Callable[[torch.nn.Module, Any], None]) -> Enabled:
    """CacheMixin denoisers (their pipelines open the context): ``enable_cache``. Others: the
    library's ``apply_*`` function plus a hook that opens the context; removal takes off exactly
    the hooks that were added."""
    from diffusers.models.cache_utils import CacheMixin

    _, denoiser = find_denoiser(pipe)
    if isinstance(denoiser, CacheMixin) and _pipeline_opens_cache_context(pipe):
        # these pipelines also keep the current timestep, in the scheduler's units
        denoiser.enable_cache(make_config(lambda: pipe.current_timestep))
        return Enabled(denoiser.disable_cache)
    before = _hook_names(denoiser)
    opener = _CacheContextOpener(getattr(pipe, "scheduler", None))
    apply_fn(denoiser, make_config(lambda: opener.timestep))
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(opener, "fastdiff_peer_context")
    registry.invalidate_child_registries_cache()  # the context must reach the hooks just added

    def remove() -> None:
        for sub, child in list(_registries(denoiser)):
            for name in list(child.hooks):
                if (id(sub), name) not in before:
                    child.remove_hook(name, recurse=False)
        registry.invalidate_child_registries_cache()

    return Enabled(remove)


def _pipeline_opens_cache_context(pipe: DiffusionPipeline) -> bool:
    import inspect

    try:
        return "cache_context" in inspect.getsource(type(pipe).__call__)
    except (OSError, TypeError):
        return False


def _fbc(pipe: DiffusionPipeline, options: Mapping[str, Any], context: PeerContext) -> Enabled:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return _enable_diffusers_cache(pipe, lambda _t: FirstBlockCacheConfig(threshold=options["threshold"]),
                                   apply_first_block_cache)


def _taylorseer(pipe: DiffusionPipeline, options: Mapping[str, Any], context: PeerContext) -> Enabled:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    _, denoiser = find_denoiser(pipe)
    config = TaylorSeerCacheConfig(
        cache_interval=options["interval"], disable_cache_before_step=options["warmup"], max_order=options["order"],
        taylor_factors_dtype=denoiser.dtype,  # its bfloat16 default would add rounding that fp32 runs do not have
    )
    return _enable_diffusers_cache(pipe, lambda _t: config, apply_taylorseer_cache)


def _magcache(pipe: DiffusionPipeline, options: Mapping[str, Any], context: PeerContext) -> Enabled:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    ratios = _magcache_ratios(pipe, context)
    config = MagCacheConfig(threshold=options["threshold"], max_skip_steps=options["max_skip"],
                            retention_ratio=options["retention"], num_inference_steps=context.steps, mag_ratios=ratios)
    return _enable_diffusers_cache(pipe, lambda _t: config, apply_mag_cache)


def _magcache_ratios(pipe: DiffusionPipeline, context: PeerContext) -> list[float]:
    """MagCache's model-specific ratios, by its own calibration mode on the calibration prompts.

    diffusers prints the ratios for the user to copy into the config; this copies them."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    if context.calibrate is None:
        raise ValueError("peer magcache needs a calibration call to measure its magnitude ratios")
    enabled = _enable_diffusers_cache(pipe, lambda _t: MagCacheConfig(calibrate=True, num_inference_steps=context.steps),
                                      apply_mag_cache)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            context.calibrate(pipe)
    finally:
        enabled.remove()
    found = re.findall(r"\[([-0-9eE.,\s]+)\]", printed.getvalue())
    if not found:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(v) for v in found[-1].split(",")]


def _timestep_ranged(pipe: DiffusionPipeline, config_class: Any, apply_fn: Any, **kwargs: Any) -> Enabled:
    return _enable_diffusers_cache(pipe, lambda timestep: config_class(current_timestep_callback=timestep, **kwargs),
                                   apply_fn)


def _pab(pipe: DiffusionPipeline, options: Mapping[str, Any], context: PeerContext) -> Enabled:
    from diffusers.hooks import (
        PyramidAttentionBroadcastConfig,
        apply_pyramid_attention_broadcast,
    )

    return _timestep_ranged(pipe, PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast,
                            spatial_attention_block_skip_range=options["spatial"])


def _fastercache(pipe: DiffusionPipeline, options: Mapping[str, Any], context: PeerContext) -> Enabled:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    _, denoiser = find_denoiser(pipe)
    video = getattr(pipe, "vae_scale_factor_temporal", None) is not None
    # no unconditional half of the batch to approximate: guidance off, or embedded in the model (Flux)
    no_guidance_batch = (context.guidance_scale is not None and context.guidance_scale <= 1) or bool(
        getattr(denoiser.config, "guidance_embeds", False))
    return _timestep_ranged(
        pipe, FasterCacheConfig, apply_faster_cache, spatial_attention_block_skip_range=options["spatial"],
        unconditional_batch_skip_range=options["uncond"], tensor_format="BCFHW" if video else "BCHW",
        is_guidance_distilled=no_guidance_batch,
    )


# --------------------------------------------------------------------------- cache-dit


def _import_cache_dit() -> Any:
    """cache-dit, imported without its import-time side effect on the rest of the process: it
    turns diffusers' (and other libraries') logging down to errors, which would hide diffusers'
    own warnings from the user for the rest of the run."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    levels = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)}
    import cache_dit

    diffusers_logging.set_verbosity(verbosity)
    for name in list(logging.root.manager.loggerDict):
        if not name.startswith("cache_dit"):  # its own loggers keep their settings
            logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))
    return cache_dit


def _dbcache(pipe: DiffusionPipeline, options: Mapping[str, Any], context: PeerContext,
             taylorseer: bool = False) -> Enabled:
    cache_dit = _import_cache_dit()

    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=options["fn"], Bn_compute_blocks=options["bn"],
        residual_diff_threshold=options["threshold"], max_warmup_steps=options["warmup"],
    )
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=options["order"]) if taylorseer else None
    with _quiet_cache_dit():
        try:
            cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
        except Exception:
            cache_dit.disable_cache(pipe)  # it patches the pipeline's class: never leave that half done
            raise

    def remove() -> None:
        with _quiet_cache_dit():
            cache_dit.disable_cache(pipe)

    return Enabled(remove)


@contextlib.contextmanager
def _quiet_cache_dit() -> Iterator[None]:
    """cache-dit reports every enable and disable at info level on its own console handler; its
    warnings still show."""
    import logging

    cache_dit_logger = importlib.import_module("cache_dit.logger")

    handler = getattr(cache_dit_logger, "_default_handler", None)
    level = handler.level if handler is not None else None
    if handler is not None:
        handler.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if handler is not None:
            handler.setLevel(level)


def _dbcache_taylorseer(pipe: DiffusionPipeline, options: Mapping[str, Any], context: PeerContext) -> Enabled:
    return _dbcache(pipe, options, context, taylorseer=True)


# --------------------------------------------------------------------------- authors' UNet releases


def _deepcache_release(pipe: DiffusionPipeline, options: Mapping[str, Any], context: PeerContext) -> Enabled:
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=options["interval"], cache_branch_id=options["branch"])
    helper.enable()
    return Enabled(helper.disable)


def _tgate_release(pipe: DiffusionPipeline, options: Mapping[str, Any], context: PeerContext) -> Enabled:
    from tgate import TgateSDLoader

    processors = dict(pipe.unet.attn_processors)
    TgateSDLoader(pipe)

    def call(**kwargs: Any) -> Any:
        return pipe.tgate(**kwargs, gate_step=options["gate_step"], sp_interval=options["sp_interval"],
                          fi_interval=options["fi_interval"], warm_up=options["warm_up"])

    def remove() -> None:
        pipe.unet.set_attn_processor(processors)
        vars(pipe).pop("tgate", None)

    return Enabled(remove, call)


# --------------------------------------------------------------------------- registry


def _peer(name: str, title: str, module: str, distribution: str, enable: Enabler, sweep_key: str,
          sweep: tuple[Any, ...], options: Mapping[str, PeerOption], needs: str = "transformer") -> Peer:
    defaults = {k: o.default for k, o in options.items()}
    return Peer(name, title, module, distribution, options,
                tuple({**defaults, sweep_key: v} for v in sweep), enable, needs)


_DBCACHE_OPTIONS = {
    "threshold": PeerOption(0.08, "residual difference under which the middle blocks are reused", minimum=0),
    "fn": PeerOption(1, "first blocks always computed (the probe)"),
    "bn": PeerOption(0, "last blocks always computed", minimum=0),
    "warmup": PeerOption(8, "steps computed in full at the start", minimum=0),
}

PEERS: dict[str, Peer] = {p.name: p for p in (
    _peer("fbc", "diffusers FirstBlockCache", "diffusers", "diffusers", _fbc, "threshold", (0.05, 0.1, 0.2),
          {"threshold": PeerOption(0.05, "relative change of the first block's output under which the rest is reused", minimum=0)}),
    _peer("taylorseer", "diffusers TaylorSeerCache", "diffusers", "diffusers", _taylorseer, "interval", (2, 3, 5),
          {"interval": PeerOption(5, "steps between full computations"),
           "order": PeerOption(1, "Taylor order of the forecast"),
           "warmup": PeerOption(3, "steps computed in full at the start", minimum=0)}),
    _peer("magcache", "diffusers MagCache", "diffusers", "diffusers", _magcache, "threshold", (0.06, 0.12, 0.24),
          {"threshold": PeerOption(0.06, "accumulated error under which blocks are skipped", minimum=0),
           "max_skip": PeerOption(3, "most consecutive skipped steps"),
           "retention": PeerOption(0.2, "share of first steps never skipped", minimum=0)}),
    _peer("fastercache", "diffusers FasterCache", "diffusers", "diffusers", _fastercache, "spatial", (2, 3, 4),
          {"spatial": PeerOption(2, "attention computed every N-th step (in its timestep range)"),
           "uncond": PeerOption(5, "unconditional branch computed every N-th step (with guidance)")}),
    _peer("pab", "diffusers PyramidAttentionBroadcast", "diffusers", "diffusers", _pab, "spatial", (2, 3, 4),
          {"spatial": PeerOption(2, "attention computed every N-th step (timesteps 100-800)")}),
    _peer("dbcache", "cache-dit DBCache", "cache_dit", "cache-dit", _dbcache, "threshold", (0.08, 0.12, 0.24),
          _DBCACHE_OPTIONS),
    _peer("dbcache-taylorseer", "cache-dit DBCache + TaylorSeer", "cache_dit", "cache-dit", _dbcache_taylorseer,
          "threshold", (0.08, 0.12, 0.24),
          # bn=1: with no last block computed, cache-dit 1.5.3's TaylorSeer finds no text-stream state on SD3
          {**_DBCACHE_OPTIONS, "bn": PeerOption(1, "last blocks always computed", minimum=0),
           "order": PeerOption(1, "TaylorSeer order")}),
    _peer("deepcache-release", "DeepCache (authors' release)", "DeepCache", "DeepCache", _deepcache_release,
          "interval", (2, 3, 5), {"interval": PeerOption(3, "steps between full computations"),
                                  "branch": PeerOption(0, "skip branch", minimum=0)}, needs="unet"),
    _peer("tgate-release", "T-GATE (authors' release)", "tgate", "tgate", _tgate_release, "gate_step", (10, 20, 30),
          {"gate_step": PeerOption(10, "step after which cross-attention is cached"),
           "sp_interval": PeerOption(5, "self-attention computed every N-th step before the gate"),
           "fi_interval": PeerOption(1, "self-attention computed every N-th step after the gate"),
           "warm_up": PeerOption(2, "steps computed in full at the start", minimum=0)}, needs="unet"),
)}


def parse_peer(spec: str) -> list[PeerSetting]:
    """``name`` (its sweep), ``name:key=value,...`` (one setting) or ``all`` (every sweep)."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name == "all":
        if rest:
            raise ValueError("peer all takes no options")
        settings = []
        for peer in PEERS.values():
            peer.check_installed()
            settings += [PeerSetting(peer, dict(options)) for options in peer.sweep]
        return settings
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose one of: all, {', '.join(PEERS)}")
    peer = PEERS[name]
    peer.check_installed()
    if not rest.strip():
        return [PeerSetting(peer, dict(options)) for options in peer.sweep]
    options = {k: o.default for k, o in peer.options.items()}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if key not in peer.options:
            raise ValueError(f"peer {name}: unknown option {key!r}; allowed: {', '.join(peer.options)}")
        if not eq:
            raise ValueError(f"peer {name}: option {key!r} needs a value ({key}=...)")
        options[key] = peer.options[key].parse(key, name, value.strip())
    return [PeerSetting(peer, options)]
