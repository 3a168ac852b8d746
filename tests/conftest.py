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


def tiny_diffusion_gemma(seed: int = 0, canvas_length: int = 8):
    """A random-weight transformers ``DiffusionGemmaForBlockDiffusion`` (about 380 k parameters,
    vocabulary 64) and a word-level tokenizer for it: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, then
    ``t3`` … ``t63``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        DiffusionGemmaConfig,
        DiffusionGemmaForBlockDiffusion,
        PreTrainedTokenizerFast,
    )

    config = DiffusionGemmaConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 16,
                     "sliding_window": 8, "max_position_embeddings": 256, "pad_token_id": 0, "eos_token_id": 1,
                     "bos_token_id": 2, "num_experts": 2, "top_k_experts": 1, "moe_intermediate_size": 32,
                     "layer_types": ["sliding_attention", "full_attention"]},
        vision_config={"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8},
        canvas_length=canvas_length, image_token_id=63, boi_token_id=61, eoi_token_id=62)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, 64)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>")
    return model, tokenizer
