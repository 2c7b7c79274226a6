"""The arithmetic of Meta-SGD, as pure functions.

Everything here is shared by the in-place optimizer (:mod:`.optimizer`), the
differentiable twin used with ``higher`` (:mod:`.differentiable`) and the
``torch.func`` path (:mod:`.func`), so the three cannot drift apart.

Notation: ``s`` is a step-size parameter, ``f`` its parametrization, and the
step size applied to a parameter is ``clamp(lr * f(s), lr_min, lr_max)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

__all__ = [
    "GRANULARITIES",
    "PARAMETRIZATIONS",
    "initial_step_size",
    "transform",
    "inverse_transform",
    "effective_lr",
    "sgd_direction",
    "metasgd",
    "hypergradient_step_",
]

GRANULARITIES = ("element", "tensor", "group")
PARAMETRIZATIONS = ("identity", "log", "softplus")

_LOG2 = math.log(2.0)
# f(s) = softplus(s) / log 2, so that f(0) = 1.
_INITIAL = {"identity": 1.0, "log": 0.0, "softplus": 0.0}


def initial_step_size(parametrization: str) -> float:
    """The value of ``s`` for which ``f(s) == 1``."""
    return _INITIAL[parametrization]


def transform(s: Tensor, parametrization: str) -> Tensor:
    """``f(s)``: the multiplier of ``lr`` that a step-size parameter stands for."""
    if parametrization == "identity":
        return s
    if parametrization == "log":
        return s.exp()
    return torch.nn.functional.softplus(s) / _LOG2


def inverse_transform(x: Tensor, parametrization: str) -> Tensor:
    """``f^{-1}(x)``; ``x`` must be positive unless the parametrization is identity."""
    if parametrization == "identity":
        return x
    if parametrization == "log":
        return x.log()
    # log(expm1(y)) written as y + log(-expm1(-y)): expm1(y) overflows for
    # y > 88 in float32 (e.g. a step size of 0.1 with lr=1e-3).
    y = x * _LOG2
    return y + (-y).expm1().neg().log()


def effective_lr(
    s: Tensor,
    lr: float,
    parametrization: str,
    lr_min: float | None = None,
    lr_max: float | None = None,
) -> Tensor:
    """``clamp(lr * f(s), lr_min, lr_max)``, differentiable in ``s``."""
    eff = transform(s, parametrization) * lr
    if lr_min is not None or lr_max is not None:
        eff = eff.clamp(lr_min, lr_max)
    return eff


# The hypergradient is measured in units of its running magnitude, an average
# over about 1 / (1 - SCALE_DECAY) steps, and clipped to [-MAX_SHRINK, 1]: a
# blow-up brakes up to five times as hard as any growth, but one outlier batch
# cannot wipe out what was learned. log|alpha| drifts up by DRIFT *
# hypergrad_lr per step to offset the hypergradient's bias toward small steps.
SCALE_DECAY = 0.99
MAX_SHRINK = 5.0
DRIFT = 0.02
# Per-element step sizes: the share of hypergrad_lr that each element moves by
# on its own, and how far (in log) above its tensor's geometric mean it may go.
ELEMENT_RATE = 0.2
ELEMENT_SPREAD = 1.0


def hypergradient_step_(
    params: list[Tensor],
    grads: list[Tensor],
    directions: list[Tensor],
    step_sizes: list[Tensor],
    scales: list[Tensor],
    *,
    hypergrad_lr: float,
    granularity: str,
    weight_decay: float,
    maximize: bool,
    lr: float,
    parametrization: str,
    lr_min: float | None,
    lr_max: float | None,
) -> None:
    r"""Move the step sizes along the hypergradient of the current loss, in place.

    ``params`` are :math:`\theta_t = \theta_{t-1} - \alpha(s) \odot d_{t-1}`,
    ``grads`` their raw gradients and ``directions`` the :math:`d_{t-1}` of
    the previous step. With :math:`g_t = \pm\nabla f(\theta_t) + \lambda\theta_t`
    (the gradient of the objective the step descends),

    .. math::
        \frac{\partial f(\theta_t)}{\partial \alpha} = -g_t \odot d_{t-1}.

    Summed over the elements that share a step size's rule (a tensor, or
    every tensor of ``params`` for ``"group"``) it gives
    :math:`p = \langle g_t, d_{t-1}\rangle`, which is measured against its
    running magnitude :math:`v` (``scales``: one 0-dim tensor per tensor, a
    single one for ``"group"``; updated in place, and 0 means no history yet):

    .. math::
        \begin{aligned}
        v &\leftarrow \mu v + (1 - \mu)\,\|g_t\|\,\|d_{t-1}\|
            \quad (v \leftarrow \|g_t\|\,\|d_{t-1}\| \text{ if } v = 0) \\
        h &= \operatorname{clamp}(p / v,\; -\nu,\; 1) \\
        \log|\alpha| &\leftarrow \log|\alpha| + \beta \operatorname{sign}(\alpha)\,(h + \delta)
        \end{aligned}

    with :math:`\mu` = :data:`SCALE_DECAY`, :math:`\nu` = :data:`MAX_SHRINK`
    and :math:`\delta` = :data:`DRIFT`. At the first step
    :math:`h = \cos(g_t, d_{t-1})`. In a quiet stretch :math:`h` stays about a
    cosine, so growth is bounded by :math:`\beta(1 + \delta)` per step; when
    the loss blows up, the gradients outgrow :math:`v` and the step sizes
    shrink in proportion, by up to :math:`\beta(\nu - \delta)` per step. The
    drift :math:`\delta` offsets the bias of this greedy (one-step)
    hypergradient under gradient noise: at a noisy stationary point its
    expectation is negative for every step size (:math:`-\eta h_c / 2` in a
    direction of curvature :math:`h_c`), which would shrink the step sizes
    for ever.

    Per element (``"element"``), each tensor's step sizes move together by
    the tensor's :math:`h + \delta` and each element also by the sign of its
    own hypergradient, at :data:`ELEMENT_RATE` :math:`= \rho` of the rate, and
    no element may exceed :math:`e^{\kappa}` (:data:`ELEMENT_SPREAD`
    :math:`= \kappa`) times the geometric mean of its tensor's step sizes:

    .. math::
        \begin{aligned}
        \log|\alpha_i| &\leftarrow \log|\alpha_i| + \beta \operatorname{sign}(\alpha_i)
            \big(h + \delta + \rho \operatorname{sign}(g_{t,i}\, d_{t-1,i})\big) \\
        \log|\alpha_i| &\leftarrow \min\big(\log|\alpha_i|,\;
            \operatorname{mean}_j \log|\alpha_j| + \kappa\big)
        \end{aligned}

    The sign rule alone lets the step sizes of elements whose gradient keeps
    its sign (output weights on separable data) grow without bound until
    training diverges; the cap stops that. Last, :math:`\alpha` is clamped to
    ``[lr_min, lr_max]`` and :math:`s \leftarrow \phi^{-1}(\alpha / \gamma)`.
    Every update is free of the scale of the loss and of the parameters, and
    none changes the sign of a step size. Must run under ``torch.no_grad()``
    with ``lr > 0``.
    """
    if maximize:
        grads = [g.neg() for g in grads]
    if weight_decay != 0:
        grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params, strict=True)]
    hyper = dict(
        hypergrad_lr=hypergrad_lr,
        lr=lr,
        parametrization=parametrization,
        lr_min=lr_min,
        lr_max=lr_max,
    )
    if granularity == "group":
        _group_hypergradient_step_(grads, directions, step_sizes[0], scales[0], **hyper)
        return
    # Multi-tensor kernels only: on CPU too they beat a loop of per-tensor ops.
    grouped = Optimizer._group_tensors_by_device_and_dtype([grads, directions, step_sizes, scales])
    for (dev_grads, dev_directions, dev_step_sizes, dev_scales), _ in grouped.values():
        step = _tensor_step_ if granularity == "tensor" else _element_step_
        step(dev_grads, dev_directions, dev_step_sizes, dev_scales, **hyper)


def _rescaled(alpha: Tensor, log_change: Tensor) -> Tensor:
    """``alpha * exp(sign(alpha) * log_change)``: ``log|alpha|`` moved, the sign kept."""
    return alpha * torch.exp(log_change * alpha.sign())


def _set_from_alpha_(s: Tensor, alpha: Tensor, *, lr, parametrization, lr_min, lr_max) -> None:
    if lr_min is not None or lr_max is not None:
        alpha = alpha.clamp(lr_min, lr_max)
    s.copy_(inverse_transform(alpha / lr, parametrization))


def _relative(dots: Tensor, magnitudes: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """``(clamp(dots / v, -MAX_SHRINK, 1), v)``, ``v`` the running average of ``magnitudes``.

    All three are stacked per-tensor scalars; ``v`` updates ``scales``, and a
    scale of 0 (no history) starts at the magnitude itself; ``dots / v`` is 0
    where ``v`` is.
    """
    v = torch.where(scales == 0, magnitudes, torch.lerp(magnitudes, scales, SCALE_DECAY))
    return (dots / v.clamp_min(torch.finfo(v.dtype).tiny)).clamp(-MAX_SHRINK, 1.0), v


def _group_hypergradient_step_(
    grads, directions, s, scale, *, hypergrad_lr, lr, parametrization, **bounds
):
    dot = sum(
        torch.dot(g.reshape(-1), d.reshape(-1)).to(s.device)
        for g, d in zip(grads, directions, strict=True)
    )
    g_norm = torch.stack([n.to(s.device) for n in torch._foreach_norm(grads)]).norm()
    d_norm = torch.stack([n.to(s.device) for n in torch._foreach_norm(directions)]).norm()
    h, v = _relative(dot, g_norm * d_norm, scale)
    scale.copy_(v)
    alpha = effective_lr(s, lr, parametrization, **bounds)
    _set_from_alpha_(
        s,
        _rescaled(alpha, hypergrad_lr * (h + DRIFT)),
        lr=lr,
        parametrization=parametrization,
        **bounds,
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


def _tensor_step_(
    grads, directions, step_sizes, scales, *, hypergrad_lr, lr, parametrization, lr_min, lr_max
):
    dots = [torch.dot(g.reshape(-1), d.reshape(-1)) for g, d in zip(grads, directions, strict=True)]
    change = hypergrad_lr * _log_changes(dots, grads, directions, scales)
    s = torch.stack(step_sizes)
    if lr_min is None and lr_max is None and parametrization == "log":
        s = s + change
    elif lr_min is None and lr_max is None and parametrization == "identity":
        s = _rescaled(s, change)  # s = alpha / lr: the rule is scale-free
    else:
        alpha = _rescaled(effective_lr(s, lr, parametrization, lr_min, lr_max), change)
        if lr_min is not None or lr_max is not None:
            alpha = alpha.clamp(lr_min, lr_max)
        s = inverse_transform(alpha / lr, parametrization)
    torch._foreach_copy_(step_sizes, s.unbind())


def _element_step_(
    grads, directions, step_sizes, scales, *, hypergrad_lr, lr, parametrization, lr_min, lr_max
):
    # changes: beta * (h + DRIFT + ELEMENT_RATE * sign(g * d)), the change of log|alpha|.
    changes = torch._foreach_mul(grads, directions)
    tensor_changes = _log_changes([c.sum() for c in changes], grads, directions, scales)
    torch._foreach_sign_(changes)
    torch._foreach_mul_(changes, hypergrad_lr * ELEMENT_RATE)
    torch._foreach_add_(changes, (hypergrad_lr * tensor_changes).unbind())
    if lr_min is None and lr_max is None and parametrization == "log":
        # s = log(alpha / lr): the update is an addition, and the cap a minimum, in s.
        torch._foreach_add_(step_sizes, changes)
        means = torch.stack([s.mean() for s in step_sizes])
        torch._foreach_minimum_(step_sizes, (means + ELEMENT_SPREAD).unbind())
        return
    if lr_min is None and lr_max is None and parametrization == "identity":
        alphas = step_sizes  # alpha / lr, updated in place: the rule is scale-free
    else:
        alphas = [effective_lr(s, lr, parametrization, lr_min, lr_max) for s in step_sizes]
    torch._foreach_mul_(changes, torch._foreach_sign(alphas))
    torch._foreach_exp_(changes)
    torch._foreach_mul_(alphas, changes)
    caps = _spread_caps(alphas)
    torch._foreach_minimum_(alphas, caps.unbind())
    torch._foreach_maximum_(alphas, caps.neg().unbind())
    if alphas is not step_sizes:
        for s, alpha in zip(step_sizes, alphas, strict=True):
            _set_from_alpha_(
                s, alpha, lr=lr, parametrization=parametrization, lr_min=lr_min, lr_max=lr_max
            )


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


def sgd_direction(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> tuple[Tensor, Tensor | None]:
    """The direction ``d`` that torch.optim.SGD scales by ``lr``, out of place.

    Returns ``(d, new_momentum_buffer)``. Nothing is modified, so the result
    is differentiable in every input; this is the step of the differentiable
    and functional paths.
    """
    d = -grad if maximize else grad
    if weight_decay != 0:
        d = d + weight_decay * param
    if momentum == 0:
        return d, None
    if momentum_buffer is None:
        buf = d
    else:
        buf = momentum * momentum_buffer + (1 - dampening) * d
    return (d + momentum * buf if nesterov else buf), buf


def metasgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    step_sizes: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    parametrization: str,
    lr_min: float | None,
    lr_max: float | None,
    foreach: bool,
    directions: list[Tensor | None] | None = None,
) -> None:
    """One in-place Meta-SGD step on ``params``; see :class:`torch_metasgd.MetaSGD`.

    ``momentum_buffers`` is updated in place (``None`` entries are filled on
    the first step); it is empty when ``momentum == 0``. ``directions``, when
    given (one entry per parameter), receives each direction ``d`` for the
    hypergradient of the next step; it never aliases a gradient, which
    ``zero_grad`` or the next backward may overwrite. Must run under
    ``torch.no_grad()``.
    """
    if not params:
        return
    step = _multi_tensor_metasgd if foreach else _single_tensor_metasgd
    step(
        params,
        grads,
        momentum_buffers,
        step_sizes,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        parametrization=parametrization,
        lr_min=lr_min,
        lr_max=lr_max,
        directions=directions,
    )


def _single_tensor_metasgd(
    params,
    grads,
    momentum_buffers,
    step_sizes,
    *,
    lr,
    weight_decay,
    momentum,
    dampening,
    nesterov,
    maximize,
    parametrization,
    lr_min,
    lr_max,
    directions,
) -> None:
    unclamped_identity = parametrization == "identity" and lr_min is None and lr_max is None
    for i, (param, grad, s) in enumerate(zip(params, grads, step_sizes, strict=True)):
        d = -grad if maximize else grad
        if weight_decay != 0:
            d = d.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = d.detach().clone()
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        if directions is not None:
            directions[i] = d.clone() if d is grad else d
        if unclamped_identity:
            param.addcmul_(d, s, value=-lr)
        else:
            param.addcmul_(d, effective_lr(s, lr, parametrization, lr_min, lr_max), value=-1)


def _multi_tensor_metasgd(
    params,
    grads,
    momentum_buffers,
    step_sizes,
    *,
    lr,
    weight_decay,
    momentum,
    dampening,
    nesterov,
    maximize,
    parametrization,
    lr_min,
    lr_max,
    directions,
) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, step_sizes, momentum_buffers], with_indices=True
    )
    for (dev_params, dev_grads, dev_steps, dev_bufs), indices in grouped.values():
        d = torch._foreach_neg(dev_grads) if maximize else dev_grads
        if weight_decay != 0:
            if maximize:
                torch._foreach_add_(d, dev_params, alpha=weight_decay)
            else:
                d = torch._foreach_add(d, dev_params, alpha=weight_decay)
        if momentum != 0:
            if all(b is not None for b in dev_bufs):
                torch._foreach_mul_(dev_bufs, momentum)
                torch._foreach_add_(dev_bufs, d, alpha=1 - dampening)
            else:
                for j, buf in enumerate(dev_bufs):
                    if buf is None:
                        dev_bufs[j] = momentum_buffers[indices[j]] = d[j].detach().clone()
                    else:
                        buf.mul_(momentum).add_(d[j], alpha=1 - dampening)
            if nesterov:
                if d is dev_grads:
                    d = torch._foreach_add(d, dev_bufs, alpha=momentum)
                else:
                    torch._foreach_add_(d, dev_bufs, alpha=momentum)
            else:
                d = dev_bufs
        if directions is not None:
            kept = [g.clone() for g in d] if d is dev_grads else d
            for j, index in enumerate(indices):
                directions[index] = kept[j]
        if parametrization == "identity" and lr_min is None and lr_max is None:
            torch._foreach_addcmul_(dev_params, d, dev_steps, value=-lr)
        else:
            eff = _multi_tensor_effective_lr(dev_steps, lr, parametrization, lr_min, lr_max)
            torch._foreach_addcmul_(dev_params, d, eff, value=-1)


def _multi_tensor_effective_lr(steps, lr, parametrization, lr_min, lr_max) -> list[Tensor]:
    if parametrization == "identity":
        eff = torch._foreach_mul(steps, lr)
    elif parametrization == "log":
        eff = torch._foreach_exp(steps)
        torch._foreach_mul_(eff, lr)
    else:
        eff = [transform(s, parametrization) * lr for s in steps]
    if lr_min is not None:
        torch._foreach_clamp_min_(eff, lr_min)
    if lr_max is not None:
        torch._foreach_clamp_max_(eff, lr_max)
    return eff
