"""ZeroOptimizer: Adamax / Nadam with optimizer state sharded over data-parallel ranks.

Each step has three phases, kept apart below:

1. ``_reduce_*``: gradients land in gradient buckets (parameters' ``.grad``
   are views of them) and are summed over ranks bucket by bucket, launched
   asynchronously from ``post_accumulate_grad`` hooks while backward is still
   running (``overlap=True``) or all at once in ``step()``. With
   ``all_reduce`` the buckets are views of one flat gradient buffer per dtype;
   with ``reduce_scatter`` (ZeRO-2) every bucket has its own storage, which is
   allocated when its first gradient arrives and freed (storage resized to 0,
   as FSDP does) as soon as its reduce-scatter has completed, so between steps
   a rank holds only its reduced slice.
2. ``_compute_*``: every rank averages its piece of the reduced gradient, agrees
   with the others on the global norm and non-finiteness (one small
   all-reduce), clips, and runs ``optim.functional`` on the elements it owns.
3. ``_gather_*``: each bucket's updated piece is all-gathered into the flat
   parameter buffer (asynchronously, bucket after bucket, while the next bucket
   is being updated).

Parity with ``torch.optim``: torch keeps a ``step`` count per parameter and
skips parameters whose ``.grad`` is ``None``. We do the same: a parameter that
received no gradient on *any* rank since the last step is not updated and its
step count does not advance (a parameter that got a gradient on some ranks
only is averaged with zeros from the others, as DDP does). Elements of one
param group that share a step count are updated by one kernel call. Nadam's
``mu_product`` is a deterministic function of the step count and the group's
``beta1`` / ``momentum_decay``; it is recomputed with the same float32
operations torch uses, so it matches torch bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from optim.zero import checkpoint as _checkpoint
from optim.zero import stats as _stats
from optim.zero.algorithms import Algorithm, resolve_algorithm
from optim.zero.comm import Communicator
from optim.zero.layout import Bucket, Layout, Segment, build_layout
from optim.zero.timing import StepClock

__all__ = ["ZeroOptimizer"]

_GRAD_SYNC_MODES = ("all_reduce", "reduce_scatter", "auto")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _Run:
    """Contiguous elements of one bucket piece that share a param group and step count."""

    __slots__ = ("bucket", "group", "hi", "lo", "slots", "step")

    def __init__(self, bucket: int, group: int, step: int, lo: int, hi: int, slot: int):
        self.bucket, self.group, self.step, self.lo, self.hi = bucket, group, step, lo, hi
        self.slots = [slot]


class ZeroOptimizer(torch.optim.Optimizer):
    """Adamax or Nadam whose state is sharded over the ranks of a process group (ZeRO-1/2).

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        optimizer_class: ``optim.Adamax`` or ``optim.Nadam`` (torch's
            ``Adamax`` / ``NAdam`` are accepted too); ``TypeError`` otherwise.
        process_group: the data-parallel group; ``None`` is the default group
            when one is initialised. Without one, or with one rank, this is a
            plain single-process optimizer.
        grad_sync: ``"all_reduce"`` (every rank reduces the whole bucket and reads
            its piece), ``"reduce_scatter"`` (ZeRO-2: each rank receives only its
            reduced piece, and a bucket's full gradient is freed as soon as its
            reduce-scatter completes), or ``"auto"`` (all-reduce on gloo, whose
            reduce-scatter is an all-reduce underneath and saves no traffic, only
            gradient memory; reduce-scatter otherwise).
        bucket_mb: target size of a communication bucket, in MiB.
        overlap: launch gradient reductions from backward hooks as buckets fill,
            overlapping communication with backward; ``False`` launches them all
            in ``step()``.
        clip_grad_norm: if set, clip the averaged gradient to this global L2 norm
            (computed across ranks), as ``torch.nn.utils.clip_grad_norm_``.
        compile: use the fused ``torch.compile`` kernels of ``optim.functional``.
        track_update_stats: measure each step's update norm (and Adamax's
            refreshed-``u`` fraction) for ``stats()``. This costs a copy of the
            shard and an extra pass per step; training loops that read
            ``stats()`` only every few steps can set the attribute to ``True``
            just before those steps and ``False`` otherwise.
        **optimizer_options: the options of ``optimizer_class`` (``lr``,
            ``betas``, ``eps``, ``weight_decay``, ``maximize``, Nadam's
            ``momentum_decay`` and ``decoupled_weight_decay``), validated by it.

    Gradients are averaged over the group as DDP does, so the model needs no DDP
    wrapper. After ``step()`` every rank holds identical parameters, equal to
    what ``optimizer_class`` would compute in one process from the averaged
    gradient. ``step()`` consumes the gradients: afterwards every ``.grad`` is
    ``None``. Use ``no_sync()`` for accumulation micro-batches and the
    ``clip_grad_norm`` option for clipping (gradients are in flight during
    backward; do not modify ``.grad`` between backward and ``step()``). With
    ``reduce_scatter`` a parameter's ``.grad`` becomes ``None`` once its bucket
    has been reduce-scattered and freed, possibly before backward ends.

    Parameters become views of flat buffers; with bf16/fp16 parameters an fp32
    master copy of this rank's shard is kept and the state is fp32. If you
    overwrite low-precision parameters after construction (e.g. loading a model
    checkpoint), call ``refresh_master()``.

    Warning:
        ``step``, ``stats``, ``save_checkpoint``, ``load_checkpoint`` and
        ``consolidated_state_dict`` / ``state_dict`` are collectives: every rank
        of the group must call them, in the same order.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer] | None = None,
        process_group: dist.ProcessGroup | None = None,
        *,
        grad_sync: str = "all_reduce",
        bucket_mb: float = 25.0,
        overlap: bool = True,
        clip_grad_norm: float | None = None,
        compile: bool = False,
        track_update_stats: bool = True,
        **optimizer_options: Any,
    ) -> None:
        if optimizer_class is None:
            optimizer_class = _default_optimizer_class()
        self.algorithm: Algorithm = resolve_algorithm(optimizer_class)
        if grad_sync not in _GRAD_SYNC_MODES:
            raise ValueError(f"grad_sync must be one of {_GRAD_SYNC_MODES}, got {grad_sync!r}")
        if not (isinstance(bucket_mb, int | float) and bucket_mb > 0):
            raise ValueError(f"bucket_mb must be a number > 0, got {bucket_mb!r}")
        if clip_grad_norm is not None and not (
            isinstance(clip_grad_norm, int | float) and clip_grad_norm > 0
        ):
            raise ValueError(f"clip_grad_norm must be None or a number > 0, got {clip_grad_norm!r}")
        # The wrapped class validates the options (same messages as torch) and fills defaults.
        inner = optimizer_class(list(params), **optimizer_options)
        self._building = True
        super().__init__(inner.param_groups, inner.defaults)
        self._building = False
        self.optimizer_class = optimizer_class
        self.comm = Communicator.from_group(process_group)
        if grad_sync == "auto":
            grad_sync = "all_reduce" if self.comm.backend in ("gloo", "none") else "reduce_scatter"
        self.grad_sync = grad_sync
        self.bucket_mb = float(bucket_mb)
        self.overlap = bool(overlap)
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.compile = bool(compile)
        self.track_update_stats = bool(track_update_stats)
        self._build_buffers()
        self._steps = [0] * len(self.layout.slots)  # per-parameter step counts (replicated)
        self._mu_chains: list[list[torch.Tensor]] = [[] for _ in self.param_groups]
        self._skipped_steps = 0
        self._last_step_stats: dict[str, float] = {}
        self._clock = StepClock(self._flat[0].device if self._flat else torch.device("cpu"))
        self._reset_round()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(s))
            for s, p in enumerate(self._slot_params)
        ]

    # ------------------------------------------------------------------ setup

    def _build_buffers(self) -> None:
        """Flat param/grad buffers, parameter views, this rank's state shard."""
        groups = [g["params"] for g in self.param_groups]
        all_params = [p for g in groups for p in g]
        if len({id(p) for p in all_params}) != len(all_params):
            raise ValueError("a parameter appears more than once in the param groups")
        bucket_numel_by_dtype = {}
        for p in all_params:
            bucket_numel_by_dtype[p.dtype] = max(
                1, int(self.bucket_mb * 2**20) // p.element_size()
            )
        # Bucket size in elements is set per dtype so that a bucket is ~bucket_mb MiB.
        numel = min(bucket_numel_by_dtype.values()) if bucket_numel_by_dtype else 1
        self.layout: Layout = build_layout(groups, world_size=self.comm.world_size, bucket_numel=numel)
        rank = self.comm.rank
        self._slot_params: list[torch.nn.Parameter] = []
        for slot in self.layout.slots:
            self._slot_params.append(all_params[slot.index])
        self._flat: list[torch.Tensor] = []
        self._grad: list[torch.Tensor] = []  # flat gradient buffers (all-reduce mode)
        self._master: list[torch.Tensor | None] = []
        self._grad_shard: list[torch.Tensor | None] = []
        self._state: list[tuple[torch.Tensor, torch.Tensor]] = []
        for buf in self.layout.buffers:
            flat = torch.zeros(buf.numel, dtype=buf.dtype, device=buf.device)
            for s in buf.slots:
                slot = self.layout.slots[s]
                p = self._slot_params[s]
                view = flat[slot.start : slot.start + slot.numel]
                with torch.no_grad():
                    view.copy_(p.detach().reshape(-1))
                p.data = view.view(slot.shape)
            self._flat.append(flat)
            rs = self.grad_sync == "reduce_scatter" and self.comm.distributed
            if not rs:
                self._grad.append(torch.zeros(buf.numel, dtype=buf.dtype, device=buf.device))
            low = buf.dtype in _LOW_PRECISION
            compute_dtype = torch.float32 if low else buf.dtype
            master = torch.zeros(buf.shard_numel, dtype=compute_dtype, device=buf.device) if low else None
            self._master.append(master)
            self._grad_shard.append(
                torch.zeros(buf.shard_numel, dtype=buf.dtype, device=buf.device) if rs else None
            )
            self._state.append(
                (
                    torch.zeros(buf.shard_numel, dtype=compute_dtype, device=buf.device),
                    torch.zeros(buf.shard_numel, dtype=compute_dtype, device=buf.device),
                )
            )
        # ZeRO-2 frees each bucket's full gradient once its reduce-scatter is done.
        self._free_grads = self.grad_sync == "reduce_scatter" and self.comm.distributed
        self._bucket_grads: list[torch.Tensor] = []
        for b in self.layout.buckets:
            if self._free_grads:
                info = self.layout.buffers[b.buffer]
                t = torch.empty(b.end - b.start, dtype=info.dtype, device=info.device)
            else:
                t = self._grad[b.buffer][b.start : b.end]
            self._bucket_grads.append(t)
        self._grad_views = []
        for sl in self.layout.slots:
            b = self.layout.buckets[sl.bucket]
            lo = sl.start - b.start
            self._grad_views.append(self._bucket_grads[b.id][lo : lo + sl.numel].view(sl.shape))
        if self._free_grads:  # allocated again when a bucket's first gradient arrives
            for grad in self._bucket_grads:
                grad.untyped_storage().resize_(0)
        self._segments: list[Segment] = self.layout.segments(rank)
        self._pieces = [b.piece(rank) for b in self.layout.buckets]
        self._launch_order = sorted(range(len(self.layout.buckets)), reverse=True)
        self.refresh_master()

    def refresh_master(self) -> None:
        """Copy the current (low-precision) parameters into the fp32 master shard."""
        for bucket in self.layout.buckets:
            master = self._master[bucket.buffer]
            if master is not None:
                lo, hi = self._pieces[bucket.id]
                off = bucket.shard_offset
                master[off : off + bucket.piece_numel].copy_(self._flat[bucket.buffer][lo:hi])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the flat layout is fixed afterwards."""
        if not getattr(self, "_building", False):
            raise NotImplementedError(
                "ZeroOptimizer cannot add param groups after construction: "
                "pass every group to the constructor"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------ properties

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on every rank because some rank saw a non-finite gradient."""
        return self._skipped_steps

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def last_step_timings(self) -> dict[str, float]:
        """Where the last ``step()`` spent its time, in seconds (``{}`` before the first).

        Keys: ``communication`` (blocked on collectives: finishing the gradient
        reductions, the norm/non-finite all-reduce, launching and waiting for
        the parameter all-gathers), ``optimizer`` (everything else in ``step()``:
        averaging, norm, clipping, the shard update) and ``step`` (their sum,
        the wall time of ``step()`` without the closure). Measured without any
        extra synchronisation (``optim.zero.timing``); reductions launched from
        backward hooks overlap backward and only their remaining wait is counted.
        """
        return self._clock.result()

    def grad_bytes(self) -> int:
        """Bytes of gradient storage this rank holds right now.

        All-reduce mode: the flat gradient buffers (always allocated, the size of
        the trainable parameters plus padding). Reduce-scatter mode (ZeRO-2):
        the reduced slice (1/N) plus any bucket whose full gradient is still
        allocated (during backward, until its reduce-scatter completes).
        """
        tensors = [*self._grad, *(s for s in self._grad_shard if s is not None)]
        if self._free_grads:
            tensors += self._bucket_grads
        return sum(t.untyped_storage().nbytes() for t in tensors)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (moments, and fp32 master if any)."""
        total = sum(s.numel() * s.element_size() for pair in self._state for s in pair)
        total += sum(m.numel() * m.element_size() for m in self._master if m is not None)
        return total

    # ------------------------------------------------------- gradient phase

    def _reset_round(self) -> None:
        n_slots = len(self.layout.slots)
        self._has_local_grad = [False] * n_slots
        self._marked = [False] * n_slots
        self._ready = [0] * len(self.layout.buckets)
        self._handles: list[Any] = [None] * len(self.layout.buckets)
        self._in_flight: list[int] = []  # reduce-scattered buckets whose storage is not freed yet
        self._next_launch = 0
        self._sync_enabled = getattr(self, "_sync_enabled", True)

    def _make_hook(self, slot_id: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            self._on_grad_ready(slot_id, param)

        return hook

    def _on_grad_ready(self, slot_id: int, param: torch.Tensor) -> None:
        view = self._grad_views[slot_id]
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
        if self._free_grads:
            self._allocate_bucket_grad(bucket)
            self._free_completed()
        if grad.data_ptr() != view.data_ptr():
            view.copy_(grad)
            param.grad = view
        self._has_local_grad[slot_id] = True
        if not self._sync_enabled or self._marked[slot_id]:
            return
        self._marked[slot_id] = True
        self._ready[bucket] += 1
        if self.overlap:
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        # Buckets are launched in one fixed order on every rank, so collectives match.
        order = self._launch_order
        while self._next_launch < len(order):
            b = order[self._next_launch]
            if self._ready[b] < len(self.layout.buckets[b].slots):
                return
            self._reduce_bucket(self.layout.buckets[b])
            self._next_launch += 1

    def _reduce_bucket(self, bucket: Bucket) -> None:
        if self._free_grads:
            self._allocate_bucket_grad(bucket.id)
        for s in bucket.slots:
            if not self._has_local_grad[s]:
                # No gradient here since the last step: contribute zeros.
                self._grad_views[s].zero_()
        full = self._bucket_grads[bucket.id]
        shard = self._grad_shard[bucket.buffer]
        out = None
        if shard is not None:
            out = shard[bucket.shard_offset : bucket.shard_offset + bucket.piece_numel]
        self._handles[bucket.id] = self.comm.reduce_bucket(full, out)
        if self._free_grads:
            self._in_flight.append(bucket.id)

    def _reduce_remaining(self) -> None:
        order = self._launch_order
        while self._next_launch < len(order):
            self._reduce_bucket(self.layout.buckets[order[self._next_launch]])
            self._next_launch += 1
        for h in self._handles:
            h.wait()
        self._free_completed(wait=True)

    # ZeRO-2 gradient memory: a bucket's full gradient lives from its first
    # gradient until its reduce-scatter completes (parameters' ``.grad`` views
    # stay valid: resizing a storage keeps every view of it).

    def _allocate_bucket_grad(self, bucket_id: int) -> None:
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
                    self._slot_params[s].grad = None
                self._bucket_grads[b].untyped_storage().resize_(0)
            else:
                keep.append(b)
        self._in_flight = keep

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) for the enclosed backward passes.

        The next backward outside the context reduces the accumulated sum, as
        ``DistributedDataParallel.no_sync`` does.
        """
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients (``None``, or zeros in the flat gradient buffer)."""
        for handle in self._handles:  # never clear a buffer under an in-flight reduction
            if handle is not None:
                handle.wait()
        self._free_completed(wait=True)
        for s, p in enumerate(self._slot_params):
            if set_to_none:
                p.grad = None
            else:
                if self._free_grads:
                    self._allocate_bucket_grad(self.layout.slots[s].bucket)
                self._grad_views[s].zero_()
                p.grad = self._grad_views[s]
        if set_to_none and self._free_grads:  # e.g. accumulated without a step: drop it all
            for grad in self._bucket_grads:
                grad.untyped_storage().resize_(0)
        self._reset_round()
        for group in self.param_groups:  # frozen params and others outside the buffers
            for p in group["params"]:
                if not p.requires_grad and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Reduce gradients, update this rank's shard, gather parameters (collective).

        Returns the closure's loss if a closure is given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._clock.start()
        with self._clock.communication():
            self._reduce_remaining()
        grad_pieces = self._compute_grad_pieces()
        has_grad, grad_norm = self._agree_on_grads(grad_pieces)
        stats: dict[str, float] = {"grad_norm": grad_norm}
        if not math.isfinite(grad_norm):
            self._skipped_steps += 1
            stats.update(update_sumsq=0.0, refreshed=0.0, updated_elements=0.0)
        else:
            if self.clip_grad_norm is not None:
                coef = self.clip_grad_norm / (grad_norm + 1e-6)
                if coef < 1.0:
                    for g in grad_pieces:
                        g.mul_(coef)
            stats.update(self._compute_and_gather(grad_pieces, has_grad))
        self._last_step_stats = stats
        for p in self._slot_params:
            p.grad = None
        self._reset_round()
        self._clock.stop()
        return loss

    def _compute_grad_pieces(self) -> list[torch.Tensor]:
        """This rank's piece of the averaged gradient, per bucket, in compute dtype."""
        out = []
        n = self.comm.world_size
        for bucket in self.layout.buckets:
            off, size = bucket.shard_offset, bucket.piece_numel
            shard = self._grad_shard[bucket.buffer]
            if shard is not None:
                piece = shard[off : off + size]
            else:
                lo, hi = self._pieces[bucket.id]
                piece = self._bucket_grads[bucket.id][lo - bucket.start : hi - bucket.start]
            if piece.dtype in _LOW_PRECISION:
                piece = piece.float()
            if n > 1:
                piece.div_(n)
            out.append(piece)
        return out

    def _agree_on_grads(self, grad_pieces: list[torch.Tensor]) -> tuple[list[bool], float]:
        """One small all-reduce: the global squared norm and which params got a gradient."""
        device = self._flat[0].device if self._flat else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float64, device=device)
        for g in grad_pieces:
            dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
            sq += torch.linalg.vector_norm(g, dtype=dtype).double().square()
        flags = torch.tensor(self._has_local_grad, dtype=torch.float64, device=device)
        packed = torch.cat([sq.reshape(1), flags])
        with self._clock.communication():
            values = self.comm.all_reduce_sum(packed).tolist()
        total = values[0]
        norm = math.sqrt(total) if math.isfinite(total) else math.nan
        return [v > 0 for v in values[1:]], norm

    def _runs(self, has_grad: list[bool]) -> list[_Run]:
        """Group this rank's segments into kernel calls (same bucket, group, step)."""
        runs: list[_Run] = []
        for seg in self._segments:
            if not has_grad[seg.slot]:
                continue
            slot = self.layout.slots[seg.slot]
            step = self._steps[seg.slot] + 1
            bucket = self.layout.buckets[seg.bucket]
            lo = seg.shard_lo - bucket.shard_offset
            hi = lo + seg.numel
            last = runs[-1] if runs else None
            if (
                last is not None
                and last.bucket == seg.bucket
                and last.group == slot.group
                and last.step == step
                and last.hi == lo
            ):
                last.hi = hi
                last.slots.append(seg.slot)
            else:
                runs.append(_Run(seg.bucket, slot.group, step, lo, hi, seg.slot))
        return runs

    def _compute_and_gather(
        self, grad_pieces: list[torch.Tensor], has_grad: list[bool]
    ) -> dict[str, float]:
        """Update this rank's shard bucket by bucket, launching each bucket's gather."""
        runs_by_bucket: dict[int, list[_Run]] = {}
        for run in self._runs(has_grad):
            runs_by_bucket.setdefault(run.bucket, []).append(run)
        update_sq = 0.0
        refreshed = 0.0
        updated = 0.0
        handles = []
        for bucket in self.layout.buckets:
            params, states = self._param_piece(bucket), self._state_pieces(bucket)
            for run in runs_by_bucket.get(bucket.id, []):
                p = params[run.lo : run.hi]
                g = grad_pieces[bucket.id][run.lo : run.hi]
                st = (states[0][run.lo : run.hi], states[1][run.lo : run.hi])
                track = self.track_update_stats
                before = p.clone() if track else None
                u_before = st[1].clone() if track and self.algorithm.name == "adamax" else None
                group = self.param_groups[run.group]
                mu_product = (
                    self._mu_product(run.group, run.step - 1).clone()
                    if self.algorithm.name == "nadam"
                    else None
                )
                self.algorithm.step(
                    p, g, st, mu_product, step=run.step, group=group, compile=self.compile
                )
                if before is not None:
                    update_sq += float(torch.dist(before, p)) ** 2
                if u_before is not None:
                    beta2 = group["betas"][1]
                    refreshed += float((st[1] != u_before.mul_(beta2)).sum())
                updated += run.hi - run.lo
            handles.append(self._gather_bucket(bucket))
        for s, flag in enumerate(has_grad):
            if flag:
                self._steps[s] += 1
        with self._clock.communication():
            for h in handles:
                h.wait()
        return {"update_sumsq": update_sq, "refreshed": refreshed, "updated_elements": updated}

    def _param_piece(self, bucket: Bucket) -> torch.Tensor:
        master = self._master[bucket.buffer]
        if master is not None:
            return master[bucket.shard_offset : bucket.shard_offset + bucket.piece_numel]
        lo, hi = self._pieces[bucket.id]
        return self._flat[bucket.buffer][lo:hi]

    def _state_pieces(self, bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        off, size = bucket.shard_offset, bucket.piece_numel
        a, b = self._state[bucket.buffer]
        return a[off : off + size], b[off : off + size]

    def _mu_product(self, group: int, step: int) -> torch.Tensor:
        """Nadam's ``mu_product`` after ``step`` steps of ``group`` (float32, torch's rounding)."""
        chain = self._mu_chains[group]
        g = self.param_groups[group]
        beta1, momentum_decay = g["betas"][0], g["momentum_decay"]
        if not chain:
            chain.append(torch.tensor(1.0, dtype=torch.float32))
        while len(chain) <= step:
            t = len(chain)
            value = chain[-1].clone()
            value *= beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))
            chain.append(value)
        return chain[step]

    # --------------------------------------------------------- gather phase

    def _gather_bucket(self, bucket: Bucket) -> Any:
        flat = self._flat[bucket.buffer]
        lo, hi = self._pieces[bucket.id]
        master = self._master[bucket.buffer]
        if master is not None:
            flat[lo:hi].copy_(master[bucket.shard_offset : bucket.shard_offset + bucket.piece_numel])
        with self._clock.communication():
            return self.comm.gather_bucket(flat[bucket.start : bucket.end], flat[lo:hi])

    # ----------------------------------------------------- monitoring, I/O

    def stats(self) -> dict[str, float]:
        """Monitoring statistics of the last step (collective: one small all-gather).

        Keys: ``step``, ``lr``, ``grad_norm``, ``param_norm``, ``update_norm``,
        ``update_param_ratio``, ``state_bytes_per_rank``, ``skipped_steps``, and
        Adamax's ``adamax_u_*`` or Nadam's ``nadam_*`` keys (docs/ARCHITECTURE.md).
        """
        return _stats.compute_stats(self)

    def save_checkpoint(self, directory: str) -> None:
        """Write this rank's shard and (rank 0) the manifest into ``directory`` (collective).

        Atomic (temp file + fsync + rename; the manifest is written last) and
        checksummed; loadable at any world size with ``load_checkpoint``.
        """
        _checkpoint.save(self, directory)

    def load_checkpoint(self, directory: str) -> None:
        """Load a checkpoint saved at any world size (collective).

        Raises ``optim.zero.CheckpointError`` for a missing, torn or corrupted file.
        """
        _checkpoint.load(self, directory)

    def consolidated_state_dict(self) -> dict[str, Any]:
        """A plain ``torch.optim.Adamax`` / ``NAdam`` state dict, on every rank (collective)."""
        return _checkpoint.consolidated_state_dict(self)

    def load_consolidated_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``torch.optim`` state dict (not collective: each rank takes its shard)."""
        _checkpoint.load_consolidated_state_dict(self, state_dict)

    def state_dict(self) -> dict[str, Any]:
        """Same as ``consolidated_state_dict()``: a collective, every rank must call it."""
        return self.consolidated_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Same as ``load_consolidated_state_dict()``."""
        self.load_consolidated_state_dict(state_dict)


def _default_optimizer_class() -> type[torch.optim.Optimizer]:
    try:
        from optim.nadam import Nadam
    except ImportError:
        return torch.optim.NAdam
    return Nadam
