"""One scheduler for discrete diffusion language models; each paper's sampler is a configuration.

The corruption is part of the configuration (:mod:`.corruption`): ``mask`` (absorbing state),
``uniform`` (every token alike) or ``hybrid`` (GIDD's mix of the two). A step sees the model's
logits for the canvas, the canvas itself, and which positions it may touch (``active``: the
current block, never the prompt). It decides *how many* undecided tokens to commit and *which*,
and what time comes next:

==================  ==================================================  ===========================
sampler             how many are committed                              which
==================  ==================================================  ===========================
``mdlm``            each masked token with prob (α_s − α_t)/(1 − α_t)   random (ancestral) — mask
``first-hitting``   exactly one; the time jumps to the next unmasking:  uniformly random — mask
                    1 − α_s = (1 − α_t)·u^(1/n), n masked tokens
``rdm``             α_s of the active tokens stay decoded; the rest     the lowest-scoring are
                    (decoded ones included) are masked again            masked again — mask
``low-confidence``  an even quota: ceil(undecided / steps left)         the most confident
``random``          the same quota                                      random
``margin``          the same quota                                      the largest top-1 − top-2
                                                                        probability margin
``threshold``       every one whose confidence exceeds ``threshold``    the most confident
                    (at least one); the step count adapts
``entropy-bound``   the lowest-entropy ones while their summed entropy  the lowest entropy
                    minus the largest stays ≤ ``entropy_bound``
``posterior``       every position draws the exact reverse step of the  all positions may change
                    corruption kernel: x̂_0, stay, or fresh noise
==================  ==================================================  ===========================

Under ``mask`` corruption a token is undecided while it is masked. Under ``uniform`` and
``hybrid`` corruption there is no mask to tell, so the scheduler remembers which positions it
committed since the first step of the schedule (``keep_committed``), as diffusers'
``BlockRefinementScheduler`` does, and draws fresh noise for the others every step (uniform noise
with ``torch.randint`` on the generator, as diffusers and transformers do). With
``keep_committed=False`` every position is decided afresh each step: DiffusionGemma's own
entropy-bounded sampler. ``editing_threshold`` lets a step also replace committed tokens the model
now predicts otherwise with at least that confidence (LLaDA2's token editing).

The timestep of :meth:`step` is a time in [0, 1] (a float, one per sequence), or a step index
(an ``int``, as diffusers' discrete pipelines pass it): index i of N is time 1 − i/N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .corruption import (
    CORRUPTIONS,
    check_corruption,
    draw_noise,
    routes,
    survival,
    transition,
)
from .noise_schedules import NOISE_SCHEDULES, time_of
from .sampling import SAMPLING, sample_tokens, uniform

SAMPLERS = ("mdlm", "first-hitting", "low-confidence", "random", "threshold", "rdm", "margin", "entropy-bound",
            "posterior")
ALIASES = {"ancestral": "mdlm", "fhs": "first-hitting", "llada": "low-confidence", "llada-random": "random",
           "fast-dllm": "threshold", "reparameterized": "rdm", "top-margin": "margin", "eb": "entropy-bound",
           "ddim": "posterior", "d3pm": "posterior", "udlm": "posterior"}
MASK_ONLY = ("mdlm", "first-hitting", "rdm")  # their rules are stated in masked tokens
ADAPTIVE = ("first-hitting", "threshold", "entropy-bound")  # the step count follows the tokens
GREEDY_BY_DEFAULT = ("low-confidence", "threshold", "margin")  # their papers decode at temperature 0
QUOTA = ("low-confidence", "random", "margin")


def sampler_name(name: str) -> str:
    """The canonical sampler name for a name or alias; a clear error otherwise."""
    canonical = ALIASES.get(name, name)
    if canonical not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS} (or an alias: {sorted(ALIASES)}), got {name!r}")
    return canonical


@dataclass
class DiscreteDiffusionSchedulerOutput(BaseOutput):
    """``prev_sample``: the canvas after the step; ``pred_original_sample``: the token the model
    proposes at every position (the canvas's own token where it is decoded); ``committed``:
    positions decided by this step (edited ones included); ``next_timestep``: per sequence, the
    time after the step; ``pred_logits``: the logits the tokens were drawn from (tempered where a
    temperature was applied), which DiffusionGemma feeds back as self-conditioning."""

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor
    committed: torch.BoolTensor
    next_timestep: torch.Tensor
    pred_logits: torch.Tensor | None = None


MaskedDiffusionSchedulerOutput = DiscreteDiffusionSchedulerOutput


class DiscreteDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Discrete diffusion sampling for text: masked, uniform or hybrid corruption, any sampler.

    Args:
        sampler: one of ``SAMPLERS`` (aliases: ``ALIASES``).
        corruption: ``mask``, ``uniform`` or ``hybrid`` (:mod:`.corruption`).
        noise_schedule: α(t) of ``mask`` and ``uniform``, by name: ``log-linear``, ``linear``,
            ``mdlm-cosine``, ``maskgit-cosine``.
        mask_token_id: the absorbing token (``mask``, ``hybrid``); the pipeline fills it in from the
            model or tokenizer. ``uniform`` corruption has none.
        threshold: ``threshold`` sampler's confidence bar, in (0, 1].
        entropy_bound: ``entropy-bound`` sampler's bound (nats, > 0).
        temperature: sampling temperature (0: argmax); ``None``: 0 for ``low-confidence``,
            ``margin`` and ``threshold`` (as their papers decode), 1 for the others.
        min_temperature: anneal the temperature linearly in time, from ``temperature`` at t = 1 to
            ``min_temperature`` at t = 0 (DiffusionGemma: 0.8 → 0.4).
        top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of mass p.
        sampling: ``gumbel`` (float64 Gumbel-max) or ``multinomial`` (``torch.multinomial`` on float32
            probabilities, as diffusers and transformers draw: the same generator, the same tokens).
        keep_committed: uniform/hybrid commit samplers: keep committed tokens until the schedule
            restarts (``False``: decide every position afresh each step).
        editing_threshold: also replace committed tokens the model predicts otherwise with at least
            this confidence (``None``: never).
        p_uniform, gamma: GIDD's uniform share of all tokens at t = ½ and its shape exponent (≤ 2).
        eps: α(1) of the log-linear and MDLM cosine schedules.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, sampler: str = "low-confidence", noise_schedule: str = "log-linear",
                 mask_token_id: int | None = None, threshold: float = 0.9, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eps: float = 1e-3, corruption: str = "mask",
                 entropy_bound: float = 0.1, min_temperature: float | None = None, sampling: str = "gumbel",
                 keep_committed: bool = True, editing_threshold: float | None = None, p_uniform: float = 0.1,
                 gamma: float = 1.0) -> None:
        canonical = sampler_name(sampler)
        if canonical != sampler:
            self.register_to_config(sampler=canonical)
        check_corruption(corruption)
        if corruption != "mask" and canonical in MASK_ONLY:
            allowed = [s for s in SAMPLERS if s not in MASK_ONLY]
            raise ValueError(f"sampler {canonical!r} is defined for corruption='mask' only (it counts masked tokens); "
                             f"with corruption={corruption!r} use one of {allowed}")
        if corruption == "uniform" and mask_token_id is not None:
            raise ValueError(f"mask_token_id={mask_token_id}: corruption='uniform' has no mask token (noise is a "
                             "random token); drop mask_token_id, or use corruption='mask' or 'hybrid'")
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if not entropy_bound > 0:
            raise ValueError(f"entropy_bound must be > 0 (nats), got {entropy_bound!r}")
        for name, value in (("temperature", temperature), ("min_temperature", min_temperature)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps!r}")
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        if editing_threshold is not None and not 0.0 <= editing_threshold <= 1.0:
            raise ValueError(f"editing_threshold must be in [0, 1] or None, got {editing_threshold!r}")
        if editing_threshold is not None and canonical == "posterior":
            raise ValueError("editing_threshold: the posterior sampler already redraws every position each step; "
                             "editing applies to the committing samplers")
        if not 0.0 < p_uniform < 1.0:
            raise ValueError(f"p_uniform must be in (0, 1), got {p_uniform!r}")
        if not 0 < gamma <= 2:
            raise ValueError(f"gamma must be in (0, 2], got {gamma!r} (beyond 2 the hybrid kernel's reverse step "
                             "would need negative jump rates: it is not a forward process)")
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.float64)
        self._committed: torch.Tensor | None = None

    # -- schedule ---------------------------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        """Whether the number of steps follows the tokens (first-hitting, threshold, entropy bound,
        under mask corruption; with uniform or hybrid noise they keep to the step grid and may
        only finish early)."""
        return self.config.sampler in ADAPTIVE and self.config.corruption == "mask"

    @property
    def uses_mask(self) -> bool:
        return self.config.corruption != "uniform"

    @property
    def temperature(self) -> float:
        if self.config.temperature is not None:
            return float(self.config.temperature)
        return 0.0 if self.config.sampler in GREEDY_BY_DEFAULT else 1.0

    def temperature_at(self, t: float) -> float:
        """The temperature at time ``t``: fixed, or annealed linearly to ``min_temperature`` at t = 0."""
        top, low = self.temperature, self.config.min_temperature
        return top if low is None else low + (top - low) * t

    def _schedule(self) -> dict[str, Any]:
        config = self.config
        return {"noise_schedule": config.noise_schedule, "eps": config.eps, "p_uniform": config.p_uniform,
                "gamma": config.gamma}

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Times 1 → 0 in ``num_inference_steps`` equal steps (for one block). Adaptive samplers
        take as many steps as their tokens need; for them this only sets the grid's first time."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64,
                                        device=device)[:-1]
        self._committed = None

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        return survival(self.config.corruption, torch.as_tensor(t), **self._schedule())

    def add_noise(self, original_samples: torch.LongTensor, timesteps: torch.Tensor | float,
                  generator: torch.Generator | None = None) -> torch.LongTensor:
        """Corrupt each token independently: kept with probability α(t), otherwise replaced by a
        draw from the kernel's noise (``timesteps``: one per sequence, or one for all)."""
        device = original_samples.device
        t = torch.as_tensor(timesteps, dtype=torch.float64, device=device)
        t = t.reshape(-1).expand(original_samples.shape[0]) if t.dim() else t.expand(original_samples.shape[0])
        keep = self.alpha(t.reshape(-1, 1)).to(device)
        draw = uniform(tuple(original_samples.shape), generator, device)
        vocab = self._vocab_for_noise(original_samples)
        noise = draw_noise(self.config.corruption, t, tuple(original_samples.shape), vocab,
                           self._mask_id() if self.uses_mask else None, generator, device, **self._schedule())
        return torch.where(draw < keep, original_samples, noise)

    def _vocab_for_noise(self, samples: torch.Tensor) -> int:
        vocab = getattr(self, "vocab_size", None)
        if vocab is None:
            if self.config.corruption == "mask":
                return 0
            raise ValueError("add_noise with uniform or hybrid corruption needs the vocabulary size: set "
                             "scheduler.vocab_size (the pipeline does) before calling it")
        return int(vocab)

    def initial_sample(self, shape: tuple[int, ...], vocab: int, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.LongTensor:
        """The fully corrupted canvas at t = 1: all masks (``mask``, and ``hybrid``, whose noise is
        all mask at t = 1), or uniformly random tokens (``uniform``)."""
        t = torch.ones(shape[0], dtype=torch.float64)
        return draw_noise(self.config.corruption, t, shape, vocab, self.config.mask_token_id if self.uses_mask else None,
                          generator, torch.device(device), **self._schedule())

    # -- one step ---------------------------------------------------------------------------
    def _times(self, timestep: Any, batch: int, device: torch.device) -> tuple[torch.Tensor, bool]:
        """(t per sequence, whether this is the schedule's first step) from a time or a step index."""
        assert self.num_inference_steps is not None
        steps = self.num_inference_steps
        integer = isinstance(timestep, int) and not isinstance(timestep, bool) or \
            isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()
        if integer:
            index = int(torch.as_tensor(timestep).reshape(-1)[0])
            t = torch.full((batch,), 1.0 - index / steps, dtype=torch.float64, device=device)
            return t, index == 0
        t = torch.as_tensor(timestep, dtype=torch.float64, device=device).reshape(-1).expand(batch).clone()
        return t, bool((t >= 1.0 - 1e-12).all())

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.LongTensor, *,
             active: torch.BoolTensor | None = None, generator: torch.Generator | None = None,
             unconditional_output: torch.Tensor | None = None, guidance_scale: float = 1.0,
             return_dict: bool = True) -> DiscreteDiffusionSchedulerOutput | tuple:
        """Decide tokens of ``sample`` (batch × length) from ``model_output`` (batch × length × vocab).

        ``unconditional_output`` with ``guidance_scale`` γ: classifier-free guidance. The
        ``posterior`` sampler guides the reverse step itself, p ∝ p_cond^γ·p_uncond^(1−γ) over the
        next token (UDLM's guidance for discrete diffusion); the others combine the logits,
        uncond + γ·(cond − uncond)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        if model_output.shape[:2] != sample.shape:
            raise ValueError(f"model_output must be (batch, length, vocab) for a sample of shape {tuple(sample.shape)}, "
                             f"got {tuple(model_output.shape)}")
        config = self.config
        mask_id = self._mask_id() if self.uses_mask else None
        device, batch = sample.device, sample.shape[0]
        active = torch.ones_like(sample, dtype=torch.bool) if active is None else active.to(device)
        t, first = self._times(timestep, batch, device)
        dt = 1.0 / self.num_inference_steps
        temperature = self.temperature_at(float(t.max()))
        sampler = config.sampler
        if unconditional_output is not None and sampler != "posterior":
            model_output = unconditional_output + guidance_scale * (model_output - unconditional_output)
        if sampler == "posterior":
            return self._posterior(model_output, unconditional_output, guidance_scale, t, dt, sample, active,
                                   temperature, generator, return_dict)
        logits = clean_logits_of(model_output, mask_id)
        source = logits.to(model_output.dtype) if config.sampling == "multinomial" else logits
        proposal, confidence = sample_tokens(source, temperature, generator, config.top_k, config.top_p,
                                             config.sampling)
        pred_logits = model_output / temperature if temperature > 0 else model_output

        if config.corruption == "mask":
            undecided = (sample == mask_id) & active
        else:
            if first or self._committed is None or self._committed.shape != sample.shape or not config.keep_committed:
                self._committed = torch.zeros_like(sample, dtype=torch.bool)
            undecided = active & ~self._committed.to(device)
        proposal = torch.where(undecided, proposal, sample)

        if sampler == "rdm":
            return self._finish(*self._rdm(logits, proposal, confidence, sample, undecided, active, t, dt),
                                pred_logits, return_dict)
        if sampler == "mdlm":
            s = (t - dt).clamp_min(0.0)
            a_t, a_s = self.alpha(t), self.alpha(s)
            chance = torch.where(s <= 0, torch.ones_like(a_t), (a_s - a_t) / (1.0 - a_t).clamp_min(1e-12))
            commit = undecided & (uniform(tuple(sample.shape), generator, device) < chance.unsqueeze(1))
            next_t = s
        elif sampler == "first-hitting":
            count = undecided.sum(1)
            pick = torch.where(undecided, uniform(tuple(sample.shape), generator, device), -1.0).argmax(1)
            commit = undecided & (torch.arange(sample.shape[1], device=device) == pick.unsqueeze(1))
            u = uniform((batch,), generator, device)
            a_t = self.alpha(t)
            a_s = 1.0 - (1.0 - a_t) * u ** (1.0 / count.clamp_min(1).double())
            next_t = torch.where(count > 1, time_of(config.noise_schedule, a_s, config.eps), torch.zeros_like(t))
        elif sampler in QUOTA:
            left = torch.clamp(torch.round(t / dt), min=1.0)
            quota = torch.ceil(undecided.sum(1).double() / left).long()
            if sampler == "low-confidence":
                score = confidence
            elif sampler == "margin":
                score = _margin(logits, config.top_k, config.top_p)
            else:
                score = uniform(tuple(sample.shape), generator, device)
            commit = _top(score, undecided, quota)
            next_t = (t - dt).clamp_min(0.0)
        else:  # threshold, entropy-bound: adaptive
            if sampler == "threshold":
                best = _top(confidence, undecided, undecided.any(1).long())
                commit = undecided & ((confidence > config.threshold) | best)
            else:
                source = pred_logits.double() if temperature > 0 else logits.clone()  # what is drawn from
                if mask_id is not None and mask_id < source.shape[-1]:
                    source[..., mask_id] = float("-inf")
                commit = _entropy_bounded(source, undecided, config.entropy_bound)
            if config.corruption == "mask":
                left = (undecided & ~commit).sum(1).double() / active.sum(1).clamp_min(1).double()
                next_t = time_of(config.noise_schedule, 1.0 - left, config.eps)
            else:
                next_t = (t - dt).clamp_min(0.0)
        if config.corruption != "mask" and config.keep_committed:
            commit = commit | (undecided & (next_t <= 0).unsqueeze(1))  # the schedule ends decided
        prev = torch.where(commit, proposal, sample)
        if config.editing_threshold is not None:
            edited = self._edits(logits, sample, active & ~undecided)
            prev = torch.where(edited, torch.argmax(logits, -1), prev)
            commit = commit | edited
        if config.corruption != "mask":
            still = undecided & ~commit
            noise = draw_noise(config.corruption, next_t, tuple(sample.shape), model_output.shape[-1], mask_id,
                               generator, device, **self._schedule())
            prev = torch.where(still, noise, prev)
            self._committed = self._committed | commit  # type: ignore[operator]
        return self._finish(prev, proposal, commit, next_t, pred_logits, return_dict)

    @property
    def committed_positions(self) -> torch.Tensor | None:
        """Uniform/hybrid commit samplers: the positions committed since the schedule started
        (``None`` before the first step); the pipeline ends a block early once all are."""
        return self._committed

    def _edits(self, logits: torch.Tensor, sample: torch.Tensor, decided: torch.Tensor) -> torch.Tensor:
        """Decided tokens the model now predicts otherwise, with at least ``editing_threshold``."""
        probs = torch.softmax(logits, -1)
        best, token = probs.max(-1)
        return decided & (token != sample) & (best >= self.config.editing_threshold)

    def _posterior(self, model_output: torch.Tensor, unconditional: torch.Tensor | None, guidance: float,
                   t: torch.Tensor, dt: float, sample: torch.Tensor, active: torch.Tensor, temperature: float,
                   generator: torch.Generator | None, return_dict: bool) -> DiscreteDiffusionSchedulerOutput | tuple:
        """The exact reverse step of the corruption kernel, for every active position."""
        config = self.config
        kind, vocab = config.corruption, model_output.shape[-1]
        mask_id = self._mask_id() if self.uses_mask else None
        s = (t - dt).clamp_min(0.0)
        device = sample.device
        pred_logits = model_output / temperature if temperature > 0 else model_output
        if mask_id is not None:
            open_ = active & (sample == mask_id) if kind == "mask" else active
        else:
            open_ = active
        if unconditional is None:
            clean_logits = clean_logits_of(model_output, mask_id)
            source = clean_logits.to(model_output.dtype) if config.sampling == "multinomial" else clean_logits
            guess, _ = sample_tokens(source, temperature, generator, config.top_k, config.top_p, config.sampling)
            if kind == "mask":
                guess = torch.where(sample == mask_id, guess, sample)  # decoded tokens carry over
            weights = routes(kind, t, s, sample, guess, vocab, mask_id, **self._schedule())
            flat = weights.reshape(-1, 3)
            if config.sampling == "multinomial":
                where = generator.device if generator is not None else device
                route = torch.multinomial(flat.float().to(where), 1, generator=generator).to(device).view_as(sample)
            else:
                draw = uniform((flat.shape[0], 1), generator, device)
                route = (flat.cumsum(-1) < draw).sum(-1).clamp_max(2).view_as(sample)
            noise = draw_noise(kind, s, tuple(sample.shape), vocab, mask_id, generator, device, **self._schedule())
            prev = torch.where(route == 0, guess, torch.where(route == 2, noise, sample))
        else:
            def step_distribution(out: torch.Tensor) -> torch.Tensor:
                scaled = out.double() / (temperature if temperature > 0 else 1.0)
                if mask_id is not None and mask_id < vocab:
                    scaled[..., mask_id] = float("-inf")
                return transition(kind, t, s, sample, torch.softmax(scaled, -1), mask_id, **self._schedule())

            mixed = guidance * torch.log(step_distribution(model_output).clamp_min(1e-300)) + \
                (1.0 - guidance) * torch.log(step_distribution(unconditional).clamp_min(1e-300))
            if temperature > 0:
                prev, _ = sample_tokens(mixed, 1.0, generator, sampling=config.sampling)
            else:  # the most likely next token of the guided step
                prev = mixed.argmax(-1)
            guess = torch.argmax(clean_logits_of(model_output, mask_id), -1)
        prev = torch.where(open_, prev, sample)
        committed = open_ & (prev != sample) & (prev != (mask_id if mask_id is not None else -1))
        return self._finish(prev, torch.where(open_, guess, sample), committed, s, pred_logits, return_dict)

    def _rdm(self, logits: torch.Tensor, proposal: torch.Tensor, confidence: torch.Tensor, sample: torch.Tensor,
             masked: torch.Tensor, active: torch.Tensor, t: torch.Tensor, dt: float) -> tuple:
        """Keep the α_s share of active tokens with the best scores decoded, mask the rest again."""
        s = (t - dt).clamp_min(0.0)
        keep_count = torch.round(self.alpha(s) * active.sum(1).double()).long()
        keep_count = torch.where(s <= 0, active.sum(1), keep_count)
        own = torch.log_softmax(logits, dim=-1).gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
        score = torch.where(masked, torch.log(confidence.clamp_min(1e-300)), own.clamp_min(-1e300))  # finite
        keep = _top(score, active, keep_count)
        prev = torch.where(active, torch.where(keep, proposal, torch.full_like(sample, self._mask_id())), sample)
        return prev, proposal, masked & keep, s

    def _finish(self, prev: torch.Tensor, proposal: torch.Tensor, commit: torch.Tensor, next_t: torch.Tensor,
                pred_logits: torch.Tensor | None, return_dict: bool) -> DiscreteDiffusionSchedulerOutput | tuple:
        if not return_dict:
            return prev, proposal, commit, next_t, pred_logits
        return DiscreteDiffusionSchedulerOutput(prev, proposal, commit, next_t, pred_logits)

    def _mask_id(self) -> int:
        if self.config.mask_token_id is None:
            raise ValueError(f"{type(self).__name__}: mask_token_id is not set (corruption={self.config.corruption!r} "
                             "needs one); pass mask_token_id= or load it through MaskedDiffusionLMPipeline, which "
                             "takes it from the model or tokenizer")
        return int(self.config.mask_token_id)

    def __len__(self) -> int:
        return self.num_inference_steps or 0


class MaskedDiffusionScheduler(DiscreteDiffusionScheduler):
    """The same scheduler under the name it had before it covered uniform and hybrid corruption
    (saved configs and code that name it keep working)."""


def clean_logits_of(output: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """Float64 logits in which the mask is never a prediction."""
    logits = output.double()
    if mask_id is not None and mask_id < logits.shape[-1]:
        logits[..., mask_id] = float("-inf")
    return logits


def _margin(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-1 minus top-2 probability (Kim et al. 2025): small where the model hesitates between two."""
    from .sampling import filter_logits

    probs = torch.softmax(filter_logits(logits, top_k, top_p), -1)
    two = torch.topk(probs, 2, dim=-1).values
    return two[..., 0] - two[..., 1]


def _entropy_bounded(logits: torch.Tensor, undecided: torch.Tensor, bound: float) -> torch.Tensor:
    """The EB-sampler's set: undecided positions by rising entropy, accepted while the sum of the
    accepted entropies minus the largest of them stays ≤ ``bound`` (the first always is)."""
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    ranked = torch.where(undecided, entropy, float("inf"))
    ordered, index = torch.sort(ranked, dim=-1, stable=True)
    finite = torch.isfinite(ordered)
    running = torch.where(finite, ordered, 0.0).cumsum(-1)
    accept = finite & (running - torch.where(finite, ordered, 0.0) <= bound)
    return torch.zeros_like(undecided).scatter(-1, index, accept) & undecided


def _top(score: torch.Tensor, allowed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row, the ``count`` allowed positions with the highest score (ties: the leftmost)."""
    most = int(count.max()) if count.numel() else 0
    chosen = torch.zeros_like(allowed)
    if most <= 0:
        return chosen
    ranked = torch.where(allowed, score.double(), float("-inf"))
    values, index = torch.sort(ranked, dim=1, descending=True, stable=True)  # stable: ties go left to right
    values, index = values[:, :most], index[:, :most]
    take = (torch.arange(index.shape[1], device=score.device) < count.unsqueeze(1)) & (values > float("-inf"))
    return chosen.scatter(1, index, take) & allowed


__all__ = ["ALIASES", "CORRUPTIONS", "SAMPLERS", "DiscreteDiffusionScheduler", "DiscreteDiffusionSchedulerOutput",
           "MaskedDiffusionScheduler", "MaskedDiffusionSchedulerOutput", "sampler_name"]
