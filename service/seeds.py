"""Every seed derived from a job's ``training.seed``, in one place and overflow-free.

``training.seed`` may be any integer in ``[0, 2**63 - 1]``. Each consumer (model
init, data order, a worker's global RNG) needs its own stream of randomness, so
it gets ``(seed * 1_000_003 + stream) mod (2**63 - 1)``: always a valid
``torch.manual_seed`` / ``Generator.manual_seed`` value (both take a 64-bit
integer), and for the usual small seeds exactly the value the runtime used
before the reduction was added (so old runs reproduce).
"""

from __future__ import annotations

__all__ = [
    "DATA_STREAM",
    "INIT_STREAM",
    "SEED_MODULUS",
    "derive_seed",
    "epoch_seed",
    "resume_seed",
    "worker_seed",
]

SEED_MODULUS = 2**63 - 1
"""Derived seeds lie in ``[0, SEED_MODULUS)``: non-negative and inside int64."""
INIT_STREAM = 1
"""Stream of model initialisation (``zerotrain.service.tasks``)."""
DATA_STREAM = 1_000
"""First stream of the data order: epoch ``e`` uses ``DATA_STREAM + e``."""
_MULTIPLIER = 1_000_003
_RESUME_STRIDE = 7919


def derive_seed(seed: int, stream: int = 0) -> int:
    """The seed of ``stream`` for a job seeded with ``seed`` (any non-negative integers)."""
    if seed < 0 or stream < 0:
        raise ValueError(f"seed and stream must be >= 0, got seed={seed}, stream={stream}")
    return (seed * _MULTIPLIER + stream) % SEED_MODULUS


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s sample permutation."""
    return derive_seed(seed, DATA_STREAM + epoch)


def worker_seed(seed: int, rank: int) -> int:
    """The global torch RNG seed of worker ``rank`` when a run starts from scratch."""
    return derive_seed(seed, rank)


def resume_seed(seed: int, rank: int, step: int) -> int:
    """Worker ``rank``'s RNG seed when resuming at ``step`` on another world size."""
    return derive_seed(seed, rank + _RESUME_STRIDE * step)
