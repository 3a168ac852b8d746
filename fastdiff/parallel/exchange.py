"""Moving patch data between processes, and counting what moved.

Two patterns. ``gather``: every process contributes one payload of the same shape and gets
everyone's — synchronously, or on a stale step from the latest exchange (the others' previous
step, its own fresh), with this step's payloads packed into one flat buffer per dtype and
all-gathered asynchronously whenever ``bucket_bytes`` of them are queued (and at the end of the
denoiser call), each bucket waited on only when the next step first reads one of its payloads
(DistriFusion). Early layers' buckets so travel while later layers compute. ``neighbours``: point-to-point with the processes above and
below only (PCPP). Every transfer is reported with its bytes, kind and the time spent waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

Record = Callable[[str, int, int, float], None]  # kind, bytes sent, bytes received, seconds waited


class PeerLost(RuntimeError):
    """A collective failed: another process crashed, stopped, or the group timed out."""


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Exchange:
    def __init__(self, rank: int, world_size: int, record: Record, *, keep_latest: bool, context: str = "",
                 group: Any = None, peers: list[int] | None = None, bucket_bytes: int | None = None) -> None:
        """``rank``/``world_size`` within ``group`` (default: the whole world); ``peers``: the global
        rank of each member, for point-to-point messages; ``bucket_bytes``: stale payloads are sent
        once this many bytes are queued (``None``: one buffer per step, at its end)."""
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.peers = peers if peers is not None else list(range(world_size))
        self.record = record
        self.keep_latest = keep_latest
        self.context = context
        self.bucket_bytes = bucket_bytes
        self.stale = False
        self.send_stale = True  # False on the last step: nobody will read its payloads
        self.latest: dict[Any, list[torch.Tensor]] = {}
        self.outbound: list[tuple[Any, str, torch.Tensor]] = []
        self.queued_bytes = 0
        self.pending: list[tuple[Any, list[torch.Tensor], list[tuple[Any, torch.Size, int]]]] = []
        self.in_flight: set[Any] = set()

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses with backend-specific text
            raise PeerLost(
                f"PatchParallel: process {self.rank} of {self.world_size} lost contact with the others during "
                f"{what}{self.context} — another process crashed, was stopped, or the process group timed out "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    # -- all processes ----------------------------------------------------------------------
    def gather(self, key: Any, kind: str, payload: torch.Tensor, fresh: bool = False) -> list[torch.Tensor]:
        """Every process's ``payload`` (the same shape on all), by rank; ``fresh``: synchronously
        even on a stale step (outputs that the next layer needs now)."""
        payload = payload.contiguous()
        if self.stale and not fresh:
            self._settle(key)
            previous = self.latest.get(key)
            if previous is not None and previous[self.rank].shape == payload.shape:
                self._queue(key, kind, payload)
                parts = list(previous)
                parts[self.rank] = payload
                return parts
        parts = [torch.empty_like(payload) for _ in range(self.world_size)]
        start = time.perf_counter()
        self._run(f"a {kind} exchange", lambda: dist.all_gather(parts, payload, group=self.group))
        size = _nbytes(payload) * (self.world_size - 1)
        self.record(kind, size, size, time.perf_counter() - start)
        if self.keep_latest:
            self.latest[key] = parts
        return parts

    def gather_concat(self, key: Any, kind: str, tensor: torch.Tensor, lengths: list[int], dim: int,
                      fresh: bool = False) -> torch.Tensor:
        """Every process's ``tensor`` joined along ``dim``, where process *r* holds ``lengths[r]`` of
        it: padded to the longest for the exchange (gloo needs equal sizes), trimmed after."""
        dim = dim % tensor.dim()
        own, most = tensor.shape[dim], max(lengths)
        if most > own:
            shape = list(tensor.shape)
            shape[dim] = most - own
            tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
        parts = self.gather(key, kind, tensor, fresh=fresh)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim=dim)

    def _queue(self, key: Any, kind: str, payload: torch.Tensor) -> None:
        if not self.send_stale:
            return
        self.outbound.append((key, kind, payload))
        self.queued_bytes += _nbytes(payload)
        if self.bucket_bytes is not None and self.queued_bytes >= self.bucket_bytes:
            self.flush()

    def flush(self) -> None:
        """Send the queued stale payloads: one flat buffer per dtype, all-gathered asynchronously."""
        if not self.outbound:
            return
        groups: dict[torch.dtype, list[tuple[Any, str, torch.Tensor]]] = {}
        for item in self.outbound:
            groups.setdefault(item[2].dtype, []).append(item)
        self.outbound, self.queued_bytes = [], 0
        for items in groups.values():
            flat = torch.cat([t.reshape(-1) for _, _, t in items])
            parts = [torch.empty_like(flat) for _ in range(self.world_size)]
            work = self._run("a stale exchange", lambda: dist.all_gather(parts, flat, group=self.group, async_op=True))
            self.pending.append((work, parts, [(key, t.shape, t.numel()) for key, _, t in items]))
            self.in_flight.update(key for key, _, _ in items)
            for _, kind, t in items:
                size = _nbytes(t) * (self.world_size - 1)
                self.record(kind, size, size, 0.0)

    def _settle(self, key: Any = None) -> None:
        """Wait for the buffers in flight, oldest first, up to the one carrying ``key`` (``None``:
        all of them), and unpack them into ``latest``."""
        if not self.pending or (key is not None and key not in self.in_flight):
            return
        start = time.perf_counter()
        while self.pending:
            work, parts, layout = self.pending.pop(0)
            self._run("the wait for the previous step's exchange", work.wait)
            offset = 0
            for unpacked, shape, count in layout:
                self.latest[unpacked] = [p[offset:offset + count].view(shape) for p in parts]
                self.in_flight.discard(unpacked)
                offset += count
            if key is not None and key not in self.in_flight:
                break
        self.record("wait", 0, 0, time.perf_counter() - start)

    def finish(self) -> None:
        """Drain anything still in flight and drop what was queued (the end of a call)."""
        self._settle()
        self.outbound, self.queued_bytes = [], 0

    def swap(self, kind: str, tensor: torch.Tensor, partner: int) -> torch.Tensor:
        """Send ``tensor`` to the process with global rank ``partner`` and receive its own."""
        received = torch.empty_like(tensor)
        start = time.perf_counter()

        def exchange() -> None:
            works = [dist.isend(tensor.contiguous(), partner), dist.irecv(received, partner)]
            for work in works:
                work.wait()

        self._run(f"a {kind} exchange with the partner process", exchange)
        self.record(kind, _nbytes(tensor), _nbytes(received), time.perf_counter() - start)
        return received

    # -- neighbours only ----------------------------------------------------------------------
    def neighbours(self, kind: str, to_above: torch.Tensor, to_below: torch.Tensor,
                   above_shape: tuple[int, ...], below_shape: tuple[int, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send ``to_above`` to the previous process and ``to_below`` to the next; receive theirs."""
        rank, last = self.rank, self.world_size - 1
        from_above = torch.empty(above_shape, dtype=to_above.dtype, device=to_above.device) if rank > 0 else None
        from_below = torch.empty(below_shape, dtype=to_below.dtype, device=to_below.device) if rank < last else None
        sent = received = 0
        start = time.perf_counter()

        def exchange() -> None:
            works = []
            peers = self.peers
            if from_above is not None:
                works += [dist.isend(to_above.contiguous(), peers[rank - 1]), dist.irecv(from_above, peers[rank - 1])]
            if from_below is not None:
                works += [dist.isend(to_below.contiguous(), peers[rank + 1]), dist.irecv(from_below, peers[rank + 1])]
            for work in works:
                work.wait()

        self._run(f"a {kind} exchange with the neighbouring processes", exchange)
        if from_above is not None:
            sent, received = sent + _nbytes(to_above), received + _nbytes(from_above)
        if from_below is not None:
            sent, received = sent + _nbytes(to_below), received + _nbytes(from_below)
        self.record(kind, sent, received, time.perf_counter() - start)
        return from_above, from_below
