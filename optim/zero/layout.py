"""Flat-buffer layout: where every parameter lives and which elements each rank owns.

Trainable parameters are packed, in optimizer order, into one contiguous flat
buffer per ``(dtype, device)``. Each flat buffer is cut into buckets of whole
parameters (about ``bucket_numel`` elements; a larger parameter gets a bucket of
its own), and every bucket is padded to a multiple of ``world_size * align`` and
cut into ``world_size`` equal pieces: rank ``r`` owns piece ``r`` of every bucket
(the Megatron-LM distributed-optimizer layout). A bucket is thus the unit of
both gradient reduction (all-reduce or reduce-scatter) and parameter all-gather,
each rank owns ``ceil(P / N)`` elements plus at most ``align`` padding per
bucket, and a parameter may straddle ranks.

A rank's *shard* of a flat buffer is the concatenation of its pieces, bucket
by bucket: optimizer state tensors are flat tensors of that size.

Checkpoints address elements by *logical* offset: the offset in the
concatenation of all trainable parameters in optimizer order. It is
independent of world size, bucketing and padding, which is what lets a
checkpoint saved at N ranks load at M.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Bucket", "FlatBuffer", "Layout", "Segment", "Slot", "build_layout", "layout_for"]


@dataclass(frozen=True)
class Slot:
    """One trainable parameter inside a flat buffer."""

    index: int  # position in optimizer order (the torch state-dict index)
    group: int  # param-group index
    buffer: int  # flat-buffer index
    bucket: int  # bucket id (global over buffers)
    start: int  # element offset in the flat buffer
    numel: int
    logical_start: int  # element offset in the logical (checkpoint) space
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Bucket:
    """A padded range ``[start, end)`` of a flat buffer, reduced and gathered as one."""

    id: int
    buffer: int
    start: int
    end: int
    slots: tuple[int, ...]  # indices into Layout.slots
    piece_numel: int  # (end - start) // world_size
    shard_offset: int  # offset of every rank's piece inside that rank's shard

    def piece(self, rank: int) -> tuple[int, int]:
        """Flat-buffer range ``[lo, hi)`` owned by ``rank``."""
        lo = self.start + rank * self.piece_numel
        return lo, lo + self.piece_numel


@dataclass
class FlatBuffer:
    """Metadata of one flat buffer (one per dtype and device)."""

    dtype: torch.dtype
    device: torch.device
    numel: int = 0  # padded total
    slots: list[int] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    shard_numel: int = 0  # elements each rank owns (sum of its pieces)


@dataclass(frozen=True)
class Segment:
    """The part of one parameter that falls inside one rank's piece of a bucket."""

    slot: int
    bucket: int
    buffer: int
    flat_lo: int  # flat-buffer range [flat_lo, flat_hi)
    flat_hi: int
    shard_lo: int  # offset of flat_lo inside the rank's shard of the buffer

    @property
    def numel(self) -> int:
        return self.flat_hi - self.flat_lo


@dataclass
class Layout:
    """Complete sharding layout for one world size."""

    world_size: int
    buffers: list[FlatBuffer]
    buckets: list[Bucket]
    slots: list[Slot]
    logical_numel: int

    def segments(self, rank: int) -> list[Segment]:
        """Every (parameter ∩ piece) owned by ``rank``, in buffer/bucket/flat order."""
        out: list[Segment] = []
        for buf in self.buffers:
            for b in buf.buckets:
                bucket = self.buckets[b]
                lo, hi = bucket.piece(rank)
                for s in bucket.slots:
                    slot = self.slots[s]
                    a, z = max(lo, slot.start), min(hi, slot.start + slot.numel)
                    if a < z:
                        out.append(
                            Segment(s, b, slot.buffer, a, z, bucket.shard_offset + a - lo)
                        )
        return out

    def logical_runs(self, rank: int) -> list[tuple[int, int, int, int]]:
        """``(buffer, shard_lo, logical_lo, logical_hi)`` for each segment of ``rank``."""
        runs = []
        for seg in self.segments(rank):
            slot = self.slots[seg.slot]
            lo = slot.logical_start + seg.flat_lo - slot.start
            runs.append((seg.buffer, seg.shard_lo, lo, lo + seg.numel))
        return runs


def layout_for(groups: list[dict[str, Any]], world_size: int, bucket_mb: float) -> Layout:
    """The layout of an optimizer's param groups, with buckets of about ``bucket_mb`` MiB."""
    params = [p for g in groups for p in g["params"]]
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a parameter appears more than once in the param groups")
    itemsize = max((p.element_size() for p in params), default=4)  # the widest dtype present
    bucket_numel = max(1, int(bucket_mb * 2**20) // itemsize)
    return build_layout([g["params"] for g in groups], world_size=world_size,
                        bucket_numel=bucket_numel)  # fmt: skip


def build_layout(
    group_params: list[list[torch.Tensor]], *, world_size: int, bucket_numel: int, align: int = 32
) -> Layout:
    """Lay out the trainable tensors of ``group_params`` (a list per param group).

    ``bucket_numel`` is the target bucket size in elements; ``align`` is the
    granularity every rank's piece is padded to (in elements).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    # Trainable tensors in optimizer order, one flat buffer per (dtype, device):
    # (optimizer index, group, tensor, logical offset).
    members: dict[tuple[torch.dtype, torch.device], list[tuple[int, int, torch.Tensor, int]]] = {}
    index = logical = 0
    for g, params in enumerate(group_params):
        for p in params:
            if p.requires_grad:
                members.setdefault((p.dtype, p.device), []).append((index, g, p, logical))
                logical += p.numel()
            index += 1
    layout = Layout(world_size, [], [], [], logical)
    quantum = world_size * align
    for b_idx, ((dtype, device), items) in enumerate(members.items()):
        buf = FlatBuffer(dtype, device)
        layout.buffers.append(buf)
        for bucket_items in _fill_buckets(items, bucket_numel):
            numel = sum(p.numel() for _, _, p, _ in bucket_items)
            padded = -(-numel // quantum) * quantum
            bucket_id, start = len(layout.buckets), buf.numel
            cursor = start
            for index, g, p, logical_start in bucket_items:
                buf.slots.append(len(layout.slots))
                layout.slots.append(Slot(index, g, b_idx, bucket_id, cursor, p.numel(),
                                         logical_start, tuple(p.shape)))  # fmt: skip
                cursor += p.numel()
            piece = padded // world_size
            slot_ids = tuple(buf.slots[-len(bucket_items) :])
            layout.buckets.append(
                Bucket(bucket_id, b_idx, start, start + padded, slot_ids, piece, buf.shard_numel)
            )
            buf.buckets.append(bucket_id)
            buf.shard_numel += piece
            buf.numel = start + padded
    return layout


def _fill_buckets(items: list[Any], bucket_numel: int) -> Iterator[list[Any]]:
    """Whole tensors, in order, into buckets of about ``bucket_numel`` elements (a
    larger tensor gets a bucket of its own)."""
    bucket: list[Any] = []
    size = 0
    for item in items:
        n = item[2].numel()
        if bucket and size + n > bucket_numel:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += n
    if bucket:
        yield bucket
