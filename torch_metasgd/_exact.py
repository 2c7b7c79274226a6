"""What the differentiable paths set around torch's ops so that their gradients are exact.

* :func:`twice_differentiable`: the attention kernel torch can differentiate
  twice. On a CPU, ``scaled_dot_product_attention`` picks a flash kernel
  whose backward has no derivative, so a second-order meta-gradient through
  ``nn.MultiheadAttention`` or ``nn.TransformerEncoderLayer`` fails; the
  math kernel computes the same attention with ordinary, twice
  differentiable ops.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["twice_differentiable"]

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_attention():
        return sdpa_kernel(SDPBackend.MATH)

except ImportError:  # torch < 2.3

    def _math_attention():
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )


def twice_differentiable(second_order: bool = True) -> AbstractContextManager:
    """A context inside which attention runs as its math kernel, if ``second_order``."""
    return _math_attention() if second_order else nullcontext()
