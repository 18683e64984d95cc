"""The collectives ZeroOptimizer uses, with a no-op path for a single process.

Every method is a collective over ``group``: all ranks must call it in the same
order with tensors of the same sizes. Without a group (or with one rank)
nothing is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Communicator"]

# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor; older ones have only those.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Done:
    """Handle of an operation that completed synchronously."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _ChunkOnWait:
    """An async all-reduce of a whole bucket that copies this rank's chunk out on ``wait()``."""

    def __init__(self, work: dist.Work, chunk: torch.Tensor, out: torch.Tensor) -> None:
        self._work, self._chunk, self._out, self._done = work, chunk, out, False

    def is_completed(self) -> bool:
        return self._done or self._work.is_completed()

    def wait(self) -> bool:
        if not self._done:
            self._work.wait()
            self._out.copy_(self._chunk)
            self._done = True
        return True


@dataclass
class Communicator:
    """A process group (or none) with this rank's coordinates."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    gloo_reduce_scatter_in_place: bool = True
    """On gloo, reduce-scatter as an in-place all-reduce (see ``reduce_bucket``); ``False``
    runs torch's own reduce-scatter, the call NCCL makes (tests use it to run that path)."""

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None) -> Communicator:
        """Use ``group`` (``None``: the default group if one is initialised, else none)."""
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise ValueError("process_group was given but torch.distributed is not initialised")
            return cls(None, 0, 1)
        world_size = dist.get_world_size(group)
        return cls(None, 0, 1) if world_size == 1 else cls(group, dist.get_rank(group), world_size)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        return str(dist.get_backend(self.group)) if self.distributed else "none"

    @property
    def device(self) -> torch.device:
        """Where this backend wants small tensors (NCCL: the current CUDA device)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce_bucket(self, full: torch.Tensor, piece_out: torch.Tensor | None):
        """Sum ``full`` over ranks (async); ``full`` must stay allocated until ``wait()``.

        With ``piece_out`` (reduce-scatter), this rank's piece of the sum is there
        when the handle's ``wait()`` returns and ``full`` is scratch; without it
        (all-reduce), ``full`` is summed in place. On gloo, torch's reduce-scatter
        is itself an all-reduce of a full clone of the input, with this rank's
        chunk copied out in ``wait()``, and its handle never reports completion.
        Doing exactly that on ``full`` in place gives the same sums without the
        copy, and a handle that reports completion, so ZeRO-2 frees buckets early.
        """
        if not self.distributed:
            if piece_out is not None:
                piece_out.copy_(full)
            return _Done()
        if piece_out is None:
            return dist.all_reduce(full, group=self.group, async_op=True)
        if self.backend == "gloo" and self.gloo_reduce_scatter_in_place:
            work = dist.all_reduce(full, group=self.group, async_op=True)
            lo = self.rank * piece_out.numel()
            return _ChunkOnWait(work, full[lo : lo + piece_out.numel()], piece_out)
        return _reduce_scatter(piece_out, full, group=self.group, async_op=True)

    def gather_bucket(self, full: torch.Tensor, piece: torch.Tensor):
        """All-gather every rank's ``piece`` into ``full`` (async; ``piece`` may be a view of it)."""
        if not self.distributed:
            if piece.data_ptr() != full.data_ptr():
                full.copy_(piece)
            return _Done()
        return _all_gather(full, piece, group=self.group, async_op=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over ranks, in place, synchronously."""
        if self.distributed:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of a small tensor over ranks, in place, synchronously."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def all_gather_small(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack a small 1-D tensor from every rank: shape ``(world_size, n)``, on its device."""
        if not self.distributed:
            return tensor.unsqueeze(0)
        local = tensor.to(self.device).contiguous()
        out = torch.empty(self.world_size * tensor.numel(), dtype=tensor.dtype, device=self.device)
        _all_gather(out, local, group=self.group)
        return out.view(self.world_size, -1).to(tensor.device)

    def all_gather_object(self, obj: object) -> list[object]:
        """Gather a picklable object from every rank."""
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out
