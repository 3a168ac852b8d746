"""The step-aware reuse engine shared by every method: clock, plan, hooks, ledger, apply."""

from .accelerator import Accelerator, apply, find_denoiser
from .clock import StepClock
from .ledger import Ledger, ModuleStats, Report, StepSummary
from .method import METHODS, Method, parse_method
from .plan import Decision, Plan

__all__ = [
    "Accelerator", "Decision", "Ledger", "METHODS", "Method", "ModuleStats", "Plan", "Report",
    "StepClock", "StepSummary", "apply", "find_denoiser", "parse_method",
]
