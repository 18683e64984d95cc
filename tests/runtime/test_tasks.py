"""Built-in tasks: real data, deterministic builds, and the loss falls under optim.Nadam."""

from __future__ import annotations

import pytest
import torch

from zerotrain.service.errors import SpecError
from zerotrain.service.tasks import get_task, list_tasks, register_task

SMALL_ARGS = {
    "digits": {},
    "charlm": {"max_chars": 50_000, "context": 32, "d_model": 32, "n_layers": 1, "n_heads": 2},
    "regression": {"num_samples": 512, "hidden": 32},
}


def _train(task, steps: int, batch: int = 64) -> list[float]:
    from zerotrain.optim import Nadam

    torch.manual_seed(0)
    opt = Nadam(task.model.parameters(), lr=3e-3)
    losses = []
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = task.train.batch(torch.randint(len(task.train), (batch,), generator=g))
        loss = task.loss(task.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(SMALL_ARGS))
def test_loss_falls(name):
    task = get_task(name).build(SMALL_ARGS[name], seed=0)
    before = task.evaluate(task.model)
    losses = _train(task, steps=40)
    after = task.evaluate(task.model)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    key = next(k for k in after if k.startswith("eval_"))
    assert after[key] < before[key]
    if name == "digits":
        assert task.kind == "classification"
        assert after["accuracy"] > 0.7  # 40 small steps on real digits


def test_builds_are_deterministic_per_seed():
    a = get_task("regression").build(SMALL_ARGS["regression"], seed=3)
    b = get_task("regression").build(SMALL_ARGS["regression"], seed=3)
    c = get_task("regression").build(SMALL_ARGS["regression"], seed=4)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.model.parameters()), next(c.model.parameters()))
    assert torch.equal(a.train.inputs, c.train.inputs)  # data does not depend on the job seed


def test_digits_is_real_data():
    task = get_task("digits").build({}, seed=0)
    assert len(task.train) + task.info["test_samples"] == 1797
    assert task.train.inputs.shape[1] == 64
    assert task.train.inputs.min() >= 0.0 and task.train.inputs.max() <= 1.0


def test_charlm_windows_are_shifted_corpus():
    task = get_task("charlm").build(SMALL_ARGS["charlm"], seed=0)
    x, y = task.train.batch(torch.tensor([0, 100]))
    assert x.shape == y.shape == (2, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert bytes(x[0].tolist()).isascii()


def test_task_args_errors_and_registry():
    assert {"digits", "charlm", "regression"} <= set(list_tasks())
    with pytest.raises(SpecError) as info:
        get_task("charlm").build({"d_model": 30, "n_heads": 4}, seed=0)
    assert info.value.errors == ["task_args.n_heads: must divide task_args.d_model (30), got 4"]
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(PermissionError, match="custom task"):
        get_task("zerotrain.service.tasks.digits:build")
    custom = get_task("zerotrain.service.tasks.digits:build", allow_custom=True)
    assert custom.build({"hidden": 8, "depth": 1, "test_fraction": 0.2}, seed=0).kind == (
        "classification"
    )
    with pytest.raises(ValueError, match="already registered"):
        register_task("digits", builder="zerotrain.service.tasks.digits:build")
