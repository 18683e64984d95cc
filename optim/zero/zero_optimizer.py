"""ZeroOptimizer: Adamax / Nadam with optimizer state sharded over data-parallel ranks.

It joins three parts: ``GradientReducer`` (``reducer.py``: gradient buckets,
averaged over the ranks during backward), ``ShardedState`` (``shard.py``: flat
parameter buffers, this rank's shard of the state, the update and the gather)
and monitoring measured only when asked (``stats.py``, ``timing.py``). A step:
finish the reductions, agree with the other ranks on the global gradient norm
and on which parameters got a gradient (one small all-reduce, the step's one
read to the host), clip, update this rank's shard, gather the parameters.

Parity with ``torch.optim``: a parameter that received no gradient on *any*
rank since the last step is not updated (one that got a gradient on some ranks
only is averaged with zeros from the others, as DDP does); a step whose
gradient is non-finite on any rank is skipped on every rank. ``step`` and
Nadam's ``mu_product`` are per-parameter state carried from step to step, as
torch carries them, so schedules and a float64 default dtype behave as in torch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from zerotrain.optim import _common, functional
from zerotrain.optim.nadam import Nadam
from zerotrain.optim.zero import checkpoint, state_dict
from zerotrain.optim.zero.algorithms import Algorithm, resolve_algorithm
from zerotrain.optim.zero.comm import Communicator
from zerotrain.optim.zero.layout import Layout, layout_for
from zerotrain.optim.zero.reducer import GradientReducer
from zerotrain.optim.zero.shard import ShardedState
from zerotrain.optim.zero.stats import UpdateTracker, compute_stats
from zerotrain.optim.zero.timing import StepClock

__all__ = ["ZeroOptimizer"]

_GRAD_SYNC_MODES = ("all_reduce", "reduce_scatter", "auto")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class ZeroOptimizer(torch.optim.Optimizer):
    """Adamax or Nadam whose state is sharded over the ranks of a process group (ZeRO-1/2).

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        optimizer_class: ``optim.Adamax`` or ``optim.Nadam`` (default; torch's
            ``Adamax`` / ``NAdam`` are accepted too); ``TypeError`` otherwise.
        process_group: the data-parallel group; ``None`` is the default group
            when one is initialised. Without one, or with one rank, this is a
            plain single-process optimizer.
        grad_sync: ``"all_reduce"`` (every rank reduces the whole bucket;
            after backward ``.grad`` holds the averaged gradient, as with DDP),
            ``"reduce_scatter"`` (ZeRO-2: each rank receives only its piece of
            the average and a bucket's full gradient is freed as soon as it is
            reduced, so ``.grad`` is ``None`` after backward), or ``"auto"``
            (all-reduce on gloo, whose reduce-scatter is an all-reduce
            underneath and saves no traffic, only memory; reduce-scatter otherwise).
        bucket_mb: target size of a communication bucket, in MiB.
        overlap: launch gradient reductions from backward hooks as buckets fill,
            overlapping communication with backward; ``False`` launches them all
            when backward ends.
        clip_grad_norm: if set, ``step()`` clips the averaged gradient to this
            global L2 norm (across ranks). Clipping between backward and
            ``step()`` works too: ``clip_grad_norm_`` below, or, in all-reduce
            mode, ``torch.nn.utils.clip_grad_norm_(model.parameters(), c)``.
        compile: run the update as one fused ``torch.compile`` kernel per run of
            elements (the fastest step; the first step compiles it, ~15 s cold on
            a CPU, cached on disk). Off by default so that a ZeroOptimizer is a
            drop-in with torch.optim's exact bits and needs no C++ toolchain: the
            fused Nadam rounds ``sqrt`` correctly where ATen's vectorised CPU
            kernel approximates it, a 1-ulp difference. When ``torch.compile``
            does not work here, ``True`` logs a warning and runs eagerly.
        track_update_stats: measure each step's update (its norm, Adamax's
            refreshed-``u`` fraction) for ``stats()``. It costs a copy of the
            shard and an extra pass, so it is off by default; set the attribute
            to ``True`` just before the steps whose ``stats()`` you read.
        **optimizer_options: the options of ``optimizer_class`` (``lr``,
            ``betas``, ``eps``, ``weight_decay``, ``foreach``, ``maximize``,
            Nadam's ``momentum_decay`` and ``decoupled_weight_decay``), validated
            by it. ``foreach`` picks torch's multi-tensor kernels for the eager
            step (``None``: torch's default, on for CUDA). ``capturable`` and
            ``differentiable`` are refused with a ``ValueError``.

    Gradients are averaged over the group as DDP does, so the model needs no
    DDP wrapper. After ``step()`` every rank holds identical parameters, equal
    to what ``optimizer_class`` computes in one process from the averaged
    gradient, and every ``.grad`` is ``None``. A ``.grad`` assigned by hand is
    used: averaged over the ranks if assigned before backward synchronised
    it, taken as final if assigned after. Use ``no_sync()`` for accumulation
    micro-batches. Parameters become views of flat buffers; with bf16/fp16
    parameters an fp32 master copy of this rank's shard is kept and the state
    is fp32 (after overwriting such parameters, call ``refresh_master()``).
    Call ``close()`` (or use the optimizer as a context manager) before
    building another ZeroOptimizer over the same parameters.

    Warning:
        ``step``, ``clip_grad_norm_``, ``stats``, ``consolidate_state_dict``,
        ``consolidated_state_dict``, ``save_checkpoint`` and ``load_checkpoint``
        are collectives: every rank of the group must call them, in the same order.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer] = Nadam,
        process_group: dist.ProcessGroup | None = None,
        *,
        grad_sync: str = "all_reduce",
        bucket_mb: float = 25.0,
        overlap: bool = True,
        clip_grad_norm: float | None = None,
        compile: bool = False,
        track_update_stats: bool = False,
        **optimizer_options: Any,
    ) -> None:
        self.algorithm: Algorithm = resolve_algorithm(optimizer_class)
        _check_options(grad_sync, bucket_mb, clip_grad_norm, compile, optimizer_options)
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
        self.bucket_mb, self.overlap = float(bucket_mb), bool(overlap)
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.compile = bool(compile)
        self.track_update_stats = bool(track_update_stats)

        self.layout: Layout = layout_for(self.param_groups, self.comm.world_size, self.bucket_mb)
        all_params = [p for g in self.param_groups for p in g["params"]]
        slot_params = [all_params[slot.index] for slot in self.layout.slots]
        self.reducer = GradientReducer(slot_params, self.layout, self.comm,
                                       reduce_scatter=grad_sync == "reduce_scatter",
                                       overlap=self.overlap)  # fmt: skip
        self.shard = ShardedState(slot_params, self.layout, self.comm, self.algorithm)
        device = self.shard.flat[0].device if self.shard.flat else torch.device("cpu")
        self._device = device
        self._clock = StepClock(device)
        self._tracker = UpdateTracker()
        self._skipped_steps = 0
        self._grad_norm = 0.0
        self._version = 0  # changes whenever the state does
        self._consolidated: tuple[int, dict[str, Any]] | None = None

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

        ``communication`` (blocked on collectives), ``optimizer`` (averaging,
        norm, clipping, the shard update), ``compile`` (building fused kernels;
        only on steps that did) and ``step`` (their sum, the wall time of
        ``step()`` without the closure); see ``zerotrain.optim.zero.timing``.
        """
        return self._clock.last()

    def collect_step_timings(self) -> dict[str, float]:
        """The ``last_step_timings`` keys summed over every step since the previous call,
        plus ``steps``: one read of the device's timers for a whole reporting window."""
        return self._clock.collect()

    def grad_bytes(self) -> int:
        """Bytes of gradient storage this rank holds right now.

        All-reduce mode: the flat gradient buffers (the trainable parameters plus
        padding). Reduce-scatter mode (ZeRO-2): the reduced 1/N slice, plus any
        bucket whose full gradient is still allocated (during backward).
        """
        return self.reducer.grad_bytes()

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (moments, and fp32 master if any)."""
        return self.shard.state_bytes()

    def refresh_master(self) -> None:
        """Copy the current (low-precision) parameters into the fp32 master shard."""
        self.shard.refresh_master()

    # ------------------------------------------------------------- gradients

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Accumulate gradients locally (no communication) for the enclosed backward passes.

        The next backward outside the context reduces the accumulated sum, as
        ``DistributedDataParallel.no_sync`` does.
        """
        return self.reducer.no_sync()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients (``None``, or zeros in the gradient buckets)."""
        self.reducer.wait_in_flight()
        if set_to_none:
            self.reducer.release()
        else:
            self.reducer.zero_grads()
        for group in self.param_groups:  # frozen params, outside the buffers
            for p in group["params"]:
                if not p.requires_grad and p.grad is not None:
                    p.grad = None if set_to_none else p.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the averaged gradient to ``max_norm`` across all ranks; return the total norm.

        FSDP's answer to ``torch.nn.utils.clip_grad_norm_`` for sharded
        gradients: call it between backward and ``step()`` (collective). It
        works in both sync modes; with ``reduce_scatter`` it is the only way,
        since ``.grad`` no longer holds the gradient after backward.
        """
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not (max_norm >= 0 and norm_type > 0):
            raise ValueError(
                f"clip_grad_norm_: max_norm must be >= 0 and norm_type > 0, got "
                f"max_norm={max_norm}, norm_type={norm_type}"
            )
        self.reducer.finish()
        pieces = [self.reducer.averaged_piece(b.id) for b in self.layout.buckets]
        norms = [torch.linalg.vector_norm(p, norm_type, dtype=_norm_dtype(p)) for p in pieces]
        local = torch.stack(norms).double() if norms else torch.zeros(1, dtype=torch.float64)
        if math.isinf(norm_type):
            total = self.comm.all_reduce_max(local.max().reshape(1).to(self._device))[0]
        else:
            powered = local.pow(norm_type).sum().reshape(1).to(self._device)
            total = self.comm.all_reduce_sum(powered)[0].pow(1.0 / norm_type)
        self.reducer.scale_((max_norm / (total + 1e-6)).clamp(max=1.0))
        return total

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Finish the gradient averaging, update this rank's shard, gather the parameters.

        A collective. Returns the closure's loss if a closure is given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._clock.start()
        with self._clock.communication():
            self.reducer.finish()
        grad_pieces = [self.reducer.averaged_piece(b.id) for b in self.layout.buckets]
        grad_pieces = [g.float() if g.dtype in _LOW_PRECISION else g for g in grad_pieces]
        has_grad, self._grad_norm = self._agree_on_grads(grad_pieces)
        if not math.isfinite(self._grad_norm):
            self._skipped_steps += 1
            self._tracker.skip_step()
        else:
            if self.clip_grad_norm is not None:
                coef = self.clip_grad_norm / (self._grad_norm + 1e-6)
                if coef < 1.0:
                    torch._foreach_mul_(grad_pieces, coef)
            self._update(grad_pieces, has_grad)
        self._version += 1
        self.reducer.release()
        self._clock.stop()
        return loss

    def _agree_on_grads(self, grad_pieces: list[torch.Tensor]) -> tuple[list[bool], float]:
        """One small all-reduce: the global squared norm and which params got a gradient."""
        sq = torch.zeros(1, dtype=torch.float64, device=self._device)
        for g in grad_pieces:
            sq += torch.linalg.vector_norm(g, dtype=_norm_dtype(g)).double().square()
        flags = torch.tensor(self.reducer.local_grads, dtype=torch.float64)
        packed = torch.cat([sq, flags.to(self._device, non_blocking=True)])
        with self._clock.communication():
            values = self.comm.all_reduce_sum(packed).tolist()  # the step's one read to the host
        total = values[0]
        return [v > 0 for v in values[1:]], math.sqrt(total) if math.isfinite(total) else math.nan

    def _update(self, grad_pieces: list[torch.Tensor], has_grad: list[bool]) -> None:
        self.shard.advance(has_grad, self.param_groups)
        runs = self.shard.runs(has_grad)
        observe = None
        if self.track_update_stats:
            self._tracker.start_step(self._device)
            adamax = self.algorithm.name == "adamax"

            def observe(run, params, states):  # type: ignore[no-untyped-def]
                beta2 = self.param_groups[run.group]["betas"][1]
                return self._tracker.observe(run, params, states, beta2, adamax)
        else:
            self._tracker.skip_step()
        foreach = [_common.use_foreach(g["foreach"], self.shard.flat) for g in self.param_groups]
        compiled_before = functional.compile_seconds()
        self.shard.update(grad_pieces, runs, self.param_groups, foreach=foreach,
                          compile=self.compile, observe=observe,
                          communication=self._clock.communication)  # fmt: skip
        self._clock.add_compile(functional.compile_seconds() - compiled_before)

    # ----------------------------------------------------- monitoring, I/O

    def stats(self) -> dict[str, float]:
        """Monitoring statistics of the last step (collective: one small all-gather).

        Keys: ``step``, ``lr``, ``grad_norm``, ``param_norm``, ``update_norm``,
        ``update_param_ratio``, ``state_bytes_per_rank``, ``skipped_steps``, and
        Adamax's ``adamax_u_*`` or Nadam's ``nadam_*`` keys (``zerotrain.optim.zero.stats``).
        The update keys are NaN unless the last step was tracked.
        """
        return compute_stats(self.shard, self.param_groups, self.comm, grad_norm=self._grad_norm,
                             skipped_steps=self._skipped_steps, tracker=self._tracker)  # fmt: skip

    def save_checkpoint(self, directory: str) -> None:
        """Write this rank's shard and (rank 0) the manifest into ``directory`` (collective).

        Atomic (temp file + fsync + rename; the manifest is written last) and
        checksummed; loadable at any world size with ``load_checkpoint``.
        """
        checkpoint.save(self.shard, self.param_groups, self._skipped_steps, directory)

    def load_checkpoint(self, directory: str) -> None:
        """Load a checkpoint saved at any world size (collective).

        Raises ``zerotrain.optim.zero.CheckpointError`` for a missing, torn or corrupted file.
        """
        self._skipped_steps = checkpoint.load(self.shard, self.param_groups, directory)
        self._version += 1

    def consolidated_state_dict(self) -> dict[str, Any]:
        """A plain ``torch.optim.Adamax`` / ``NAdam`` state dict, on every rank (collective)."""
        return state_dict.consolidated_state_dict(self.shard, self.param_groups)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Assemble the full state dict on rank ``to`` for ``state_dict()`` (collective).

        As ``torch.distributed.optim.ZeroRedundancyOptimizer``: every rank calls
        this, then rank ``to`` calls ``state_dict()``.
        """
        if not 0 <= to < self.world_size:
            raise ValueError(f"consolidate_state_dict: to must be a rank in [0, {self.world_size})")
        full = self.consolidated_state_dict()
        self._consolidated = (self._version, full) if self.rank == to else None

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict assembled by ``consolidate_state_dict`` (not collective).

        With one rank no consolidation is needed. Raises ``RuntimeError`` on a
        rank that did not receive it, or when the optimizer stepped since.
        """
        if self.world_size == 1:
            return self.consolidated_state_dict()
        if self._consolidated is None:
            raise RuntimeError(
                f"rank {self.rank} holds no consolidated optimizer state: call "
                f"consolidate_state_dict(to={self.rank}) on all ranks first, then state_dict() "
                "on that rank (or consolidated_state_dict() on all ranks)"
            )
        version, full = self._consolidated
        if version != self._version:
            raise RuntimeError(
                "the optimizer changed since consolidate_state_dict(): call it again on all "
                "ranks before state_dict()"
            )
        return full

    def load_consolidated_state_dict(self, state_dict_: dict[str, Any]) -> None:
        """Load a ``torch.optim`` state dict (not collective: each rank takes its shard)."""
        state_dict.load_consolidated_state_dict(self.shard, self.param_groups, state_dict_)
        self._version += 1

    def load_state_dict(self, state_dict_: dict[str, Any]) -> None:
        """Same as ``load_consolidated_state_dict()``."""
        self.load_consolidated_state_dict(state_dict_)

    # ----------------------------------------------------------- lifetime

    def close(self) -> None:
        """Remove the gradient hooks (waiting for reductions in flight); idempotent.

        The parameters stay views of this optimizer's buffers and keep their
        values; another ZeroOptimizer may then manage them.
        """
        self.reducer.wait_in_flight()
        self.reducer.close()

    def __enter__(self) -> ZeroOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_options(grad_sync: str, bucket_mb: float, clip_grad_norm: float | None,
                   compile: bool, options: dict[str, Any]) -> None:  # fmt: skip
    if grad_sync not in _GRAD_SYNC_MODES:
        raise ValueError(f"grad_sync must be one of {_GRAD_SYNC_MODES}, got {grad_sync!r}")
    if not (isinstance(bucket_mb, int | float) and bucket_mb > 0):
        raise ValueError(f"bucket_mb must be a number > 0, got {bucket_mb!r}")
    if clip_grad_norm is not None and not (
        isinstance(clip_grad_norm, int | float) and clip_grad_norm > 0
    ):
        raise ValueError(f"clip_grad_norm must be None or a number > 0, got {clip_grad_norm!r}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if options.get("capturable"):
        raise ValueError(
            "capturable=True is not supported by ZeroOptimizer: its step agrees with the other "
            "ranks on the host (one small read per step), which CUDA graph capture forbids"
        )
    if options.get("differentiable"):
        raise ValueError(
            "differentiable=True is not supported by ZeroOptimizer: the sharded update runs "
            "without autograd; use torch.optim's classes to differentiate through steps"
        )


def _norm_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32

