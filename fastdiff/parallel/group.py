"""The process group patch parallelism runs on, taken from whatever launched the processes.

``torchrun`` and ``accelerate launch`` both set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; the
group is created from them (NCCL with one GPU per process when CUDA is there, gloo on CPU
otherwise) with a timeout, so a crashed process makes the others fail instead of waiting
forever. A single process (no launcher) is a group of one, and patch parallelism does nothing.
"""

from __future__ import annotations

import datetime
import os
import sys
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
    if launched_world_size() == 1:
        return torch.device("cuda", torch.cuda.current_device())
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= gpus:  # two processes on one GPU would make NCCL fail with "Duplicate GPU detected"
        raise ValueError(f"process {local_rank} of this machine has no GPU of its own: {_gpu_shortage(gpus)}")
    return torch.device("cuda", local_rank)


def _gpu_shortage(gpus: int) -> str:
    return (f"{gpus} GPU(s) here, and patch parallelism on GPUs needs one per process; start at most {gpus} "
            "process(es) per machine, or put the pipeline on the CPU (--device cpu) to run every process there "
            "over gloo")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory_bytes() -> int | None:
    """Memory the system can still give out without swapping (Linux ``MemAvailable``); None elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_memory_bytes() -> int | None:
    """This process's resident memory (Linux); a fresh process that loads the same pipeline needs
    about as much, which is how a local launch's memory need is estimated."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_bytes() -> int | None:
    """The most this process has held resident so far (Linux and macOS)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def check_processes_fit(processes: int, requested: str = "auto", *, threads: int | None = None,
                        process_bytes: int | None = None, freed_bytes: int | None = None,
                        basis: str = "as much as this one holds with the pipeline loaded") -> None:
    """Refuse, before anything is started, a local launch this machine cannot hold: more GPU
    processes than GPUs, more CPU processes (times ``threads``) than cores, or more memory than
    is available (``process_bytes`` each; ``freed_bytes`` will be given back by the caller before
    the processes start)."""
    on_gpu = torch.cuda.is_available() and not _cpu_requested(requested)
    if on_gpu and processes > torch.cuda.device_count():
        raise ValueError(f"--parallel: {processes} processes on GPUs: {_gpu_shortage(torch.cuda.device_count())}")
    cores = available_cores()
    if not on_gpu and processes * (threads or 1) > cores:
        need = f"{processes} processes" + (f" x {threads} threads" if threads and threads > 1 else "")
        raise ValueError(f"--parallel: {need} on the CPU need {processes * (threads or 1)} cores and this machine "
                         f"has {cores}: processes sharing a core only wait for each other; use at most "
                         f"{max(cores // (threads or 1), 1)} processes" + (" or fewer --threads" if threads and threads > 1 else ""))
    available = available_memory_bytes()
    if available is not None and freed_bytes:
        available += max(freed_bytes, 0)
    if process_bytes and available is not None and processes * process_bytes > available:
        raise ValueError(f"--parallel: {processes} processes need about {processes * process_bytes / 2**30:.1f} GiB "
                         f"({process_bytes / 2**30:.2f} GiB each, {basis}) "
                         f"and {available / 2**30:.1f} GiB are available; use at most "
                         f"{max(available // process_bytes, 1)} processes")


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
