"""The denoising losses the supported pipelines were trained with, for whatever trains them.

Training the digits models and fine-tuning a denoiser to its early exits are the same loss at
different noise levels, so the losses live here once; callers draw the noise levels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def noise_prediction_loss(unet: torch.nn.Module, scheduler: Any, clean: torch.Tensor, noise: torch.Tensor,
                          timesteps: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Stable Diffusion 1.x/2.x: noise added by the scheduler at integer ``timesteps``; the UNet
    predicts the noise, or the velocity where the scheduler is configured for it."""
    noisy = scheduler.add_noise(clean, noise, timesteps)
    target = (scheduler.get_velocity(clean, noise, timesteps)
              if scheduler.config.prediction_type == "v_prediction" else noise)
    prediction = unet(noisy, timesteps, text_embeds).sample
    return F.mse_loss(prediction.float(), target.float())


def velocity_loss(transformer: torch.nn.Module, clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                  text_embeds: torch.Tensor, pooled: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """SD3's rectified flow: the latent ``(1 - s)·x + s·noise`` at noise level ``s``, timestep
    ``num_train_timesteps·s``; the transformer predicts the velocity ``noise - x``."""
    s = sigmas.view(-1, 1, 1, 1)
    prediction = transformer(hidden_states=(1 - s) * clean + s * noise, encoder_hidden_states=text_embeds,
                             pooled_projections=pooled, timestep=sigmas * num_train_timesteps).sample
    return F.mse_loss(prediction.float(), (noise - clean).float())
