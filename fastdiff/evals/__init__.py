"""Measuring what acceleration buys and what it costs."""

from .bench import BenchResult, RunStats, benchmark, psnr
from .fid import FeatureExtractor, FIDResult, fid_folders, frechet_distance, load_extractor
from .fidelity import PairedResult, paired_fidelity, parse_seeds, read_prompts

__all__ = [
    "BenchResult", "FIDResult", "FeatureExtractor", "PairedResult", "RunStats", "benchmark", "fid_folders",
    "frechet_distance", "load_extractor", "paired_fidelity", "parse_seeds", "psnr", "read_prompts",
]
