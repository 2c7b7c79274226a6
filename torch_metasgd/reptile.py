r"""Reptile (Nichol, Achiam, Schulman 2018, arXiv:1803.02999) with a ``MetaSGD`` inner loop.

Reptile trains an initialization :math:`\theta` with first-order derivatives
only: every task :math:`t` of a meta-batch of :math:`T` runs :math:`k` inner
steps from :math:`\theta` (here the optimizer's full Meta-SGD update,
``torch_metasgd._kernels.metasgd_update``), and :math:`\theta` moves toward
the adapted weights:

.. math::
    \theta_t^{(0)} = \theta, \quad
    \theta_t^{(j)} = \theta_t^{(j-1)} - \alpha \odot d_t^{(j)} \;(j = 1..k), \qquad
    \theta \leftarrow \theta + \epsilon \, \frac{1}{T} \sum_t \big(\theta_t^{(k)} - \theta\big)

(the paper's batched version, Algorithm 2). :func:`reptile_loss` returns a
scalar whose ``.backward()`` leaves exactly the Reptile direction

.. math::
    g_\theta = \theta - \frac{1}{T} \sum_t \theta_t^{(k)}

in ``theta.grad``: it is :math:`L + \sum_p \langle p - \operatorname{stopgrad}(p), g_p\rangle`,
whose value is the loss :math:`L` reported and whose gradient is exactly
:math:`g_p`. So ``torch.optim.SGD(model.parameters(), lr=epsilon)`` is
the paper's update, and any other outer optimizer (Adam, a scheduler, gradient
clipping) takes :math:`g_\theta` as a gradient, as the paper suggests. Because
it is an ordinary backward pass into the model's parameters, gradient hooks
fire as usual: computed in the forward of a ``DistributedDataParallel``
module (:class:`ReptileLearner`), the directions are averaged over processes
like any gradient.

The step sizes get the exact first-order meta-gradient of the query loss at
the adapted weights, the one :func:`torch_metasgd.meta_loss` gives them with
``first_order=True`` (each direction :math:`d` a constant):

.. math::
    g_s = \frac{\partial}{\partial s} \frac{1}{T} \sum_t L^{\text{query}}_t(\theta_t^{(k)})
        = -\frac{1}{T} \sum_t \frac{\partial \alpha}{\partial s}
          \sum_j d_t^{(j)} \odot \nabla L^{\text{query}}_t(\theta_t^{(k)})

so with a ``query`` set a ``MetaSGD`` with learned step sizes trains them
beside Reptile's :math:`\theta`. Reptile itself has no signal for step sizes:
without ``query`` their ``.grad`` is left untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import batched
from .distributed import MetaLearner
from .optimizer import MetaSGD

__all__ = ["reptile_loss", "ReptileLearner"]


def reptile_loss(
    model: nn.Module,
    opt: MetaSGD,
    loss_fn: batched.LossFn,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor] | None = None,
    *,
    steps: int = 5,
    strategy: str = "auto",
) -> Tensor:
    r"""Reptile's meta-gradient for a meta-batch, as a scalar to call ``.backward()`` on.

    Task ``t`` runs ``steps`` inner steps of ``opt``'s update on
    ``support[0][t], support[1][t]`` (batched over tasks with ``strategy``, as
    :func:`torch_metasgd.meta_loss`); see the module docstring for the rule.
    ``.backward()`` on the result adds to ``.grad``:

    * of every parameter the optimizer holds: :math:`\theta - \frac{1}{T}\sum_t \theta_t`;
      parameters it does not hold stay fixed in the inner loop and get no gradient;
    * of ``opt.meta_parameters()``, only when ``query`` is given: the
      first-order meta-gradient of the mean query loss at the adapted weights.

    The value is the mean loss at the adapted weights on ``query`` (on
    ``support`` when there is no query set), for logging. Inside
    ``torch.no_grad()`` only that value is returned, without a graph.

    Args:
        model: the network; its parameters are the initialization Reptile trains.
        opt: the :class:`~torch_metasgd.MetaSGD` of the inner loop (step
            sizes, momentum, weight decay, param groups); read, never written.
        loss_fn: ``loss_fn(model_output, targets) -> scalar``.
        support: ``(inputs, targets)`` of the inner loops, leading size ``T``
            (tensors, or tuples and dicts of tensors, as in
            :func:`torch_metasgd.meta_loss`).
        query: optional ``(inputs, targets)``, leading size ``T``: the loss
            reported, and the step sizes' meta-gradient (default: None).
        steps: inner steps per task, :math:`k` (default: 5, as the paper's
            Omniglot runs; with 1, Reptile is joint training on all tasks;
            with 0, the direction is 0 and the value the loss at
            :math:`\theta`).
        strategy: ``"auto"``, ``"vmap"``, ``"loop"`` or ``"grouped"``, as in
            :func:`torch_metasgd.meta_loss` (default: "auto").

    A rank without tasks under torch.distributed returns 0 with a zero
    gradient for every parameter the optimizer holds (and the step sizes,
    with a query set), as :func:`torch_metasgd.meta_loss` does. Complex
    parameters get their direction as well.

    Raises:
        ValueError: ``steps`` is not a non-negative integer, an unknown
            strategy (or one that cannot run the model or inputs, as in
            :func:`torch_metasgd.meta_loss`), tensors without a shared
            leading task dimension of at least 1, an optimizer parameter that
            is not the model's, a group with ``hypergrad_lr > 0``, or
            ``loss_fn`` returns a non-scalar.
        TypeError: ``opt`` is not a :class:`~torch_metasgd.MetaSGD`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(),
        ...                             torch.nn.Linear(40, 1))
        >>> opt = MetaSGD(model.parameters(), lr=0.02, granularity="group")
        >>> outer = torch.optim.SGD(model.parameters(), lr=0.1)  # epsilon
        >>> xs, ys = torch.randn(25, 10, 1), torch.randn(25, 10, 1)
        >>> loss = reptile_loss(model, opt, torch.nn.functional.mse_loss, (xs, ys), steps=5)
        >>> outer.zero_grad()
        >>> loss.backward()
        >>> outer.step()  # theta <- theta + 0.1 * mean_t(theta_t - theta)
    """
    with batched.adapted_tasks(
        model, opt, loss_fn, support, query, steps, True, strategy, "reptile_loss"
    ) as (plan, adapted, losses):
        scored = tuple(support if query is None else query)
        step_sizes = (
            [s for s in opt.meta_parameters() if s.requires_grad] if query is not None else []
        )
        theta = [plan.params[n] for n in plan.trainable]
        if plan.n_tasks == 0:  # a rank without tasks under torch.distributed
            return batched.no_task_loss([*theta, *(step_sizes if steps else [])])
        if not torch.is_grad_enabled():
            return losses(scored).mean()
        with torch.set_grad_enabled(bool(step_sizes)):
            value = losses(scored).mean()
        step_grads = torch.autograd.grad(value, step_sizes, allow_unused=True) if step_sizes else []
        # The mean of the T displacements, not theta minus the mean of the T
        # adapted weights: the displacements are small, theta need not be.
        directions = [
            (p.detach() - adapted[n].detach()).mean(0)
            for n, p in zip(plan.trainable, theta, strict=True)
        ]
        # p - p.detach() is exactly 0 with gradient 1: the sum keeps value's value
        # and gives each tensor exactly its gradient. For a complex p, torch's
        # gradient of the real Re(<g, p>) = Re(sum(conj(g) p)) is g.
        surrogate = value.detach()
        for p, g in zip([*theta, *step_sizes], [*directions, *step_grads], strict=True):
            if g is not None:
                term = (
                    ((p - p.detach()) * g.conj()).real if g.is_complex() else (p - p.detach()) * g
                )
                surrogate = surrogate + term.sum()
        return surrogate


class ReptileLearner(MetaLearner):
    r"""A :class:`~torch_metasgd.MetaLearner` whose forward is :func:`reptile_loss`.

    ``DistributedDataParallel(ReptileLearner(model, opt, loss_fn))`` averages
    the ranks' Reptile directions (and the step sizes' gradients): with the
    same number of tasks on every rank, the direction of one process with all
    of them. The step sizes are parameters of the module; without a query set
    they get no gradient, so freeze them (``requires_grad_(False)``) or pass
    ``find_unused_parameters=True`` to DDP. Parameters the optimizer does not
    hold get no gradient either.

    Args:
        model, opt, loss_fn: as in :func:`reptile_loss`.
        steps, strategy: as in :func:`reptile_loss` (defaults: 5, "auto").

    Example (``torchrun --nproc_per_node=2 train.py``)::

        learner = DistributedDataParallel(ReptileLearner(model, opt, F.mse_loss))
        outer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = learner(support, query)  # this rank's tasks
        outer.zero_grad()
        loss.backward()  # theta.grad: the Reptile direction over every rank's tasks
        outer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        opt: MetaSGD,
        loss_fn: batched.LossFn,
        *,
        steps: int = 5,
        strategy: str = "auto",
    ) -> None:
        super().__init__(model, opt, loss_fn, steps=steps, strategy=strategy)

    def forward(
        self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """:func:`reptile_loss` of the tasks given."""
        steps, strategy = self.options["steps"], self.options["strategy"]
        return reptile_loss(
            self.model, self.opt, self.loss_fn, support, query, steps=steps, strategy=strategy
        )
