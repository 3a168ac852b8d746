"""Built-in diffusers pipelines: tiny ones with deterministic random weights, and trained `digits`.

Nothing can be downloaded here, yet every method must be exercised on the pipelines users
actually run. So each built-in is the *real* diffusers pipeline class with real component
classes, only small (or, for `sd15-arch` and `sd3-arch`, with the real denoiser shape and
random weights so speed can be measured). Weights depend only on the seed, so tests and
benchmarks are reproducible, and a built-in saves and reloads like any hub model.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from .digits import DIGITS_GUIDANCE_SCALE, DIGITS_IMAGE_SIZE, load_digits_pipeline
from .digits_mmdit import DIGITS_SD3_CALL, DIGITS_SD3_GUIDANCE_SCALE
from .tokenizers import clip_tokenizer, t5_tokenizer

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "ModelLoadError",
    "SD15_UNET_CONFIG",
    "SD35_MEDIUM_TRANSFORMER_CONFIG",
    "build_builtin",
    "builtin_info",
    "default_size",
    "is_builtin",
    "load_pipeline",
]

# Stable Diffusion 1.5's scheduler: methods are compared on the timesteps users really sample.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# SDXL base samples with Euler on the same betas.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
}

# PixArt-alpha and DiT were trained with linear betas (the original DDPM schedule).
PIXART_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "prediction_type": "epsilon",
}

DIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
}

# The UNet of runwayml/stable-diffusion-v1-5 (860M parameters), written out rather than
# relying on diffusers' defaults, which differ (cross_attention_dim 1280, sample_size None).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# The flow-matching schedulers of the real checkpoints: the shift decides which noise levels
# the steps land on, and so which steps a reuse schedule finds similar.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

# FLUX.1-dev: the shift grows with the number of image tokens (resolution-dependent).
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# Wan 2.1 text-to-video ships UniPC in flow-prediction mode; shift 3.0 is its 480p setting
# (5.0 is recommended for 720p).
WAN_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
}

# stabilityai/stable-diffusion-3.5-medium's MMDiT-X (2.5B parameters): 24 joint blocks of
# 24 x 64 channels, the first 13 with a second (image-only) attention, RMS-normalised q/k,
# and a 384 x 384 position grid (147,456 entries, which is how diffusers' single-file loader
# tells 3.5-medium from 3-medium's 192 x 192).
SD35_MEDIUM_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}

# A few real ImageNet classes, so DiT's `get_label_ids` works with familiar names.
DIT_LABELS: dict[int, str] = {
    0: "tench",
    1: "goldfish",
    88: "macaw",
    207: "golden retriever",
    279: "arctic fox",
    281: "tabby cat",
    360: "otter",
    417: "balloon",
    980: "volcano",
}

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

SD_VAE_SCALING = 0.18215
SDXL_VAE_SCALING = 0.13025
# The 16-channel VAEs of SD3 and Flux normalise latents with a shift as well as a scale.
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159


class ModelLoadError(OSError, ValueError):
    """A `model` argument that names nothing loadable.

    Subclasses both `OSError` (what `from_pretrained` raises for missing files) and
    `ValueError` (what it raises for malformed ids), so callers catching either still work.
    """


@dataclass(frozen=True)
class BuiltinModel:
    """What a built-in is and how it is meant to be called.

    Benchmarks and the CLI need a sensible size and step count per model without knowing the
    model; keeping them next to the builder keeps them in sync.
    """

    name: str
    pipeline_class: str
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    description: str
    builder: Callable[[int], DiffusionPipeline] = field(repr=False, compare=False)
    takes_size: bool = True
    example_prompt: str = "a photograph of an astronaut riding a horse"
    num_frames: int | None = None
    call_options: Mapping[str, Any] = field(default_factory=dict)
    """Pipeline arguments the model was trained for and that every call must pass (digits-sd3:
    one T5 slot). The pipeline's own defaults would silently give other images."""
    digits_task: bool = False
    """Draws the digits task's prompts, so the digits feature network can score it (FID-digits,
    adherence) and calibrations use the ten digit prompts."""

    @property
    def is_video(self) -> bool:
        """Video pipelines return `.frames` (one list of frames per prompt), not `.images`."""
        return self.num_frames is not None

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the pipeline call (DiT has a fixed size, so no height/width).

        Video pipelines default to dozens of frames (Wan: 81), so the frame count is part of
        the recommended call, not left to the pipeline.
        """
        kwargs: dict[str, Any] = {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
        }
        if self.takes_size:
            kwargs.update(height=self.height, width=self.width)
        if self.num_frames is not None:
            kwargs["num_frames"] = self.num_frames
        kwargs.update(self.call_options)
        return kwargs


# --------------------------------------------------------------------------- seeding


def _component_seed(seed: int, component: str) -> int:
    """Give every component its own stream, so resizing one never changes another's weights."""
    return (seed * 1_000_003 + zlib.crc32(component.encode())) % (2**63)


@contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Seed weight init without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, component))
        yield


def _ready(module: ModuleT) -> ModuleT:
    """Inference mode, as `from_pretrained` leaves it: dropout (T5 has some) must be off."""
    return module.eval()


# --------------------------------------------------------------------------- components


def _clip_text_encoder(
    seed: int,
    component: str,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    projection_dim: int | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text tower over the byte-level vocabulary; with a projection for SDXL's second encoder."""
    tokenizer = clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    with _seeded(seed, component):
        return _ready(model_class(config))


def _vae(
    seed: int,
    *,
    block_out_channels: tuple[int, ...],
    norm_num_groups: int,
    scaling_factor: float,
    sample_size: int,
    latent_channels: int = 4,
    shift_factor: float | None = None,
) -> AutoencoderKL:
    """A 4-level VAE: the real latent scale factor (8), at a fraction of the cost.

    With a `shift_factor` it is laid out as SD3's and Flux's 16-channel VAEs are: no 1x1
    quant convs around the latent.
    """
    levels = len(block_out_channels)
    flow_vae = shift_factor is not None
    with _seeded(seed, "vae"):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=not flow_vae,
            use_post_quant_conv=not flow_vae,
        )
    return _ready(vae)


def _tiny_vae(
    seed: int,
    scaling_factor: float = SD_VAE_SCALING,
    sample_size: int = 64,
    *,
    latent_channels: int = 4,
    shift_factor: float | None = None,
) -> AutoencoderKL:
    return _vae(
        seed,
        block_out_channels=(8, 16, 16, 16),
        norm_num_groups=8,
        scaling_factor=scaling_factor,
        sample_size=sample_size,
        latent_channels=latent_channels,
        shift_factor=shift_factor,
    )


def _unet(seed: int, config: Mapping[str, Any]) -> UNet2DConditionModel:
    with _seeded(seed, "unet"):
        return _ready(UNet2DConditionModel(**config))


# --------------------------------------------------------------------------- pipelines

# layers_per_block=2 as in real SD: DeepCache-style methods pick a skip branch inside a block.
TINY_SD_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}

# SDXL's conditioning: two text encoders concatenated (32 + 32) for cross-attention, and the
# pooled projection (32) plus six size/crop numbers embedded at 8 each for "text_time".
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "cross_attention_dim": 64,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 32,
}


def _tiny_clip(
    seed: int, component: str, projection_dim: int | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    return _clip_text_encoder(
        seed,
        component,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        projection_dim=projection_dim,
    )


def _stable_diffusion(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, vae: AutoencoderKL
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_tiny_sd(seed: int) -> StableDiffusionPipeline:
    return _stable_diffusion(
        _unet(seed, TINY_SD_UNET_CONFIG),
        _tiny_clip(seed, "text_encoder"),
        _tiny_vae(seed),
    )


def _build_sd15_arch(seed: int) -> StableDiffusionPipeline:
    """SD 1.5's UNet (where the time goes) with a cheap text encoder and VAE around it."""
    text_encoder = _clip_text_encoder(
        seed, "text_encoder", hidden_size=768, num_layers=2, num_heads=12, intermediate_size=1024
    )
    vae = _vae(
        seed,
        block_out_channels=(32, 32, 64, 64),
        norm_num_groups=32,
        scaling_factor=SD_VAE_SCALING,
        sample_size=512,
    )
    return _stable_diffusion(_unet(seed, SD15_UNET_CONFIG), text_encoder, vae)


def _build_tiny_sdxl(seed: int) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(seed, scaling_factor=SDXL_VAE_SCALING),
        text_encoder=_tiny_clip(seed, "text_encoder"),
        text_encoder_2=_tiny_clip(seed, "text_encoder_2", projection_dim=32),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=_unet(seed, TINY_SDXL_UNET_CONFIG),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _t5_config_kwargs(
    vocab_size: int, d_model: int, *, num_heads: int | None = None, d_ff: int | None = None, num_layers: int = 2
) -> dict[str, Any]:
    """A T5 v1.1-style encoder (gated GELU, as T5-XXL and UMT5-XXL) with dropout off.

    The attention width (`num_heads` x 8) and `d_ff` need not follow `d_model`: the arch
    built-ins keep the real output width (what the denoiser sees) on a thin encoder.
    """
    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": 8,
        "d_ff": d_ff or 2 * d_model,
        "num_layers": num_layers,
        "num_heads": num_heads or d_model // 8,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def _tiny_t5(
    seed: int, vocab_size: int, *, d_model: int = 32, component: str = "text_encoder", **sizes: int
) -> T5EncoderModel:
    with _seeded(seed, component):
        return _ready(T5EncoderModel(T5Config(**_t5_config_kwargs(vocab_size, d_model, **sizes))))


def _tiny_umt5(seed: int, vocab_size: int, *, d_model: int = 32, **sizes: Any) -> UMT5EncoderModel:
    """Wan's text encoder class: UMT5 differs from T5 by a relative position bias in every layer."""
    with _seeded(seed, "text_encoder"):
        return _ready(UMT5EncoderModel(UMT5Config(**_t5_config_kwargs(vocab_size, d_model, **sizes))))


def _build_tiny_pixart(seed: int) -> PixArtAlphaPipeline:
    """sample_size 32: PixArt only accepts 32, 64 or 128 with resolution binning (its default)."""
    tokenizer = t5_tokenizer()
    with _seeded(seed, "transformer"):
        transformer = PixArtTransformer2DModel(
            sample_size=32,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=24,
            caption_channels=32,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            num_embeds_ada_norm=1000,
        )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5(seed, len(tokenizer)),
        vae=_tiny_vae(seed, sample_size=256),
        transformer=_ready(transformer),
        scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG),
    )


def _build_tiny_dit(seed: int) -> DiTPipeline:
    """num_embeds_ada_norm stays 1000: DiTPipeline hard-codes class 1000 as the null label."""
    with _seeded(seed, "transformer"):
        transformer = DiTTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=4,
            in_channels=4,
            out_channels=8,
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
        )
    pipe = DiTPipeline(
        transformer=_ready(transformer),
        vae=_tiny_vae(seed),
        scheduler=DDIMScheduler(**DIT_SCHEDULER_CONFIG),
        id2label=DIT_LABELS,
    )
    # Not registered by DiTPipeline itself; without it the labels are lost on save_pretrained.
    pipe.register_to_config(id2label=DIT_LABELS)
    return pipe


# --------------------------------------------------------------------------- flow-matching transformers

# SD3.5-medium in miniature: three joint blocks covering the three kinds the real model has
# (dual attention, plain, and the last one whose text stream is not updated: context_pre_only).
# Two CLIP encoders of 32 give the 64-wide pooled vector and, padded, the T5 width (64).
TINY_SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}

# FLUX.1-dev in miniature: dual-stream then single-stream blocks, guidance-distilled (the
# guidance scale is an input of the transformer, one forward per step), rotary axes
# (frame, row, column) splitting the head as 16/56/56 of 128 does.
TINY_FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}

# Wan 2.1 text-to-video in miniature: same patching (1 frame x 2 x 2), norms and rotary layout.
TINY_WAN_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 64,
    "num_layers": 3,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

# Wan-AI/Wan2.1-T2V-1.3B's transformer: 30 blocks of 12 x 128 channels, FFN 8960, text width
# 4096 (UMT5-XXL), RMS-normalised q/k across heads.
WAN21_1_3B_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

# Wan's causal 3D VAE: 8x spatial and 4x temporal compression (frames 1 + 4k -> 1 + k latents).
TINY_WAN_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}

# T5 sequences are padded to the pipeline's max_sequence_length (SD3 256, Flux and Wan 512).
T5_MAX_LENGTH = 512


def _seeded_module(seed: int, component: str, factory: Callable[[], ModuleT]) -> ModuleT:
    """Build one component in its own seeded stream, ready for inference."""
    with _seeded(seed, component):
        return _ready(factory())


def _stable_diffusion_3(
    seed: int,
    transformer: SD3Transformer2DModel,
    *,
    clip_sizes: tuple[dict[str, int], dict[str, int]],
    t5_sizes: dict[str, int],
    vae: AutoencoderKL,
) -> StableDiffusion3Pipeline:
    """SD3's three text towers: two projected CLIPs (pooled vector, and hidden states padded to
    the T5 width) and a T5 whose width is the transformer's `joint_attention_dim`."""
    tokenizer_3 = t5_tokenizer(T5_MAX_LENGTH)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=_clip_text_encoder(seed, "text_encoder", **clip_sizes[0]),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text_encoder(seed, "text_encoder_2", **clip_sizes[1]),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_tiny_t5(seed, len(tokenizer_3), component="text_encoder_3", **t5_sizes),
        tokenizer_3=tokenizer_3,
    )


def _build_tiny_sd3(seed: int) -> StableDiffusion3Pipeline:
    clip = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "projection_dim": 32}
    return _stable_diffusion_3(
        seed,
        _seeded_module(seed, "transformer", lambda: SD3Transformer2DModel(**TINY_SD3_TRANSFORMER_CONFIG)),
        clip_sizes=(clip, clip),
        t5_sizes={"d_model": 64},
        vae=_tiny_vae(seed, SD3_VAE_SCALING, latent_channels=16, shift_factor=SD3_VAE_SHIFT),
    )


def _build_sd3_arch(seed: int) -> StableDiffusion3Pipeline:
    """SD3.5-medium's transformer (where the time goes) with thin text encoders and VAE.

    The encoders keep the real output widths (CLIP-L 768 and CLIP-G 1280, pooled 2048; T5
    4096), so the transformer's embedders run at their real size, on two layers (one for T5).
    """
    clip_l = {"hidden_size": 768, "num_layers": 2, "num_heads": 12, "intermediate_size": 1024, "projection_dim": 768}
    clip_g = {"hidden_size": 1280, "num_layers": 2, "num_heads": 20, "intermediate_size": 1024, "projection_dim": 1280}
    return _stable_diffusion_3(
        seed,
        _seeded_module(seed, "transformer", lambda: SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER_CONFIG)),
        clip_sizes=(clip_l, clip_g),
        t5_sizes={"d_model": 4096, "num_heads": 8, "d_ff": 256, "num_layers": 1},
        vae=_vae(
            seed,
            block_out_channels=(32, 32, 64, 64),
            norm_num_groups=32,
            scaling_factor=SD3_VAE_SCALING,
            shift_factor=SD3_VAE_SHIFT,
            latent_channels=16,
            sample_size=1024,
        ),
    )


def _build_tiny_flux(seed: int) -> FluxPipeline:
    """Flux pools CLIP's final hidden state (no projection) and cross-attends to T5 only."""
    tokenizer_2 = t5_tokenizer(T5_MAX_LENGTH)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG),
        vae=_tiny_vae(seed, FLUX_VAE_SCALING, latent_channels=16, shift_factor=FLUX_VAE_SHIFT),
        text_encoder=_tiny_clip(seed, "text_encoder"),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_tiny_t5(seed, len(tokenizer_2), component="text_encoder_2"),
        tokenizer_2=tokenizer_2,
        transformer=_seeded_module(seed, "transformer", lambda: FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG)),
    )


def _wan(seed: int, transformer_config: Mapping[str, Any], text_sizes: Mapping[str, int]) -> WanPipeline:
    tokenizer = t5_tokenizer(T5_MAX_LENGTH)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_umt5(seed, len(tokenizer), **text_sizes),
        vae=_seeded_module(seed, "vae", lambda: AutoencoderKLWan(**TINY_WAN_VAE_CONFIG)),
        scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG),
        transformer=_seeded_module(seed, "transformer", lambda: WanTransformer3DModel(**transformer_config)),
    )


def _build_tiny_wan(seed: int) -> WanPipeline:
    return _wan(seed, TINY_WAN_TRANSFORMER_CONFIG, {"d_model": 32})


def _build_wan_arch(seed: int) -> WanPipeline:
    """Wan 2.1 1.3B's transformer (where the time goes) behind a two-layer text encoder of the real
    output width (4096) and the tiny VAE."""
    return _wan(seed, WAN21_1_3B_TRANSFORMER_CONFIG, {"d_model": 4096, "num_heads": 8, "d_ff": 256, "num_layers": 1})


def _build_digits(seed: int) -> DiffusionPipeline:
    """Trained weights shipped in the package: `seed` has nothing to choose, so it is ignored."""
    del seed
    return load_digits_pipeline()


def _build_digits_sd3(seed: int) -> DiffusionPipeline:
    """Trained weights shipped in the package: `seed` has nothing to choose, so it is ignored."""
    from .digits_mmdit import load_digits_sd3_pipeline

    del seed
    return load_digits_sd3_pipeline()


_REGISTRY: dict[str, BuiltinModel] = {
    spec.name: spec
    for spec in (
        BuiltinModel(
            name="tiny-sd",
            pipeline_class="StableDiffusionPipeline",
            height=64,
            width=64,
            num_inference_steps=20,
            guidance_scale=7.5,
            description="Stable Diffusion 1.x layout, tiny (UNet 32/64 channels, 2 layers per block).",
            builder=_build_tiny_sd,
        ),
        BuiltinModel(
            name="tiny-sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            height=64,
            width=64,
            num_inference_steps=20,
            guidance_scale=5.0,
            description="SDXL layout with both text encoders and text_time conditioning, tiny.",
            builder=_build_tiny_sdxl,
        ),
        BuiltinModel(
            name="tiny-pixart",
            pipeline_class="PixArtAlphaPipeline",
            height=256,
            width=256,
            num_inference_steps=20,
            guidance_scale=4.5,
            description="PixArt-alpha transformer with a T5 encoder, tiny; 256 px: its smallest binned size.",
            builder=_build_tiny_pixart,
        ),
        BuiltinModel(
            name="tiny-dit",
            pipeline_class="DiTPipeline",
            height=64,
            width=64,
            num_inference_steps=20,
            guidance_scale=4.0,
            description="Class-conditional DiT, tiny, with a few ImageNet labels.",
            takes_size=False,
            example_prompt="golden retriever",
            builder=_build_tiny_dit,
        ),
        BuiltinModel(
            name="tiny-sd3",
            pipeline_class="StableDiffusion3Pipeline",
            height=64,
            width=64,
            num_inference_steps=20,
            guidance_scale=4.5,
            description=(
                "SD3.5-medium layout (MMDiT with dual-attention and context_pre_only joint blocks, "
                "two CLIPs + T5, 16-channel VAE, flow matching with shift 3), tiny."
            ),
            builder=_build_tiny_sd3,
        ),
        BuiltinModel(
            name="tiny-flux",
            pipeline_class="FluxPipeline",
            height=64,
            width=64,
            num_inference_steps=20,
            guidance_scale=3.5,
            description=(
                "FLUX.1-dev layout (dual-stream then single-stream blocks, guidance-distilled, "
                "dynamic shift), tiny."
            ),
            builder=_build_tiny_flux,
        ),
        BuiltinModel(
            name="tiny-wan",
            pipeline_class="WanPipeline",
            height=64,
            width=64,
            num_inference_steps=20,
            guidance_scale=5.0,
            num_frames=5,
            description=(
                "Wan 2.1 text-to-video layout (UMT5, causal 3D VAE, UniPC flow matching), tiny; "
                "5 frames (2 latent frames)."
            ),
            example_prompt="a cat walking on the grass, realistic",
            builder=_build_tiny_wan,
        ),
        BuiltinModel(
            name="sd15-arch",
            pipeline_class="StableDiffusionPipeline",
            height=256,
            width=256,
            num_inference_steps=25,
            guidance_scale=7.5,
            description="The exact SD 1.5 UNet (860M parameters, random weights) for speed benchmarks.",
            builder=_build_sd15_arch,
        ),
        BuiltinModel(
            name="sd3-arch",
            pipeline_class="StableDiffusion3Pipeline",
            height=256,
            width=256,
            num_inference_steps=28,
            guidance_scale=4.5,
            description=(
                "The exact SD3.5-medium transformer (2.5B parameters, random weights; about 10 GB in "
                "float32) with thin text encoders and VAE, for speed benchmarks."
            ),
            builder=_build_sd3_arch,
        ),
        BuiltinModel(
            name="wan-arch",
            pipeline_class="WanPipeline",
            height=128,
            width=128,
            num_inference_steps=10,
            guidance_scale=5.0,
            num_frames=5,
            description=(
                "The exact Wan 2.1 T2V 1.3B transformer (random weights; about 5.7 GB in float32) with a thin "
                "text encoder and VAE, for speed benchmarks; 5 frames at 128 px by default."
            ),
            example_prompt="a cat walking on the grass, realistic",
            builder=_build_wan_arch,
        ),
        BuiltinModel(
            name="digits",
            pipeline_class="StableDiffusionPipeline",
            height=DIGITS_IMAGE_SIZE,
            width=DIGITS_IMAGE_SIZE,
            num_inference_steps=50,
            guidance_scale=DIGITS_GUIDANCE_SCALE,
            description=(
                "Trained 8x8 handwritten digits (sklearn), prompt 'a handwritten digit seven'; "
                "for quality measurements (FID-digits). Weights are shipped, so the seed is ignored."
            ),
            builder=_build_digits,
            example_prompt="a handwritten digit seven",
            digits_task=True,
        ),
        BuiltinModel(
            name="digits-sd3",
            pipeline_class="StableDiffusion3Pipeline",
            height=DIGITS_IMAGE_SIZE,
            width=DIGITS_IMAGE_SIZE,
            num_inference_steps=50,
            guidance_scale=DIGITS_SD3_GUIDANCE_SCALE,
            description=(
                "The digits task on SD3's pipeline: a trained 6-block MMDiT (3.5 M parameters, flow matching), "
                "two CLIPs, the digits VAE; for quality measurements on a transformer. Calls pass "
                "max_sequence_length=1 (its one T5 slot). Weights are shipped, so the seed is ignored."
            ),
            builder=_build_digits_sd3,
            example_prompt="a handwritten digit seven",
            call_options=DIGITS_SD3_CALL,
            digits_task=True,
        ),
    )
}

BUILTIN_MODELS: tuple[str, ...] = tuple(_REGISTRY)


# --------------------------------------------------------------------------- public API


def is_builtin(model: str | os.PathLike[str]) -> bool:
    return isinstance(model, str) and model in _REGISTRY


def builtin_info(model: str) -> BuiltinModel:
    """Metadata of a built-in; raises the same error as `build_builtin` for unknown names."""
    try:
        return _REGISTRY[model]
    except (KeyError, TypeError):
        raise ValueError(
            f"model={model!r} is not a built-in model; choose one of: {', '.join(BUILTIN_MODELS)}"
        ) from None


def default_size(model: str) -> tuple[int, int]:
    """Recommended (height, width): the sizes the built-in was shaped for."""
    info = builtin_info(model)
    return info.height, info.width


def build_builtin(
    name: str,
    *,
    seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """Build a built-in pipeline; the same seed gives bit-identical weights."""
    pipe = builtin_info(name).builder(seed)
    if torch_dtype != torch.float32:
        _cast(pipe, torch_dtype)
    return pipe


def _cast(pipe: DiffusionPipeline, dtype: torch.dtype) -> None:
    """Cast module by module, as `from_pretrained(torch_dtype=...)` would.

    `DiffusionPipeline.to(dtype)` warns about float32-kept modules even when there are none.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype=dtype)
            if dtype == torch.float16:
                _keep_in_float32(component)


def _keep_in_float32(model: torch.nn.Module) -> None:
    """Modules a model marks as overflowing in float16 (T5's `wo`) stay float32, as on load."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            module.to(dtype=torch.float32)


def looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else was meant as a path, and must not reach
    the hub, where it would fail with a confusing id-validation error."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
    )


def _error_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _load_failure(exc: BaseException, hub: bool) -> str:
    """Why ``from_pretrained`` failed, in one clause. Its own messages point at "the stacktrace
    above", which a command line does not show, and its hub errors come in many types."""
    chain = _error_chain(exc)
    names = {cls.__name__ for error in chain for cls in type(error).__mro__}
    if hub and "RepositoryNotFoundError" in names:
        return "the Hugging Face Hub has no model of that name (or it is private: log in with `hf auth login`)"
    if hub and "GatedRepoError" in names:
        return "it is gated on the Hugging Face Hub: accept its terms on its page and log in with `hf auth login`"
    if hub and "RevisionNotFoundError" in names:
        return "the Hugging Face Hub has no such revision of it"
    offline = {"OfflineModeIsEnabled", "ConnectError", "ConnectionError", "NetworkError", "TimeoutException",
               "gaierror", "LocalEntryNotFoundError"}
    if hub and (names & offline or "not fully cached locally" in str(exc)):
        return "the Hugging Face Hub cannot be reached (offline?) and the local cache does not hold it"
    message = str(exc).replace("Please check out the root cause in the stacktrace above.", "")
    return f"{type(exc).__name__}: {' '.join(message.split())}"


class _DropHubRetryNotice:
    """diffusers logs "Couldn't connect to the Hub ... Will try to load from local cache." on every
    offline load; the failure (if any) says so in its own words, and a success needs no notice."""

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith("Couldn't connect to the Hub")


def _from_pretrained(model: str, kind: str, kwargs: dict[str, Any]) -> DiffusionPipeline:
    from diffusers.utils import logging as diffusers_logging

    logger = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")
    notice = _DropHubRetryNotice()
    logger.addFilter(notice)
    try:
        return DiffusionPipeline.from_pretrained(model, **kwargs)
    except Exception as exc:  # hub/files errors come in many types; one clear one for callers
        raise ModelLoadError(
            f"{model!r} is not a built-in model, and could not be loaded as {kind}: "
            f"{_load_failure(exc, hub=kind == HUB_ID)}. Give a built-in name ({', '.join(BUILTIN_MODELS)}; "
            f"no download needed), a folder saved with save_pretrained, or a Hugging Face Hub id"
        ) from exc
    finally:
        logger.removeFilter(notice)


HUB_ID = "a Hugging Face Hub id"


def load_pipeline(
    model: str | os.PathLike[str],
    *,
    torch_dtype: torch.dtype | None = None,
    seed: int = 0,
    **from_pretrained_kwargs: Any,
) -> DiffusionPipeline:
    """Resolve `model` the way a user means it: built-in name, local directory, then hub id.

    `seed` only applies to built-ins (their weights); `from_pretrained_kwargs` only to saved
    pipelines, so passing them for a built-in is an error rather than silently ignored.
    """
    if is_builtin(model):
        if from_pretrained_kwargs:
            raise TypeError(
                f"model={model!r} is built in; from_pretrained arguments do not apply: "
                f"{', '.join(sorted(from_pretrained_kwargs))}"
            )
        return build_builtin(str(model), seed=seed, torch_dtype=torch_dtype or torch.float32)
    kwargs = dict(from_pretrained_kwargs)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype  # diffusers >= 0.42 deprecates `torch_dtype` (a FutureWarning)
    path = Path(os.path.expanduser(os.fspath(model)))
    if path.is_dir():
        return _from_pretrained(str(path), "a local pipeline directory", kwargs)
    if not isinstance(model, str) or looks_like_path(model) or path.exists():
        raise ModelLoadError(
            f"model={os.fspath(model)!r} is not a directory containing a saved diffusers pipeline, "
            f"nor a built-in model ({', '.join(BUILTIN_MODELS)})"
        )
    return _from_pretrained(model, HUB_ID, kwargs)
