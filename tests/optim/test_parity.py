"""optim.Adamax / optim.Nadam against torch.optim.Adamax / torch.optim.NAdam.

Every configuration PyTorch's own optimizer suite runs for these optimizers
(torch/testing/_internal/common_optimizers.py), with foreach on and off, in
float32 and float64, over several param groups and 100 steps of a real model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import adamax as adamax_module
from torch.optim import nadam as nadam_module

from zerotrain import optim
from zerotrain.optim import _common

STEPS = 100
# max |ours - torch| / max |torch| per tensor; the bounds.
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


@dataclass(frozen=True)
class Case:
    name: str
    ours: type[torch.optim.Optimizer]
    theirs: type[torch.optim.Optimizer]
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


ADAMAX, NADAM = (optim.Adamax, torch.optim.Adamax), (optim.Nadam, torch.optim.NAdam)

CASES = [
    Case("adamax-default", *ADAMAX),
    Case("adamax-lr0.1", *ADAMAX, {"lr": 0.1}),
    Case("adamax-wd0.1", *ADAMAX, {"weight_decay": 0.1}),
    Case("adamax-maximize", *ADAMAX, {"maximize": True}),
    Case("adamax-wd0.1-maximize", *ADAMAX, {"weight_decay": 0.1, "maximize": True}),
    Case("nadam-default", *NADAM),
    Case("nadam-lr1e-3", *NADAM, {"lr": 1e-3}),
    Case("nadam-momentum_decay6e-3", *NADAM, {"momentum_decay": 6e-3}),
    Case("nadam-wd0.1", *NADAM, {"weight_decay": 0.1}),
    Case("nadam-wd0.1-momentum_decay6e-3", *NADAM, {"weight_decay": 0.1, "momentum_decay": 6e-3}),
    Case(
        "nadam-wd0.1-momentum_decay6e-3-decoupled",
        *NADAM,
        {"weight_decay": 0.1, "momentum_decay": 6e-3, "decoupled_weight_decay": True},
    ),
    Case("nadam-wd0.1-maximize", *NADAM, {"weight_decay": 0.1, "maximize": True}),
]


class SmallNet(nn.Module):
    """Embedding -> MLP with LayerNorm -> classifier, plus a parameter that never gets a grad."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 12)
        self.body = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.LayerNorm(24))
        self.head = nn.Linear(24, 5)
        self.unused = nn.Parameter(torch.randn(7))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens).mean(dim=1)))


def _param_groups(model: SmallNet, options: dict[str, Any]) -> list[dict[str, Any]]:
    # Two groups with different settings, and a param whose grad stays None.
    return [
        {"params": [*model.embed.parameters(), *model.body.parameters(), model.unused]},
        {"params": list(model.head.parameters()), "lr": options.get("lr", 2e-3) * 0.5},
    ]


def _train(model: SmallNet, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 32, (16, 6), generator=gen)
        labels = torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        opt.step()


def _make(case: Case, dtype: torch.dtype, foreach: bool) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = SmallNet().to(dtype)
    twin = copy.deepcopy(model)
    options = {**case.options, "foreach": foreach}
    ours = case.ours(_param_groups(model, options), **options)
    theirs = case.theirs(_param_groups(twin, options), **options)
    return model, ours, twin, theirs


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float, what: str) -> None:
    scale = theirs.abs().max().clamp_min(torch.finfo(theirs.dtype).tiny)
    error = ((ours - theirs).abs().max() / scale).item()
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol:g}"


def _assert_same_state(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, tol: float):
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd["param_groups"] == theirs_sd["param_groups"]
    assert ours_sd["state"].keys() == theirs_sd["state"].keys()
    for index, state in theirs_sd["state"].items():
        assert list(ours_sd["state"][index]) == list(state)
        for key, value in state.items():
            mine = ours_sd["state"][index][key]
            assert mine.dtype == value.dtype and mine.device == value.device, key
            _assert_close(mine, value, tol, f"state[{index}][{key}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch_over_100_steps(case: Case, foreach: bool, dtype: torch.dtype) -> None:
    model, ours, twin, theirs = _make(case, dtype, foreach)
    _train(model, ours, STEPS)
    _train(twin, theirs, STEPS)

    tol = TOLERANCE[dtype]
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        _assert_close(p, q, tol, name)
        # Same operations in the same order: on CPU the bits agree too.
        assert torch.equal(p, q), f"{name} is not bitwise equal to torch"
    assert model.unused.grad is None and model.unused not in ours.state
    _assert_same_state(ours, theirs, tol)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("pair", [ADAMAX, NADAM], ids=["adamax", "nadam"])
def test_tensor_lr_and_closure(pair: tuple[type, type], foreach: bool) -> None:
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    options = {"lr": torch.tensor([0.01]), "weight_decay": 0.1, "foreach": foreach}
    ours = pair[0](model.parameters(), **options)
    theirs = pair[1](twin.parameters(), **options)
    tokens, labels = torch.randint(0, 32, (8, 6)), torch.randint(0, 5, (8,))
    for _ in range(10):
        losses = []
        for net, opt in ((model, ours), (twin, theirs)):

            def closure(net: nn.Module = net, opt: torch.optim.Optimizer = opt) -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(tokens), labels)
                loss.backward()
                return loss

            losses.append(opt.step(closure))
        assert torch.equal(losses[0], losses[1])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_complex_parameters_match_torch() -> None:
    for ours_cls, theirs_cls in (ADAMAX, NADAM):
        for foreach in (False, True):
            torch.manual_seed(0)
            p = torch.randn(6, 3, dtype=torch.complex64, requires_grad=True)
            q = p.detach().clone().requires_grad_(True)
            ours = ours_cls([p], lr=0.05, weight_decay=0.1, foreach=foreach)
            theirs = theirs_cls([q], lr=0.05, weight_decay=0.1, foreach=foreach)
            for _ in range(5):
                for param, opt in ((p, ours), (q, theirs)):
                    opt.zero_grad()
                    (param.abs() ** 2).sum().backward()
                    opt.step()
            assert torch.equal(p, q), (ours_cls.__name__, foreach)


# --- validation: torch's messages, and a clear one for what we do not support ---

BAD_OPTIONS = [
    ({"lr": -1.0}, "Invalid learning rate: -1.0"),
    ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ({"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
    ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ({"weight_decay": -0.5}, "Invalid weight_decay value: -0.5"),
]


@pytest.mark.parametrize("pair", [ADAMAX, NADAM], ids=["adamax", "nadam"])
@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_invalid_options_raise_torchs_errors(pair: tuple[type, type], options, message) -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError) as theirs:
        pair[1](params, **options)
    with pytest.raises(ValueError) as ours:
        pair[0](params, **options)
    assert str(ours.value) == str(theirs.value) == message


def test_invalid_momentum_decay_raises_torchs_error() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"^Invalid momentum_decay value: -0.1$"):
        optim.Nadam(params, momentum_decay=-0.1)
    with pytest.raises(ValueError, match=r"^Invalid momentum_decay value: -0.1$"):
        torch.optim.NAdam(params, momentum_decay=-0.1)


@pytest.mark.parametrize("pair", [ADAMAX, NADAM], ids=["adamax", "nadam"])
def test_unsupported_options_name_the_option(pair: tuple[type, type]) -> None:
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        pair[0]([nn.Parameter(torch.zeros(3))], differentiable=True)
    opt = pair[0]([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "differentiable": True})

    # Sparse gradients: torch's own error, from both.
    for cls in pair:
        embed = nn.Embedding(10, 4, sparse=True)
        embed(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            cls(embed.parameters()).step()


@pytest.mark.parametrize("pair", [ADAMAX, NADAM], ids=["adamax", "nadam"])
def test_capturable_needs_an_accelerator_like_torch(pair: tuple[type, type]) -> None:
    for cls in pair:
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.ones(3)
        with pytest.raises(AssertionError, match="If capturable=True"):
            cls([p], capturable=True).step()


@pytest.mark.parametrize("pair", [ADAMAX, NADAM], ids=["adamax", "nadam"])
def test_capturable_arithmetic_matches_torch(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: allow "cpu" in both device checks and compare the tensor-step arithmetic.
    monkeypatch.setattr(_common, "capturable_supported_devices", lambda: ["cpu"])
    for module in (adamax_module, nadam_module):
        monkeypatch.setattr(module, "_get_capturable_supported_devices", lambda **_: ["cpu"])
    model, ours, twin, theirs = _make(
        Case("capturable", *pair, {"weight_decay": 0.1, "capturable": True}),
        torch.float64,
        foreach=False,
    )
    _train(model, ours, 20)
    _train(twin, theirs, 20)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(ours, theirs, 0.0)


# --- state dicts load both ways ---


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
@pytest.mark.parametrize("pair", [ADAMAX, NADAM], ids=["adamax", "nadam"])
def test_state_dict_round_trip(pair: tuple[type, type], direction: str) -> None:
    first_cls, second_cls = pair if direction == "ours->torch" else pair[::-1]
    options = {"weight_decay": 0.1, "foreach": False}
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)

    # Train 10 steps with one implementation, save, reload into the other, train 10 more.
    first = first_cls(_param_groups(model, options), **options)
    _train(model, first, 10, seed=1)
    saved = copy.deepcopy(first.state_dict())
    second = second_cls(_param_groups(model, options), **options)
    second.load_state_dict(saved)
    assert second.state_dict()["param_groups"] == saved["param_groups"]
    _train(model, second, 10, seed=2)

    # The same 20 steps with torch throughout.
    opt = pair[1](_param_groups(reference, options), **options)
    _train(reference, opt, 10, seed=1)
    _train(reference, opt, 10, seed=2)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(second, opt, 0.0)
