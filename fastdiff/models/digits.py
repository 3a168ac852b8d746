"""`digits`: a trained text-to-image Stable Diffusion pipeline, and the network that judges it.

The other built-ins have random weights, so they can show that a method *runs* and how fast,
never what it does to image quality. This one is trained (by `fastdiff.models.train`) on
scikit-learn's 8x8 handwritten digits, small enough to ship in the package and to sample a
thousand images on a CPU, so quality can be measured offline:

- the pipeline is a real `StableDiffusionPipeline` (cross-attention UNet with two layers per
  block and a mid block, CLIP text encoder, `AutoencoderKL`, DDIM), prompted with
  `digit_prompt(label)`, e.g. "a handwritten digit seven";
- `DigitsFeatureNet` is a small classifier trained on the training split only; its
  penultimate features replace Inception in FID ("FID-digits"), and its prediction measures
  prompt adherence.

Images are 8x8, the data's own resolution: upsampling would add no information but multiply
the cost of training and sampling. The VAE therefore has one level (latent = image size,
`vae_scale_factor` 1) and is trained to be nearly the identity, so the UNet effectively
denoises pixels, while the pipeline keeps Stable Diffusion's exact structure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizers import clip_tokenizer

__all__ = [
    "DIGITS_FEATURES_FILE",
    "DIGITS_GUIDANCE_SCALE",
    "DIGITS_HELDOUT_SIZE",
    "DIGITS_IMAGE_SIZE",
    "DIGITS_PIPELINE_DIR",
    "DIGIT_WORDS",
    "DigitsFeatureNet",
    "build_digits_pipeline",
    "digit_prompt",
    "digits_split",
    "load_digits_pipeline",
    "load_feature_network",
    "parse_digit_prompt",
    "to_unit_range",
]

DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
PROMPT_PREFIX = "a handwritten digit"

DIGITS_IMAGE_SIZE = 8
# Recommended classifier-free guidance, tuned on FID-digits and prompt adherence (DIGITS.md).
DIGITS_GUIDANCE_SCALE = 2.0
DIGITS_HELDOUT_SIZE = 300
# sklearn stores ink as 0..16; scaling to 0..255 keeps every level distinct in uint8.
_SKLEARN_MAX_INK = 16

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIGITS_PIPELINE_DIR = WEIGHTS_DIR / "digits"
DIGITS_FEATURES_FILE = WEIGHTS_DIR / "digits_features.safetensors"

# Linear betas (DDPM's), not SD's scaled_linear: the latent here is practically the image, and
# scaled_linear leaves 7 % of the signal at t=999, which sampling from pure noise never has.
# Everything else is SD 1.5's DDIM setup, so methods see the timesteps SD users sample.
DIGITS_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# SD 1.x's block layout scaled down: attention at the two finer levels, none at the coarsest,
# two layers per block (DeepCache-style methods choose a branch inside a block).
DIGITS_UNET_CONFIG: dict[str, Any] = {
    "sample_size": DIGITS_IMAGE_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 48, 64),
    "layers_per_block": 2,
    "attention_head_dim": 4,
    "cross_attention_dim": 64,
    "norm_num_groups": 16,
}

# One level: no downsampling, so the 4-channel latent is 8x8 like the image.
DIGITS_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (32,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": DIGITS_IMAGE_SIZE,
}

DIGITS_TEXT_HIDDEN_SIZE = 64


# --------------------------------------------------------------------------- prompts


def digit_prompt(label: int) -> str:
    """The prompt the model was trained on for `label` (0..9)."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label must be a digit 0..9, got {label!r}")
    return f"{PROMPT_PREFIX} {DIGIT_WORDS[int(label)]}"


def parse_digit_prompt(prompt: str) -> int | None:
    """The digit a prompt asks for, or None if it is not a digit prompt.

    Case and spacing are forgiven and a numeral is accepted ("a handwritten digit 7"), so
    evaluation code can recover labels from prompts users typed, not only generated ones.
    """
    words = prompt.lower().split()
    prefix = PROMPT_PREFIX.split()
    if len(words) != len(prefix) + 1 or words[:-1] != prefix:
        return None
    last = words[-1]
    if last in DIGIT_WORDS:
        return DIGIT_WORDS.index(last)
    if len(last) == 1 and last.isdigit():
        return int(last)
    return None


# --------------------------------------------------------------------------- data


def render_digits(values: torch.Tensor) -> torch.Tensor:
    """sklearn's ink levels (N x 8 x 8, 0..16) as white-on-black RGB uint8 (N x 3 x 8 x 8).

    Three equal channels because the pipeline, like every SD pipeline, produces RGB.
    """
    gray = torch.round(values.float() * (255 / _SKLEARN_MAX_INK)).clamp(0, 255).to(torch.uint8)
    return gray.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def digits_split(
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed train / held-out split: (train_images, train_labels, heldout_images, heldout_labels).

    All 1,797 images of `sklearn.datasets.load_digits`, stratified by label, 300 held out
    (30 per digit, give or take one) with `train_test_split(random_state=seed)`; 1,497 remain
    for training. Images are uint8 N x 3 x 8 x 8, labels int64. The models were trained with
    seed 0, so FID against the held-out part of that split measures real generalisation.
    """
    from sklearn.datasets import load_digits  # optional dependency: only data needs it
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train_x, held_x, train_y, held_y = train_test_split(
        data.images,
        data.target,
        test_size=DIGITS_HELDOUT_SIZE,
        stratify=data.target,
        random_state=seed,
    )
    return (
        render_digits(torch.from_numpy(train_x)),
        torch.from_numpy(train_y).long(),
        render_digits(torch.from_numpy(held_x)),
        torch.from_numpy(held_y).long(),
    )


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as floats in [0, 1]; float images are taken to be in [0, 1] already.

    The same rule torchmetrics uses for `normalize`, so pipeline output (`output_type="pt"`)
    and stored uint8 images can be passed interchangeably.
    """
    if images.dtype == torch.uint8:
        return images.float() / 255
    return images.float()


# --------------------------------------------------------------------------- pipeline


def small_clip_config(hidden_size: int, projection_dim: int, max_tokens: int = 77) -> CLIPTextConfig:
    """A two-layer CLIP text tower over the byte-level vocabulary: all eleven digit prompts need."""
    tokenizer = clip_tokenizer(max_tokens)
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_tokens,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _text_encoder() -> CLIPTextModel:
    return CLIPTextModel(small_clip_config(DIGITS_TEXT_HIDDEN_SIZE, DIGITS_TEXT_HIDDEN_SIZE))


def build_digits_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The digits architecture with fresh (seeded) weights: the starting point of training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**DIGITS_UNET_CONFIG)
        vae = AutoencoderKL(**DIGITS_VAE_CONFIG)
        text_encoder = _text_encoder()
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(**DIGITS_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_digits_pipeline(
    path: str | os.PathLike[str] | None = None, **from_pretrained_kwargs: Any
) -> StableDiffusionPipeline:
    """The trained pipeline shipped in the package (or saved by training at `path`)."""
    directory = Path(path) if path is not None else DIGITS_PIPELINE_DIR
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no trained digits pipeline in {directory}; train one with "
            f"`python -m fastdiff.models.train digits --out {directory}`"
        )
    pipe = DiffusionPipeline.from_pretrained(str(directory), **from_pretrained_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- feature network


class DigitsFeatureNet(nn.Module):
    """Digit classifier whose penultimate layer is the feature space of FID-digits.

    Inception features mean nothing for 8x8 digits, and torchmetrics accepts any module that
    maps uint8 images to N x D features. `forward` takes images of any size (torchmetrics
    probes with 299x299) and brings them to the 8x8 gray input the network was trained on,
    with area averaging so that upsampled digits map back to the original pixels. The
    features are the pre-activation of the last hidden layer: no unit is dead there, so the
    covariance FID needs stays full-rank.
    """

    num_features: int = 64

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, self.num_features),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(self.num_features, 10))

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """N x C x H x W (uint8, or float in [0, 1]) -> N x 1 x 8 x 8 in [-1, 1]."""
        if images.ndim != 4:
            raise ValueError(f"expected N x C x H x W images, got shape {tuple(images.shape)}")
        gray = to_unit_range(images).mean(dim=1, keepdim=True)
        if gray.shape[-2:] != (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE):
            gray = F.interpolate(gray, size=(DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), mode="area")
        return gray * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """N x `num_features` float32 features (what FID compares)."""
        return self.features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit per image (LongTensor[N])."""
        return self.logits(images).argmax(dim=1)


def load_feature_network(path: str | os.PathLike[str] | None = None) -> DigitsFeatureNet:
    """The trained feature network, frozen; it has no dropout or batch norm, so train/eval mode
    (which torchmetrics may toggle) cannot change its output."""
    file = Path(path) if path is not None else DIGITS_FEATURES_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"no trained digits feature network at {file}; train one with "
            f"`python -m fastdiff.models.train features --out {file}`"
        )
    net = DigitsFeatureNet()
    net.load_state_dict(load_file(str(file)))
    return net.eval().requires_grad_(False)
