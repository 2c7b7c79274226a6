r"""The parametrizations of a step size :math:`\alpha = \gamma\,\phi(s)` (then clamped to bounds).

A step-size parameter :math:`s` stands for the multiplier :math:`\phi(s)` of
the learning rate :math:`\gamma`. Every :math:`\phi` is 1 at its initial
:math:`s_0`, so a fresh ``MetaSGD`` takes SGD's step. Each parametrization is
one entry of :data:`PARAMETRIZATIONS`; every path looks it up with
:func:`parametrization`, which rejects an unknown name, so adding one is adding
an entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["Parametrization", "PARAMETRIZATIONS", "parametrization"]

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Parametrization:
    """One way of writing a step size: :math:`\\phi`, its inverse and its starting point."""

    name: str
    #: :math:`s_0`, where :math:`\phi(s_0) = 1`.
    initial: float
    #: :math:`\phi`, elementwise and differentiable.
    forward: Callable[[Tensor], Tensor]
    #: :math:`\phi^{-1}`, defined on positive values (on all values if not ``positive``).
    inverse: Callable[[Tensor], Tensor]
    #: :math:`\phi > 0` everywhere: the step sizes can never ascend.
    positive: bool
    #: :math:`\phi(s) = s`: the step sizes may be negative, and ``phi`` builds no tensor.
    is_identity: bool = False
    #: :math:`\phi(s) = e^s`, so a relative change of the step size is an addition to ``s``.
    is_exp: bool = False
    #: :math:`\phi` of every tensor of a list in multi-tensor kernels, where torch has them.
    foreach_forward: Callable[[list[Tensor]], list[Tensor]] | None = None

    def forward_all(self, step_sizes: list[Tensor]) -> list[Tensor]:
        """:math:`\\phi` of every tensor of a list."""
        if self.foreach_forward is not None:
            return self.foreach_forward(step_sizes)
        return [self.forward(s) for s in step_sizes]


def _softplus(s: Tensor) -> Tensor:
    return F.softplus(s) / _LOG2


def _inverse_softplus(x: Tensor) -> Tensor:
    # log(expm1(y)) written as y + log(-expm1(-y)): expm1(y) overflows for
    # y > 88 in float32 (e.g. a step size of 0.1 with lr=1e-3).
    y = x * _LOG2
    return y + (-y).expm1().neg().log()


def _same(x):
    return x


PARAMETRIZATIONS: Mapping[str, Parametrization] = MappingProxyType(
    {
        # As in the paper: s is the multiplier itself, and may turn negative.
        "identity": Parametrization(
            "identity",
            initial=1.0,
            forward=_same,
            inverse=_same,
            positive=False,
            is_identity=True,
            foreach_forward=_same,
        ),
        # Relative steps: an outer step on s changes the step size by a factor.
        "log": Parametrization(
            "log",
            initial=0.0,
            forward=torch.exp,
            inverse=torch.log,
            positive=True,
            is_exp=True,
            foreach_forward=torch._foreach_exp,
        ),
        # Positive, and linear (not exponential) for large s.
        "softplus": Parametrization(
            "softplus", initial=0.0, forward=_softplus, inverse=_inverse_softplus, positive=True
        ),
    }
)


def parametrization(name: str) -> Parametrization:
    """The registry entry of ``name``; a ``ValueError`` for any other name."""
    try:
        return PARAMETRIZATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Invalid parametrization: {name!r} (expected one of {tuple(PARAMETRIZATIONS)})"
        ) from None
