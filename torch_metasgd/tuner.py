"""Single-task step-size learning against held-out data: ``StepSizeTuner``.

:class:`~torch_metasgd.MetaSGD` learns its step sizes online from the
training loss alone with ``hypergrad_lr`` (one step of look-ahead, at no extra
cost). :class:`StepSizeTuner` learns them against held-out data over a longer
horizon: every ``every`` training steps it unrolls ``unroll`` differentiable
MetaSGD steps from the current weights on the latest training batches,

.. math::
    \\theta'_0 = \\theta, \\qquad
    \\theta'_{j} = \\theta'_{j-1}
        - \\alpha(s) \\odot d_j\\big(\\nabla L_{train}(\\theta'_{j-1})\\big),

and moves the step-size parameters :math:`s` with an outer optimizer along
:math:`\\nabla_s L_{held\\text{-}out}(\\theta'_k)`. The model's weights are
left as they are: the ordinary loop keeps training them.

It was called ``LookAhead``, which is the name of another method (the
Lookahead optimizer of Zhang et al. 2019, ``timm.optim.Lookahead``, which
averages "fast" and "slow" weights and learns no step size): that name stays
one release as a deprecated alias.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ._checks import (
    require_bool,
    require_metasgd,
    require_no_hypergradient,
    require_params_of,
)
from .differentiable import inner_loop
from .distributed import average_gradients
from .optimizer import MetaSGD

__all__ = ["StepSizeTuner", "LookAhead"]


class StepSizeTuner:
    r"""Learn a :class:`~torch_metasgd.MetaSGD`'s step sizes on held-out data in a training loop.

    Every ``every`` calls of :meth:`step`, unroll ``unroll`` differentiable
    MetaSGD steps (:func:`torch_metasgd.inner_loop`) from the current weights
    on the last ``unroll`` training batches seen by :meth:`step`, compute
    ``loss_fn`` on the next held-out batch and take one step of
    ``meta_optimizer`` on ``opt.meta_parameters()``. The unroll runs on
    detached copies of the weights: the model, its gradients and the momentum
    buffers are untouched, and only the step sizes change.

    Args:
        model: the module that ``opt`` trains, or its ``DistributedDataParallel``
            wrapper: then the unroll runs on its module and the held-out
            meta-gradient is averaged over its ranks, which all take the same
            step (each unrolls on its own batches and held-out data).
        opt: its :class:`~torch_metasgd.MetaSGD`; ``parametrization="log"``
            suits this use best (the outer steps are then relative changes of
            the step sizes).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the loss of a batch;
            called with a patched copy of ``model``.
        held_out: the held-out data: one batch (a tensor, a tuple or list
            of tensors, or a dict), or an iterable of batches (e.g. a
            ``DataLoader``), cycled.
        every: update the step sizes every ``every`` calls of :meth:`step`
            (default: 10).
        unroll: the number of differentiable steps :math:`k` (default: 5).
        meta_lr: the learning rate of the default outer optimizer, Adam
            (default: 0.01).
        meta_optimizer: an optimizer over ``opt.meta_parameters()`` to use
            instead of Adam.
        first_order: treat the update directions as constants in the unroll
            (no second-order terms; cheaper) (default: False).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = MetaSGD(model.parameters(), lr=0.1, parametrization="log")
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> held_out = (torch.randn(32, 3), torch.randn(32, 1))
        >>> tuner = StepSizeTuner(model, opt, loss_fn, held_out, every=2, unroll=2)
        >>> for _ in range(4):
        ...     batch = (torch.randn(8, 3), torch.randn(8, 1))
        ...     opt.zero_grad()
        ...     loss_fn(model, batch).backward()
        ...     opt.step()
        ...     _ = tuner.step(batch)
    """

    def __init__(
        self,
        model: nn.Module,
        opt: MetaSGD,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        held_out: Tensor | tuple[Tensor, ...] | list[Tensor] | Iterable[Any],
        *,
        every: int = 10,
        unroll: int = 5,
        meta_lr: float = 0.01,
        meta_optimizer: torch.optim.Optimizer | None = None,
        first_order: bool = False,
    ) -> None:
        require_metasgd(opt, type(self).__name__)
        require_params_of(opt, model.parameters(), f"the {type(model).__name__} model")
        require_no_hypergradient(opt)
        require_bool(first_order, "first_order")
        for name, value in (("every", every), ("unroll", unroll)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid {name} value: {value}")
        if meta_optimizer is None and not (
            isinstance(meta_lr, (int, float)) and math.isfinite(meta_lr) and meta_lr > 0
        ):
            raise ValueError(f"Invalid meta_lr value: {meta_lr}")
        _check_held_out(held_out)
        self._process_group = (
            model.process_group if isinstance(model, nn.parallel.DistributedDataParallel) else None
        )
        self.model = model if self._process_group is None else model.module
        self.opt = opt
        self.loss_fn = loss_fn
        self.every = every
        self.unroll = unroll
        self.first_order = first_order
        self._own_meta_optimizer = meta_optimizer is None
        self.meta_optimizer = (
            meta_optimizer
            if meta_optimizer is not None
            else torch.optim.Adam(opt.meta_parameters(), lr=meta_lr)
        )
        self._hold(opt.meta_parameters())
        self._held_out = held_out
        self._held_out_iter: Iterator[Any] | None = None
        self._batches: deque[Any] = deque(maxlen=unroll)
        self._calls = 0

    def step(self, batch: Any) -> Tensor | None:
        """Record a training batch; every ``every`` calls, update the step sizes.

        Returns the held-out loss after the unroll (before the update) when
        the step sizes were updated, else ``None``.
        """
        self._batches.append(batch)
        self._calls += 1
        if self._calls % self.every != 0:
            return None
        return self.update()

    def update(self) -> Tensor:
        """Update the step sizes now from the recorded batches; returns the held-out loss."""
        if not self._batches:
            raise RuntimeError(
                f"{type(self).__name__}.update needs at least one batch recorded by step()"
            )
        meta_params = self.opt.meta_parameters()
        self._hold(meta_params)
        with (
            torch.enable_grad(),
            inner_loop(
                self.model, self.opt, first_order=self.first_order, copy_initial_weights=True
            ) as (fmodel, diffopt),
        ):
            for batch in self._batches:
                diffopt.step(self.loss_fn(fmodel, batch))
            held_out_loss = self.loss_fn(fmodel, self._next_held_out())
            grads = torch.autograd.grad(held_out_loss, meta_params, allow_unused=True)
        self.meta_optimizer.zero_grad()
        for s, g in zip(meta_params, grads, strict=True):
            s.grad = g
        if self._process_group is not None:
            average_gradients(meta_params, group=self._process_group)
        self.meta_optimizer.step()
        return held_out_loss.detach()

    def _hold(self, meta_params: list[Tensor]) -> None:
        """Make sure the outer optimizer holds every step size: the default Adam takes those
        of param groups added to ``opt`` since; a given one must hold them."""
        held = {id(t) for group in self.meta_optimizer.param_groups for t in group["params"]}
        missing = [s for s in meta_params if id(s) not in held]
        if not missing:
            return
        if not self._own_meta_optimizer:
            raise ValueError(
                f"Invalid meta_optimizer: it does not hold {len(missing)} of the "
                f"{len(meta_params)} step sizes (opt.meta_parameters())"
            )
        self.meta_optimizer.add_param_group({"params": missing})

    def _next_held_out(self) -> Any:
        held_out = self._held_out
        if _is_batch(held_out):
            return held_out
        if self._held_out_iter is not None:
            batch = next(self._held_out_iter, None)
            if batch is not None:
                return batch
        self._held_out_iter = iter(held_out)
        try:
            return next(self._held_out_iter)
        except StopIteration:
            raise ValueError("The held_out iterable yields no batch") from None


def _is_batch(held_out: Any) -> bool:
    """One batch: a tensor, a tuple or list of tensors, or a mapping (iterating it gives keys)."""
    return isinstance(held_out, (Tensor, Mapping)) or (
        isinstance(held_out, (tuple, list)) and all(isinstance(t, Tensor) for t in held_out)
    )


def _check_held_out(held_out: Any) -> None:
    """``ValueError`` for held-out data that :meth:`StepSizeTuner.update` could not draw from."""
    if _is_batch(held_out):
        tensors = [t for t in tree_leaves(held_out) if isinstance(t, Tensor)]
        if not tensors or any(t.dim() == 0 or t.shape[0] == 0 for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"Invalid held_out: an empty batch (tensor shapes {shapes})")
        return
    if not isinstance(held_out, Iterable) or iter(held_out) is held_out:
        raise ValueError(
            f"Invalid held_out: {type(held_out).__name__} (expected a batch of tensors or a "
            "collection of batches that can be iterated again, such as a list or a DataLoader)"
        )
    if hasattr(held_out, "__len__") and len(held_out) == 0:
        raise ValueError("Invalid held_out: it holds no batch")


class LookAhead(StepSizeTuner):
    """Deprecated name of :class:`StepSizeTuner`, kept for one release (not the Lookahead
    optimizer of Zhang et al. 2019: see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "torch_metasgd.LookAhead is renamed StepSizeTuner (the Lookahead optimizer of "
            "Zhang et al. 2019 is another method); the old name goes in the next release",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)
