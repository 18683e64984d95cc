"""The global sample stream: deterministic, epoch-complete, independent of the world size."""

from __future__ import annotations

import torch

from zerotrain.service.runtime.data import SampleStream


def test_stream_is_deterministic_and_covers_each_epoch():
    a, b = SampleStream(10, seed=3), SampleStream(10, seed=3)
    first = a.indices(0, 25)
    assert torch.equal(first, b.indices(0, 25))
    assert sorted(first[:10].tolist()) == list(range(10))
    assert sorted(first[10:20].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:20])  # a new permutation per epoch
    assert not torch.equal(first, SampleStream(10, seed=4).indices(0, 25))


def test_random_access_equals_sequential_reads():
    stream = SampleStream(7, seed=0)
    whole = stream.indices(0, 40)
    fresh = SampleStream(7, seed=0)
    assert torch.equal(fresh.indices(33, 7), whole[33:40])  # jump, crossing an epoch
    assert torch.equal(fresh.indices(5, 4), whole[5:9])  # and back


def test_a_step_reads_the_same_samples_on_any_world_size():
    """2 workers x batch 4 x 2 micro-batches read exactly what 1 worker x batch 8 reads."""
    stream = SampleStream(100, seed=1)
    position = 48

    def step_samples(world: int, batch: int, accum: int) -> list[int]:
        out = []
        for micro in range(accum):
            for rank in range(world):
                start = stream.micro_batch_start(
                    position, micro=micro, rank=rank, world_size=world, batch_size=batch
                )
                out += stream.indices(start, batch).tolist()
        return out

    assert step_samples(2, 4, 2) == step_samples(1, 16, 1) == stream.indices(48, 16).tolist()
