"""zerotrain's optimizers: drop-in Adamax / Nadam and their pure update steps.

``optim`` is pure maths plus sharding: it never imports the service, Ray or gRPC.
"""

from zerotrain.optim.adamax import Adamax
from zerotrain.optim.nadam import Nadam
from zerotrain.optim.zero import ZeroOptimizer

__all__ = ["Adamax", "Nadam", "ZeroOptimizer"]
