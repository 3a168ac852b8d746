"""Built-in offline models: they must be real, runnable, reproducible diffusers pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from PIL import Image

from fastdiff.models import (
    BUILTIN_MODELS,
    SD15_UNET_CONFIG,
    ModelLoadError,
    build_builtin,
    builtin_info,
    clip_tokenizer,
    default_size,
    load_pipeline,
    t5_tokenizer,
)
from fastdiff.models.tokenizers import CLIP_MERGES_FILE, CLIP_VOCAB_FILE, write_clip_tokenizer_files

# The flow-matching families (SD3, Flux, Wan video) have their own file: test_builtin_families.py.
FAMILY_MODELS = ("tiny-sd3", "tiny-flux", "tiny-wan")
TINY_MODELS = tuple(name for name in BUILTIN_MODELS if name.startswith("tiny-") and name not in FAMILY_MODELS)
UNICODE_TEXT = "Größe – ça  va? 日本語の猫 😀 Ωmega Привет"


def _generate(pipe: DiffusionPipeline, name: str, seed: int = 0, **overrides: Any) -> Image.Image:
    """Two steps of the model's own recommended call, with a unicode prompt where it takes one."""
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**builtin_info(name).call_kwargs(), "num_inference_steps": 2, "output_type": "pil", **overrides}
    if name == "tiny-dit":
        kwargs["class_labels"] = pipe.get_label_ids(["tabby cat"])
    else:
        kwargs["prompt"] = UNICODE_TEXT
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).images[0]


def _state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{key}": value
        for component, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


def test_registry_lists_all_builtins() -> None:
    assert set(BUILTIN_MODELS) == {
        "tiny-sd", "tiny-sdxl", "tiny-pixart", "tiny-dit", "tiny-sd3", "tiny-flux", "tiny-wan",
        "sd15-arch", "sd3-arch", "wan-arch", "digits", "digits-sd3",
    }
    assert default_size("tiny-sd") == (64, 64)
    assert default_size("sd15-arch") == (256, 256)
    assert "height" not in builtin_info("tiny-dit").call_kwargs()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_builtin_generates_image_of_default_size(name: str) -> None:
    pipe = build_builtin(name)
    assert type(pipe).__name__ == builtin_info(name).pipeline_class
    image = _generate(pipe, name)
    height, width = default_size(name)
    assert isinstance(image, Image.Image)
    assert image.size == (width, height)
    assert np.asarray(image).std() > 0


@pytest.mark.parametrize("name", TINY_MODELS)
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
    build_builtin("tiny-sd")
    assert torch.equal(torch.rand(3), expected)


def test_models_are_in_inference_mode() -> None:
    pipe = build_builtin("tiny-pixart")
    assert not pipe.text_encoder.training and not pipe.transformer.training


def test_torch_dtype() -> None:
    pipe = build_builtin("tiny-sd", torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16


def test_unknown_builtin_names_the_model_argument() -> None:
    with pytest.raises(ValueError, match="model") as info:
        build_builtin("tiny-nope")
    assert all(name in str(info.value) for name in BUILTIN_MODELS)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_save_and_reload_gives_same_image(name: str, tmp_path: Path) -> None:
    overrides = {"height": 64, "width": 64, "use_resolution_binning": False} if name == "tiny-pixart" else {}
    pipe = build_builtin(name, seed=7)
    expected = _generate(pipe, name, seed=1, **overrides)
    pipe.save_pretrained(tmp_path)
    reloaded = load_pipeline(tmp_path)
    assert type(reloaded) is type(pipe)
    assert np.array_equal(np.asarray(_generate(reloaded, name, seed=1, **overrides)), np.asarray(expected))


def test_load_pipeline_builtin_and_dtype() -> None:
    pipe = load_pipeline("tiny-sd", torch_dtype=torch.bfloat16, seed=2)
    assert pipe.unet.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="variant"):
        load_pipeline("tiny-sd", variant="fp16")


def test_load_pipeline_missing_path_does_not_reach_the_hub(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model="):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ValueError, match="model="):
        load_pipeline("./missing/pipeline")


def test_load_pipeline_hub_failure_names_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def offline(model: str, **kwargs: Any) -> DiffusionPipeline:
        calls.append(model)
        raise OSError("no connection")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match=r"'org/some-model' is not a built-in model.*OSError: no connection"):
        load_pipeline("org/some-model")
    assert calls == ["org/some-model"]


def test_a_saved_pipeline_loads_without_deprecation_warnings(tmp_path: Path) -> None:
    """diffusers >= 0.42 takes `dtype=`; `torch_dtype=` would print a FutureWarning on every load."""
    import warnings

    build_builtin("tiny-sd").save_pretrained(tmp_path / "saved")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(tmp_path / "saved", torch_dtype=torch.float32)
    assert not [w for w in caught if "dtype" in str(w.message)], [str(w.message) for w in caught]


def test_sd15_arch_unet_is_the_real_sd15_shape() -> None:
    """Checked on the meta device: the real shape without allocating 3.4 GB."""
    assert SD15_UNET_CONFIG["block_out_channels"] == (320, 640, 1280, 1280)
    assert SD15_UNET_CONFIG["cross_attention_dim"] == 768
    assert SD15_UNET_CONFIG["attention_head_dim"] == 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert unet.config.sample_size == 64 and unet.config.layers_per_block == 2


def test_clip_tokenizer_handles_any_text() -> None:
    tokenizer = clip_tokenizer()
    encoded = tokenizer(UNICODE_TEXT, padding="max_length", max_length=77, truncation=True)
    ids = encoded.input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    body = ids[1 : ids.index(tokenizer.eos_token_id)]
    assert body and tokenizer.unk_token_id not in body
    decoded = tokenizer.decode(ids, skip_special_tokens=True)  # CLIP lowercases, re-spaces punctuation
    assert decoded.replace(" ", "") == UNICODE_TEXT.lower().replace(" ", "")


def test_shipped_clip_files_match_generator(tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[1] / "fastdiff" / "models" / "data"
    write_clip_tokenizer_files(tmp_path)
    for filename in (CLIP_VOCAB_FILE, CLIP_MERGES_FILE):
        assert (data / filename).read_bytes() == (tmp_path / filename).read_bytes()


def test_t5_tokenizer_round_trips(tmp_path: Path) -> None:
    tokenizer = t5_tokenizer()
    kwargs = dict(padding="max_length", max_length=32, truncation=True, add_special_tokens=True)
    encoded = tokenizer(UNICODE_TEXT, return_attention_mask=True, **kwargs)
    assert len(encoded.input_ids) == 32 and tokenizer.eos_token_id in encoded.input_ids
    latin = "Größe ça Ωmega"
    assert tokenizer.decode(tokenizer(latin).input_ids, skip_special_tokens=True) == latin
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded(UNICODE_TEXT, **kwargs).input_ids == encoded.input_ids
