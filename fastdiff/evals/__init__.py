"""Measuring what acceleration buys and what it costs."""

from .bench import BenchResult, RunStats, benchmark, psnr

__all__ = ["BenchResult", "RunStats", "benchmark", "psnr"]
