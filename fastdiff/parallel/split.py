"""Which latent rows each process owns.

Patches are contiguous row ranges. Each is a whole number of ``unit`` rows, ``unit`` being the
UNet's total downsampling, so that at every resolution level a patch is a whole number of rows
and a stride-2 convolution sees exactly the rows it would in the full image. Heights that do
not divide evenly give the first processes one unit more: no padding enters the computation
(padding is only used to make gloo's equal-size messages).
"""

from __future__ import annotations


def row_partition(rows: int, world_size: int, unit: int = 1) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``, one per process, covering ``rows``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if unit < 1 or rows % unit:
        raise ValueError(
            f"PatchParallel: the latent height ({rows} rows) must be a multiple of {unit} (the denoiser's "
            "total downsampling) to be split into patches"
        )
    units = rows // unit
    if world_size > units:
        raise ValueError(
            f"PatchParallel: more processes ({world_size}) than latent rows can be split into: {rows} rows give at "
            f"most {units} patches of {unit} rows (the denoiser downsamples {unit}x); use at most {units} processes "
            "or a taller image"
        )
    base, extra = divmod(units, world_size)
    ranges, start = [], 0
    for rank in range(world_size):
        stop = start + (base + (1 if rank < extra else 0)) * unit
        ranges.append((start, stop))
        start = stop
    return ranges
