"""Adapting a denoiser to its exit schedule, as the early-exiting paper does (optional).

Training-free exits work where the dropped blocks changed little; a short fine-tune teaches the
kept blocks to do the dropped ones' share at the timesteps where they are dropped. Each batch
draws one timestep bucket, samples timesteps inside it, runs the denoiser exited at that
bucket's depth and takes the usual denoising loss. Blocks dropped in a bucket get no gradient
from it; the full network at the low-noise buckets keeps training on the full depth.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..core.objectives import noise_prediction_loss, velocity_loss
from .exit_ladder import exit_ladder, exiting

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from .early_exit import EarlyExit


@torch.no_grad()
def _latents(pipe: DiffusionPipeline, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Training latents as the pipeline's denoiser sees them (SD3/Flux VAEs also shift)."""
    vae = pipe.vae
    device, dtype = vae.device, vae.dtype
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    parts = []
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk].to(device=device, dtype=dtype) * 2 - 1
        parts.append((vae.encode(batch).latent_dist.mode() - shift) * vae.config.scaling_factor)
    return torch.cat(parts)


class _Objective:
    """The denoising loss the pipeline's denoiser was trained with, at timesteps of one bucket.

    UNet pipelines (SD 1.x/2.x): noise or velocity prediction at integer timesteps, added by
    the scheduler. Flow-matching transformers (SD3): ``(1 - s)·x + s·noise`` at noise level ``s``,
    timestep ``1000·s``, the velocity ``noise - x`` as target.
    """

    def __init__(self, pipe: DiffusionPipeline, denoiser: torch.nn.Module, flow: bool, vocabulary: list[str],
                 prompt_options: dict) -> None:
        self.pipe = pipe
        self.flow = flow
        self.denoiser = denoiser
        self.total = int(pipe.scheduler.config.num_train_timesteps)
        device = self.denoiser.device
        with torch.no_grad():
            if self.flow:
                embeds, _, pooled, _ = pipe.encode_prompt(vocabulary, None, None, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False, **prompt_options)
                self.embeds, self.pooled = embeds, pooled
            else:
                self.embeds, _ = pipe.encode_prompt(vocabulary, device, 1, do_classifier_free_guidance=False,
                                                    **prompt_options)

    def loss(self, clean: torch.Tensor, noise: torch.Tensor, ids: torch.Tensor, low: int, high: int,
             generator: torch.Generator) -> torch.Tensor:
        device = self.denoiser.device
        batch = len(clean)
        clean, noise, ids = clean.to(device), noise.to(device), ids.to(device)
        if self.flow:
            sigmas = (low + (high - low) * torch.rand(batch, generator=generator)) / self.total
            return velocity_loss(self.denoiser, clean, noise, sigmas.to(device), self.embeds[ids], self.pooled[ids],
                                 self.total)
        timesteps = torch.randint(low, high, (batch,), generator=generator).to(device)
        return noise_prediction_loss(self.denoiser, self.pipe.scheduler, clean, noise, timesteps, self.embeds[ids])


def finetune(
    pipe: DiffusionPipeline,
    method: EarlyExit,
    images: torch.Tensor,
    prompts: Sequence[str],
    *,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 1e-4,
    prompt_dropout: float = 0.1,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    **prompt_options: object,
) -> list[float]:
    """Fine-tune ``pipe``'s denoiser, in place, to the exits ``method`` takes; returns the losses.

    Args:
        images: training images, ``(N, C, H, W)`` in ``[0, 1]`` at the pipeline's resolution.
        prompts: one prompt per image; ``prompt_dropout`` of them become ``""`` (what guidance's
            unconditional half sees).
        prompt_options: passed to ``encode_prompt`` (digits-sd3: ``max_sequence_length=1``).
    For text-to-image pipelines with a VAE and ``encode_prompt``: Stable Diffusion 1.x/2.x
    (UNet) and SD3-style flow-matching transformers. The text encoders stay frozen.
    """
    transformer = getattr(pipe, "transformer", None)
    # SD3-style: flow matching, a transformer conditioned on pooled text, SD3's three-encoder prompt
    # encoding (Flux and Wan encode and condition otherwise)
    flow = transformer is not None and "FlowMatch" in type(getattr(pipe, "scheduler", None)).__name__ \
        and "pooled_projections" in inspect.signature(transformer.forward).parameters \
        and "prompt_3" in inspect.signature(pipe.encode_prompt).parameters
    denoiser = transformer if flow else getattr(pipe, "unet", None)
    if denoiser is None or not hasattr(pipe, "encode_prompt") or getattr(pipe, "vae", None) is None:
        raise TypeError(
            f"finetune: supports Stable Diffusion 1.x/2.x-style (unet) and SD3-style (flow-matching transformer "
            f"with pooled text) pipelines; got {type(pipe).__name__}"
        )
    if images.dim() != 4 or len(images) != len(prompts):
        raise ValueError(
            f"images/prompts: expected (N, C, H, W) images and N prompts, got {tuple(images.shape)} and {len(prompts)}"
        )
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"finetune: {name} must be an integer >= 1, got {value!r}")
    ladder = exit_ladder(denoiser)
    depths = method.depths(denoiser, ladder)
    total = int(pipe.scheduler.config.num_train_timesteps)
    generator = torch.Generator().manual_seed(seed)

    latents = _latents(pipe, images)
    vocabulary = sorted(set(prompts) | {""})
    index = {p: i for i, p in enumerate(vocabulary)}
    labels = torch.tensor([index[p] for p in prompts])
    objective = _Objective(pipe, denoiser, flow, vocabulary, dict(prompt_options))
    empty = index[""]

    frozen = [p for p in denoiser.parameters() if not p.requires_grad]
    if len(frozen) == len(list(denoiser.parameters())):  # a frozen model: train all of it, then freeze it again
        denoiser.requires_grad_(True)
    else:
        frozen = []
    parameters = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    was_training = denoiser.training
    denoiser.train()
    try:
        for step in range(steps):
            bucket = int(torch.randint(0, len(depths), (1,), generator=generator))
            low = bucket * total // len(depths)
            high = max((bucket + 1) * total // len(depths), low + 1)
            rows = torch.randint(0, len(latents), (batch_size,), generator=generator)
            ids = labels[rows].clone()
            ids[torch.rand(batch_size, generator=generator) < prompt_dropout] = empty
            noise = torch.randn(latents[rows].shape, generator=generator)
            with exiting(denoiser, depths[bucket], ladder):
                loss = objective.loss(latents[rows], noise, ids, low, high, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if log is not None and (step % 50 == 0 or step == steps - 1):
                log(f"finetune step {step}: bucket {bucket} keeps {depths[bucket]}/{ladder.depth}, loss {losses[-1]:.4f}")
    finally:
        denoiser.train(was_training)
        for parameter in frozen:
            parameter.requires_grad_(False)
    return losses
