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


def test_builtin_passes_its_call_options_everywhere(tmp_path: Path) -> None:
    """`--model digits-sd3` generates, calibrates and scores with its one T5 slot, as trained."""
    from fastdiff.cli import main
    from fastdiff.models import build_builtin, builtin_info
    from fastdiff.runner import GenerationRequest, call_kwargs, calibration_prompts

    info = builtin_info("digits-sd3")
    assert info.digits_task and info.call_options == DIGITS_SD3_CALL and info.guidance_scale == 1.5
    request = GenerationRequest(prompt=digit_prompt(4)).with_model_defaults("digits-sd3")
    pipe = build_builtin("digits-sd3")
    assert call_kwargs(pipe, request)["max_sequence_length"] == 1
    assert "max_sequence_length" not in call_kwargs(build_builtin("tiny-sd"), request)  # only where it is taken
    assert len(calibration_prompts("digits-sd3", request)) == 10
    out = tmp_path / "seven.png"
    assert main(["generate", "--model", "digits-sd3", "--steps", "4", "--out", str(out)]) == 0 and out.exists()


def build_builtin_flux():
    from fastdiff.models import build_builtin

    return build_builtin("tiny-flux")


def test_finetune_adapts_the_mmdit_to_its_exits() -> None:
    """The early-exit fine-tune on a flow-matching transformer: blocks a bucket drops get no gradient."""
    from fastdiff.caching import EarlyExit
    from fastdiff.caching.early_exit import finetune

    pipe = build_digits_sd3_pipeline(0)
    method = EarlyExit(schedule=[4])  # every bucket keeps 4 of the 6 blocks
    dropped = [p.detach().clone() for i in (4, 5) for p in pipe.transformer.transformer_blocks[i].parameters()]
    first = [p.detach().clone() for p in pipe.transformer.transformer_blocks[0].parameters()]
    images = torch.rand(6, 3, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    losses = finetune(pipe, method, images, [digit_prompt(d) for d in range(6)], steps=3, batch_size=4, lr=1e-3,
                      **DIGITS_SD3_CALL)
    assert len(losses) == 3 and all(np.isfinite(losses))
    after = [p for i in (4, 5) for p in pipe.transformer.transformer_blocks[i].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(dropped, after))
    assert any(not torch.equal(a, b) for a, b in zip(first, pipe.transformer.transformer_blocks[0].parameters()))
    assert not pipe.transformer.training
    with pytest.raises(TypeError, match="SD3-style"):
        finetune(build_builtin_flux(), method, images, ["x"] * 6)
