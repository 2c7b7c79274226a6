"""One param group's part of ``MetaSGD.step()``: what it moves, and the one place that picks how.

:func:`gather` collects the group's parameters with a gradient (and checks
them: ``step()`` gathers every group before any moves); :func:`take` takes
their step by one of three routes:

* ``hypergrad_lr == 0``: :func:`update`, SGD's update with the step sizes
  (``fused``, or a GradScaler's scaled gradients: the compiled step of
  :mod:`torch_metasgd._fused`; else :mod:`torch_metasgd._kernels`,
  multi-tensor or tensor by tensor);
* online, where the group's workspace can take it: the whole step in a few
  kernels (:mod:`torch_metasgd._engine`);
* online otherwise: the rule tensor by tensor, then :func:`update`
  (:mod:`torch_metasgd._tensorwise`, which orders the two: the rule reads the
  last direction, which may be the momentum buffer the update advances).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from . import _engine, _fused, _kernels, _tensorwise
from ._groups import Batch, GroupView
from ._step_sizes import STATE_KEY
from ._validation import validate_gradients

__all__ = ["gather", "take", "update"]

State = dict[Tensor, dict[str, Any]]


def gather(view: GroupView) -> Batch | None:
    """The group's parameters with a gradient, and what their step needs; checked."""
    group = view.group
    grads = [p.grad for p in view.params]
    complete = all(g is not None for g in grads)
    if complete:
        params, step_sizes, entries = view.params, view.step_sizes, view.entries
    else:
        kept = [
            (p, g, s, e)
            for p, g, s, e in zip(view.params, grads, view.step_sizes, view.entries, strict=True)
            if g is not None
        ]
        if not kept:
            return None
        params, grads, step_sizes, entries = map(list, zip(*kept, strict=True))
    has_sparse_grad = any(g.is_sparse for g in grads)
    validate_gradients(group, params, grads, has_sparse_grad)
    momentum_buffers = []
    if group["momentum"] != 0:
        # The entries the view was checked with: a step that a GradScaler skips must
        # leave no (empty) state behind, so none is made here.
        momentum_buffers = [entry.get("momentum_buffer") for entry in entries]
    return Batch(
        group, view, params, grads, step_sizes, momentum_buffers, has_sparse_grad, complete
    )


def take(batch: Batch, state: State, amp: _fused.AmpFlags) -> None:
    """The step of ``batch``, by the route its group's options pick (see the module)."""
    if amp.found_inf is not None and amp.skips_new_state(batch, _creates_state(batch, state)):
        return
    _add_state(batch, state)
    if batch.group["hypergrad_lr"] == 0:
        update(batch, state, amp)
    elif not _engine.step_(batch, state, amp):
        _tensorwise.step_(batch, state, amp, update)


def update(
    batch: Batch, state: State, amp: _fused.AmpFlags, keep_directions: bool = False
) -> list[Tensor] | None:
    r""":math:`\theta \leftarrow \theta - \alpha \odot d` for the batch, in place; with
    ``keep_directions``, returns each :math:`d` (see :func:`_kernels.metasgd`)."""
    group = batch.group
    if group["fused"] or amp.given:
        directions = _fused.metasgd_fused(
            batch, amp, compiled=bool(group["fused"]), keep_directions=keep_directions
        )
    else:
        foreach = group["foreach"]
        if foreach is None:
            _, foreach = _default_to_fused_or_foreach(
                batch.params, differentiable=group["differentiable"]
            )
        directions = _kernels.metasgd(
            batch.params,
            batch.grads,
            batch.momentum_buffers,
            batch.step_sizes,
            **_kernels.step_options(group),
            # As torch.optim.SGD: sparse gradients take the single-tensor path.
            foreach=foreach and not batch.has_sparse_grad,
            keep_directions=keep_directions,
        )
    if group["momentum"] != 0:
        for p, buf in zip(batch.params, batch.momentum_buffers, strict=True):
            state[p]["momentum_buffer"] = buf
    return directions


def _creates_state(batch: Batch, state: State) -> bool:
    """Whether the step of ``batch`` makes a parameter's first state."""
    return (
        not batch.view.has_state
        or any(buf is None for buf in batch.momentum_buffers)
        or (batch.group["hypergrad_lr"] != 0 and _tensorwise.creates_state(batch, state))
    )


def _add_state(batch: Batch, state: State) -> None:
    """Create the state entries of the parameters that step for the first time."""
    view = batch.view
    if view.has_state:
        return
    for p, s in zip(batch.params, batch.step_sizes, strict=True):
        state[p].setdefault(STATE_KEY, s)
    view.has_state = batch.complete or all(
        p in state and STATE_KEY in state[p] for p in view.params
    )
