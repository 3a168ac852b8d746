"""Drop-in pipeline classes: diffusers' classes plus ``acceleration=``."""

import inspect

import diffusers
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import pipelines


def test_same_class_name_and_signature():
    cls = pipelines.StableDiffusionXLPipeline
    assert cls.__name__ == "StableDiffusionXLPipeline"
    assert issubclass(cls, diffusers.StableDiffusionXLPipeline)
    assert inspect.signature(cls.__call__) == inspect.signature(diffusers.StableDiffusionXLPipeline.__call__)
    assert pipelines.StableDiffusionXLPipeline is cls  # one class per name


def test_unknown_name():
    with pytest.raises(AttributeError, match="mirrors diffusers' pipeline classes"):
        pipelines.NoSuchPipeline  # noqa: B018


def test_from_pretrained_local_folder_with_acceleration(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path)
    pipe = pipelines.StableDiffusionPipeline.from_pretrained(
        tmp_path, acceleration=[fastdiff.DeepCache(interval=2)])
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.acceleration, fastdiff.Accelerator)
    generator = torch.Generator().manual_seed(0)
    out = pipe("a cat", num_inference_steps=4, height=32, width=32, generator=generator, output_type="np").images
    assert pipe.acceleration.report().modules[0].reused == 2
    pipe.acceleration.remove()
    generator = torch.Generator().manual_seed(0)
    vanilla = sd_pipe("a cat", num_inference_steps=4, height=32, width=32, generator=generator,
                      output_type="np").images
    fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2))
    generator = torch.Generator().manual_seed(0)
    again = sd_pipe("a cat", num_inference_steps=4, height=32, width=32, generator=generator,
                    output_type="np").images
    assert np.array_equal(out, again) and not np.array_equal(out, vanilla)


def test_from_pretrained_builtin_and_single_method():
    pipe = pipelines.StableDiffusionPipeline.from_pretrained("tiny-sd", acceleration=fastdiff.DeepCache())
    assert isinstance(pipe, diffusers.StableDiffusionPipeline)
    assert pipe.acceleration.methods == [fastdiff.DeepCache()]


def test_builtin_of_another_kind():
    with pytest.raises(ValueError, match="is a StableDiffusionXLPipeline, not a StableDiffusionPipeline"):
        pipelines.StableDiffusionPipeline.from_pretrained("tiny-sdxl")


def test_without_acceleration_it_is_plain_diffusers(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path)
    pipe = pipelines.StableDiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.acceleration is None
