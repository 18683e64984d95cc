"""``optim.Nadam``: a drop-in replacement for ``torch.optim.NAdam``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from optim import _common
from optim.functional import nadam_step, nadam_step_capturable

__all__ = ["Nadam"]


class Nadam(Optimizer):
    r"""Nadam: Adam with Nesterov momentum (Dozat 2016), with PyTorch's momentum schedule.

    For every parameter ``theta`` with gradient ``g_t`` at step ``t``, with
    momentum cache :math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{t\psi})`
    (:math:`\psi` = ``momentum_decay``):

    .. math::
        g_t &\leftarrow -g_t \ \text{if maximize} \\
        \theta &\leftarrow \theta (1 - \gamma\lambda) \ \text{if decoupled, else }
              g_t \leftarrow g_t + \lambda\theta \quad (\lambda \neq 0) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \hat m_t &= \frac{\mu_{t+1} m_t}{1 - \prod_{i=1}^{t+1} \mu_i}
                  + \frac{(1 - \mu_t) g_t}{1 - \prod_{i=1}^{t} \mu_i}, \qquad
        \hat v_t = \frac{v_t}{1 - \beta_2^t} \\
        \theta_t &= \theta_{t-1} - \gamma\, \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

    with ``m_0 = v_0 = 0``; the product of the mu's is kept as the
    ``mu_product`` state. ``decoupled_weight_decay=True`` gives NAdamW
    (Loshchilov & Hutter 2019). The arithmetic follows ``torch.optim.NAdam``
    operation by operation (see ``optim.functional.nadam_step``), so results are
    bitwise equal to torch's for the same ``foreach`` setting on CPU.

    Other libraries' Nadam are special cases of this one:

    * Keras 3 (``keras.optimizers.Nadam``) uses the schedule
      ``mu_t = beta1 * (1 - 0.5 * 0.96**t)`` with defaults ``learning_rate=1e-3,
      epsilon=1e-7``: ``Nadam(params, lr=1e-3, eps=1e-7, momentum_decay=1.0)``
      reproduces it.
    * optax's ``nadam`` uses a constant ``mu = beta1`` (no schedule); as
      ``momentum_decay`` grows, ``0.96**(t psi) -> 0`` and ``mu_t -> beta1``, so a
      very large ``momentum_decay`` (e.g. 1e4) reproduces optax's ``nadam``
      (with optax's ``eps`` outside the square root, as here).

    A drop-in replacement for ``torch.optim.NAdam``: the same constructor,
    defaults, validation messages, ``step(closure)`` and ``state_dict()`` layout
    (per parameter: ``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``), so
    state dicts load in either direction.

    Args:
        params: iterable of parameters, named parameters or param-group dicts.
        lr: learning rate, a float or a 1-element tensor (default: 2e-3).
        betas: coefficients for the running averages of the gradient and its
            square (default: (0.9, 0.999)).
        eps: added to the denominator (default: 1e-8).
        weight_decay: weight decay coefficient (default: 0).
        momentum_decay: ``psi`` in the momentum schedule (default: 4e-3).
        decoupled_weight_decay: decay the weights directly (AdamW style)
            instead of adding an L2 term to the gradient (default: False).
        foreach: use the multi-tensor path (``torch._foreach_*`` kernels);
            ``None`` picks it when every parameter is on CUDA, as torch does.
        maximize: maximize the objective instead of minimizing it.
        capturable: keep ``step`` and ``mu_product`` on the device so the step can
            be captured in a CUDA graph (parameters on CUDA/XPU). Uses torch's
            for-loop capturable arithmetic whatever ``foreach`` says.
        differentiable: not supported; ``True`` raises ``ValueError``.

    References: T. Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016
    workshop, https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ ; I. Loshchilov,
    F. Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
    https://arxiv.org/abs/1711.05101 .
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        _common.validate_hyperparameters(lr, betas, eps, weight_decay)
        if not momentum_decay >= 0.0:
            raise ValueError(f"Invalid momentum_decay value: {momentum_decay}")
        _common.reject_differentiable("Nadam", differentiable)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state:
                    _common.upgrade_scalar_state(p_state, "step", p, group["capturable"])
                    _common.upgrade_scalar_state(p_state, "mu_product", p, group["capturable"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; rejects ``differentiable=True`` like the constructor."""
        _common.reject_differentiable("Nadam", param_group.get("differentiable", False))
        super().add_param_group(param_group)

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        params, grads, exp_avgs, exp_avg_sqs, mu_products, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("NAdam does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                # step and mu_product live on the CPU unless capturable (torch's layout).
                state["step"] = _common.zero_step(p, group["capturable"])
                state["mu_product"] = _common.scalar_state(1.0, p, group["capturable"])
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            mu_products.append(state["mu_product"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, mu_products, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure: reevaluates the model and returns the loss (optional).
        """
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, mu_products, steps = self._init_group(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            options = {
                "lr": _common.to_scalar(group["lr"]),
                "beta1": beta1,
                "beta2": beta2,
                "eps": group["eps"],
                "weight_decay": group["weight_decay"],
                "momentum_decay": group["momentum_decay"],
                "decoupled_weight_decay": group["decoupled_weight_decay"],
                "maximize": group["maximize"],
            }
            tensors = zip(params, grads, exp_avgs, exp_avg_sqs, mu_products, steps)
            if group["capturable"]:
                _common.check_capturable_devices(params, mu_products, steps)
                for p, g, m, v, mu_product, step_t in tensors:
                    nadam_step_capturable(p, g, m, v, mu_product, step_t, **options)
            elif _common.use_foreach(group["foreach"], params):
                _foreach_nadam(params, grads, exp_avgs, exp_avg_sqs, mu_products, steps, **options)
            else:
                for p, g, m, v, mu_product, step_t in tensors:
                    step_t += 1
                    nadam_step(p, g, m, v, mu_product, step=step_t.item(), **options)
        return loss


def _foreach_nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """The multi-tensor Nadam step: one ``torch._foreach_*`` kernel per operation.

    Evaluated as torch's multi-tensor NAdam does, so it matches
    ``torch.optim.NAdam(foreach=True)`` bit for bit: the denominator is
    ``sqrt(v) / sqrt(1 - beta2**t) + eps`` here (one sqrt per tensor for the
    bias correction), ``sqrt(v / (1 - beta2**t)) + eps`` in the per-tensor path;
    the two agree to rounding.
    """
    lr_value = _common.host_value(lr)
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, mu_products, steps]  # type: ignore[list-item]
    )
    for tensor_lists, _ in grouped.values():
        g_params, g_grads, g_exp_avgs, g_exp_avg_sqs, g_mu_products, g_steps = cast(
            tuple[list[Tensor], ...], tensor_lists
        )
        _common.complex_as_real(g_params, g_grads, g_exp_avgs, g_exp_avg_sqs)
        if maximize:
            g_grads = list(torch._foreach_neg(g_grads))
        _common.increment_steps(g_steps)
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(g_params, 1 - lr * weight_decay)  # type: ignore[arg-type]
            elif maximize:  # g_grads is already a private copy
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
            else:
                g_grads = list(torch._foreach_add(g_grads, g_params, alpha=weight_decay))
        # Decay the first and second moment running averages.
        torch._foreach_lerp_(g_exp_avgs, g_grads, 1 - beta1)
        torch._foreach_mul_(g_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(g_exp_avg_sqs, g_grads, g_grads, 1 - beta2)
        denoms = torch._foreach_sqrt(g_exp_avg_sqs)

        step_values = [s.item() for s in g_steps]
        bias_correction_sqrt = [(1 - beta2**t) ** 0.5 for t in step_values]
        mus = [beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay))) for t in step_values]
        mu_nexts = [beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * momentum_decay))) for t in step_values]
        torch._foreach_mul_(g_mu_products, mus)
        torch._foreach_div_(denoms, bias_correction_sqrt)
        torch._foreach_add_(denoms, eps)

        products = [mp.item() for mp in g_mu_products]
        grad_sizes = [-(lr_value * (1.0 - mu) / (1.0 - mp)) for mp, mu in zip(products, mus)]
        exp_avg_sizes = [
            -(lr_value * mu_next / (1.0 - mp * mu_next)) for mp, mu_next in zip(products, mu_nexts)
        ]
        # The Nesterov step: the current gradient's share, then the momentum's.
        torch._foreach_addcdiv_(g_params, g_grads, denoms, grad_sizes)
        torch._foreach_addcdiv_(g_params, g_exp_avgs, denoms, exp_avg_sizes)
