"""What ``bench/gpu_check.py`` shares with its process-group ranks, and the ranks themselves.

The algorithms and options every check uses, a small MLP with its data, the
parity measure, a counter of device-to-host synchronisations, and the
``nccl`` section: ``ZeroOptimizer`` on a process group of ``world`` ranks
(NCCL on CUDA, one GPU per rank; gloo on CPU), each rank in its own spawned
process, compared with ``torch.optim`` on the rank-averaged gradient.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from zerotrain import optim

__all__ = ["ALGORITHMS", "Row", "count_syncs", "guard", "make_mlp", "mlp_loss", "rel_error",
           "run_group"]

Row = dict[str, Any]
"""One line of the report: ``check``, ``ok`` (True, False, or None: information), ``detail``."""

# (ours, torch's, options): the same options everywhere, so fused kernels built
# by one section are found in the inductor cache by the next.
ALGORITHMS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "adamax": (optim.Adamax, torch.optim.Adamax, {"lr": 1e-2, "weight_decay": 0.01}),
    "nadam": (optim.Nadam, torch.optim.NAdam,
              {"lr": 1e-2, "weight_decay": 0.01, "decoupled_weight_decay": True}),
}  # fmt: skip

WIDTH = 64  # MLP width: four Linear(64, 64) layers
SYNC_WARNING = "called a synchronizing CUDA operation"
# Each group run: (algorithm, grad_sync, compile). Both modes, both algorithms,
# the eager and the fused step.
GROUP_RUNS = [
    ("adamax", "all_reduce", False),
    ("nadam", "all_reduce", True),
    ("adamax", "reduce_scatter", True),
    ("nadam", "reduce_scatter", False),
]


def make_mlp(device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Four Linear(64, 64) layers with tanh between them, the same weights on every call."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Linear(WIDTH, WIDTH)] + ([nn.Tanh()] if i < 3 else [])
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def mlp_loss(model: nn.Sequential, step: int, rank: int = 0, *, pause_s: float = 0.0) -> torch.Tensor:
    """Mean squared error on batch (step, rank); ``pause_s`` sleeps in backward before layer 0."""
    device, dtype = model[0].weight.device, model[0].weight.dtype
    # Made on the device: a copy from host memory would be a synchronisation of its own.
    gen = torch.Generator(device).manual_seed(1000 * step + rank)
    x, y = (torch.randn(16, WIDTH, generator=gen, device=device) for _ in range(2))
    h = model[0](x.to(dtype))
    if pause_s and h.requires_grad:
        # Lets the reductions launched so far complete before layer 0's gradients arrive.
        h.register_hook(lambda grad: time.sleep(pause_s))
    return (model[1:](h).float() - y).square().mean()


def rel_error(ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> tuple[float, bool]:
    """(max over tensors of ``max|a - b| / max|b|``, whether every pair is bitwise equal)."""
    worst, bitwise = 0.0, True
    for a, b in zip(ours, ref, strict=True):
        bitwise = bitwise and a.dtype == b.dtype and torch.equal(a, b)
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return worst, bitwise


def guard(check: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or a failed row carrying the exception: checks stay independent."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return {"check": check, "ok": False, "detail": f"{type(exc).__name__}: {exc}",
                "error": traceback.format_exc()}  # fmt: skip


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[list[str] | None]:
    """Collect every device-to-host synchronisation in the block (``None`` off CUDA).

    ``torch.cuda.set_sync_debug_mode("warn")`` makes each synchronising call
    warn; the list holds ``file:line`` of each, filled when the block exits.
    """
    if device.type != "cuda":
        yield None
        return
    syncs: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs += [f"{Path(w.filename).name}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message)]


# ---------------------------------------------------------------- the group


def run_group(device_type: str, world: int, steps: int, timeout_s: float) -> list[Row]:
    """Spawn ``world`` ranks and run every ``GROUP_RUNS`` entry on them; rows of the table.

    Rank 0's rows, with any other rank's failures appended. Raises
    ``TimeoutError`` (the ranks are killed) when they outlive ``timeout_s``.
    """
    backend = "nccl" if device_type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = mp.start_processes(_rank_main, args=(world, backend, tmp, steps), nprocs=world,
                                 join=False, start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                raise TimeoutError(f"{world} {backend} rank(s) still running after {timeout_s:.0f} s")
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    rows = per_rank[0]
    if world == 1:
        rows.insert(0, {"check": f"{backend} group of 1 rank", "ok": None, "detail": (
            "initialised with world_size=1; ZeroOptimizer then takes its no-communication "
            "path, so no collective runs (pass --world all to use every GPU)")})
    for rank, other in enumerate(per_rank[1:], start=1):
        rows += [{**row, "check": f"rank {rank}: {row['check']}"} for row in other if row["ok"] is False]
    return rows


def _rank_main(rank: int, world: int, backend: str, tmp: str, steps: int) -> None:
    """One rank: join the group, run every configuration, write its rows to ``rank<r>.json``."""
    rows: list[Row] = []

    def run_all() -> None:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(1)  # the ranks share the machine's cores
        store = dist.FileStore(str(Path(tmp, "store")), world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        try:
            for algorithm, grad_sync, compile in GROUP_RUNS:
                name = f"{algorithm} {grad_sync} {'fused' if compile else 'eager'}"
                found = guard(name, _zero_on_group, device, rank, world, algorithm, grad_sync,
                              compile, steps)  # fmt: skip
                rows.extend(found if isinstance(found, list) else [found])
        finally:
            dist.destroy_process_group()

    failed = guard(f"{backend} process group", run_all)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(rows + ([failed] if failed else [])))


def _zero_on_group(device: torch.device, rank: int, world: int, algorithm: str, grad_sync: str,
                   compile: bool, steps: int) -> list[Row]:  # fmt: skip
    """Train with ZeroOptimizer and with torch.optim on the averaged gradient; three rows."""
    ours_cls, torch_cls, options = ALGORITHMS[algorithm]
    model, ref = make_mlp(device), make_mlp(device)
    layer_mb = model[0].weight.numel() * 4 / 2**20 * 1.05  # about one layer per bucket
    opt = optim.ZeroOptimizer(model.parameters(), ours_cls, grad_sync=grad_sync,
                              bucket_mb=layer_mb, compile=compile, **options)  # fmt: skip
    ref_opt = torch_cls(ref.parameters(), **options)
    name = f"{algorithm} {grad_sync} {'fused' if compile else 'eager'}"
    shard_bytes = opt.grad_bytes()  # before backward: only this rank's slice (ZeRO-2)
    full_bytes = 4 * sum(buf.numel for buf in opt.layout.buffers)
    during: list[int] = []  # gradient bytes held when layer 0's gradient arrives
    model[0].weight.register_post_accumulate_grad_hook(lambda _: during.append(opt.grad_bytes()))
    syncs: list[int] = []  # per counted step: the whole iteration, and step() alone
    step_syncs: list[int] = []
    where: set[str] = set()
    warmup = 2  # the fused kernels are built and checked on the first step
    for step in range(steps):
        with count_syncs(device) as in_backward:
            opt.zero_grad()
            mlp_loss(model, step, rank, pause_s=0.1).backward()
        with count_syncs(device) as in_step:
            opt.step()  # no stats() or timings read: a step that reports nothing
        if in_backward is not None and in_step is not None and step >= warmup:
            syncs.append(len(in_backward) + len(in_step))
            step_syncs.append(len(in_step))
            where.update(in_backward + in_step)
        _reference_step(ref, ref_opt, step, world)
    if device.type == "cuda":
        torch.cuda.synchronize()

    error, bitwise = rel_error(list(model.parameters()), list(ref.parameters()))
    tolerance = 1e-5 if compile or world > 2 else 1e-6  # more ranks: another summation order
    same = _same_on_all_ranks(model)
    rows = [{"check": f"{name}: vs torch.optim, averaged grads", "max_rel_err": error,
             "bitwise": bitwise, "ok": error <= tolerance and same,
             "detail": f"max rel err {error:.2e} (<= {tolerance:g}){', bitwise' if bitwise else ''}"
                       f"{'' if same else '; ranks DIFFER'}"}]  # fmt: skip
    if grad_sync == "reduce_scatter" and world > 1:
        held = max(during)
        rows.append({"check": f"{name}: buckets freed during backward", "held_bytes": held,
                     "full_plus_shard_bytes": full_bytes + shard_bytes, "ok": held < full_bytes + shard_bytes,
                     "detail": f"held {held} B when layer 0's grad arrived (< {full_bytes + shard_bytes} B "
                               "= full + shard)"})  # fmt: skip
    elif grad_sync == "reduce_scatter":
        rows.append({"check": f"{name}: buckets freed during backward", "ok": None,
                     "detail": "n/a: one rank has no reduce-scatter, nothing to free"})  # fmt: skip
    if syncs:
        per_step = max(syncs)
        rows.append({"check": f"{name}: device-to-host syncs per step", "syncs_per_step": syncs,
                     "syncs_in_step": step_syncs, "where": sorted(where), "ok": per_step <= 1,
                     "detail": f"max {per_step} per iteration ({max(step_syncs)} in step()) over "
                               f"{len(syncs)} steps (<= 1){'; at ' + ', '.join(sorted(where)) if where else ''}"})  # fmt: skip
    else:
        rows.append({"check": f"{name}: device-to-host syncs per step", "ok": None,
                     "detail": "skipped: counted with torch.cuda.set_sync_debug_mode, CUDA only"})  # fmt: skip
    opt.close()
    return rows


def _reference_step(ref: nn.Sequential, ref_opt: torch.optim.Optimizer, step: int, world: int) -> None:
    """torch.optim on the gradient averaged over every rank's batch (computed locally)."""
    grads = [torch.zeros_like(p) for p in ref.parameters()]
    for r in range(world):
        ref.zero_grad(set_to_none=True)
        mlp_loss(ref, step, r).backward()
        torch._foreach_add_(grads, [p.grad for p in ref.parameters()])
    for p, g in zip(ref.parameters(), grads, strict=True):
        p.grad = g / world
    ref_opt.step()


def _same_on_all_ranks(model: nn.Module) -> bool:
    if dist.get_world_size() == 1:
        return True
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return all(torch.equal(other, everyone[0]) for other in everyone)
