"""Patch parallelism over several processes (DistriFusion, PCPP) on torch.distributed."""

from .group import ProcessGroup, is_main_process, process_device, process_group
from .patch_parallel import PatchParallel, Unsplittable
from .split import row_partition

__all__ = ["PatchParallel", "ProcessGroup", "Unsplittable", "is_main_process", "process_device", "process_group",
           "row_partition"]
