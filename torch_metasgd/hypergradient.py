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

How it runs. The tensors of a group's device and dtype are copied into a
workspace (:class:`_Workspace`): buffers of rows of 64 to 4096 elements,
each tensor from a new row, so that a per-tensor sum is a row sum and a
short segment sum, and a per-tensor value reaches its elements as a column
that broadcasts. The rule is then a fixed number of kernels, whatever the
number of tensors (on a CPU a multi-tensor ``torch._foreach_*`` operation is
a loop with a dispatch per tensor, which on small tensors costs more than
the arithmetic), and reads no value back to the host. For float32 and float64 parameters the whole
step runs there (:func:`online_step_`): the momentum buffers, the last
directions, the running magnitudes, the step sizes per tensor and (unbounded
``"identity"`` or ``"log"``) per element are views of the workspace, so that a
step copies each gradient in and each parameter's update out, once. A ``GradScaler``
with ``fused=True``, half precision and complex parameters take
:func:`hypergradient_step_` and then the ordinary step. The workspace costs
memory: one to three buffers the size of the parameters beyond the momentum
buffers, which live there.

State, per parameter, in the optimizer's ``state`` (and so in its
``state_dict()``): ``hypergrad_direction`` (:math:`d_{t-1}`; with momentum and
without nesterov it is the momentum buffer itself, so :func:`hypergradient_step_`
must run before the step updates that buffer in place) and ``hypergrad_scale``
(:math:`v`, 0-dim, at least float32; one tensor shared by the group for ``"group"``).
A loaded or moved state is copied back into the workspace at the next step.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._kernels import IN_PLACE, effective_lr, group_by_device_and_dtype, sgd_direction
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
    "steps_in_workspace",
    "online_step_",
]

SCALE_DECAY = 0.99
MAX_SHRINK = 5.0
DRIFT = 0.02
ELEMENT_RATE = 0.2
ELEMENT_SPREAD = 1.0
FLOOR = 1e-3

_LOG_FLOOR = math.log(FLOOR)
_HALF = (torch.float16, torch.bfloat16)
#: Dtypes whose momentum buffers and directions can live in a workspace as themselves.
_WHOLE_STEP_DTYPES = (torch.float32, torch.float64)


class _Rule(NamedTuple):
    """A group's options that shape the step-size update."""

    beta: float
    lr: float | Tensor
    phi: Parametrization
    lr_min: float | None
    lr_max: float | None

    @classmethod
    def of(cls, group: dict[str, Any]) -> _Rule:
        return cls(
            group["hypergrad_lr"],
            group["lr"],
            parametrization(group["parametrization"]),
            group["lr_min"],
            group["lr_max"],
        )

    @property
    def bounded(self) -> bool:
        return self.lr_min is not None or self.lr_max is not None

    @property
    def in_log_space(self) -> bool:
        # s = log(alpha / lr): the rule's own variable, updated in place.
        return self.phi.is_exp and not self.bounded

    @property
    def folds_into_lr(self) -> bool:
        # alpha = lr * phi(s): a float lr scales the update, not every alpha.
        return not self.bounded and not isinstance(self.lr, Tensor)


class _Part(NamedTuple):
    """A group's parameters of one device and dtype, and the workspace they step in."""

    params: list[Tensor]
    step_sizes: list[Tensor]
    workspace: _Workspace
    #: The running magnitudes v, one per tensor (see _Workspace.tie_scales); None for "group".
    scales: Tensor | None
    #: Whether the last directions were the workspace's views already.
    tied: bool
    #: The momentum buffers in the state (None before the first step, or without momentum).
    momentum_buffers: list[Tensor | None]


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
    when the parameters move (see :class:`_Workspace`). ``grad_scale``:
    ``GradScaler``'s scale, by which the gradients of a fused step are still
    multiplied (a skipped step's infs skip this update too). Must run under
    ``torch.no_grad()``, before the step.
    """
    entries = [state[p] for p in params]
    kept = [
        (p, g, s, entry["hypergrad_direction"], entry.get("hypergrad_scale"))
        for p, g, s, entry in zip(params, grads, step_sizes, entries, strict=True)
        if "hypergrad_direction" in entry
    ]
    if not kept or _learns_nothing(group):
        return
    params, grads, step_sizes, directions, scales = map(list, zip(*kept, strict=True))
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale)
    grads = _objective_gradients(group, params, grads)
    parts = _parts(
        group, params, grads, step_sizes, directions, scales, [], "directions", state, workspaces
    )
    _rule_(group, _Rule.of(group), parts, "directions", state)


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


def steps_in_workspace(
    group: dict[str, Any], grads: list[Tensor], momentum_buffers: list[Tensor | None], amp: bool
) -> bool:
    """Whether :func:`online_step_` takes ``group``'s step (``fused`` or not: it is a
    fixed number of kernels already).

    It does for float32 and float64 gradients, unless a ``GradScaler`` hands
    the step its scale (``amp``), or some parameters have a momentum buffer
    and others not yet (their first buffer is their direction).
    """
    if amp or not all(g.dtype in _WHOLE_STEP_DTYPES for g in grads):
        return False
    fresh = [buf is None for buf in momentum_buffers]
    return all(fresh) or not any(fresh)


def online_step_(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    step_sizes: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
    workspaces: dict,
) -> None:
    r"""The whole step of a group with online step sizes, in its workspaces, in place.

    The hypergradient update of the step sizes, then
    :math:`\theta \leftarrow \theta - \alpha \odot d` with SGD's direction
    (:func:`~torch_metasgd._kernels.sgd_direction` on the workspace's rows).
    The momentum buffers and last directions in the state are views of the
    workspace (tied at the first step, and again after a load or a move), so
    a step copies each gradient in, and each parameter's update out, once.
    ``momentum_buffers``: the state's (empty without momentum). Where
    :func:`steps_in_workspace` says so; must run under ``torch.no_grad()``.
    """
    entries = [state[p] for p in params]
    directions = [entry.get("hypergrad_direction") for entry in entries]
    learns = all(d is not None for d in directions) and not _learns_nothing(group)
    if not learns:
        # The first step, or a parameter back after a step without a gradient.
        hypergradient_step_(group, params, grads, step_sizes, state, workspaces)
    slot = _direction_slot(group)
    grads = _objective_gradients(group, params, grads)
    scales = [entry.get("hypergrad_scale") for entry in entries]
    parts = _parts(
        group,
        params,
        grads,
        step_sizes,
        directions if learns else [],
        scales,
        momentum_buffers,
        slot,
        state,
        workspaces,
    )
    rule = _Rule.of(group)
    if learns:
        _rule_(group, rule, parts, slot, state)
    for part in parts:
        _update_(group, rule, part, slot, state, learns)
    if not (learns and all(part.tied for part in parts) and len(params) == len(group["params"])):
        remember_directions(
            group,
            [p for part in parts for p in part.params],
            [d for part in parts for d in part.workspace.views(slot)],
            state,
        )


def _learns_nothing(group: dict[str, Any]) -> bool:
    lr = group["lr"]
    return not isinstance(lr, Tensor) and lr == 0


def _objective_gradients(group, params, grads) -> list[Tensor]:
    """The gradients of the objective the step descends: ``+-grad + weight_decay * param``."""
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    if group["weight_decay"] != 0:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    return grads


def _direction_slot(group: dict[str, Any]) -> str:
    # With momentum and without nesterov, the direction is the momentum buffer itself.
    return "buffers" if group["momentum"] != 0 and not group["nesterov"] else "directions"


def _parts(
    group, params, grads, step_sizes, directions, scales, momentum_buffers, slot, state, workspaces
) -> list[_Part]:
    """The group's tensors by device and dtype, each part's gradients (and ``directions``,
    unless empty) in its workspace, the directions in buffer ``slot``.

    ``scales`` and ``momentum_buffers`` (empty without momentum): the state's, None where
    there is none yet.
    """
    n = len(params)
    lists = [
        params,
        grads,
        step_sizes,
        scales,
        directions or [None] * n,
        momentum_buffers or [None] * n,
    ]
    parts = []
    for (
        part_params,
        part_grads,
        part_step_sizes,
        part_scales,
        part_directions,
        part_buffers,
    ), _ in group_by_device_and_dtype(lists):
        shapes = tuple(p.shape for p in part_params)
        # The first parameter tells the part's group: a workspace holds its running magnitudes.
        key = (id(part_params[0]), part_params[0].device, part_params[0].dtype, shapes)
        if key not in workspaces:
            workspaces[key] = _Workspace(shapes, part_params[0].dtype, part_params[0].device)
        workspace = workspaces[key]
        workspace.load("grads", part_grads)
        tied = bool(directions) and not workspace.load(slot, part_directions)
        if group["granularity"] != "group":
            part_scales = workspace.tie_scales(part_params, part_step_sizes, part_scales, state)
        parts.append(
            _Part(part_params, part_step_sizes, workspace, part_scales, tied, part_buffers)
        )
    return parts


def _rule_(group, rule: _Rule, parts: list[_Part], slot: str, state) -> None:
    """The hypergradient update of every part's step sizes (directions in buffer ``slot``)."""
    if group["granularity"] == "group":
        s = parts[0].step_sizes[0]
        _group_step_(parts, slot, s, _group_scale(group, s, state), rule)
    elif group["granularity"] == "tensor":
        for part in parts:
            _tensor_step_(part, slot, rule)
    else:
        for part in parts:
            _element_step_(part, slot, rule)


def _update_(group, rule: _Rule, part: _Part, slot: str, state, learned: bool) -> None:
    r"""The part's step :math:`\theta \leftarrow \theta - \alpha \odot d`, in its workspace.

    ``learned``: the rule has just run, and left the part's step sizes in the
    workspace (``"element"``, ``"tensor"``). Leaves the direction in the workspace's buffer
    ``slot`` (:func:`_direction_slot`), and the momentum buffers in ``"buffers"``.
    """
    workspace = part.workspace
    momentum, nesterov = group["momentum"], group["nesterov"]
    g = workspace.buffer("grads")
    if momentum == 0:
        d = g
    else:
        buffers, views = workspace.buffer("buffers"), workspace.views("buffers")
        held = part.momentum_buffers
        first = held[0] is None  # then every buffer is new (steps_in_workspace)
        tied = not first and workspace.holds("buffers", held)
        if not first and not tied:
            torch._foreach_copy_(views, held)
        # Maximize and weight decay are in g already (_objective_gradients).
        options = (0, momentum, group["dampening"], nesterov, False)
        d, new = sgd_direction(None, g, None if first else buffers, *options, IN_PLACE)
        if first:
            buffers.copy_(new)
            d = d if nesterov else buffers
        if not tied:
            for p, view in zip(part.params, views, strict=True):
                state[p]["momentum_buffer"] = view
    if slot == "directions":
        # Kept for the next step, where the next gradient takes g's place.
        workspace.buffer("directions").copy_(d)
    alphas = _alphas(group, part, rule, learned)
    torch._foreach_addcmul_(
        part.params, workspace.views(slot), alphas, value=-rule.lr if rule.folds_into_lr else -1
    )


def _alphas(group, part: _Part, rule: _Rule, learned: bool) -> list[Tensor]:
    """Per parameter, ``alpha`` (``alpha / lr`` where lr folds into the update), broadcastable."""
    workspace = part.workspace
    granularity = group["granularity"]
    if granularity == "element":
        steps = (
            workspace.buffer("steps")
            if learned
            else _element_steps(workspace, part.step_sizes, rule)
        )
        if rule.folds_into_lr and rule.phi.is_identity:
            return workspace.views("steps")
        # The products of the rule are spent: alpha takes their place.
        alphas = workspace.buffer("products")
        if rule.folds_into_lr and rule.phi.is_exp:
            torch.exp(steps, out=alphas)
        else:
            alphas.copy_(_alpha(steps, rule))
        return workspace.views("products")
    if granularity == "tensor":
        if not learned:  # else the rule tied them already
            workspace.tie_step_sizes(part.step_sizes)
        if rule.folds_into_lr and rule.phi.is_identity:
            return workspace.step_size_views
        workspace.alpha_vector.copy_(_alpha(workspace.step_size_vector, rule))
        return workspace.alpha_views
    return [_alpha(part.step_sizes[0], rule)] * len(part.params)


def _alpha(s: Tensor, rule: _Rule) -> Tensor:
    if rule.folds_into_lr:
        return rule.phi.forward(s)
    return effective_lr(s, rule.lr, rule.phi, rule.lr_min, rule.lr_max)


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
    """Buffers of rows of ``width`` elements, one row or more per tensor of a part.

    Each tensor starts a row, with zeros after its last element. A tensor's
    sum is then a sum over its rows, and a value per tensor reaches its
    elements as a column that broadcasts over its rows: the rule and the step
    are a fixed number of kernels whatever the number of tensors, where
    multi-tensor (``torch._foreach_*``) operations cost, on a CPU, a dispatch
    per tensor and pass. Each buffer, made at first use, has views shaped as
    the tensors (complex ones as real pairs); padding stays finite.

    Kept between steps, so that the views are made once. Its buffers, in the
    dtype the rule computes in (float32 for half precision, real for complex),
    hold the gradients, the products of the last direction and the
    gradient (``"element"``), the step sizes (``"element"``), the momentum
    buffers and the last directions (with nesterov or without momentum):
    about three times the part's parameters at ``"element"`` granularity, one
    or two otherwise, beyond the momentum buffers, which live here.
    """

    def __init__(
        self, shapes: tuple[torch.Size, ...], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shapes = shapes
        self.dtype = torch.float32 if dtype in _HALF else dtype.to_real()
        self.device = device
        self.paired = dtype.is_complex
        numels = [math.prod(shape) for shape in shapes]
        self.width = _row_width(numels)
        self.row_counts = [max(1, -(-n // self.width)) for n in numels]
        ends = torch.tensor(self.row_counts).cumsum(0)
        # Cached: made on an accelerator every step, they would wait for the device.
        self.rows = torch.tensor(self.row_counts, device=device)
        self.owners = torch.repeat_interleave(torch.arange(len(shapes)), self.rows.cpu()).to(device)
        self.last_rows = (ends - 1).to(device)
        left = torch.tensor(
            [n - (r - 1) * self.width for n, r in zip(numels, self.row_counts, strict=True)]
        )
        self.last_row_mask = (torch.arange(self.width) < left[:, None]).to(self.dtype).to(device)
        self.inverse_counts = (1 / torch.tensor(numels, dtype=self.dtype).clamp_min(1)).to(device)
        self.scale_vector: Tensor | None = None
        self.scale_views: tuple[Tensor, ...] = ()
        self.step_size_vector: Tensor | None = None
        self.step_size_views: list[Tensor] = []
        self._step_size_pointers: list[int] = []
        self.alpha_vector: Tensor | None = None
        self.alpha_views: list[Tensor] = []
        self._buffers: dict[str, tuple[Tensor, list[Tensor], list[int]]] = {}

    def _get(self, name: str) -> tuple[Tensor, list[Tensor], list[int]]:
        if name not in self._buffers:
            # Gradients and directions of complex tensors come as (real, imaginary) pairs.
            pair = (2,) if self.paired and name in ("grads", "directions", "products") else ()
            buffer = torch.zeros(
                sum(self.row_counts),
                self.width * (2 if pair else 1),
                dtype=self.dtype,
                device=self.device,
            )
            flat, views, start = buffer.view(-1), [], 0
            for shape, rows in zip(self.shapes, self.row_counts, strict=True):
                views.append(
                    flat[start : start + math.prod(shape) * (2 if pair else 1)].view(
                        (*shape, *pair)
                    )
                )
                start += rows * buffer.shape[1]
            self._buffers[name] = buffer, views, [v.data_ptr() for v in views]
        return self._buffers[name]

    def buffer(self, name: str) -> Tensor:
        return self._get(name)[0]

    def views(self, name: str) -> list[Tensor]:
        return self._get(name)[1]

    def stores(self, name: str, tensors: list[Tensor]) -> bool:
        """Whether ``tensors`` have views ``name`` as their data (see :func:`_element_steps`)."""
        return [t.data_ptr() for t in tensors] == self._get(name)[2]

    def holds(self, name: str, tensors: list[Tensor | None]) -> bool:
        """Whether ``tensors`` are this workspace's views ``name`` (so hold its values already)."""
        views = self.views(name)
        return len(tensors) == len(views) and all(map(operator.is_, tensors, views))

    def load(self, name: str, tensors: list[Tensor]) -> bool:
        """Copy ``tensors`` into buffer ``name`` unless they are its views; whether it did."""
        if self.holds(name, tensors):
            return False
        if self.paired and name in ("grads", "directions"):
            tensors = [torch.view_as_real(t) for t in tensors]
        torch._foreach_copy_(self.views(name), tensors)
        return True

    def tie_scales(self, params, step_sizes, scales: list[Tensor | None], state) -> Tensor:
        """The parameters' running magnitudes :math:`v` (``scales``, the state's, None where
        there is none yet) as one vector that their state views.

        Tied at the first step, and again after a load or a move replaced a
        state entry: a step then reads and moves every :math:`v` of the part
        in one kernel, not one per parameter.
        """
        views = self.scale_views
        if len(scales) == len(views) and all(map(operator.is_, scales, views)):
            return self.scale_vector
        self.scale_vector = torch.stack(
            [_new_scale(s) if v is None else v for v, s in zip(scales, step_sizes, strict=True)]
        )
        self.scale_views = self.scale_vector.unbind()
        for p, v in zip(params, self.scale_views, strict=True):
            state[p]["hypergrad_scale"] = v
        return self.scale_vector

    def tie_step_sizes(self, step_sizes: list[Tensor]) -> Tensor:
        """The parameters' step sizes at ``"tensor"`` granularity (0-dim) as one vector whose
        elements they are (:attr:`step_size_views`); :attr:`alpha_views` are
        those of a vector beside it, for the step sizes the update applies.

        Tied as the element step sizes are (:func:`_element_steps`): each step
        size's ``.data`` is made an element of the vector, its value copied in
        first, and again whenever a load or a move gave one other storage. The
        rule then moves them all in one kernel and the update reads them as
        they are, not stacked and unbound again at every step.
        """
        if [s.data_ptr() for s in step_sizes] != self._step_size_pointers:
            self.step_size_vector = torch.stack(step_sizes)
            self.step_size_views = list(self.step_size_vector.unbind())
            self.alpha_vector = torch.empty_like(self.step_size_vector)
            self.alpha_views = list(self.alpha_vector.unbind())
            for s, view in zip(step_sizes, self.step_size_views, strict=True):
                s.data = view
            self._step_size_pointers = [s.data_ptr() for s in step_sizes]
        return self.step_size_vector

    def sums(self, rows: Tensor) -> Tensor:
        """Per tensor, the sum of its rows' ``rows`` (a value, or a row of values, per row)."""
        return torch.segment_reduce(rows, "sum", lengths=self.rows, unsafe=True)

    def element_sums(self, x: Tensor) -> Tensor:
        """Per tensor, the sum of its elements (not its padding) in rows ``x``."""
        rows = x.sum(1)
        last = torch.linalg.vecdot(x.index_select(0, self.last_rows), self.last_row_mask)
        return self.sums(rows.index_copy_(0, self.last_rows, last))

    def per_row(self, values: Tensor) -> Tensor:
        """Each tensor's value (``values``: one per tensor) on each of its rows."""
        return values.index_select(0, self.owners)


def _row_width(numels: list[int]) -> int:
    """A power of two in [64, 4096], at most an eighth of the mean size: padding adds at most
    an eighth to the elements, and wide rows make row sums run as fast as whole sums."""
    mean = sum(numels) / len(numels)
    return 1 << min(12, max(6, int(math.log2(max(mean / 8, 1)))))


def _inner_products(
    part: _Part, slot: str, element: bool
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """``g * d`` per element (in rows, if ``element``), and per tensor ``<g, d>``, ``|g|``, ``|d|``.

    ``d``: the last directions, in the workspace's buffer ``slot``.
    """
    workspace = part.workspace
    g, d = workspace.buffer("grads"), workspace.buffer(slot)
    # A norm is one pass, where a dot product is two (its products, then their sum).
    g_squares, d_squares = (torch.linalg.vector_norm(x, dim=1).square() for x in (g, d))
    products = None
    if element:
        products = torch.mul(g, d, out=workspace.buffer("products"))
        dots = products.sum(1)
        if workspace.paired:
            products = products.view(-1, workspace.width, 2).sum(-1)  # Re(conj(g) d) per element
    else:
        dots = torch.linalg.vecdot(g, d)
    sums = workspace.sums(torch.stack([dots, g_squares, d_squares], 1))
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
    # h is clamped to [-MAX_SHRINK, 1] (NaN stays NaN), so h + v cannot overflow:
    # it is finite exactly where both are, in one test where two cost twice the kernels.
    finite = torch.isfinite(h + v)
    torch.where(finite, v, scales, out=scales)
    return torch.where(finite, beta * (h + DRIFT), 0.0), finite.to(v.dtype)


def _element_step_(part: _Part, slot: str, rule: _Rule) -> None:
    """Leaves the new step sizes in the workspace's buffer ``"steps"`` (:func:`_element_steps`)."""
    # Identity step sizes take the rule in base-2 logarithms: on a CPU torch's
    # exp2 costs a quarter of its exp (rounded correctly, so slower), and the
    # rule is the same in any base once its rates are in that base's units.
    base2 = rule.phi.is_identity and not rule.bounded
    unit, log_floor = (1 / math.log(2), math.log2(FLOOR)) if base2 else (1.0, _LOG_FLOOR)
    products, dots, g_norms, d_norms = _inner_products(part, slot, element=True)
    changes, finite = _tensor_changes(dots, g_norms, d_norms, part.scales, rule.beta * unit)
    workspace = part.workspace
    steps = _element_steps(workspace, part.step_sizes, rule)
    if base2:
        logs = torch.clamp_min(steps, FLOOR, out=workspace.buffer("logs")).log2_()
    else:
        logs = _log_ratios(steps, rule, out=None if rule.in_log_space else workspace.buffer("logs"))
    rates = finite * (rule.beta * unit * ELEMENT_RATE)
    per_row = workspace.per_row(torch.stack([changes, rates], 1))
    logs.add_(per_row[:, :1]).addcmul_(products.sign_(), per_row[:, 1:])  # sign(nan) = 0
    logs.clamp_min_(log_floor)
    means = workspace.element_sums(logs) * workspace.inverse_counts
    torch.minimum(logs, workspace.per_row(means + ELEMENT_SPREAD * unit)[:, None], out=logs)
    if rule.in_log_space:
        return
    if base2:
        torch.exp2(logs, out=steps)
        return
    _store_(part.step_sizes, logs, workspace.views("logs"), rule)
    workspace.load("steps", part.step_sizes)


def _element_steps(workspace: _Workspace, step_sizes: list[Tensor], rule: _Rule) -> Tensor:
    """The step sizes in the workspace's buffer ``"steps"``: their own storage where the
    rule writes them there (unbounded, identity or log), a copy otherwise.

    Their own storage: each step-size parameter's ``.data`` is made a view of
    the buffer (its values copied in first), as ``nn.Module.to`` swaps a
    parameter's ``.data``; an outer optimizer keeps training the same
    objects. Tied again whenever a load or a move gave one other storage.
    """
    if rule.bounded or not (rule.phi.is_identity or rule.phi.is_exp):
        workspace.load("steps", step_sizes)
        return workspace.buffer("steps")
    if not workspace.stores("steps", step_sizes):
        views = workspace.views("steps")
        torch._foreach_copy_(views, step_sizes)
        for s, view in zip(step_sizes, views, strict=True):
            s.data = view
    return workspace.buffer("steps")


def _tensor_step_(part: _Part, slot: str, rule: _Rule) -> None:
    """Moves the step sizes per tensor in place, as the workspace's vector (``tie_step_sizes``)."""
    _, dots, g_norms, d_norms = _inner_products(part, slot, element=False)
    changes, _ = _tensor_changes(dots, g_norms, d_norms, part.scales, rule.beta)
    _vector_step_(part.workspace.tie_step_sizes(part.step_sizes), changes, rule)


def _group_step_(parts: list[_Part], slot: str, s: Tensor, scale: Tensor, rule: _Rule) -> None:
    dot, g_square, d_square = (torch.zeros((), dtype=scale.dtype, device=scale.device),) * 3
    for part in parts:
        _, dots, g_norms, d_norms = _inner_products(part, slot, element=False)
        dot = dot + dots.sum().to(scale)
        g_square = g_square + g_norms.square().sum().to(scale)
        d_square = d_square + d_norms.square().sum().to(scale)
    changes, _ = _tensor_changes(
        dot[None], g_square.sqrt()[None], d_square.sqrt()[None], scale.view(1), rule.beta
    )
    _vector_step_(s.view(1), changes, rule)


def _vector_step_(s: Tensor, changes: Tensor, rule: _Rule) -> None:
    """The tensor-level update of a vector of step sizes ``s``, one change each, in place."""
    logs = _log_ratios(s, rule, out=torch.empty_like(s)).add_(changes).clamp_min_(_LOG_FLOOR)
    _store_([s], logs, [logs], rule)


def _log_ratios(s: Tensor, rule: _Rule, out: Tensor | None = None) -> Tensor:
    """``log(alpha / lr)`` of step sizes ``s``, lifted to the floor, into ``out`` (or ``s``)."""
    out = s if out is None else out
    if rule.in_log_space:
        return torch.clamp_min(s, _LOG_FLOOR, out=out)
    if not (rule.phi.is_identity and not rule.bounded):
        s = effective_lr(s, rule.lr, rule.phi, rule.lr_min, rule.lr_max) / rule.lr
    return torch.clamp_min(s, FLOOR, out=out).log_()


def _store_(step_sizes: list[Tensor], logs: Tensor, views: list[Tensor], rule: _Rule) -> None:
    """Write ``alpha / lr = exp(logs)`` into the step sizes, within the bounds (``views``:
    ``logs`` as one tensor per step size)."""
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
        old_logs = _log_ratios(s, rule, out=torch.empty_like(s))
        # Where alpha did not move, s stays exact rather than make a round trip through phi.
        s.copy_(torch.where(torch.isfinite(new) & (new_logs != old_logs), new, s))
