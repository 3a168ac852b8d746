"""Encoder–decoder block diffusion LMs (transformers' ``DiffusionGemmaForBlockDiffusion``).

DiffusionGemma writes a fixed-length canvas at a time. A causal encoder reads the prompt and every
finished canvas once, into a key/value cache; a bidirectional decoder denoises the current canvas
against that cache, fed back its own previous logits (self-conditioning). Its noise is uniform:
a canvas starts as random tokens, and there is no mask token. So the pipeline's block loop maps
onto it directly: one block = one canvas, the encoder cache is the exact "prefix cache", and any
scheduler with ``corruption="uniform"`` (or diffusers' uniform-state schedulers) drives the
decoder's steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BLOCK_DIFFUSION_TYPES = ("diffusion_gemma",)


def is_block_diffusion(model: torch.nn.Module) -> bool:
    return str(getattr(getattr(model, "config", None), "model_type", "")) in BLOCK_DIFFUSION_TYPES


class DiffusionGemmaAdapter:
    """Calls into a ``DiffusionGemmaForBlockDiffusion``: its encoder (extending the cache) and its
    decoder (one canvas against the cache)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.canvas_length = int(model.config.canvas_length)
        self.text_config = model.config.get_text_config(decoder=True)
        self.vocab_size = int(self.text_config.vocab_size)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.text_config)

    def encode(self, ids: torch.Tensor, attention: torch.Tensor, cache: Any) -> None:
        """Run the causal encoder over the tokens not yet in ``cache`` (``attention`` covers all of ``ids``)."""
        cached = cache.get_seq_length()
        positions = torch.arange(cached, ids.shape[1], device=ids.device).unsqueeze(0)
        self.model.model.encoder(input_ids=ids[:, cached:], attention_mask=attention, cache=cache,
                                 position_ids=positions)

    def decoder_mask(self, attention: torch.Tensor, cache: Any) -> Any:
        """The decoder's attention over the cached context (its padding) and the whole canvas."""
        batch = attention.shape[0]
        visible = torch.nn.functional.pad(attention.bool(), (0, self.canvas_length), value=True)
        return self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config, inputs_embeds=torch.empty((batch, self.canvas_length, 0), device=attention.device),
            cache=cache, decoder_attention_mask=visible)

    def decode(self, canvas: torch.Tensor, cache: Any, mask: Any, start: int,
               self_conditioning: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(start, start + canvas.shape[1], device=canvas.device).unsqueeze(0)
        return self.model(decoder_input_ids=canvas, cache=cache, self_conditioning_logits=self_conditioning,
                          decoder_attention_mask=mask, decoder_position_ids=positions).logits


def generate_blocks(adapter: DiffusionGemmaAdapter, schedule: Any, prompt_ids: torch.Tensor,
                    prompt_mask: torch.Tensor, steps_per_block: list[int], *,
                    generator: torch.Generator | None, eos: int | None, stop_at_eos: bool,
                    confidence_stop: float | None, on_step: Callable[[int, torch.Tensor, bool], None]) -> torch.Tensor:
    """Canvas after canvas: encode what is finished, denoise the next canvas with ``schedule``.

    The first canvas starts from ``schedule.initial_sample`` (``torch.randint`` on ``generator``, as
    transformers and diffusers draw it). A canvas is finished when the steps run out, when a
    committing scheduler has committed every position, or (``confidence_stop``) when a sequence's
    prediction is the same as at the previous step and its mean entropy is below the bar, which
    freezes it at its prediction (transformers' stable-and-confident rule). Samplers that
    re-decide every position each step leave noise in undecided places, so such a canvas ends as
    the prediction of its last step, as transformers' ``generate`` ends it.
    """
    batch, length = prompt_ids.shape[0], adapter.canvas_length
    device = prompt_ids.device
    blocks = len(steps_per_block)
    keeps = bool(schedule.config.get("keep_committed", True))  # diffusers' schedulers commit for good
    tracked = hasattr(type(schedule), "committed_positions")
    ids, attention = prompt_ids, prompt_mask
    cache = adapter.new_cache()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for b in range(blocks):
        adapter.encode(ids, attention, cache)
        mask = adapter.decoder_mask(attention, cache)
        schedule.set_timesteps(steps_per_block[b], device=device)
        if hasattr(type(schedule), "initial_sample"):
            canvas = schedule.initial_sample((batch, length), adapter.vocab_size, generator, device)
        else:  # diffusers' uniform-state schedulers: the random canvas their pipeline draws
            where = generator.device if generator is not None else device
            canvas = torch.randint(0, adapter.vocab_size, (batch, length), generator=generator, device=where).to(device)
        conditioning: torch.Tensor | None = None
        frozen = torch.zeros(batch, dtype=torch.bool, device=device)
        prediction = canvas
        previous = torch.full_like(canvas, -1)
        for i in range(steps_per_block[b]):
            logits = adapter.decode(canvas, cache, mask, ids.shape[1], conditioning).clone()
            out = schedule.step(logits, i, canvas, generator=generator)
            canvas = torch.where(frozen.unsqueeze(1), canvas, out.prev_sample)
            conditioning = out.pred_logits if conditioning is None else \
                torch.where(frozen.view(-1, 1, 1), conditioning, out.pred_logits)
            guess = out.pred_logits.argmax(-1)
            prediction = torch.where(frozen.unsqueeze(1), prediction, guess)
            on_step(b, canvas, True)
            if confidence_stop is not None:
                entropy = torch.distributions.Categorical(logits=out.pred_logits.float()).entropy().mean(-1)
                settle = ~frozen & (guess == previous).all(-1) & (entropy < confidence_stop)
                canvas = torch.where(settle.unsqueeze(1), guess, canvas)
                frozen |= settle
                previous = torch.where(frozen.unsqueeze(1), previous, guess)
                if bool(frozen.all()):
                    break
            committed = schedule.committed_positions if tracked else None
            if committed is not None and keeps and bool(committed.all()):
                break
        final = canvas if keeps else torch.where(frozen.unsqueeze(1), canvas, prediction)
        ids = torch.cat([ids, final], dim=1)
        attention = torch.nn.functional.pad(attention, (0, length), value=1)
        if stop_at_eos and eos is not None:
            finished |= (final == eos).any(-1)
            if bool(finished.all()) and b + 1 < blocks:
                ids = torch.cat([ids, torch.full((batch, length * (blocks - b - 1)), eos, device=device)], dim=1)
                break
    return ids[:, prompt_ids.shape[1]:]


def accept_past_key_values(model: torch.nn.Module) -> torch.nn.Module:
    """Let diffusers 0.42's ``DiffusionGemmaPipeline`` run on transformers 5.24.

    That pipeline calls the decoder's ``create_diffusion_decoder_attention_mask(past_key_values=…)``;
    transformers 5.24 names the argument ``cache`` (its ``forward`` methods still accept the old name,
    this static method does not). The model's decoder gets an instance attribute that forwards the
    old name; the class and every other model are untouched, and calling it again is harmless."""
    decoder = model.model.decoder
    builder = type(decoder).create_diffusion_decoder_attention_mask
    if getattr(decoder.__dict__.get("create_diffusion_decoder_attention_mask"), "_fastdiff", False):
        return model

    def create_diffusion_decoder_attention_mask(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return builder(*args, **kwargs)

    create_diffusion_decoder_attention_mask._fastdiff = True  # type: ignore[attr-defined]
    decoder.create_diffusion_decoder_attention_mask = create_diffusion_decoder_attention_mask
    return model
