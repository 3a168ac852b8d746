"""Text generation with masked diffusion language models, in the shape of a diffusers pipeline.

The canvas is the prompt (left-padded in a batch) followed by ``gen_length`` mask tokens. It is
decoded block by block, left to right (one block = plain diffusion decoding; several =
semi-autoregressive, as LLaDA and BD3-LM). Within a block the scheduler commits tokens step by
step. When a step changed no token and the model has no time input, the next call would see
exactly the same input, so its logits are reused instead (counted: ``nfe`` is the number of
model calls made).
"""

from __future__ import annotations

import re
import time as clock
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..core.ledger import Ledger, Report
from ..schedulers.discrete_diffusion import (
    DiscreteDiffusionScheduler,
    MaskedDiffusionScheduler,
    sampler_name,
)
from ..schedulers.noise_schedules import sigma
from .block_diffusion import (
    BLOCK_DIFFUSION_TYPES,
    DiffusionGemmaAdapter,
    generate_blocks,
    is_block_diffusion,
)
from .model_interface import interface_for
from .text_cache import KV_CACHES, BlockCache, make_cache


@dataclass(frozen=True)
class BuiltinTextModel:
    """A text model that ships with the package (weights included: it loads offline).

    ``loader``: ``"module:function"``, called with ``dtype=``, returning (model, tokenizer), so that
    naming the models imports none of them; ``example_prompt``: what ``fastdiff text`` asks by
    default; ``sampler``/``temperature``: the scheduler it starts with when none is given;
    ``gen_length``: the one generation length it takes (its canvas), if it has one;
    ``prompt_check``: ``"module:function"`` taking (prompt, argument name), raising ``ValueError``
    for a prompt the model cannot take, so a command can refuse it before loading anything."""

    loader: str
    example_prompt: str
    sampler: str | None = None
    temperature: float | None = None
    gen_length: int | None = None
    prompt_check: str | None = None

    def load(self, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
        return _function(self.loader)(dtype=dtype)

    def check_prompt(self, prompt: str, argument: str = "prompt") -> None:
        if self.prompt_check is not None:
            _function(self.prompt_check)(prompt, argument)


def _function(path: str) -> Callable[..., Any]:
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


BUILTIN_TEXT_MODELS: dict[str, BuiltinTextModel] = {
    "pydoc-mdlm": BuiltinTextModel("fastdiff.models.pydoc_text:load_pydoc_mdlm", 'The "assert" statement'),
    # a prompt is a puzzle (81 cells of 0-9, 0 for a blank); the generation is the filled grid. The
    # example is the first held-out puzzle (``sudoku_mdlm.held_out(1)``, 57 blanks), which it solves
    "sudoku-mdlm": BuiltinTextModel(
        "fastdiff.models.sudoku_mdlm:load_sudoku_text",
        "000000000500000400902003005006050004008600020300084600040026009000000007050070080",
        sampler="threshold:threshold=0.9", temperature=0.0, gen_length=81,
        prompt_check="fastdiff.models.sudoku:parse_sudoku"),
}
# a hub id: ``name`` or ``org/name`` of letters, digits, ``-``, ``_`` and ``.``
_HUB_ID = re.compile(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}")


def check_text_model_name(name: str) -> None:
    """Refuse at once a name that is no built-in, no folder and cannot be a hub id (or is a near
    miss of a built-in name, such as ``sudoku``): the hub would be asked otherwise, which without
    a network retries for half a minute before it fails. Raises ``ModelLoadError``."""
    import difflib
    import os

    from ..models.builtin import ModelLoadError, looks_like_path

    if name in BUILTIN_TEXT_MODELS or os.path.isdir(name):
        return
    builtins = f"built-in text models: {', '.join(BUILTIN_TEXT_MODELS)}"
    if os.path.exists(name):
        raise ModelLoadError(f"{name!r} is a file; give a model folder, a hub id or a built-in name ({builtins})")
    if looks_like_path(name):
        raise ModelLoadError(f"no such folder {name!r}; {builtins}")
    if not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        raise ModelLoadError(f"{name!r} is neither a built-in name, a folder nor a hub id (org/name); {builtins}")
    near = difflib.get_close_matches(name, list(BUILTIN_TEXT_MODELS), n=1, cutoff=0.6)
    if near and "/" not in name:
        raise ModelLoadError(f"{name!r} is not a built-in text model (did you mean {near[0]!r}?); {builtins}")


@dataclass
class MaskedDiffusionLMPipelineOutput(BaseOutput):
    """``texts``: the generated text per prompt (cut at the first end-of-sequence token);
    ``sequences``: the generated token ids (batch × gen_length); ``nfe``: model calls made
    (a classifier-free-guidance pair is one batched call); ``steps``: sampler steps taken;
    ``sequence_nfe``: per sequence, how many calls it went through (a call may carry only the
    sequences whose tokens changed)."""

    texts: list[str]
    sequences: torch.LongTensor
    nfe: int
    steps: int
    sequence_nfe: list[int]


class MaskedDiffusionLMPipeline(DiffusionPipeline):
    """``model``: a bidirectional LM returning logits per position (any ``AutoModelForMaskedLM``, or
    a remote-code diffusion LM); ``shift_logits`` / ``time_input`` / ``mask_token_id``: see
    :mod:`.model_interface` (``None``: from the model's ``model_type`` and the tokenizer)."""

    model_cpu_offload_seq = "model"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, scheduler: MaskedDiffusionScheduler,
                 mask_token_id: int | None = None, shift_logits: bool | None = None,
                 time_input: str | None = None) -> None:
        super().__init__()
        if not isinstance(scheduler, DiscreteDiffusionScheduler):
            scheduler = _foreign_scheduler(scheduler)
        self.block_model = DiffusionGemmaAdapter(model) if is_block_diffusion(model) else None
        if self.block_model is None and not isinstance(scheduler, DiscreteDiffusionScheduler):
            raise ValueError(f"scheduler: {type(scheduler).__name__} drives uniform-state block diffusion models "
                             f"(DiffusionGemma) here; for {type(model).__name__} use fastdiff's "
                             "DiscreteDiffusionScheduler, which has the same configurations (see docs/text.md)")
        corruption = scheduler.config.corruption if isinstance(scheduler, DiscreteDiffusionScheduler) else "uniform"
        if self.block_model is not None and (corruption != "uniform" or mask_token_id is not None):
            raise ValueError(f"scheduler: {type(model).__name__} is a uniform-noise model (its canvas starts as random "
                             f"tokens; it has no mask token), but the scheduler is configured for "
                             f"corruption={corruption!r}; use DiscreteDiffusionScheduler(corruption='uniform', ...) "
                             "or one of diffusers' uniform-state schedulers")
        try:
            interface = interface_for(model, tokenizer, mask_token_id=mask_token_id, shift_logits=shift_logits,
                                      time_input=time_input if time_input is not None else False,
                                      needs_mask=corruption != "uniform")
        except ValueError as error:
            if corruption == "uniform":
                raise
            raise ValueError(f"{error} (the scheduler is configured for corruption={corruption!r}, which needs one; "
                             f"a model trained with uniform noise takes corruption='uniform')") from None
        if isinstance(scheduler, DiscreteDiffusionScheduler) and scheduler.uses_mask \
                and scheduler.config.mask_token_id != interface.mask_token_id:
            scheduler.register_to_config(mask_token_id=interface.mask_token_id)
        self.register_modules(model=model, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(mask_token_id=interface.mask_token_id, shift_logits=interface.shift_logits,
                                time_input=interface.time_input)
        self.interface = interface
        self.ledger = Ledger()  # per step: model called (1) or logits reused (0), and the time it took
        self._call_index = -1

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Any, *args: Any, sampler: str | None = None,
                        trust_remote_code: bool = False, **kwargs: Any) -> MaskedDiffusionLMPipeline:
        """A built-in name (:data:`BUILTIN_TEXT_MODELS`: ``pydoc-mdlm``, ``sudoku-mdlm``), a saved
        pipeline folder (``model_index.json``), or a transformers model folder or hub id (masked LM or
        remote-code diffusion LM, with its tokenizer). ``sampler``: the scheduler's sampler (with
        options, ``"threshold:threshold=0.8"``); for a saved pipeline it replaces the saved sampler
        and keeps the rest of its config. A name that can be none of these fails at once
        (:func:`check_text_model_name`)."""
        import os

        name = os.fspath(pretrained_model_name_or_path)
        builtin = BUILTIN_TEXT_MODELS.get(name)
        if builtin is not None:
            model, tokenizer = builtin.load(kwargs.pop("torch_dtype", None) or torch.float32)
            defaults = {} if builtin.temperature is None else {"temperature": builtin.temperature}
            return cls(model, tokenizer, _scheduler(sampler or builtin.sampler, **defaults), **kwargs)
        check_text_model_name(name)
        if os.path.isfile(os.path.join(name, "model_index.json")):
            pipe = super().from_pretrained(name, *args, **kwargs)
            if sampler is not None:
                pipe.scheduler = pipe._scheduler_for(sampler, {})
            return pipe
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForMaskedLM,
            AutoTokenizer,
        )

        dtype = kwargs.pop("torch_dtype", None)
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        if getattr(config, "model_type", "") in BLOCK_DIFFUSION_TYPES:  # uniform noise: a uniform scheduler
            from transformers import DiffusionGemmaForBlockDiffusion

            model = DiffusionGemmaForBlockDiffusion.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
            scheduler = _scheduler(sampler, corruption="uniform")
            return cls(model.eval(), tokenizer, scheduler, **kwargs)
        try:
            model = AutoModelForMaskedLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError:  # remote-code diffusion LMs register as AutoModel only
            model = AutoModel.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        return cls(model.eval(), tokenizer, _scheduler(sampler), **kwargs)

    @property
    def device(self) -> torch.device:
        """The model's device (also for a plain ``nn.Module`` model, which has no ``.device``)."""
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    # -- inputs -----------------------------------------------------------------------------
    def _encode(self, prompt: str | Sequence[str] | None, input_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids is not None:
            ids = torch.as_tensor(input_ids, dtype=torch.long)
            ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
            mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).reshape(ids.shape)
            return ids.to(self.device), mask.to(self.device).long()
        if prompt is None:
            raise ValueError("give prompt= (a string or a list of strings) or input_ids=")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: the list of prompts is empty")
        tokenizer = self.tokenizer
        encoded = [tokenizer(p)["input_ids"] for p in prompts]
        longest = max(len(e) for e in encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.interface.mask_token_id
        ids = torch.tensor([[pad] * (longest - len(e)) + list(e) for e in encoded], dtype=torch.long)
        mask = torch.tensor([[0] * (longest - len(e)) + [1] * len(e) for e in encoded], dtype=torch.long)
        return ids.to(self.device), mask.to(self.device)

    def _max_length(self) -> int | None:
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "max_sequence_length", "n_positions", "model_max_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 10**6 else None

    def _scheduler_for(self, sampler: str | Any | None, overrides: dict[str, Any]) -> Any:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if sampler is not None and not isinstance(sampler, (str, DiscreteDiffusionScheduler)):
            return self._checked_foreign(sampler, overrides)
        base = sampler if isinstance(sampler, DiscreteDiffusionScheduler) else self.scheduler
        if not isinstance(base, DiscreteDiffusionScheduler):  # the pipeline holds a diffusers scheduler
            if not isinstance(sampler, str):
                return self._checked_foreign(base, overrides)
            base = DiscreteDiffusionScheduler(corruption="uniform")
        if isinstance(sampler, str):
            name, _, options = sampler.partition(":")
            overrides = {"sampler": sampler_name(name), **_parse_options(options), **overrides}
        mask_id = self.interface.mask_token_id
        config = {**base.config, **overrides}
        if config.get("corruption", "mask") != "uniform":
            if mask_id is None:
                raise ValueError(f"sampler: corruption={config.get('corruption', 'mask')!r} needs a mask token, and "
                                 f"{type(self.model).__name__} has none (it was trained with uniform noise); use a "
                                 "scheduler with corruption='uniform'")
            overrides["mask_token_id"] = mask_id
        elif self.block_model is None and "corruption" in overrides:
            overrides["mask_token_id"] = None
        if self.block_model is not None and config.get("corruption", "mask") != "uniform":
            raise ValueError(f"sampler: {type(self.model).__name__} is a uniform-noise model; the scheduler's "
                             f"corruption must be 'uniform', got {config.get('corruption', 'mask')!r}")
        if all(base.config.get(k) == v for k, v in overrides.items()):
            return base
        return DiscreteDiffusionScheduler.from_config(base.config, **overrides)

    def _checked_foreign(self, scheduler: Any, overrides: dict[str, Any]) -> Any:
        """A diffusers discrete scheduler: it drives a block-diffusion model's canvases as it drives
        them in diffusers' own pipeline; the per-call sampler options are its config's business."""
        _foreign_scheduler(scheduler)
        if self.block_model is None:
            raise ValueError(f"sampler: {type(scheduler).__name__} drives uniform-state block diffusion models "
                             f"(DiffusionGemma) here; for {type(self.model).__name__} use fastdiff's "
                             "DiscreteDiffusionScheduler, which has the same configurations (see docs/text.md)")
        if overrides:
            raise ValueError(f"{sorted(overrides)}: set these on the {type(scheduler).__name__}'s config; per-call "
                             "sampler options apply to fastdiff's DiscreteDiffusionScheduler")
        return scheduler

    # -- the model --------------------------------------------------------------------------
    def _inputs(self, canvas: torch.Tensor, attention: torch.Tensor, t: torch.Tensor, prompt_len: int,
                cfg_scale: float, schedule: MaskedDiffusionScheduler) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The model's batch: the canvas, and with guidance the same canvas with its prompt masked."""
        time = None
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        if self.interface.time_input == "sigma":
            time = sigma(schedule.config.noise_schedule, t, schedule.config.eps).to(dtype)
        elif self.interface.time_input == "t":
            time = t.to(dtype)
        if cfg_scale <= 0:
            return canvas, attention, time
        unconditional = canvas.clone()
        unconditional[:, :prompt_len] = torch.where(attention[:, :prompt_len].bool(), self.interface.mask_token_id,
                                                    canvas[:, :prompt_len])
        return (torch.cat([canvas, unconditional]), torch.cat([attention, attention]),
                None if time is None else torch.cat([time, time]))

    def _denoise(self, canvas: torch.Tensor, attention: torch.Tensor, t: torch.Tensor, prompt_len: int,
                 cfg_scale: float, schedule: MaskedDiffusionScheduler, cache: BlockCache | None,
                 rows: torch.Tensor | None, combine: bool = True) -> torch.Tensor:
        """Guided logits for the canvas (or its ``rows``), through the block's cache if there is one."""
        if rows is not None:
            canvas, attention, t = canvas[rows], attention[rows], t[rows]
        ids, mask, time = self._inputs(canvas, attention, t, prompt_len, cfg_scale, schedule)

        def forward(i: torch.Tensor, a: torch.Tensor, **kw: Any) -> torch.Tensor:
            return self.interface.logits(self.model, i, a, time, **kw)

        if cache is None:
            raw = forward(ids, mask)
        elif cache.logits is None:  # the block's first call: refresh
            raw = cache.refresh(forward, ids, mask)
        else:
            raw = cache.step(forward, ids, mask, self.interface.positions(mask))
        return self._guided(raw, cfg_scale) if combine else raw

    def report(self, call: int | None = -1) -> Report:
        """What the last call (or ``call``; all with ``None``) did per step: a model call or reused
        logits, and the time; ``report().denoiser_calls`` is the NFE."""
        return self.ledger.report(call)

    @staticmethod
    def _guided(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        if cfg_scale <= 0:
            return logits
        conditional, free = logits.chunk(2)
        return free + (cfg_scale + 1.0) * (conditional - free)

    # -- the call ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, *, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, gen_length: int = 128, steps: int | None = None,
                 block_length: int | None = None, sampler: str | MaskedDiffusionScheduler | None = None,
                 temperature: float | None = None, threshold: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, cfg_scale: float = 0.0, generator: torch.Generator | None = None,
                 reuse_unchanged: bool = True, stop_at_eos: bool = True, kv_cache: str | None = None,
                 kv_refresh: int = 4, edit_steps: int = 16, confidence_stop: float | None = None,
                 callback_on_step_end: Callable[[Any, int, torch.Tensor], None] | None = None,
                 return_dict: bool = True) -> MaskedDiffusionLMPipelineOutput | tuple:
        """Generate ``gen_length`` tokens after each prompt.

        Args:
            steps: sampler steps in all (default ``gen_length``), shared evenly among the blocks
                (the first blocks take the remainder). Adaptive samplers (first-hitting,
                threshold) take as many as their tokens need.
            block_length: decode in blocks of this many tokens, left to right (default: one
                block); ``gen_length`` must be a multiple of it.
            sampler: a scheduler, or a sampler name with options (``"threshold:threshold=0.8"``);
                default: the pipeline's scheduler. ``temperature``, ``threshold``, ``top_k``,
                ``top_p`` override its configuration for this call.
            cfg_scale: classifier-free guidance by masking the prompt (0: off):
                ``uncond + (cfg_scale + 1)·(cond − uncond)``.
            reuse_unchanged: reuse the last logits when no token changed since the model was called
                (never for models with a time input): for the whole batch, or per sequence (only
                the changed sequences are sent to the model). Exact: the samples do not change.
            kv_cache: ``"prefix"`` or ``"dual"``: Fast-dLLM's key/value caches, or ``"dkv"``:
                dKV-Cache's delayed caching of decoded tokens, fully refreshed every ``kv_refresh``
                steps (:mod:`.text_cache`; approximate, refreshed at each block's first step);
                ``None``: off.
            edit_steps: with a scheduler that edits (``editing_threshold``), at most this many extra
                steps per block once nothing is left undecided, while they still change tokens
                (LLaDA2's post-steps).
            confidence_stop: block diffusion models (DiffusionGemma): freeze a sequence's canvas at
                its prediction once that is unchanged from the previous step and its mean entropy
                is below this (transformers' stable-and-confident rule); ``None``: run the steps.
            stop_at_eos: in block decoding, stop once every sequence has an end-of-sequence token;
                the rest is filled with it.
            callback_on_step_end: ``f(pipe, step, canvas)`` after every step (the canvas holds the
                prompt too; for streaming intermediate text).
        """
        for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
        if kv_cache is not None and kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES} or None, got {kv_cache!r}")
        if kv_cache in ("dual", "dkv") and not self.interface.places_tokens:
            raise ValueError(f"kv_cache={kv_cache!r} needs a model that takes position_ids or has a rotary table that does "
                             f"(recomputed tokens are placed after the cached ones); {type(self.model).__name__} has "
                             f"neither: use kv_cache='prefix'")
        if kv_cache is not None and not self.interface.takes_cache:
            raise ValueError(f"kv_cache needs a model whose attention layers fill a transformers Cache passed to "
                             f"them; {type(self.model).__name__}.forward takes none (no cache= or past_key_values=)")
        if self.block_model is not None:
            block_length = self._check_block_model(gen_length, block_length, kv_cache, cfg_scale)
        if confidence_stop is not None and not confidence_stop > 0:
            raise ValueError(f"confidence_stop must be > 0 (a mean entropy in nats) or None, got {confidence_stop!r}")
        if confidence_stop is not None and self.block_model is None:
            raise ValueError("confidence_stop applies to block diffusion models (DiffusionGemma), whose canvases are "
                             "re-decided every step")
        for name, value, low in (("kv_refresh", kv_refresh, 1), ("edit_steps", edit_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        block_length = block_length or gen_length
        if gen_length % block_length:
            raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
        blocks = gen_length // block_length
        steps = gen_length if steps is None else steps
        if steps < blocks:
            raise ValueError(f"steps ({steps}) must be at least the number of blocks ({blocks} = gen_length / "
                             "block_length): every block takes at least one step")
        schedule = self._scheduler_for(sampler, {"temperature": temperature, "threshold": threshold,
                                                 "top_k": top_k, "top_p": top_p})
        prompt_ids, prompt_mask = self._encode(prompt, input_ids, attention_mask)
        batch, prompt_len = prompt_ids.shape
        limit = self._max_length()
        if limit is not None and prompt_len + gen_length > limit:
            raise ValueError(f"prompt ({prompt_len} tokens) + gen_length ({gen_length}) is longer than the model's "
                             f"maximum length {limit}")
        per_block = [steps // blocks + (1 if b < steps % blocks else 0) for b in range(blocks)]
        if self.block_model is not None:
            return self._call_block_model(schedule, prompt_ids, prompt_mask, per_block, generator, stop_at_eos,
                                          confidence_stop, callback_on_step_end, return_dict)
        mask_id = self.interface.mask_token_id
        uses_mask = schedule.uses_mask
        if cfg_scale > 0 and mask_id is None:
            raise ValueError(f"cfg_scale: guidance drops the prompt by masking it, and {type(self.model).__name__} "
                             "has no mask token")
        if uses_mask:
            noise = torch.full((batch, gen_length), mask_id, device=self.device)
            from_prompt = getattr(self.model, "generation_from_prompt", None)
            if callable(from_prompt):  # a task model whose prompt states the canvas (sudoku-mdlm: the clues)
                noise = from_prompt(prompt_ids, noise)
        else:  # uniform noise over the whole generation, as the model was trained to see it
            noise = schedule.initial_sample((batch, gen_length), self._vocab_size(), generator, self.device)
        canvas = torch.cat([prompt_ids, noise], dim=1)
        attention = torch.cat([prompt_mask, torch.ones((batch, gen_length), dtype=torch.long, device=self.device)], 1)
        reuse = reuse_unchanged and self.interface.time_input is None
        eos = getattr(self.tokenizer, "eos_token_id", None)
        posterior_guidance = cfg_scale > 0 and schedule.config.sampler == "posterior"
        editing = schedule.config.editing_threshold is not None
        nfe = taken = 0
        self._call_index += 1
        self.ledger.start_call(self._call_index)
        per_sequence = torch.zeros(batch, dtype=torch.long, device=self.device)
        seen: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        total = gen_length if schedule.adaptive else steps
        with self.progress_bar(total=total) as bar:
            for b in range(blocks):
                start = prompt_len + b * block_length
                active = torch.zeros_like(canvas, dtype=torch.bool)
                active[:, start:start + block_length] = True
                schedule.set_timesteps(per_block[b], device=self.device)
                cache = None if kv_cache is None else make_cache(kv_cache, start, start + block_length,
                                                                 canvas.shape[1], self.interface.shift_logits,
                                                                 kv_refresh, mask_id)
                t = torch.ones(batch, dtype=torch.float64, device=self.device)
                budget = block_length if schedule.adaptive else per_block[b]
                edits_left, changed_last = (edit_steps if editing else 0), True
                out = None
                while True:
                    if budget <= 0 or not self._undecided(schedule, canvas, active, mask_id):
                        if not (edits_left > 0 and changed_last):
                            break
                        edits_left -= 1  # LLaDA2: once all is decided, edit while edits happen
                    budget -= 1
                    changed = torch.ones(batch, dtype=torch.bool, device=self.device) if seen is None or not reuse \
                        else (seen != canvas).any(1)
                    started = clock.perf_counter()
                    if bool(changed.any()):
                        if cache is not None or bool(changed.all()) or posterior_guidance:
                            rows = None
                        else:  # per sequence: only the sequences whose tokens changed go through the model
                            rows = changed.nonzero().squeeze(1)
                        fresh = self._denoise(canvas, attention, t, prompt_len, cfg_scale, schedule, cache, rows,
                                              combine=not posterior_guidance)
                        if rows is None:
                            logits = fresh
                        else:
                            assert logits is not None
                            logits = logits.clone()
                            logits[rows] = fresh
                        seen, nfe = canvas.clone(), nfe + 1
                        per_sequence += changed.long()
                    self.ledger.record_step(self._call_index, taken, float(t.max()), clock.perf_counter() - started,
                                            None, denoiser_calls=int(bool(changed.any())))
                    assert logits is not None
                    if posterior_guidance:
                        conditional, free = logits.chunk(2)
                        out = schedule.step(conditional, t, canvas, active=active, generator=generator,
                                            unconditional_output=free, guidance_scale=cfg_scale + 1.0)
                    else:
                        out = schedule.step(logits, t, canvas, active=active, generator=generator)
                    changed_last = bool((out.prev_sample != canvas).any())
                    canvas, t = out.prev_sample, out.next_timestep
                    taken += 1
                    bar.update()
                    if callback_on_step_end is not None:
                        callback_on_step_end(self, taken - 1, canvas)
                if out is not None and not uses_mask and not schedule.config.keep_committed \
                        and schedule.config.sampler != "posterior":
                    # positions re-decided every step end as the last prediction (transformers' rule)
                    canvas = torch.where(active, out.pred_logits.argmax(-1), canvas)
                if stop_at_eos and eos is not None and b + 1 < blocks:
                    decoded = canvas[:, prompt_len:start + block_length]
                    if bool((decoded == eos).any(1).all()):
                        canvas[:, start + block_length:] = eos
                        break
        sequences = canvas[:, prompt_len:]
        texts = [self._decode(row, eos) for row in sequences]
        if not return_dict:
            return texts, sequences, nfe, taken, per_sequence.tolist()
        return MaskedDiffusionLMPipelineOutput(texts, sequences, nfe, taken, per_sequence.tolist())

    def _check_block_model(self, gen_length: int, block_length: int | None, kv_cache: str | None,
                           cfg_scale: float) -> int:
        """The canvas is the block: its length is the model's, and the encoder cache is already exact."""
        assert self.block_model is not None
        canvas = self.block_model.canvas_length
        name = type(self.model).__name__
        if gen_length % canvas:
            raise ValueError(f"gen_length ({gen_length}) must be a multiple of {name}'s canvas length ({canvas}): it "
                             "writes whole canvases")
        if block_length is not None and block_length != canvas:
            raise ValueError(f"block_length ({block_length}): {name} decodes canvases of {canvas} tokens; leave "
                             f"block_length unset or give {canvas}")
        if kv_cache is not None:
            raise ValueError(f"kv_cache: {name} caches its encoder's keys/values over finished canvases itself "
                             "(exactly); leave kv_cache unset")
        if cfg_scale > 0:
            raise ValueError(f"cfg_scale: guidance by dropping the prompt is not available for {name} here")
        return canvas

    @staticmethod
    def _undecided(schedule: DiscreteDiffusionScheduler, canvas: torch.Tensor, active: torch.Tensor,
                   mask_id: int | None) -> bool:
        """Whether the block still has something to decide: a mask, or (uniform noise) a position the
        scheduler has not committed; the ``posterior`` sampler runs its steps out."""
        if schedule.config.corruption == "mask":
            return bool(((canvas == mask_id) & active).any())
        committed = schedule.committed_positions
        if schedule.config.sampler == "posterior" or committed is None or not schedule.config.keep_committed:
            return True
        return not bool(committed[active].all())

    def _vocab_size(self) -> int:
        size = getattr(getattr(self.model, "config", None), "vocab_size", None)
        return int(size) if size else len(self.tokenizer)

    def _call_block_model(self, schedule: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          per_block: list[int], generator: torch.Generator | None, stop_at_eos: bool,
                          confidence_stop: float | None, callback: Callable[..., None] | None,
                          return_dict: bool) -> MaskedDiffusionLMPipelineOutput | tuple:
        assert self.block_model is not None
        eos = getattr(self.tokenizer, "eos_token_id", None)
        batch = prompt_ids.shape[0]
        counts = {"nfe": 0}
        self._call_index += 1
        self.ledger.start_call(self._call_index)
        with self.progress_bar(total=sum(per_block)) as bar:
            last = [clock.perf_counter()]

            def on_step(block: int, canvas: torch.Tensor, called: bool) -> None:
                now = clock.perf_counter()
                self.ledger.record_step(self._call_index, counts["nfe"], 1.0, now - last[0], None,
                                        denoiser_calls=int(called))
                last[0] = now
                counts["nfe"] += int(called)
                bar.update()
                if callback is not None:
                    callback(self, counts["nfe"] - 1, canvas)

            sequences = generate_blocks(self.block_model, schedule, prompt_ids, prompt_mask, per_block,
                                        generator=generator, eos=eos, stop_at_eos=stop_at_eos,
                                        confidence_stop=confidence_stop, on_step=on_step)
        texts = [self._decode(row, eos) for row in sequences]
        per_sequence = [counts["nfe"]] * batch
        if not return_dict:
            return texts, sequences, counts["nfe"], counts["nfe"], per_sequence
        return MaskedDiffusionLMPipelineOutput(texts, sequences, counts["nfe"], counts["nfe"], per_sequence)

    def _decode(self, row: torch.Tensor, eos: int | None) -> str:
        ids = row.tolist()
        if eos is not None and eos in ids:
            ids = ids[:ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


FOREIGN_SCHEDULERS = ("BlockRefinementScheduler", "EntropyBoundScheduler", "DiscreteDDIMScheduler")


def _foreign_scheduler(scheduler: Any) -> Any:
    """diffusers' uniform-state discrete schedulers, accepted as they are; anything else is refused."""
    if type(scheduler).__name__ not in FOREIGN_SCHEDULERS:
        raise ValueError(f"scheduler: expected fastdiff's DiscreteDiffusionScheduler or one of diffusers' "
                         f"{FOREIGN_SCHEDULERS}, got {type(scheduler).__name__}")
    return scheduler


def _scheduler(sampler: str | None, **defaults: Any) -> MaskedDiffusionScheduler:
    if sampler is None:
        return MaskedDiffusionScheduler(**defaults)
    name, _, options = sampler.partition(":")
    return MaskedDiffusionScheduler(sampler=sampler_name(name), **{**defaults, **_parse_options(options)})


INT_OPTIONS = ("top_k",)
TEXT_OPTIONS = ("noise_schedule", "corruption", "sampling")
FLOAT_OPTIONS = ("threshold", "temperature", "top_p", "eps", "entropy_bound", "min_temperature", "editing_threshold",
                 "p_uniform", "gamma")
BOOL_OPTIONS = ("keep_committed",)


def _parse_options(text: str) -> dict[str, Any]:
    """``"threshold=0.8,temperature=0"`` -> {"threshold": 0.8, "temperature": 0.0}."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"sampler options must look like name=value, got {item!r}")
        key, value = key.strip().replace("-", "_"), value.strip()
        try:
            if key in INT_OPTIONS:
                options[key] = int(value)
            elif key in TEXT_OPTIONS:
                options[key] = value
            elif key in FLOAT_OPTIONS:
                options[key] = float(value)
            elif key in BOOL_OPTIONS:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                options[key] = value.lower() in ("true", "1")
            else:
                allowed = ", ".join(INT_OPTIONS + TEXT_OPTIONS + FLOAT_OPTIONS + BOOL_OPTIONS)
                raise ValueError(f"unknown sampler option {key!r}; allowed: {allowed}")
        except ValueError as error:
            if "unknown sampler option" in str(error):
                raise
            raise ValueError(f"sampler option {key}: {value!r} is not a valid value") from None
    return options
