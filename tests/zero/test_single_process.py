"""ZeroOptimizer without a process group, the layout maths, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from zerotrain.optim import Adamax, Nadam, ZeroOptimizer
from zerotrain.optim.zero import CheckpointError
from zerotrain.optim.zero.layout import build_layout

from . import workers


@pytest.mark.parametrize(
    "cls,torch_cls,options",
    [
        (Adamax, torch.optim.Adamax, {"lr": 2e-2, "weight_decay": 0.1}),
        (Adamax, torch.optim.Adamax, {"lr": 1e-2, "maximize": True}),
        (Nadam, torch.optim.NAdam, {"lr": 1e-2, "momentum_decay": 6e-3}),
        (Nadam, torch.optim.NAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ],
)
def test_single_process_is_bitwise_torch(cls, torch_cls, options) -> None:
    net, ref = workers.make_net(), workers.make_net()
    opt = ZeroOptimizer(net.groups(lr=5e-3), cls, bucket_mb=workers.TINY_BUCKET_MB, **options)
    ref_opt = torch_cls(ref.groups(lr=5e-3), **options)
    assert opt.world_size == 1 and opt.state_bytes() > 0
    for step in range(30):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            # The closure form is supported as for any torch optimizer.
            o.step(lambda m=model, s=step: workers.loss_of(m, s, 0).backward())
    workers.assert_params_close(net, ref, exact=True)
    workers.assert_state_close(opt.consolidated_state_dict(), ref_opt.state_dict(), exact=True)
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


def test_parameters_are_views_of_flat_buffers() -> None:
    net = workers.make_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = ZeroOptimizer(net.parameters(), Nadam)
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]), name
        if p.requires_grad:
            assert any(
                p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
                for flat in opt.shard.flat
            ), name
    # The frozen parameter is not in any buffer and gets no state.
    assert not net.frozen.requires_grad
    assert net.frozen.untyped_storage().data_ptr() != opt.shard.flat[0].untyped_storage().data_ptr()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_layout_shards_are_balanced_and_cover_everything(world_size: int) -> None:
    sizes = [1, 1000, 37, 4096, 5, 333, 77]
    params = [torch.zeros(n, requires_grad=True) for n in sizes]
    bucket, align = 1024, 32
    layout = build_layout([params[:3], params[3:]], world_size=world_size, bucket_numel=bucket, align=align)
    total = sum(sizes)
    seen = torch.zeros(total, dtype=torch.int32)
    for rank in range(world_size):
        owned = sum(seg.numel for seg in layout.segments(rank))
        shard = layout.buffers[0].shard_numel
        assert shard <= math.ceil(total / world_size) + align * len(layout.buckets)
        assert owned <= shard
        for _, _, lo, hi in layout.logical_runs(rank):
            seen[lo:hi] += 1
    assert torch.all(seen == 1), "every element is owned by exactly one rank"
    for b in layout.buckets:
        assert (b.end - b.start) % (world_size * align) == 0
    if world_size > 1:  # a parameter larger than a piece straddles ranks
        owners = {
            r for r in range(world_size) for seg in layout.segments(r) if layout.slots[seg.slot].numel == 4096
        }
        assert len(owners) == world_size


def test_mixed_dtypes_get_one_flat_buffer_each() -> None:
    a = nn.Parameter(torch.randn(10))
    b = nn.Parameter(torch.randn(7, dtype=torch.float64))
    c = nn.Parameter(torch.randn(3))
    opt = ZeroOptimizer([a, b, c], Adamax, lr=0.1)
    assert {buf.dtype for buf in opt.layout.buffers} == {torch.float32, torch.float64}
    ref = [copy.deepcopy(t) for t in (a, b, c)]
    ref_opt = torch.optim.Adamax(ref, lr=0.1)
    for _ in range(3):
        for ps, o in (([a, b, c], opt), (ref, ref_opt)):
            o.zero_grad()
            sum((p.double() ** 2).sum() for p in ps).backward()
            o.step()
    for p, q in zip((a, b, c), ref, strict=True):
        assert torch.equal(p, q)


def test_no_sync_accumulates_like_torch() -> None:
    net, ref = workers.make_net(), workers.make_net()
    opt = ZeroOptimizer(net.parameters(), Nadam, lr=1e-2)
    ref_opt = torch.optim.NAdam(ref.parameters(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        with opt.no_sync():
            workers.loss_of(net, step * 10, 0).backward()
        workers.loss_of(net, step * 10 + 1, 0).backward()
        for m in range(2):
            workers.loss_of(ref, step * 10 + m, 0).backward()
        opt.step()
        ref_opt.step()
    workers.assert_params_close(net, ref, exact=True)


def test_backward_twice_without_step_is_an_error() -> None:
    # Every parameter gets a gradient, so the bucket is reduced during the first backward.
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = ZeroOptimizer(net.parameters(), Adamax, bucket_mb=2e-5)
    net(torch.randn(5, 4)).sum().backward()
    assert len(opt.layout.buckets) > 1
    assert opt.reducer.launched == len(opt.layout.buckets), "reductions start during backward"
    with pytest.raises(RuntimeError, match="no_sync"):
        net(torch.randn(5, 4)).sum().backward()


def test_overlap_off_launches_reductions_when_backward_ends() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = ZeroOptimizer(net.parameters(), Adamax, bucket_mb=2e-5, overlap=False)
    launched_during_backward = []
    net[0].weight.register_hook(lambda g: launched_during_backward.append(opt.reducer.launched))
    net(torch.randn(5, 4)).sum().backward()
    assert launched_during_backward == [0], "overlap=False launched a reduction mid-backward"
    assert opt.reducer.launched == len(opt.layout.buckets)
    opt.step()
    assert all(p.grad is None for p in net.parameters())


def test_bad_arguments_name_the_field() -> None:
    params = [nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError, match=r"optimizer_class must be optim\.Adamax or optim\.Nadam"):
        ZeroOptimizer(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="grad_sync must be one of"):
        ZeroOptimizer(params, Adamax, grad_sync="ring")
    with pytest.raises(ValueError, match="bucket_mb must be a number > 0"):
        ZeroOptimizer(params, Adamax, bucket_mb=0)
    with pytest.raises(ValueError, match="clip_grad_norm must be None or a number > 0"):
        ZeroOptimizer(params, Adamax, clip_grad_norm=-1.0)
    # Options are validated by the optimizer class itself, with torch's messages.
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        ZeroOptimizer(params, Nadam, lr=-1)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        ZeroOptimizer(params, Adamax, betas=(0.9, 1.5))
    opt = ZeroOptimizer(params, Adamax)
    with pytest.raises(NotImplementedError, match="param groups"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))]})


def test_consolidated_state_dict_validation() -> None:
    net = workers.make_net()
    opt = ZeroOptimizer(net.groups(), Nadam)
    with pytest.raises(ValueError, match="missing key 'state'"):
        opt.load_consolidated_state_dict({"param_groups": []})
    with pytest.raises(ValueError, match=r"param_groups: has 1 group\(s\), this optimizer has 2"):
        opt.load_consolidated_state_dict({"state": {}, "param_groups": [{"params": []}]})


def test_single_process_checkpoint_round_trip_and_errors(tmp_path) -> None:
    net = workers.make_net()
    opt = ZeroOptimizer(net.groups(lr=5e-3), Adamax, lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        workers.loss_of(net, step, 0).backward()
        opt.step()
    opt.save_checkpoint(str(tmp_path / "ck"))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "manifest.json",
        "shard-00000-of-00001.pt",
    ]
    other = ZeroOptimizer(workers.make_net().groups(lr=1.0), Adamax, lr=1.0)
    other.load_checkpoint(str(tmp_path / "ck"))
    assert other.param_groups[1]["lr"] == 5e-3 and other.param_groups[0]["lr"] == 1e-2
    workers.assert_state_close(other.consolidated_state_dict(), opt.consolidated_state_dict(), exact=True)
    with pytest.raises(CheckpointError, match="saved by a adamax optimizer"):
        ZeroOptimizer(workers.make_net().groups(), Nadam).load_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match="trainable parameter shapes"):
        ZeroOptimizer(nn.Linear(2, 2).parameters(), Adamax).load_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        other.load_checkpoint(str(tmp_path / "nothing"))
    (tmp_path / "ck" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest is corrupted"):
        other.load_checkpoint(str(tmp_path / "ck"))


def test_lr_scheduler_and_nonfinite_skip_single_process() -> None:
    net, ref = workers.make_net(), workers.make_net()
    opt = ZeroOptimizer(net.parameters(), Adamax, lr=0.1)
    ref_opt = torch.optim.Adamax(ref.parameters(), lr=0.1)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref_opt)]
    for step in range(4):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = workers.loss_of(model, step, 0)
            if step == 2 and o is opt:
                loss = loss * float("inf")
            loss.backward()
            if step != 2 or o is opt:
                o.step()
        for s in scheds:
            s.step()
    assert opt.skipped_steps == 1 and opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    workers.assert_params_close(net, ref, exact=True)
    stats = opt.stats()
    assert stats["skipped_steps"] == 1.0 and stats["step"] == 3.0 and stats["lr"] == 0.1 * 0.5**4


def test_step_timings_without_process_group() -> None:
    net = workers.make_net()
    opt = ZeroOptimizer(net.parameters(), Adamax, bucket_mb=workers.TINY_BUCKET_MB)
    assert opt.last_step_timings == {}
    workers.loss_of(net, 0, 0).backward()
    opt.step()
    t = opt.last_step_timings
    assert set(t) == {"communication", "optimizer", "step"}
    assert t["optimizer"] > 0.0 and 0.0 <= t["communication"] <= t["step"]
    assert math.isclose(t["communication"] + t["optimizer"], t["step"], abs_tol=1e-9)


@pytest.mark.parametrize("cls", [Adamax, Nadam])
def test_untracked_steps_update_identically_and_report_no_update(cls) -> None:
    torch.manual_seed(0)
    model = nn.Linear(7, 3)
    twin = copy.deepcopy(model)
    tracked = ZeroOptimizer(model.parameters(), optimizer_class=cls, lr=1e-2, track_update_stats=True)
    untracked = ZeroOptimizer(twin.parameters(), optimizer_class=cls, lr=1e-2)  # the default
    for _ in range(3):
        x = torch.randn(5, 7)
        for m, opt in ((model, tracked), (twin, untracked)):
            m(x).square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert tracked.stats()["update_norm"] > 0
    assert math.isnan(untracked.stats()["update_norm"]), "not measured must not read as 0"
    untracked.track_update_stats = True
    twin(torch.randn(5, 7)).square().sum().backward()
    untracked.step()
    assert untracked.stats()["update_norm"] > 0


def test_zeroed_gradients_are_gradients_like_torch() -> None:
    # zero_grad(set_to_none=False) after backward: torch keeps zero tensors, and what is
    # written into them is the gradient of the next step (the never-used parameter
    # still has none).
    net, ref = workers.make_net(), workers.make_net()
    opt = ZeroOptimizer(net.groups(lr=5e-3), Nadam, bucket_mb=workers.TINY_BUCKET_MB)
    ref_opt = torch.optim.NAdam(ref.groups(lr=5e-3))
    for step in range(4):
        for model, o in ((net, opt), (ref, ref_opt)):
            workers.loss_of(model, step, 0).backward()
            if step % 2 == 0:
                o.zero_grad(set_to_none=False)
        if step % 2 == 0:
            for p, q in zip(net.parameters(), ref.parameters(), strict=True):
                if q.grad is not None:
                    for t in (p, q):
                        t.grad.add_(torch.full_like(t, 0.01 * (step + 1)))
        opt.step()
        ref_opt.step()
        ref_opt.zero_grad()
    workers.assert_params_close(net, ref, exact=True)
    workers.assert_state_close(opt.consolidated_state_dict(), ref_opt.state_dict(), exact=True)
