"""What a step of one param group works on, derived from the group and the optimizer's state.

``step()`` must not hash every parameter into ``optimizer.state`` to find its
step size (on 100 small tensors that costs a sixth of SGD's whole step), so
each group's step sizes are looked up once and kept in a :class:`GroupView`
beside it. The view is a cache and nothing more: everything in it can be
derived again from the group, the optimizer's state and its store of step
sizes, and it is derived again whenever it might differ. That is checked at
every use, by identity only: the group dict, the list of its parameters (one
by one), the state container, and the first parameter's device and dtype (a
model is moved or cast as a whole).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["GroupView", "Batch"]


class GroupView:
    """A param group's parameters and their step sizes, as last derived."""

    __slots__ = ("group", "params", "step_sizes", "state", "device", "dtype", "has_state", "engine")

    def __init__(self, group: dict[str, Any], step_sizes: list[Tensor], state: dict) -> None:
        self.group = group
        self.params: list[Tensor] = list(group["params"])
        self.step_sizes = step_sizes
        self.state = state
        first = self.params[0] if self.params else None
        self.device = None if first is None else first.device
        self.dtype = None if first is None else first.dtype
        #: Every parameter has a state entry holding its step size (then a step adds none).
        self.has_state = all(p in state and "step_size" in state[p] for p in self.params)
        #: The online step's workspace (:mod:`torch_metasgd._workspace`), made at its first use.
        self.engine: Any = None

    def fits(self, group: dict[str, Any], state: dict) -> bool:
        """Whether this view is still what it would be if derived again now."""
        params = group["params"]
        return (
            group is self.group
            and state is self.state
            and len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
            and (not params or (params[0].dtype is self.dtype and params[0].device == self.device))
        )


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
