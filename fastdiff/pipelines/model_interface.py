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
    mask_token_id: int | None  # None: a uniform-noise model, which has none
    shift_logits: bool = False
    time_input: str | None = None
    takes_attention_mask: bool = True
    takes_position_ids: bool = False
    cache_argument: str | None = None  # the keyword its forward takes a transformers Cache under, if any
    rotary_table: str | None = None  # submodule whose forward takes position_ids when the model's does not

    @property
    def takes_cache(self) -> bool:
        """Whether the model's attention layers can be handed a transformers Cache (the kv caches need it)."""
        return self.cache_argument is not None

    @property
    def places_tokens(self) -> bool:
        """Whether tokens given after a cache can be put at chosen positions (the dual cache needs it)."""
        return self.takes_position_ids or self.rotary_table is not None

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each canvas position in the model's own frame: counted from the first real token for
        models that take ``position_ids``; the canvas index for rotary models, which see only
        relative positions and were run on the padded canvas as it is."""
        if self.takes_position_ids:
            return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)

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
        # After a cache the mask is the one input that says how many keys there are: without it,
        # transformers >= 5.25 reads the scattered position_ids of dKV-Cache's recomputed tokens
        # as packed sequences and builds a mask as long as the new tokens alone.
        after_cache = attention_mask is not None and attention_mask.shape[1] != input_ids.shape[1]
        if (padded or after_cache) and self.takes_attention_mask:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None and self.takes_position_ids:
            kwargs["position_ids"] = position_ids
        elif padded and self.takes_position_ids:  # left padding: real tokens start at position 0, as unpadded
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if past_key_values is not None:
            if self.cache_argument is None:
                raise ValueError("this model's forward takes no transformers Cache (cache= or past_key_values=)")
            kwargs[self.cache_argument] = past_key_values
        if self.time_input is not None:
            kwargs["timesteps"] = time
        if position_ids is not None and not self.takes_position_ids and self.rotary_table is not None:
            output = self._with_rotary_positions(model, position_ids, input_ids, kwargs)
        else:
            output = model(input_ids, **kwargs)
        logits = getattr(output, "logits", None)
        if logits is None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
        if self.shift_logits:  # position i's prediction sits at i - 1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


    def _with_rotary_positions(self, model: torch.nn.Module, position_ids: torch.Tensor, input_ids: torch.Tensor,
                               kwargs: dict[str, Any]) -> Any:
        """Call ``model`` with its rotary table looked up at ``position_ids`` instead of right after
        the cache (RoFormer's encoder asks its table for positions past the cache length)."""
        if not bool((position_ids == position_ids[:1]).all()):
            raise ValueError("a rotary model's position_ids must be the same in every row (canvas indices)")
        table = model.get_submodule(str(self.rotary_table))

        def place(module: torch.nn.Module, args: tuple, table_kwargs: dict[str, Any]) -> tuple[tuple, dict]:
            return args, {**table_kwargs, "position_ids": position_ids[0]}

        handle = table.register_forward_pre_hook(place, with_kwargs=True)
        try:
            return model(input_ids, **kwargs)
        finally:
            handle.remove()


def _rotary_table(model: torch.nn.Module) -> str | None:
    """The path of a sinusoidal/rotary position table whose forward takes ``position_ids``
    (RoFormer's), so a model without that argument can still place tokens given after a cache."""
    for name, module in model.named_modules():
        if name and type(module).__name__.endswith("SinusoidalPositionalEmbedding") \
                and _accepts(module, "position_ids"):
            return name
    return None


def _cache_argument(model: torch.nn.Module) -> str | None:
    """The keyword ``model`` takes a transformers Cache under. transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name still works there but warns), and a masked LM head
    passes it on through ``**kwargs``, so the names are looked up on the head and on its base model;
    ``past_key_values`` when only ``**kwargs`` takes it (remote-code models, older transformers)."""
    base = getattr(model, "base_model", None)
    for module in (model, base) if isinstance(base, torch.nn.Module) and base is not model else (model,):
        for name in ("cache", "past_key_values"):
            if _accepts(module, name):
                return name
    return "past_key_values" if _accepts(model, "past_key_values", via_kwargs=True) else None


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
                  shift_logits: bool | None = None, time_input: str | None | bool = False,
                  needs_mask: bool = True) -> ModelInterface:
    """The interface of ``model``: what its config's ``model_type`` implies, overridden by arguments
    (``time_input=False`` means "not given"). ``needs_mask=False``: a uniform-noise scheduler, for which
    a missing mask token is no error."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "").lower()
    known = KNOWN_MODEL_TYPES.get(model_type, {})
    if mask_token_id is None:
        mask_token_id = known.get("mask_token_id")
    if mask_token_id is None and tokenizer is not None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
    if mask_token_id is None:
        mask_token_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    if mask_token_id is None and needs_mask:
        raise ValueError(
            f"mask_token_id: {type(model).__name__} and its tokenizer have no mask token and none was given; pass "
            "mask_token_id= (the id of the token the model was trained to fill in)"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if mask_token_id is not None and vocab is not None and not 0 <= int(mask_token_id) < int(vocab):
        raise ValueError(f"mask_token_id {mask_token_id} is outside the model's vocabulary (0..{int(vocab) - 1})")
    return ModelInterface(
        mask_token_id=None if mask_token_id is None else int(mask_token_id),
        shift_logits=known.get("shift_logits", False) if shift_logits is None else bool(shift_logits),
        time_input=known.get("time_input") if time_input is False else time_input,
        takes_attention_mask=_accepts(model, "attention_mask"),
        takes_position_ids=_accepts(model, "position_ids"),
        cache_argument=_cache_argument(model),
        rotary_table=None if _accepts(model, "position_ids") else _rotary_table(model),
    )
