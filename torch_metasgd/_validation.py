"""What ``MetaSGD`` accepts: its options, its parameters, the state dicts it loads.

Each check raises before anything changes, naming the value.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor

from ._fused import FUSED_DEVICES, fusable
from ._parametrizations import parametrization

__all__ = [
    "GRANULARITIES",
    "validate_group",
    "validate_params",
    "validate_state_dict",
    "validate_gradients",
    "validate_uniform_range",
    "describe",
]

GRANULARITIES = ("element", "tensor", "group")


class InvalidForTorchError(ValueError, RuntimeError):
    """Bad input that ``torch.optim.SGD`` rejects with a ``RuntimeError``: a ``ValueError``, as
    every bad input to MetaSGD, that code written for torch's type still catches."""


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a real number torch takes as a scalar (Python, NumPy or a
    one-element tensor; not a bool), else None."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _finite(group: dict[str, Any], key: str, what: str) -> float:
    value = _real(group[key])
    if value is None or not math.isfinite(value):
        raise ValueError(f"Invalid {what}: {group[key]}")
    return value


def validate_group(group: dict[str, Any]) -> None:
    """A ``ValueError`` for an option that :class:`MetaSGD` (or one of its groups) cannot take."""
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(
            f"Invalid learning rate: Tensor lr must be 1-element, got shape {tuple(lr.shape)}"
        )
    if _finite(group, "lr", "learning rate") < 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if _finite(group, "momentum", "momentum value") < 0:
        raise ValueError(f"Invalid momentum value: {group['momentum']}")
    if _finite(group, "weight_decay", "weight_decay value") < 0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    _finite(group, "dampening", "dampening value")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if group["fused"] and group["foreach"]:
        raise InvalidForTorchError(
            "Invalid fused=True with foreach=True: `fused` and `foreach` cannot be `True` together"
        )
    if group["fused"] and group["differentiable"]:
        raise InvalidForTorchError(
            "Invalid fused=True with differentiable=True: `fused` does not support `differentiable`"
        )
    if group["granularity"] not in GRANULARITIES:
        raise ValueError(
            f"Invalid granularity: {group['granularity']!r} (expected one of {GRANULARITIES})"
        )
    phi = parametrization(group["parametrization"])
    for name in ("lr_min", "lr_max"):
        bound = group[name]
        if bound is None:
            continue
        if isinstance(bound, Tensor):
            raise ValueError(f"Invalid {name} value: {bound} (a number, not a tensor)")
        value = _finite(group, name, f"{name} value")
        if phi.positive and value < 0:
            raise ValueError(
                f"Invalid {name} value: {bound} ({phi.name!r} step sizes are positive)"
            )
    lr_min, lr_max = group["lr_min"], group["lr_max"]
    if lr_max is not None and lr_max <= 0:
        raise ValueError(
            f"Invalid lr_max value: {lr_max} (step sizes at most {lr_max} could only ascend)"
        )
    if lr_min is not None and lr_max is not None and lr_min > lr_max:
        raise ValueError(f"Invalid step-size bounds: lr_min={lr_min} > lr_max={lr_max}")
    hypergrad_lr = group["hypergrad_lr"]
    if isinstance(hypergrad_lr, Tensor) or _finite(group, "hypergrad_lr", "hypergrad_lr value") < 0:
        raise ValueError(f"Invalid hypergrad_lr value: {hypergrad_lr}")
    if hypergrad_lr != 0 and group["differentiable"]:
        raise ValueError(
            f"Invalid hypergrad_lr value: {hypergrad_lr} with differentiable=True (the online "
            "rule moves the step sizes in place, outside any graph)"
        )


def validate_params(params: list[Tensor], group: dict[str, Any]) -> None:
    """A ``ValueError`` for a parameter a step cannot take (torch.optim checked its type)."""
    for i, p in enumerate(params):
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(
                f"Invalid parameter {i}: {describe(p)} (MetaSGD optimizes floating-point "
                "and complex tensors)"
            )
    if group["hypergrad_lr"] != 0 and len({id(p) for p in params}) != len(params):
        # torch.optim only warns; the online rule keeps one state per parameter and step.
        raise ValueError(
            "Invalid param group: a parameter appears twice, with hypergrad_lr="
            f"{group['hypergrad_lr']}"
        )


def validate_state_dict(
    param_groups: list[dict[str, Any]], step_sizes: list[list[Tensor]], state_dict: dict[str, Any]
) -> None:
    """Check that ``state_dict`` fits the optimizer.

    The same groups and group sizes, granularities and parametrizations (where
    saved), options the constructor would take, and a step size of the right
    shape for every parameter or for none (a ``torch.optim.SGD`` state dict).
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    saved_state = state_dict["state"]
    found = []
    for group, saved, group_step_sizes in zip(param_groups, saved_groups, step_sizes, strict=True):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"loaded state dict has a group of {len(saved['params'])} parameters "
                f"where this optimizer has {len(group['params'])}"
            )
        for key in ("granularity", "parametrization"):
            if saved.get(key, group[key]) != group[key]:
                raise ValueError(
                    f"loaded state dict has {key}={saved[key]!r} "
                    f"where this optimizer has {group[key]!r}"
                )
        validate_group({**group, **{k: v for k, v in saved.items() if k != "params"}})
        for index, s in zip(saved["params"], group_step_sizes, strict=True):
            found.append((index, s, saved_state.get(index, {}).get("step_size")))
    if any(saved is not None for _, _, saved in found):
        for index, s, saved in found:
            if saved is None:
                raise ValueError(f"loaded state dict has no step size for parameter {index}")
            if saved.shape != s.shape:
                raise ValueError(
                    f"loaded step size of parameter {index} has shape {tuple(saved.shape)}, "
                    f"expected {tuple(s.shape)}"
                )


def validate_gradients(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], has_sparse_grad: bool
) -> None:
    """An error for a gradient that ``group``'s step cannot take, before any group moves."""
    if group["fused"]:
        for p, grad in zip(params, grads, strict=True):
            if not fusable(p) or (has_sparse_grad and grad.is_sparse):
                raise InvalidForTorchError(
                    f"Invalid parameter for fused=True: {describe(p)} on {p.device}"
                    f"{' with a sparse gradient' if grad.is_sparse else ''} (`fused=True` "
                    "requires all the params to be floating point Tensors of supported devices: "
                    f"{', '.join(FUSED_DEVICES)}, with dense gradients)"
                )
    if has_sparse_grad and (group["weight_decay"] != 0 or group["hypergrad_lr"] != 0):
        option = "weight_decay" if group["weight_decay"] != 0 else "hypergrad_lr"
        raise RuntimeError(
            f"MetaSGD does not support sparse gradients with {option}={group[option]} "
            "(torch.optim.SGD does not either with weight decay)"
        )


def validate_uniform_range(param_groups: list[dict[str, Any]], low: float, high: float) -> None:
    """A ``ValueError`` for a range ``uniform_step_sizes_`` cannot draw the groups' step sizes
    from."""
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"Invalid step-size range: [{low}, {high}]")
    for group in param_groups:
        if group["lr"] <= 0:
            raise ValueError(f"Invalid learning rate for uniform_step_sizes_: {group['lr']}")
        if parametrization(group["parametrization"]).positive and low <= 0:
            raise ValueError(
                f"Invalid step-size range for {group['parametrization']!r}: "
                f"[{low}, {high}] (step sizes are positive)"
            )


def describe(t: Tensor) -> str:
    """How an error message names a tensor."""
    return f"Tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
