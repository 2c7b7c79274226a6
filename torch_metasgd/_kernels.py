r"""The arithmetic of a Meta-SGD step, written once and called by every path.

.. math::
    \theta \leftarrow \theta - \alpha \odot d, \qquad
    \alpha = \operatorname{clamp}(\gamma\,\phi(s), \alpha_{\min}, \alpha_{\max})

* :func:`sgd_direction`: SGD's direction :math:`d` (SGD's own step is
  :math:`-\gamma d`): maximize, weight decay, momentum, dampening, nesterov.
  One definition, run three ways (:class:`Arithmetic`): out of place and
  differentiable, in place on one tensor, in place on a list of tensors.
* :func:`effective_lr`: :math:`\alpha` from a step-size parameter.
* :func:`metasgd_update`: the out-of-place step :math:`\theta - \alpha d` of the
  differentiable paths (the ``higher`` twin and the ``torch.func`` path).
* :func:`metasgd`: the in-place step of ``MetaSGD.step()``, single- or
  multi-tensor, as ``torch.optim.sgd`` is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import _parametrizations
from ._parametrizations import Parametrization

__all__ = [
    "SGDOptions",
    "sgd_options",
    "group_lr",
    "step_options",
    "sgd_direction",
    "effective_lr",
    "effective_lrs",
    "metasgd_update",
    "metasgd",
    "group_by_device_and_dtype",
]


class SGDOptions(NamedTuple):
    """A param group's options that define SGD's direction, in :func:`sgd_direction`'s order."""

    weight_decay: float
    momentum: float
    dampening: float
    nesterov: bool
    maximize: bool


def sgd_options(group: dict[str, Any]) -> SGDOptions:
    """A param group's :class:`SGDOptions`."""
    return SGDOptions(*(group[key] for key in SGDOptions._fields))


def group_lr(group: dict[str, Any]) -> float | Tensor:
    """A group's ``lr``; a one-element tensor of any shape as a 0-dim one (differentiably)."""
    lr = group["lr"]
    return lr.reshape(()) if isinstance(lr, Tensor) and lr.dim() != 0 else lr


def step_options(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's options as :func:`metasgd`'s keyword arguments (but ``foreach``)."""
    return dict(
        lr=group_lr(group),
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
        parametrization=group["parametrization"],
        lr_min=group["lr_min"],
        lr_max=group["lr_max"],
        differentiable=group["differentiable"],
    )


class Arithmetic(NamedTuple):
    """The operations of :func:`sgd_direction`, on one tensor or on a list of tensors."""

    neg: Callable
    #: ``add(a, b, alpha=c)``: a new ``a + c * b``.
    add: Callable
    #: The first momentum buffer from the first direction.
    first_buffer: Callable
    #: ``accumulate(buf, d, momentum, dampening)``: ``momentum * buf + (1 - dampening) * d``.
    accumulate: Callable


def _accumulate(buf, d, momentum, dampening):
    return torch.add(buf * momentum, d, alpha=1 - dampening)


def _accumulate_(buf, d, momentum, dampening):
    return buf.mul_(momentum).add_(d, alpha=1 - dampening)


def _foreach_accumulate_(bufs, d, momentum, dampening):
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d, alpha=1 - dampening)
    return bufs


#: Out of place, differentiable in every input (also under ``torch.func``).
DIFFERENTIABLE = Arithmetic(torch.neg, torch.add, lambda d: d, _accumulate)
#: In place on the momentum buffer, whose first value is a copy: the direction
#: may be the gradient itself, which ``zero_grad`` or a backward overwrites.
IN_PLACE = Arithmetic(torch.neg, torch.add, torch.clone, _accumulate_)
#: :data:`IN_PLACE` on lists, one multi-tensor kernel per operation.
FOREACH_IN_PLACE = Arithmetic(
    torch._foreach_neg,
    torch._foreach_add,
    lambda ds: [d.clone() for d in ds],
    _foreach_accumulate_,
)


def sgd_direction(
    param,
    grad,
    momentum_buffer,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    arithmetic: Arithmetic = DIFFERENTIABLE,
):
    r"""SGD's direction :math:`d` and the new momentum buffer: ``(d, buffer)``.

    .. math::
        g \leftarrow \pm\nabla + \lambda\theta, \quad
        b \leftarrow \mu b + (1 - \tau) g \;(b = g \text{ at first}), \quad
        d = g + \mu b \text{ if nesterov, else } b \text{ (} g \text{ if } \mu = 0)

    The buffer is ``None`` when ``momentum == 0``. With the default
    :data:`DIFFERENTIABLE` arithmetic nothing is modified and the result is
    differentiable in every input. The options may be passed in the order of
    :class:`SGDOptions` (``*options``): the in-place step calls this once per
    tensor.
    """
    d = arithmetic.neg(grad) if maximize else grad
    if weight_decay != 0:
        d = arithmetic.add(d, param, alpha=weight_decay)
    if momentum == 0:
        return d, None
    if momentum_buffer is None:
        buf = arithmetic.first_buffer(d)
    else:
        buf = arithmetic.accumulate(momentum_buffer, d, momentum, dampening)
    return (arithmetic.add(d, buf, alpha=momentum) if nesterov else buf), buf


def effective_lr(
    s: Tensor,
    lr: float | Tensor,
    phi: Parametrization,
    lr_min: float | None = None,
    lr_max: float | None = None,
    tasks: int | None = None,
) -> Tensor:
    r"""The step size :math:`\operatorname{clamp}(\gamma\,\phi(s), \alpha_{\min}, \alpha_{\max})`.

    Differentiable in ``s`` (and in ``lr`` when it is a tensor). At a bound
    the gradient passes where a descent step would move the step size back
    inside (a negative gradient at ``lr_min``, a positive one at ``lr_max``)
    and is zero where it would push it further out: a clamped step size is
    never pinned for good, and never drifts away beyond its bound. That is
    decided per use: with ``tasks=T`` the step size is expanded to ``T``
    copies first (shape ``(T, *s.shape)``), so that each task's inner loop is
    one use, as each :func:`~torch_metasgd.inner_loop` is.
    """
    alpha = phi.forward(s) * lr
    if tasks is not None:
        alpha = alpha.expand(tasks, *alpha.shape)
    if lr_min is None and lr_max is None:
        return alpha
    if torch.is_grad_enabled() and alpha.requires_grad:
        return _InwardClamp.apply(alpha, lr_min, lr_max)
    return alpha.clamp(lr_min, lr_max)


class _InwardClamp(torch.autograd.Function):
    """``clamp`` whose gradient passes at a bound when it points back inside."""

    generate_vmap_rule = True

    @staticmethod
    def forward(alpha: Tensor, lr_min: float | None, lr_max: float | None) -> Tensor:
        return alpha.clamp(lr_min, lr_max)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        alpha, ctx.lr_min, ctx.lr_max = inputs
        ctx.save_for_backward(alpha)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (alpha,) = ctx.saved_tensors
        # Descent moves alpha by -grad: below lr_min only a negative gradient
        # brings it back, above lr_max only a positive one.
        outward = torch.zeros_like(alpha, dtype=torch.bool)
        if ctx.lr_min is not None:
            outward |= (alpha < ctx.lr_min) & (grad > 0)
        if ctx.lr_max is not None:
            outward |= (alpha > ctx.lr_max) & (grad < 0)
        return grad.masked_fill(outward, 0), None, None


def effective_lrs(
    group: dict[str, Any], step_sizes: list[Tensor], tasks: int | None = None
) -> list[Tensor]:
    """:func:`effective_lr` of every step size of a group, computed once per tensor.

    A ``"group"`` step size is shared by every parameter of the group: its
    step size is one graph node (one use), whatever the number of parameters.
    """
    phi = _parametrizations.parametrization(group["parametrization"])
    computed: dict[int, Tensor] = {}
    for s in step_sizes:
        if id(s) not in computed:
            computed[id(s)] = effective_lr(
                s, group_lr(group), phi, group["lr_min"], group["lr_max"], tasks
            )
    return [computed[id(s)] for s in step_sizes]


def metasgd_update(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    alpha: Tensor,
    options: SGDOptions,
    first_order: bool = False,
) -> tuple[Tensor, Tensor | None]:
    r"""The differentiable step: ``(theta - alpha * d, new momentum buffer)``, out of place.

    ``first_order`` treats the direction
    as a constant (the caller computes ``grad`` without a graph; weight decay
    then reads the detached weights): first-order MAML for :math:`\theta`,
    the exact first-order gradient for :math:`\alpha`.
    """
    point = param.detach() if first_order else param
    d, buf = sgd_direction(point, grad, momentum_buffer, *options)
    return param - alpha * d, buf


class _StepRule(NamedTuple):
    """Everything an in-place step needs besides the tensors."""

    lr: float | Tensor
    phi: Parametrization
    lr_min: float | None
    lr_max: float | None
    options: SGDOptions

    @property
    def folds_into_lr(self) -> bool:
        # Unbounded with a float lr, alpha = lr * phi(s): lr is the update's
        # scalar, and no alpha tensor (for the identity, no tensor at all) is built.
        return self.lr_min is None and self.lr_max is None and not isinstance(self.lr, Tensor)


def metasgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    step_sizes: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    parametrization: str,
    lr_min: float | None,
    lr_max: float | None,
    foreach: bool,
    differentiable: bool = False,
    keep_directions: bool = False,
) -> list[Tensor] | None:
    """One in-place Meta-SGD step on ``params``; see :class:`torch_metasgd.MetaSGD`.

    ``momentum_buffers`` (empty when ``momentum == 0``) is updated in place,
    its ``None`` entries filled, as ``torch.optim.sgd`` does; ``differentiable``
    steps tensor by tensor and puts new buffers in its list instead, since an
    earlier step's graph holds the old ones (the parameters still move in
    place: no graph holds them). With
    ``keep_directions``, returns every parameter's direction ``d``, for the
    next step's hypergradient; a direction is never the gradient tensor
    itself, which ``zero_grad`` or the next backward may overwrite, but it may
    be the momentum buffer, which the next step updates in place. Must run
    under ``torch.no_grad()``.
    """
    if not params:
        return [] if keep_directions else None
    rule = _StepRule(
        lr,
        _parametrizations.parametrization(parametrization),
        lr_min,
        lr_max,
        SGDOptions(weight_decay, momentum, dampening, nesterov, maximize),
    )
    # A buffer's first value is a copy of its direction: that step runs per
    # tensor, every later one on the whole list at once.
    first_buffers = momentum != 0 and any(b is None for b in momentum_buffers)
    if foreach and not (first_buffers or differentiable):
        return _multi_tensor_metasgd(
            params, grads, momentum_buffers, step_sizes, rule, keep_directions
        )
    arithmetic = DIFFERENTIABLE if differentiable else IN_PLACE
    return _single_tensor_metasgd(
        params, grads, momentum_buffers, step_sizes, rule, keep_directions, arithmetic
    )


def _single_tensor_metasgd(
    params,
    grads,
    momentum_buffers,
    step_sizes,
    rule: _StepRule,
    keep_directions: bool,
    arithmetic: Arithmetic,
) -> list[Tensor] | None:
    folds = rule.folds_into_lr
    # Without momentum, weight decay or maximize the direction is the gradient:
    # no call per tensor (a third of a small tensor's step on CPU).
    plain = not (rule.options.momentum or rule.options.weight_decay or rule.options.maximize)
    directions = [] if keep_directions else None
    for i, (param, grad, s) in enumerate(zip(params, grads, step_sizes, strict=True)):
        if plain:
            d = grad
        else:
            buf = momentum_buffers[i] if momentum_buffers else None
            d, buf = sgd_direction(param, grad, buf, *rule.options, arithmetic)
            if buf is not None:
                momentum_buffers[i] = buf
        if keep_directions:
            directions.append(d.clone() if d is grad else d)
        if folds and not d.is_sparse:
            param.addcmul_(d, rule.phi.forward(s), value=-rule.lr)
            continue
        alpha = effective_lr(s, rule.lr, rule.phi, rule.lr_min, rule.lr_max)
        if d.is_sparse:
            # addcmul_ has no sparse kernel; a sparse times a dense tensor stays sparse.
            param.sub_(d * alpha)
        else:
            param.addcmul_(d, alpha, value=-1)
    return directions


def group_by_device_and_dtype(lists: list[list]) -> list[tuple[list[list], Sequence[int]]]:
    """``lists`` (the parameters first, then lists alike or empty) split by the parameters'
    device and dtype, each part with its tensors' indices: torch.optim's grouping.

    A group of one device and dtype, the common case, comes back whole after
    two checks that take a fifth of the time torch's grouping does on 100 tensors.
    """
    params = lists[0]
    device, dtype = params[0].device, params[0].dtype
    if all(p.dtype is dtype for p in params) and all(p.device == device for p in params):
        return [(lists, range(len(params)))]
    return list(Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True).values())


def _multi_tensor_metasgd(
    params, grads, momentum_buffers, step_sizes, rule: _StepRule, keep_directions: bool
) -> list[Tensor] | None:
    directions: list[Tensor | None] = [None] * len(params) if keep_directions else None
    grouped = group_by_device_and_dtype([params, grads, step_sizes, momentum_buffers])
    for (dev_params, dev_grads, dev_steps, dev_bufs), indices in grouped:
        d, _ = sgd_direction(dev_params, dev_grads, dev_bufs, *rule.options, FOREACH_IN_PLACE)
        if keep_directions:
            kept = [g.clone() for g in d] if d is dev_grads else d
            for j, index in enumerate(indices):
                directions[index] = kept[j]
        if rule.folds_into_lr:
            factors = rule.phi.forward_all(dev_steps)
            torch._foreach_addcmul_(dev_params, d, factors, value=-rule.lr)
        else:
            torch._foreach_addcmul_(dev_params, d, _foreach_effective_lr(dev_steps, rule), value=-1)
    return directions


def _foreach_effective_lr(step_sizes: list[Tensor], rule: _StepRule) -> list[Tensor]:
    alphas = rule.phi.forward_all(step_sizes)
    if alphas is step_sizes:  # the identity: never scale the step sizes themselves
        alphas = torch._foreach_mul(alphas, rule.lr)
    else:
        torch._foreach_mul_(alphas, rule.lr)
    if rule.lr_min is not None:
        torch._foreach_clamp_min_(alphas, rule.lr_min)
    if rule.lr_max is not None:
        torch._foreach_clamp_max_(alphas, rule.lr_max)
    return alphas
