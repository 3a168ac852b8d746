"""Shared fixtures: tiny real diffusers pipelines built in code, and a call helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.models import build_builtin

torch.set_num_threads(min(2, torch.get_num_threads()))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_pipe():
    return _quiet(build_builtin("tiny-sd"))


@pytest.fixture
def sdxl_pipe():
    return _quiet(build_builtin("tiny-sdxl"))


@pytest.fixture
def pixart_pipe():
    return _quiet(build_builtin("tiny-pixart"))


@pytest.fixture
def dit_pipe():
    return _quiet(build_builtin("tiny-dit"))


def run(pipe, prompt="a red circle", steps=6, seed=0, size=32, **kwargs) -> np.ndarray:
    """One seeded call returning images as a float array, for exact comparisons."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=generator,
                output_type="np", **kwargs).images
