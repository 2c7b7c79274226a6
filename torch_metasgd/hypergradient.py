r"""Online step sizes: ``MetaSGD(..., hypergrad_lr=beta)`` learns them inside ``step()``.

Hypergradient descent (Baydin et al., 2018), made free of the loss's scale.
The last step was :math:`\theta_t = \theta_{t-1} - \alpha \odot d_{t-1}`, so the
current gradient gives the derivative of the current loss in the step sizes at
no extra forward or backward pass: with :math:`g_t = \pm\nabla f(\theta_t) +
\lambda\theta_t` (the gradient of the objective the step descends),

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

A tensor whose :math:`p` or :math:`v` is not finite (a NaN or an inf in its
gradient or its last direction; for ``"group"``, in any of the group's) skips
that step: its step sizes and :math:`v` stay as they were, and the parameters
take the step SGD would. Any mix of dtypes and devices may share a group:
half-precision gradients are reduced in float32, and a complex parameter
uses the real inner product :math:`\operatorname{Re}\langle g, d\rangle` (the
derivative in its real step size).

The update is a fixed number of multi-tensor (``torch._foreach_*``)
operations per device and dtype, and reads no value back to the host. At
``"element"`` granularity it makes eleven passes over each tensor with
``"log"`` (two norms, a product, its sign and sum, the update, the floor, a
sum and the cap), three more with ``"identity"`` (a log, an exp and a copy).

State, per parameter, in the optimizer's ``state`` (and so in its
``state_dict()``): ``hypergrad_direction`` (:math:`d_{t-1}`; with momentum and
without nesterov it is the momentum buffer itself, so :func:`hypergradient_step_`
must run before the step updates that buffer in place) and ``hypergrad_scale``
(:math:`v`, 0-dim, at least float32; one tensor shared by the group for ``"group"``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from ._kernels import effective_lr
from ._parametrizations import Parametrization, parametrization

__all__ = [
    "SCALE_DECAY",
    "MAX_SHRINK",
    "DRIFT",
    "ELEMENT_RATE",
    "ELEMENT_SPREAD",
    "FLOOR",
    "hypergradient_step_",
    "remember_directions",
]

SCALE_DECAY = 0.99
MAX_SHRINK = 5.0
DRIFT = 0.02
ELEMENT_RATE = 0.2
ELEMENT_SPREAD = 1.0
FLOOR = 1e-3

_LOG_FLOOR = math.log(FLOOR)
_HALF = (torch.float16, torch.bfloat16)


class _Rule(NamedTuple):
    """A group's options that shape the step-size update."""

    beta: float
    lr: float | Tensor
    phi: Parametrization
    lr_min: float | None
    lr_max: float | None

    @property
    def bounded(self) -> bool:
        return self.lr_min is not None or self.lr_max is not None

    @property
    def in_log_space(self) -> bool:
        # s = log(alpha / lr): the rule's own variable, updated in place.
        return self.phi.is_exp and not self.bounded


class _Part(NamedTuple):
    """A group's tensors of one device and dtype, in the form the rule computes with."""

    grads: list[Tensor]
    directions: list[Tensor]
    step_sizes: list[Tensor]
    scales: list[Tensor]
    #: Complex tensors, seen as real ones with a trailing dimension of 2.
    paired: bool

    @classmethod
    def of(cls, grads, directions, step_sizes, scales) -> _Part:
        dtype = grads[0].dtype
        if dtype in _HALF:
            # A product of two half-precision gradients of 1e-4 underflows to 0.
            grads = [g.float() for g in grads]
            directions = [d.float() for d in directions]
        paired = dtype.is_complex
        if paired:
            grads = [torch.view_as_real(g) for g in grads]
            directions = [torch.view_as_real(d) for d in directions]
        return cls(grads, directions, step_sizes, scales, paired)


def hypergradient_step_(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    step_sizes: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
    grad_scale: Tensor | None = None,
) -> None:
    """Move the step sizes of ``params`` along the hypergradient of the current loss, in place.

    ``params`` and ``grads`` are those of the group that have a gradient now;
    a parameter without a direction from the last step (the first step, or
    no gradient last time, so the step sizes did not move it) is left out.
    ``grad_scale``: ``GradScaler``'s scale, by which the gradients of a fused
    step are still multiplied (a skipped step's infs skip this update too).
    Must run under ``torch.no_grad()``, before the step.
    """
    lr = group["lr"]
    if not isinstance(lr, Tensor) and lr == 0:
        return
    kept = [
        (p, g, s, state[p]["hypergrad_direction"])
        for p, g, s in zip(params, grads, step_sizes, strict=True)
        if "hypergrad_direction" in state[p]
    ]
    if not kept:
        return
    params, grads, step_sizes, directions = map(list, zip(*kept, strict=True))
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale)
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    if group["weight_decay"] != 0:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    rule = _Rule(
        group["hypergrad_lr"],
        lr,
        parametrization(group["parametrization"]),
        group["lr_min"],
        group["lr_max"],
    )
    scales = _scales(group, params, step_sizes, state)
    if group["granularity"] == "group":
        by_device = Optimizer._group_tensors_by_device_and_dtype([grads, directions])
        parts = [_Part.of(*lists, [], []) for lists, _ in by_device.values()]
        _group_step_(parts, step_sizes[0], scales[0], rule)
        return
    step = _tensor_step_ if group["granularity"] == "tensor" else _element_step_
    by_device = Optimizer._group_tensors_by_device_and_dtype(
        [grads, directions, step_sizes, scales]
    )
    for lists, _ in by_device.values():
        step(_Part.of(*lists), rule)


def remember_directions(
    group: dict[str, Any],
    params: list[Tensor],
    directions: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
) -> None:
    """After the step: keep each direction for the next step's hypergradient.

    A parameter of the group that did not step forgets its direction: its
    next gradient says nothing about step sizes that did not move it.
    """
    for p, d in zip(params, directions, strict=True):
        state[p]["hypergrad_direction"] = d
    if len(params) < len(group["params"]):
        stepped = {id(p) for p in params}
        for p in group["params"]:
            if id(p) not in stepped:
                state[p].pop("hypergrad_direction", None)


def _scales(group, params, step_sizes, state) -> list[Tensor]:
    """The running magnitudes :math:`v`: 0-dim, one per parameter or one per group.

    Created at 0 (no history), real and at least float32. A group's one scale
    lives in the state of every parameter of the group as one tensor (a
    loaded state dict holds copies: they are tied again here).
    """
    if group["granularity"] != "group":
        scales = []
        for p, s in zip(params, step_sizes, strict=True):
            entry = state[p]
            if "hypergrad_scale" not in entry:
                entry["hypergrad_scale"] = _new_scale(s)
            scales.append(entry["hypergrad_scale"])
        return scales
    scale = state[params[0]].get("hypergrad_scale")
    if scale is None:
        scale = _new_scale(step_sizes[0])
    for p in group["params"]:
        state[p]["hypergrad_scale"] = scale
    return [scale]


def _new_scale(s: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.promote_types(s.dtype, torch.float32), device=s.device)


def _sums(tensors: list[Tensor]) -> Tensor:
    """The sum of each tensor, stacked."""
    if tensors[0].device.type == "cpu":
        # On CPU a multi-tensor kernel is itself a loop over the tensors.
        return torch.stack([t.sum() for t in tensors])
    return torch.stack(_sums_multi_tensor(tensors))


def _sums_multi_tensor(tensors: list[Tensor]) -> list[Tensor]:
    """The sums in four multi-tensor kernels, not one kernel per tensor: |x + |x||_1 - |x|_1."""
    magnitudes = torch._foreach_abs(tensors)
    norms = torch._foreach_norm([*torch._foreach_add(tensors, magnitudes), *magnitudes], 1)
    return torch._foreach_sub(norms[: len(tensors)], norms[len(tensors) :])


@functools.lru_cache(maxsize=64)
def _reciprocal_counts(counts: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    # Cached: creating it on an accelerator every step would wait for the device.
    return 1 / torch.tensor(counts, dtype=dtype).to(device)


def _inner_products(part: _Part) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """``g * d`` per element, and stacked per tensor ``<g, d>``, ``|g|`` and ``|d|``."""
    n = len(part.grads)
    norms = torch.stack(torch._foreach_norm([*part.grads, *part.directions]))
    products = torch._foreach_mul(part.grads, part.directions)
    dots = _sums(products)
    if part.paired:
        products = [p.sum(-1) for p in products]  # Re(conj(g) d) per complex element
    return products, dots, norms[:n], norms[n:]


def _tensor_changes(
    dots: Tensor, g_norms: Tensor, d_norms: Tensor, scales: list[Tensor], beta: float
) -> tuple[Tensor, Tensor]:
    """Per tensor, stacked: ``beta * (h + DRIFT)`` and 1, or 0 and 0 where either is not finite.

    Moves the running magnitudes ``scales`` (not where the hypergradient is not
    finite); a scale of 0 (no history) starts at the magnitude itself, and
    ``h`` is 0 where ``v`` is.
    """
    old = torch.stack(scales)
    dots, magnitudes = dots.to(old.dtype), (g_norms * d_norms).to(old.dtype)
    v = torch.where(old == 0, magnitudes, torch.lerp(magnitudes, old, SCALE_DECAY))
    h = (dots / v.clamp_min(torch.finfo(v.dtype).tiny)).clamp(-MAX_SHRINK, 1.0)
    finite = torch.isfinite(h) & torch.isfinite(v)
    torch._foreach_copy_(scales, torch.where(finite, v, old).unbind())
    return torch.where(finite, beta * (h + DRIFT), 0.0), finite.to(v.dtype)


def _element_step_(part: _Part, rule: _Rule) -> None:
    products, dots, g_norms, d_norms = _inner_products(part)
    changes, finite = _tensor_changes(dots, g_norms, d_norms, part.scales, rule.beta)
    signs = products
    torch._foreach_sign_(signs)  # sign(nan) = 0
    logs = _log_ratios(part.step_sizes, rule)
    torch._foreach_add_(logs, changes.unbind())
    torch._foreach_addcmul_(logs, signs, (finite * (rule.beta * ELEMENT_RATE)).unbind())
    torch._foreach_clamp_min_(logs, _LOG_FLOOR)
    sums = _sums(logs)
    counts = _reciprocal_counts(tuple(t.numel() for t in logs), sums.dtype, sums.device)
    torch._foreach_minimum_(logs, (sums * counts + ELEMENT_SPREAD).unbind())
    _store_(part.step_sizes, logs, rule)


def _tensor_step_(part: _Part, rule: _Rule) -> None:
    _, dots, g_norms, d_norms = _inner_products(part)
    changes, _ = _tensor_changes(dots, g_norms, d_norms, part.scales, rule.beta)
    stacked = torch.stack(part.step_sizes)
    _vector_step_(stacked, changes, rule)
    torch._foreach_copy_(part.step_sizes, stacked.unbind())


def _group_step_(parts: list[_Part], s: Tensor, scale: Tensor, rule: _Rule) -> None:
    dot, g_square, d_square = (torch.zeros((), dtype=scale.dtype, device=scale.device),) * 3
    for part in parts:
        _, dots, g_norms, d_norms = _inner_products(part)
        dot = dot + dots.sum().to(scale)
        g_square = g_square + g_norms.square().sum().to(scale)
        d_square = d_square + d_norms.square().sum().to(scale)
    changes, _ = _tensor_changes(
        dot[None], g_square.sqrt()[None], d_square.sqrt()[None], [scale], rule.beta
    )
    _vector_step_(s.view(1), changes, rule)


def _vector_step_(s: Tensor, changes: Tensor, rule: _Rule) -> None:
    """The tensor-level update of a vector of step sizes ``s``, one change each, in place."""
    logs = _log_ratios([s], rule)
    logs[0].add_(changes).clamp_min_(_LOG_FLOOR)
    _store_([s], logs, rule)


def _log_ratios(step_sizes: list[Tensor], rule: _Rule) -> list[Tensor]:
    """``log(alpha / lr)``, lifted to the floor; the step sizes themselves in log space."""
    if rule.in_log_space:
        torch._foreach_clamp_min_(step_sizes, _LOG_FLOOR)
        return step_sizes
    if rule.phi.is_identity and not rule.bounded:
        ratios = step_sizes
    else:
        ratios = [
            effective_lr(s, rule.lr, rule.phi, rule.lr_min, rule.lr_max) / rule.lr
            for s in step_sizes
        ]
    logs = torch._foreach_clamp_min(ratios, FLOOR)
    torch._foreach_log_(logs)
    return logs


def _store_(step_sizes: list[Tensor], logs: list[Tensor], rule: _Rule) -> None:
    """Write ``alpha / lr = exp(logs)`` into the step sizes, within the bounds."""
    if rule.in_log_space:
        return
    if rule.phi.is_identity and not rule.bounded:
        torch._foreach_exp_(logs)
        torch._foreach_copy_(step_sizes, logs)
        return
    for s, new_logs, old_logs in zip(step_sizes, logs, _log_ratios(step_sizes, rule), strict=True):
        alpha = new_logs.exp() * rule.lr
        if rule.bounded:
            alpha = alpha.clamp(rule.lr_min, rule.lr_max)
        new = rule.phi.inverse(alpha / rule.lr)
        # Where alpha did not move, s stays exact rather than make a round trip through phi.
        s.copy_(torch.where(torch.isfinite(new) & (new_logs != old_logs), new, s))
