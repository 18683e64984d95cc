"""The two sharding engines behind one small interface used by the worker loop.

* :class:`NativeEngine`: ``optim.ZeroOptimizer`` (no DDP wrapper needed).
* :class:`DeepSpeedEngine`: ``deepspeed.initialize`` with ``optim.Adamax`` /
  ``optim.Nadam`` as the client optimizer (ZeRO stage 1/2).

Per micro-batch the loop calls ``forward`` (via ``module``), ``backward(loss,
last=...)`` and ``optimizer_step(last=...)``; both engines average gradients
over the ranks and scale the loss by ``1 / grad_accum_steps``, so on the same
data they compute the same update.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from zerotrain.service.spec import JobSpec

__all__ = [
    "DeepSpeedEngine",
    "Engine",
    "NativeEngine",
    "make_engine",
    "optimizer_class",
    "optimizer_state_bytes",
]

logger = logging.getLogger(__name__)


def optimizer_class(algorithm: str) -> type[torch.optim.Optimizer]:
    """``optim.Adamax`` or ``optim.Nadam`` for a spec's ``optimizer.algorithm``."""
    from zerotrain.optim import Adamax, Nadam

    return {"adamax": Adamax, "nadam": Nadam}[algorithm]


def optimizer_state_bytes(*holders: object) -> int:
    """Bytes of optimizer state in ``holders`` (state dicts, lists of tensors), counted one way
    for every optimizer and benchmark: the tensors kept between steps to compute the update,
    moments and any master copy of the parameters (DeepSpeed's fp32 partition too); 0-dim
    per-parameter counters (``step``, ``mu_product``) are left out."""
    total, pending = 0, list(holders)
    while pending:
        obj = pending.pop()
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size() if obj.dim() > 0 else 0
        elif isinstance(obj, dict):
            pending.extend(obj.values())
        elif isinstance(obj, list | tuple):
            pending.extend(obj)
    return total


class Engine:
    """What the worker loop needs from a sharding engine."""

    name: str
    module: nn.Module
    """Call this for the forward pass."""
    model: nn.Module
    """The bare model (for ``state_dict`` and evaluation)."""

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Backward of one micro-batch; ``last`` is the final micro-batch of the step."""
        raise NotImplementedError

    def optimizer_step(self, *, last: bool) -> None:
        """Called after each micro-batch's backward; updates parameters when ``last``."""
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """Optimizer statistics of the last step (collective)."""
        raise NotImplementedError

    def track_update_stats(self, enabled: bool) -> None:
        """Whether the next update must be measured for ``stats()`` (no-op by default)."""

    def collect_step_timings(self) -> dict[str, float]:
        """Seconds the parameter updates since the last call spent in ``communication``
        (waiting on collectives), ``compile`` (building fused kernels) and ``optimizer``
        compute; ``{}`` when the engine does not measure them."""
        return {}

    @property
    def description(self) -> str:
        """The engine in a few words, for the job's log."""
        return self.name

    def close(self) -> None:
        """Release what the engine registered on the model (gradient hooks)."""

    def state_bytes(self) -> int:
        """Optimizer-state bytes held by this rank."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write this rank's optimizer state under ``directory`` (collective)."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        """Load the optimizer state written by :meth:`save` (collective)."""
        raise NotImplementedError


class NativeEngine(Engine):
    """``optim.ZeroOptimizer``: sharded state, bucketed and overlapped gradient sync."""

    name = "native"

    def __init__(self, model: nn.Module, spec: JobSpec):
        from zerotrain.optim.functional import compile_available
        from zerotrain.optim.zero import ZeroOptimizer

        self.model = self.module = model
        self.accum = spec.training.grad_accum_steps
        # The fused step where a compiler works; compile_available() logs why not.
        self.fused = spec.sharding.compile and compile_available()
        if spec.sharding.compile and not self.fused:
            logger.warning("sharding.compile: torch.compile is unavailable; eager optimizer step")
        self.opt = ZeroOptimizer(
            model.parameters(),
            optimizer_class(spec.optimizer.algorithm),
            grad_sync=spec.sharding.resolved_grad_sync(),
            bucket_mb=spec.sharding.bucket_mb,
            overlap=spec.sharding.overlap,
            clip_grad_norm=spec.training.clip_grad_norm,
            compile=self.fused,
            **spec.optimizer.options(),
        )

    @property
    def description(self) -> str:
        step = "fused optimizer step" if self.fused else "eager optimizer step"
        return f"native ({self.opt.grad_sync}, {step})"

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        scaled = loss / self.accum if self.accum > 1 else loss
        with contextlib.nullcontext() if last else self.opt.no_sync():
            scaled.backward()

    def optimizer_step(self, *, last: bool) -> None:
        if last:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def stats(self) -> dict[str, float]:
        return self.opt.stats()

    def track_update_stats(self, enabled: bool) -> None:
        self.opt.track_update_stats = enabled

    def collect_step_timings(self) -> dict[str, float]:
        return self.opt.collect_step_timings()

    def close(self) -> None:
        self.opt.close()

    def state_bytes(self) -> int:
        return self.opt.state_bytes()

    def save(self, directory: Path) -> None:
        self.opt.save_checkpoint(str(directory / "optimizer"))

    def load(self, directory: Path) -> None:
        self.opt.load_checkpoint(str(directory / "optimizer"))


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 1/2 with our Adamax/Nadam as the client optimizer.

    Clipping comes from the spec (``gradient_clipping: 0`` when unset, not
    DeepSpeed's default of 1.0). Resuming requires the saved world size:
    DeepSpeed's stage 1/2 checkpoints are not resharded here.
    """

    name = "deepspeed"

    def __init__(self, model: nn.Module, spec: JobSpec, *, world_size: int):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.scaling.use_gpu else "cpu")
        import deepspeed

        training, sharding = spec.training, spec.sharding
        bucket_elements = int(sharding.bucket_mb * 2**20 / 4)
        config = {
            "train_micro_batch_size_per_gpu": training.batch_size,
            "gradient_accumulation_steps": training.grad_accum_steps,
            "train_batch_size": training.batch_size * training.grad_accum_steps * world_size,
            "gradient_clipping": training.clip_grad_norm or 0.0,
            "zero_optimization": {
                "stage": sharding.stage,
                "overlap_comm": sharding.overlap,
                "reduce_bucket_size": bucket_elements,
                "allgather_bucket_size": bucket_elements,
                "contiguous_gradients": True,
            },
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        client = optimizer_class(spec.optimizer.algorithm)(
            model.parameters(), **spec.optimizer.options()
        )
        self.model = model
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=model, optimizer=client, config=config, dist_init_required=False
        )
        self.module = self.engine
        self.lr = spec.optimizer.lr

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def optimizer_step(self, *, last: bool) -> None:
        self.engine.step()  # updates only at the accumulation boundary

    def stats(self) -> dict[str, float]:
        norm = self.engine.get_global_grad_norm()
        return {
            "step": float(self.engine.global_steps),
            "lr": float(self.lr),
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "skipped_steps": float(self.engine.skipped_steps),
            "state_bytes_per_rank": float(self.state_bytes()),
        }

    def state_bytes(self) -> int:
        inner = getattr(self.opt, "optimizer", self.opt)
        masters = getattr(self.opt, "single_partition_of_fp32_groups", [])
        return optimizer_state_bytes(dict(inner.state), list(masters))

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory / 'deepspeed'}")


def make_engine(model: nn.Module, spec: JobSpec, *, world_size: int) -> Engine:
    """The engine named by ``spec.sharding.engine``."""
    if spec.sharding.engine == "deepspeed":
        return DeepSpeedEngine(model, spec, world_size=world_size)
    return NativeEngine(model, spec)
