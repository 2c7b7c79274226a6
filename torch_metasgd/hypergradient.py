r"""Online step sizes: ``MetaSGD(..., hypergrad_lr=beta)`` learns them inside ``step()``.

Hypergradient descent (Baydin et al., 2018), made free of the loss's scale.
The last step of a parameter was :math:`\theta_t = \theta_{t-1} - \alpha \odot
d_{t-1}`, so its current gradient gives the derivative of the current loss in
the step sizes at no extra forward or backward pass: with :math:`g_t =
\pm\nabla f(\theta_t) + \lambda\theta_t` (the gradient of the objective the
step descends),

.. math::
    \frac{\partial f(\theta_t)}{\partial \alpha} = -g_t \odot d_{t-1}.

Summed over the elements that share a rule (a tensor, or the whole group for
``granularity="group"``) it gives :math:`p = \langle g_t, d_{t-1}\rangle`,
measured against its running magnitude :math:`v`, and every step size takes a
multiplicative step before the parameters' update:

.. math::
    \begin{aligned}
    v &\leftarrow \mu v + (1 - \mu)\,\|g_t\|\,\|d_{t-1}\|
        \quad (v = \|g_t\|\,\|d_{t-1}\| \text{ at first}) \\
    h &= \operatorname{clamp}(p / v,\; -\nu,\; 1) \\
    \log\alpha &\leftarrow \max\big(\log\alpha + \beta\,(h + \delta),\; \log(\epsilon\gamma)\big)
    \end{aligned}

with :math:`\mu` = :data:`SCALE_DECAY`, :math:`\nu` = :data:`MAX_SHRINK`,
:math:`\delta` = :data:`DRIFT` and :math:`\epsilon` = :data:`FLOOR`. At the
first step :math:`h = \cos(g_t, d_{t-1})`. While the gradients keep their
size, :math:`h` stays about a cosine, so a step size grows by at most
:math:`e^{\beta(1 + \delta)}` per step; when the loss blows up, the gradients
outgrow :math:`v` and the step sizes shrink in proportion, by up to
:math:`e^{-\beta(\nu - \delta)}` per step, so that one outlier batch cannot
wipe out what was learned. The drift :math:`\delta` offsets the bias of this
greedy (one-step) hypergradient under gradient noise: at a noisy stationary
point its expectation is negative for every step size (:math:`-\eta h_c / 2`
in a direction of curvature :math:`h_c`), which would shrink the step sizes
for ever. The update is free of the scale of the loss and of the parameters,
so one :math:`\beta` suits every model (the additive form
:math:`\alpha \leftarrow \alpha - \beta\,\partial f/\partial\alpha` diverges or
stalls depending on that scale; see ``benchmarks/online.py``).

The floor :math:`\epsilon\gamma` (``lr`` times :data:`FLOOR`) stops a collapse
that the drift cannot offset. Where a tensor's hypergradient is mostly
minibatch noise (a bias of one or a few elements), :math:`p / v` is
heavy-tailed with both signs, and the asymmetric clip to :math:`[-\nu, 1]`
gives it a mean of about -0.1 to -1: without the floor, the output bias of a
10-32-1 regression MLP fell from :math:`10^{-2}` to :math:`10^{-12}`-
:math:`10^{-19}` in 2000 steps (to exactly 0 with ``"identity"``). At the
floor the rule still lifts the step size as soon as the hypergradient says so.
Online step sizes are positive: a negative or zero step size
(``"identity"``) is lifted to the floor by its first update, since descent on
:math:`\alpha` would carry it across zero.

Per element (``granularity="element"``), each tensor's step sizes move
together by the tensor's :math:`h + \delta`, each element also by the sign of
its own hypergradient at :data:`ELEMENT_RATE` :math:`= \rho` of the rate, and
no element may exceed :math:`e^{\kappa}` (:data:`ELEMENT_SPREAD`
:math:`= \kappa`) times the geometric mean of its tensor's step sizes:

.. math::
    \log\alpha_i \leftarrow \min\Big(\ell_i,\; \operatorname{mean}_j \ell_j + \kappa\Big),
    \quad \ell_i = \max\Big(\log\alpha_i + \beta\big(h + \delta + \rho
        \operatorname{sign}(g_{t,i}\, d_{t-1,i})\big),\; \log(\epsilon\gamma)\Big).

The sign rule alone lets the step sizes of elements whose gradient keeps its
sign (output weights on separable data) grow until training diverges; the
cap stops that. Last, :math:`\alpha` is clamped to ``[lr_min, lr_max]`` and
:math:`s \leftarrow \phi^{-1}(\alpha / \gamma)`.

Which parameters learn: those with a gradient now and a last direction
:math:`d_{t-1}`, the direction of their last step (a parameter without a
gradient does not step, and its step sizes and :math:`v` do not move, so
when it steps again its last direction is still the one that its step sizes
scaled). A tensor whose :math:`p` or :math:`v` is not finite (a NaN or an
inf in its gradient or its last direction; for ``"group"``, in any of the
group's), or every tensor of a step that a ``GradScaler`` skips, leaves its
step sizes and :math:`v` exactly as they were. Any mix of dtypes and devices
may share a group: half-precision gradients are reduced in float32, a
complex parameter uses the real inner product :math:`\operatorname{Re}\langle
g, d\rangle` (the derivative in its real step size), and the sums, norms and
means of a DTensor (an FSDP2 parameter) are over the whole tensor, not the
rank's shard, so every rank learns what one process would.

State, per parameter, in ``optimizer.state`` (and so in the state dict),
made at the parameter's first step: the last direction :math:`d_{t-1}` is the
momentum buffer itself with momentum and without nesterov (the rule runs
before the update advances it), else ``"hypergrad_direction"``;
``"hypergrad_scale"`` is :math:`v` (0-dim, in the step sizes' dtype; 0 before
any history; one tensor shared by the group's parameters for ``"group"``).

This module is the rule: its constants, its options (:class:`Rule`) and its
formulas. Two engines run it: :mod:`torch_metasgd._engine`, the whole step of
a group of float32/float64 tensors in a few kernels for all of them, where it
can; and :mod:`torch_metasgd._tensorwise`, tensor by tensor, for everything
else (half precision, complex, DTensor, a ``GradScaler``'s scaled gradients, a
group where some parameters have no gradient). The tests hold the two to the
same step sizes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._kernels import effective_lr, group_lr
from ._parametrizations import Parametrization, parametrization

__all__ = [
    "SCALE_DECAY",
    "MAX_SHRINK",
    "DRIFT",
    "ELEMENT_RATE",
    "ELEMENT_SPREAD",
    "FLOOR",
    "Rule",
    "direction_key",
    "tensor_changes",
    "element_logs_",
    "new_scale",
]

SCALE_DECAY = 0.99
MAX_SHRINK = 5.0
DRIFT = 0.02
ELEMENT_RATE = 0.2
ELEMENT_SPREAD = 1.0
FLOOR = 1e-3

LOG_FLOOR = math.log(FLOOR)
SCALE_KEY = "hypergrad_scale"


class Rule(NamedTuple):
    """A group's options that shape the step-size update."""

    beta: float
    lr: float | Tensor
    phi: Parametrization
    lr_min: float | None
    lr_max: float | None

    @classmethod
    def of(cls, group: dict[str, Any]) -> Rule:
        return cls(
            group["hypergrad_lr"],
            group_lr(group),
            parametrization(group["parametrization"]),
            group["lr_min"],
            group["lr_max"],
        )

    @property
    def bounded(self) -> bool:
        return self.lr_min is not None or self.lr_max is not None

    @property
    def in_log_space(self) -> bool:
        """``s = log(alpha / lr)``: the rule's own variable, written as it is."""
        return self.phi.is_exp and not self.bounded

    @property
    def learns_nothing(self) -> bool:
        """``lr = 0`` (e.g. torch.distributed.checkpoint's warm-up step): no step size to learn."""
        return not isinstance(self.lr, Tensor) and self.lr == 0

    def log_ratios(self, s: Tensor) -> Tensor:
        r""":math:`\log(\alpha/\gamma)` of step sizes ``s``, :math:`\alpha` lifted to the floor."""
        if self.in_log_space:
            return s.clamp_min(LOG_FLOOR)
        if not (self.phi.is_identity and not self.bounded):
            s = effective_lr(s, self.lr, self.phi, self.lr_min, self.lr_max) / self.lr
        return s.clamp_min(FLOOR).log()

    def step_sizes(self, logs: Tensor) -> Tensor:
        r"""The step sizes :math:`s = \phi^{-1}(\alpha/\gamma)` of :math:`\log(\alpha/\gamma)`,
        within the bounds."""
        if self.in_log_space:
            return logs
        ratios = logs.exp()
        if self.bounded:
            ratios = (ratios * self.lr).clamp(self.lr_min, self.lr_max) / self.lr
        return self.phi.inverse(ratios)


def direction_key(group: dict[str, Any]) -> str:
    """Where a parameter's last direction is kept in its state."""
    return (
        "momentum_buffer"
        if group["momentum"] != 0 and not group["nesterov"]
        else ("hypergrad_direction")
    )


def tensor_changes(
    dots: Tensor,
    g_norms: Tensor,
    d_norms: Tensor,
    scales: Tensor,
    beta: float,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per tensor: ``beta * (h + DRIFT)`` and 1, or 0 and 0 where the hypergradient is not
    finite (or not ``allowed``).

    Moves the running magnitudes ``scales`` in place, only where the change
    is 1; a scale of 0 (no history) starts at the magnitude itself, and ``h``
    is 0 where ``v`` is.
    """
    dots, magnitudes = dots.to(scales.dtype), (g_norms * d_norms).to(scales.dtype)
    v = torch.where(scales == 0, magnitudes, torch.lerp(magnitudes, scales, SCALE_DECAY))
    h = (dots / v.clamp_min(torch.finfo(v.dtype).tiny)).clamp(-MAX_SHRINK, 1.0)
    # h is clamped to [-MAX_SHRINK, 1] (NaN stays NaN), so h + v cannot overflow:
    # it is finite exactly where both are, in one test where two cost twice the kernels.
    finite = torch.isfinite(h + v)
    if allowed is not None:
        finite &= allowed
    torch.where(finite, v, scales, out=scales)
    return torch.where(finite, beta * (h + DRIFT), 0.0), finite.to(v.dtype)


def element_logs_(
    logs: Tensor, change: Tensor, rate: Tensor, products: Tensor, floor: Tensor | float
) -> Tensor:
    r""":math:`\ell_i = \max\big(\log\alpha_i + \beta(h + \delta) + \beta\rho\,
    \operatorname{sign}(g_{t,i} d_{t-1,i}),\; \log(\epsilon\gamma)\big)`, in place on ``logs``
    (:math:`\log\alpha`): ``change`` is :math:`\beta(h + \delta)`, ``rate`` :math:`\beta\rho`
    (both 0 on a skipped tensor), ``products`` :math:`g_t \odot d_{t-1}` (overwritten by its
    sign; the sign of NaN is 0), ``floor`` the log floor; all broadcastable to ``logs``."""
    logs.add_(change).addcmul_(products.sign_(), rate)
    if isinstance(floor, float):
        return logs.clamp_min_(floor)
    return torch.maximum(logs, floor, out=logs)


def new_scale(s: Tensor) -> Tensor:
    """A running magnitude with no history (0), in the dtype of step size ``s``, on its device
    (a plain tensor: every rank holds the same value)."""
    return torch.zeros((), dtype=s.dtype, device=s.device)
