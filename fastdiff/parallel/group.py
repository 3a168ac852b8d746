"""The process group patch parallelism runs on, taken from whatever launched the processes.

``torchrun`` and ``accelerate launch`` both set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; the
group is created from them (NCCL with one GPU per process when CUDA is there, gloo on CPU
otherwise) with a timeout, so a crashed process makes the others fail instead of waiting
forever. A single process (no launcher) is a group of one, and patch parallelism does nothing.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: one process, nothing to exchange


def launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _cpu_requested(requested: str) -> bool:
    return requested.startswith("cpu") or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def process_device(requested: str = "auto") -> torch.device:
    """The device this process computes on: its own GPU (``LOCAL_RANK``) when CUDA is usable and
    not declined (``requested="cpu"``, or accelerate's ``ACCELERATE_USE_CPU``)."""
    if not torch.cuda.is_available() or _cpu_requested(requested):
        return torch.device("cpu")
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if launched_world_size() > 1 and local_rank >= gpus:
        # two processes on one GPU would make NCCL fail with "Duplicate GPU detected"
        raise ValueError(f"process {local_rank} of this machine has no GPU of its own: {_gpu_shortage(gpus)}")
    return torch.device("cuda", local_rank if launched_world_size() > 1 else torch.cuda.current_device())


def _gpu_shortage(gpus: int) -> str:
    return (f"{gpus} GPU(s) here, and patch parallelism on GPUs needs one per process; start at most {gpus} "
            "process(es) per machine, or put the pipeline on the CPU (--device cpu) to run every process there "
            "over gloo")


def check_processes_fit(processes: int, requested: str = "auto") -> None:
    """Refuse, before anything is started, a local launch with more GPU processes than GPUs."""
    if torch.cuda.is_available() and not _cpu_requested(requested) and processes > torch.cuda.device_count():
        raise ValueError(f"--parallel: {processes} processes on GPUs: {_gpu_shortage(torch.cuda.device_count())}")


def launched_device(requested: str = "auto") -> str:
    """The ``--device`` to load on: under a launcher, ``auto`` means this process's own device."""
    if launched_world_size() > 1 and requested == "auto":
        return str(process_device())
    return requested


def process_group(timeout_s: float = DEFAULT_TIMEOUT_S, requested: str = "auto") -> ProcessGroup:
    """Join (or create) the default process group; a single unlaunched process is a group of one."""
    if dist.is_available() and dist.is_initialized():
        device = process_device("cpu" if dist.get_backend() == "gloo" else requested)
        return ProcessGroup(dist.get_rank(), dist.get_world_size(), device, dist.get_backend())
    if launched_world_size() <= 1 or not dist.is_available():
        return ProcessGroup(0, 1, process_device(requested), None)
    device = process_device(requested)
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), device, backend)


def is_main_process() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
