"""Fréchet distance between two sets of images, with a feature extractor chosen by name.

The statistics and the distance come from torchmetrics' ``FrechetInceptionDistance``, because
it accumulates in float64 and reduces its sums across ranks under ``torch.distributed``. Features
are extracted once per image and fed to the metric through an identity "network", so one image
can take part in several comparisons (paired mode compares vanilla with accelerated *and* with
real images) without running the extractor twice.

Extractors (``features=``):

- ``"inception"``: the standard protocol, Inception-v3 pool features (2048) on uint8 images as in
  torch-fidelity and the original TensorFlow FID. Needs the ``torch-fidelity`` package (which
  imports torchvision) and the weights file on disk; nothing is ever downloaded.
- ``"digits"``: fastdiff's built-in digits feature network, fully offline.
- ``"package.module:callable"``: ``callable()`` returns an ``nn.Module`` that maps uint8 images
  ``N x 3 x H x W`` (any H, W) to float features ``N x D``; an ``int`` attribute ``num_features``
  (= D) is optional (otherwise it is probed with one image).

Only numbers computed by the same extractor on images of the same size are comparable.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INCEPTION_FEATURES = 2048
# The file torch-fidelity (under torchmetrics) fetches with torch.hub; with it present in
# ``<torch hub dir>/checkpoints/`` nothing is downloaded. pytorch-fid's copy carries the same
# SHA-256 prefix in its name, so it is accepted too.
INCEPTION_WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


# --------------------------------------------------------------------------------------------
# The distance itself


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 with ``scipy.linalg.sqrtm``.

    Independent of torchmetrics (which takes eigenvalues of sigma1 @ sigma2) so each can check
    the other. A singular product (fewer samples than features) can make ``sqrtm`` return
    non-finite values; then a tiny multiple of the identity is added to both covariances.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(mu1.size) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (the estimator torchmetrics uses) of an ``N x D`` array."""
    array = np.asarray(features, dtype=np.float64)
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


class _Identity(torch.nn.Module):
    """Lets torchmetrics accumulate features that were extracted elsewhere."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchmetrics_fid() -> type:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"FID needs torchmetrics and scipy: pip install 'fastdiff[eval]' ({exc})"
        ) from None
    except Exception as exc:  # torch-fidelity installed but its torchvision import broken
        raise ImportError(
            f"torchmetrics' FID module failed to import ({type(exc).__name__}: {exc}); usually torch-fidelity "
            "is installed but torchvision does not match torch: fix torchvision or uninstall torch-fidelity"
        ) from None
    return FrechetInceptionDistance


class FrechetAccumulator:
    """Running feature sums of a "real" and a "fake" set; ``compute()`` gives their Fréchet distance.

    A thin wrapper over torchmetrics' metric, so the sums are reduced across ranks when
    ``torch.distributed`` is initialised (every rank must call ``compute`` in the same order).
    """

    def __init__(self, num_features: int, device: torch.device | str = "cpu") -> None:
        self.metric = _torchmetrics_fid()(feature=_Identity(num_features)).to(device)

    def update(self, features: torch.Tensor, *, real: bool) -> None:
        if features.numel():
            self.metric.update(features.to(self.metric.device), real=real)

    def compute(self) -> float:
        """The distance; rounding can leave it a hair below zero, which is clipped."""
        value = float(self.metric.compute())
        return max(value, 0.0) if math.isfinite(value) else value


# --------------------------------------------------------------------------------------------
# Feature extractors


@dataclass
class FeatureExtractor:
    """A network mapping uint8 ``N x 3 x H x W`` to float ``N x D``, and what to call it in results."""

    name: str
    module: torch.nn.Module
    num_features: int
    settings: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def to(self, device: torch.device | str) -> FeatureExtractor:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features = self.module(images.to(self.device))
        if features.dim() != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(
                f"features: extractor {self.name!r} returned shape {tuple(features.shape)} for "
                f"{images.shape[0]} images; it must return N x D"
            )
        return features.float()


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file to use: ``path`` if given, else torch's hub cache.

    Raises ``FileNotFoundError`` naming the exact file and folder, so that the metric never
    falls back to a download (which hangs on an offline machine).
    """
    if path is not None:
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise FileNotFoundError(f"--inception-weights: {resolved} does not exist")
        return resolved
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_WEIGHTS_FILES:
        if (checkpoints / name).is_file():
            return checkpoints / name
    raise FileNotFoundError(
        f"features 'inception' needs the FID Inception weights, and {checkpoints / INCEPTION_WEIGHTS_FILES[0]} "
        f"does not exist. Download {INCEPTION_WEIGHTS_URL} on a connected machine and put it there "
        "(the folder follows $TORCH_HOME) or pass --inception-weights PATH; it also needs the torch-fidelity "
        "package. Or use --features digits, which works offline."
    )


def _inception(weights: str | os.PathLike | None) -> FeatureExtractor:
    path = inception_weights_path(weights)
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(
            "features 'inception' needs the torch-fidelity package (pip install torch-fidelity; it imports "
            "torchvision, which must match your torch). Or use --features digits, which works offline."
        )
    _torchmetrics_fid()
    from torchmetrics.image.fid import NoTrainInceptionV3

    # antialias=False: torch-fidelity's TF1-compatible bilinear resize to 299, as in the original FID.
    module = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                feature_extractor_weights_path=str(path), antialias=False)
    return FeatureExtractor("inception", module, INCEPTION_FEATURES,
                            {"weights": str(path), "layer": "pool3 (2048)", "resize": "tf1-bilinear 299"})


def _digits() -> FeatureExtractor:
    try:
        from ..models.digits import load_feature_network
    except ImportError as exc:
        raise ModuleNotFoundError(f"features 'digits': the built-in digits network is not available ({exc})") from None
    module = load_feature_network()
    return FeatureExtractor("digits", module, _num_features(module, "digits"))


def _user_module(spec: str) -> FeatureExtractor:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"features: cannot load {spec!r} ({type(exc).__name__}: {exc})") from None
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"features: {spec!r} returned {type(module).__name__}, expected a torch.nn.Module")
    return FeatureExtractor(spec, module, _num_features(module, spec))


def _num_features(module: torch.nn.Module, name: str) -> int:
    """D, from ``module.num_features`` or by running one small image through it."""
    declared = getattr(module, "num_features", None)
    if declared is not None:
        return int(declared)
    with torch.no_grad():
        probe = module(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    if probe.dim() != 2:
        raise ValueError(f"features: {name!r} returned shape {tuple(probe.shape)}; it must return N x D")
    return int(probe.shape[1])


def load_extractor(features: str | FeatureExtractor = "inception", *,
                   inception_weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """Resolve ``features`` (``inception``, ``digits`` or ``module:callable``) to an extractor in eval mode."""
    if isinstance(features, FeatureExtractor):
        return features
    if features == "inception":
        extractor = _inception(inception_weights)
    elif features == "digits":
        extractor = _digits()
    elif ":" in features:
        extractor = _user_module(features)
    else:
        raise ValueError(f"features: {features!r} is not 'inception', 'digits' or 'package.module:callable'")
    extractor.module.eval()
    return extractor


# --------------------------------------------------------------------------------------------
# Image folders


def list_images(folder: str | os.PathLike, argument: str) -> list[Path]:
    """Sorted PNG/JPEG files directly in ``folder``; errors name the ``argument`` they came from."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{argument}: {path} is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(
            f"{argument}: {path} has {len(files)} PNG/JPEG image(s); FID needs at least 2 (it estimates a covariance)"
        )
    return files


def common_size(files: Sequence[Path], argument: str) -> tuple[int, int]:
    """The first image's size; warns once if other images will be converted or resized to match.

    Reads only image headers, so a large folder is checked in a moment and an unreadable
    file is reported before any feature is computed.
    """
    sizes: list[tuple[int, int]] = []
    modes: list[str] = []
    for file in files:
        try:
            with Image.open(file) as image:
                sizes.append(image.size)
                modes.append(image.mode)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{argument}: cannot read image {file} ({exc})") from None
    size = sizes[0]
    resized = sum(s != size for s in sizes)
    converted = sum(m != "RGB" for m in modes)
    if resized or converted:
        warnings.warn(
            f"{argument}: {converted} of {len(files)} images are not RGB and were converted, {resized} are not "
            f"{size[0]}x{size[1]} (the first image's size) and were resized (bicubic)",
            stacklevel=3,
        )
    return size


def load_images(files: Sequence[Path], size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``N x 3 x H x W``, each image converted to RGB and resized to ``size`` if needed."""
    arrays = []
    for file in files:
        with Image.open(file) as image:
            rgb = image.convert("RGB")
            if rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.BICUBIC)
            arrays.append(np.asarray(rgb, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def batched(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


# --------------------------------------------------------------------------------------------
# torch.distributed: each rank takes a share, sums are reduced, rank 0 reports


def init_distributed_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); True if this call created it.

    NCCL when running on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    from ..parallel.group import launched_world_size, process_group

    if launched_world_size() <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    process_group(requested=device)
    return True


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def reduce_device(default: torch.device) -> torch.device:
    """Where a tensor must live for a collective: CUDA under NCCL, else where we computed."""
    if rank_and_world()[1] > 1 and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return default


def all_reduce(values: Sequence[float], op: str = "sum", device: torch.device | None = None) -> list[float]:
    """Sum or max of a few numbers over all ranks (the identity in a single process)."""
    if rank_and_world()[1] == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=reduce_device(device or torch.device("cpu")))
    reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor.cpu().tolist()


def progress(iterable: Any, *, total: int | None, desc: str, enabled: bool) -> Any:
    """A tqdm bar on rank 0 only (other ranks would interleave theirs)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not enabled or rank_and_world()[0] != 0)


# --------------------------------------------------------------------------------------------
# FID between two folders


@dataclass
class FIDResult:
    value: float
    n_real: int
    n_fake: int
    extractor: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        return (f"FID {self.value:.4f}  (N real = {self.n_real}, N fake = {self.n_fake}, "
                f"features: {self.extractor})")


def extract_folder(extractor: FeatureExtractor, files: Sequence[Path], size: tuple[int, int], batch_size: int,
                   *, desc: str, show_progress: bool) -> Iterator[torch.Tensor]:
    """Features of this rank's share of ``files``, batch by batch."""
    rank, world = rank_and_world()
    share = list(files[rank::world])
    batches = progress(batched(share, batch_size), total=math.ceil(len(share) / batch_size), desc=desc,
                       enabled=show_progress)
    for chunk in batches:
        yield extractor(load_images(chunk, size))


def fid_folders(real_dir: str | os.PathLike, fake_dir: str | os.PathLike, *,
                features: str | FeatureExtractor = "inception", batch_size: int = 50, device: str = "auto",
                inception_weights: str | os.PathLike | None = None, show_progress: bool = True) -> FIDResult:
    """FID between the PNG/JPEG images in two folders.

    Under ``torch.distributed`` each rank reads every ``world``-th image and the result (the same
    on every rank) covers all of them.
    """
    from ..check_only import exit_if_check_only
    from ..runner import resolve_device

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    real_files, fake_files = list_images(real_dir, "real_dir"), list_images(fake_dir, "fake_dir")
    real_size, fake_size = common_size(real_files, "real_dir"), common_size(fake_files, "fake_dir")
    target = resolve_device(device)
    extractor = load_extractor(features, inception_weights=inception_weights).to(target)
    exit_if_check_only("fastdiff fid")
    accumulator = FrechetAccumulator(extractor.num_features, reduce_device(target))
    for files, size, real, desc in ((real_files, real_size, True, "real"), (fake_files, fake_size, False, "fake")):
        for batch in extract_folder(extractor, files, size, batch_size, desc=f"FID features ({desc})",
                                    show_progress=show_progress):
            accumulator.update(batch, real=real)
    settings = {"real_dir": str(real_dir), "fake_dir": str(fake_dir), "real_size": list(real_size),
                "fake_size": list(fake_size), "batch_size": batch_size, "device": str(target),
                "world_size": rank_and_world()[1], **extractor.settings}
    return FIDResult(accumulator.compute(), len(real_files), len(fake_files), extractor.name, settings)
