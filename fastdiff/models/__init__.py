"""Built-in offline models and the loader that resolves a `model` argument.

Built-ins are real diffusers pipelines with deterministic random weights, so everything in
fastdiff can be run and tested without a model hub; `digits` is the exception, trained and
shipped with its FID feature network so that quality can be measured offline too
(`fastdiff.models.digits`, trained by `python -m fastdiff.models.train`).
"""

import logging

# transformers announces, once per image-processor class, that it falls back to PIL when
# torchvision is absent (always, beside the CPU torch); importing diffusers below triggers it, and
# the model commands (`python -m fastdiff.models.sudoku_mdlm ...`) would print it on every run
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

from .builtin import (  # noqa: E402
    BUILTIN_MODELS,
    SD15_UNET_CONFIG,
    SD35_MEDIUM_TRANSFORMER_CONFIG,
    BuiltinModel,
    ModelLoadError,
    build_builtin,
    builtin_info,
    default_size,
    is_builtin,
    load_pipeline,
)
from .digits import (  # noqa: E402
    DIGIT_WORDS,
    DigitsFeatureNet,
    digit_prompt,
    digits_split,
    load_digits_pipeline,
    load_feature_network,
    parse_digit_prompt,
)
from .tokenizers import clip_tokenizer, t5_tokenizer  # noqa: E402

__all__ = [
    "BUILTIN_MODELS",
    "DIGIT_WORDS",
    "SD15_UNET_CONFIG",
    "SD35_MEDIUM_TRANSFORMER_CONFIG",
    "BuiltinModel",
    "DigitsFeatureNet",
    "ModelLoadError",
    "build_builtin",
    "builtin_info",
    "clip_tokenizer",
    "default_size",
    "digit_prompt",
    "digits_split",
    "is_builtin",
    "load_digits_pipeline",
    "load_feature_network",
    "load_pipeline",
    "parse_digit_prompt",
    "t5_tokenizer",
]
