"""What ``MetaSGD`` accepts: its options and its parameters.

Each check raises before anything changes, naming the value.
"""

from __future__ import annotations

import math
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
    "describe",
]

GRANULARITIES = ("element", "tensor", "group")


def validate_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Invalid learning rate: a tensor lr must have one element, got {lr}")
    if not _is_real(lr) or not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not _is_real(group["momentum"]) or not math.isfinite(group["momentum"]):
        raise ValueError(f"Invalid momentum value: {group['momentum']}")
    if group["momentum"] < 0.0:
        raise ValueError(f"Invalid momentum value: {group['momentum']}")
    if not _is_real(group["weight_decay"]) or not math.isfinite(group["weight_decay"]):
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    if group["weight_decay"] < 0.0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    if not _is_real(group["dampening"]) or not math.isfinite(group["dampening"]):
        raise ValueError(f"Invalid dampening value: {group['dampening']}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if group["fused"] and group["foreach"]:
        raise ValueError("Invalid fused=True with foreach=True: a step is one or the other")
    if group["granularity"] not in GRANULARITIES:
        raise ValueError(
            f"Invalid granularity: {group['granularity']!r} (expected one of {GRANULARITIES})"
        )
    phi = parametrization(group["parametrization"])
    lr_min, lr_max = group["lr_min"], group["lr_max"]
    for name, bound in (("lr_min", lr_min), ("lr_max", lr_max)):
        if bound is None:
            continue
        if not _is_real(bound) or isinstance(bound, Tensor) or not math.isfinite(bound):
            raise ValueError(f"Invalid {name} value: {bound}")
        if phi.positive and bound < 0:
            raise ValueError(
                f"Invalid {name} value: {bound} ({phi.name!r} step sizes are positive)"
            )
    if lr_max is not None and lr_max <= 0:
        raise ValueError(
            f"Invalid lr_max value: {lr_max} (step sizes at most {lr_max} could only ascend)"
        )
    if lr_min is not None and lr_max is not None and lr_min > lr_max:
        raise ValueError(f"Invalid step-size bounds: lr_min={lr_min} > lr_max={lr_max}")
    hypergrad_lr = group["hypergrad_lr"]
    if isinstance(hypergrad_lr, Tensor) or not _is_real(hypergrad_lr):
        raise ValueError(f"Invalid hypergrad_lr value: {hypergrad_lr}")
    if not math.isfinite(hypergrad_lr) or hypergrad_lr < 0:
        raise ValueError(f"Invalid hypergrad_lr value: {hypergrad_lr}")


def validate_params(params: list[Any]) -> None:
    seen = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(
                f"optimizer can only optimize Tensors, but parameter {i} is {type(p).__name__}"
            )
        if not p.is_leaf:
            raise ValueError(f"can't optimize a non-leaf Tensor: {describe(p)}")
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(
                f"Invalid parameter {i}: {describe(p)} (MetaSGD optimizes floating-point "
                "and complex tensors)"
            )
        if id(p) in seen:
            raise ValueError(f"Parameter appears twice in a param group: {describe(p)}")
        seen.add(id(p))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, Tensor)) and not isinstance(x, bool)


def validate_state_dict(
    param_groups: list[dict[str, Any]],
    step_sizes_by_group: list[list[Tensor]],
    state_dict: dict[str, Any],
) -> list[tuple[Tensor, Any, Tensor]]:
    """Check that ``state_dict`` fits the optimizer; ``(parameter, saved index, step size)``s.

    The same groups and group sizes, granularities and parametrizations (where
    saved), and a step size of the right shape for every parameter or for none
    (a ``torch.optim.SGD`` state dict).
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    pairs = []
    for group, saved, step_sizes in zip(
        param_groups, saved_groups, step_sizes_by_group, strict=True
    ):
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
        pairs += zip(group["params"], saved["params"], step_sizes, strict=True)
    saved_state = state_dict["state"]
    saved_step_sizes = [saved_state.get(index, {}).get("step_size") for _, index, _ in pairs]
    has_step_sizes = any(t is not None for t in saved_step_sizes)
    for (_, index, s), saved in zip(pairs, saved_step_sizes, strict=True):
        if has_step_sizes and saved is None:
            raise ValueError(f"loaded state dict has no step size for parameter {index}")
        if saved is not None and saved.shape != s.shape:
            raise ValueError(
                f"loaded step size of parameter {index} has shape {tuple(saved.shape)}, "
                f"expected {tuple(s.shape)}"
            )
    return pairs


def validate_gradients(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], has_sparse_grad: bool
) -> None:
    """An error for a gradient that ``group``'s step cannot take, before any group moves."""
    if group["fused"]:
        for p, grad in zip(params, grads, strict=True):
            if not fusable(p) or (has_sparse_grad and grad.is_sparse):
                raise ValueError(
                    f"Invalid parameter for fused=True: {describe(p)} on {p.device}"
                    f"{' with a sparse gradient' if grad.is_sparse else ''} (fused steps take "
                    f"dense floating-point tensors on {FUSED_DEVICES})"
                )
    if has_sparse_grad and (group["weight_decay"] != 0 or group["hypergrad_lr"] != 0):
        option = "weight_decay" if group["weight_decay"] != 0 else "hypergrad_lr"
        raise RuntimeError(
            f"MetaSGD does not support sparse gradients with {option}={group[option]} "
            "(torch.optim.SGD does not either with weight decay)"
        )


def describe(t: Tensor) -> str:
    """How an error message names a tensor."""
    return f"Tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
