"""Which latent rows each process owns.

Patches are contiguous row ranges. Each is a whole number of ``unit`` rows, ``unit`` being the
UNet's total downsampling (a transformer's patch size: one token row), so that at every resolution level a patch is a whole number of rows
and a stride-2 convolution sees exactly the rows it would in the full image. Heights that do
not divide evenly give the first processes one unit more: no padding enters the computation
(padding is only used to make gloo's equal-size messages).
"""

from __future__ import annotations

from ..core.progress import plural


def row_partition(rows: int, world_size: int, unit: int = 1, tokens: bool = False) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``, one per process, covering ``rows``. ``tokens``: the unit is a
    transformer's token row (its patch size), not a UNet's downsampling, as messages say."""
    why = f"a token row is {unit} latent rows" if tokens else f"the denoiser downsamples {unit}x"
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if unit < 1 or rows % unit:
        raise ValueError(
            f"PatchParallel: the latent height ({rows} rows) must be a multiple of {unit} ({why}) to be split "
            "into patches"
        )
    units = rows // unit
    if world_size > units and tokens:
        raise ValueError(
            f"PatchParallel: more processes ({world_size}) than token rows: {rows} latent rows make "
            f"{plural(units, 'token row')} ({why}), and a patch is at least one; use at most "
            f"{units} process{'' if units == 1 else 'es'} or a taller image"
        )
    if world_size > units:
        raise ValueError(
            f"PatchParallel: more processes ({world_size}) than latent rows can be split into: {rows} rows give at "
            f"most {units} patches of {unit} rows ({why}); use at most {units} processes or a taller image"
        )
    base, extra = divmod(units, world_size)
    ranges, start = [], 0
    for rank in range(world_size):
        stop = start + (base + (1 if rank < extra else 0)) * unit
        ranges.append((start, stop))
        start = stop
    return ranges
