"""Every method in half precision, against the same-dtype vanilla.

Set to reuse nothing, each method gives the same-dtype vanilla's output bit for bit; set to
reuse, it stays close. Forecasts combine half-precision outputs in float32
(``core.forecast.combine``). Both half types run on CPU with torch 2.13 (diffusers warns that
fp16 on CPU may fail; these models do not).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.core.accelerator import find_denoiser
from fastdiff.core.forecast import combine
from fastdiff.runner import load
from test_family_matrix import METHODS, Subject, refusal, reuse_nothing, reusing


def _subject(name: str, dtype: str) -> Subject:
    pipe = load(name, "cpu", dtype)
    assert find_denoiser(pipe)[1].dtype == getattr(torch, dtype)
    return Subject.of(name, pipe)


def check_every_method(name: str, dtype: str = "bfloat16") -> None:
    subject = _subject(name, dtype)
    for method in METHODS:
        if refusal(method, subject.anatomy):
            continue
        acc = fastdiff.apply(subject.pipe, reuse_nothing(method, subject))
        assert np.array_equal(subject.call(), subject.vanilla), method
        acc.remove()
        acc = fastdiff.apply(subject.pipe, reusing(method, subject))
        output = subject.call()
        assert acc.report().module_calls_avoided > 0, method
        acc.remove()
        difference = float(np.abs(output - subject.vanilla).mean())
        assert 0 < difference < 0.5 * subject.seed_spread, (method, difference, subject.seed_spread)


@pytest.mark.filterwarnings("ignore:Pipelines loaded with `dtype=torch.float16`")
@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_every_method_in_half_precision_on_a_transformer(dtype: str) -> None:
    check_every_method("tiny-sd3", dtype)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-pixart", "tiny-dit", "tiny-flux", "tiny-wan"])
def test_every_method_in_bfloat16(name: str) -> None:
    check_every_method(name)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Pipelines loaded with `dtype=torch.float16`")
def test_every_method_in_float16_on_a_unet() -> None:
    check_every_method("tiny-sd", "float16")


def test_forecasts_of_bfloat16_outputs_are_summed_in_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    points = [torch.randn(4096, generator=generator).to(torch.bfloat16) for _ in range(3)]
    weights = [3.0, -3.0, 1.0]  # ab3 on evenly spaced steps
    wide = sum(w * p.float() for w, p in zip(weights, points)).to(torch.bfloat16)
    forecast = combine(points, weights)
    assert forecast.dtype == torch.bfloat16 and torch.equal(forecast, wide)
    narrow = sum(w * p for w, p in zip(weights, points))  # rounded to bf16 after every operation
    assert not torch.equal(narrow, wide)
