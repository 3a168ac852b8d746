"""Key/value caching while a block is decoded (Fast-dLLM's prefix and dual caches).

At the first step of a block the model runs on the whole canvas and every attention layer's keys
and values are kept (a transformers ``DynamicCache``). The following steps of the block run
the model only on the positions that change: the block and everything after it (``prefix``),
or the block alone (``dual``). The other positions' keys and values come from the cache.
Attention is bidirectional, so the cached keys may come first. The new tokens' positions are
passed as ``position_ids``. RoFormer takes no ``position_ids`` and would place new tokens right
after the cache (right for ``prefix`` only), so its rotary table is asked for the canvas
positions instead (:class:`~fastdiff.pipelines.model_interface.ModelInterface`).

This is approximate. Cached positions do not see the block's new tokens until the next block
refreshes the cache. At the refresh step itself the logits are exactly the full model's, which
is tested. The deviation over a whole generation is measured in the docs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KV_CACHES = ("prefix", "dual")
Forward = Callable[..., torch.Tensor]  # (ids, attention, position_ids=, past_key_values=) -> logits


class BlockCache:
    def __init__(self, mode: str, start: int, stop: int, length: int, shifted: bool) -> None:
        if mode not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES} or None, got {mode!r}")
        first = max(start - 1, 0) if shifted else start  # a shifted model's first prediction sits one earlier
        last = length if mode == "prefix" else stop
        self.query = torch.zeros(length, dtype=torch.bool)
        self.query[first:last] = True
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.context_mask: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def refresh(self, forward: Forward, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The full model on the whole canvas, keeping the keys/values of the positions not queried."""
        from transformers import DynamicCache

        cache = DynamicCache()
        logits = forward(ids, attention, past_key_values=cache)
        if cache.get_seq_length() != ids.shape[1]:
            raise ValueError(
                "kv_cache needs a model whose attention layers fill a transformers Cache passed as past_key_values "
                "(BERT-style masked LMs and most remote-code diffusion LMs do); this model left it empty"
            )
        keep = (~self.query).to(ids.device)
        self.layers = [(layer.keys[:, :, keep], layer.values[:, :, keep]) for layer in cache.layers]
        self.context_mask = attention[:, keep]
        self.logits = logits
        return logits

    def step(self, forward: Forward, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of the queried positions from the model on them alone; the rest as at the refresh."""
        from transformers import DynamicCache

        assert self.logits is not None and self.context_mask is not None
        query = self.query.to(ids.device)
        past = DynamicCache()
        for index, (keys, values) in enumerate(self.layers):
            past.update(keys, values, index)
        mask = torch.cat([self.context_mask, attention[:, query]], dim=1)
        fresh = forward(ids[:, query], mask, position_ids=positions[:, query], past_key_values=past)
        logits = self.logits.clone()
        logits[:, query] = fresh
        return logits
