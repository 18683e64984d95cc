"""ShardedState: this rank's shard of the parameters and optimizer state, and its update.

Trainable parameters are packed into flat buffers (``layout``) and become views
of them. Each rank owns one piece of every bucket: the optimizer state (two
flat tensors per buffer, Adamax's ``m, u`` or Nadam's ``m, v``), an fp32 master
copy of the parameters when they are bf16/fp16, and the per-parameter scalar
state torch keeps (``step``, Nadam's ``mu_product``), replicated on every rank.

``update`` runs the algorithm's kernel on the elements this rank owns, then
all-gathers each bucket's updated piece into the flat parameter buffer,
bucket after bucket, so the gather of one bucket overlaps the update of the
next. Elements of one bucket that share a param group, a step count and a
``mu_product`` are updated by one kernel call (a *run*).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zerotrain.optim import _common, functional
from zerotrain.optim.zero.algorithms import Algorithm
from zerotrain.optim.zero.comm import Communicator
from zerotrain.optim.zero.layout import Bucket, Layout

__all__ = ["Run", "ShardedState"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class Run:
    """Contiguous elements of one bucket piece that share a group, step and mu_product."""

    bucket: int
    group: int
    step: int
    mu_product: float
    lo: int  # range inside the bucket's piece
    hi: int


class ShardedState:
    """The flat parameter buffers and this rank's shard of the optimizer state.

    Args:
        params: trainable parameters in layout slot order; they become views of
            the flat buffers (their values are kept).
        layout: where every parameter lives and which elements this rank owns.
        comm: the process group.
        algorithm: the update rule.
    """

    def __init__(self, params: list[torch.nn.Parameter], layout: Layout, comm: Communicator,
                 algorithm: Algorithm) -> None:  # fmt: skip
        self.layout, self.comm, self.algorithm = layout, comm, algorithm
        rank = comm.rank
        self.flat: list[torch.Tensor] = []
        self.master: list[torch.Tensor | None] = []
        self.state: list[tuple[torch.Tensor, torch.Tensor]] = []
        for buf in layout.buffers:
            flat = torch.zeros(buf.numel, dtype=buf.dtype, device=buf.device)
            for s in buf.slots:
                slot = layout.slots[s]
                view = flat[slot.start : slot.start + slot.numel]
                with torch.no_grad():
                    view.copy_(params[s].detach().reshape(-1))
                params[s].data = view.view(slot.shape)
            self.flat.append(flat)
            low = buf.dtype in _LOW_PRECISION
            compute = torch.float32 if low else buf.dtype
            shards = [torch.zeros(buf.shard_numel, dtype=compute, device=buf.device)
                      for _ in range(3 if low else 2)]  # fmt: skip
            self.state.append((shards[0], shards[1]))
            self.master.append(shards[2] if low else None)
        self.segments = layout.segments(rank)
        self.pieces = [b.piece(rank) for b in layout.buckets]
        n_slots = len(layout.slots)
        self.steps = [0] * n_slots
        """Per slot: updates so far (torch's ``step`` state), the same on every rank."""
        self.mu_products = [1.0] * n_slots
        """Per slot (Nadam): ``mu_1 * ... * mu_step`` as torch keeps its ``mu_product`` state."""
        self.mu_dtype = _common.scalar_dtype()
        """The dtype torch keeps ``mu_product`` in (float64 only under a float64 default)."""
        self.refresh_master()

    # ----------------------------------------------------------- accessors

    def param_piece(self, bucket: Bucket) -> torch.Tensor:
        """This rank's piece of ``bucket``'s parameters, in compute precision."""
        master = self.master[bucket.buffer]
        if master is not None:
            return master[bucket.shard_offset : bucket.shard_offset + bucket.piece_numel]
        lo, hi = self.pieces[bucket.id]
        return self.flat[bucket.buffer][lo:hi]

    def state_pieces(self, bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's piece of ``bucket``'s two state tensors."""
        off, size = bucket.shard_offset, bucket.piece_numel
        first, second = self.state[bucket.buffer]
        return first[off : off + size], second[off : off + size]

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank: the moments, and the fp32 master if any."""
        tensors = [t for pair in self.state for t in pair] + [m for m in self.master if m is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def refresh_master(self) -> None:
        """Copy the current (low-precision) parameters into the fp32 master shard."""
        for bucket in self.layout.buckets:
            master = self.master[bucket.buffer]
            if master is not None:
                lo, hi = self.pieces[bucket.id]
                off = bucket.shard_offset
                master[off : off + bucket.piece_numel].copy_(self.flat[bucket.buffer][lo:hi])

    # -------------------------------------------------------------- update

    def advance(self, has_grad: Sequence[bool], groups: list[dict[str, Any]]) -> None:
        """Count a step for every parameter that got a gradient on some rank (replicated).

        Nadam's ``mu_product`` is carried forward with the betas in force now,
        as torch carries its state: never recomputed from step 0.
        """
        for s, flag in enumerate(has_grad):
            if not flag:
                continue
            self.steps[s] += 1
            if self.algorithm.name == "nadam":
                group = groups[self.layout.slots[s].group]
                mu = functional.nadam_momentum(group["betas"][0], group["momentum_decay"],
                                               self.steps[s])  # fmt: skip
                self.mu_products[s] = functional.advance_mu_product(
                    self.mu_products[s], mu, self.mu_dtype
                )

    def runs(self, has_grad: Sequence[bool]) -> list[Run]:
        """This rank's elements to update, grouped into kernel calls (after ``advance``)."""
        runs: list[Run] = []
        for seg in self.segments:
            if not has_grad[seg.slot]:
                continue
            slot = self.layout.slots[seg.slot]
            step, mu_product = self.steps[seg.slot], self.mu_products[seg.slot]
            bucket = self.layout.buckets[seg.bucket]
            lo = seg.shard_lo - bucket.shard_offset
            last = runs[-1] if runs else None
            if (last is not None and last.hi == lo and
                    (last.bucket, last.group, last.step, last.mu_product)
                    == (seg.bucket, slot.group, step, mu_product)):  # fmt: skip
                last.hi = lo + seg.numel
            else:
                runs.append(Run(seg.bucket, slot.group, step, mu_product, lo, lo + seg.numel))
        return runs

    def update(
        self,
        grad_pieces: list[torch.Tensor],
        runs: list[Run],
        groups: list[dict[str, Any]],
        *,
        foreach: list[bool],
        compile: bool,
        observe: Callable[[Run, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], Any] | None = None,
        communication: Callable[[], Any] | None = None,
    ) -> None:
        """Update this rank's runs bucket by bucket, gathering each bucket as it is done.

        ``foreach`` is per param group (torch's multi-tensor kernels for its runs).
        ``observe(run, params, states)`` is called before each kernel call and
        may return a callable called after it (update statistics).
        ``communication()`` returns a context that times waits on collectives.
        """
        by_bucket: dict[int, list[Run]] = {}
        for run in runs:
            by_bucket.setdefault(run.bucket, []).append(run)
        handles = []
        for bucket in self.layout.buckets:
            params, states = self.param_piece(bucket), self.state_pieces(bucket)
            by_group: dict[int, list[Run]] = {}
            for run in by_bucket.get(bucket.id, []):
                by_group.setdefault(run.group, []).append(run)
            for group, group_runs in by_group.items():
                views = [(params[r.lo : r.hi], grad_pieces[bucket.id][r.lo : r.hi],
                          states[0][r.lo : r.hi], states[1][r.lo : r.hi]) for r in group_runs]  # fmt: skip
                after = [observe(r, v[0], (v[2], v[3])) for r, v in zip(group_runs, views)] if observe else []
                self.algorithm.update(
                    *(list(t) for t in zip(*views)), steps=[r.step for r in group_runs],
                    mu_products=[r.mu_product for r in group_runs], group=groups[group],
                    foreach=foreach[group], compile=compile,
                )  # fmt: skip
                for done in after:
                    done()
            handles.append(self._gather(bucket, communication))
        with communication() if communication else contextlib.nullcontext():
            for handle in handles:
                handle.wait()

    def _gather(self, bucket: Bucket, communication: Callable[[], Any] | None) -> Any:
        flat = self.flat[bucket.buffer]
        lo, hi = self.pieces[bucket.id]
        master = self.master[bucket.buffer]
        if master is not None:
            flat[lo:hi].copy_(master[bucket.shard_offset : bucket.shard_offset + bucket.piece_numel])
        with communication() if communication else contextlib.nullcontext():
            return self.comm.gather_bucket(flat[bucket.start : bucket.end], flat[lo:hi])

