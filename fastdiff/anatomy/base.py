"""What a denoiser is made of, asked in one place by every method and patch layer.

A method must not probe an architecture itself (``hasattr(denoiser, "down_blocks")``): the
answers differ per family and spread bugs when each method guesses. An :class:`Anatomy` says,
for one denoiser instance, which blocks run in which order and in which stage, what each block
takes and returns (one tensor, or an image and a text stream at given tuple positions), which of
its attention modules are self-, cross- or joint attention, how its image tokens lie (rows,
frames × rows, text joined in attention, rotary tables), where the time embedding is made, and
for UNets the encoder / mid / decoder split. A family is one :func:`register_family` entry.

Block calling conventions come from diffusers' own metadata where it has them
(``diffusers.hooks._helpers.TransformerBlockRegistry``, which its FirstBlockCache and TaylorSeer
use); entries here only add what it is silent on.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ATTENTION_KINDS = ("self", "cross", "joint")
TEXT_LAYOUTS = ("none", "cross", "joint")
# How a family's pipelines apply classifier-free guidance: ``batch`` (the unconditional and the
# conditional input stacked in one denoiser call), ``calls`` (two denoiser calls per step: Wan,
# QwenImage), ``embedded`` (a guidance-distilled model takes the scale as an input; true guidance,
# where a pipeline offers it, runs as a second call: Flux, HunyuanVideo, Flux.2).
GUIDANCE_STYLES = ("batch", "calls", "embedded")


# -- blocks -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockIO:
    """How a block is called and what it returns.

    ``image_out`` / ``text_out``: positions of the image and text streams in the tuple a block
    returns (``None`` for ``text_out``: the block hands on no text stream). A block that returns a
    tensor returns its image stream; a dataclass or a tuple with ``image_out=0`` has its image
    stream first (UNet layers, ``Transformer2DModel``). ``image_arg`` / ``text_arg`` name the
    arguments the streams come in by (looked up positionally through the forward signature when
    passed positionally).
    """

    image_arg: str = "hidden_states"
    text_arg: str | None = None
    image_out: int = 0
    text_out: int | None = None
    forward: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

    @property
    def dual(self) -> bool:
        """Whether the block hands on a text stream beside the image stream (MMDiT)."""
        return self.text_out is not None

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        if self.forward is not None:
            names = _parameter_names(self.forward)
            if name in names and names.index(name) < len(args):
                return args[names.index(name)]
        if name == self.image_arg and args:
            return args[0]
        return None

    def image_in(self, args: tuple, kwargs: dict) -> Any:
        value = self._argument(self.image_arg, args, kwargs)
        return value if value is not None else next(iter(kwargs.values()), None)

    def text_in(self, args: tuple, kwargs: dict) -> Any:
        return None if self.text_arg is None else self._argument(self.text_arg, args, kwargs)

    def image_of(self, output: Any) -> torch.Tensor | None:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)):
            value = output[self.image_out] if len(output) > self.image_out else None
            return value if isinstance(value, torch.Tensor) else None
        if dataclasses.is_dataclass(output) and not isinstance(output, type):
            first = getattr(output, dataclasses.fields(output)[0].name)
            return first if isinstance(first, torch.Tensor) else None
        return None

    def text_of(self, output: Any) -> torch.Tensor | None:
        if self.text_out is None or not isinstance(output, (tuple, list)) or len(output) <= self.text_out:
            return None
        value = output[self.text_out]
        return value if isinstance(value, torch.Tensor) else None

    def rebuild(self, output: Any, image: torch.Tensor, text: torch.Tensor | None = None) -> Any:
        """``output`` (same container) with its streams replaced; ``text`` only where it has one."""
        if isinstance(output, torch.Tensor):
            return image
        if isinstance(output, (tuple, list)):
            items = list(output)
            items[self.image_out] = image
            if self.text_out is not None and text is not None:
                items[self.text_out] = text
            return type(output)(items)
        name = dataclasses.fields(output)[0].name
        return dataclasses.replace(output, **{name: image})

    def passthrough(self, args: tuple, kwargs: dict) -> Any:
        """What the block hands on when it is skipped: its inputs, in the layout it returns."""
        image = self.image_in(args, kwargs)
        if self.text_out is None:
            return image
        items: list[Any] = [None] * (max(self.image_out, self.text_out) + 1)
        items[self.image_out] = image
        items[self.text_out] = self.text_in(args, kwargs)
        return tuple(items)


SINGLE_STREAM = BlockIO()


@functools.lru_cache(maxsize=None)
def _parameter_names(forward: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(forward).parameters if p != "self"]


@dataclass(frozen=True)
class Block:
    """One block of a transformer denoiser, in run order."""

    path: str
    stage: str
    io: BlockIO = SINGLE_STREAM


# -- tokens -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """How a transformer's image tokens lie, for splitting them across processes.

    ``embed``: the module whose output are the image tokens (``"tokens"``: ``B × N × C`` in
    row-major order of the token grid, frame by frame; ``"grid"``: a ``B × C × [F ×] H × W`` map
    the model then flattens). ``output_norm``: the module that first needs every token again
    (tokens are gathered before it). ``patch``: latent pixels per token along (frames,) rows and
    columns. ``frames``: the tokens are frames × rows × columns (video). ``packed``: the denoiser
    is called on tokens already (Flux packs 2×2 latent patches in the pipeline), so its input has
    no rows to read; ``positions`` then names the denoiser argument that gives each image token's
    ``(·, row, column)`` (Flux: ``img_ids``). ``text``: where text meets the image — ``none``
    (class-conditional), ``cross`` (cross-attention to a text context every process holds), or
    ``joint`` (text tokens are a second stream joined with the image tokens in attention).
    ``text_first``: in a joint attention's sequence, and in the rotary table, the text tokens come
    before the image tokens (Flux: ``[text; image]``; SD3 joins them as ``[image; text]``).
    ``rotary``: the module making the rotary table for the whole sequence (its output: a tensor or
    a tuple of tensors), and ``rotary_token_dim`` the dimension along which its rows are tokens, so
    a process can cut out its own rows.
    """

    embed: str
    output_norm: str
    patch: tuple[int, ...]
    embed_output: str = "tokens"
    frames: bool = False
    packed: bool = False
    positions: str | None = None
    text: str = "none"
    text_first: bool = False
    rotary: str | None = None
    rotary_token_dim: int = 0

    def __post_init__(self) -> None:
        if self.text not in TEXT_LAYOUTS:
            raise ValueError(f"TokenLayout.text must be one of {TEXT_LAYOUTS}, got {self.text!r}")
        if self.embed_output not in ("tokens", "grid"):
            raise ValueError(f"TokenLayout.embed_output must be 'tokens' or 'grid', got {self.embed_output!r}")
        if self.packed and self.positions is None:
            raise ValueError("TokenLayout: packed tokens need `positions`, the argument that says where each lies")


# -- UNets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetParts:
    """A UNet's encoder / mid / decoder split: what runs before the skip connections are consumed."""

    conv_in: str
    down: tuple[str, ...]
    mid: str | None
    up: tuple[str, ...]

    @property
    def encoder(self) -> tuple[str, ...]:
        """Everything whose output the decoder consumes: input conv, down blocks, mid block."""
        return (self.conv_in, *self.down, *((self.mid,) if self.mid else ()))


# -- the anatomy ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Anatomy:
    """Everything a method may know about one denoiser. Build it with :func:`anatomy_of`."""

    family: str
    denoiser: str  # its class name, for messages
    blocks: tuple[Block, ...]
    attention: Mapping[str, tuple[str, ...]]
    time_embedding: tuple[str, ...]
    tokens: TokenLayout | None = None
    unet: UNetParts | None = None
    guidance: str = "batch"  # one of GUIDANCE_STYLES
    layer_paths: Callable[[str], list[str]] | None = field(default=None, compare=False, repr=False)

    @property
    def is_unet(self) -> bool:
        return self.unet is not None

    @property
    def stages(self) -> tuple[str, ...]:
        seen: list[str] = []
        for block in self.blocks:
            if block.stage not in seen:
                seen.append(block.stage)
        return tuple(seen)

    @property
    def block_paths_in_order(self) -> list[str]:
        return [b.path for b in self.blocks]

    def io(self, path: str) -> BlockIO:
        """How the module at ``path`` is called and what it returns (single-stream when unknown:
        UNet layers, whose first output is what they hand on)."""
        for block in self.blocks:
            if block.path == path:
                return block.io
        return SINGLE_STREAM

    def paths(self, granularity: str = "block") -> list[str]:
        """Cacheable modules in run order: a transformer's blocks (every stage), or a UNet's
        layers at ``granularity`` (``layer``, ``attention`` or ``block``)."""
        if self.layer_paths is not None:
            return self.layer_paths(granularity)
        return self.block_paths_in_order

    def attention_paths(self, kind: str) -> tuple[str, ...]:
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        return tuple(self.attention.get(kind, ()))

    def describe(self) -> str:
        """A short text for messages and the docs: family, stages with block counts, attention."""
        stages = ", ".join(f"{s} {sum(b.stage == s for b in self.blocks)}" for s in self.stages) or "no blocks"
        kinds = ", ".join(f"{k} {len(v)}" for k, v in self.attention.items() if v) or "none"
        return f"{self.denoiser} ({self.family}): blocks {stages}; attention {kinds}"


# -- registry ---------------------------------------------------------------------------------------
Builder = Callable[[torch.nn.Module], Anatomy]


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]  # denoiser class names (subclasses match too)
    build: Builder
    pipelines: str = ""  # for the docs: which pipelines use it


FAMILIES: dict[str, Family] = {}


def register_family(name: str, classes: Sequence[str], build: Builder, pipelines: str = "") -> None:
    """Teach fastdiff a denoiser family: the class names it matches (subclasses too) and a
    function that reads an instance into an :class:`Anatomy`."""
    FAMILIES[name] = Family(name, tuple(classes), build, pipelines)
    _CACHE.clear()  # a denoiser read before may belong to the new family


def family_of(denoiser: torch.nn.Module) -> Family | None:
    for klass in type(denoiser).__mro__:
        for family in FAMILIES.values():
            if klass.__name__ in family.classes:
                return family
    return None


class UnknownDenoiser(TypeError):
    """A denoiser class no family describes."""


_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, Anatomy] = weakref.WeakKeyDictionary()


def anatomy_of(denoiser: torch.nn.Module, method: str = "fastdiff") -> Anatomy:
    """The anatomy of ``denoiser``; a clear error naming its class when no family knows it.
    Read once per instance (methods ask at every denoiser call)."""
    known = _CACHE.get(denoiser)
    if known is not None:
        return known
    family = family_of(denoiser)
    if family is None:
        known_families = ", ".join(f"{f.name} ({'/'.join(f.classes)})" for f in FAMILIES.values())
        raise UnknownDenoiser(
            f"{method}: fastdiff does not know the denoiser class {type(denoiser).__name__}; known families: "
            f"{known_families}. A new family is one fastdiff.anatomy.register_family(...) entry"
        )
    anatomy = _CACHE[denoiser] = family.build(denoiser)
    return anatomy


def children_named(root: torch.nn.Module, prefix: str, kinds: Mapping[str, str]) -> dict[str, list[str]]:
    """Attention modules directly under ``root`` (found by child name), grouped by kind."""
    found: dict[str, list[str]] = {}
    for name, kind in kinds.items():
        if isinstance(getattr(root, name, None), torch.nn.Module):
            found.setdefault(kind, []).append(f"{prefix}.{name}")
    return found
