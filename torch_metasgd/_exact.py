"""What the differentiable paths set around torch's ops so that their gradients are exact.

* :func:`twice_differentiable`: the attention kernel torch can differentiate
  twice. On a CPU, ``scaled_dot_product_attention`` picks a flash kernel
  whose backward has no derivative, so a second-order meta-gradient through
  ``nn.MultiheadAttention`` or ``nn.TransformerEncoderLayer`` fails; the
  math kernel computes the same attention with ordinary, twice
  differentiable ops.
* :func:`model_kept`: the model's parameters as they were, whatever
  ``torch.func.functional_call`` leaves behind.
* :func:`update`: the out-of-place Meta-SGD step, in the parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _kernels

__all__ = ["twice_differentiable", "model_kept", "update"]


def twice_differentiable(second_order: bool = True) -> AbstractContextManager:
    """A context inside which attention runs as its math kernel, if ``second_order``."""
    return sdpa_kernel(SDPBackend.MATH) if second_order else nullcontext()


@contextmanager
def model_kept(model: nn.Module) -> Iterator[None]:
    """Inside, ``torch.func.functional_call`` may leave ``model`` changed: after, it is as it was.

    ``functional_call`` swaps tensors into the module and swaps the originals
    back on exit; a module used twice in the model has each of its tensors
    under two names (tied), and the second swap back restores the first
    swap's tensor: the model's parameter would end as a task's adapted,
    non-leaf tensor (torch 2.13). Every module's parameter and buffer slots
    are put back here, whatever happened inside.
    """
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for module, params, buffers in saved:
            module._parameters.update(params)
            module._buffers.update(buffers)


def update(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    alpha: Tensor,
    options: _kernels.SGDOptions,
    first_order: bool,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`torch_metasgd._kernels.metasgd_update`, the new weights rounded to ``dtype``.

    ``dtype`` is the parameter's where its step size's differs, else ``None``:
    the step sizes of a half-precision parameter are float32 (master
    weights), which promote ``param - alpha * d`` to float32. The step is
    taken in float32 and rounded once to the parameter's dtype, as
    ``MetaSGD.step()`` rounds its in-place update, and the meta-gradient
    reaches the float32 step sizes through the rounding.
    """
    new, buf = _kernels.metasgd_update(param, grad, momentum_buffer, alpha, options, first_order)
    return (new if dtype is None else new.to(dtype)), buf
