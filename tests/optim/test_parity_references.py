"""The docstring claims about other libraries, checked against their formulas.

Neither Keras nor optax is installed (nor should be): their Nadam updates are
written out here by hand, in float64 python, from their sources
(keras/src/optimizers/nadam.py in Keras 3; optax's scale_by_adam with
nesterov=True, which optax.nadam is), and compared with optim.Nadam.
"""

from __future__ import annotations

import math

import torch

from zerotrain import optim

STEPS = 50


def _gradients(n: int) -> list[list[float]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, n, generator=gen, dtype=torch.float64).tolist()


def _run_ours(x0: list[float], grads: list[list[float]], **options) -> list[float]:
    # Under a float64 default dtype, torch (and we) keep mu_product in float64 too.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        param = torch.nn.Parameter(torch.tensor(x0))
        opt = optim.Nadam([param], **options)
        for g in grads:
            param.grad = torch.tensor(g)
            opt.step()
        assert opt.state[param]["mu_product"].dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)
    return param.detach().tolist()


def _keras3_nadam(x0, grads, *, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """keras.optimizers.Nadam (Keras 3), update_step and _backend_update_step."""
    x, m, v = list(x0), [0.0] * len(x0), [0.0] * len(x0)
    u_product = 1.0
    for iterations, grad in enumerate(grads):
        local_step, next_step = iterations + 1, iterations + 2
        # _backend_update_step: the running product includes the current step.
        u_product = u_product * beta_1 * (1.0 - 0.5 * 0.96**local_step)
        u_t = beta_1 * (1.0 - 0.5 * 0.96**local_step)
        u_t_1 = beta_1 * (1.0 - 0.5 * 0.96**next_step)
        u_product_t_1 = u_product * u_t_1
        beta_2_power = beta_2**local_step
        for i, g in enumerate(grad):
            m[i] += (g - m[i]) * (1 - beta_1)
            v[i] += (g * g - v[i]) * (1 - beta_2)
            m_hat = u_t_1 * m[i] / (1 - u_product_t_1) + (1 - u_t) * g / (1 - u_product)
            v_hat = v[i] / (1 - beta_2_power)
            x[i] -= (m_hat * learning_rate) / (math.sqrt(v_hat) + epsilon)
    return x


def _optax_nadam(x0, grads, *, learning_rate, b1=0.9, b2=0.999, eps=1e-8):
    """optax.nadam: scale_by_adam(nesterov=True) then scale by -learning_rate."""
    x, mu, nu = list(x0), [0.0] * len(x0), [0.0] * len(x0)
    for count, grad in enumerate(grads):
        count_inc = count + 1
        for i, g in enumerate(grad):
            mu[i] = (1 - b1) * g + b1 * mu[i]
            nu[i] = (1 - b2) * g * g + b2 * nu[i]
            mu_hat = b1 * mu[i] / (1 - b1 ** (count_inc + 1)) + (1 - b1) * g / (1 - b1**count_inc)
            nu_hat = nu[i] / (1 - b2**count_inc)
            x[i] -= learning_rate * mu_hat / (math.sqrt(nu_hat) + eps)
    return x


def _assert_close(ours: list[float], reference: list[float], rtol: float) -> None:
    a, b = torch.tensor(ours), torch.tensor(reference)
    error = ((a - b).abs().max() / b.abs().max()).item()
    assert error <= rtol, f"relative error {error:.3g}"


def test_momentum_decay_1_reproduces_keras3_nadam() -> None:
    x0 = torch.linspace(-1, 1, 9, dtype=torch.float64).tolist()
    grads = _gradients(len(x0))
    ours = _run_ours(x0, grads, lr=1e-3, eps=1e-7, momentum_decay=1.0)
    _assert_close(ours, _keras3_nadam(x0, grads), rtol=1e-13)
    # And torch's default schedule is a different optimizer: the check has teeth.
    default = _run_ours(x0, grads, lr=1e-3, eps=1e-7)
    assert max(abs(a - b) for a, b in zip(default, _keras3_nadam(x0, grads))) > 1e-4


def test_large_momentum_decay_reproduces_optax_nadam() -> None:
    x0 = torch.linspace(-1, 1, 9, dtype=torch.float64).tolist()
    grads = _gradients(len(x0))
    ours = _run_ours(x0, grads, lr=1e-2, momentum_decay=1e4)
    _assert_close(ours, _optax_nadam(x0, grads, learning_rate=1e-2), rtol=1e-13)
    default = _run_ours(x0, grads, lr=1e-2)
    assert (
        max(abs(a - b) for a, b in zip(default, _optax_nadam(x0, grads, learning_rate=1e-2))) > 1e-4
    )
