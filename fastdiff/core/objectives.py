"""The denoising losses the supported pipelines were trained with, for whatever trains them.

Training the digits models and fine-tuning a denoiser to its early exits are the same loss at
different noise levels, so the losses live here once; callers draw the noise levels. The text
models (pydoc-mdlm, sudoku-mdlm) share the masked diffusion loss and the optimiser step.
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


def masked_diffusion_loss(model: torch.nn.Module, batch: torch.Tensor, mask_id: int, generator: torch.Generator,
                          elbo: bool = True, min_t: float = 1e-3) -> torch.Tensor:
    """MDLM's negative ELBO per token for the linear schedule (masked cross-entropy weighted by
    1/t), with antithetic times t ≥ ``min_t``. ``elbo=False``: the plain mean cross-entropy of
    each sequence's masked tokens, which has the same minimiser but far less variance (the 1/t
    weight makes a few nearly clean sequences dominate a small batch); used for training."""
    size = batch.shape[0]
    offset = torch.rand((), generator=generator)
    t = ((offset + torch.arange(size) / size) % 1.0).clamp_min(min_t)
    masked = torch.rand(batch.shape, generator=generator) < t.unsqueeze(1)
    t, masked = t.to(batch.device), masked.to(batch.device)  # drawn on the CPU: the same draws on any device
    noisy = torch.where(masked, torch.full_like(batch, mask_id), batch)
    logits = model(noisy).logits.float()
    logits[..., mask_id] = float("-inf")  # the mask is never a prediction
    loss = F.cross_entropy(logits.transpose(1, 2), batch, reduction="none")
    if not elbo:  # each sequence's mean over its masked tokens: every noise level weighs the same
        return ((loss * masked).sum(1) / masked.sum(1).clamp_min(1)).mean()
    return (loss * masked / t.unsqueeze(1)).sum() / batch.numel()


def optimizer_step(parameters: Any, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   clip: float = 1.0) -> float:
    """Backward, clip the gradient norm of ``parameters``, step; the loss as a float for the log."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()
    return float(loss.detach())


class LossLog:
    """Logs the mean loss of every ``every`` steps and the seconds since ``started`` (a
    ``time.perf_counter`` reading; default: when the log is made)."""

    def __init__(self, log: Any, steps: int, every: int = 100, digits: int = 3, started: float | None = None) -> None:
        import time

        self.log, self.steps, self.every, self.digits = log, steps, every, digits
        self.clock = time.perf_counter
        self.started = self.clock() if started is None else started
        self.running: list[float] = []

    def add(self, step: int, loss: float) -> None:
        self.running.append(loss)
        if (step + 1) % self.every == 0:
            mean = sum(self.running) / len(self.running)
            self.log(f"step {step + 1}/{self.steps}: loss {mean:.{self.digits}f} "
                     f"({self.clock() - self.started:.0f} s)")
            self.running = []
