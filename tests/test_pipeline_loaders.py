"""The generic loaders of fastdiff.pipelines (``DiffusionPipeline``, ``AutoPipelineFor...``) are
drop-ins too: a built-in loads by name, offline, as its own pipeline class's drop-in."""

from __future__ import annotations

import diffusers
import pytest

import fastdiff
from fastdiff import pipelines
from fastdiff.pipelines import AcceleratedPipelineMixin


def test_no_diffusers_class_is_shadowed():
    """A diffusers pipeline class imported into the module would be what
    ``from fastdiff.pipelines import X`` gives, instead of the drop-in."""
    shadowed = [name for name, value in vars(pipelines).items()
                if not name.startswith("_") and isinstance(value, type)
                and issubclass(value, diffusers.DiffusionPipeline) and value.__module__.startswith("diffusers")]
    assert shadowed == []
    from fastdiff.pipelines import DiffusionPipeline, PixArtAlphaPipeline

    for cls, base in ((DiffusionPipeline, diffusers.DiffusionPipeline),
                      (PixArtAlphaPipeline, diffusers.PixArtAlphaPipeline)):
        assert issubclass(cls, AcceleratedPipelineMixin) and issubclass(cls, base) and cls.__name__ == base.__name__


def test_diffusion_pipeline_loads_a_builtin_as_its_own_class():
    from fastdiff.pipelines import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("tiny-pixart")
    assert isinstance(pipe, diffusers.PixArtAlphaPipeline)
    assert type(pipe) is pipelines.PixArtAlphaPipeline
    assert pipe.acceleration is None


def test_diffusion_pipeline_from_folder_and_from_pipe(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path)
    pipe = pipelines.DiffusionPipeline.from_pretrained(tmp_path, acceleration=fastdiff.DeepCache(interval=2))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and isinstance(pipe, pipelines.StableDiffusionPipeline)
    assert pipe.acceleration.methods == [fastdiff.DeepCache(interval=2)]
    again = pipelines.DiffusionPipeline.from_pipe(pipe)  # of an accelerated pipeline: the same kind, plain
    assert type(again) is pipelines.StableDiffusionPipeline and again.acceleration is None


def test_auto_pipelines():
    from fastdiff.pipelines import AutoPipelineForImage2Image, AutoPipelineForText2Image

    pipe = AutoPipelineForImage2Image.from_pretrained("tiny-sd", acceleration=fastdiff.DeepCache(interval=2))
    assert isinstance(pipe, pipelines.StableDiffusionImg2ImgPipeline)  # (apply() subclasses it once more)
    assert pipe.acceleration.methods == [fastdiff.DeepCache(interval=2)]
    pipe.acceleration.remove()
    assert type(AutoPipelineForText2Image.from_pipe(pipe)) is pipelines.StableDiffusionPipeline


def test_unknown_auto_name():
    with pytest.raises(AttributeError, match="mirrors diffusers' pipeline classes"):
        pipelines.AutoPipelineForNothing  # noqa: B018


@pytest.mark.slow
def test_every_diffusers_pipeline_class_has_its_drop_in():
    names = [name for name in dir(diffusers) if not name.startswith("_")
             and isinstance(getattr(diffusers, name), type)
             and issubclass(getattr(diffusers, name), diffusers.DiffusionPipeline)]
    assert "DiffusionPipeline" in names and len(names) > 100
    for name in names:
        cls = getattr(pipelines, name)
        assert issubclass(cls, AcceleratedPipelineMixin) and cls._fastdiff_wraps is getattr(diffusers, name), name
