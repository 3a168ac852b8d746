"""One description per denoiser family, asked by every method: see :mod:`.base`."""

from . import transformers as _transformers  # noqa: F401  (registers the transformer families)
from . import unet as _unet  # noqa: F401  (registers the UNet family)
from .base import (
    ATTENTION_KINDS,
    FAMILIES,
    GUIDANCE_STYLES,
    Anatomy,
    Block,
    BlockIO,
    Family,
    TokenLayout,
    UNetParts,
    UnknownDenoiser,
    anatomy_of,
    family_of,
    register_family,
)
from .transformers import block_io
from .unet import GRANULARITIES

__all__ = [
    "ATTENTION_KINDS",
    "FAMILIES",
    "GRANULARITIES",
    "GUIDANCE_STYLES",
    "Anatomy",
    "Block",
    "BlockIO",
    "Family",
    "TokenLayout",
    "UNetParts",
    "UnknownDenoiser",
    "anatomy_of",
    "block_io",
    "family_of",
    "register_family",
]
