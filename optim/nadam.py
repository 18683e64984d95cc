"""``optim.Nadam``: a drop-in replacement for ``torch.optim.NAdam``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from zerotrain.optim import _common, functional

__all__ = ["Nadam"]


class Nadam(_common.TwinOptimizer):
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
    operation by operation (see ``zerotrain.optim.functional.nadam_step``), so results are
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

    torch_name = "NAdam"
    moment_keys = ("exp_avg", "exp_avg_sq")
    scalar_states = {"step": 0.0, "mu_product": 1.0}
    late_options = {"decoupled_weight_decay": False}

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
        if not momentum_decay >= 0.0:
            raise ValueError(f"Invalid momentum_decay value: {momentum_decay}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "momentum_decay": momentum_decay,
                    "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize,
                    "foreach": foreach, "capturable": capturable,
                    "differentiable": differentiable}  # fmt: skip
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: dict[str, list[Tensor]]) -> None:  # fmt: skip
        steps, mu_products = states["step"], states["mu_product"]
        moments = (states["exp_avg"], states["exp_avg_sq"])
        options = self._options(group, "momentum_decay", "decoupled_weight_decay")
        if group["capturable"]:
            _common.check_capturable_devices(params, mu_products, steps)
            functional.nadam(params, grads, *moments, mu_products, steps, capturable=True, **options)
            return
        step_values = _common.increment_steps(steps)
        # mu_product is state, advanced with the betas in force at each step.
        mus = [functional.nadam_momentum(options["beta1"], group["momentum_decay"], t)
               for t in step_values]  # fmt: skip
        torch._foreach_mul_(mu_products, mus)
        functional.nadam(params, grads, *moments, [mp.item() for mp in mu_products], step_values,
                         foreach=_common.use_foreach(group["foreach"], params), **options)  # fmt: skip
