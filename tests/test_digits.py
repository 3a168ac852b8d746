"""The trained `digits` reference model, its feature network, and the training entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from fastdiff.models import (
    DIGIT_WORDS,
    build_builtin,
    builtin_info,
    digit_prompt,
    load_feature_network,
    parse_digit_prompt,
)
from fastdiff.models.digits import DIGITS_IMAGE_SIZE, DigitsFeatureNet


@pytest.fixture(scope="module")
def digits_pipe() -> StableDiffusionPipeline:
    pipe = build_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def feature_net() -> DigitsFeatureNet:
    return load_feature_network()


def test_prompts_round_trip() -> None:
    assert len(DIGIT_WORDS) == 10
    for label in range(10):
        assert parse_digit_prompt(digit_prompt(label)) == label
    assert digit_prompt(7) == "a handwritten digit seven"
    assert parse_digit_prompt("  A Handwritten   digit SEVEN ") == 7
    assert parse_digit_prompt("a handwritten digit 3") == 3
    for other in ("", "a handwritten digit", "a handwritten digit ten", "a red circle", "digit seven"):
        assert parse_digit_prompt(other) is None
    with pytest.raises(ValueError):
        digit_prompt(10)


def test_builtin_loads_trained_sd_pipeline(digits_pipe: StableDiffusionPipeline) -> None:
    info = builtin_info("digits")
    assert isinstance(digits_pipe, StableDiffusionPipeline)
    assert (info.height, info.width, info.num_inference_steps) == (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 50)
    assert digits_pipe.vae_scale_factor == 1
    assert digits_pipe.unet.config.layers_per_block == 2
    assert len(digits_pipe.unet.config.block_out_channels) >= 2
    assert digits_pipe.unet.mid_block is not None
    # The weights are trained, not seeded: the seed argument must not change them.
    other = build_builtin("digits", seed=5)
    for key, value in digits_pipe.unet.state_dict().items():
        assert torch.equal(value, other.unet.state_dict()[key])


def test_generates_the_prompted_digit(digits_pipe: StableDiffusionPipeline, feature_net: DigitsFeatureNet) -> None:
    from fastdiff.models.train import generate_digits

    labels = list(range(10))
    images = generate_digits(digits_pipe, labels, seeds=[100 + label for label in labels], num_inference_steps=20)
    assert images.shape == (10, 3, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
    assert images.dtype == torch.uint8
    correct = (feature_net.classify(images) == torch.tensor(labels)).sum().item()
    assert correct >= 7, f"only {correct}/10 generated digits recognised"


@pytest.mark.parametrize("size", [8, 32, 299])
def test_feature_network_takes_any_size(feature_net: DigitsFeatureNet, size: int) -> None:
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    features = feature_net(images)
    assert features.shape == (3, feature_net.num_features)
    assert features.dtype == torch.float32
    assert torch.equal(features, feature_net(images))
    assert feature_net.classify(images).shape == (3,)


def test_feature_network_recognises_held_out_digits(feature_net: DigitsFeatureNet) -> None:
    pytest.importorskip("sklearn")
    from fastdiff.models import digits_split

    train_images, _, held_images, held_labels = digits_split()
    assert (len(train_images), len(held_images)) == (1497, 300)
    assert held_images.shape[1:] == (3, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
    assert torch.bincount(held_labels).min() >= 29
    accuracy = (feature_net.classify(held_images) == held_labels).float().mean().item()
    assert accuracy >= 0.95
    # Upsampled digits average back to the same 8x8 input, so they are recognised alike.
    upsampled = held_images.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    assert torch.allclose(feature_net(upsampled), feature_net(held_images), atol=1e-5)


def test_fid_digits_uses_feature_network(feature_net: DigitsFeatureNet) -> None:
    pytest.importorskip("torchmetrics")
    from fastdiff.models import digits_split
    from fastdiff.models.train import frechet_distance

    train_images, _, held_images, _ = digits_split()
    noise = torch.randint(0, 256, held_images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    floor = frechet_distance(feature_net, train_images, held_images)
    assert floor < frechet_distance(feature_net, train_images, noise) / 10


def test_training_runs_and_saves_loadable_pipeline(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from fastdiff.models.train import train_digits, train_feature_network

    pipe = train_digits(tmp_path / "digits", steps=2, vae_steps=2, batch_size=8)
    reloaded = DiffusionPipeline.from_pretrained(str(tmp_path / "digits"))
    assert isinstance(reloaded, StableDiffusionPipeline)
    assert reloaded.vae.config.scaling_factor == pytest.approx(pipe.vae.config.scaling_factor)
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, reloaded.unet.state_dict()[key])
    reloaded.set_progress_bar_config(disable=True)
    image = reloaded(digit_prompt(3), num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)

    net, accuracy = train_feature_network(tmp_path / "features.safetensors", steps=2)
    assert 0.0 <= accuracy <= 1.0
    assert torch.equal(load_feature_network(tmp_path / "features.safetensors")(image), net(image))


@pytest.mark.slow
def test_training_is_reproducible_from_the_seed() -> None:
    pytest.importorskip("sklearn")
    from fastdiff.models.train import train_digits

    def weights(seed: int) -> dict[str, torch.Tensor]:
        pipe = train_digits(seed=seed, steps=2, vae_steps=2, batch_size=8)
        return {**pipe.unet.state_dict(), **{f"vae.{k}": v for k, v in pipe.vae.state_dict().items()}}

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(value, again[key]) for key, value in first.items())
    assert not all(torch.equal(value, other[key]) for key, value in first.items())
