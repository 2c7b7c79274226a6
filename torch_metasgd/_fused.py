"""``MetaSGD(fused=True)``: a group's in-place step compiled into one call, fused per device.

:func:`metasgd_fused` is :func:`torch_metasgd._kernels.metasgd` (the same
arithmetic, from the same functions) under ``torch.compile``, with
``GradScaler``'s unscaling and skipping done in the kernel.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from . import _parametrizations
from ._kernels import SGDOptions, effective_lr, group_lr, sgd_direction, sgd_options
from ._step_sizes import DTensor, is_dtensor

if TYPE_CHECKING:
    from ._groups import Batch

__all__ = ["FUSED_DEVICES", "AmpFlags", "fusable", "metasgd_fused"]

#: The device types whose step ``torch.compile`` can fuse.
FUSED_DEVICES = ("cpu", "cuda", "xpu")


def fusable(p: Tensor) -> bool:
    """Whether a fused step can take ``p``: floating point, on one of :data:`FUSED_DEVICES`."""
    # Properties, not torch.is_floating_point and p.device.type (a device
    # object, and __torch_function__ for a Parameter): every step checks every
    # parameter, and those cost a fifth of a small model's fused step on CPU.
    return p.dtype.is_floating_point and (p.is_cpu or p.is_cuda or p.is_xpu)


class AmpFlags(NamedTuple):
    """What a ``GradScaler`` hands a fused step: the scale still in the gradients, and a
    nonzero ``found_inf`` where a gradient is not finite (the step must then change nothing)."""

    grad_scale: Tensor | None
    found_inf: Tensor | None

    @property
    def given(self) -> bool:
        return self.grad_scale is not None or self.found_inf is not None

    def skips_new_state(self, batch: Batch, new_state: bool) -> bool:
        """Whether the step of ``batch``, which would create state (``new_state``), is one
        that the scaler skips.

        Read back from the device, once per parameter's first steps only: a
        skipped step must leave no state behind (a zero momentum buffer is not
        "no buffer" under dampening), and only the host can decide to create
        none. Later steps skip on the device, without a read.
        """
        return new_state and self.found_inf is not None and bool(self.found_inf.item())


def metasgd_fused(
    batch: Batch, amp: AmpFlags, *, compiled: bool = True, keep_directions: bool = False
) -> list[Tensor] | None:
    """:func:`~torch_metasgd._kernels.metasgd` of a batch, with its group's options, in one call.

    The step is written per tensor (:func:`~torch_metasgd._kernels.sgd_direction`
    and :func:`~torch_metasgd._kernels.effective_lr`, as every other path) and
    inductor fuses it per device: one C++ loop on CPU, a few Triton kernels on
    CUDA. The whole group is one call, not one per device and dtype: dynamo's
    guards already read every tensor's device and dtype, and grouping them
    first cost a fifth of a small model's step on CPU.
    ``grad_scale`` divides the gradients and a nonzero ``found_inf`` skips the
    step, with no read back to the host (``GradScaler``'s contract with fused
    optimizers). The first step (momentum buffers to create), ``compiled=False``
    and a process where compiling fails (no C++ compiler, an unsupported Python)
    run the same function uncompiled, the last after a warning. A float ``lr``
    is passed as a tensor, so that a scheduler does not recompile. Returns the
    directions as :func:`~torch_metasgd._kernels.metasgd` does.
    """
    params, grads, momentum_buffers = batch.params, batch.grads, batch.momentum_buffers
    group = batch.group
    options = sgd_options(group)
    momentum, nesterov = options.momentum, options.nesterov
    first: tuple[bool, ...] = ()
    if momentum != 0 and any(b is None for b in momentum_buffers):
        first = tuple(b is None for b in momentum_buffers)
        for i, new in enumerate(first):
            if new:
                momentum_buffers[i] = torch.zeros_like(params[i])
    lr = group_lr(group)
    if not isinstance(lr, Tensor):
        lr = torch.tensor(lr, dtype=torch.float64)
    step_sizes = batch.step_sizes
    buffers = momentum_buffers if momentum != 0 else []
    sharded = any(is_dtensor(p) for p in params)
    if sharded:
        params, grads, buffers, step_sizes = _shards(params, grads, buffers, step_sizes)
    args = (
        params,
        grads,
        buffers,
        step_sizes,
        lr,
        amp.grad_scale,
        amp.found_inf,
        options,
        group["parametrization"],
        group["lr_min"],
        group["lr_max"],
        keep_directions and (momentum == 0 or nesterov),
    )
    kept = _run_fused_step(args, first, compiled and not first)
    if not keep_directions:
        return None
    # Without nesterov the direction is the momentum buffer itself.
    if momentum != 0 and not nesterov:
        return list(momentum_buffers)
    if sharded:
        kept = [
            DTensor.from_local(
                d, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
            if is_dtensor(p)
            else d
            for d, p in zip(kept, batch.params, strict=True)
        ]
    return kept


def _shards(params, grads, buffers, step_sizes) -> tuple[list[Tensor], ...]:
    """This rank's shards of a group's DTensors (FSDP2's parameters), which the elementwise
    step takes as they are.

    The step is compiled on plain tensors: compiled on the DTensors, inductor's
    cache keyed its kernels by their global shapes, and a rank whose shard has
    other shapes (an uneven or empty one) ran the kernel compiled for rank 0's
    and wrote past its tensors. Gradients and buffers laid out otherwise than
    their parameter (a ``Partial`` gradient) are redistributed first; a step
    size is sharded as its parameter or a replicated scalar.
    """

    def shard(t: Tensor, p: Tensor) -> Tensor:
        if is_dtensor(t) and t.placements != p.placements:
            t = t.redistribute(p.device_mesh, p.placements)
        return t.to_local() if is_dtensor(t) else t

    return (
        [shard(p, p) for p in params],
        [shard(g, p) for g, p in zip(grads, params, strict=True)],
        [shard(b, p) for b, p in zip(buffers, params, strict=True)] if buffers else [],
        [s.to_local() if is_dtensor(s) else s for s in step_sizes],
    )


_compiled_fused_step: Callable | None = None
_compile_failure: str | None = None


def _run_fused_step(args: tuple, first: tuple[bool, ...], compiled: bool) -> list[Tensor]:
    global _compiled_fused_step
    if compiled and _compile_failure is None:
        try:
            if _compiled_fused_step is None:
                # Not fullgraph: past dynamo's recompile limit (8 distinct
                # groups in a process) a new group runs uncompiled, not fails.
                # Static shapes: dynamo's guards check every input's sizes and
                # strides before the call, so inductor's second check of them
                # (size_asserts, half of a small model's step on CPU) is redundant.
                _compiled_fused_step = torch.compile(
                    _fused_step, dynamic=False, options={"size_asserts": False}
                )
        except RuntimeError as error:  # no torch.compile on this platform
            _give_up(error)
        else:
            try:
                return _compiled_fused_step(*args, first)
            except torch._dynamo.exc.TorchDynamoException as error:
                # Raised while compiling, before the step runs: nothing has moved yet.
                _give_up(error)
    return _fused_step(*args, first)


def _give_up(error: Exception) -> None:
    global _compile_failure
    _compile_failure = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    warnings.warn(
        f"MetaSGD(fused=True) could not compile its step ({_compile_failure}); "
        "it runs the same step uncompiled, which is slower than fused=False",
        RuntimeWarning,
        stacklevel=5,
    )


def _fused_step(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    step_sizes: list[Tensor],
    lr: Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    options: SGDOptions,
    parametrization: str,
    lr_min: float | None,
    lr_max: float | None,
    keep_directions: bool,
    first: tuple[bool, ...],
) -> list[Tensor]:
    """One group's step, per tensor, for the compiler to fuse.

    ``first[i]``: buffer ``i`` is new and takes the first direction itself
    (empty: no buffer is new, the only case that is compiled).
    """
    phi = _parametrizations.parametrization(parametrization)
    directions = []
    for i, (param, grad, s) in enumerate(zip(params, grads, step_sizes, strict=True)):
        # GradScaler's scale and flag live on one device, a group may span several.
        if grad_scale is not None:
            grad = grad / grad_scale.to(grad.device)
        buf = bufs[i] if bufs else None
        d, new_buf = sgd_direction(param, grad, None if first and first[i] else buf, *options)
        new_param = param - effective_lr(s, lr, phi, lr_min, lr_max) * d
        if found_inf is not None:
            skip = found_inf.to(param.device) != 0
            new_param = torch.where(skip, param, new_param)
            if buf is not None:
                new_buf = torch.where(skip, buf, new_buf)
        param.copy_(new_param)
        if buf is not None:
            buf.copy_(new_buf)
        if keep_directions:
            directions.append(d.clone())
    return directions
