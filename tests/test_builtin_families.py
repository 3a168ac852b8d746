"""Built-ins for the transformer families users accelerate today: SD3, Flux, Wan (video).

Each must be the real diffusers pipeline with the real component classes and the layout that
matters to a method (block kinds, schedulers, latent channels), reproducible from its seed,
and saved/reloaded like a hub model. Video output must become a file a user can open.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, UMT5EncoderModel

from fastdiff.media import Video, makes_video, pipeline_outputs, read_frames, save_output, save_video
from fastdiff.models import BUILTIN_MODELS, build_builtin, builtin_info, load_pipeline
from fastdiff.models.builtin import SD35_MEDIUM_TRANSFORMER_CONFIG, WAN21_1_3B_TRANSFORMER_CONFIG

FAMILIES = ("tiny-sd3", "tiny-flux", "tiny-wan")
STEPS = 2


@pytest.fixture(scope="module")
def built() -> Iterator[dict[str, DiffusionPipeline]]:
    """One build per family for the tests that only call it (builds are deterministic)."""
    yield {name: build_builtin(name, seed=7) for name in FAMILIES}


def _run(pipe: DiffusionPipeline, name: str, seed: int) -> np.ndarray:
    """The model's recommended call, shortened; an image as (H, W, 3), a video as (F, H, W, 3)."""
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {**builtin_info(name).call_kwargs(), "num_inference_steps": STEPS}
    result = pipe(
        prompt=builtin_info(name).example_prompt,
        output_type="pil",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    output = pipeline_outputs(result)[0]
    if isinstance(output, Video):
        return np.stack([np.asarray(frame) for frame in output])
    assert isinstance(output, Image.Image)
    return np.asarray(output)


def _state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{key}": value
        for component, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


def test_families_are_registered_with_their_defaults() -> None:
    assert {*FAMILIES, "sd3-arch"} <= set(BUILTIN_MODELS)
    for name in (*FAMILIES, "sd3-arch"):
        info = builtin_info(name)
        assert info.height % 16 == 0 and info.width % 16 == 0  # Flux packs 2x2 latents; Wan patches 2x2
        assert info.num_inference_steps >= 10 and info.guidance_scale > 1
        assert info.example_prompt
    assert builtin_info("tiny-flux").guidance_scale == 3.5  # FLUX.1-dev's distilled guidance
    wan = builtin_info("tiny-wan")
    assert wan.is_video and wan.num_frames == 5 and (wan.num_frames - 1) % 4 == 0
    assert wan.call_kwargs()["num_frames"] == 5
    assert not any(builtin_info(name).is_video for name in ("tiny-sd3", "tiny-flux", "sd3-arch"))
    assert "num_frames" not in builtin_info("tiny-sd3").call_kwargs()


def test_tiny_sd3_has_the_sd35_block_kinds(built: dict[str, DiffusionPipeline]) -> None:
    pipe = built["tiny-sd3"]
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    blocks = pipe.transformer.transformer_blocks
    assert len(blocks) == 3
    assert [block.context_pre_only for block in blocks] == [False, False, True]
    assert blocks[0].use_dual_attention and not blocks[1].use_dual_attention
    assert pipe.transformer.config.qk_norm == "rms_norm"
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert clip_width <= pipe.text_encoder_3.config.d_model == pipe.transformer.config.joint_attention_dim
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.shift_factor == pytest.approx(0.0609)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0


def test_tiny_flux_is_flux_dev_shaped(built: dict[str, DiffusionPipeline]) -> None:
    pipe = built["tiny-flux"]
    transformer = pipe.transformer
    assert type(pipe).__name__ == "FluxPipeline"
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 3
    assert transformer.config.guidance_embeds
    assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim
    assert type(pipe.text_encoder) is CLIPTextModel and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert pipe.vae.config.latent_channels == 16 and transformer.config.in_channels == 16 * 4
    config = pipe.scheduler.config
    assert config.use_dynamic_shifting and (config.base_shift, config.max_shift) == (0.5, 1.15)
    assert (config.base_image_seq_len, config.max_image_seq_len) == (256, 4096)


def test_tiny_wan_is_wan21_shaped(built: dict[str, DiffusionPipeline]) -> None:
    pipe = built["tiny-wan"]
    assert type(pipe).__name__ == "WanPipeline"
    assert isinstance(pipe.text_encoder, UMT5EncoderModel)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)
    assert len(pipe.transformer.blocks) == 3
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.use_flow_sigmas
    assert makes_video(pipe) and not makes_video(built["tiny-flux"]) and not makes_video(built["tiny-sd3"])


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_same_weights(name: str) -> None:
    first, second = _state(build_builtin(name, seed=3)), _state(build_builtin(name, seed=3))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = _state(build_builtin(name, seed=4))
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_builtin("tiny-wan")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_is_deterministic_and_survives_save_and_reload(
    name: str, built: dict[str, DiffusionPipeline], tmp_path: Path
) -> None:
    pipe = built[name]
    first = _run(pipe, name, seed=1)
    info = builtin_info(name)
    frames = (info.num_frames,) if info.is_video else ()
    assert first.shape == (*frames, info.height, info.width, 3)
    assert first.std() > 0
    assert np.array_equal(_run(pipe, name, seed=1), first)
    assert not np.array_equal(_run(pipe, name, seed=2), first)
    pipe.save_pretrained(tmp_path)
    reloaded = load_pipeline(tmp_path)
    assert type(reloaded) is type(pipe)
    assert np.array_equal(_run(reloaded, name, seed=1), first)


def test_sd3_arch_is_the_sd35_medium_transformer() -> None:
    """Checked on the meta device: the real shape without allocating 10 GB."""
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER_CONFIG)
    blocks = transformer.transformer_blocks
    assert len(blocks) == 24 and transformer.inner_dim == 1536
    assert [block.use_dual_attention for block in blocks] == [True] * 13 + [False] * 11
    assert blocks[-1].context_pre_only and not blocks[-2].context_pre_only
    assert transformer.pos_embed.pos_embed.shape == (1, 384 * 384, 1536)
    # The model card's 2.5B counts the position table, a learned weight in the original checkpoint.
    assert sum(p.numel() for p in transformer.parameters()) == 2_243_171_520
    assert transformer.pos_embed.pos_embed.numel() == 226_492_416


def test_wan_arch_is_the_wan21_1_3b_transformer() -> None:
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**WAN21_1_3B_TRANSFORMER_CONFIG)
    assert len(transformer.blocks) == 30 and transformer.config.num_attention_heads * 128 == 1536
    assert 1.3e9 < sum(p.numel() for p in transformer.parameters()) < 1.45e9
    assert builtin_info("wan-arch").is_video


# --------------------------------------------------------------------------- video files


def _frames(count: int = 4, size: tuple[int, int] = (24, 16)) -> list[Image.Image]:
    """Distinct frames with few colours, so even GIF's 256-colour palette keeps them exactly."""
    frames = []
    for index in range(count):
        array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        array[:, : (index + 1) * size[0] // (count + 1)] = (250, 40 * index, 10)
        array[index::count, :, 2] = 200
        frames.append(Image.fromarray(array))
    return frames


@pytest.mark.parametrize("suffix", [".png", ".apng", ".gif", ".webp"])
def test_video_round_trips_through_an_animated_image(suffix: str, tmp_path: Path) -> None:
    frames = _frames()
    path = save_video(frames, tmp_path / f"clip{suffix}", fps=8)
    read = read_frames(path)
    assert [np.asarray(frame).tolist() for frame in read] == [np.asarray(frame).tolist() for frame in frames]
    with Image.open(path) as image:
        image.load()  # WebP reports a frame's duration once it is decoded
        assert image.n_frames == len(frames) and image.info.get("loop") == 0
        assert image.info["duration"] == pytest.approx(1000 / 8, abs=5)  # GIF rounds to 10 ms


def test_save_output_writes_images_videos_and_arrays(tmp_path: Path) -> None:
    frames = _frames(3)
    video = Video(tuple(frames))
    assert (video.width, video.height, len(video)) == (24, 16, 3) and video[1] is frames[1]
    assert len(read_frames(video.save(tmp_path / "video.png"))) == 3
    assert len(read_frames(save_output(frames, tmp_path / "list.gif"))) == 3
    assert len(read_frames(save_output(frames[0], tmp_path / "still.jpg"))) == 1
    as_float = np.stack([np.asarray(frame) for frame in frames]).astype(np.float32) / 255
    read = read_frames(save_output(as_float, tmp_path / "array.webp"))
    assert np.array_equal(np.stack([np.asarray(frame) for frame in read]), (as_float * 255).round())
    with pytest.raises(ValueError, match=r"\.gif"):
        save_output(video, tmp_path / "video.jpg")


def test_pipeline_outputs_wraps_pil_videos_and_keeps_images() -> None:
    """What diffusers returns: `.frames` (video pipelines) or `.images`, PIL lists or arrays."""
    videos = pipeline_outputs(SimpleNamespace(frames=[_frames(2), _frames(2)]))
    assert [type(video) for video in videos] == [Video, Video] and len(videos[0]) == 2
    images = _frames(1)
    assert pipeline_outputs(SimpleNamespace(images=images)) is images
    array = np.zeros((1, 5, 8, 8, 3))
    assert pipeline_outputs(SimpleNamespace(frames=array)) is array
