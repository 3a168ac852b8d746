"""Single-device reuse methods, one module each, all expressed as plans for the core engine."""

from .block_cache import BlockCache, BlockCacheCalibration
from .deepcache import DeepCache
from .early_exit import EarlyExit, EarlyExitCalibration
from .encoder_propagation import EncoderPropagation
from .tgate import TGate

__all__ = ["BlockCache", "BlockCacheCalibration", "DeepCache", "EarlyExit", "EarlyExitCalibration", "EncoderPropagation", "TGate"]
