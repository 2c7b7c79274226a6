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


def hypergradient_step_(
    params: list[Tensor],
    grads: list[Tensor],
    directions: list[Tensor],
    step_sizes: list[Tensor],
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
        \frac{\partial f(\theta_t)}{\partial \alpha} = -g_t \odot d_{t-1},

    summed over each step size's elements (``"tensor"``: the tensor,
    ``"group"``: every tensor of ``params``). The step sizes take the
    normalised multiplicative step

    .. math::
        \alpha \leftarrow \operatorname{clamp}\Big(\alpha \exp\big(\beta
            \operatorname{sign}(\alpha) \cos(g_t, d_{t-1})\big),
            \alpha_{\min}, \alpha_{\max}\Big),
        \qquad s \leftarrow \phi^{-1}(\alpha / \gamma)

    with :math:`\cos` the cosine over those elements (per element: the sign of
    :math:`g_t d_{t-1}`): the update is free of the scale of the loss and of
    the parameters, and never changes the sign of a step size. Must run under
    ``torch.no_grad()`` with ``lr > 0``.
    """
    objective_grads = grads
    if maximize or weight_decay != 0:
        objective_grads = []
        for param, grad in zip(params, grads, strict=True):
            g = -grad if maximize else grad
            if weight_decay != 0:
                g = g.add(param, alpha=weight_decay)
            objective_grads.append(g)
    unbounded = lr_min is None and lr_max is None
    if granularity == "element":
        # Per element the cosine is a sign: cos = sign(g * d).
        cosines = torch._foreach_mul(objective_grads, directions)
        if unbounded and parametrization == "identity":
            # sign(alpha) = sign(s) as lr > 0: fold it in before taking the sign.
            torch._foreach_mul_(cosines, step_sizes)
        torch._foreach_sign_(cosines)
    elif granularity == "tensor":
        cosines = [
            torch.dot(g.reshape(-1), d.reshape(-1))
            for g, d in zip(objective_grads, directions, strict=True)
        ]
        norms = torch._foreach_mul(
            torch._foreach_norm(objective_grads), torch._foreach_norm(directions)
        )
        # A zero gradient or direction gives a zero dot product: no update.
        torch._foreach_clamp_min_(norms, torch.finfo(norms[0].dtype).tiny)
        torch._foreach_div_(cosines, norms)
    else:
        x_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(objective_grads)))
        y_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(directions)))
        dot = sum(
            torch.dot(g.reshape(-1), d.reshape(-1))
            for g, d in zip(objective_grads, directions, strict=True)
        )
        cosines = [dot / (x_norm * y_norm).clamp_min(torch.finfo(dot.dtype).tiny)]
        step_sizes = step_sizes[:1]
    # Closed forms of s = f^{-1}(alpha exp(beta sign(alpha) cos) / lr), as a
    # few foreach kernels; the general path below takes a dozen per tensor.
    if unbounded and parametrization == "log":
        torch._foreach_add_(step_sizes, cosines, alpha=hypergrad_lr)
    elif unbounded and parametrization == "identity":
        if granularity != "element":
            torch._foreach_mul_(cosines, torch._foreach_sign(step_sizes))
        torch._foreach_mul_(cosines, hypergrad_lr)
        torch._foreach_exp_(cosines)
        torch._foreach_mul_(step_sizes, cosines)
    else:
        for s, c in zip(step_sizes, cosines, strict=True):
            alpha = effective_lr(s, lr, parametrization, lr_min, lr_max)
            alpha = alpha * torch.exp(c * torch.sign(alpha) * hypergrad_lr)
            if lr_min is not None or lr_max is not None:
                alpha = alpha.clamp(lr_min, lr_max)
            s.copy_(inverse_transform(alpha / lr, parametrization))


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
    params, grads, momentum_buffers, step_sizes, *, lr, weight_decay, momentum, dampening,
    nesterov, maximize, parametrization, lr_min, lr_max, directions,
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
    params, grads, momentum_buffers, step_sizes, *, lr, weight_decay, momentum, dampening,
    nesterov, maximize, parametrization, lr_min, lr_max, directions,
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
