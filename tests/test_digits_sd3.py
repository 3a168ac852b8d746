"""The digits task on SD3's pipeline: architecture, a short training run, save and reload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from fastdiff.anatomy import anatomy_of
from fastdiff.models.digits import DIGITS_IMAGE_SIZE, digit_prompt
from fastdiff.models.digits_mmdit import (DIGITS_SD3_CALL, TEXT_TOKENS, build_digits_sd3_pipeline,
                                         load_digits_sd3_pipeline)
from fastdiff.models.train import train_digits_sd3


def _images(pipe) -> np.ndarray:
    return pipe(prompt=[digit_prompt(7)], height=DIGITS_IMAGE_SIZE, width=DIGITS_IMAGE_SIZE, num_inference_steps=3,
                guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np", **DIGITS_SD3_CALL).images


def test_architecture_is_sd3_over_the_digits_latent() -> None:
    pipe = build_digits_sd3_pipeline(0)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.text_encoder_3 is None and pipe.tokenizer.model_max_length == TEXT_TOKENS
    anatomy = anatomy_of(pipe.transformer)
    assert anatomy.family == "sd3" and len(anatomy.blocks) == 6
    assert pipe.transformer.config.patch_size == 2  # 16 image tokens over the 8x8 latent
    # the text sequence: CLIP's tokens, then zeros standing for T5's (max_sequence_length of them)
    embeds, _, pooled, _ = pipe.encode_prompt(digit_prompt(3), None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=16)
    assert embeds.shape == (1, TEXT_TOKENS + 16, pipe.transformer.config.joint_attention_dim)
    assert not embeds[:, TEXT_TOKENS:].any()
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    assert _images(pipe).shape == (1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 3)


def test_training_moves_the_weights_and_round_trips(tmp_path: Path) -> None:
    start = build_digits_sd3_pipeline(0).transformer.state_dict()
    trained = train_digits_sd3(tmp_path / "digits-sd3", steps=2, batch_size=8)
    moved = [name for name, value in trained.transformer.state_dict().items() if not torch.equal(value, start[name])]
    assert moved
    loaded = load_digits_sd3_pipeline(tmp_path / "digits-sd3")
    assert type(loaded) is StableDiffusion3Pipeline and loaded.vae.config.shift_factor == 0.0
    assert np.abs(_images(loaded) - _images(trained)).max() < 1e-5


def test_missing_weights_say_how_to_train(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"python -m fastdiff.models.train digits-sd3 --out"):
        load_digits_sd3_pipeline(tmp_path)


def test_shipped_weights_draw_the_prompted_digits() -> None:
    from fastdiff.models.digits import load_feature_network
    from fastdiff.models.digits_mmdit import DIGITS_SD3_GUIDANCE_SCALE

    pipe = load_digits_sd3_pipeline()
    images = pipe(prompt=[digit_prompt(d) for d in range(10)], height=DIGITS_IMAGE_SIZE, width=DIGITS_IMAGE_SIZE,
                  num_inference_steps=20, guidance_scale=DIGITS_SD3_GUIDANCE_SCALE,
                  generator=[torch.Generator().manual_seed(d) for d in range(10)], output_type="pt",
                  **DIGITS_SD3_CALL).images
    recognised = load_feature_network().classify(images)
    assert (recognised == torch.arange(10)).sum() >= 9
