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
#: Elements per row of a :class:`_Workspace`.
_ROW = 64


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
    """A group's tensors of one device and dtype, and the workspace the rule computes them in."""

    grads: list[Tensor]
    directions: list[Tensor]
    step_sizes: list[Tensor]
    #: The running magnitudes v, one per tensor, as one vector (see _Workspace.tie_scales).
    scales: Tensor
    workspace: _Workspace

    @classmethod
    def of(cls, params, grads, directions, step_sizes, state, workspaces, element) -> _Part:
        shapes = tuple(g.shape for g in grads)
        # The first parameter tells the part's group: a workspace holds its running magnitudes.
        key = (id(params[0]), grads[0].device, grads[0].dtype, element, shapes)
        if key not in workspaces:
            workspaces[key] = _Workspace(shapes, grads[0].dtype, grads[0].device, element)
        workspace = workspaces[key]
        if grads[0].dtype.is_complex:
            # Real tensors with a trailing dimension of 2, as the workspace holds them.
            grads = [torch.view_as_real(g) for g in grads]
            directions = [torch.view_as_real(d) for d in directions]
        scales = workspace.tie_scales(params, step_sizes, state) if step_sizes else None
        return cls(grads, directions, step_sizes, scales, workspace)


def hypergradient_step_(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    step_sizes: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
    workspaces: dict,
    grad_scale: Tensor | None = None,
) -> None:
    """Move the step sizes of ``params`` along the hypergradient of the current loss, in place.

    ``params`` and ``grads`` are those of the group that have a gradient now;
    a parameter without a direction from the last step (the first step, or
    no gradient last time, so the step sizes did not move it) is left out.
    ``workspaces``: a dict that the caller keeps between steps and empties
    when the parameters move (the rule's scratch buffers, see
    :class:`_Workspace`). ``grad_scale``: ``GradScaler``'s scale, by which
    the gradients of a fused step are still multiplied (a skipped step's infs
    skip this update too). Must run under ``torch.no_grad()``, before the step.
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
    if group["granularity"] == "group":
        by_device = Optimizer._group_tensors_by_device_and_dtype([params, grads, directions])
        parts = [_Part.of(*lists, [], state, workspaces, False) for lists, _ in by_device.values()]
        _group_step_(parts, step_sizes[0], _group_scale(group, step_sizes[0], state), rule)
        return
    element = group["granularity"] == "element"
    step = _element_step_ if element else _tensor_step_
    by_device = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, directions, step_sizes]
    )
    for lists, _ in by_device.values():
        step(_Part.of(*lists, state, workspaces, element), rule)


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


def _group_scale(group, s: Tensor, state) -> Tensor:
    """A group's running magnitude :math:`v`, one tensor in the state of every parameter.

    A loaded state dict holds copies: they are tied again here.
    """
    scale = state[group["params"][0]].get("hypergrad_scale")
    if scale is None:
        scale = _new_scale(s)
    for p in group["params"]:
        state[p]["hypergrad_scale"] = scale
    return scale


def _new_scale(s: Tensor) -> Tensor:
    """A running magnitude with no history (0), real and at least float32."""
    return torch.zeros((), dtype=torch.promote_types(s.dtype, torch.float32), device=s.device)


class _Workspace:
    """Rows of :data:`_ROW` elements into which a part's tensors are copied, each from a new row.

    A tensor's sum is then a sum over its rows, and a value per tensor
    reaches its elements as a column that broadcasts over its rows, so the
    rule is a fixed number of kernels whatever the number of tensors
    (multi-tensor operations cost, on a CPU, a dispatch per tensor and pass).
    The padding after a tensor's last element stays finite: zeros, moved only
    by finite per-tensor changes and clamped. Kept between steps, so that its
    views are made once; its buffers hold about twice the part's elements
    (three times at ``"element"`` granularity), in the dtype the rule
    computes in (float32 for half precision, real for complex).
    """

    def __init__(
        self,
        shapes: tuple[torch.Size, ...],
        dtype: torch.dtype,
        device: torch.device,
        element: bool,
    ) -> None:
        numels = [math.prod(shape) for shape in shapes]
        rows = [max(1, -(-n // _ROW)) for n in numels]
        owners = [i for i, r in enumerate(rows) for _ in range(r)]
        compute = torch.float32 if dtype in _HALF else dtype.to_real()
        # Cached: made on an accelerator every step, they would wait for the device.
        self.scale_views: tuple[Tensor, ...] = ()
        self.rows = torch.tensor(rows, device=device)
        self.owners = torch.tensor(owners, device=device)
        self.inverse_counts = (1 / torch.tensor(numels, dtype=compute).clamp_min(1)).to(device)
        # A complex element is a (real, imaginary) pair: a row holds _ROW pairs.
        pair = (2,) if dtype.is_complex else ()
        width = _ROW * (2 if pair else 1)
        self.grads = torch.zeros(len(owners), width, dtype=compute, device=device)
        self.directions = torch.zeros_like(self.grads)
        paired_shapes = [(*shape, *pair) for shape in shapes]
        self.grad_views = _views(self.grads, paired_shapes, rows)
        self.direction_views = _views(self.directions, paired_shapes, rows)
        if element:
            self.logs = torch.zeros(len(owners), _ROW, dtype=compute, device=device)
            self.log_views = _views(self.logs, shapes, rows)
            self.counted = torch.zeros_like(self.logs)
            for view in _views(self.counted, shapes, rows):
                view.fill_(1.0)

    def tie_scales(self, params: list[Tensor], step_sizes: list[Tensor], state) -> Tensor:
        """The parameters' running magnitudes :math:`v` as one vector that their state views.

        Tied at the first step, and again after a load or a move replaced a
        state entry: a step then reads and moves every :math:`v` of the part
        in one kernel, not one per parameter.
        """
        scales = [state[p].get("hypergrad_scale") for p in params]
        if len(scales) == len(self.scale_views) and all(
            a is b for a, b in zip(scales, self.scale_views, strict=True)
        ):
            return self.scale_vector
        self.scale_vector = torch.stack(
            [_new_scale(s) if v is None else v for v, s in zip(scales, step_sizes, strict=True)]
        )
        self.scale_views = self.scale_vector.unbind()
        for p, v in zip(params, self.scale_views, strict=True):
            state[p]["hypergrad_scale"] = v
        return self.scale_vector

    def sums(self, rows: Tensor) -> Tensor:
        """Per tensor, the sum of its rows' ``rows`` (a value, or a row of values, per row)."""
        return torch.segment_reduce(rows, "sum", lengths=self.rows, unsafe=True)

    def per_row(self, values: Tensor) -> Tensor:
        """Each tensor's value (``values``: one per tensor) on each of its rows."""
        return values.index_select(0, self.owners)


def _views(buffer: Tensor, shapes: list[tuple[int, ...]], rows: list[int]) -> list[Tensor]:
    """Views of ``buffer`` shaped as ``shapes``, each from the first of its ``rows``."""
    flat, views, start = buffer.view(-1), [], 0
    for shape, n in zip(shapes, rows, strict=True):
        views.append(flat[start : start + math.prod(shape)].view(shape))
        start += n * buffer.shape[1]
    return views


def _inner_products(part: _Part) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``g * d`` per element (in rows), and per tensor ``<g, d>``, ``|g|`` and ``|d|``."""
    workspace = part.workspace
    torch._foreach_copy_(workspace.grad_views, part.grads)
    torch._foreach_copy_(workspace.direction_views, part.directions)
    g, d = workspace.grads, workspace.directions
    # A norm is one pass, where a dot product is two (its products, then their sum).
    g_squares, d_squares = (torch.linalg.vector_norm(x, dim=1).square() for x in (g, d))
    products = g.mul_(d)
    sums = workspace.sums(torch.stack([products.sum(1), g_squares, d_squares], 1))
    if products.shape[1] != _ROW:
        products = products.view(-1, _ROW, 2).sum(-1)  # Re(conj(g) d) per complex element
    return products, sums[:, 0], sums[:, 1].sqrt(), sums[:, 2].sqrt()


def _tensor_changes(
    dots: Tensor, g_norms: Tensor, d_norms: Tensor, scales: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per tensor: ``beta * (h + DRIFT)`` and 1, or 0 and 0 where either is not finite.

    Moves the running magnitudes ``scales`` in place (not where the
    hypergradient is not finite); a scale of 0 (no history) starts at the
    magnitude itself, and ``h`` is 0 where ``v`` is.
    """
    dots, magnitudes = dots.to(scales.dtype), (g_norms * d_norms).to(scales.dtype)
    v = torch.where(scales == 0, magnitudes, torch.lerp(magnitudes, scales, SCALE_DECAY))
    h = (dots / v.clamp_min(torch.finfo(v.dtype).tiny)).clamp(-MAX_SHRINK, 1.0)
    finite = torch.isfinite(h) & torch.isfinite(v)
    scales.copy_(torch.where(finite, v, scales))
    return torch.where(finite, beta * (h + DRIFT), 0.0), finite.to(v.dtype)


def _element_step_(part: _Part, rule: _Rule) -> None:
    products, dots, g_norms, d_norms = _inner_products(part)
    changes, finite = _tensor_changes(dots, g_norms, d_norms, part.scales, rule.beta)
    workspace = part.workspace
    torch._foreach_copy_(workspace.log_views, part.step_sizes)
    logs = _log_ratios_(workspace.logs, rule)
    per_row = workspace.per_row(torch.stack([changes, finite * (rule.beta * ELEMENT_RATE)], 1))
    logs.add_(per_row[:, :1]).addcmul_(products.sign_(), per_row[:, 1:])  # sign(nan) = 0
    logs.clamp_min_(_LOG_FLOOR)
    means = workspace.sums(torch.linalg.vecdot(logs, workspace.counted)) * workspace.inverse_counts
    torch.minimum(logs, workspace.per_row(means + ELEMENT_SPREAD)[:, None], out=logs)
    _store_(part.step_sizes, logs, workspace.log_views, rule)


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
        dot[None], g_square.sqrt()[None], d_square.sqrt()[None], scale.view(1), rule.beta
    )
    _vector_step_(s.view(1), changes, rule)


def _vector_step_(s: Tensor, changes: Tensor, rule: _Rule) -> None:
    """The tensor-level update of a vector of step sizes ``s``, one change each, in place."""
    logs = _log_ratios_(s.clone(), rule).add_(changes).clamp_min_(_LOG_FLOOR)
    _store_([s], logs, [logs], rule)


def _log_ratios_(s: Tensor, rule: _Rule) -> Tensor:
    """``s`` (a copy of step sizes) made ``log(alpha / lr)``, lifted to the floor, in place."""
    if rule.in_log_space:
        return s.clamp_min_(_LOG_FLOOR)
    if not (rule.phi.is_identity and not rule.bounded):
        s.copy_(effective_lr(s, rule.lr, rule.phi, rule.lr_min, rule.lr_max) / rule.lr)
    return s.clamp_min_(FLOOR).log_()


def _store_(step_sizes: list[Tensor], logs: Tensor, views: list[Tensor], rule: _Rule) -> None:
    """Write ``alpha / lr = exp(logs)`` into the step sizes, within the bounds.

    ``views``: ``logs`` as one tensor per step size.
    """
    if rule.in_log_space:
        torch._foreach_copy_(step_sizes, views)
        return
    if rule.phi.is_identity and not rule.bounded:
        logs.exp_()
        torch._foreach_copy_(step_sizes, views)
        return
    for s, new_logs in zip(step_sizes, views, strict=True):
        alpha = new_logs.exp() * rule.lr
        if rule.bounded:
            alpha = alpha.clamp(rule.lr_min, rule.lr_max)
        new = rule.phi.inverse(alpha / rule.lr)
        old_logs = _log_ratios_(s.clone(), rule)
        # Where alpha did not move, s stays exact rather than make a round trip through phi.
        s.copy_(torch.where(torch.isfinite(new) & (new_logs != old_logs), new, s))
