"""ZeRO-sharded Adamax / Nadam: ``ZeroOptimizer`` and its checkpoint error."""

from optim.zero.checkpoint import CheckpointError
from optim.zero.zero_optimizer import ZeroOptimizer

__all__ = ["CheckpointError", "ZeroOptimizer"]
