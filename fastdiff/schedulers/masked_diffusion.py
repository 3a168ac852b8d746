"""One scheduler for masked diffusion language models; each paper's sampler is a configuration.

A step sees the model's logits for the whole canvas, the canvas itself, and which positions it
may touch (``active``: the current block, never the prompt). It decides *how many* masked
tokens to commit and *which*, and what time comes next:

=================  ===================================================  ========================
sampler            how many are committed                               which
=================  ===================================================  ========================
``mdlm``           each masked token with prob (α_s − α_t)/(1 − α_t)    random (ancestral)
``first-hitting``  exactly one; the time jumps to the next unmasking:   uniformly random
                   1 − α_s = (1 − α_t)·u^(1/n), n masked tokens
``low-confidence`` an even quota: ceil(masked / steps left)             the most confident
``random``         the same quota                                       random
``threshold``      every one whose confidence exceeds ``threshold``     the most confident
                   (at least one); the step count adapts
``rdm``            α_s of the active tokens stay decoded; the rest      the lowest-scoring are
                   (decoded ones included) are masked again             masked again
=================  ===================================================  ========================

Block / semi-autoregressive decoding is the pipeline's loop around any of them (one block of
``active`` positions at a time, ``set_timesteps`` per block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .noise_schedules import NOISE_SCHEDULES, alpha, time_of
from .sampling import sample_tokens, uniform

SAMPLERS = ("mdlm", "first-hitting", "low-confidence", "random", "threshold", "rdm")
ALIASES = {"ancestral": "mdlm", "fhs": "first-hitting", "llada": "low-confidence", "llada-random": "random",
           "fast-dllm": "threshold", "reparameterized": "rdm"}
ADAPTIVE = ("first-hitting", "threshold")  # the step count follows the tokens, not set_timesteps
GREEDY_BY_DEFAULT = ("low-confidence", "threshold")  # their papers decode at temperature 0


def sampler_name(name: str) -> str:
    """The canonical sampler name for a name or alias; a clear error otherwise."""
    canonical = ALIASES.get(name, name)
    if canonical not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS} (or an alias: {sorted(ALIASES)}), got {name!r}")
    return canonical


@dataclass
class MaskedDiffusionSchedulerOutput(BaseOutput):
    """``prev_sample``: the canvas after the step; ``pred_original_sample``: the token the model
    proposes at every position (the canvas's own token where it is decoded); ``committed``:
    positions unmasked by this step; ``next_timestep``: per sequence, the time after the step."""

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor
    committed: torch.BoolTensor
    next_timestep: torch.Tensor


class MaskedDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Masked (absorbing-state) diffusion sampling for text.

    Args:
        sampler: one of ``SAMPLERS`` (aliases: ``ancestral``, ``fhs``, ``llada``,
            ``llada-random``, ``fast-dllm``, ``reparameterized``).
        noise_schedule: α(t), by name: ``log-linear``, ``linear``, ``mdlm-cosine``, ``maskgit-cosine``.
        mask_token_id: the absorbing token; the pipeline fills it in from the model or tokenizer.
        threshold: ``threshold`` sampler's confidence bar, in (0, 1].
        temperature: sampling temperature (0: argmax); ``None``: 0 for ``low-confidence`` and
            ``threshold`` (as their papers decode), 1 for the others.
        top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of mass p.
        eps: α(1) of the log-linear and MDLM cosine schedules.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, sampler: str = "low-confidence", noise_schedule: str = "log-linear",
                 mask_token_id: int | None = None, threshold: float = 0.9, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eps: float = 1e-3) -> None:
        canonical = sampler_name(sampler)
        if canonical != sampler:
            self.register_to_config(sampler=canonical)
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps!r}")
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.float64)

    # -- schedule ---------------------------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        """Whether the number of steps follows the tokens (first-hitting, threshold)."""
        return self.config.sampler in ADAPTIVE

    @property
    def temperature(self) -> float:
        if self.config.temperature is not None:
            return float(self.config.temperature)
        return 0.0 if self.config.sampler in GREEDY_BY_DEFAULT else 1.0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Times 1 → 0 in ``num_inference_steps`` equal steps (for one block). Adaptive samplers
        take as many steps as their tokens need; for them this only sets the grid's first time."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64,
                                        device=device)[:-1]

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        return alpha(self.config.noise_schedule, torch.as_tensor(t), self.config.eps)

    def add_noise(self, original_samples: torch.LongTensor, timesteps: torch.Tensor | float,
                  generator: torch.Generator | None = None) -> torch.LongTensor:
        """Mask each token independently with probability 1 − α(t) (``timesteps`` per sequence or one)."""
        mask_id = self._mask_id()
        t = torch.as_tensor(timesteps, dtype=torch.float64, device=original_samples.device)
        keep = self.alpha(t.reshape(-1, 1) if t.dim() else t).to(original_samples.device)
        draw = uniform(tuple(original_samples.shape), generator, original_samples.device)
        return torch.where(draw < keep, original_samples, torch.full_like(original_samples, mask_id))

    # -- one step ---------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.LongTensor, *,
             active: torch.BoolTensor | None = None, generator: torch.Generator | None = None,
             return_dict: bool = True) -> MaskedDiffusionSchedulerOutput | tuple:
        """Commit tokens of ``sample`` (batch × length) from ``model_output`` (batch × length × vocab)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        if model_output.shape[:2] != sample.shape:
            raise ValueError(f"model_output must be (batch, length, vocab) for a sample of shape {tuple(sample.shape)}, "
                             f"got {tuple(model_output.shape)}")
        config, mask_id = self.config, self._mask_id()
        device, batch = sample.device, sample.shape[0]
        active = torch.ones_like(sample, dtype=torch.bool) if active is None else active.to(device)
        masked = (sample == mask_id) & active
        t = torch.as_tensor(timestep, dtype=torch.float64, device=device).reshape(-1).expand(batch).clone()
        logits = model_output.double()
        if mask_id < logits.shape[-1]:
            logits[..., mask_id] = float("-inf")  # the absorbing token is never a prediction
        proposal, confidence = sample_tokens(logits, self.temperature, generator, config.top_k, config.top_p)
        proposal = torch.where(masked, proposal, sample)
        dt = 1.0 / self.num_inference_steps
        sampler = config.sampler

        if sampler == "rdm":
            return self._finish(*self._rdm(logits, proposal, confidence, sample, masked, active, t, dt), return_dict)
        if sampler == "mdlm":
            s = (t - dt).clamp_min(0.0)
            a_t, a_s = self.alpha(t), self.alpha(s)
            chance = torch.where(s <= 0, torch.ones_like(a_t), (a_s - a_t) / (1.0 - a_t).clamp_min(1e-12))
            commit = masked & (uniform(tuple(sample.shape), generator, device) < chance.unsqueeze(1))
            next_t = s
        elif sampler == "first-hitting":
            count = masked.sum(1)
            pick = torch.where(masked, uniform(tuple(sample.shape), generator, device), -1.0).argmax(1)
            commit = masked & (torch.arange(sample.shape[1], device=device) == pick.unsqueeze(1))
            u = uniform((batch,), generator, device)
            a_t = self.alpha(t)
            a_s = 1.0 - (1.0 - a_t) * u ** (1.0 / count.clamp_min(1).double())
            next_t = torch.where(count > 1, time_of(config.noise_schedule, a_s, config.eps), torch.zeros_like(t))
        elif sampler in ("low-confidence", "random"):
            left = torch.clamp(torch.round(t / dt), min=1.0)
            quota = torch.ceil(masked.sum(1).double() / left).long()
            score = confidence if sampler == "low-confidence" else uniform(tuple(sample.shape), generator, device)
            commit = _top(score, masked, quota)
            next_t = (t - dt).clamp_min(0.0)
        else:  # threshold
            best = _top(confidence, masked, masked.any(1).long())
            commit = masked & ((confidence > config.threshold) | best)
            left = (masked & ~commit).sum(1).double() / active.sum(1).clamp_min(1).double()
            next_t = time_of(config.noise_schedule, 1.0 - left, config.eps)
        prev = torch.where(commit, proposal, sample)
        return self._finish(prev, proposal, commit, next_t, return_dict)

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
                return_dict: bool) -> MaskedDiffusionSchedulerOutput | tuple:
        if not return_dict:
            return prev, proposal, commit, next_t
        return MaskedDiffusionSchedulerOutput(prev, proposal, commit, next_t)

    def _mask_id(self) -> int:
        if self.config.mask_token_id is None:
            raise ValueError("MaskedDiffusionScheduler: mask_token_id is not set; pass mask_token_id= or load it "
                             "through MaskedDiffusionLMPipeline, which takes it from the model or tokenizer")
        return int(self.config.mask_token_id)

    def __len__(self) -> int:
        return self.num_inference_steps or 0


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
