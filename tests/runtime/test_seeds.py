"""Seeds and sizes derived from any spec the validator accepts never overflow.

``training.seed`` is allowed up to ``2**63 - 1``; the worker once seeded torch
with ``seed * 1_000_003 + rank`` and failed every attempt of such a job with
``Overflow when unpacking long long``.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotrain.service.errors import SpecError
from zerotrain.service.runtime.data import SampleStream
from zerotrain.service.seeds import (
    INIT_STREAM,
    SEED_MODULUS,
    derive_seed,
    epoch_seed,
    resume_seed,
    worker_seed,
)
from zerotrain.service.spec import JobSpec
from zerotrain.service.tasks.base import seeded_generator

INT64_MAX = 2**63 - 1


def _edges(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(low, high), st.sampled_from([low, low + 1, high - 1, high]))


SPECS = st.fixed_dictionaries(
    {
        "name": st.just("seeds"),
        "task": st.just("regression"),
        "scaling": st.fixed_dictionaries({"num_workers": _edges(1, 1024)}),
        "training": st.fixed_dictionaries(
            {
                "seed": _edges(0, INT64_MAX),
                "max_steps": _edges(1, 10_000_000),
                "batch_size": _edges(1, 65_536),
                "grad_accum_steps": _edges(1, 1024),
            }
        ),
    }
)


def _accepted(data: dict) -> JobSpec | None:
    try:
        return JobSpec.from_dict(data)
    except SpecError:
        return None


@settings(max_examples=200, deadline=None, database=None)
@given(data=SPECS)
def test_any_accepted_spec_derives_its_seeds_and_sizes(data: dict) -> None:
    spec = _accepted(data)
    if spec is None:
        return
    seed, training = spec.training.seed, spec.training
    world = spec.scaling.num_workers
    samples_per_step = training.batch_size * training.grad_accum_steps * world
    last_position = training.max_steps * samples_per_step
    assert last_position <= INT64_MAX  # checkpoints store it; torch may index with it
    torch.tensor([last_position], dtype=torch.int64)
    derived = [
        worker_seed(seed, 0),
        worker_seed(seed, world - 1),
        resume_seed(seed, world - 1, training.max_steps),
        epoch_seed(seed, last_position // 1),  # the largest epoch any dataset can reach
        derive_seed(seed, INIT_STREAM),
    ]
    for value in derived:
        assert 0 <= value < SEED_MODULUS
        torch.Generator().manual_seed(value)  # what torch.manual_seed does per device
    seeded_generator(seed, INIT_STREAM)  # what every task's model init uses
    stream = SampleStream(4096, seed)
    start = SampleStream.micro_batch_start(
        last_position - samples_per_step,
        micro=training.grad_accum_steps - 1,
        rank=world - 1,
        world_size=world,
        batch_size=training.batch_size,
    )
    assert len(stream.indices(start, training.batch_size)) == training.batch_size


def test_the_largest_seed_seeds_torch() -> None:
    """The exact failure of the issue: seed 2**63 - 1 on rank 1."""
    previous = torch.get_rng_state()
    try:
        torch.manual_seed(worker_seed(INT64_MAX, 1))
        torch.manual_seed(resume_seed(INT64_MAX, 1, 10_000_000))
    finally:
        torch.set_rng_state(previous)


def test_small_seeds_keep_their_historical_values() -> None:
    """Reducing modulo 2**63 - 1 changes nothing for the seeds runs actually use."""
    assert worker_seed(11, 1) == 11 * 1_000_003 + 1
    assert resume_seed(11, 1, 30) == 11 * 1_000_003 + 1 + 7919 * 30
    assert epoch_seed(3, 2) == 3 * 1_000_003 + 1_000 + 2
