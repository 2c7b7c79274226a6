"""A group's tensors of one device and dtype as rows of buffers: the online step's memory.

On a CPU a multi-tensor (``torch._foreach_*``) operation is a loop with a
dispatch per tensor, which on small tensors costs more than the arithmetic.
A :class:`Workspace` lays the tensors out as rows of 64 to 4096 elements,
each tensor from a new row, so that a per-tensor sum is a row sum and a
short segment sum, and a per-tensor value reaches its elements as a column
that broadcasts: :mod:`torch_metasgd._engine` runs the online rule and the
step on them in a fixed number of kernels whatever the number of tensors.

Each buffer has views shaped as the tensors, and the optimizer's state can
be those views (:meth:`Workspace.tie`): whether it is, is checked by
identity, and a state entry that a load, a move or another path replaced is
copied in and tied again.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor

from .hypergradient import SCALE_KEY, new_scale

__all__ = ["Workspace"]


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
