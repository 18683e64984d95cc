"""ZeroOptimizer on CUDA: single device, and NCCL across devices. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from zerotrain.optim import Adamax, Nadam, ZeroOptimizer

from . import workers
from .harness import spawn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("cls,torch_cls", [(Adamax, torch.optim.Adamax), (Nadam, torch.optim.NAdam)])
def test_cuda_single_process_matches_torch(cls, torch_cls) -> None:
    net, ref = workers.make_net().cuda(), workers.make_net().cuda()
    opt = ZeroOptimizer(net.groups(lr=5e-3), cls, bucket_mb=workers.TINY_BUCKET_MB, lr=1e-2)
    ref_opt = torch_cls(ref.groups(lr=5e-3), lr=1e-2, foreach=False)
    assert opt.shard.flat[0].is_cuda and opt.shard.state[0][0].is_cuda
    for step in range(20):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            workers.loss_of(model, step, 0).backward()
            o.step()
    workers.assert_params_close(net, ref, exact=False, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_nccl_two_ranks_match_torch() -> None:
    spawn(workers.nccl_worker, 2, backend="nccl")
