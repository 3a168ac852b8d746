"""The denoiser anatomy: its descriptions match what the models really run, unknown classes are
refused by name, a new family is one entry, and no method probes an architecture itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    Flux2Transformer2DModel,
    HunyuanVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
)

import fastdiff
from fastdiff.anatomy import FAMILIES, UnknownDenoiser, anatomy_of, register_family
from fastdiff.anatomy.transformers import _build
from fastdiff.models import build_builtin
from fastdiff.runner import GenerationRequest, call_kwargs

PACKAGE = Path(fastdiff.__file__).resolve().parent


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-wan"])
def test_blocks_run_in_the_described_order_with_the_described_streams(name):
    """One real step: every block is called in anatomy order, and each call's image (and text)
    stream comes in and goes out where the block's BlockIO says."""
    pipe = build_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.transformer
    anatomy = anatomy_of(denoiser)
    order: list[str] = []
    handles = []

    def watch(block):
        def hook(module, args, kwargs, output):
            order.append(block.path)
            image_in, image_out = block.io.image_in(args, kwargs), block.io.image_of(output)
            assert image_in.shape == image_out.shape, block.path
            if block.io.dual:
                text_in, text_out = block.io.text_in(args, kwargs), block.io.text_of(output)
                assert text_in is not None and text_in.dim() == 3, block.path
                assert text_out is None or text_out.shape == text_in.shape, block.path
                skipped = block.io.passthrough(args, kwargs)
                assert skipped[block.io.image_out] is image_in and skipped[block.io.text_out] is text_in
        return hook

    for block in anatomy.blocks:
        handles.append(denoiser.get_submodule(block.path).register_forward_hook(watch(block), with_kwargs=True))
    try:
        request = GenerationRequest(prompt="1" if name == "tiny-dit" else "a red circle", steps=2).with_model_defaults(name)
        pipe(**call_kwargs(pipe, request), output_type="np")
    finally:
        for handle in handles:
            handle.remove()
    calls = len(order) // len(anatomy.blocks)
    assert order == anatomy.block_paths_in_order * calls and calls >= 1
    for kind, paths in anatomy.attention.items():
        assert all(isinstance(denoiser.get_submodule(p), torch.nn.Module) for p in paths), kind
    for path in anatomy.time_embedding:
        denoiser.get_submodule(path)
    if anatomy.tokens is not None:
        denoiser.get_submodule(anatomy.tokens.embed)
        denoiser.get_submodule(anatomy.tokens.output_norm)


TINY = {
    "sana": lambda: SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1),
    "qwenimage": lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4)),
    "cogvideox": lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=8),
    "hunyuanvideo": lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4)),
    "flux2": lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2)),
}
EXPECTED = {  # stages with block counts, and attention kinds, of the tiny instances above
    "sana": ({"blocks": 2}, {"self", "cross"}),
    "qwenimage": ({"joint": 2}, {"joint"}),
    "cogvideox": ({"joint": 2}, {"joint"}),
    "hunyuanvideo": ({"dual": 1, "single": 2}, {"joint"}),
    "flux2": ({"dual": 1, "single": 2}, {"joint"}),
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_families_without_a_builtin_are_read_from_real_instances(family):
    denoiser = TINY[family]()
    anatomy = anatomy_of(denoiser)
    stages, kinds = EXPECTED[family]
    assert anatomy.family == family
    assert {s: sum(b.stage == s for b in anatomy.blocks) for s in anatomy.stages} == stages
    assert {k for k, v in anatomy.attention.items() if v} == kinds
    for path in (*anatomy.block_paths_in_order, *(p for v in anatomy.attention.values() for p in v),
                 *anatomy.time_embedding):
        denoiser.get_submodule(path)
    # methods plan on them from the anatomy alone
    assert fastdiff.DeepCache(interval=2, branch=0).modules(denoiser) == anatomy.block_paths_in_order


def test_unknown_denoiser_is_refused_by_name_and_subclasses_match():
    with pytest.raises(UnknownDenoiser, match=r"does not know the denoiser class Linear; known families: .*flux"):
        anatomy_of(torch.nn.Linear(2, 2))

    class Custom(SanaTransformer2DModel):
        pass

    custom = Custom(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                    caption_channels=16, sample_size=8, patch_size=1)
    assert anatomy_of(custom).family == "sana"


def test_a_new_family_is_one_entry():
    class TwoBlocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    try:
        register_family("twoblocks", ["TwoBlocks"], _build("twoblocks", [("layers", "blocks")], {}, []))
        anatomy = anatomy_of(TwoBlocks())
        assert anatomy.family == "twoblocks" and anatomy.block_paths_in_order == ["layers.0", "layers.1"]
    finally:
        FAMILIES.pop("twoblocks", None)


def test_no_method_probes_an_architecture_itself():
    """Methods and patch layers ask the anatomy; only it names a family's modules."""
    names = re.compile(r"""["'](down_blocks|up_blocks|mid_block|transformer_blocks|single_transformer_blocks)["']""")
    offenders = []
    for folder in ("caching", "parallel", "core"):
        for file in (PACKAGE / folder).glob("*.py"):
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if names.search(line) or re.search(r"hasattr\([^)]*(down_blocks|transformer_blocks)", line):
                    offenders.append(f"{file.name}:{number}: {line.strip()}")
    assert not offenders, offenders
