"""Single-device reuse methods, one module each, all expressed as plans for the core engine."""

from .deepcache import DeepCache

__all__ = ["DeepCache"]
