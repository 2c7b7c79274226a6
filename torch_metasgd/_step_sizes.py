"""Where the step sizes live: their dtype, their creation, and following their parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._parametrizations import parametrization

__all__ = ["step_size_dtype", "new_step_sizes", "follow_params", "moved"]


# Step sizes of half-precision parameters are float32, as mixed-precision
# training keeps master weights: a learned change of 1e-3 to s = 1 is below
# bfloat16's resolution. Those of complex parameters are real.
_STEP_SIZE_DTYPES = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.complex32: torch.float32,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def step_size_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the step sizes of a parameter of ``dtype``."""
    return _STEP_SIZE_DTYPES.get(dtype, dtype)


def new_step_sizes(params: list[Tensor], group: dict[str, Any]) -> list[nn.Parameter]:
    s0 = parametrization(group["parametrization"]).initial
    granularity = group["granularity"]
    if granularity == "group":
        if not params:
            return []
        first = params[0]
        shared = _leaf(torch.full((), s0, dtype=step_size_dtype(first.dtype), device=first.device))
        return [shared] * len(params)
    if granularity == "tensor":
        return [
            _leaf(torch.full((), s0, dtype=step_size_dtype(p.dtype), device=p.device))
            for p in params
        ]
    return [
        _leaf(
            torch.full_like(
                p, s0, dtype=step_size_dtype(p.dtype), memory_format=torch.preserve_format
            )
        )
        for p in params
    ]


def moved(p: Tensor, s: Tensor) -> bool:
    """Whether step size ``s`` is not where parameter ``p``'s would be (device, dtype)."""
    return s.device != p.device or s.dtype is not step_size_dtype(p.dtype)


def _leaf(t: Tensor) -> nn.Parameter:
    # A Parameter, so that a module can register the step sizes themselves
    # (e.g. for DistributedDataParallel to average their gradients).
    return nn.Parameter(t.detach())


def follow_params(
    param_groups: list[dict[str, Any]],
    step_sizes_by_group: list[list[Tensor]],
    state: dict[Tensor, dict[str, Any]],
) -> bool:
    """Move step sizes and state to their parameters' devices and dtypes, if one moved.

    The step sizes stay the same Python objects (``.data`` is replaced, as
    ``nn.Module.to`` does for parameters), so an outer optimizer that
    holds them keeps training them. A step size follows its parameter (a
    ``"group"`` one the group's first); state shaped like a parameter
    (momentum buffer, last direction) takes the parameter's dtype, the
    rest its step size's. Returns whether anything moved.
    """
    any_moved = False
    with torch.no_grad():
        for group, step_sizes in zip(param_groups, step_sizes_by_group, strict=True):
            for p, s in zip(group["params"], step_sizes, strict=True):
                owner = group["params"][0] if group["granularity"] == "group" else p
                if moved(owner, s):
                    s.data = s.data.to(device=owner.device, dtype=step_size_dtype(owner.dtype))
                    any_moved = True
                entry = state[p]
                for key, value in entry.items():
                    like = p if value.shape == p.shape else s
                    if value is not s and (value.device, value.dtype) != (like.device, like.dtype):
                        entry[key] = value.to(device=like.device, dtype=like.dtype)
                        any_moved = True
    return any_moved
