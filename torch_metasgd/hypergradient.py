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
    \log|\alpha| &\leftarrow \log|\alpha| + \beta \operatorname{sign}(\alpha)\,(h + \delta)
    \end{aligned}

with :math:`\mu` = :data:`SCALE_DECAY`, :math:`\nu` = :data:`MAX_SHRINK` and
:math:`\delta` = :data:`DRIFT`. At the first step :math:`h = \cos(g_t, d_{t-1})`.
While the gradients keep their size, :math:`h` stays about a cosine, so a step
size grows by at most :math:`e^{\beta(1 + \delta)}` per step; when the loss
blows up, the gradients outgrow :math:`v` and the step sizes shrink in
proportion, by up to :math:`e^{-\beta(\nu - \delta)}` per step, so that one
outlier batch cannot wipe out what was learned. The drift :math:`\delta`
offsets the bias of this greedy (one-step) hypergradient under gradient noise:
at a noisy stationary point its expectation is negative for every step size
(:math:`-\eta h_c / 2` in a direction of curvature :math:`h_c`), which would
shrink the step sizes for ever. The update is free of the scale of the loss
and of the parameters, so one :math:`\beta` suits every model (the additive
form :math:`\alpha \leftarrow \alpha - \beta\,\partial f/\partial\alpha`
diverges or stalls depending on that scale; see ``benchmarks/online.py``).

Per element (``granularity="element"``), each tensor's step sizes move
together by the tensor's :math:`h + \delta`, each element also by the sign of
its own hypergradient at :data:`ELEMENT_RATE` :math:`= \rho` of the rate, and
no element may exceed :math:`e^{\kappa}` (:data:`ELEMENT_SPREAD`
:math:`= \kappa`) times the geometric mean of its tensor's step sizes:

.. math::
    \log|\alpha_i| \leftarrow \min\Big(\log|\alpha_i| + \beta\operatorname{sign}(\alpha_i)
        \big(h + \delta + \rho \operatorname{sign}(g_{t,i}\, d_{t-1,i})\big),\;
        \operatorname{mean}_j \log|\alpha_j| + \kappa\Big)

(the mean over the updated, nonzero step sizes). The sign rule alone lets the
step sizes of elements whose gradient keeps its sign (output weights on
separable data) grow until training diverges; the cap stops that. Last,
:math:`\alpha` is clamped to ``[lr_min, lr_max]`` and
:math:`s \leftarrow \phi^{-1}(\alpha / \gamma)`. No update changes the sign of
a step size.

State, per parameter, in the optimizer's ``state`` (and so in its
``state_dict()``): ``hypergrad_direction`` (:math:`d_{t-1}`; with momentum and
without nesterov it is the momentum buffer itself, so :func:`hypergradient_step_`
must run before the step updates that buffer in place) and ``hypergrad_scale``
(:math:`v`, 0-dim; one tensor shared by the group for ``"group"``).
"""

from __future__ import annotations

from typing import Any

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
    "hypergradient_step_",
    "remember_directions",
]

SCALE_DECAY = 0.99
MAX_SHRINK = 5.0
DRIFT = 0.02
ELEMENT_RATE = 0.2
ELEMENT_SPREAD = 1.0


def hypergradient_step_(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    step_sizes: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
) -> None:
    """Move the step sizes of ``params`` along the hypergradient of the current loss, in place.

    ``params`` and ``grads`` are those of the group that have a gradient now;
    a parameter without a direction from the last step (the first step, or
    no gradient last time, so the step sizes did not move it) is left out.
    Must run under ``torch.no_grad()``, before the step.
    """
    kept = [
        (p, g, s, state[p]["hypergrad_direction"])
        for p, g, s in zip(params, grads, step_sizes, strict=True)
        if "hypergrad_direction" in state[p]
    ]
    if not kept or group["lr"] == 0:
        return
    params, grads, step_sizes, directions = map(list, zip(*kept, strict=True))
    if group["maximize"]:
        grads = [g.neg() for g in grads]
    if group["weight_decay"] != 0:
        grads = [g.add(p, alpha=group["weight_decay"]) for g, p in zip(grads, params, strict=True)]
    rule = dict(
        hypergrad_lr=group["hypergrad_lr"],
        lr=group["lr"],
        phi=parametrization(group["parametrization"]),
        lr_min=group["lr_min"],
        lr_max=group["lr_max"],
    )
    scales = _scales(group, params, step_sizes, state)
    if group["granularity"] == "group":
        _group_step_(grads, directions, step_sizes[0], scales[0], **rule)
        return
    # Multi-tensor kernels only: on CPU too they beat a loop of per-tensor ops.
    step = _tensor_step_ if group["granularity"] == "tensor" else _element_step_
    grouped = Optimizer._group_tensors_by_device_and_dtype([grads, directions, step_sizes, scales])
    for (dev_grads, dev_directions, dev_step_sizes, dev_scales), _ in grouped.values():
        step(dev_grads, dev_directions, dev_step_sizes, dev_scales, **rule)


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

    Created at 0 (no history). A group's one scale lives in the state of
    every parameter of the group as one tensor (a loaded state dict holds
    copies: they are tied again here).
    """
    if group["granularity"] != "group":
        scales = []
        for p, s in zip(params, step_sizes, strict=True):
            entry = state[p]
            if "hypergrad_scale" not in entry:
                entry["hypergrad_scale"] = s.new_zeros(())
            scales.append(entry["hypergrad_scale"])
        return scales
    scale = state[params[0]].get("hypergrad_scale")
    if scale is None:
        scale = step_sizes[0].new_zeros(())
    for p in group["params"]:
        state[p]["hypergrad_scale"] = scale
    return [scale]


def _rescaled(alpha: Tensor, log_change: Tensor) -> Tensor:
    """``alpha * exp(sign(alpha) * log_change)``: ``log|alpha|`` moved, the sign kept."""
    return alpha * torch.exp(log_change * alpha.sign())


def _set_from_alpha_(s: Tensor, alpha: Tensor, *, lr, phi: Parametrization, lr_min, lr_max):
    if lr_min is not None or lr_max is not None:
        alpha = alpha.clamp(lr_min, lr_max)
    s.copy_(phi.inverse(alpha / lr))


def _relative(dots: Tensor, magnitudes: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """``(clamp(dots / v, -MAX_SHRINK, 1), v)``, ``v`` the running average of ``magnitudes``.

    All three are stacked per-tensor scalars; ``v`` updates ``scales``, and a
    scale of 0 (no history) starts at the magnitude itself; ``dots / v`` is 0
    where ``v`` is.
    """
    v = torch.where(scales == 0, magnitudes, torch.lerp(magnitudes, scales, SCALE_DECAY))
    return (dots / v.clamp_min(torch.finfo(v.dtype).tiny)).clamp(-MAX_SHRINK, 1.0), v


def _group_step_(grads, directions, s, scale, *, hypergrad_lr, lr, phi, lr_min, lr_max):
    dot = sum(
        torch.dot(g.reshape(-1), d.reshape(-1)).to(s.device)
        for g, d in zip(grads, directions, strict=True)
    )
    g_norm = torch.stack([n.to(s.device) for n in torch._foreach_norm(grads)]).norm()
    d_norm = torch.stack([n.to(s.device) for n in torch._foreach_norm(directions)]).norm()
    h, v = _relative(dot, g_norm * d_norm, scale)
    scale.copy_(v)
    alpha = effective_lr(s, lr, phi, lr_min, lr_max)
    _set_from_alpha_(
        s,
        _rescaled(alpha, hypergrad_lr * (h + DRIFT)),
        lr=lr,
        phi=phi,
        lr_min=lr_min,
        lr_max=lr_max,
    )


# Per-tensor scalars are stacked into one vector, so that their arithmetic
# is a few kernels rather than a few per tensor.


def _log_changes(
    dots: list[Tensor], grads: list[Tensor], directions: list[Tensor], scales: list[Tensor]
) -> Tensor:
    """``hypergrad_lr``-free change of each tensor's ``log|alpha|``: ``h + DRIFT``, stacked.

    Updates the running magnitudes ``scales`` in place.
    """
    magnitudes = torch.stack(torch._foreach_norm(grads)) * torch.stack(
        torch._foreach_norm(directions)
    )
    h, v = _relative(torch.stack(dots), magnitudes, torch.stack(scales))
    torch._foreach_copy_(scales, v.unbind())
    return h + DRIFT


def _tensor_step_(grads, directions, step_sizes, scales, *, hypergrad_lr, lr, phi, lr_min, lr_max):
    dots = [torch.dot(g.reshape(-1), d.reshape(-1)) for g, d in zip(grads, directions, strict=True)]
    change = hypergrad_lr * _log_changes(dots, grads, directions, scales)
    s = torch.stack(step_sizes)
    bounded = lr_min is not None or lr_max is not None
    if not bounded and phi.is_exp:
        s = s + change
    elif not bounded and phi.is_identity:
        s = _rescaled(s, change)  # s = alpha / lr: the rule is scale-free
    else:
        alpha = _rescaled(effective_lr(s, lr, phi, lr_min, lr_max), change)
        if bounded:
            alpha = alpha.clamp(lr_min, lr_max)
        s = phi.inverse(alpha / lr)
    torch._foreach_copy_(step_sizes, s.unbind())


def _element_step_(grads, directions, step_sizes, scales, *, hypergrad_lr, lr, phi, lr_min, lr_max):
    # changes: beta * (h + DRIFT + ELEMENT_RATE * sign(g * d)), the change of log|alpha|.
    changes = torch._foreach_mul(grads, directions)
    tensor_changes = _log_changes([c.sum() for c in changes], grads, directions, scales)
    torch._foreach_sign_(changes)
    torch._foreach_mul_(changes, hypergrad_lr * ELEMENT_RATE)
    torch._foreach_add_(changes, (hypergrad_lr * tensor_changes).unbind())
    bounded = lr_min is not None or lr_max is not None
    if not bounded and phi.is_exp:
        # s = log(alpha / lr): the update is an addition, and the cap a minimum, in s.
        torch._foreach_add_(step_sizes, changes)
        means = torch.stack([s.mean() for s in step_sizes])
        torch._foreach_minimum_(step_sizes, (means + ELEMENT_SPREAD).unbind())
        return
    if not bounded and phi.is_identity:
        alphas = step_sizes  # alpha / lr, updated in place: the rule is scale-free
    else:
        alphas = [effective_lr(s, lr, phi, lr_min, lr_max) for s in step_sizes]
    torch._foreach_mul_(changes, torch._foreach_sign(alphas))
    torch._foreach_exp_(changes)
    torch._foreach_mul_(alphas, changes)
    caps = _spread_caps(alphas)
    torch._foreach_minimum_(alphas, caps.unbind())
    torch._foreach_maximum_(alphas, caps.neg().unbind())
    if alphas is not step_sizes:
        for s, alpha in zip(step_sizes, alphas, strict=True):
            _set_from_alpha_(s, alpha, lr=lr, phi=phi, lr_min=lr_min, lr_max=lr_max)


def _spread_caps(alphas: list[Tensor]) -> Tensor:
    """``e^ELEMENT_SPREAD`` times the geometric mean of each ``|alpha|``, stacked.

    Zero step sizes (which the multiplicative rule keeps at zero) are left
    out of the mean; an all-zero tensor gets a cap of 0.
    """
    magnitudes = torch._foreach_abs(alphas)
    nonzero = torch._foreach_sign(magnitudes)  # 1 where alpha != 0, else 0
    counts = torch.stack(torch._foreach_norm(nonzero, 1))
    # log|alpha| where alpha != 0, log 1 = 0 where alpha == 0.
    logs = torch._foreach_sub(magnitudes, nonzero)
    torch._foreach_add_(logs, 1)
    torch._foreach_log_(logs)
    log_means = torch.stack([t.sum() for t in logs]) / counts.clamp_min(1)
    return torch.exp(log_means + ELEMENT_SPREAD) * counts.sign()
