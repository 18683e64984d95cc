"""Helpers shared by the drop-in optimizers: validation, state setup, dispatch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_FOREACH_DEVICES = ("cuda", "xpu")


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


def reject_differentiable(name: str, differentiable: bool) -> None:
    """The one torch option we do not implement: autograd through the step."""
    if differentiable:
        torch_name = {"Nadam": "NAdam"}.get(name, name)
        raise ValueError(
            f"{name}: differentiable=True is not supported (the update runs without "
            f"autograd); use torch.optim.{torch_name}(..., differentiable=True) to "
            "differentiate through optimizer steps"
        )


def scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for ``step`` / ``mu_product``: float64 only under a float64 default."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def scalar_state(value: float, param: Tensor, capturable: bool) -> Tensor:
    """A 0-dim state tensor: on the param's device when capturable, else on the CPU."""
    if capturable:
        return torch.full((), value, dtype=scalar_dtype(), device=param.device)
    return torch.tensor(value, dtype=scalar_dtype())


def zero_step(param: Tensor, capturable: bool) -> Tensor:
    """The initial ``step`` state (0.0)."""
    return scalar_state(0.0, param, capturable)


def upgrade_scalar_state(state: dict[str, Any], key: str, param: Tensor, capturable: bool) -> None:
    """Turn a python-number ``step``/``mu_product`` from an old state dict into a tensor."""
    if not torch.is_tensor(state[key]):
        state[key] = scalar_state(float(state[key]), param, capturable)


def to_scalar(value: float | Tensor) -> float | Tensor:
    """A 1-element tensor hyperparameter becomes 0-dim; python numbers pass through."""
    if isinstance(value, Tensor) and value.dim() != 0:
        return value.squeeze()
    return value


def host_value(value: float | Tensor) -> float:
    """A python float (reads a tensor hyperparameter back to the host)."""
    return value.item() if isinstance(value, Tensor) else value


def use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """torch's default: the multi-tensor path when every parameter is on CUDA/XPU."""
    if foreach is not None:
        return foreach
    return all(
        type(p) in (Tensor, torch.nn.Parameter) and p.device.type in _FOREACH_DEVICES
        for p in params
    )


def increment_steps(steps: list[Tensor]) -> None:
    """``step += 1`` for a list of 0-dim step tensors, in one foreach call."""
    if steps[0].is_cpu:
        # One wrapped tensor instead of one per element on the CPU slow path.
        torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)


def complex_as_real(*tensor_lists: list[Tensor]) -> None:
    """Replace complex tensors in the lists by their real views, in place."""
    for tensors in tensor_lists:
        for i, t in enumerate(tensors):
            if torch.is_complex(t):
                tensors[i] = torch.view_as_real(t)


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
