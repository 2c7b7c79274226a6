r"""Data-parallel meta-training with ``torch.distributed``: DDP and the inner-loop path.

Split a meta-batch of :math:`T` tasks over :math:`R` processes (ranks), rank
:math:`r` holding the tasks :math:`\mathcal{T}_r`, :math:`|\mathcal{T}_r| = T/R`.
The meta-loss is linear in the tasks, so its gradient with respect to the
weights :math:`\theta` and the step sizes :math:`s` is the mean over ranks of
each rank's own meta-gradient:

.. math::
    \nabla_{\theta, s} \frac{1}{T} \sum_{t=1}^{T} L_t
    = \frac{1}{R} \sum_{r=1}^{R} \nabla_{\theta, s}
      \frac{1}{|\mathcal{T}_r|} \sum_{t \in \mathcal{T}_r} L_t .

Averaging both gradients across ranks thus gives every rank the gradient of
one process with all :math:`T` tasks, and every rank takes the same outer step.
One way per path:

* :func:`torch_metasgd.meta_loss`: wrap a :class:`MetaLearner` (the model and
  its optimizer's step sizes as one module, whose forward is ``meta_loss``) in
  ``DistributedDataParallel``. DDP broadcasts rank 0's weights and step sizes
  when it wraps the module, then averages both gradients with its bucketed
  all-reduces, overlapping the backward pass.
* :func:`torch_metasgd.inner_loop` and ``higher``: keep the loop as it is
  (``backward()`` per task) and call :func:`average_gradients` on the outer
  optimizer's tensors before its step.

An online :class:`~torch_metasgd.MetaSGD` (``hypergrad_lr > 0``) needs neither:
in a ``DistributedDataParallel`` model, ``step()`` reads the averaged ``.grad``,
so every rank moves its step sizes alike. :class:`~torch_metasgd.StepSizeTuner`
given the ``DistributedDataParallel`` model averages its held-out
meta-gradient over the model's ranks.

A model wrapped in ``DistributedDataParallel`` (or ``DataParallel``) and
handed straight to ``meta_loss``, ``adapt`` or ``inner_loop`` raises a
``TypeError`` naming these two ways.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import (
    require_bare_model,
    require_bool,
    require_metasgd,
    require_params_of,
    require_steps,
    uncompiled,
)
from .batched import LossFn, check_strategy, meta_loss
from .optimizer import MetaSGD

__all__ = ["MetaLearner", "average_gradients"]


class MetaLearner(nn.Module):
    r"""A model and its MetaSGD's step sizes as one module, whose forward is ``meta_loss``.

    Its parameters are the model's and ``opt.meta_parameters()``, the very
    tensors the optimizer reads (no copies), so that
    ``DistributedDataParallel(MetaLearner(...))`` averages the gradients of both
    and ``state_dict()`` holds both. ``learner(support, query)`` returns
    :func:`torch_metasgd.meta_loss` of the tasks given, with the options given
    here: on each rank, pass that rank's share of the meta-batch.

    DDP averages the ranks' losses with equal weights: give every rank the same
    number of tasks, or scale rank :math:`r`'s loss by :math:`R\,T_r / T`. A
    rank may hold no task (``T_r = 0``): its loss is 0, with a zero gradient
    for every parameter, so DDP's all-reduce runs on every rank and the
    others do not wait; scaled as above, the mean is over the tasks that
    exist (a zero-task rank's loss is the same whatever its scale).
    Every parameter gets a gradient (those the optimizer does not hold too,
    through the query loss), so ``find_unused_parameters`` is needed only for
    modules the forward never calls; ``static_graph=True`` works as well.

    Args:
        model: the network; its parameters are the shared initialization.
        opt: the :class:`~torch_metasgd.MetaSGD` over ``model``'s parameters
            holding the step sizes.
        loss_fn: ``loss_fn(model_output, targets) -> scalar``.
        steps, first_order, strategy: as in :func:`torch_metasgd.meta_loss`;
            checked here, so a wrong one raises before DDP wraps the module.

    Example (``torchrun --nproc_per_node=2 train.py``)::

        dist.init_process_group("gloo")  # "nccl" on GPUs
        learner = DistributedDataParallel(MetaLearner(model, opt, F.mse_loss))
        meta_opt = torch.optim.Adam(learner.parameters(), lr=1e-3)  # weights and step sizes
        for support, query in tasks_of_this_rank:  # (x, y) pairs with a task dimension
            loss = learner(support, query)
            meta_opt.zero_grad()
            loss.backward()  # averages the gradients of the weights and of the step sizes
            meta_opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        opt: MetaSGD,
        loss_fn: LossFn,
        *,
        steps: int = 1,
        first_order: bool = False,
        strategy: str = "auto",
    ) -> None:
        require_bare_model(model, "MetaLearner")
        require_metasgd(opt, "MetaLearner")
        require_params_of(opt, model.parameters(), f"the {type(model).__name__} model")
        require_steps(steps)
        require_bool(first_order, "first_order")
        check_strategy(uncompiled(model), strategy)
        super().__init__()
        self.model = model
        self.step_sizes = nn.ParameterList(opt.meta_parameters())
        self.opt = opt
        self.loss_fn = loss_fn
        self.options: dict[str, Any] = dict(steps=steps, first_order=first_order, strategy=strategy)

    def forward(self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor]) -> Tensor:
        """The mean query loss of the tasks given, after the inner Meta-SGD steps."""
        return meta_loss(self.model, self.opt, self.loss_fn, support, query, **self.options)


def average_gradients(
    tensors: Iterable[Tensor], *, group: dist.ProcessGroup | None = None, bucket_mb: float = 25
) -> None:
    r"""Average the ``.grad`` of ``tensors`` over the ranks of ``group``, in place.

    .. math::
        g \leftarrow \frac{1}{R} \sum_{r=1}^{R} g_r

    The data-parallel step of the :func:`torch_metasgd.inner_loop` / ``higher``
    path: call it after the backward passes of this rank's tasks and before
    the outer optimizer's step, on the tensors that optimizer holds. The
    gradients travel flattened in buckets of at most ``bucket_mb`` MiB (one
    all-reduce each, all in flight together), as DDP's do, though after the
    backward pass rather than overlapping it.

    Every rank must pass the same tensors in the same order. A tensor that has
    no gradient on a rank takes part with zeros, so that the ranks never
    disagree on what they send; it ends with the average (zeros if no rank's
    backward reached it). Tensors that do not require grad are skipped.

    Args:
        tensors: the tensors whose gradients to average (e.g. the model's
            parameters and ``opt.meta_parameters()``); duplicates count once.
        group: the process group (default: the default group).
        bucket_mb: the largest bucket, in MiB (default: 25, DDP's).

    Raises:
        RuntimeError: no process group is initialized.
        ValueError: a sparse gradient, or ``bucket_mb <= 0``.

    Example (``torchrun --nproc_per_node=2 train.py``)::

        meta_params = [*model.parameters(), *opt.meta_parameters()]
        meta_opt = torch.optim.Adam(meta_params, lr=1e-3)
        meta_opt.zero_grad()
        for (xs, ys), (xq, yq) in tasks_of_this_rank:
            with inner_loop(model, opt) as (fmodel, diffopt):
                diffopt.step(F.mse_loss(fmodel(xs), ys))
                (F.mse_loss(fmodel(xq), yq) / len(tasks_of_this_rank)).backward()
        average_gradients(meta_params)
        meta_opt.step()
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "average_gradients needs torch.distributed's process group: "
            "call torch.distributed.init_process_group first (torchrun sets its environment)"
        )
    if not bucket_mb > 0:
        raise ValueError(f"Invalid bucket_mb value: {bucket_mb}")
    tensors = list({id(t): t for t in tensors if t.requires_grad}.values())
    for t in tensors:
        if t.grad is not None and t.grad.is_sparse:
            raise ValueError(f"Invalid gradient: sparse, of a tensor of shape {tuple(t.shape)}")
    for t in tensors:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    world = dist.get_world_size(group)
    in_flight = []
    for bucket in _buckets([t.grad for t in tensors], int(bucket_mb * 2**20)):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        in_flight.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for bucket, flat, work in in_flight:
        work.wait()
        flat.div_(world)
        synced = flat.split([g.numel() for g in bucket])
        torch._foreach_copy_(bucket, [s.view_as(g) for s, g in zip(synced, bucket, strict=True)])


def _buckets(grads: list[Tensor], cap: int) -> list[list[Tensor]]:
    """Gradients of one device and dtype, in order, at most ``cap`` bytes a bucket (or one)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    buckets = []
    for same_kind in by_kind.values():
        bucket: list[Tensor] = []
        size = 0
        for g in same_kind:
            nbytes = g.numel() * g.element_size()
            if bucket and size + nbytes > cap:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += nbytes
        buckets.append(bucket)
    return buckets
