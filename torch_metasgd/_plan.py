"""What a batched inner loop needs of a (model, optimizer) pair, and a task's loss.

:func:`plan` reads the optimizer once per call: the parameters it holds, each
one's SGD options and effective step sizes (one copy per task, so that a
bound at each task's inner loop decides alone), its momentum buffers at call
time; :meth:`Plan.update` is the inner step every strategy takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from . import _exact, _kernels
from ._checks import (
    require_bare_model,
    require_metasgd,
    require_no_hypergradient,
    require_params_of,
)
from .optimizer import MetaSGD

__all__ = ["LossFn", "Plan", "plan", "task_loss", "task"]

LossFn = Callable[[Any, Tensor], Tensor]


@dataclass
class Plan:
    """What the inner loop needs to know about a (model, optimizer) pair."""

    params: dict[str, Tensor]  # every parameter of the model, by name
    trainable: list[str]  # the names the optimizer updates in the inner loop
    alphas: dict[str, Tensor]  # effective step sizes, (T, *shape): one copy per task
    options: dict[str, _kernels.SGDOptions]
    momentum: dict[str, Tensor]  # the optimizer's buffers at call time, detached
    buffers: dict[str, Tensor]
    n_tasks: int
    names: dict[int, str]  # the name of every parameter, by id
    # The dtype of each parameter whose step size has another (half precision).
    rounded_to: dict[str, torch.dtype]

    def update(
        self,
        params: dict[str, Tensor],
        grads: dict[str, Tensor | None],
        bufs: dict[str, Tensor],
        alphas: dict[str, Tensor],
        first_order: bool,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One Meta-SGD step with step sizes ``alphas``, out of place.

        A ``None`` gradient leaves the parameter as is.

        First order treats the whole direction (weight decay included) as a
        constant, as :func:`torch_metasgd.inner_loop` does.
        """
        params = dict(params)
        new_bufs = {}
        for name in self.trainable:
            g = grads[name]
            if g is None:
                if name in bufs:
                    new_bufs[name] = bufs[name]
                continue
            params[name], buf = _exact.update(
                params[name],
                g,
                bufs.get(name),
                alphas[name],
                self.options[name],
                first_order,
                self.rounded_to.get(name),
            )
            if buf is not None:
                new_bufs[name] = buf
        return params, new_bufs


def plan(model: nn.Module, opt: MetaSGD, who: str, n_tasks: int) -> Plan:
    params = dict(model.named_parameters())
    require_bare_model(model, who, params)
    require_metasgd(opt, who)
    require_params_of(opt, params.values(), f"the {type(model).__name__} model")
    require_no_hypergradient(opt)
    held: dict[int, tuple[_kernels.SGDOptions, Tensor]] = {}
    for group, step_sizes in zip(opt.param_groups, opt.step_sizes_by_group(), strict=True):
        alphas = _kernels.effective_lrs(group, step_sizes, tasks=n_tasks)
        options = _kernels.sgd_options(group)
        for p, alpha in zip(group["params"], alphas, strict=True):
            held[id(p)] = (options, alpha)
    trainable, alphas, options, momentum = [], {}, {}, {}
    for name, p in params.items():
        if id(p) not in held or not p.requires_grad:
            continue
        trainable.append(name)
        options[name], alphas[name] = held[id(p)]
        # .get: reading the optimizer must not make its (lazy) state.
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if options[name].momentum != 0 and buf is not None:
            momentum[name] = buf.detach()
    buffers = dict(model.named_buffers())
    names = {id(p): name for name, p in params.items()}
    rounded_to = {n: params[n].dtype for n in trainable if params[n].dtype != alphas[n].dtype}
    return Plan(params, trainable, alphas, options, momentum, buffers, n_tasks, names, rounded_to)


def task_loss(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], buffers: dict[str, Tensor], x, y
) -> Tensor:
    return loss_fn(functional_call(model, (params, buffers), (x,)), y)


def task(batch, t: int):
    """Task ``t`` of a batch: every tensor of the (nested) inputs or targets at index ``t``."""
    return batch[t] if isinstance(batch, Tensor) else tree_map(lambda leaf: leaf[t], batch)
