"""ZeRO-sharded Adamax / Nadam: ``ZeroOptimizer`` and its checkpoint error."""

from zerotrain.optim.zero.checkpoint import CheckpointError
from zerotrain.optim.zero.zero_optimizer import ZeroOptimizer

__all__ = ["CheckpointError", "ZeroOptimizer"]
