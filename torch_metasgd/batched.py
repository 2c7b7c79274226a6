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

Three strategies compute the same numbers (``strategy=``), each in its
module with the check of what it can run (:func:`strategy_for` says which one
a call runs, and why):

* ``"vmap"`` (:mod:`torch_metasgd._vmap`): ``torch.func.grad`` inside
  ``torch.func.vmap`` over tasks; any model and ``loss_fn`` vmap can run, not
  recurrent layers. Batch, layer and instance norms run there as
  mean/variance arithmetic (their native second-order gradients under
  ``vmap(grad(...))`` are wrong in torch 2.13).
* ``"loop"`` (:mod:`torch_metasgd._loop`): ``functional_call`` and
  ``torch.autograd.grad``, task by task; any model.
* ``"grouped"`` (:mod:`torch_metasgd._grouped`): an ``nn.Sequential`` of
  Conv2d, BatchNorm, pooling, Flatten, Linear and activation layers (nested
  ones flattened, a module used twice run twice, each run by its type: none
  with its own ``forward``, a hook or a parametrization) run once as a network
  ``T`` times as wide (grouped convolutions, batched matrix products). Its
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
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from . import _grouped, _loop, _vmap
from ._checks import require_bool, require_steps, require_tasks, scalar_loss, uncompiled
from ._exact import model_kept, twice_differentiable
from ._plan import LossFn, Plan
from ._plan import plan as plan_of
from .optimizer import MetaSGD

__all__ = ["meta_loss", "adapt", "adapt_tasks", "strategy_for", "Strategy"]

STRATEGIES = ("auto", "vmap", "loop", "grouped")
#: Per strategy, its module: ``adapt_all`` (the inner loops of all tasks: every parameter, with a
#: leading task dimension), ``losses`` (the per-task losses at such parameters), ``cannot_run``.
_MODULES = {"loop": _loop, "vmap": _vmap, "grouped": _grouped}


class Strategy(NamedTuple):
    """The strategy a batched call runs, and why."""

    name: str
    reason: str


def strategy_for(model: nn.Module, inputs: Any, strategy: str = "auto") -> Strategy:
    """The strategy :func:`meta_loss`, :func:`adapt_tasks` and
    :func:`~torch_metasgd.reptile_loss` run for ``model`` on a meta-batch's
    ``inputs`` (``support[0]``), and why; the ``ValueError`` they would raise
    for a strategy that cannot run them.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(),
        ...                             torch.nn.Linear(40, 1))
        >>> strategy_for(model, torch.randn(25, 10, 1)).name
        'grouped'
    """
    model = uncompiled(model)
    check_strategy(model, strategy)
    one_tensor = isinstance(inputs, Tensor)
    if strategy == "grouped" and not one_tensor:
        raise ValueError(
            'strategy="grouped" takes one tensor of inputs (the first layer\'s), got a '
            f'{type(inputs).__name__}: use strategy="vmap" or "loop"'
        )
    if torch.compiler.is_compiling():
        why_not = _vmap.cannot_run(model)
        if why_not is not None:
            raise ValueError(
                f"under torch.compile every strategy runs as vmap, which cannot run {why_not}: "
                "call meta_loss uncompiled"
            )
        return Strategy(
            "vmap", "compiled: vmap is the strategy that compiles with the same gradients"
        )
    if strategy != "auto":
        return Strategy(strategy, "asked for")
    device = inputs.device if one_tensor else tree_leaves(inputs)[0].device
    return _auto(model, device, one_tensor)


def check_strategy(model: nn.Module, strategy: Any) -> None:
    """``ValueError`` for an unknown strategy or one that cannot run ``model``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Invalid strategy: {strategy!r} (expected one of {STRATEGIES})")
    why_not = None if strategy == "auto" else _MODULES[strategy].cannot_run(model)
    if why_not is None:
        return
    if strategy == "grouped":
        raise ValueError(
            'strategy="grouped" needs an nn.Sequential of Conv2d, BatchNorm, pooling, Flatten, '
            "Linear and activation layers, each run by its own type (no subclass forward, hook "
            f"or parametrization): {why_not}"
        )
    raise ValueError(
        f'strategy="{strategy}" cannot run {why_not}; use strategy="loop" (what "auto" picks '
        "for them)"
    )


def _auto(model: nn.Module, device: torch.device, one_tensor: bool) -> Strategy:
    """The fastest strategy measured for this kind of model on this kind of device.

    On a CPU (``benchmarks/speed.py``, 2 cores): for convolutional networks
    a loop over tasks beats vmap (~2.5x slower) and grouped convolutions
    (~1.3x slower: the T-times-wider activations fall out of cache); for
    MLPs the task-stacked network beats vmap, which beats the loop. On a GPU
    one wide kernel beats T small ones: grouped was 6-16x faster than the
    loop and 1.3-1.6x faster than vmap on conv4 meta-batches on an H100, and
    vmap serves the models grouped cannot run.
    """
    modules = list(model.modules())
    layer = _vmap.recurrent(modules)
    if layer is not None:
        return Strategy("loop", f"the loop alone runs recurrent layers ({type(layer).__name__})")
    if device.type == "cpu" and any(
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in modules
    ):
        return Strategy("loop", "a convolutional network on a CPU: the loop measured fastest")
    why_not = _grouped.cannot_run(model)
    if why_not is None and one_tensor:
        return Strategy("grouped", "a Sequential the task-stacked network runs")
    why_not = why_not or "its inputs are not one tensor"
    return Strategy("vmap", f"the task-stacked network cannot run it: {why_not}")


def _auto_strategy(model: nn.Module, device: torch.device) -> str:
    """What ``"auto"`` picks for ``model`` on ``device`` with one tensor of inputs."""
    return _auto(model, device, True).name


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
) -> Iterator[tuple[Plan, dict[str, Tensor], Callable[[tuple[Tensor, Tensor]], Tensor]]]:
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
    strategy = strategy_for(model, support[0], strategy).name
    adapt_all, losses = _MODULES[strategy].adapt_all, _MODULES[strategy].losses
    loss_fn = scalar_loss(loss_fn)
    first_order = first_order or not torch.is_grad_enabled()
    # The task-stacked network calls no functional_call and holds no attention.
    functional = strategy != "grouped"
    with (
        model_kept(model) if functional else nullcontext(),
        twice_differentiable(functional and not first_order),
    ):
        with torch.enable_grad():
            plan = plan_of(model, opt, who, n_tasks)
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
        plan = plan_of(model, opt, "adapt", 1)
        fast = _loop.adapt_one(
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
