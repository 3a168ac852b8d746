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

KV_CACHES = ("prefix", "dual", "dkv")
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
                "kv_cache needs a model whose attention layers fill a transformers Cache passed to them (cache= or "
                "past_key_values=; BERT-style masked LMs and most remote-code diffusion LMs do); this model left it "
                "empty"
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


class DelayedCache:
    """dKV-Cache (Ma et al. 2025, the "decode" variant): a token's keys and values are cached one
    step after it is decoded and reused from then on; masked tokens are recomputed every step.

    A position is recomputed when its token differs from the one its cached keys/values were made
    from (so a token decoded at step k is recomputed at k + 1 with its new value: the delay) or
    when it is a mask. Every ``refresh`` steps the whole canvas is recomputed. In a batch, the
    positions recomputed are the union over the sequences."""

    def __init__(self, length: int, shifted: bool, refresh: int, mask_id: int | None) -> None:
        if refresh < 1:
            raise ValueError(f"kv_refresh must be >= 1, got {refresh!r}")
        self.refresh_every, self.shifted, self.mask_id = refresh, shifted, mask_id
        self.count = 0
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.made_from: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def refresh(self, forward: Forward, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        cache = DynamicCache()
        logits = forward(ids, attention, past_key_values=cache)
        if cache.get_seq_length() != ids.shape[1]:
            raise ValueError("kv_cache='dkv' needs a model whose attention layers fill a transformers Cache passed "
                             "to them (cache= or past_key_values=); this model left it empty")
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.made_from, self.logits, self.count = ids.clone(), logits, 1
        return logits

    def step(self, forward: Forward, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        assert self.logits is not None and self.made_from is not None
        if self.count % self.refresh_every == 0:
            return self.refresh(forward, ids, attention)
        self.count += 1
        query = (ids != self.made_from).any(0)
        if self.mask_id is not None:
            query |= (ids == self.mask_id).any(0)
        wanted = query.clone()
        if self.shifted:  # a shifted model predicts position i at i - 1: compute i - 1 too
            query |= torch.cat([query[1:], query.new_zeros(1)])
        if not bool(query.any()):
            return self.logits
        keep = ~query
        past = DynamicCache()
        for index, (keys, values) in enumerate(self.layers):
            past.update(keys[:, :, keep], values[:, :, keep], index)
        mask = torch.cat([attention[:, keep], attention[:, query]], dim=1)
        fresh = forward(ids[:, query], mask, position_ids=positions[:, query], past_key_values=past)
        width = int(query.sum())
        updated = []
        for (keys, values), layer in zip(self.layers, past.layers):
            keys, values = keys.clone(), values.clone()
            keys[:, :, query], values[:, :, query] = layer.keys[:, :, -width:], layer.values[:, :, -width:]
            updated.append((keys, values))
        self.layers = updated
        self.made_from = ids.clone()
        logits = self.logits.clone()
        # within the computed subset a shifted model's logits are right only where the position
        # before is computed too: the wanted ones; the others keep their earlier logits
        logits[:, wanted] = fresh[:, wanted[query]]
        self.logits = logits
        return logits


def make_cache(mode: str, start: int, stop: int, length: int, shifted: bool, refresh: int,
               mask_id: int | None = None) -> BlockCache | DelayedCache:
    """The block's cache for ``kv_cache=mode`` (``refresh``: dKV-Cache's full-refresh interval)."""
    if mode == "dkv":
        return DelayedCache(length, shifted, refresh, mask_id)
    return BlockCache(mode, start, stop, length, shifted)
