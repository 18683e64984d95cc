"""What the drop-in optimizers share with torch.optim: validation, state layout, the step loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

_FOREACH_DEVICES = ("cuda", "xpu")
# Options newer than some pickled optimizers; __setstate__ fills them in as torch does.
_LATE_OPTIONS = {"foreach": None, "maximize": False, "differentiable": False, "capturable": False}


class TwinOptimizer(Optimizer):
    """The skeleton ``torch.optim.Adamax`` and ``NAdam`` share, for their drop-in twins.

    Subclasses name torch's class, the two moment tensors and the 0-dim scalar
    states they keep per parameter, and implement ``_update`` for one param
    group. State is created lazily, on a parameter's first gradient, in torch's
    layout (scalars on the CPU unless ``capturable``), so state dicts load in
    either direction.
    """

    torch_name: str
    moment_keys: tuple[str, str]
    scalar_states: dict[str, float]  # key -> initial value
    late_options: dict[str, Any] = {}  # more options __setstate__ fills in

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        validate_hyperparameters(
            defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"]
        )
        self._reject_differentiable(defaults["differentiable"])
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (_LATE_OPTIONS | self.late_options).items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                for key in self.scalar_states if p_state else ():
                    if not torch.is_tensor(p_state[key]):  # an old state dict's python number
                        p_state[key] = scalar_state(float(p_state[key]), p, group["capturable"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; rejects ``differentiable=True`` like the constructor."""
        self._reject_differentiable(param_group.get("differentiable", False))
        super().add_param_group(param_group)

    def _reject_differentiable(self, differentiable: bool) -> None:
        if differentiable:
            raise ValueError(
                f"{type(self).__name__}: differentiable=True is not supported (the update runs "
                f"without autograd); use torch.optim.{self.torch_name}(..., differentiable=True) "
                "to differentiate through optimizer steps"
            )

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
            params, grads = [], []
            states: dict[str, list[Tensor]] = {k: [] for k in (*self.scalar_states, *self.moment_keys)}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self.torch_name} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    for key, value in self.scalar_states.items():
                        state[key] = scalar_state(value, p, group["capturable"])
                    for key in self.moment_keys:
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                for key, values in states.items():
                    values.append(state[key])
            if params:
                self._update(group, params, grads, states)
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: dict[str, list[Tensor]]) -> None:  # fmt: skip
        raise NotImplementedError

    @staticmethod
    def _options(group: dict[str, Any], *keys: str) -> dict[str, Any]:
        """The functional kernel's keyword options from a param group."""
        beta1, beta2 = group["betas"]
        options = {"lr": to_scalar(group["lr"]), "beta1": beta1, "beta2": beta2}
        return options | {k: group[k] for k in ("eps", "weight_decay", "maximize", *keys)}


def validate_hyperparameters(
    lr: float | Tensor, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """Raise ``ValueError`` with torch.optim's exact messages, in torch's order."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for ``step`` / ``mu_product``: float64 only under a float64 default."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def scalar_state(value: float, param: Tensor, capturable: bool) -> Tensor:
    """A 0-dim state tensor: on the param's device when capturable, else on the CPU."""
    if capturable:
        return torch.full((), value, dtype=scalar_dtype(), device=param.device)
    return torch.tensor(value, dtype=scalar_dtype())


def to_scalar(value: float | Tensor) -> float | Tensor:
    """A 1-element tensor hyperparameter becomes 0-dim; python numbers pass through."""
    if isinstance(value, Tensor) and value.dim() != 0:
        return value.squeeze()
    return value


def use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """torch's default: the multi-tensor path when every parameter is on CUDA/XPU."""
    if foreach is not None:
        return foreach
    return all(
        type(p) in (Tensor, torch.nn.Parameter) and p.device.type in _FOREACH_DEVICES
        for p in params
    )


def increment_steps(steps: list[Tensor]) -> list[float]:
    """``step += 1`` for 0-dim step tensors, as torch does; returns the new values."""
    if steps[0].is_cpu:
        # One wrapped tensor instead of one per element on the CPU slow path.
        torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)
    return [s.item() for s in steps]


def check_capturable_devices(params: list[Tensor], *state_lists: list[Tensor]) -> None:
    """torch's check: with ``capturable=True`` params and scalar state live on an accelerator."""
    supported = capturable_supported_devices()
    for i, p in enumerate(params):
        if p.device.type not in supported or any(
            s[i].device.type != p.device.type for s in state_lists
        ):
            raise AssertionError(
                "If capturable=True, params and state_steps must be on supported "
                f"devices: {supported}."
            )


def capturable_supported_devices() -> list[str]:
    """Device types on which ``capturable=True`` is allowed (torch's list)."""
    return ["cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name(), "xla"]
