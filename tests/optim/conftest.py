"""Shared fixtures for the optimizer tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    # The models here are tiny: one thread avoids OpenMP spin-waiting on a busy
    # machine (10-20x faster here) and the results do not depend on it.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
