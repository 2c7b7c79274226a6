r"""Batched Meta-SGD with ``torch.func``: every task of a meta-batch at once.

:func:`meta_loss` runs the inner loops of ``T`` tasks together and returns the
mean query loss, ready for ``.backward()``. For task :math:`t` and inner steps
:math:`k = 1..K` it computes, with the optimizer's own update
(``torch_metasgd._kernels.metasgd_update``, the step of every differentiable
path),

.. math::
    \begin{aligned}
        \theta_t^{(0)} &= \theta, \qquad
        d_t^{(k)}, b_t^{(k)} = \operatorname{sgd\_direction}\big(
            \theta_t^{(k-1)}, \nabla_\theta L^{\text{support}}_t(\theta_t^{(k-1)}),
            b_t^{(k-1)}\big) \\
        \theta_t^{(k)} &= \theta_t^{(k-1)} - \alpha \odot d_t^{(k)}, \qquad
        \alpha = \operatorname{clamp}(\gamma\, \phi(s), \alpha_{\min}, \alpha_{\max}) \\
        \mathcal{L} &= \frac{1}{T} \sum_t L^{\text{query}}_t(\theta_t^{(K)})
    \end{aligned}

Gradients of :math:`\mathcal{L}` reach the model's parameters :math:`\theta`
and the live step sizes :math:`s` (``opt.meta_parameters()``), through the
inner steps unless ``first_order=True``. :func:`adapt_tasks` returns the
adapted parameters :math:`\theta_t^{(K)}` of every task instead (the inner
loops alone, as :func:`torch_metasgd.reptile_loss` needs them).

What it shares with :func:`torch_metasgd.inner_loop` (``higher``):

* parameters of the model that the optimizer does not hold stay fixed in the
  inner loop (they still receive a meta-gradient);
* the optimizer's momentum buffers at call time, if any, are copied
  (detached) as every task's initial buffers; the optimizer's state is never
  written;
* the model's buffers (BatchNorm running statistics) are read but never
  written: each task's forward passes see copies, so running statistics do
  not move during meta-training (higher's fast model also runs on copies). In
  train mode BatchNorm normalizes with each task's own batch statistics, as a
  loop over tasks does; in eval mode it uses the running statistics.
* ``first_order=True`` treats each inner direction (gradient, weight decay,
  momentum) as a constant: first-order MAML for :math:`\theta`, and the exact
  first-order gradient for :math:`s`;
* a parameter the support loss never reaches (no gradient) is left as it is,
  weight decay and momentum included, as ``torch.optim.SGD`` leaves it;
* the inner step keeps the parameter's dtype: for a bfloat16/float16
  parameter (whose step sizes are float32) it is taken in float32 and rounded
  once, as ``MetaSGD.step()`` rounds, and the meta-gradient reaches the
  float32 step sizes.

The inputs and targets of a batch (``support = (inputs, targets)``) are
tensors, or tuples, lists and dicts of tensors, each with the leading task
dimension ``T``; the model is called on a task's inputs as its one argument
(``model(inputs[t])``), the loss as ``loss_fn(output, targets[t])``.
``steps=0`` scores the initial weights (evaluation before adaptation).

Three strategies compute the same numbers (``strategy=``):

* ``"vmap"``: ``torch.func.grad`` inside ``torch.func.vmap`` over tasks; any
  model (and ``loss_fn``) that ``functional_call`` and vmap can run:
  not recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells
  have no batching rule; refused), nor code vmap refuses (``.item()``,
  data-dependent control flow: torch raises). Batch, layer and instance
  norms run as mean/variance arithmetic there, because the native ops'
  second-order gradients through ``vmap(grad(...))`` are wrong in torch 2.13
  (group and RMS norms, attention, embeddings and activations are exact
  natively and run as they are).
* ``"loop"``: ``functional_call`` and ``torch.autograd.grad``, task by task;
  any model.
* ``"grouped"``: an ``nn.Sequential`` (nested ones flattened, a module used
  twice run twice) of Conv2d, BatchNorm, pooling, Flatten, Linear and
  activation layers, each run by its type, so none with its own ``forward``,
  a hook or a parametrization, run once as a network ``T`` times as wide
  (grouped convolutions, batched matrix products; see :mod:`._grouped`). Its
  inputs are one tensor, ``(T, N, C, H, W)`` for a convolutional network,
  ``(T, N, *, F)`` otherwise; ``loss_fn`` runs under ``vmap``.

``"auto"`` picks by structure and by the device of the data, after
measurements (``benchmarks/speed.py --device``): the loop for recurrent
networks, on any device; on a CPU the loop for convolutional networks (vmap
is about 2.5x and grouped about 1.3x slower there), ``"grouped"`` for other
supported Sequentials with one tensor of inputs (MLPs: about 1.5x faster
than vmap, 10x faster than the loop); on a GPU ``"grouped"`` for every
supported Sequential (on an H100, conv4 meta-batches ran 6-16x faster than
the loop, 1.3-1.6x faster than vmap); ``"vmap"`` for everything else. So
``"auto"`` usually runs ``loss_fn`` under ``vmap``: a loss that vmap cannot
run needs ``strategy="loop"``.

With second-order gradients, ``scaled_dot_product_attention`` (in
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) runs as its math
kernel during the inner loops of vmap and the loop: the flash kernel torch
picks on a CPU cannot be differentiated twice. A ``torch.compile``'d model
runs as the module it wraps (the same parameters): a compiled forward cannot
be differentiated twice; compile the function that calls :func:`meta_loss`
instead. Whatever ``torch.func.functional_call`` does inside, the model's
parameters and buffers are the same tensors after the call as before.

Under ``torch.distributed`` with several ranks, a rank may hold no task: the
loss is then 0, with a zero gradient for every parameter and step size, so
that ``DistributedDataParallel``'s all-reduce still runs on every rank (see
:class:`torch_metasgd.MetaLearner` for weighting unequal shares). In one
process, zero tasks are an error.

Under ``torch.compile`` (``torch.compile(meta_loss)``, or a compiled function
that calls it) every strategy runs as vmap, the only one that compiles with
the same gradients: aot_autograd has no double backward for the loop, and the
grouped strategy's second-order gradients come out wrong when compiled
(torch 2.13). Compiling takes tens of seconds; see the README for what it gains.

Memory: the returned loss holds the graphs of all ``T`` tasks until
``.backward()``, as a hand-written loop that averages the query losses does;
a loop over :func:`torch_metasgd.inner_loop` that calls ``.backward()`` per
task holds one (on the Omniglot conv net of ``benchmarks/speed.py``, 8 tasks:
about 600 MiB against 170 MiB of peak extra memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from . import _exact, _grouped, _kernels
from ._checks import (
    require_bare_model,
    require_bool,
    require_metasgd,
    require_no_hypergradient,
    require_params_of,
    require_steps,
    require_tasks,
    scalar_loss,
    uncompiled,
)
from ._exact import model_kept, twice_differentiable
from .optimizer import MetaSGD

__all__ = ["meta_loss", "adapt", "adapt_tasks"]

_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch < 2.3: never

STRATEGIES = ("auto", "vmap", "loop", "grouped")

LossFn = Callable[[Any, Tensor], Tensor]


@dataclass
class _Plan:
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


def _plan(model: nn.Module, opt: MetaSGD, who: str, n_tasks: int) -> _Plan:
    require_bare_model(model, who)
    require_metasgd(opt, who)
    require_params_of(opt, model.parameters(), f"the {type(model).__name__} model")
    require_no_hypergradient(opt)
    held: dict[int, tuple[_kernels.SGDOptions, Tensor]] = {}
    for group, step_sizes in zip(opt.param_groups, opt.step_sizes_by_group(), strict=True):
        alphas = _kernels.effective_lrs(group, step_sizes, tasks=n_tasks)
        options = _kernels.sgd_options(group)
        for p, alpha in zip(group["params"], alphas, strict=True):
            held[id(p)] = (options, alpha)
    trainable, alphas, options, momentum = [], {}, {}, {}
    params = dict(model.named_parameters())
    for name, p in params.items():
        if id(p) not in held or not p.requires_grad:
            continue
        trainable.append(name)
        options[name], alphas[name] = held[id(p)]
        buf = opt.state[p].get("momentum_buffer")
        if options[name].momentum != 0 and buf is not None:
            momentum[name] = buf.detach()
    buffers = dict(model.named_buffers())
    names = {id(p): name for name, p in params.items()}
    rounded_to = {n: params[n].dtype for n in trainable if params[n].dtype != alphas[n].dtype}
    return _Plan(params, trainable, alphas, options, momentum, buffers, n_tasks, names, rounded_to)


def _task_loss(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], buffers: dict[str, Tensor], x, y
) -> Tensor:
    return loss_fn(functional_call(model, (params, buffers), (x,)), y)


def _adapt_autograd(
    model: nn.Module, plan: _Plan, loss_fn: LossFn, x, y, steps: int, first_order: bool, task: int
) -> dict[str, Tensor]:
    """The inner loop of task ``task`` with ``torch.autograd.grad``."""
    params, bufs = plan.params, plan.momentum
    alphas = {n: a[task] for n, a in plan.alphas.items()}
    buffers = {k: b.clone() for k, b in plan.buffers.items()}
    for _ in range(steps):
        loss = _task_loss(model, loss_fn, params, buffers, x, y)
        inputs = [params[n] for n in plan.trainable]
        grads = torch.autograd.grad(loss, inputs, create_graph=not first_order, allow_unused=True)
        grads = dict(zip(plan.trainable, grads, strict=True))
        params, bufs = plan.update(params, grads, bufs, alphas, first_order)
    return params


def _task(batch, t: int):
    """Task ``t`` of a batch: every tensor of the (nested) inputs or targets at index ``t``."""
    return batch[t] if isinstance(batch, Tensor) else tree_map(lambda leaf: leaf[t], batch)


def _adapt_loop(model, plan, loss_fn, support, steps, first_order) -> dict[str, Tensor]:
    per_task = [
        _adapt_autograd(
            model, plan, loss_fn, _task(support[0], t), _task(support[1], t), steps, first_order, t
        )
        for t in range(plan.n_tasks)
    ]
    return {n: torch.stack([fast[n] for fast in per_task]) for n in plan.params}


def _losses_loop(model, plan, loss_fn, adapted, batch) -> Tensor:
    # unbind, not indexing: its backward stacks the T gradients at once.
    unbound = {n: p.unbind() for n, p in adapted.items()}
    losses = []
    for t in range(plan.n_tasks):
        buffers = {k: b.clone() for k, b in plan.buffers.items()}
        params = {n: p[t] for n, p in unbound.items()}
        x, y = _task(batch[0], t), _task(batch[1], t)
        losses.append(_task_loss(model, loss_fn, params, buffers, x, y))
    return torch.stack(losses)


def _adapt_vmap(model, plan, loss_fn, support, steps, first_order) -> dict[str, Tensor]:
    trainable = plan.trainable
    # torch.func.grad gives zeros where autograd gives None (a parameter the
    # loss never reaches); weight decay or momentum would then move it, which
    # torch.optim.SGD and the other strategies do not. Only then is the graph
    # searched for the parameters it reaches.
    find_unused = any(plan.options[n].weight_decay or plan.options[n].momentum for n in trainable)

    reached: list[set[str]] = []  # what each grad call's graph reached (aux must be tensors)

    def support_loss(theta, fixed, buffers, x, y):
        loss = _task_loss(model, loss_fn, {**fixed, **theta}, buffers, x, y)
        if find_unused:
            reached.append(_reached(loss, theta))
        return loss

    def one_task(buffers, alphas, xs, ys):
        params, bufs = plan.params, plan.momentum
        for _ in range(steps):
            theta = {n: params[n] for n in trainable}
            fixed = {n: p for n, p in params.items() if n not in theta}
            if first_order:
                theta = {n: p.detach() for n, p in theta.items()}
                fixed = {n: p.detach() for n, p in fixed.items()}
            grads = grad(support_loss)(theta, fixed, buffers, xs, ys)
            if find_unused:
                used = reached.pop()
                grads = {n: g if n in used else None for n, g in grads.items()}
            params, bufs = plan.update(params, grads, bufs, alphas, first_order)
        return params

    # Copies: BatchNorm in train mode still counts num_batches_tracked in place.
    buffers = {k: b.clone() for k, b in plan.buffers.items()}
    with _DecomposedNorms():
        return vmap(one_task, in_dims=(None, 0, 0, 0), randomness="different")(
            buffers, plan.alphas, *support
        )


def _reached(loss: Tensor, tensors: dict[str, Tensor]) -> set[str]:
    """The names of ``tensors`` (leaves of ``loss``'s graph) that ``loss``'s graph reaches."""
    names = {id(t): n for n, t in tensors.items()}
    reached, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None and id(variable) in names:
            reached.add(names[id(variable)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def _losses_vmap(model, plan, loss_fn, adapted, batch) -> Tensor:
    buffers = {k: b.clone() for k, b in plan.buffers.items()}

    def one_task(params, x, y):
        return _task_loss(model, loss_fn, params, buffers, x, y)

    with _DecomposedNorms():
        return vmap(one_task, randomness="different")(adapted, *batch)


class _DecomposedNorms(TorchFunctionMode):
    """Runs batch, layer and instance norms as mean/variance arithmetic, writing no statistics.

    Under ``vmap(grad(...))`` the second-order gradients of the native
    ``batch_norm``, of ``layer_norm`` with an affine weight and of
    ``instance_norm`` with one are wrong (torch 2.13: ~1e-3 relative, the loss
    right); their arithmetic is differentiated exactly. The native batch norm
    also writes running statistics in place, which vmap refuses for a tensor
    the tasks share. Group and RMS norms, attention, embeddings and the
    activations are exact natively and run as they are.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every op inside vmap comes here: the common case first, at the least cost.
        if func not in _DECOMPOSITIONS:
            return func(*args, **(kwargs or {}))
        return _DECOMPOSITIONS[func](*args, **(kwargs or {}))


def _normalize(x: Tensor, dims: list[int], eps: float) -> Tensor:
    # Both moments from one var_mean pass: a mean() apart is ~7x less accurate
    # in float32 on a large reduction (4e-7 against 6e-8 relative over a
    # 75x28x28 channel), and the centring error is divided by the standard
    # deviation. On the Omniglot conv net (most pixels exactly 0) the float32
    # meta-gradient was up to 7.5e-4 off float64 with it, 6e-6 without.
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, shape) -> Tensor:
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


def _batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if training:
        out = _normalize(x, [0, *range(2, x.dim())], eps)
    else:
        out = (x - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    return _affine(out, weight, bias, shape)


def _instance_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if use_input_stats:
        out = _normalize(x, list(range(2, x.dim())), eps)
    else:
        out = (x - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    return _affine(out, weight, bias, shape)


def _layer_norm(
    x: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    out = _normalize(x, list(range(-len(normalized_shape), 0)), eps)
    return _affine(out, weight, bias, tuple(normalized_shape))


_DECOMPOSITIONS = {
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.layer_norm: _layer_norm,
}


def _adapt_grouped(model, plan, loss_fn, support, steps, first_order) -> dict[str, Tensor]:
    trainable = plan.trainable
    # Every task starts from the same weights: expanded views, so the
    # meta-gradient of the T copies sums into the shared parameter.
    params = {n: p.expand(plan.n_tasks, *p.shape) for n, p in plan.params.items()}
    # (T,) step sizes of scalar granularity broadcast over each task's tensor.
    alphas = {
        n: a.reshape(*a.shape, *(1,) * (params[n].dim() - a.dim())) for n, a in plan.alphas.items()
    }
    bufs = plan.momentum
    for _ in range(steps):
        theta = params
        if first_order:
            theta = {n: p.detach().requires_grad_(n in plan.alphas) for n, p in params.items()}
        out = _grouped.forward(model, theta, plan.names, support[0])
        # Tasks are independent: the gradient of the sum is every task's own.
        loss = vmap(loss_fn)(out, support[1]).sum()
        grads = torch.autograd.grad(
            loss,
            [theta[n] for n in trainable],
            create_graph=not first_order,
            allow_unused=True,
        )
        grads = dict(zip(trainable, grads, strict=True))
        params, bufs = plan.update(params, grads, bufs, alphas, first_order)
    return params


def _losses_grouped(model, plan, loss_fn, adapted, batch) -> Tensor:
    return vmap(loss_fn)(_grouped.forward(model, adapted, plan.names, batch[0]), batch[1])


#: Per strategy: the inner loops of all tasks (every parameter, with a leading
#: task dimension) and the per-task losses at such parameters.
_STRATEGIES = {
    "loop": (_adapt_loop, _losses_loop),
    "vmap": (_adapt_vmap, _losses_vmap),
    "grouped": (_adapt_grouped, _losses_grouped),
}


_RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def check_strategy(model: nn.Module, strategy: Any) -> None:
    """``ValueError`` for an unknown strategy or one that cannot run ``model``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Invalid strategy: {strategy!r} (expected one of {STRATEGIES})")
    if strategy == "grouped" and not _grouped.supports(model):
        raise ValueError(
            'strategy="grouped" needs an nn.Sequential of Conv2d, BatchNorm, pooling, '
            "Flatten, Linear and activation layers, each run by its own type (no subclass "
            "forward, hook or parametrization)"
        )
    recurrent = _recurrent(model) if strategy == "vmap" else None
    if recurrent is not None:
        raise ValueError(
            f'strategy="vmap" cannot run {type(recurrent).__name__}: torch.func.vmap has no '
            'batching rule for recurrent layers; use strategy="loop" (what "auto" picks for them)'
        )


def _recurrent(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, _RECURRENT)), None)


def _strategy(model: nn.Module, strategy: str, inputs: Any) -> str:
    """The strategy that runs, for these inputs: checked, ``"auto"`` resolved."""
    check_strategy(model, strategy)
    one_tensor = isinstance(inputs, Tensor)
    if strategy == "grouped" and not one_tensor:
        raise ValueError(
            'strategy="grouped" takes one tensor of inputs (the first layer\'s), got a '
            f'{type(inputs).__name__}: use strategy="vmap" or "loop"'
        )
    if _is_compiling():
        # Compiled, vmap is the strategy that gives the same gradients (see above).
        recurrent = _recurrent(model)
        if recurrent is not None:
            raise ValueError(
                f"under torch.compile every strategy runs as vmap, which cannot run "
                f"{type(recurrent).__name__} (no batching rule for recurrent layers): "
                "call meta_loss uncompiled"
            )
        return "vmap"
    if strategy == "auto":
        device = inputs.device if one_tensor else tree_leaves(inputs)[0].device
        strategy = _auto_strategy(model, device)
        if strategy == "grouped" and not one_tensor:
            strategy = "vmap"
    return strategy


@contextmanager
def adapted_tasks(
    model: nn.Module,
    opt: MetaSGD,
    loss_fn: LossFn,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor] | None,
    steps: int,
    first_order: bool,
    strategy: str,
    who: str,
) -> Iterator[tuple[_Plan, dict[str, Tensor], Callable[[tuple[Tensor, Tensor]], Tensor]]]:
    """What the batched entry points share: every check, then every task's inner loop.

    Yields the plan, the adapted parameters (leading task dimension ``T``)
    and ``losses(batch)``, the per-task losses at those parameters, to be
    called inside the block. Inside ``torch.no_grad()`` the inner loops run
    first order (evaluation). On leaving, the model is as it was.
    """
    require_steps(steps)
    require_bool(first_order, "first_order")
    # Under torch.distributed a rank's share of a meta-batch may be empty.
    n_tasks = require_tasks(support, query, allow_none=_several_ranks())
    model = uncompiled(model)
    strategy = _strategy(model, strategy, support[0])
    adapt_all, losses = _STRATEGIES[strategy]
    loss_fn = scalar_loss(loss_fn)
    first_order = first_order or not torch.is_grad_enabled()
    # The task-stacked network calls no functional_call and holds no attention.
    functional = strategy != "grouped"
    with (
        model_kept(model) if functional else nullcontext(),
        twice_differentiable(functional and not first_order),
    ):
        with torch.enable_grad():
            plan = _plan(model, opt, who, n_tasks)
            if n_tasks:
                adapted = adapt_all(model, plan, loss_fn, tuple(support), steps, first_order)
            else:  # no inner loop to run: every parameter, for none of the tasks
                adapted = {n: p.expand(0, *p.shape) for n, p in plan.params.items()}
        yield plan, adapted, lambda batch: losses(model, plan, loss_fn, adapted, batch)


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def no_task_loss(tensors: Iterable[Tensor]) -> Tensor:
    """The loss of a rank with no task: 0, with a zero gradient for each of ``tensors``.

    Every tensor a rank with tasks would give a gradient gets one, so that
    ``DistributedDataParallel``'s all-reduce of it runs on every rank (a
    missing one leaves the other ranks waiting). An empty slice sums to an
    exact 0 whatever the tensor holds (``0 * p`` would be NaN at an inf).
    """
    loss = torch.zeros(())
    for t in tensors:
        if t.requires_grad:
            empty = t.reshape(-1)[:0].sum()
            loss = loss + (empty.real if empty.is_complex() else empty)
    return loss


def meta_loss(
    model: nn.Module,
    opt: MetaSGD,
    loss_fn: LossFn,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    *,
    steps: int = 1,
    first_order: bool = False,
    strategy: str = "auto",
) -> Tensor:
    r"""The mean query loss over a meta-batch after ``steps`` inner Meta-SGD steps per task.

    See the module docstring for the update. ``support = (x, y)`` and
    ``query = (x, y)`` carry a leading task dimension ``T`` (on every tensor,
    if ``x`` or ``y`` are tuples or dicts of tensors); task ``t`` adapts on
    ``support[0][t], support[1][t]`` with ``loss_fn(model(x), y)`` and is
    scored on its query set. ``.backward()`` on the result fills ``.grad`` of
    the model's parameters and of ``opt.meta_parameters()``, exactly as the
    mean over tasks of :func:`torch_metasgd.inner_loop` would.

    Args:
        model: the network; its parameters are the shared initialization.
        opt: the :class:`~torch_metasgd.MetaSGD` holding the step sizes (and
            the hyperparameters) of the inner loop. Its step sizes are read
            live, its state is never written.
        loss_fn: ``loss_fn(model_output, targets) -> scalar``.
        support, query: ``(inputs, targets)``, each a tensor or tuples, lists
            and dicts of tensors, every tensor with leading size ``T``.
        steps: inner steps per task; 0 scores the initial weights (default: 1).
        first_order: treat inner directions as constants (first-order MAML);
            the step sizes still get their gradient (default: False).
        strategy: ``"vmap"``, ``"loop"``, ``"grouped"`` or ``"auto"`` (see
            the module docstring) (default: "auto"). All give the same result
            to float rounding.

    Inside ``torch.no_grad()`` (evaluation) the inner loops still take their
    gradients, first order, and the returned loss has no graph.

    Raises:
        ValueError: the tensors do not share a leading task dimension of at
            least 1 (of 0 too under torch.distributed), ``steps`` is not a
            non-negative integer, ``first_order`` not a bool, an unknown
            strategy, ``"grouped"`` for a model or inputs it cannot run,
            ``"vmap"`` (or compiling) for a recurrent model, an optimizer
            parameter that is not the model's, a group with
            ``hypergrad_lr > 0``, or ``loss_fn`` returns a non-scalar.
        TypeError: ``opt`` is not a :class:`~torch_metasgd.MetaSGD`, or ``model``
            is wrapped in ``DistributedDataParallel``/``DataParallel``: wrap a
            :class:`~torch_metasgd.MetaLearner` instead.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(),
        ...                             torch.nn.Linear(40, 1))
        >>> opt = MetaSGD(model.parameters(), lr=0.01)
        >>> meta_opt = torch.optim.Adam([*model.parameters(), *opt.meta_parameters()])
        >>> xs, ys, xq, yq = (torch.randn(25, 10, 1) for _ in range(4))
        >>> loss = meta_loss(model, opt, torch.nn.functional.mse_loss, (xs, ys), (xq, yq))
        >>> meta_opt.zero_grad()
        >>> loss.backward()
        >>> meta_opt.step()
    """
    with adapted_tasks(
        model, opt, loss_fn, support, query, steps, first_order, strategy, "meta_loss"
    ) as (plan, _, losses):
        if plan.n_tasks == 0:
            # The step sizes take part only through inner steps.
            step_sizes = opt.meta_parameters() if steps else []
            return no_task_loss([*plan.params.values(), *step_sizes])
        # Inside torch.no_grad() the losses are computed without a graph.
        return losses(tuple(query)).mean()


def _auto_strategy(model: nn.Module, device: torch.device) -> str:
    """The fastest strategy measured for this kind of model on this kind of device.

    On a CPU (``benchmarks/speed.py``, 2 cores): for convolutional networks
    a loop over tasks beats vmap (~2.5x slower) and grouped convolutions
    (~1.3x slower: the T-times-wider activations fall out of cache); for
    MLPs the task-stacked network beats vmap, which beats the loop. On a GPU
    one wide kernel beats T small ones: grouped was 6-16x faster than the
    loop and 1.3-1.6x faster than vmap on conv4 meta-batches on an H100
    (issue 14's timings), and vmap serves the models grouped cannot run.
    Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells)
    have no vmap batching rule: the loop runs them, on any device.
    """
    modules = list(model.modules())
    if any(isinstance(m, _RECURRENT) for m in modules):
        return "loop"  # the only strategy that runs them
    if device.type == "cpu" and any(
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in modules
    ):
        return "loop"
    return "grouped" if _grouped.supports(model) else "vmap"


def adapt(
    model: nn.Module,
    opt: MetaSGD,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor,
    *,
    steps: int = 1,
    first_order: bool = False,
) -> dict[str, Tensor]:
    r"""Adapt to one task: the parameters after ``steps`` inner Meta-SGD steps.

    Returns every parameter of ``model`` by name (those the optimizer does not
    hold unchanged), in its dtype, for :func:`torch.func.functional_call`. The
    model is called as ``model(inputs)`` (``inputs`` may be a tuple or dict of
    tensors); ``steps=0`` returns the parameters themselves. The result is
    differentiable in the model's parameters and the step sizes unless
    ``first_order``; neither the model nor the optimizer is modified. Inside
    ``torch.no_grad()`` (adapting at test time) the inner steps still take
    their gradients, and the result has no graph.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = MetaSGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> fast = adapt(model, opt, torch.nn.functional.mse_loss, x, y, steps=2)
        >>> pred = torch.func.functional_call(model, fast, (x,))
    """
    require_steps(steps)
    require_bool(first_order, "first_order")
    model = uncompiled(model)
    evaluation = not torch.is_grad_enabled()
    first_order = first_order or evaluation
    with torch.enable_grad(), twice_differentiable(not first_order), model_kept(model):
        plan = _plan(model, opt, "adapt", 1)
        fast = _adapt_autograd(
            model, plan, scalar_loss(loss_fn), inputs, targets, steps, first_order, 0
        )
    return {n: p.detach() for n, p in fast.items()} if evaluation else fast


def adapt_tasks(
    model: nn.Module,
    opt: MetaSGD,
    loss_fn: LossFn,
    support: tuple[Tensor, Tensor],
    *,
    steps: int = 1,
    first_order: bool = False,
    strategy: str = "auto",
) -> dict[str, Tensor]:
    r"""Adapt to every task of a meta-batch at once: the parameters after ``steps`` inner steps.

    Returns every parameter of ``model`` by name, in its dtype, with a
    leading task dimension ``T``: entry ``t`` is :func:`adapt` on
    ``support[0][t], support[1][t]`` (to float rounding), computed with
    ``strategy`` as :func:`meta_loss` does (``support`` as there; ``steps=0``
    gives the parameters, expanded). Differentiable in the model's parameters
    and the step sizes (through the inner steps unless ``first_order``);
    neither the model nor the optimizer is modified. Inside
    ``torch.no_grad()`` the result has no graph.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(),
        ...                             torch.nn.Linear(40, 1))
        >>> opt = MetaSGD(model.parameters(), lr=0.01)
        >>> xs, ys = torch.randn(25, 10, 1), torch.randn(25, 10, 1)
        >>> fast = adapt_tasks(model, opt, torch.nn.functional.mse_loss, (xs, ys), steps=5)
        >>> fast["0.weight"].shape
        torch.Size([25, 40, 1])
    """
    with adapted_tasks(
        model, opt, loss_fn, support, None, steps, first_order, strategy, "adapt_tasks"
    ) as (_, fast, _):
        pass
    return fast if torch.is_grad_enabled() else {n: p.detach() for n, p in fast.items()}
