"""GradientReducer: averages gradients over the data-parallel ranks, bucket by bucket.

Parameters' ``.grad`` are views of bucket buffers. A bucket's reduction is
launched asynchronously from the parameters' post-accumulate-grad hooks as soon
as every parameter in it has its gradient (``overlap=True``), so communication
overlaps the rest of backward; an autograd callback at the end of backward
launches whatever is left and waits for every bucket. Gradients are divided by
the world size before they are summed, as DDP's default hook does. After
``loss.backward()``, therefore:

* ``all_reduce``: every trainable parameter's ``.grad`` holds the gradient
  averaged over the ranks (zeros where no rank produced one), exactly what DDP
  leaves, so ``clip_grad_norm_(model.parameters(), c)`` between backward and
  ``step()`` clips the averaged gradient on every rank alike;
* ``reduce_scatter`` (ZeRO-2): each bucket has its own storage, allocated when
  its first gradient arrives and freed (storage resized to 0, as FSDP does) once
  its reduce-scatter has completed; only this rank's piece of the average is
  kept, ``.grad`` is ``None``, and clipping must go through
  ``ZeroOptimizer.clip_grad_norm_``.

A ``.grad`` the user assigns instead of producing it by backward is adopted at
``finish()``: before its bucket was reduced it is averaged like any gradient;
after, it is taken as the final (already averaged) gradient, as with DDP.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from zerotrain.optim.zero.comm import Communicator
from zerotrain.optim.zero.layout import Layout

__all__ = ["GradientReducer"]

# id(parameter) -> (the parameter, the reducer whose hooks it carries), both weakly:
# a parameter has at most one live reducer. (Not a WeakKeyDictionary: tensors
# compare elementwise; not an attribute: it would survive copy.deepcopy.)
_OWNERS: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[GradientReducer]]] = {}


class GradientReducer:
    """Bucketed, overlapped gradient averaging for the trainable parameters of ``layout``.

    Args:
        params: the trainable parameters in layout slot order (already views of
            the flat parameter buffers).
        layout: the flat-buffer layout (buckets and rank pieces).
        comm: the process group.
        reduce_scatter: keep only this rank's piece of each bucket (ZeRO-2).
        overlap: launch reductions from backward hooks; ``False`` launches every
            bucket when backward ends.
    """

    def __init__(self, params: list[torch.nn.Parameter], layout: Layout, comm: Communicator,
                 *, reduce_scatter: bool, overlap: bool) -> None:  # fmt: skip
        for p in params:
            if _owner(p) is not None:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is already managed by another "
                    "ZeroOptimizer: call that optimizer's close() first (its gradient hooks "
                    "would keep launching collectives)"
                )
        self.layout, self.comm, self.params = layout, comm, params
        self.overlap = overlap
        self.frees_buckets = reduce_scatter and comm.distributed
        self._build_buffers()
        self._sync_enabled = True
        self._reset()
        ref = weakref.ref(self)
        self._hooks = [p.register_post_accumulate_grad_hook(_hook(ref, s)) for s, p in enumerate(params)]
        self._finalizer = weakref.finalize(self, _release, list(self._hooks), [id(p) for p in params])
        for p in params:
            _OWNERS[id(p)] = (weakref.ref(p), ref)

    def _build_buffers(self) -> None:
        layout, rank = self.layout, self.comm.rank
        self._flat_grads: list[torch.Tensor] = []  # all-reduce mode: one per flat buffer
        self.shards: list[torch.Tensor | None] = []  # reduce-scatter mode: this rank's pieces
        for buf in layout.buffers:
            if self.frees_buckets:
                self.shards.append(torch.zeros(buf.shard_numel, dtype=buf.dtype, device=buf.device))
            else:
                self._flat_grads.append(torch.zeros(buf.numel, dtype=buf.dtype, device=buf.device))
                self.shards.append(None)
        self._bucket_grads: list[torch.Tensor] = []
        for b in layout.buckets:
            info = layout.buffers[b.buffer]
            if self.frees_buckets:
                grad = torch.empty(b.end - b.start, dtype=info.dtype, device=info.device)
            else:
                grad = self._flat_grads[b.buffer][b.start : b.end]
            self._bucket_grads.append(grad)
        self._views = []
        for slot in layout.slots:
            b = layout.buckets[slot.bucket]
            lo = slot.start - b.start
            self._views.append(self._bucket_grads[b.id][lo : lo + slot.numel].view(slot.shape))
        if self.frees_buckets:  # allocated again when a bucket's first gradient arrives
            for grad in self._bucket_grads:
                grad.untyped_storage().resize_(0)
        self._pieces = [b.piece(rank) for b in layout.buckets]
        self._launch_order = sorted(range(len(layout.buckets)), reverse=True)

    # ------------------------------------------------------------- public

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally, without communication, in the enclosed backward passes."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    @property
    def local_grads(self) -> list[bool]:
        """Per slot: whether this rank produced or was given a gradient this round."""
        return list(self._has_local_grad)

    @property
    def launched(self) -> int:
        """How many buckets' reductions have been launched this round."""
        return self._next_launch

    def finish(self) -> None:
        """Adopt assigned ``.grad``, launch every remaining bucket, wait for all (collective)."""
        self._adopt_assigned_grads()
        self._launch_remaining()
        self._wait_all()

    def averaged_piece(self, bucket_id: int) -> torch.Tensor:
        """This rank's piece of bucket ``bucket_id``'s averaged gradient (after ``finish``)."""
        bucket = self.layout.buckets[bucket_id]
        shard = self.shards[bucket.buffer]
        if shard is not None:
            return shard[bucket.shard_offset : bucket.shard_offset + bucket.piece_numel]
        lo, hi = self._pieces[bucket_id]
        return self._bucket_grads[bucket_id][lo - bucket.start : hi - bucket.start]

    def scale_(self, factor: torch.Tensor) -> None:
        """Multiply the averaged gradient by ``factor`` (the whole ``.grad`` in all-reduce mode)."""
        held = self._flat_grads or [s for s in self.shards if s is not None]
        torch._foreach_mul_(held, factor)

    def release(self) -> None:
        """The round is over: every ``.grad`` becomes ``None`` and ZeRO-2 buckets are freed."""
        for p in self.params:
            p.grad = None
        if self.frees_buckets:
            for grad in self._bucket_grads:
                grad.untyped_storage().resize_(0)
        self._reset()

    def zero_grads(self) -> None:
        """Zero every existing ``.grad`` in place (``zero_grad(set_to_none=False)``).

        As in torch.optim, a zeroed gradient is still a gradient: the parameters
        that had one this round (or an assigned one) are updated by the next
        step, with whatever is written into it or accumulated by backward.
        """
        had_grad = [
            flag or (p.grad is not None and not _is_view(p.grad, view))
            for flag, p, view in zip(self._has_local_grad, self.params, self._views, strict=True)
        ]
        self._reset()
        for s, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.frees_buckets:
                self._allocate(self.layout.slots[s].bucket)
            self._views[s].zero_()
            p.grad = self._views[s]
            self._has_local_grad[s] = had_grad[s]

    def wait_in_flight(self) -> None:
        """Wait for every launched reduction (never clear a buffer under one)."""
        for handle in self._handles:
            if handle is not None:
                handle.wait()
        self._free_completed(wait=True)

    def grad_bytes(self) -> int:
        """Bytes of gradient storage held right now (see ``ZeroOptimizer.grad_bytes``)."""
        tensors = [*self._flat_grads, *(s for s in self.shards if s is not None)]
        if self.frees_buckets:
            tensors += self._bucket_grads
        return sum(t.untyped_storage().nbytes() for t in tensors)

    def close(self) -> None:
        """Remove the gradient hooks; the parameters can then get another ZeroOptimizer."""
        self._finalizer()

    # ------------------------------------------------------------ the round

    def _reset(self) -> None:
        n_slots, n_buckets = len(self.layout.slots), len(self.layout.buckets)
        self._has_local_grad = [False] * n_slots
        self._marked = [False] * n_slots
        self._ready = [0] * n_buckets
        self._handles: list[Any] = [None] * n_buckets
        self._in_flight: list[int] = []  # reduce-scattered buckets not freed yet
        self._next_launch = 0
        self._callback_queued = False

    def _on_grad_ready(self, slot_id: int, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        bucket = self.layout.slots[slot_id].bucket
        if self._handles[bucket] is not None:
            raise RuntimeError(
                "a gradient arrived for a parameter whose bucket was already reduced: "
                "backward ran twice without step(); wrap the accumulation micro-batches "
                "in `with opt.no_sync():`"
            )
        if self.frees_buckets:
            self._allocate(bucket)
            self._free_completed()
        view = self._views[slot_id]
        if not _is_view(grad, view):
            view.copy_(grad)
            param.grad = view
        self._has_local_grad[slot_id] = True
        if not self._sync_enabled:
            return
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        self._mark_ready(slot_id)
        if self.overlap:
            self._launch_ready()

    def _on_backward_end(self) -> None:
        self._launch_remaining()
        self._wait_all()

    def _mark_ready(self, slot_id: int) -> None:
        if not self._marked[slot_id]:
            self._marked[slot_id] = True
            self._ready[self.layout.slots[slot_id].bucket] += 1

    def _adopt_assigned_grads(self) -> None:
        """Take in every ``.grad`` that is not its bucket view (assigned, not from backward)."""
        for s, p in enumerate(self.params):
            grad, view = p.grad, self._views[s]
            if grad is None or _is_view(grad, view):
                continue
            slot = self.layout.slots[s]
            if tuple(grad.shape) != slot.shape:
                raise ValueError(
                    f"parameter {slot.index}: .grad has shape {tuple(grad.shape)}, "
                    f"the parameter has {slot.shape}"
                )
            self._has_local_grad[s] = True
            if self._handles[slot.bucket] is None:  # not reduced yet: average it
                if self.frees_buckets:
                    self._allocate(slot.bucket)
                view.copy_(grad)
                p.grad = view
                self._mark_ready(s)
            elif not self.frees_buckets:  # reduced already: the final gradient
                view.copy_(grad)
                p.grad = view
            else:  # reduce-scattered and freed: keep this rank's part of it
                self._copy_into_shard(s, grad)
                p.grad = None

    def _copy_into_shard(self, slot_id: int, grad: torch.Tensor) -> None:
        slot = self.layout.slots[slot_id]
        flat = grad.detach().reshape(-1)
        for seg in self.layout.segments(self.comm.rank):
            if seg.slot == slot_id:
                shard = self.shards[seg.buffer]
                assert shard is not None
                lo = seg.flat_lo - slot.start
                shard[seg.shard_lo : seg.shard_lo + seg.numel].copy_(flat[lo : lo + seg.numel])

    def _launch_ready(self) -> None:
        # Buckets are launched in one fixed order on every rank, so collectives match.
        while self._next_launch < len(self._launch_order):
            b = self._launch_order[self._next_launch]
            if self._ready[b] < len(self.layout.buckets[b].slots):
                return
            self._launch(b)

    def _launch_remaining(self) -> None:
        while self._next_launch < len(self._launch_order):
            self._launch(self._launch_order[self._next_launch])

    def _launch(self, bucket_id: int) -> None:
        bucket = self.layout.buckets[bucket_id]
        if self.frees_buckets:
            self._allocate(bucket_id)
        for s in bucket.slots:
            if not self._has_local_grad[s]:
                self._views[s].zero_()  # no gradient here since the last step: contribute zeros
        full = self._bucket_grads[bucket_id]
        if self.comm.distributed:
            full.div_(self.comm.world_size)  # average as DDP does: divide, then sum
        shard = self.shards[bucket.buffer]
        out = None
        if shard is not None:
            out = shard[bucket.shard_offset : bucket.shard_offset + bucket.piece_numel]
        self._handles[bucket_id] = self.comm.reduce_bucket(full, out)
        if self.frees_buckets:
            self._in_flight.append(bucket_id)
        self._next_launch += 1

    def _wait_all(self) -> None:
        for handle in self._handles:
            handle.wait()
        self._free_completed(wait=True)
        if not self.frees_buckets:  # every .grad holds the average, as DDP leaves it
            for p, view in zip(self.params, self._views, strict=True):
                p.grad = view

    # ZeRO-2 gradient memory: a bucket's full gradient lives from its first
    # gradient until its reduce-scatter completes (parameters' ``.grad`` views
    # stay valid: resizing a storage keeps every view of it).

    def _allocate(self, bucket_id: int) -> None:
        grad = self._bucket_grads[bucket_id]
        storage = grad.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(grad.numel() * grad.element_size())
            # Params' elements are always written (copied grads or zeros) before the
            # reduction; the alignment padding at the bucket's end must be zero.
            bucket = self.layout.buckets[bucket_id]
            last = self.layout.slots[bucket.slots[-1]]
            grad[last.start + last.numel - bucket.start :].zero_()

    def _free_completed(self, *, wait: bool = False) -> None:
        """Free the full gradient of every reduce-scattered bucket whose collective is done."""
        keep = []
        for b in self._in_flight:
            handle = self._handles[b]
            if wait or handle.is_completed():
                handle.wait()  # re-raises a failed collective
                for s in self.layout.buckets[b].slots:  # no .grad may point at freed memory
                    self.params[s].grad = None
                self._bucket_grads[b].untyped_storage().resize_(0)
            else:
                keep.append(b)
        self._in_flight = keep


def _is_view(grad: torch.Tensor, view: torch.Tensor) -> bool:
    return grad.data_ptr() == view.data_ptr() and grad.shape == view.shape


def _hook(reducer: weakref.ref[GradientReducer], slot_id: int) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        owner = reducer()
        if owner is not None:
            owner._on_grad_ready(slot_id, param)

    return hook


def _owner(param: torch.Tensor) -> GradientReducer | None:
    entry = _OWNERS.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    return entry[1]()


def _release(handles: list[Any], param_ids: list[int]) -> None:
    """Remove a reducer's hooks and ownership (on close, or when it is collected)."""
    for handle in handles:
        handle.remove()
    for key in param_ids:
        _OWNERS.pop(key, None)
