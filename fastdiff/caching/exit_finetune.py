"""Adapting a denoiser to its exit schedule, as the early-exiting paper does (optional).

Training-free exits work where the dropped blocks changed little; a short fine-tune teaches the
kept blocks to do the dropped ones' share at the timesteps where they are dropped. Each batch
draws one timestep bucket, samples timesteps inside it, runs the denoiser exited at that
bucket's depth and takes the usual denoising loss. Blocks dropped in a bucket get no gradient
from it; the full network at the low-noise buckets keeps training on the full depth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .exit_ladder import exit_ladder, exiting

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from .early_exit import EarlyExit


@torch.no_grad()
def _latents(pipe: DiffusionPipeline, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    vae = pipe.vae
    device, dtype = vae.device, vae.dtype
    parts = []
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk].to(device=device, dtype=dtype) * 2 - 1
        parts.append(vae.encode(batch).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(parts)


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
) -> list[float]:
    """Fine-tune ``pipe``'s UNet, in place, to the exits ``method`` takes; returns the losses.

    Args:
        images: training images, ``(N, C, H, W)`` in ``[0, 1]`` at the pipeline's resolution.
        prompts: one prompt per image; ``prompt_dropout`` of them become ``""`` (what guidance's
            unconditional half sees).
    For text-to-image pipelines with a VAE and ``encode_prompt`` (Stable Diffusion 1.x/2.x).
    """
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(pipe, "encode_prompt") or getattr(pipe, "vae", None) is None:
        raise TypeError(
            f"finetune: supports Stable Diffusion-style pipelines (unet, vae, encode_prompt); got {type(pipe).__name__}"
        )
    if images.dim() != 4 or len(images) != len(prompts):
        raise ValueError(
            f"images/prompts: expected (N, C, H, W) images and N prompts, got {tuple(images.shape)} and {len(prompts)}"
        )
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"finetune: {name} must be an integer >= 1, got {value!r}")
    ladder = exit_ladder(unet)
    depths = method.depths(unet, ladder)
    scheduler = pipe.scheduler
    total = int(scheduler.config.num_train_timesteps)
    device = unet.device
    generator = torch.Generator().manual_seed(seed)

    latents = _latents(pipe, images)
    vocabulary = sorted(set(prompts) | {""})
    index = {p: i for i, p in enumerate(vocabulary)}
    labels = torch.tensor([index[p] for p in prompts])
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(vocabulary, device, 1, do_classifier_free_guidance=False)
    empty = index[""]

    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    was_training = unet.training
    unet.train()
    try:
        for step in range(steps):
            bucket = int(torch.randint(0, len(depths), (1,), generator=generator))
            low = bucket * total // len(depths)
            high = max((bucket + 1) * total // len(depths), low + 1)
            rows = torch.randint(0, len(latents), (batch_size,), generator=generator)
            ids = labels[rows].clone()
            ids[torch.rand(batch_size, generator=generator) < prompt_dropout] = empty
            noise = torch.randn(latents[rows].shape, generator=generator).to(device)
            timesteps = torch.randint(low, high, (batch_size,), generator=generator).to(device)
            clean = latents[rows].to(device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            target = (scheduler.get_velocity(clean, noise, timesteps)
                      if scheduler.config.prediction_type == "v_prediction" else noise)
            with exiting(unet, depths[bucket], ladder):
                prediction = unet(noisy, timesteps, embeds[ids.to(device)]).sample
            loss = F.mse_loss(prediction.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if log is not None and (step % 50 == 0 or step == steps - 1):
                log(f"finetune step {step}: bucket {bucket} keeps {depths[bucket]}/{ladder.depth}, loss {losses[-1]:.4f}")
    finally:
        unet.train(was_training)
    return losses
