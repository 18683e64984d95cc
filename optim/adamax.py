"""``optim.Adamax``: a drop-in replacement for ``torch.optim.Adamax``."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from zerotrain.optim import _common, functional

__all__ = ["Adamax"]


class Adamax(_common.TwinOptimizer):
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
    operation by operation (see ``zerotrain.optim.functional.adamax_step``), so results
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

    torch_name = "Adamax"
    moment_keys = ("exp_avg", "exp_inf")
    scalar_states = {"step": 0.0}

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
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "foreach": foreach, "maximize": maximize, "differentiable": differentiable,
                    "capturable": capturable}  # fmt: skip
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: dict[str, list[Tensor]]) -> None:  # fmt: skip
        steps, exp_avgs, exp_infs = states["step"], states["exp_avg"], states["exp_inf"]
        options = self._options(group)
        if group["capturable"]:
            _common.check_capturable_devices(params, steps)
            functional.adamax(params, grads, exp_avgs, exp_infs, steps, capturable=True, **options)
            return
        functional.adamax(params, grads, exp_avgs, exp_infs, _common.increment_steps(steps),
                          foreach=_common.use_foreach(group["foreach"], params), **options)  # fmt: skip
