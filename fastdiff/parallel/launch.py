"""Starting N local processes from Python, as torchrun would, and collecting what each returns.

For the benchmark harness and the tests: each child gets ``RANK``/``WORLD_SIZE``/``MASTER_*``
like under a launcher, so the code it runs is exactly what a user's script runs under torchrun.
A child's exception is returned to the parent (as text) instead of being lost in its stderr.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, threads: int | None, target: Callable[..., Any], args: tuple,
           folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        outcome: tuple[str, Any] = ("ok", target(rank, *args))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        outcome = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    Path(folder, f"{rank}.pkl").write_bytes(pickle.dumps(outcome))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _stop(processes: list[Any], grace_s: float = 5.0) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()


def run_processes(world_size: int, target: Callable[..., Any], *args: Any,
                  threads: int | None = None) -> list[tuple[str, Any]]:
    """Run ``target(rank, *args)`` in ``world_size`` fresh processes; ``[(status, result), ...]`` by
    rank, status ``"ok"`` or ``"error"`` (result: the traceback), ``"killed"`` (result: the signal)
    if something outside killed it, ``"lost"`` if it died silently."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(_child, args=(world_size, free_port(), threads, target, args, folder),
                                     nprocs=world_size, join=False, start_method="spawn")
        killed: dict[int, str] = {}
        try:
            while not context.join():
                pass
        except mp.ProcessExitedException as exc:  # killed from outside (out of memory): say so, not a traceback
            _stop(context.processes)
            killed[exc.error_index] = exc.signal_name or f"exit code {exc.exit_code}"
        except BaseException:  # Ctrl-C or a failed child: none of the others may outlive this call
            _stop(context.processes)
            raise
        outcomes = []
        for rank in range(world_size):
            file = Path(folder, f"{rank}.pkl")
            if rank in killed:
                outcomes.append(("killed", killed[rank]))
            else:
                outcomes.append(pickle.loads(file.read_bytes()) if file.exists() else ("lost", None))
        return outcomes
