"""The online step of a group of float32/float64 tensors, in a few kernels for all of them.

:mod:`torch_metasgd.hypergradient` writes the rule out and runs it tensor by
tensor. On a CPU a multi-tensor (``torch._foreach_*``) operation is a loop
with a dispatch per tensor, which on small tensors costs more than the
arithmetic, so here each group's tensors of one device and dtype live in a
:class:`Workspace`: buffers of rows of 64 to 4096 elements, each tensor from a
new row, so that a per-tensor sum is a row sum and a short segment sum, and a
per-tensor value reaches its elements as a column that broadcasts. The rule
and the step are then a fixed number of kernels whatever the number of
tensors, and read no value back to the host.

The state is the workspace's: each parameter's momentum buffer, last
direction and running magnitude in ``optimizer.state`` is a view of it (and
the step sizes' ``.data``, for unbounded ``"identity"`` and ``"log"`` ones, as
``nn.Module.to`` swaps a parameter's ``.data``), so that a step copies each
gradient in, and each parameter's update out, once. Whether the state is its
views is checked at every step by identity; a load, a move or another path
that replaced an entry is copied in and tied again.

One :class:`Engine` per param group, kept in the group's view
(:mod:`torch_metasgd._groups`) and made again when the group's membership
changes: its rows are the group's parameters, each its own, so no two
parameters can share state. It takes a step where every parameter of the
group has a gradient and either all or none has a last direction; otherwise
(and for half precision, complex, DTensor or sparse parameters, a
``GradScaler``'s fused step, ``differentiable=True``) the rule runs tensor by
tensor. It costs memory: one to three buffers the size of the parameters
beyond the momentum buffers, which live here.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._kernels import IN_PLACE, effective_lr, group_by_device_and_dtype, sgd_direction
from ._step_sizes import is_dtensor
from .hypergradient import (
    ELEMENT_RATE,
    ELEMENT_SPREAD,
    FLOOR,
    LOG_FLOOR,
    SCALE_KEY,
    Rule,
    direction_key,
    new_scale,
    tensor_changes,
)

if TYPE_CHECKING:
    from ._fused import AmpFlags
    from ._groups import Batch

__all__ = ["step_", "Engine", "Workspace"]

_DTYPES = (torch.float32, torch.float64)
#: A group the engine cannot take (a view's ``engine``): it is not asked again.
INELIGIBLE = "ineligible"


def step_(batch: Batch, state: dict[Tensor, dict[str, Any]], amp: AmpFlags) -> bool:
    """Take ``batch``'s whole online step in its group's engine, if it can; whether it did."""
    group = batch.group
    if not batch.complete or amp.given or batch.has_sparse_grad or group["differentiable"]:
        return False
    view = batch.view
    if view.engine is None:
        params = view.params
        eligible = all(p.dtype in _DTYPES and not is_dtensor(p) for p in params)
        view.engine = Engine(params) if eligible else INELIGIBLE
    return view.engine is not INELIGIBLE and view.engine.step_(batch, state)


class Engine:
    """A group's workspaces, one per device and dtype of its parameters."""

    def __init__(self, params: list[Tensor]) -> None:
        self.parts = [
            (Workspace(tuple(p.shape for p in part), part[0].dtype, part[0].device), indices)
            for (part,), indices in group_by_device_and_dtype([params])
        ]

    def step_(self, batch: Batch, state: dict[Tensor, dict[str, Any]]) -> bool:
        group = batch.group
        momentum = group["momentum"]
        entries = [state[p] for p in batch.params]
        last = [entry.get(direction_key(group)) for entry in entries]
        fresh = last[0] is None
        buffers = batch.momentum_buffers
        if any((d is None) != fresh for d in last) or (
            momentum != 0 and any((b is None) != (buffers[0] is None) for b in buffers)
        ):
            return False
        rule = Rule.of(group)
        learns = not fresh and not rule.learns_nothing
        grads = batch.grads
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, batch.params, alpha=group["weight_decay"])
        parts = [
            _Part(
                workspace,
                [batch.params[i] for i in indices],
                [batch.step_sizes[i] for i in indices],
                [entries[i] for i in indices],
                [grads[i] for i in indices],
            )
            for workspace, indices in self.parts
        ]
        for part in parts:
            part.workspace.load("grads", part.grads)
            if not fresh:
                part.tie_state(group)
        if learns:
            _rule_(group, rule, parts, batch, state)
        for part in parts:
            part.update_(group, rule, learns, fresh)
        if group["granularity"] == "group":
            _group_scale(batch, entries, state)
        return True


class _Part:
    """One workspace's parameters in a step, with their step sizes and state entries."""

    def __init__(self, workspace, params, step_sizes, entries, grads) -> None:
        self.workspace: Workspace = workspace
        self.params = params
        self.step_sizes = step_sizes
        self.entries = entries
        self.grads = grads
        self.scales: Tensor | None = None

    def tie_state(self, group: dict[str, Any]) -> None:
        """Make the state's buffers and last directions the workspace's views, if they are not."""
        if group["momentum"] != 0:
            self.workspace.tie("buffers", "momentum_buffer", self.entries)
        if direction_key(group) == "hypergrad_direction":
            self.workspace.tie("directions", "hypergrad_direction", self.entries)

    def update_(self, group: dict[str, Any], rule: Rule, learned: bool, fresh: bool) -> None:
        r"""The part's step :math:`\theta \leftarrow \theta - \alpha \odot d`, in its workspace.

        ``learned``: the rule has just run, and left the part's step sizes in
        the workspace (``"element"``, ``"tensor"``). Leaves the momentum
        buffers in ``"buffers"`` and, where they are not the direction, the
        directions in ``"directions"``: the state's views.
        """
        workspace = self.workspace
        momentum, nesterov = group["momentum"], group["nesterov"]
        g = workspace.buffer("grads")
        if momentum == 0:
            d = g
        else:
            buffers = workspace.buffer("buffers")
            # Maximize and weight decay are in g already.
            options = (0, momentum, group["dampening"], nesterov, False)
            d, new = sgd_direction(None, g, None if fresh else buffers, *options, IN_PLACE)
            if fresh:
                buffers.copy_(new)
                d = d if nesterov else buffers
                workspace.point("buffers", "momentum_buffer", self.entries)
        slot = "buffers" if direction_key(group) == "momentum_buffer" else "directions"
        if slot == "directions":
            # Kept for the next step, where the next gradient takes g's place.
            workspace.buffer("directions").copy_(d)
            if fresh:
                workspace.point("directions", "hypergrad_direction", self.entries)
        alphas = _alphas(group, self, rule, learned)
        torch._foreach_addcmul_(
            self.params, workspace.views(slot), alphas, value=-rule.lr if _folds(rule) else -1
        )
        if group["granularity"] != "group" and not learned:
            self.workspace.tie_scales(self.step_sizes, self.entries)


def _folds(rule: Rule) -> bool:
    # alpha = lr * phi(s): a float lr scales the update, not every alpha.
    return not rule.bounded and not isinstance(rule.lr, Tensor)


def _rule_(group, rule: Rule, parts: list[_Part], batch: Batch, state) -> None:
    """The hypergradient update of every part's step sizes."""
    slot = "buffers" if direction_key(group) == "momentum_buffer" else "directions"
    if group["granularity"] == "group":
        scale = _group_scale(batch, [e for part in parts for e in part.entries], state)
        _group_step_(parts, slot, batch.step_sizes[0], scale, rule)
        return
    for part in parts:
        part.scales = part.workspace.tie_scales(part.step_sizes, part.entries)
        if group["granularity"] == "tensor":
            _tensor_step_(part, slot, rule)
        else:
            _element_step_(part, slot, rule)


def _group_scale(batch: Batch, entries: list[dict[str, Any]], state) -> Tensor:
    """The group's running magnitude :math:`v`, one tensor in the state of every parameter
    (a load makes copies: they are tied again here)."""
    scale = entries[0].get(SCALE_KEY)
    scale = new_scale(batch.step_sizes[0]) if scale is None else scale
    for entry in entries:
        entry[SCALE_KEY] = scale
    return scale


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
    else:
        dots = torch.linalg.vecdot(g, d)
    sums = workspace.sums(torch.stack([dots, g_squares, d_squares], 1))
    return products, sums[:, 0], sums[:, 1].sqrt(), sums[:, 2].sqrt()


def _element_step_(part: _Part, slot: str, rule: Rule) -> None:
    """Leaves the new step sizes in the workspace's buffer ``"steps"`` (:func:`_element_steps`)."""
    # Identity step sizes take the rule in base-2 logarithms: on a CPU torch's
    # exp2 costs a quarter of its exp (rounded correctly, so slower), and the
    # rule is the same in any base once its rates are in that base's units.
    base2 = rule.phi.is_identity and not rule.bounded
    unit, log_floor = (1 / math.log(2), math.log2(FLOOR)) if base2 else (1.0, LOG_FLOOR)
    products, dots, g_norms, d_norms = _inner_products(part, slot, element=True)
    changes, finite = tensor_changes(dots, g_norms, d_norms, part.scales, rule.beta * unit)
    workspace = part.workspace
    # A skipped tensor (finite 0) takes no change, and neither floor nor cap:
    # in log space its step sizes stay exactly as they were.
    skipped = torch.where(finite > 0, 0.0, math.inf)
    per_tensor = torch.stack(
        [changes, finite * (rule.beta * unit * ELEMENT_RATE), log_floor - skipped], 1
    )
    per_row = workspace.per_row(per_tensor)
    floors = per_row[:, 2:]
    steps = _element_steps(workspace, part.step_sizes, rule)
    if base2:
        logs = torch.clamp_min(steps, FLOOR, out=workspace.buffer("logs")).log2_()
    elif rule.in_log_space:
        logs = torch.maximum(steps, floors, out=steps)
    else:
        logs = _log_ratios(steps, rule, out=workspace.buffer("logs"))
    logs.add_(per_row[:, :1]).addcmul_(products.sign_(), per_row[:, 1:2])
    torch.maximum(logs, floors, out=logs)
    means = workspace.element_sums(logs) * workspace.inverse_counts
    caps = means + ELEMENT_SPREAD * unit + skipped
    torch.minimum(logs, workspace.per_row(caps)[:, None], out=logs)
    if rule.in_log_space:
        return
    kept = workspace.per_row(finite)[:, None] > 0
    if base2:
        # exp2(log2(s)) is s to an ulp: a skipped tensor keeps its own values.
        torch.where(kept, logs.exp2_(), steps, out=steps)
        return
    _store_(part.step_sizes, workspace.views("logs"), rule, finite)
    workspace.load("steps", part.step_sizes)


def _element_steps(workspace: Workspace, step_sizes: list[Tensor], rule: Rule) -> Tensor:
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


def _tensor_step_(part: _Part, slot: str, rule: Rule) -> None:
    """Moves the step sizes per tensor in place, as the workspace's vector (``tie_step_sizes``)."""
    _, dots, g_norms, d_norms = _inner_products(part, slot, element=False)
    changes, _ = tensor_changes(dots, g_norms, d_norms, part.scales, rule.beta)
    _vector_step_(part.workspace.tie_step_sizes(part.step_sizes), changes, rule)


def _group_step_(parts: list[_Part], slot: str, s: Tensor, scale: Tensor, rule: Rule) -> None:
    dot, g_square, d_square = (torch.zeros((), dtype=scale.dtype, device=scale.device),) * 3
    for part in parts:
        _, dots, g_norms, d_norms = _inner_products(part, slot, element=False)
        dot = dot + dots.sum().to(scale)
        g_square = g_square + g_norms.square().sum().to(scale)
        d_square = d_square + d_norms.square().sum().to(scale)
    changes, _ = tensor_changes(
        dot[None], g_square.sqrt()[None], d_square.sqrt()[None], scale.view(1), rule.beta
    )
    _vector_step_(s.view(1), changes, rule)


def _vector_step_(s: Tensor, changes: Tensor, rule: Rule) -> None:
    """The tensor-level update of a vector of step sizes ``s``, one change each, in place
    (a change of 0, a skipped tensor's, leaves its step size exactly as it was)."""
    old = _log_ratios(s, rule, out=torch.empty_like(s))
    logs = (old + changes).clamp_min_(LOG_FLOOR)
    new = rule.step_sizes(logs)
    s.copy_(torch.where(torch.isfinite(new) & (logs != old), new, s))


def _log_ratios(s: Tensor, rule: Rule, out: Tensor | None = None) -> Tensor:
    """``log(alpha / lr)`` of step sizes ``s``, lifted to the floor, into ``out`` (or ``s``)."""
    out = s if out is None else out
    if rule.in_log_space:
        return torch.clamp_min(s, LOG_FLOOR, out=out)
    if not (rule.phi.is_identity and not rule.bounded):
        s = effective_lr(s, rule.lr, rule.phi, rule.lr_min, rule.lr_max) / rule.lr
    return torch.clamp_min(s, FLOOR, out=out).log_()


def _store_(step_sizes: list[Tensor], logs: list[Tensor], rule: Rule, finite: Tensor) -> None:
    """Write ``alpha / lr = exp(logs)`` into the step sizes, within the bounds, where the
    tensor's hypergradient was finite and ``alpha`` moved (else ``s`` stays exact rather
    than make a round trip through ``phi``)."""
    for s, new_logs, ok in zip(step_sizes, logs, finite.unbind(), strict=True):
        new = rule.step_sizes(new_logs)
        old_logs = _log_ratios(s, rule, out=torch.empty_like(s))
        s.copy_(torch.where(torch.isfinite(new) & (new_logs != old_logs) & (ok > 0), new, s))


def _alphas(group, part: _Part, rule: Rule, learned: bool) -> list[Tensor]:
    """Per parameter, ``alpha`` (``alpha / lr`` where lr folds into the update), broadcastable."""
    workspace = part.workspace
    granularity = group["granularity"]
    if granularity == "element":
        steps = (
            workspace.buffer("steps")
            if learned
            else _element_steps(workspace, part.step_sizes, rule)
        )
        if _folds(rule) and rule.phi.is_identity:
            return workspace.views("steps")
        # The products of the rule are spent: alpha takes their place.
        alphas = workspace.buffer("products")
        if _folds(rule) and rule.phi.is_exp:
            torch.exp(steps, out=alphas)
        else:
            alphas.copy_(_alpha(steps, rule))
        return workspace.views("products")
    if granularity == "tensor":
        if not learned:  # else the rule tied them already
            workspace.tie_step_sizes(part.step_sizes)
        if _folds(rule) and rule.phi.is_identity:
            return workspace.step_size_views
        workspace.alpha_vector.copy_(_alpha(workspace.step_size_vector, rule))
        return workspace.alpha_views
    return [_alpha(part.step_sizes[0], rule)] * len(part.params)


def _alpha(s: Tensor, rule: Rule) -> Tensor:
    if _folds(rule):
        return rule.phi.forward(s)
    return effective_lr(s, rule.lr, rule.phi, rule.lr_min, rule.lr_max)


class Workspace:
    """Buffers of rows of ``width`` elements, one row or more per tensor of a part.

    Each tensor starts a row, with zeros after its last element. A tensor's
    sum is then a sum over its rows, and a value per tensor reaches its
    elements as a column that broadcasts over its rows: the rule and the step
    are a fixed number of kernels whatever the number of tensors. Each
    buffer, made at first use, has views shaped as the tensors; padding stays
    finite. Its buffers hold the gradients, the products of the last
    direction and the gradient (``"element"``), the step sizes
    (``"element"``), the momentum buffers and the last directions (with
    nesterov or without momentum).
    """

    def __init__(
        self, shapes: tuple[torch.Size, ...], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shapes = shapes
        self.dtype = dtype
        self.device = device
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
        self.last_row_mask = (torch.arange(self.width) < left[:, None]).to(dtype).to(device)
        self.inverse_counts = (1 / torch.tensor(numels, dtype=dtype).clamp_min(1)).to(device)
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
            buffer = torch.zeros(
                sum(self.row_counts), self.width, dtype=self.dtype, device=self.device
            )
            flat, views, start = buffer.view(-1), [], 0
            for shape, rows in zip(self.shapes, self.row_counts, strict=True):
                views.append(flat[start : start + math.prod(shape)].view(shape))
                start += rows * self.width
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
        torch._foreach_copy_(self.views(name), tensors)
        return True

    def point(self, name: str, key: str, entries: list[dict[str, Any]]) -> None:
        """Make each state entry's ``key`` its view of buffer ``name``."""
        for entry, view in zip(entries, self.views(name), strict=True):
            entry[key] = view

    def tie(self, name: str, key: str, entries: list[dict[str, Any]]) -> None:
        """The state entries' ``key`` as views of buffer ``name``, their values copied in first
        if they are other tensors (a load, a move, another path)."""
        if self.load(name, [entry[key] for entry in entries]):
            self.point(name, key, entries)

    def tie_scales(self, step_sizes: list[Tensor], entries: list[dict[str, Any]]) -> Tensor:
        """The parameters' running magnitudes :math:`v` (the state's; none at a parameter's
        first step) as one vector that their state views.

        Tied at the first step, and again after a load or a move replaced a
        state entry: a step then reads and moves every :math:`v` of the part
        in one kernel, not one per parameter.
        """
        scales = [entry.get(SCALE_KEY) for entry in entries]
        views = self.scale_views
        if len(scales) == len(views) and all(map(operator.is_, scales, views)):
            return self.scale_vector
        self.scale_vector = torch.stack(
            [new_scale(s) if v is None else v for v, s in zip(scales, step_sizes, strict=True)]
        )
        self.scale_views = self.scale_vector.unbind()
        for entry, v in zip(entries, self.scale_views, strict=True):
            entry[SCALE_KEY] = v
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
