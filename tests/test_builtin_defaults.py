"""A built-in called with its defaults draws what it is asked: the digits models' default
prompt ("a handwritten digit seven") at the default seed, and each digit, as the built-in
digits classifier reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.models import builtin_info, load_pipeline
from fastdiff.models.digits import load_feature_network, parse_digit_prompt

DIGITS_MODELS = ["digits", "digits-sd3"]


@pytest.mark.parametrize("model", DIGITS_MODELS)
def test_default_generate_draws_the_default_prompt(model, tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "digit.png"
    assert main(["generate", "--model", model, "--out", str(out), "--no-flops"]) == 0
    pixels = torch.from_numpy(np.array(Image.open(out).convert("RGB"))).permute(2, 0, 1).unsqueeze(0)
    asked = parse_digit_prompt(builtin_info(model).example_prompt)
    assert asked == 7
    assert load_feature_network().classify(pixels).item() == asked


@pytest.mark.slow  # 20 images of each model; the default prompt above stays in the quick run
@pytest.mark.parametrize("model", DIGITS_MODELS)
def test_defaults_draw_each_digit(model):
    from fastdiff.models.train import generate_digits

    info = builtin_info(model)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    labels = [digit for digit in range(10) for _ in range(2)]
    images = generate_digits(pipe, labels, [seed for _ in range(10) for seed in (0, 1)],
                             num_inference_steps=info.num_inference_steps, guidance_scale=info.guidance_scale,
                             **info.call_options)
    read = load_feature_network().classify(images)
    assert (read == torch.tensor(labels)).sum() >= 18, read.tolist()
