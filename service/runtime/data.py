"""Deterministic data order: one global sample stream per seed, cut into per-rank batches.

The stream is an endless sequence of sample indices: epoch ``e`` is a random
permutation of the dataset drawn from ``(seed, e)``. A run consumes the stream
in order: optimizer step ``s`` reads ``grad_accum_steps * world_size *
batch_size`` samples starting at the run's *position*; micro-batch ``k`` of rank
``r`` reads ``batch_size`` of them at ``position + (k * world_size + r) * batch_size``.
A checkpoint stores the position, so a resumed run (even with another world
size) continues exactly where the stream stopped.
"""

from __future__ import annotations

import torch

from zerotrain.service.seeds import epoch_seed

__all__ = ["SampleStream"]


class SampleStream:
    """The global sample order for a dataset of ``num_samples`` items and a seed."""

    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator()
            g.manual_seed(epoch_seed(self.seed, epoch))
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Sample indices at stream positions ``[start, start + count)``."""
        out = []
        while count > 0:
            epoch, offset = divmod(start, self.num_samples)
            take = min(count, self.num_samples - offset)
            out.append(self._permutation(epoch)[offset : offset + take])
            start, count = start + take, count - take
        return torch.cat(out) if len(out) != 1 else out[0]

    @staticmethod
    def micro_batch_start(
        position: int, *, micro: int, rank: int, world_size: int, batch_size: int
    ) -> int:
        """Stream position of rank ``rank``'s micro-batch ``micro`` in the step starting at ``position``."""
        return position + (micro * world_size + rank) * batch_size
