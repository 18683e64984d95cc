"""optim.functional: flat-buffer steps against torch.optim per tensor; compiled against eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from optim import functional
from optim.functional import adamax_step, nadam_step

SHAPES = [(17, 5), (301, 500), (33,), (4, 3, 2), (1,)]  # odd sizes; > 2 eager chunks in all


def _flat_and_views(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(sum(torch.Size(s).numel() for s in SHAPES), generator=gen, dtype=dtype)
    return flat, [
        t.view(s) for t, s in zip(flat.split([torch.Size(s).numel() for s in SHAPES]), SHAPES)
    ]


ADAMAX_OPTIONS = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
NADAM_OPTIONS = {**ADAMAX_OPTIONS, "momentum_decay": 4e-3, "decoupled_weight_decay": False}


def _kwargs(options: dict, maximize: bool) -> dict:
    kwargs = {k: v for k, v in options.items() if k != "betas"}
    return {
        **kwargs,
        "beta1": options["betas"][0],
        "beta2": options["betas"][1],
        "maximize": maximize,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("algorithm", ["adamax", "nadam"])
def test_flat_buffer_equals_torch_per_tensor(algorithm: str, maximize: bool, dtype) -> None:
    # One call on a flat buffer holding four parameters == torch.optim on each parameter.
    flat_param, _ = _flat_and_views(dtype, seed=0)
    params = [torch.nn.Parameter(v.clone()) for v in _flat_and_views(dtype, seed=0)[1]]
    m, u = torch.zeros_like(flat_param), torch.zeros_like(flat_param)
    mu_product = torch.tensor(1.0)
    if algorithm == "adamax":
        reference = torch.optim.Adamax(params, maximize=maximize, **ADAMAX_OPTIONS)
    else:
        reference = torch.optim.NAdam(params, maximize=maximize, **NADAM_OPTIONS)

    for step in range(1, 21):
        flat_grad, grads = _flat_and_views(dtype, seed=step)
        grad_before = flat_grad.clone()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        reference.step()
        if algorithm == "adamax":
            adamax_step(flat_param, flat_grad, m, u, step=step, **_kwargs(ADAMAX_OPTIONS, maximize))
        else:
            nadam_step(
                flat_param,
                flat_grad,
                m,
                u,
                mu_product,
                step=step,
                **_kwargs(NADAM_OPTIONS, maximize),
            )
        assert torch.equal(flat_grad, grad_before), "grad must not be modified"

    assert torch.equal(flat_param, torch.cat([p.detach().flatten() for p in params]))
    second = "exp_inf" if algorithm == "adamax" else "exp_avg_sq"
    assert torch.equal(m, torch.cat([reference.state[p]["exp_avg"].flatten() for p in params]))
    assert torch.equal(u, torch.cat([reference.state[p][second].flatten() for p in params]))
    if algorithm == "nadam":
        assert torch.equal(mu_product, reference.state[params[0]]["mu_product"])


def _run(
    algorithm: str, compile: bool, steps: int, lrs: list[float], **options
) -> list[torch.Tensor]:
    n = 4099  # a tail after the vectorised body
    gen = torch.Generator().manual_seed(0)
    p, m, u = torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)
    mu_product = torch.tensor(1.0)
    for step in range(1, steps + 1):
        g = torch.randn(n, generator=gen)
        common = {"step": step, "lr": lrs[step - 1], "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
        if algorithm == "adamax":
            adamax_step(p, g, m, u, **common, **options, compile=compile)
        else:
            nadam_step(p, g, m, u, mu_product, **common, **options, compile=compile)
    return [p, m, u, mu_product]


@pytest.mark.slow
def test_compiled_adamax_is_bitwise_eager_and_never_recompiles() -> None:
    if not functional.compile_available():
        pytest.skip("torch.compile is unavailable here")
    options = {"weight_decay": 0.1, "maximize": True}
    lrs = [0.01 * 0.9**i for i in range(6)]  # a schedule: lr changes every step
    _run("adamax", True, 1, lrs, **options)  # compile once
    graphs = counters["stats"]["unique_graphs"]
    compiled = _run("adamax", True, 6, lrs, **options)
    assert counters["stats"]["unique_graphs"] == graphs, "stepping recompiled the kernel"
    eager = _run("adamax", False, 6, lrs, **options)
    for c, e in zip(compiled, eager):
        assert torch.equal(c, e)


@pytest.mark.slow
def test_compiled_nadam_matches_eager() -> None:
    if not functional.compile_available():
        pytest.skip("torch.compile is unavailable here")
    options = {
        "weight_decay": 0.1,
        "momentum_decay": 4e-3,
        "decoupled_weight_decay": True,
        "maximize": False,
    }
    lrs = [0.01 * 0.9**i for i in range(6)]
    _run("nadam", True, 1, lrs, **options)
    graphs = counters["stats"]["unique_graphs"]
    compiled = _run("nadam", True, 6, lrs, **options)
    assert counters["stats"]["unique_graphs"] == graphs, "stepping recompiled the kernel"
    eager = _run("nadam", False, 6, lrs, **options)
    p_c, m_c, v_c, mu_c = compiled
    p_e, m_e, v_e, mu_e = eager
    # Moments and mu_product: the same bits. The parameter: eager CPU sqrt is a
    # vectorised approximation (within 1 ulp), the compiled sqrt rounds correctly.
    assert torch.equal(m_c, m_e) and torch.equal(v_c, v_e) and torch.equal(mu_c, mu_e)
    diff = (p_c - p_e).abs()
    assert diff.max() <= 2 * torch.finfo(torch.float32).eps * p_e.abs().max()
    assert (diff > 0).float().mean() < 0.01


def test_compile_falls_back_to_eager_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(functional, "_compile_probe", lambda: False)
    lrs = [0.01] * 3
    options = {"weight_decay": 0.0, "momentum_decay": 4e-3, "decoupled_weight_decay": False}
    fallback = _run("nadam", True, 3, lrs, maximize=False, **options)
    eager = _run("nadam", False, 3, lrs, maximize=False, **options)
    for a, b in zip(fallback, eager):
        assert torch.equal(a, b)


def test_bad_buffers_are_rejected_naming_the_argument() -> None:
    p, g = torch.zeros(4), torch.zeros(4)
    common = {"step": 1, "lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    with pytest.raises(
        ValueError, match=r"adamax_step: exp_inf must have the shape of param \(4,\), got \(3,\)"
    ):
        adamax_step(p, g, torch.zeros(4), torch.zeros(3), maximize=False, **common)
    with pytest.raises(ValueError, match="nadam_step: grad must have the dtype of param"):
        nadam_step(
            p, g.double(), torch.zeros(4), torch.zeros(4), torch.tensor(1.0),
            momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False, **common,
        )  # fmt: skip
    with pytest.raises(ValueError, match="nadam_step: mu_product must be a 0-dim tensor"):
        nadam_step(
            p, g, torch.zeros(4), torch.zeros(4), torch.ones(1),
            momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False, **common,
        )  # fmt: skip


def test_one_element_tensor_lr_matches_float_lr_arithmetic() -> None:
    # A param group's lr may be a 1-element tensor: same result as torch, which squeezes it.
    for algorithm, torch_cls in (("adamax", torch.optim.Adamax), ("nadam", torch.optim.NAdam)):
        lr = torch.tensor([0.01])
        param = torch.nn.Parameter(torch.randn(10))
        p, m, u = param.detach().clone(), torch.zeros(10), torch.zeros(10)
        mu_product = torch.tensor(1.0)
        reference = torch_cls([param], lr=lr, foreach=False)
        for step in range(1, 4):
            g = torch.randn(10)
            param.grad = g.clone()
            reference.step()
            common = {"step": step, "lr": lr, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
            if algorithm == "adamax":
                adamax_step(p, g, m, u, weight_decay=0.0, maximize=False, **common)
            else:
                nadam_step(
                    p, g, m, u, mu_product, weight_decay=0.0, momentum_decay=4e-3,
                    decoupled_weight_decay=False, maximize=False, **common,
                )  # fmt: skip
        assert torch.equal(p, param.detach()), algorithm
