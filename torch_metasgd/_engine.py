"""The online step of a group of float32/float64 tensors, in a few kernels for all of them.

The rule of :mod:`torch_metasgd.hypergradient`, and the parameters' update,
on the rows of the group's workspaces (:mod:`torch_metasgd._workspace`, one
per device and dtype): a fixed number of kernels whatever the number of
tensors, and no value read back to the host. The state is the workspace's:
each parameter's momentum buffer, last direction and running magnitude in
``optimizer.state`` is a view of it (and the step sizes' ``.data``, for
unbounded ``"identity"`` and ``"log"`` ones, as ``nn.Module.to`` swaps a
parameter's ``.data``), so that a step copies each gradient in, and each
parameter's update out, once.

One :class:`Engine` per param group, kept in the group's view
(:mod:`torch_metasgd._groups`) and made again when the group's membership
changes: its rows are the group's parameters, each its own, so no two
parameters can share state. It takes a step where every parameter of the
group has a gradient and either all or none has a last direction; otherwise
(and for half precision, complex, DTensor or sparse parameters, a
``GradScaler``'s fused step, ``differentiable=True``) the rule runs tensor by
tensor (:mod:`torch_metasgd._tensorwise`). It costs memory: one to three
buffers the size of the parameters beyond the momentum buffers, which live
in the workspace too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._kernels import IN_PLACE, effective_lr, group_by_device_and_dtype, sgd_direction
from ._step_sizes import is_dtensor
from ._workspace import Workspace
from .hypergradient import (
    ELEMENT_RATE,
    ELEMENT_SPREAD,
    FLOOR,
    LOG_FLOOR,
    SCALE_KEY,
    Rule,
    direction_key,
    element_logs_,
    new_scale,
    tensor_changes,
)

if TYPE_CHECKING:
    from ._fused import AmpFlags
    from ._groups import Batch

__all__ = ["step_", "Engine"]

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
    element_logs_(logs, per_row[:, :1], per_row[:, 1:2], products, floors)
    means = workspace.element_sums(logs) * workspace.inverse_counts
    caps = means + ELEMENT_SPREAD * unit + skipped
    torch.minimum(logs, workspace.per_row(caps)[:, None], out=logs)
    if rule.in_log_space:
        return
    if base2:
        if _skips_any(finite):
            # exp2(log2(s)) is s to an ulp: a skipped tensor keeps its own values.
            kept = workspace.per_row(finite)[:, None] > 0
            torch.where(kept, logs.exp2_(), steps, out=steps)
        else:
            torch.exp2(logs, out=steps)
        return
    _store_(part.step_sizes, workspace.views("logs"), rule, finite)
    workspace.load("steps", part.step_sizes)


def _skips_any(finite: Tensor) -> bool:
    """Whether a tensor may have been skipped (``finite`` 0): read back on a CPU, where there
    is no device to wait for; on an accelerator always assumed, the exact path kept."""
    return finite.device.type != "cpu" or not bool(finite.all())


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
