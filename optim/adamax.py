"""``optim.Adamax``: a drop-in replacement for ``torch.optim.Adamax``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from optim import _common
from optim.functional import adamax_step, adamax_step_capturable

__all__ = ["Adamax"]


class Adamax(Optimizer):
    r"""Adamax, the infinity-norm variant of Adam (Kingma & Ba 2015, section 7.1).

    For every parameter ``theta`` with gradient ``g_t`` at step ``t``:

    .. math::
        g_t &\leftarrow -g_t \ \text{if maximize}; \quad
              g_t \leftarrow g_t + \lambda\,\theta_{t-1} \ \text{if } \lambda \neq 0 \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\, \frac{m_t}{u_t}

    with ``m_0 = u_0 = 0``. As in PyTorch, ``eps`` sits inside the max and ``u``
    is not bias corrected. The arithmetic follows ``torch.optim.Adamax``
    operation by operation (see ``optim.functional.adamax_step``), so results
    are bitwise equal to torch's for the same ``foreach`` setting on CPU.

    A drop-in replacement for ``torch.optim.Adamax``: the same constructor,
    defaults, validation messages, ``step(closure)`` and ``state_dict()``
    layout (per parameter: ``step``, ``exp_avg``, ``exp_inf``), so state dicts
    load in either direction.

    Args:
        params: iterable of parameters, named parameters or param-group dicts.
        lr: learning rate, a float or a 1-element tensor (default: 2e-3).
        betas: coefficients for the running average and the infinity norm
            (default: (0.9, 0.999)).
        eps: added to ``|g|`` inside the max (default: 1e-8).
        weight_decay: L2 penalty added to the gradient (default: 0).
        foreach: use the multi-tensor path (``torch._foreach_*`` kernels);
            ``None`` picks it when every parameter is on CUDA, as torch does.
        maximize: maximize the objective instead of minimizing it.
        differentiable: not supported; ``True`` raises ``ValueError``.
        capturable: keep the step count on the device so the step can be
            captured in a CUDA graph (parameters on CUDA/XPU). Uses torch's
            for-loop capturable arithmetic whatever ``foreach`` says.

    Reference: D. P. Kingma, J. Ba, "Adam: A Method for Stochastic
    Optimization", ICLR 2015, https://arxiv.org/abs/1412.6980 (section 7.1).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        _common.validate_hyperparameters(lr, betas, eps, weight_decay)
        _common.reject_differentiable("Adamax", differentiable)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state:
                    _common.upgrade_scalar_state(p_state, "step", p, group["capturable"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; rejects ``differentiable=True`` like the constructor."""
        _common.reject_differentiable("Adamax", param_group.get("differentiable", False))
        super().add_param_group(param_group)

    def _init_group(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        params, grads, exp_avgs, exp_infs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adamax does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _common.zero_step(p, group["capturable"])
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_infs.append(state["exp_inf"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_infs, steps

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
            params, grads, exp_avgs, exp_infs, steps = self._init_group(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            options = {
                "lr": _common.to_scalar(group["lr"]),
                "beta1": beta1,
                "beta2": beta2,
                "eps": group["eps"],
                "weight_decay": group["weight_decay"],
                "maximize": group["maximize"],
            }
            if group["capturable"]:
                _common.check_capturable_devices(params, steps)
                for p, g, m, u, step_t in zip(params, grads, exp_avgs, exp_infs, steps):
                    adamax_step_capturable(p, g, m, u, step_t, **options)
            elif _common.use_foreach(group["foreach"], params):
                _foreach_adamax(params, grads, exp_avgs, exp_infs, steps, **options)
            else:
                for p, g, m, u, step_t in zip(params, grads, exp_avgs, exp_infs, steps):
                    step_t += 1
                    adamax_step(p, g, m, u, step=step_t.item(), **options)
        return loss


def _foreach_adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """The multi-tensor Adamax step: one ``torch._foreach_*`` kernel per operation.

    Same operations in the same order as ``adamax_step``, applied to lists of
    tensors grouped by device and dtype.
    """
    lr_value = _common.host_value(lr)
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_infs, steps]  # type: ignore[list-item]
    )
    for tensor_lists, _ in grouped.values():
        g_params, g_grads, g_exp_avgs, g_exp_infs, g_steps = cast(
            tuple[list[Tensor], ...], tensor_lists
        )
        _common.complex_as_real(g_params, g_grads, g_exp_avgs, g_exp_infs)
        if maximize:
            g_grads = list(torch._foreach_neg(g_grads))
        _common.increment_steps(g_steps)
        if weight_decay != 0:
            if maximize:  # g_grads is already a private copy
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
            else:
                g_grads = list(torch._foreach_add(g_grads, g_params, alpha=weight_decay))
        # Update biased first moment estimate.
        torch._foreach_lerp_(g_exp_avgs, g_grads, 1 - beta1)
        # Update the exponentially weighted infinity norm (never writing p.grad).
        torch._foreach_mul_(g_exp_infs, beta2)
        if not maximize and weight_decay == 0:
            g_grads = list(torch._foreach_abs(g_grads))
        else:
            torch._foreach_abs_(g_grads)
        torch._foreach_add_(g_grads, eps)
        torch._foreach_maximum_(g_exp_infs, g_grads)
        step_sizes = [-(lr_value / (1 - beta1 ** s.item())) for s in g_steps]
        torch._foreach_addcdiv_(g_params, g_exp_avgs, g_exp_infs, step_sizes)
