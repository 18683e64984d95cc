"""The corners a user reaches, run on every rank of a gloo group (``harness.spawn``).

Each worker compares a ZeroOptimizer with a torch reference on the same data:
torch.optim on the rank-averaged gradient, or DDP itself.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from zerotrain.optim import Adamax, Nadam
from zerotrain.optim.zero import ZeroOptimizer

from .workers import (
    TINY_BUCKET_MB,
    assert_params_close,
    assert_same_on_all_ranks,
    assert_state_close,
    batch,
    loss_of,
    make_net,
    reference_grads,
)


def trainable(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def betas_at(step: int) -> tuple[float, float]:
    """A momentum schedule, as OneCycleLR(cycle_momentum=True) makes one."""
    return (0.85 + 0.1 * ((step * 7) % 5) / 4, 0.999 - 0.001 * (step % 3))


def set_schedule(opt: torch.optim.Optimizer, step: int) -> None:
    for i, group in enumerate(opt.param_groups):
        group["betas"] = betas_at(step + i)
        group["lr"] = 1e-2 * (1 + 0.5 * math.sin(step + i))


# ------------------------------------------------------------ assigned grads


def assigned_grads_worker(rank: int, world_size: int) -> None:
    """``p.grad = g`` counts: averaged when assigned without backward, final when after it."""
    for mode in ("all_reduce", "reduce_scatter"):
        net, ref = make_net(), make_net()
        opt = ZeroOptimizer(net.groups(lr=5e-3), Nadam, grad_sync=mode, bucket_mb=TINY_BUCKET_MB)
        ref_opt = torch.optim.NAdam(ref.groups(lr=5e-3))
        for step in range(6):
            if step % 2 == 0:
                # No backward: gradients from torch.autograd.grad, assigned by hand.
                params = trainable(net)
                grads = torch.autograd.grad(loss_of(net, step * 10, rank), params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                reference_grads(ref, step, world_size)
            else:
                # Backward synchronises; then the gradient is replaced by a scaled average.
                loss_of(net, step * 10, rank).backward()
                reference_grads(ref, step, world_size)
                for p, q in zip(trainable(net), trainable(ref), strict=True):
                    if q.grad is not None:
                        q.grad = q.grad * 0.5
                        p.grad = q.grad.clone()  # the final, averaged gradient
            opt.step()
            ref_opt.step()
            assert_params_close(net, ref, exact=world_size <= 2)
        assert_same_on_all_ranks(net)
        opt.close()


# -------------------------------------------------------- the DDP clip habit


def ddp_clip_worker(rank: int, world_size: int) -> None:
    """``backward; clip_grad_norm_; step`` equals DDP + clip_grad_norm_ + torch.optim.NAdam."""
    clip = 0.05
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for mode in ("all_reduce", "reduce_scatter"):
            net = make_net(dtype=torch.float64)
            twin = copy.deepcopy(net)
            ddp = DistributedDataParallel(twin, find_unused_parameters=True)
            opt = ZeroOptimizer(net.groups(lr=5e-3), Nadam, grad_sync=mode,
                                bucket_mb=TINY_BUCKET_MB)  # fmt: skip
            ddp_opt = torch.optim.NAdam(twin.groups(lr=5e-3))
            for step in range(10):
                opt.zero_grad()
                ddp_opt.zero_grad()
                loss_of(net, step * 10, rank).backward()
                if mode == "all_reduce":  # .grad holds the average, as with DDP
                    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                else:  # .grad is freed: the optimizer clips the shards
                    norm = opt.clip_grad_norm_(clip)
                tokens, targets = batch(step * 10, rank)  # loss_of's data, through DDP
                out = ddp(tokens, use_sometimes=step * 10 % 3 == 0, use_rank0=rank == 0)
                F.cross_entropy(out.float(), targets).backward()
                ddp_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
                assert ddp_norm > clip, "clipping is not exercised"
                torch.testing.assert_close(norm, ddp_norm, rtol=1e-12, atol=0.0)
                opt.step()
                ddp_opt.step()
            for (name, p), q in zip(net.named_parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"{mode} {name}")
            opt.close()
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------- mu_product, dtypes and resume


def schedule_worker(rank: int, world_size: int, dtype_name: str, foreach: bool) -> None:
    """Changing betas and lr every step, in float32 or under a float64 default dtype:
    bitwise torch (two ranks sum in one order), mu_product included."""
    dtype = getattr(torch, dtype_name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for cls, torch_cls in ((Nadam, torch.optim.NAdam), (Adamax, torch.optim.Adamax)):
            net, ref = make_net(dtype=dtype), make_net(dtype=dtype)
            opt = ZeroOptimizer(net.groups(lr=5e-3), cls, bucket_mb=TINY_BUCKET_MB,
                                foreach=foreach, weight_decay=0.1)  # fmt: skip
            ref_opt = torch_cls(ref.groups(lr=5e-3), foreach=foreach, weight_decay=0.1)
            for step in range(20):
                set_schedule(opt, step)
                set_schedule(ref_opt, step)
                opt.zero_grad()
                loss_of(net, step * 10, rank).backward()
                opt.step()
                reference_grads(ref, step, world_size)
                ref_opt.step()
            exact = world_size <= 2
            assert_params_close(net, ref, exact=exact, rtol=1e-12 if dtype == torch.float64 else 1e-6)
            state = opt.consolidated_state_dict()
            assert_state_close(state, ref_opt.state_dict(), exact=exact)
            if cls is Nadam:
                assert all(s["mu_product"].dtype == dtype for s in state["state"].values())
            opt.close()
    finally:
        torch.set_default_dtype(previous)


def resume_worker(rank: int, world_size: int, dtype_name: str, root: str) -> None:
    """Stop at step 7, restore through either format, finish: the same bits as never stopping."""
    dtype = getattr(torch, dtype_name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        straight = make_net(dtype=dtype)
        with _optimizer(straight) as opt:
            _train_scheduled(straight, opt, rank, range(14))
        for fmt in ("state_dict", "checkpoint"):
            net = make_net(dtype=dtype)
            with _optimizer(net) as first:
                _train_scheduled(net, first, rank, range(7))
                model_state = copy.deepcopy(net.state_dict())
                saved = first.consolidated_state_dict()
                first.save_checkpoint(f"{root}/{dtype_name}")
            resumed_net = make_net(seed=123, dtype=dtype)  # other values, overwritten below
            resumed_net.load_state_dict(model_state)
            with _optimizer(resumed_net) as resumed:
                if fmt == "state_dict":
                    resumed.load_state_dict(saved)
                else:
                    resumed.load_checkpoint(f"{root}/{dtype_name}")
                _train_scheduled(resumed_net, resumed, rank, range(7, 14))
            for p, q in zip(resumed_net.parameters(), straight.parameters(), strict=True):
                assert torch.equal(p, q), f"{fmt} {dtype_name}: the resumed run differs"
    finally:
        torch.set_default_dtype(previous)


def _optimizer(net: torch.nn.Module) -> ZeroOptimizer:
    return ZeroOptimizer(net.groups(lr=5e-3), Nadam, bucket_mb=TINY_BUCKET_MB, weight_decay=0.1,
                         decoupled_weight_decay=True)  # fmt: skip


def _train_scheduled(net: torch.nn.Module, opt: ZeroOptimizer, rank: int, steps: range) -> None:
    for step in steps:
        set_schedule(opt, step)
        opt.zero_grad()
        loss_of(net, step * 10, rank).backward()
        opt.step()


# ------------------------------------------------- state dicts and lifetime


def state_dict_contract_worker(rank: int, world_size: int) -> None:
    """ZeroRedundancyOptimizer's contract: consolidate on all ranks, then state_dict on one."""
    net = make_net()
    opt = ZeroOptimizer(net.groups(), Nadam, bucket_mb=TINY_BUCKET_MB)
    loss_of(net, 0, rank).backward()
    opt.step()
    if rank == 0:  # the common DDP habit: no hang, an error that says what to do
        try:
            opt.state_dict()
        except RuntimeError as e:
            assert "consolidate_state_dict(to=0) on all ranks" in str(e), e
        else:
            raise AssertionError("state_dict() without consolidation returned")
    dist.barrier()
    opt.consolidate_state_dict(to=0)
    full = opt.consolidated_state_dict()
    if rank == 0:
        assert_state_close(opt.state_dict(), full, exact=True)
    else:
        try:
            opt.state_dict()
        except RuntimeError as e:
            assert f"consolidate_state_dict(to={rank})" in str(e), e
        else:
            raise AssertionError("a rank that did not receive the state returned one")
    loss_of(net, 1, rank).backward()
    opt.step()
    if rank == 0:
        try:
            opt.state_dict()
        except RuntimeError as e:
            assert "changed since consolidate_state_dict()" in str(e), e
        else:
            raise AssertionError("a stale consolidated state dict was returned")


def close_worker(rank: int, world_size: int) -> None:
    """A second optimizer over the same parameters needs the first closed; then it is alone."""
    net, ref = make_net(), make_net()
    first = ZeroOptimizer(net.groups(lr=5e-3), Nadam, bucket_mb=TINY_BUCKET_MB)
    try:
        ZeroOptimizer(net.groups(lr=5e-3), Nadam, bucket_mb=TINY_BUCKET_MB)
    except ValueError as e:
        assert "close()" in str(e), e
    else:
        raise AssertionError("two live optimizers over the same parameters")
    first.close()
    first.close()  # idempotent
    with ZeroOptimizer(net.groups(lr=5e-3), Adamax, bucket_mb=TINY_BUCKET_MB) as second:
        ref_opt = torch.optim.Adamax(ref.groups(lr=5e-3))
        for step in range(5):
            second.zero_grad()
            loss_of(net, step * 10, rank).backward()  # the first's hooks would launch too
            second.step()
            reference_grads(ref, step, world_size)
            ref_opt.step()
    assert_params_close(net, ref, exact=world_size <= 2)
    ZeroOptimizer(net.groups(), Nadam).close()  # the context manager closed the second


# ------------------------------------------------------ host synchronisation


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def host_reads_worker(rank: int, world_size: int) -> None:
    """A step that reports nothing reads at most one small tensor back to the host."""
    for cls in (Adamax, Nadam):
        for mode in ("all_reduce", "reduce_scatter"):
            for compile in (False, True):
                net = make_net()
                opt = ZeroOptimizer(net.groups(lr=5e-3), cls, grad_sync=mode, compile=compile,
                                    bucket_mb=TINY_BUCKET_MB, clip_grad_norm=1.0)  # fmt: skip
                for step in range(4):
                    opt.zero_grad()
                    loss_of(net, step * 10, rank).backward()
                    if step < 2:  # warm-up: kernels compiled and checked
                        opt.step()
                        continue
                    with count_host_reads() as reads:
                        opt.step()
                    # The one read: the agreement on the norm and on who had gradients.
                    assert len(reads) == 1, (cls.__name__, mode, compile, reads)
                opt.close()


class count_host_reads:
    """Counts calls of the tensor methods that read values back to the host."""

    def __enter__(self) -> list[str]:
        self.reads: list[str] = []
        self.saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._counting(name, method))
        return self.reads

    def _counting(self, name, method):  # type: ignore[no-untyped-def]
        reads = self.reads

        def counted(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            reads.append(f"{name}{tuple(tensor.shape)}")
            return method(tensor, *args, **kwargs)

        return counted

    def __exit__(self, *exc: object) -> None:
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
