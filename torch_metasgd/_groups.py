"""Where each parameter's step size is found, and each param group's view of them.

A parameter's step size is made with its group, before the parameter has
any state (state is made lazily, at the first step, as in torch's
optimizers), so :class:`StepSizes` keeps it by parameter; once the parameter
has state, ``state[p]["step_size"]`` holds the live one, which wins (a user,
or a load, may have put another tensor there).

``step()`` must not hash every parameter into that store to find its step
size (on 100 small tensors that costs a sixth of SGD's whole step), so each
group's step sizes are looked up once and kept in a :class:`GroupView`. The
view is a cache and nothing more: everything in it is derived from the
group, the state and the store, and derived again whenever it might differ.
That is checked at every use, by identity only: the group dict, its list of
parameters one by one, the state container, each parameter's step size in
its state entry (a user may put another there, or another entry, at any
time), and the first parameter's device and dtype (a model is moved or cast
as a whole).
"""

from __future__ import annotations

import operator
from itertools import repeat
from typing import Any, NamedTuple

from torch import Tensor

from ._step_sizes import STATE_KEY, follow_group, new_step_sizes

__all__ = ["StepSizes", "GroupView", "Batch"]

#: What a parameter without state reads as (never written to).
NO_ENTRY: dict[str, Any] = {}


def entries_of(params: list[Tensor], state: dict) -> list[dict[str, Any]]:
    """Each parameter's state entry, or :data:`NO_ENTRY`; makes none (``state.get``)."""
    return list(map(state.get, params, repeat(NO_ENTRY)))


class GroupView:
    """A param group's parameters and their step sizes, as last derived."""

    __slots__ = (
        "group",
        "params",
        "step_sizes",
        "state",
        "entries",
        "device",
        "dtype",
        "has_state",
        "engine",
    )

    def __init__(self, group: dict[str, Any], step_sizes: list[Tensor], state: dict) -> None:
        self.group = group
        self.params: list[Tensor] = list(group["params"])
        self.step_sizes = step_sizes
        self.state = state
        #: Each parameter's state entry as of the last lookup (:data:`NO_ENTRY` if none).
        self.entries: list[dict[str, Any]] = entries_of(self.params, state)
        first = self.params[0] if self.params else None
        self.device = None if first is None else first.device
        self.dtype = None if first is None else first.dtype
        #: Every parameter has a state entry holding its step size (then a step adds none).
        self.has_state = all(p in state and STATE_KEY in state[p] for p in self.params)
        #: The online step's engine (:mod:`torch_metasgd._engine`), made at its first use.
        self.engine: Any = None

    def fits(self, group: dict[str, Any], state: dict, entries: list[dict[str, Any]]) -> bool:
        """Whether this view is still what it would be if derived again now; ``entries``:
        the group's parameters' state entries now."""
        params = group["params"]
        # A parameter without an entry, or an entry without a step size, reads as
        # its own step size: the one made with its group, which only a derivation sets.
        held = map(dict.get, entries, repeat(STATE_KEY), self.step_sizes)
        return (
            group is self.group
            and state is self.state
            and len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
            and (not params or (params[0].dtype is self.dtype and params[0].device == self.device))
            and all(map(operator.is_, held, self.step_sizes))
        )


class StepSizes:
    """Every parameter's step size, by the parameter, and a :class:`GroupView` per group."""

    def __init__(self) -> None:
        self.by_param: dict[Tensor, Tensor] = {}
        self._views: dict[int, GroupView] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"by_param": self.by_param}  # the views are derived again

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.by_param = state["by_param"]
        self._views = {}

    def forget_views(self) -> None:
        """Drop every view (a load replaced the state and the groups)."""
        self._views = {}

    def held(self, p: Tensor, state: dict) -> Tensor | None:
        """``p``'s live step size: its state's, else the one made with its group."""
        entry = state.get(p)
        s = entry.get(STATE_KEY) if entry else None
        return self.by_param.get(p) if s is None else s

    def view(self, group: dict[str, Any], state: dict) -> GroupView:
        """The group's view, derived again if it might have changed."""
        entries = entries_of(group["params"], state)
        view = self._views.get(id(group))
        if view is None or not view.fits(group, state, entries):
            view = self._views[id(group)] = self._derive(group, state)
        else:
            view.entries = entries
        return view

    def _derive(self, group: dict[str, Any], state: dict) -> GroupView:
        params = group["params"]
        step_sizes = [self.held(p, state) for p in params]
        if group["granularity"] == "group" and params:
            shared = next((s for s in step_sizes if s is not None), None)
            shared = shared if shared is not None else new_step_sizes(params[:1], group)[0]
            step_sizes = [shared] * len(params)
        elif any(s is None for s in step_sizes):
            # Parameters put into param_groups directly, not by add_param_group.
            missing = [p for p, s in zip(params, step_sizes, strict=True) if s is None]
            fresh = iter(new_step_sizes(missing, group))
            step_sizes = [next(fresh) if s is None else s for s in step_sizes]
        for i, (p, s) in enumerate(zip(params, step_sizes, strict=True)):
            shape = tuple(p.shape) if group["granularity"] == "element" else ()
            if tuple(s.shape) != shape:
                raise ValueError(
                    f"Invalid step size of parameter {i}: shape {tuple(s.shape)}, where "
                    f"granularity={group['granularity']!r} needs {shape} (the granularity of a "
                    "group is fixed when its step sizes are made)"
                )
        follow_group(params, step_sizes, state, group["granularity"])
        self.by_param.update(zip(params, step_sizes, strict=True))
        return GroupView(group, step_sizes, state)


class Batch(NamedTuple):
    """The part of a group that one ``step()`` moves: its parameters with a gradient."""

    group: dict[str, Any]
    view: GroupView
    params: list[Tensor]
    grads: list[Tensor]
    step_sizes: list[Tensor]
    #: The state's buffers, None before a parameter's first step; empty without momentum.
    momentum_buffers: list[Tensor | None]
    has_sparse_grad: bool
    #: Every parameter of the group has a gradient.
    complete: bool
