"""Where the step sizes live: their dtype, their creation, and following their parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._parametrizations import parametrization

try:  # torch >= 2.4; FSDP2's parameters are DTensors
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
except ImportError:  # pragma: no cover - older torch, or no torch.distributed
    DTensor = Replicate = distribute_tensor = None

__all__ = [
    "STATE_KEY",
    "PARAM_LIKE_STATE",
    "step_size_dtype",
    "new_step_sizes",
    "follow_group",
    "is_dtensor",
    "distributed_like",
    "draw_uniform_",
    "summary",
]

#: Where a parameter's step size sits in ``optimizer.state[p]`` (and so in the state dict).
STATE_KEY = "step_size"
#: The state shaped and typed as the parameter; every other entry takes its step size's dtype.
PARAM_LIKE_STATE = ("momentum_buffer", "hypergrad_direction")

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


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2, or any distributed tensor)."""
    return DTensor is not None and isinstance(t, DTensor)


def distributed_like(full: Tensor, s: Tensor) -> Tensor:
    """``full``, a whole tensor shaped as step size ``s``, laid out as ``s``: for a DTensor,
    rank 0's ``full`` scattered (or broadcast) over ``s``'s mesh with ``s``'s placements, so
    that every rank holds its shard of one tensor whatever each rank passed (a collective:
    every rank of the mesh calls it)."""
    if is_dtensor(s):
        return distribute_tensor(full, s.device_mesh, s.placements)
    return full


def _scalar_like(p: Tensor, value: float) -> Tensor:
    """A 0-dim ``value`` for ``p``: on its device in its step sizes' dtype, replicated on its
    mesh if ``p`` is a DTensor (so that it meets ``p`` in the update without a collective)."""
    local = torch.full((), value, dtype=step_size_dtype(p.dtype), device=p.device)
    if is_dtensor(p):
        mesh = p.device_mesh
        return DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return local


def new_step_sizes(params: list[Tensor], group: dict[str, Any]) -> list[nn.Parameter]:
    """Fresh step sizes for ``params`` with ``group``'s granularity: each :math:`\\phi(s) = 1`.

    ``"element"`` ones are shaped (and, for a DTensor, sharded) as their
    parameters; a ``"group"`` one is one tensor listed once per parameter.
    """
    s0 = parametrization(group["parametrization"]).initial
    granularity = group["granularity"]
    if granularity == "group":
        return [_leaf(_scalar_like(params[0], s0))] * len(params) if params else []
    if granularity == "tensor":
        return [_leaf(_scalar_like(p, s0)) for p in params]
    return [
        _leaf(
            torch.full_like(
                p, s0, dtype=step_size_dtype(p.dtype), memory_format=torch.preserve_format
            )
        )
        for p in params
    ]


def _leaf(t: Tensor) -> nn.Parameter:
    # A Parameter, so that a module can register the step sizes themselves
    # (e.g. for DistributedDataParallel to average their gradients).
    return nn.Parameter(t.detach())


def moved(p: Tensor, s: Tensor) -> bool:
    """Whether step size ``s`` is not where parameter ``p``'s would be (device, dtype)."""
    return s.device != p.device or s.dtype is not step_size_dtype(p.dtype)


def follow_group(
    params: list[Tensor],
    step_sizes: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
    granularity: str,
) -> None:
    """Move step sizes and state to their parameters' devices and dtypes, where one moved.

    The step sizes stay the same Python objects (``.data`` is replaced, as
    ``nn.Module.to`` does for parameters), so an outer optimizer that holds
    them keeps training them. A ``"group"`` step size follows the group's
    first parameter; state shaped like a parameter (momentum buffer, last
    direction: :data:`PARAM_LIKE_STATE`) takes the parameter's dtype, the rest its
    step size's.
    """
    with torch.no_grad():
        for p, s in zip(params, step_sizes, strict=True):
            owner = params[0] if granularity == "group" else p
            if moved(owner, s):
                s.data = s.data.to(device=owner.device, dtype=step_size_dtype(owner.dtype))
            entry = state.get(p)
            for key, value in (entry or {}).items():
                if not isinstance(value, Tensor) or value is s:
                    continue
                like = p if key in PARAM_LIKE_STATE else s
                if (value.device, value.dtype) != (like.device, like.dtype):
                    entry[key] = value.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def draw_uniform_(
    group: dict[str, Any],
    step_sizes: list[Tensor],
    low: float,
    high: float,
    generator: torch.Generator | None,
) -> None:
    r"""Set each step size of ``group`` (listed once each) to :math:`\phi^{-1}(u / \gamma)`,
    :math:`u \sim U[low, high]` drawn on the CPU (with ``generator``), whole for a DTensor."""
    phi = parametrization(group["parametrization"])
    for s in step_sizes:
        u = torch.rand(s.shape, generator=generator, dtype=s.dtype, device="cpu")
        u = (low + (high - low) * u).to(s.device)
        s.copy_(distributed_like(phi.inverse(u / group["lr"]), s))


@torch.no_grad()
def summary(alphas: list[Tensor]) -> dict[str, float]:
    """The ``"min"``, ``"median"``, ``"mean"`` and ``"max"`` of the values of ``alphas`` (read
    back to the host; a DTensor's are gathered, so every rank must call this alike)."""
    alphas = [a.full_tensor() if is_dtensor(a) else a for a in alphas]
    values = torch.cat([a.detach().float().reshape(-1).cpu() for a in alphas])
    return dict(
        min=values.min().item(),
        median=values.median().item(),
        mean=values.mean().item(),
        max=values.max().item(),
    )
