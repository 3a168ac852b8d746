"""How a text denoiser is called: the small adapter between a language model and the sampler.

Bidirectional masked LMs (BERT, RoBERTa, LLaDA) map a canvas of tokens to logits per position.
Some diffusion LMs differ in one of three ways, each declared here rather than coded per model:
the mask token is not the tokenizer's (LLaDA: 126336), logits come shifted by one position
because the model was adapted from an autoregressive one (Dream), or the model takes the
diffusion time as an input (MDLM, as ``timesteps`` = σ(t)).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

TIME_INPUTS = (None, "sigma", "t")
# model_type -> what differs from a plain masked LM (the remote-code checkpoints' own config names)
KNOWN_MODEL_TYPES: dict[str, dict[str, Any]] = {
    "llada": {"mask_token_id": 126336},
    "dream": {"shift_logits": True},
    "mdlm": {"time_input": "sigma"},
}


@dataclass(frozen=True)
class ModelInterface:
    mask_token_id: int
    shift_logits: bool = False
    time_input: str | None = None
    takes_attention_mask: bool = True
    takes_position_ids: bool = False
    takes_cache: bool = False

    def __post_init__(self) -> None:
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {self.time_input!r}")

    def logits(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               time: torch.Tensor | None, position_ids: torch.Tensor | None = None,
               past_key_values: Any = None) -> torch.Tensor:
        """Logits per position of ``input_ids``. With ``past_key_values`` (a transformers cache of
        other positions' keys/values), ``attention_mask`` covers cached then given positions and
        ``position_ids`` say where the given tokens sit."""
        kwargs: dict[str, Any] = {}
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded and self.takes_attention_mask:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None and self.takes_position_ids:
            kwargs["position_ids"] = position_ids
        elif padded and self.takes_position_ids:  # left padding: real tokens start at position 0, as unpadded
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        if self.time_input is not None:
            kwargs["timesteps"] = time
        output = model(input_ids, **kwargs)
        logits = getattr(output, "logits", None)
        if logits is None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
        if self.shift_logits:  # position i's prediction sits at i - 1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


def _accepts(model: torch.nn.Module, name: str, via_kwargs: bool = False) -> bool:
    """Whether ``model.forward`` takes ``name``: as a named parameter, or (``via_kwargs``) through
    ``**kwargs``, which transformers models use to pass a cache down to their attention layers."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or (via_kwargs and any(p.kind is inspect.Parameter.VAR_KEYWORD
                                                     for p in parameters.values()))


def interface_for(model: torch.nn.Module, tokenizer: Any = None, *, mask_token_id: int | None = None,
                  shift_logits: bool | None = None, time_input: str | None | bool = False) -> ModelInterface:
    """The interface of ``model``: what its config's ``model_type`` implies, overridden by arguments
    (``time_input=False`` means "not given")."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "").lower()
    known = KNOWN_MODEL_TYPES.get(model_type, {})
    if mask_token_id is None:
        mask_token_id = known.get("mask_token_id")
    if mask_token_id is None and tokenizer is not None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
    if mask_token_id is None:
        mask_token_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError(
            "mask_token_id: the tokenizer has no mask token and none was given; pass mask_token_id= (the id of "
            "the token the model was trained to fill in)"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and not 0 <= int(mask_token_id) < int(vocab):
        raise ValueError(f"mask_token_id {mask_token_id} is outside the model's vocabulary (0..{int(vocab) - 1})")
    return ModelInterface(
        mask_token_id=int(mask_token_id),
        shift_logits=known.get("shift_logits", False) if shift_logits is None else bool(shift_logits),
        time_input=known.get("time_input") if time_input is False else time_input,
        takes_attention_mask=_accepts(model, "attention_mask"),
        takes_position_ids=_accepts(model, "position_ids"),
        takes_cache=_accepts(model, "past_key_values", via_kwargs=True),
    )
