"""Per-rank test bodies for ZeroOptimizer, run under ``harness.spawn`` (gloo, CPU).

Every rank trains a ZeroOptimizer on its own data and, locally, a single-process
``torch.optim`` reference on the gradient averaged over every rank's data (each
rank can compute it: the model is tiny), then compares.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zerotrain.optim.zero import CheckpointError, ZeroOptimizer

TINY_BUCKET_MB = 0.0004  # ~100 fp32 elements: many buckets, parameters straddle ranks


def optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    """The project's drop-in classes (torch's twins until they exist)."""
    try:
        from zerotrain.optim import Adamax, Nadam  # type: ignore[attr-defined]
    except ImportError:
        return {"adamax": torch.optim.Adamax, "nadam": torch.optim.NAdam}
    return {"adamax": Adamax, "nadam": Nadam}


TORCH_CLASSES = {"adamax": torch.optim.Adamax, "nadam": torch.optim.NAdam}


class Net(nn.Module):
    """Small model with awkward sizes, a frozen, an unused, an occasional and a rank-0-only param."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.l1 = nn.Linear(5, 13)
        self.frozen = nn.Parameter(torch.randn(7), requires_grad=False)
        self.unused = nn.Parameter(torch.randn(4))
        self.l2 = nn.Linear(13, 7)
        self.sometimes = nn.Linear(7, 7, bias=False)
        self.rank0_only = nn.Parameter(torch.randn(3) * 0.1)
        self.head = nn.Linear(7, 3)

    def forward(self, tokens: torch.Tensor, *, use_sometimes: bool, use_rank0: bool) -> torch.Tensor:
        h = torch.tanh(self.l1(self.emb(tokens).mean(1)))
        h = self.l2(h) + self.frozen
        if use_sometimes:
            h = h + self.sometimes(h)
        out = self.head(torch.tanh(h))
        if use_rank0:
            out = out + self.rank0_only
        return out

    def groups(self, **group1: float) -> list[dict]:
        first = [self.emb.weight, self.l1.weight, self.l1.bias, self.frozen, self.unused]
        second = [*self.l2.parameters(), self.sometimes.weight, self.rank0_only, *self.head.parameters()]
        return [{"params": first}, {"params": second, **group1}]


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def batch(step: int, rank: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 11, (size, 6), generator=g), torch.randint(0, 3, (size,), generator=g)


def loss_of(net: Net, step: int, rank: int, *, rank_dependent: bool = True) -> torch.Tensor:
    device = net.l1.weight.device
    tokens, targets = (t.to(device) for t in batch(step, rank))
    out = net(tokens, use_sometimes=step % 3 == 0, use_rank0=rank_dependent and rank == 0)
    return F.cross_entropy(out.float(), targets)


def reference_grads(net: Net, step: int, world_size: int, micro: int = 1) -> None:
    """Set ``net``'s grads to the rank-averaged gradient (None where no rank had one)."""
    per_rank: list[dict[str, torch.Tensor]] = []
    for r in range(world_size):
        net.zero_grad(set_to_none=True)
        for m in range(micro):
            loss_of(net, step * 10 + m, r).backward()
        per_rank.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    for name, p in net.named_parameters():
        grads = [g[name] for g in per_rank if name in g]
        if not grads:
            p.grad = None
            continue
        full = [g.get(name, torch.zeros_like(p)) for g in per_rank]
        p.grad = torch.stack(full).sum(0) / world_size


def flat_params(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in net.parameters()])


def assert_same_on_all_ranks(net: nn.Module) -> None:
    mine = flat_params(net)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    for r, other in enumerate(everyone):
        assert torch.equal(other, everyone[0]), f"rank {r} parameters differ from rank 0's"


def assert_params_close(net: nn.Module, ref: nn.Module, *, exact: bool, rtol: float = 1e-6) -> None:
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), f"{name}: max diff {(p - q).abs().max().item()}"
        else:
            torch.testing.assert_close(p, q, rtol=rtol, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def assert_state_close(zero_sd: dict, ref_sd: dict, *, exact: bool, rtol: float = 1e-6) -> None:
    assert zero_sd["param_groups"] == ref_sd["param_groups"]
    assert sorted(zero_sd["state"]) == sorted(ref_sd["state"]), (
        f"state for params {sorted(zero_sd['state'])}, torch has {sorted(ref_sd['state'])}"
    )
    for idx, ref_entry in ref_sd["state"].items():
        entry = zero_sd["state"][idx]
        assert list(entry) == list(ref_entry), f"param {idx}: keys {list(entry)} vs {list(ref_entry)}"
        for key, value in ref_entry.items():
            if exact or key in ("step", "mu_product"):
                assert torch.equal(entry[key], value), f"param {idx} {key} differs"
            else:
                torch.testing.assert_close(entry[key], value, rtol=rtol, atol=1e-7)


# ------------------------------------------------------------------ parity

PARITY_CONFIGS = [
    ("adamax", {"grad_sync": "all_reduce", "overlap": True}, {"lr": 2e-2}),
    (
        "nadam",
        {"grad_sync": "reduce_scatter", "overlap": True},
        {"lr": 1e-2, "momentum_decay": 6e-3, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ),
    (
        "adamax",
        {"grad_sync": "reduce_scatter", "overlap": False},
        {"lr": 1e-2, "weight_decay": 0.1, "maximize": True},
    ),
    ("nadam", {"grad_sync": "all_reduce", "overlap": False}, {"lr": 1e-2, "weight_decay": 0.1}),
]


def parity_worker(rank: int, world_size: int, steps: int) -> None:
    """Every config: params after ``steps`` equal torch.optim on the averaged gradient."""
    exact = world_size <= 2  # a sum of two floats has one order; more ranks may reorder
    for algo, zero_kw, options in PARITY_CONFIGS:
        net, ref = make_net(), make_net()
        opt = ZeroOptimizer(
            net.groups(lr=5e-3, weight_decay=0.01),
            optimizer_classes()[algo],
            bucket_mb=TINY_BUCKET_MB,
            **zero_kw,
            **options,
        )
        ref_opt = TORCH_CLASSES[algo](ref.groups(lr=5e-3, weight_decay=0.01), **options)
        assert len(opt.layout.buckets) > 3
        for step in range(steps):
            opt.zero_grad()
            loss_of(net, step * 10, rank).backward()
            opt.step()
            reference_grads(ref, step, world_size)
            ref_opt.step()
            if step == 0:
                assert_params_close(net, ref, exact=exact)
        assert_same_on_all_ranks(net)
        assert_params_close(net, ref, exact=exact)
        assert net.unused.grad is None and torch.equal(net.unused, ref.unused)
        assert_state_close(opt.consolidated_state_dict(), ref_opt.state_dict(), exact=exact)
        # A torch.optim state dict loads back and continues identically.
        opt.close()  # the parameters get a new optimizer
        fresh = ZeroOptimizer(
            net.groups(lr=1.0), optimizer_classes()[algo], bucket_mb=TINY_BUCKET_MB, **zero_kw
        )
        fresh.load_consolidated_state_dict(ref_opt.state_dict())
        assert_state_close(fresh.consolidated_state_dict(), ref_opt.state_dict(), exact=exact)


# ---------------------------------------------------------------- features


def features_worker(rank: int, world_size: int) -> None:
    """Accumulation, clipping, NaN on one rank, stats, state bytes, bf16."""
    classes = optimizer_classes()
    for algo, grad_sync in (("adamax", "reduce_scatter"), ("nadam", "all_reduce")):
        net, ref = make_net(), make_net()
        clip = 0.05
        opt = ZeroOptimizer(
            net.groups(lr=5e-3), classes[algo], grad_sync=grad_sync,
            bucket_mb=TINY_BUCKET_MB, clip_grad_norm=clip, lr=1e-2, track_update_stats=True,
        )  # fmt: skip
        ref_opt = TORCH_CLASSES[algo](ref.groups(lr=5e-3), lr=1e-2)
        nan_step = 3
        for step in range(8):
            before = flat_params(net)
            state_before = opt.consolidated_state_dict()
            opt.zero_grad()
            with opt.no_sync():  # two accumulation micro-batches without communication
                for m in range(2):
                    loss_of(net, step * 10 + m, rank).backward()
            last = loss_of(net, step * 10 + 2, rank)
            if step == nan_step and rank == world_size - 1:
                last = last * float("nan")
            last.backward()
            opt.step()
            if step == nan_step:
                assert opt.skipped_steps == 1
                assert torch.equal(flat_params(net), before), "a skipped step changed params"
                assert_state_close(opt.consolidated_state_dict(), state_before, exact=True)
                assert math.isnan(opt.stats()["grad_norm"])
                continue
            reference_grads(ref, step, world_size, micro=3)
            ref_grads = [p.grad for p in ref.parameters() if p.grad is not None]
            ref_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads])))
            ref_before = flat_params(ref)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            ref_opt.step()
            stats = opt.stats()
            assert math.isclose(stats["grad_norm"], ref_norm, rel_tol=1e-5), (stats, ref_norm)
            assert ref_norm > clip, "clipping is not exercised"
            update_norm = float((flat_params(ref) - ref_before).norm())
            assert math.isclose(stats["update_norm"], update_norm, rel_tol=1e-3), (stats, update_norm)
            trainable = torch.cat([q.reshape(-1) for q in ref.parameters() if q.requires_grad])
            assert math.isclose(stats["param_norm"], float(trainable.norm()), rel_tol=1e-5)
        assert_same_on_all_ranks(net)
        assert_params_close(net, ref, exact=False, rtol=1e-5)
        common = {"step", "lr", "grad_norm", "param_norm", "update_norm", "update_param_ratio",
                  "state_bytes_per_rank", "skipped_steps"}  # fmt: skip
        extra = (
            {"adamax_u_max", "adamax_u_mean", "adamax_u_refreshed_fraction"}
            if algo == "adamax"
            else {"nadam_mu_t", "nadam_mu_product", "nadam_bias_correction1",
                  "nadam_bias_correction2", "nadam_sqrt_v_hat_mean"}
        )
        stats = opt.stats()
        assert set(stats) == common | extra
        assert all(isinstance(v, float) for v in stats.values())
        assert stats["step"] == 7.0 and stats["skipped_steps"] == 1.0
        ref_state = ref_opt.state_dict()["state"]
        if algo == "adamax":
            u = torch.cat([s["exp_inf"].reshape(-1) for s in ref_state.values()])
            assert math.isclose(stats["adamax_u_max"], float(u.max()), rel_tol=1e-6)
            assert math.isclose(stats["adamax_u_mean"], float(u.mean()), rel_tol=1e-5)
            assert 0.0 < stats["adamax_u_refreshed_fraction"] <= 1.0
        else:
            s0 = ref_state[0]  # emb.weight: updated every step
            assert stats["nadam_mu_product"] == float(s0["mu_product"])
            assert math.isclose(stats["nadam_bias_correction2"], 1 - 0.999**7)
        # State is 1/N of torch's, plus at most one alignment quantum per bucket.
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        bound = 2 * 4 * (math.ceil(trainable / world_size) + 32 * len(opt.layout.buckets))
        assert opt.state_bytes() <= bound
        assert stats["state_bytes_per_rank"] == float(opt.state_bytes())

    # bf16 parameters: fp32 master shard and state; params are the rounded master.
    net = make_net(dtype=torch.bfloat16)
    ref = make_net()
    opt = ZeroOptimizer(
        net.parameters(), classes["nadam"], bucket_mb=TINY_BUCKET_MB, lr=1e-2,
        grad_sync="reduce_scatter",
    )  # fmt: skip
    ref_opt = torch.optim.NAdam(ref.parameters(), lr=1e-2)
    auto = ZeroOptimizer(make_net().parameters(), classes["nadam"], grad_sync="auto")
    assert auto.grad_sync == "all_reduce", "auto must pick all-reduce on gloo"
    assert all(m is not None and m.dtype == torch.float32 for m in opt.shard.master)
    assert all(s.dtype == torch.float32 for pair in opt.shard.state for s in pair)
    for step in range(5):
        opt.zero_grad()
        loss_of(net, step * 10, rank).backward()
        opt.step()
        reference_grads(ref, step, world_size)
        ref_opt.step()
    assert_same_on_all_ranks(net)
    for bucket in opt.layout.buckets:
        lo, hi = opt.shard.pieces[bucket.id]
        assert torch.equal(opt.shard.flat[0][lo:hi], opt.shard.param_piece(bucket).to(torch.bfloat16))
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.float(), q, atol=3e-2, rtol=2e-2)


# ------------------------------------------------------------- checkpoints

CKPT_STEPS = 4


def _train(net: Net, opt: ZeroOptimizer, rank: int, world_size: int, steps: range) -> None:
    """Train on a fixed global batch of 12 per step, split evenly over the ranks."""
    per = 12 // world_size
    for step in steps:
        opt.zero_grad()
        tokens, targets = batch(step, 0, size=12)
        sl = slice(rank * per, (rank + 1) * per)
        out = net(tokens[sl], use_sometimes=step % 3 == 0, use_rank0=False)
        F.cross_entropy(out, targets[sl]).backward()
        opt.step()


def _make(world_size: int) -> tuple[Net, ZeroOptimizer]:
    net = make_net()
    opt = ZeroOptimizer(
        net.groups(lr=5e-3), optimizer_classes()["nadam"], bucket_mb=TINY_BUCKET_MB,
        grad_sync="reduce_scatter" if world_size == 3 else "all_reduce", lr=1e-2,
    )  # fmt: skip
    return net, opt


def ckpt_save_worker(rank: int, world_size: int, root: str) -> None:
    """Train, save (params + sharded optimizer) at CKPT_STEPS, continue, record the result."""
    net, opt = _make(world_size)
    _train(net, opt, rank, world_size, range(CKPT_STEPS))
    _save(net, opt, rank, Path(root) / "a")
    _train(net, opt, rank, world_size, range(CKPT_STEPS, 2 * CKPT_STEPS))
    if rank == 0:
        torch.save(flat_params(net), Path(root) / "a_final.pt")


def _save(net: Net, opt: ZeroOptimizer, rank: int, directory: Path) -> None:
    opt.save_checkpoint(str(directory))
    if rank == 0:
        torch.save(net.state_dict(), directory / "model.pt")
    dist.barrier()


def _load(world_size: int, directory: Path) -> tuple[Net, ZeroOptimizer]:
    net, opt = _make(world_size)
    net.load_state_dict(torch.load(directory / "model.pt"))
    opt.load_checkpoint(str(directory))
    return net, opt


def ckpt_reshard_worker(rank: int, world_size: int, root: str) -> None:
    """Load a checkpoint saved at another world size; the trajectory continues unchanged."""
    root_path = Path(root)
    net, opt = _load(world_size, root_path / "a")
    assert opt.skipped_steps == 0 and max(opt.shard.steps) == CKPT_STEPS
    _train(net, opt, rank, world_size, range(CKPT_STEPS, 2 * CKPT_STEPS))
    expected = torch.load(root_path / "a_final.pt")
    # Different world sizes average the same global batch in a different order.
    torch.testing.assert_close(flat_params(net), expected, rtol=1e-5, atol=1e-6)
    _save(net, opt, rank, root_path / "b")
    _train(net, opt, rank, world_size, range(2 * CKPT_STEPS, 3 * CKPT_STEPS))
    if rank == 0:
        torch.save(flat_params(net), root_path / "b_final.pt")


def ckpt_corrupt_worker(rank: int, world_size: int, root: str) -> None:
    """Corrupted, torn and incomplete checkpoints fail loudly on every rank, changing nothing."""
    root_path = Path(root)
    bad = root_path / "bad"
    if rank == 0:
        shutil.copytree(root_path / "b", bad)
        shard = sorted(bad.glob("shard-*.pt"))[-1]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    net, opt = _make(world_size)
    net.load_state_dict(torch.load(root_path / "b" / "model.pt"))
    before = opt.consolidated_state_dict()
    try:
        opt.load_checkpoint(str(bad))
    except CheckpointError as e:
        assert "SHA-256" in str(e) or "corrupted" in str(e), e
    else:
        raise AssertionError("a corrupted shard was loaded")
    assert_state_close(opt.consolidated_state_dict(), before, exact=True)
    dist.barrier()
    if rank == 0:
        shard = sorted(bad.glob("shard-*.pt"))[0]
        shard.write_bytes(shard.read_bytes()[:100])  # torn
    dist.barrier()
    try:
        opt.load_checkpoint(str(bad))
    except CheckpointError as e:
        assert "torn" in str(e), e
    else:
        raise AssertionError("a torn shard was loaded")
    dist.barrier()
    if rank == 0:
        os.remove(bad / "manifest.json")
    dist.barrier()
    try:
        opt.load_checkpoint(str(bad))
    except CheckpointError as e:
        assert "did not finish" in str(e), e
    else:
        raise AssertionError("a checkpoint without manifest was loaded")
    # The intact checkpoint (saved at a different world size) continues the trajectory.
    net, opt = _load(world_size, root_path / "b")
    manifest = json.loads((root_path / "b" / "manifest.json").read_text())
    assert manifest["world_size"] != world_size
    _train(net, opt, rank, world_size, range(2 * CKPT_STEPS, 3 * CKPT_STEPS))
    expected = torch.load(root_path / "b_final.pt")
    torch.testing.assert_close(flat_params(net), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- GPU


def nccl_worker(rank: int, world_size: int) -> None:
    """NCCL on CUDA: both sync modes match torch.optim on the averaged gradient."""
    device = torch.device("cuda", rank)
    for algo, grad_sync in (("adamax", "reduce_scatter"), ("nadam", "all_reduce")):
        net, ref = make_net().to(device), make_net().to(device)
        opt = ZeroOptimizer(
            net.groups(lr=5e-3), optimizer_classes()[algo], grad_sync=grad_sync,
            bucket_mb=TINY_BUCKET_MB, lr=1e-2,
        )  # fmt: skip
        assert opt.comm.backend == "nccl"
        ref_opt = TORCH_CLASSES[algo](ref.groups(lr=5e-3), lr=1e-2, foreach=False)
        for step in range(20):
            opt.zero_grad()
            loss_of(net, step * 10, rank).backward()
            opt.step()
            reference_grads(ref, step, world_size)
            ref_opt.step()
        torch.cuda.synchronize()
        assert_same_on_all_ranks(net)
        assert_params_close(net, ref, exact=False, rtol=1e-5)


# --------------------------------------------------------- timings, memory


def timings_worker(rank: int, world_size: int) -> None:
    """``last_step_timings``: every key, non-negative, within step()'s wall time, comm > 0."""
    for grad_sync, overlap in (("all_reduce", True), ("reduce_scatter", False)):
        net = make_net()
        opt = ZeroOptimizer(
            net.parameters(), optimizer_classes()["adamax"], grad_sync=grad_sync,
            overlap=overlap, bucket_mb=TINY_BUCKET_MB, lr=1e-2,
        )  # fmt: skip
        assert opt.last_step_timings == {}
        for step in range(3):
            opt.zero_grad()
            loss_of(net, step, rank).backward()
            t0 = time.perf_counter()
            opt.step()
            wall = time.perf_counter() - t0
            t = opt.last_step_timings
            assert set(t) == {"communication", "optimizer", "step"}, t
            assert all(v >= 0.0 for v in t.values()), t
            assert math.isclose(t["communication"] + t["optimizer"], t["step"], abs_tol=1e-9)
            assert t["step"] <= wall, (t, wall)
            assert t["communication"] > 0.0, t


def grad_memory_worker(rank: int, world_size: int) -> None:
    """ZeRO-2: reduce-scatter keeps only the reduced 1/N slice of the gradient between steps.

    Same bits as all-reduce (two-rank sums have one order), with accumulation,
    ``zero_grad(set_to_none=False)``, an unused parameter, overlap on and off,
    and torch's own reduce-scatter on gloo (the call NCCL makes) beside the
    in-place all-reduce that gloo runs by default.
    """
    nadam = optimizer_classes()["nadam"]
    modes = ("all_reduce", "rs_overlap", "rs_no_overlap", "rs_native")
    nets = {mode: make_net() for mode in modes}
    opts = {
        mode: ZeroOptimizer(
            net.groups(lr=5e-3),
            nadam,
            bucket_mb=TINY_BUCKET_MB,
            lr=1e-2,
            grad_sync="all_reduce" if mode == "all_reduce" else "reduce_scatter",
            overlap=mode != "rs_no_overlap",
        )
        for mode, net in nets.items()
    }
    opts["rs_native"].comm.gloo_reduce_scatter_in_place = False
    layout = opts["all_reduce"].layout
    elem = 4
    trainable = sum(p.numel() for p in nets["all_reduce"].parameters() if p.requires_grad)
    full = elem * sum(buf.numel for buf in layout.buffers)  # flat grad buffer incl. padding
    shard = elem * sum(buf.shard_numel for buf in layout.buffers)
    assert shard <= elem * (math.ceil(trainable / world_size) + 32 * len(layout.buckets))
    assert opts["all_reduce"].grad_bytes() == full
    assert opts["rs_overlap"].grad_bytes() == shard, "nothing but the slice before backward"

    for step in range(6):
        for mode, opt in opts.items():
            net = nets[mode]
            opt.zero_grad(set_to_none=step % 2 == 0)
            with opt.no_sync():
                loss_of(net, step * 10, rank).backward()
            loss_of(net, step * 10 + 1, rank).backward()
            # Backward's end waits for every bucket: ZeRO-2 has freed them all.
            assert opt.grad_bytes() == (full if mode == "all_reduce" else shard), mode
            if mode != "all_reduce":
                assert all(p.grad is None for p in net.parameters()), mode
            opt.step()
            after = opt.grad_bytes()
            assert after == (full if mode == "all_reduce" else shard), (mode, after)
            assert all(p.grad is None for p in net.parameters())
        for mode in modes[1:]:
            assert_params_close(nets[mode], nets["all_reduce"], exact=True)
    for mode, opt in opts.items():
        opt.zero_grad()
        assert opt.grad_bytes() == (full if mode == "all_reduce" else shard)
    assert_same_on_all_ranks(nets["rs_native"])

    # Buckets whose reduction has completed are freed by later gradient hooks, during
    # backward: a pause before the first layer's gradients lets the others finish.
    # (gloo's own reduce-scatter reports completion only once waited for, so this is
    # the in-place path; on NCCL the GPU check covers it.)
    def mlp() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])

    layer_mb = (32 * 32 + 32) * 4 / 2**20  # one layer per bucket
    mlps = {mode: mlp() for mode in ("all_reduce", "reduce_scatter")}
    mlp_opts = {
        mode: ZeroOptimizer(net.parameters(), nadam, bucket_mb=layer_mb, grad_sync=mode, lr=1e-2)
        for mode, net in mlps.items()
    }
    rs = mlp_opts["reduce_scatter"]
    full = 4 * sum(buf.numel for buf in rs.layout.buffers)
    shard = 4 * sum(buf.shard_numel for buf in rs.layout.buffers)
    assert len(rs.layout.buckets) == 4
    during: list[tuple[int, bool]] = []  # (bytes held, last layer's .grad is None) mid-backward
    last_layer = mlps["reduce_scatter"][3].weight
    mlps["reduce_scatter"][0].weight.register_post_accumulate_grad_hook(
        lambda _: during.append((rs.grad_bytes(), last_layer.grad is None))
    )
    for step in range(3):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(10 * step + rank))
        for mode, net in mlps.items():
            h = net[0](x)
            h.register_hook(lambda g: time.sleep(0.3))
            net[1:](h).square().mean().backward()
            mlp_opts[mode].step()
            mlp_opts[mode].zero_grad()
        held, freed_grad_is_none = during[-1]
        assert held < full + shard, "no bucket was freed during backward"
        assert freed_grad_is_none, "a freed bucket's .grad must be None"
        assert_params_close(mlps["reduce_scatter"], mlps["all_reduce"], exact=True)
