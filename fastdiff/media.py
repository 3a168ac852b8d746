"""What a pipeline returns, as files a user can open: images as they are, videos as animations.

Image pipelines return `.images`, video pipelines (Wan, ...) `.frames`: one list of frames per
prompt. Callers that only want "the outputs" should not need to know which; and a video
should be written without a video codec dependency, so it becomes an animated image that
Pillow writes and every browser plays:

- `.png` (the CLI's default name): APNG, lossless, so a vanilla and an accelerated video can
  be compared exactly from the files; viewers without APNG support show the first frame.
- `.gif`: plays everywhere, but is quantised to 256 colours per frame.
- `.webp`: animated WebP, written lossless.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image, ImageSequence

__all__ = [
    "VIDEO_FPS",
    "VIDEO_SUFFIXES",
    "Video",
    "makes_video",
    "pipeline_outputs",
    "read_frames",
    "save_output",
    "save_video",
]

# Wan 2.1 generates 16 frames per second; a tiny model's few frames play at the same rate.
VIDEO_FPS = 16.0

# Suffix -> Pillow format for animated output; APNG is Pillow's PNG writer with several frames.
VIDEO_SUFFIXES: dict[str, str] = {".png": "PNG", ".apng": "PNG", ".gif": "GIF", ".webp": "WEBP"}


@dataclass(frozen=True)
class Video(Sequence[Image.Image]):
    """The frames of one generated video, with the size attributes and `save` of an image.

    Code written for image pipelines (`out.width`, `out.save(path)`) then works unchanged on a
    video; indexing and iterating give the frames.
    """

    frames: tuple[Image.Image, ...]
    fps: float = VIDEO_FPS

    def __post_init__(self) -> None:
        if not self.frames:
            raise ValueError("a video needs at least one frame")
        sizes = {frame.size for frame in self.frames}
        if len(sizes) > 1:
            raise ValueError(f"all frames of a video must have one size, got {sorted(sizes)}")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Image.Image]: ...

    def __getitem__(self, index: int | slice) -> Image.Image | Sequence[Image.Image]:
        return self.frames[index]

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def save(self, path: str | os.PathLike[str]) -> Path:
        return save_video(self.frames, path, fps=self.fps)


def makes_video(pipe: Any) -> bool:
    """Whether a pipeline generates videos, known before calling it: video pipelines take
    `num_frames` (Wan, CogVideoX, LTX, HunyuanVideo, AnimateDiff, ...), image pipelines do not.
    Lets a command line refuse an output name that cannot hold a video before any work."""
    if not callable(pipe):
        return False
    return "num_frames" in inspect.signature(type(pipe).__call__).parameters


def pipeline_outputs(result: Any) -> Any:
    """`.frames` of a video pipeline's output (each PIL video as a `Video`), else `.images`.

    With `output_type="np"` or `"pt"` the frames stay the pipeline's array, shaped
    (batch, frames, ...), as its images would.
    """
    frames = getattr(result, "frames", None)
    if frames is None:
        return result.images
    if isinstance(frames, list) and all(_is_frame_list(video) for video in frames):
        return [Video(tuple(video)) for video in frames]
    return frames


def _is_frame_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(f, Image.Image) for f in value)


def save_output(output: Any, path: str | os.PathLike[str], *, fps: float | None = None) -> Path:
    """Write one generated output: an image as itself, a video as an animation (by suffix).

    `output` is a PIL image, a `Video`, a list of PIL frames, or an array: (H, W, C) is an
    image, (F, H, W, C) a video, float values in [0, 1] as diffusers' `output_type="np"`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(output, Image.Image):
        output.save(path)
        return path
    if isinstance(output, Video):
        return save_video(output.frames, path, fps=fps or output.fps)
    if _is_frame_list(output):
        return save_video(output, path, fps=fps or VIDEO_FPS)
    array = np.asarray(output)
    if array.ndim == 3:
        _to_image(array).save(path)
        return path
    if array.ndim == 4:
        return save_video([_to_image(frame) for frame in array], path, fps=fps or VIDEO_FPS)
    raise TypeError(
        f"cannot save {type(output).__name__} with shape {array.shape}: expected a PIL image, a list of "
        "frames, an (H, W, C) image array or an (F, H, W, C) video array"
    )


def _to_image(array: np.ndarray) -> Image.Image:
    """diffusers' numpy output is float in [0, 1]; round it as its own `numpy_to_pil` does."""
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def save_video(frames: Iterable[Image.Image], path: str | os.PathLike[str], *, fps: float = VIDEO_FPS) -> Path:
    """Write frames as an animated PNG, GIF or WebP, chosen by the suffix; loops forever.

    Pillow merges consecutive identical frames into one longer frame (APNG, GIF): the file
    plays the same, but reads back with fewer frames.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"{path}: a video is written as an animated image; use one of {', '.join(VIDEO_SUFFIXES)} "
            f"(got {path.suffix or 'no suffix'!r})"
        )
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    images = [frame.convert("RGB") for frame in frames]
    if not images:
        raise ValueError("a video needs at least one frame")
    duration_ms = 1000.0 / fps
    options: dict[str, Any] = {"save_all": True, "append_images": images[1:], "loop": 0}
    if suffix == ".gif":
        # GIF stores durations in centiseconds; disposal 1 keeps frames from blending.
        options.update(duration=max(round(duration_ms / 10) * 10, 20), disposal=1, optimize=False)
    elif suffix == ".webp":
        options.update(duration=round(duration_ms), lossless=True, quality=100, method=4)
    else:
        options.update(duration=duration_ms)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, format=VIDEO_SUFFIXES[suffix], **options)
    return path


def read_frames(path: str | os.PathLike[str]) -> list[Image.Image]:
    """All frames of an image file (one for a still image), as RGB, e.g. to check a saved video."""
    with Image.open(path) as image:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
