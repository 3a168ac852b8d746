"""Built-in offline models and the loader that resolves a `model` argument.

Built-ins are real diffusers pipelines with deterministic random weights, so everything in
fastdiff can be run and tested without a model hub.
"""

from .builtin import (
    BUILTIN_MODELS,
    SD15_UNET_CONFIG,
    BuiltinModel,
    ModelLoadError,
    build_builtin,
    builtin_info,
    default_size,
    is_builtin,
    load_pipeline,
)
from .tokenizers import clip_tokenizer, t5_tokenizer

__all__ = [
    "BUILTIN_MODELS",
    "SD15_UNET_CONFIG",
    "BuiltinModel",
    "ModelLoadError",
    "build_builtin",
    "builtin_info",
    "clip_tokenizer",
    "default_size",
    "is_builtin",
    "load_pipeline",
    "t5_tokenizer",
]
