"""The ``"loop"`` strategy: each task's inner loop with ``torch.autograd.grad``, one after another.

It runs any model ``torch.func.functional_call`` can run (recurrent layers
too, which have no vmap batching rule), and on a CPU it is the fastest for
convolutional networks (``benchmarks/speed.py``): vmap was about 2.5x and the
task-stacked network about 1.3x slower there. :func:`adapt_one` is also
:func:`torch_metasgd.adapt`'s inner loop.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._plan import LossFn, Plan, task, task_loss

__all__ = ["adapt_one", "adapt_all", "losses", "cannot_run"]


def cannot_run(model: nn.Module) -> str | None:
    """Why the loop cannot run ``model``: it runs every model."""
    return None


def adapt_one(
    model: nn.Module, plan: Plan, loss_fn: LossFn, x, y, steps: int, first_order: bool, task: int
) -> dict[str, Tensor]:
    """The inner loop of task ``task`` with ``torch.autograd.grad``."""
    params, bufs = plan.params, plan.momentum
    alphas = {n: a[task] for n, a in plan.alphas.items()}
    buffers = {k: b.clone() for k, b in plan.buffers.items()}
    for _ in range(steps):
        loss = task_loss(model, loss_fn, params, buffers, x, y)
        inputs = [params[n] for n in plan.trainable]
        grads = torch.autograd.grad(loss, inputs, create_graph=not first_order, allow_unused=True)
        grads = dict(zip(plan.trainable, grads, strict=True))
        params, bufs = plan.update(params, grads, bufs, alphas, first_order)
    return params


def adapt_all(model, plan, loss_fn, support, steps, first_order) -> dict[str, Tensor]:
    per_task = [
        adapt_one(
            model, plan, loss_fn, task(support[0], t), task(support[1], t), steps, first_order, t
        )
        for t in range(plan.n_tasks)
    ]
    return {n: torch.stack([fast[n] for fast in per_task]) for n in plan.params}


def losses(model, plan, loss_fn, adapted, batch) -> Tensor:
    # unbind, not indexing: its backward stacks the T gradients at once.
    unbound = {n: p.unbind() for n, p in adapted.items()}
    losses = []
    for t in range(plan.n_tasks):
        buffers = {k: b.clone() for k, b in plan.buffers.items()}
        params = {n: p[t] for n, p in unbound.items()}
        x, y = task(batch[0], t), task(batch[1], t)
        losses.append(task_loss(model, loss_fn, params, buffers, x, y))
    return torch.stack(losses)
