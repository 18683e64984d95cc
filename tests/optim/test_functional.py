"""zerotrain.optim.functional: flat-buffer steps against torch.optim per tensor; compiled against eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from zerotrain.optim import _fused, functional
from zerotrain.optim.functional import adamax_step, nadam_step

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
def test_flat_buffer_equals_torch_per_tensor(
    algorithm: str, maximize: bool, dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One call on a flat buffer holding four parameters == torch.optim on each parameter,
    # with the flat buffer stepped in cache-sized pieces as a huge shard is.
    monkeypatch.setattr(functional, "_CHUNK_FROM", 2 * functional._EAGER_CHUNK)
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


# --- The fused kernel's contract, independent of the CPU it runs on ---------------
#
# The compiled kernel evaluates the documented expression with IEEE operations:
# +, -, *, / and sqrt correctly rounded to float32, and a fused multiply-add (one
# rounding) exactly where ATen's vectorised kernels use one (lerp, add with alpha,
# addcmul). The references below evaluate that expression in float64, rounding to
# float32 after every operation (for +, -, *, / and sqrt, float64 then float32
# gives the correctly rounded float32 result), so they do not depend on the CPU,
# its vector width or torch's kernel choice. Eager CPU kernels may differ from
# them: ATen's vectorised sqrt is an approximation within 1 ulp.


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _f32(a.double() + b.double())


def _mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _f32(a.double() * b.double())


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _f32(a.double() / b.double())


def _sqrt(a: torch.Tensor) -> torch.Tensor:
    return _f32(a.double().sqrt())


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` for float32 inputs, rounded once to float32.

    ``a * b`` is exact in float64; the float64 sum ``s`` and its error ``e``
    (TwoSum) hold ``a * b + c`` exactly, and ``e`` decides the one case where
    rounding ``s`` to float32 alone would be wrong: ``s`` exactly halfway
    between two float32 numbers.
    """
    product, addend = a.double() * b.double(), c.double().expand_as(a)
    s = product + addend
    bb = s - product
    e = (product - (s - bb)) + (addend - bb)
    rounded = _f32(s)
    lower = torch.where(rounded.double() <= s, rounded, torch.nextafter(rounded, -torch.inf * torch.ones_like(rounded)))
    upper = torch.nextafter(lower, torch.inf * torch.ones_like(lower))
    halfway = (s - lower.double()) == (upper.double() - s)
    return torch.where(halfway & (e != 0), torch.where(e > 0, upper, lower), rounded)


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    w = torch.tensor(weight, dtype=torch.float32)
    diff = _f32(end.double() - start.double())
    if abs(weight) < 0.5:
        return _fma(w.expand_as(diff), diff, start)
    return _fma(_f32(w.double() - 1).expand_as(diff), diff, end)


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _adamax_reference(p, g, m, u, *, step, lr, beta1, beta2, eps, weight_decay, maximize):
    """The fused Adamax step, one correctly rounded float32 operation at a time."""
    g = -g if maximize else g
    if weight_decay != 0:
        g = _fma(p, _scalar(weight_decay).expand_as(p), g)
    m = _lerp(m, g, 1 - beta1)
    u = torch.maximum(_mul(u, _scalar(beta2)), _add(g.abs(), _scalar(eps)))
    neg_clr = _scalar(-(lr / (1 - beta1**step)))
    return _add(p, _div(_mul(neg_clr, m), u)), m, u


def _nadam_reference(p, g, m, v, mu_product, *, step, lr, beta1, beta2, eps, weight_decay,
                     momentum_decay, decoupled_weight_decay, maximize):  # fmt: skip
    """The fused Nadam step, one correctly rounded float32 operation at a time."""
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product = mu_product * mu  # float32, as torch rounds its mu_product state
    product = mu_product.item()
    grad_coeff = _scalar(-lr * (1.0 - mu) / (1.0 - product))
    exp_avg_coeff = _scalar((-lr * mu_next) / (1.0 - product * mu_next))
    g = -g if maximize else g
    if weight_decay != 0 and decoupled_weight_decay:
        p = _mul(p, _scalar(1 - lr * weight_decay))
    elif weight_decay != 0:
        g = _fma(p, _scalar(weight_decay).expand_as(p), g)
    m = _lerp(m, g, 1 - beta1)
    v = _fma(_mul(_scalar(1 - beta2), g), g, _mul(v, _scalar(beta2)))
    denom = _add(_sqrt(_div(v, _scalar(1 - beta2**step))), _scalar(eps))
    p = _add(p, _div(_mul(grad_coeff, g), denom))
    p = _add(p, _div(_mul(exp_avg_coeff, m), denom))
    return p, m, v, mu_product


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many float32 numbers lie between ``a`` and ``b``, elementwise (0: equal)."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return (ordered(a) - ordered(b)).abs()


COMPILED_CASES = [
    ("adamax", {"weight_decay": 0.1, "maximize": True}),
    ("adamax", {"weight_decay": 0.0, "maximize": False}),
    ("nadam", {"weight_decay": 0.1, "momentum_decay": 4e-3, "decoupled_weight_decay": True,
               "maximize": False}),
    ("nadam", {"weight_decay": 0.1, "momentum_decay": 4e-3, "decoupled_weight_decay": False,
               "maximize": True}),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "options"), COMPILED_CASES)
def test_compiled_step_is_the_ieee_evaluation_and_never_recompiles(algorithm, options) -> None:
    # Per step and per element: the moments (and mu_product) are bitwise equal to the
    # correctly rounded evaluation, the parameter within 1 ulp of it. Large learning
    # rates make the update comparable to the parameter, so a wrong coefficient or a
    # missing fused multiply-add shows up as many ulps.
    if not functional.compile_available():
        pytest.skip("torch.compile is unavailable here")
    lrs = [0.3 * 0.8**i for i in range(6)]  # a schedule: lr changes every step
    n = 4099  # a tail after the vectorised body
    gen = torch.Generator().manual_seed(0)
    p, m, s = torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)
    mu_product = torch.tensor(1.0)
    common = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    graphs = None
    for step, lr in enumerate(lrs, start=1):
        g = torch.randn(n, generator=gen)
        if algorithm == "adamax":
            expected = _adamax_reference(p, g, m, s, step=step, lr=lr, **common, **options)
            adamax_step(p, g, m, s, step=step, lr=lr, **common, **options, compile=True)
            got = (p, m, s)
        else:
            expected = _nadam_reference(p, g, m, s, mu_product, step=step, lr=lr, **common,
                                        **options)  # fmt: skip
            nadam_step(p, g, m, s, mu_product, step=step, lr=lr, **common, **options,
                       compile=True)  # fmt: skip
            got = (p, m, s, mu_product)
        for name, mine, reference in zip(("param", "m", "u/v", "mu_product"), got, expected):
            apart = _ulps_apart(mine, reference)
            limit = 1 if name == "param" else 0
            worst = int(apart.max())
            assert worst <= limit, (
                f"step {step}: {name} is {worst} ulp from the correctly rounded evaluation "
                f"at {int((apart > limit).sum())} of {apart.numel()} elements (allowed: {limit})"
            )
        if graphs is None:  # compiled on the first step
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "stepping recompiled the kernel"


def test_compile_falls_back_to_eager_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "_probe", lambda: False)
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
