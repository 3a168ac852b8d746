"""Transformer denoisers: DiT and PixArt (one stream, cross-attention), SD3/SD3.5 and Flux (MMDiT:
an image and a text stream joined in attention; Flux adds single-stream blocks), Wan (video:
frames × rows of tokens, cross-attention to the text), and further families that are one entry
each (Sana, QwenImage, CogVideoX, HunyuanVideo, Flux.2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import GUIDANCE_STYLES, Anatomy, Block, BlockIO, TokenLayout, register_family


def _metadata(block_class: type) -> Any:
    """diffusers' own record of a block class's calling convention (used by its FirstBlockCache)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for klass in block_class.__mro__:
        try:
            return TransformerBlockRegistry.get(klass)
        except ValueError:
            continue
    return None


def block_io(block: torch.nn.Module, overrides: Mapping[str, Any] | None = None) -> BlockIO:
    """A block's streams from diffusers' metadata, with ``overrides`` where it is silent or wrong."""
    meta = _metadata(type(block))
    values: dict[str, Any] = {}
    if meta is not None:
        dual = meta.return_encoder_hidden_states_index is not None
        values = {"image_arg": meta.hidden_states_argument_name,
                  "text_arg": meta.encoder_hidden_states_argument_name if dual else None,
                  "image_out": meta.return_hidden_states_index or 0,
                  "text_out": meta.return_encoder_hidden_states_index}
    values.update(overrides or {})
    return BlockIO(forward=type(block).forward, **values)


def _stages(denoiser: torch.nn.Module, stages: Sequence[tuple[str, str]]) -> tuple[Block, ...]:
    """Blocks of each ``(attribute, stage)`` list, in the order the model runs them."""
    blocks: list[Block] = []
    for attribute, stage in stages:
        for i, block in enumerate(getattr(denoiser, attribute, None) or []):
            blocks.append(Block(f"{attribute}.{i}", stage, block_io(block)))
    return tuple(blocks)


def _attention(denoiser: torch.nn.Module, blocks: Sequence[Block], kinds: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Attention modules of every block, by kind, from the blocks' child names."""
    modules = dict(denoiser.named_modules())
    found: dict[str, list[str]] = {}
    for block in blocks:
        for name, kind in kinds.items():
            if isinstance(modules.get(f"{block.path}.{name}"), torch.nn.Module):
                found.setdefault(kind, []).append(f"{block.path}.{name}")
    return {k: tuple(v) for k, v in found.items()}


def _patch(denoiser: torch.nn.Module) -> tuple[int, ...]:
    size = denoiser.config.patch_size
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _build(family: str, stages: Sequence[tuple[str, str]], attention: Mapping[str, str],
           time_embedding: Any, tokens: Any = None, guidance: str = "batch") -> Any:
    """An anatomy builder from the family's facts; ``time_embedding`` and ``tokens`` may be
    functions of the denoiser where they depend on its config. ``guidance``: how the family's
    pipelines apply classifier-free guidance (one of ``GUIDANCE_STYLES``)."""
    if guidance not in GUIDANCE_STYLES:
        raise ValueError(f"{family}: guidance must be one of {GUIDANCE_STYLES}, got {guidance!r}")

    def build(denoiser: torch.nn.Module) -> Anatomy:
        blocks = _stages(denoiser, stages)
        time = time_embedding(denoiser) if callable(time_embedding) else time_embedding
        layout = tokens(denoiser) if callable(tokens) else tokens
        return Anatomy(family=family, denoiser=type(denoiser).__name__, blocks=blocks,
                       attention=_attention(denoiser, blocks, attention), time_embedding=tuple(time), tokens=layout,
                       guidance=guidance)

    return build


SELF_CROSS = {"attn1": "self", "attn2": "cross"}

register_family(
    "dit", ["DiTTransformer2DModel"],
    _build("dit", [("transformer_blocks", "blocks")], SELF_CROSS,
           lambda d: [f"transformer_blocks.{i}.norm1.emb" for i in range(len(d.transformer_blocks))],
           lambda d: TokenLayout("pos_embed", "norm_out", _patch(d), text="none")),
    "DiTPipeline",
)
register_family(
    "pixart", ["PixArtTransformer2DModel"],
    _build("pixart", [("transformer_blocks", "blocks")], SELF_CROSS, ["adaln_single"],
           lambda d: TokenLayout("pos_embed", "norm_out", _patch(d), text="cross")),
    "PixArtAlphaPipeline, PixArtSigmaPipeline",
)
register_family(
    "sd3", ["SD3Transformer2DModel"],
    # joint attention runs over [image; text]; SD3.5's attn2 attends over the image tokens only
    _build("sd3", [("transformer_blocks", "joint")], {"attn": "joint", "attn2": "self"}, ["time_text_embed"],
           lambda d: TokenLayout("pos_embed", "norm_out", _patch(d), text="joint", text_first=False)),
    "StableDiffusion3Pipeline (SD3, SD3.5) and its img2img / inpaint variants",
)
register_family(
    "flux", ["FluxTransformer2DModel"],
    # the pipeline packs 2x2 latent pixels into one token and gives their places as img_ids; the
    # rotary table (pos_embed of [txt_ids; img_ids]) has one row per token, text first, as does
    # every attention's sequence; guidance_scale is an input of the distilled model, and true
    # classifier-free guidance (true_cfg_scale) runs as a second denoiser call
    _build("flux", [("transformer_blocks", "dual"), ("single_transformer_blocks", "single")], {"attn": "joint"},
           ["time_text_embed"],
           TokenLayout("x_embedder", "norm_out", (2, 2), packed=True, positions="img_ids", text="joint",
                       text_first=True, rotary="pos_embed", rotary_token_dim=0),
           guidance="embedded"),
    "FluxPipeline and its img2img / inpaint / Kontext variants",
)
register_family(
    "wan", ["WanTransformer3DModel"],
    # rope's table is (cos, sin), each 1 x tokens x 1 x dim over frames x rows x columns; the
    # pipeline calls the transformer once for the prompt and once for the negative prompt
    _build("wan", [("blocks", "blocks")], SELF_CROSS, ["condition_embedder"],
           lambda d: TokenLayout("patch_embedding", "norm_out", tuple(d.config.patch_size), embed_output="grid",
                                 frames=True, text="cross", rotary="rope", rotary_token_dim=1),
           guidance="calls"),
    "WanPipeline (text-to-video), WanImageToVideoPipeline",
)
# Families whose blocks and attention are described (caching and early exiting work); their
# token layouts are not, so patch parallelism refuses them by name.
register_family("sana", ["SanaTransformer2DModel"],
                _build("sana", [("transformer_blocks", "blocks")], SELF_CROSS, ["time_embed"]), "SanaPipeline")
register_family("qwenimage", ["QwenImageTransformer2DModel"],
                _build("qwenimage", [("transformer_blocks", "joint")], {"attn": "joint"}, ["time_text_embed"],
                       guidance="calls"),
                "QwenImagePipeline")
register_family("cogvideox", ["CogVideoXTransformer3DModel"],
                _build("cogvideox", [("transformer_blocks", "joint")], {"attn1": "joint"}, ["time_embedding"]),
                "CogVideoXPipeline")
register_family("hunyuanvideo", ["HunyuanVideoTransformer3DModel"],
                _build("hunyuanvideo", [("transformer_blocks", "dual"), ("single_transformer_blocks", "single")],
                       {"attn": "joint"}, ["time_text_embed"], guidance="embedded"),
                "HunyuanVideoPipeline")
register_family("flux2", ["Flux2Transformer2DModel"],
                _build("flux2", [("transformer_blocks", "dual"), ("single_transformer_blocks", "single")],
                       {"attn": "joint"}, ["time_guidance_embed"], guidance="embedded"),
                "Flux2Pipeline")
