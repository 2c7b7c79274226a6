"""Differentiable Meta-SGD inner loops: the ``higher`` twin of ``MetaSGD`` and ``inner_loop``.

Meta-SGD learns its step sizes through the inner update

.. math::
    \\theta' = \\theta - \\alpha \\odot d\\big(\\nabla_\\theta L_{support}(\\theta)\\big),
    \\qquad \\alpha = \\operatorname{clamp}(\\gamma\\,\\phi(s), \\alpha_{\\min}, \\alpha_{\\max})

so the query loss :math:`L_{query}(\\theta')` must be differentiable in both
the initial weights :math:`\\theta` and the step-size parameters :math:`s`.
:class:`DifferentiableMetaSGD` performs that update out of place on
``higher``'s fast weights; it is registered with ``higher`` for ``MetaSGD`` and
every subclass, so ``higher.innerloop_ctx(model, opt, copy_initial_weights=False)``
works unchanged, and :func:`inner_loop` wraps it with MAML's defaults.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import higher
import torch
from higher.optim import DifferentiableOptimizer
from torch import Tensor, nn

from . import _exact, _kernels
from ._checks import (
    require_bare_model,
    require_bool,
    require_metasgd,
    require_no_hypergradient,
    require_params_of,
    require_scalar_loss,
    uncompiled,
)
from ._exact import twice_differentiable
from .optimizer import MetaSGD, for_each_subclass

__all__ = ["DifferentiableMetaSGD", "inner_loop"]


class DifferentiableMetaSGD(DifferentiableOptimizer):
    r"""The differentiable twin of :class:`~torch_metasgd.MetaSGD` for ``higher``.

    ``diffopt.step(loss)`` replaces ``opt.zero_grad(); loss.backward(); opt.step()``
    and returns new fast weights

    .. math::
        \theta_t = \theta_{t-1} - \alpha \odot d_t

    computed out of place with the same direction :math:`d_t` (maximize,
    weight decay, momentum, dampening, nesterov) and the same step size
    :math:`\alpha = \operatorname{clamp}(\gamma\,\phi(s), \alpha_{\min}, \alpha_{\max})`
    as :meth:`MetaSGD.step`. The step sizes :math:`s` are the optimizer's live
    :meth:`~torch_metasgd.MetaSGD.meta_parameters`, so a backward pass through
    the fast weights reaches them; momentum buffers start from the optimizer's
    and are never written back.

    Construct it through :func:`torch_metasgd.inner_loop`,
    ``higher.innerloop_ctx`` or ``higher.get_diff_optim``, which pass the
    arguments below. Every subclass of ``MetaSGD`` is registered with this
    twin when it is defined; a subclass that changes the update registers its
    own with ``higher.register_optim(Subclass, DifferentiableSubclass)``.

    Args:
        other: the :class:`~torch_metasgd.MetaSGD` (or subclass) to mirror.
        reference_params: the parameters of the model ``other`` optimizes, in
            the order of the fast weights (``model.parameters()``).
        fmodel: the patched model whose fast weights ``step`` updates.
        device: where to move momentum buffers and step sizes (a
            differentiable copy); ``None`` keeps them where they are.
        override: per-group hyperparameter overrides, as in ``higher``; an
            overridden ``lr`` may be a tensor that requires grad.
        grad_callback: applied to the list of gradients (one entry per
            reference parameter, ``None`` for those the optimizer does not
            hold) before every update, e.g. for clipping.
        track_higher_grads: ``False`` runs the loop without any graph
            (evaluation: memory does not grow with the number of steps).
        first_order: compute inner gradients without a graph and treat the
            direction :math:`d_t` as a constant: no second-order terms, the
            first-order (FOMAML) gradient for :math:`\theta` and the exact
            first-order gradient
            :math:`-\sum_t \partial\alpha/\partial s \odot d_t \odot \nabla L_{query}`
            for :math:`s`.

    Example:
        >>> import higher
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch_metasgd.MetaSGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     _ = diffopt.step((fmodel(x) - y).pow(2).mean())
        ...     (fmodel(x) - y).pow(2).mean().backward()
        >>> all(s.grad is not None for s in opt.meta_parameters())
        True
    """

    def __init__(
        self,
        other: MetaSGD,
        reference_params: Iterable[Tensor],
        fmodel: nn.Module | None = None,
        device: torch.device | None = None,
        override: dict[str, list[Any]] | None = None,
        grad_callback: Callable[[list[Tensor | None]], list[Tensor | None]] | None = None,
        track_higher_grads: bool = True,
        first_order: bool = False,
        **kwargs: Any,
    ) -> None:
        # DifferentiableOptimizer.__init__ is not called: it deep-copies every
        # parameter (inside param_groups) and clones the optimizer state, and
        # a cloned step size would silently never receive its meta-gradient.
        require_metasgd(other, "DifferentiableMetaSGD")
        require_no_hypergradient(other)
        reference_params = list(reference_params)
        require_params_of(other, reference_params, "the reference parameters")
        index_of = {id(p): i for i, p in enumerate(reference_params)}
        self.param_groups: list[dict[str, Any]] = []
        self.state: list[defaultdict[int, dict[str, Any]]] = []
        self._group_to_param_list: list[list[int]] = []
        self._step_sizes: list[list[Tensor]] = []
        moved: dict[int, Tensor] = {}
        for group, step_sizes in zip(other.param_groups, other.step_sizes_by_group(), strict=True):
            state: defaultdict[int, dict[str, Any]] = defaultdict(dict)
            indices = []
            for p_idx, p in enumerate(group["params"]):
                indices.append(index_of[id(p)])
                buf = other.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    state[p_idx]["momentum_buffer"] = buf if device is None else buf.to(device)
            self.param_groups.append({**group, "params": [None] * len(group["params"])})
            self.state.append(state)
            self._group_to_param_list.append(indices)
            if device is not None:
                step_sizes = [moved.setdefault(id(s), s.to(device)) for s in step_sizes]
            self._step_sizes.append(step_sizes)
        if override is not None:
            self._apply_override(override)
        self._grad_callback = grad_callback
        self._fmodel = fmodel
        self._track_higher_grads = track_higher_grads
        self._first_order = first_order
        # The optimizer updates only its own parameters: gradients of the
        # model's other parameters are never computed.
        self._owned = sorted({i for indices in self._group_to_param_list for i in indices})
        # The step sizes are fixed during an inner loop: alpha = clamp(lr * f(s))
        # is computed once per loop (one graph node shared by every step) and
        # again only when an override may have changed lr or the bounds.
        self._effective_lrs: list[list[Tensor] | None] = [None] * len(self.param_groups)

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: dict[str, list[Any]] | None = None,
        grad_callback: Callable[[list[Tensor | None]], list[Tensor | None]] | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """Take one differentiable step on ``loss`` and return the new fast weights.

        Args:
            loss: the inner (support) loss, computed with the current fast weights.
            params: fast weights to update instead of the patched model's.
            override: hyperparameter overrides taking precedence from now on.
            grad_callback: replaces the constructor's ``grad_callback`` for this step.
        """
        require_scalar_loss(loss)
        if override is not None:
            self._apply_override(override)
            self._effective_lrs = [None] * len(self.param_groups)
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError(
                    "params must be passed to step when the differentiable optimizer "
                    "has no patched model with fast weights"
                )
            params = self._fmodel.fast_params
        params = list(params)

        targets = [i for i in self._owned if params[i].requires_grad]
        grads = torch.autograd.grad(
            loss,
            [params[i] for i in targets],
            create_graph=self._track_higher_grads and not self._first_order,
            allow_unused=True,
        )
        all_grads: list[Tensor | None] = [None] * len(params)
        for i, g in zip(targets, grads, strict=True):
            all_grads[i] = g
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            all_grads = list(callback(all_grads))

        grouped_grads = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list, strict=True):
            group_params = group["params"]
            for j, index in enumerate(mapping):
                group_params[j] = params[index]
            grouped_grads.append([all_grads[index] for index in mapping])

        if self._track_higher_grads:
            self._update(grouped_grads)
        else:
            with torch.no_grad():
                self._update(grouped_grads)

        new_params = params[:]
        for group, mapping in zip(self.param_groups, self._group_to_param_list, strict=True):
            for p, index in zip(group["params"], mapping, strict=True):
                if p is not params[index]:
                    # Without a graph the new weights are fresh leaves; the next
                    # step differentiates the loss with respect to them.
                    new_params[index] = p if p.requires_grad else p.requires_grad_()
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        for group_idx, (group, grads, state) in enumerate(
            zip(self.param_groups, grouped_grads, self.state, strict=True)
        ):
            alphas = self._effective_lrs[group_idx]
            if alphas is None:
                alphas = self._effective_lrs[group_idx] = _kernels.effective_lrs(
                    group, self._step_sizes[group_idx]
                )
            options = _kernels.sgd_options(group)
            params = group["params"]
            for i, (p, g, alpha) in enumerate(zip(params, grads, alphas, strict=True)):
                if g is None:
                    continue
                buf = state[i].get("momentum_buffer")
                dtype = p.dtype if p.dtype != alpha.dtype else None
                params[i], buf = _exact.update(p, g, buf, alpha, options, self._first_order, dtype)
                if buf is not None:
                    state[i]["momentum_buffer"] = buf


for_each_subclass(lambda cls: higher.register_optim(cls, DifferentiableMetaSGD))


@contextmanager
def inner_loop(
    model: torch.nn.Module,
    opt: MetaSGD,
    *,
    first_order: bool = False,
    copy_initial_weights: bool = False,
    track_higher_grads: bool = True,
) -> Iterator[tuple[nn.Module, DifferentiableOptimizer]]:
    r"""A differentiable Meta-SGD inner loop: yields ``(fmodel, diffopt)`` as ``higher`` does.

    Each ``diffopt.step(loss)`` computes
    :math:`\theta_t = \theta_{t-1} - \alpha \odot d_t` out of place on
    ``fmodel``'s fast weights, so a loss computed with ``fmodel`` after the
    loop back-propagates to the model's initial weights :math:`\theta_0` and
    to the step-size parameters ``opt.meta_parameters()``. The model and the
    optimizer are left unchanged; train them with an outer optimizer.

    Args:
        model: the module whose parameters ``opt`` optimizes.
        opt: a :class:`~torch_metasgd.MetaSGD` (or subclass) over ``model``'s
            parameters; parameters it does not hold stay fixed in the loop.
        first_order: skip second-order terms: inner gradients are computed
            without a graph (much less memory); :math:`\theta_0` gets the
            first-order MAML gradient and the step sizes their exact
            first-order meta-gradient.
        copy_initial_weights: ``True`` starts from detached copies of the
            weights (``higher``'s default), which cuts the meta-gradient to
            them; the default ``False`` keeps it, as MAML and Meta-SGD need.
        track_higher_grads: ``False`` for evaluation: no graph at all, and
            memory does not grow with the number of inner steps. Inside
            ``torch.no_grad()`` it is ``False`` whatever is passed, and the
            loop's block runs with gradients enabled (the inner steps need them).

    A ``torch.compile``'d model runs as the module it wraps (the same
    parameters): a compiled forward cannot be differentiated twice.

    With second-order gradients (neither ``first_order`` nor evaluation),
    ``scaled_dot_product_attention`` runs as its math kernel inside the block
    (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``): the flash kernel
    torch picks on a CPU cannot be differentiated twice.

    Raises:
        TypeError: ``opt`` is not a :class:`~torch_metasgd.MetaSGD`, or ``model``
            is wrapped in ``DistributedDataParallel``/``DataParallel`` (see
            :mod:`torch_metasgd.distributed` for data-parallel meta-training).
        ValueError: a parameter of ``opt`` is not a parameter of ``model``.

    Example:
        >>> model = torch.nn.Linear(1, 1)
        >>> opt = torch_metasgd.MetaSGD(model.parameters(), lr=0.1)
        >>> meta_opt = torch.optim.Adam([*model.parameters(), *opt.meta_parameters()])
        >>> x, y = torch.randn(10, 1), torch.randn(10, 1)
        >>> with torch_metasgd.inner_loop(model, opt) as (fmodel, diffopt):
        ...     _ = diffopt.step(torch.nn.functional.mse_loss(fmodel(x[:5]), y[:5]))
        ...     torch.nn.functional.mse_loss(fmodel(x[5:]), y[5:]).backward()
        >>> meta_opt.step()
    """
    for name, flag in (
        ("first_order", first_order),
        ("copy_initial_weights", copy_initial_weights),
        ("track_higher_grads", track_higher_grads),
    ):
        require_bool(flag, name)
    model = uncompiled(model)
    require_bare_model(model, "inner_loop")
    require_metasgd(opt, "inner_loop")
    require_params_of(opt, model.parameters(), f"the {type(model).__name__} model")
    # Inside torch.no_grad() (evaluation) the inner steps still need their
    # gradients, and nothing outside the loop needs a graph.
    track_higher_grads = track_higher_grads and torch.is_grad_enabled()
    with torch.enable_grad(), twice_differentiable(track_higher_grads and not first_order):
        fmodel = higher.monkeypatch(
            model, copy_initial_weights=copy_initial_weights, track_higher_grads=track_higher_grads
        )
        diffopt = higher.optim.get_diff_optim(
            opt,
            model.parameters(),
            fmodel=fmodel,
            track_higher_grads=track_higher_grads,
            first_order=first_order,
        )
        yield fmodel, diffopt
