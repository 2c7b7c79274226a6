"""``MetaSGD``: torch.optim.SGD with a learnable step size per parameter (element)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import (
    Optimizer,
    _default_to_fused_or_foreach,
    _use_grad_for_differentiable,
)

from . import _checkpoint, _fused, _kernels, _workspace, hypergradient
from ._groups import Batch, GroupView
from ._parametrizations import parametrization
from ._step_sizes import STATE_KEY, distributed_like, follow_group, is_dtensor, new_step_sizes
from ._validation import describe, validate_gradients, validate_group, validate_params

__all__ = ["MetaSGD", "for_each_subclass"]

#: What a group's options default to in a checkpoint or a pickle that predates them.
_LATER_OPTIONS = dict(
    nesterov=False,
    maximize=False,
    foreach=None,
    differentiable=False,
    fused=None,
    granularity="element",
    parametrization="identity",
    lr_min=None,
    lr_max=None,
    hypergrad_lr=0.0,
)


class MetaSGD(Optimizer):
    r"""Stochastic gradient descent with learnable step sizes (Meta-SGD, arXiv:1707.09835).

    A drop-in for :class:`torch.optim.SGD`: same arguments, same update, with
    the scalar learning rate replaced by learnable step sizes. Each parameter
    :math:`\theta` gets a step-size parameter :math:`s` (a leaf tensor that
    requires grad) and the update is

    .. math::
        \begin{aligned}
            g_t &\leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                 + \lambda \theta_{t-1}
                 \quad (-\text{ if maximize}) \\
            b_t &\leftarrow \mu b_{t-1} + (1 - \tau) g_t
                 \quad (b_1 = g_1) \\
            d_t &\leftarrow g_t + \mu b_t \text{ if nesterov, }
                 b_t \text{ if } \mu \ne 0, \; g_t \text{ otherwise} \\
            \alpha &= \operatorname{clamp}\big(\gamma\, \phi(s),\,
                 \alpha_{\min},\, \alpha_{\max}\big) \\
            \theta_t &\leftarrow \theta_{t-1} - \alpha \odot d_t
        \end{aligned}

    where :math:`\gamma` is the group's ``lr`` and :math:`\phi` the
    parametrization. Every :math:`\phi` equals 1 at the initial :math:`s`, so a
    fresh ``MetaSGD`` follows ``torch.optim.SGD``'s trajectory, and an lr
    scheduler that changes ``lr`` scales every learned step size.

    With ``hypergrad_lr=0`` the step sizes are not trained by :meth:`step`:
    hand :meth:`meta_parameters` to an outer optimizer and differentiate
    through the inner steps with :func:`torch_metasgd.inner_loop`,
    ``higher.innerloop_ctx``, :func:`torch_metasgd.meta_loss`, or this
    optimizer itself with ``differentiable=True``. With ``hypergrad_lr``
    :math:`\beta > 0`, every :meth:`step` first moves the step sizes by
    hypergradient descent, at no extra forward or backward pass
    (:mod:`torch_metasgd.hypergradient` writes the rule out).

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs
            (``model.named_parameters()``), or of dicts defining parameter
            groups; every keyword below can be overridden per group.
        lr: base learning rate :math:`\gamma`, a float or a 1-element tensor
            (default: 1e-3).
        momentum: momentum factor :math:`\mu` (default: 0).
        dampening: dampening for momentum :math:`\tau` (default: 0).
        weight_decay: L2 penalty :math:`\lambda` (default: 0).
        nesterov: enables Nesterov momentum (default: False).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the multi-tensor (``torch._foreach_*``) implementation;
            ``None`` picks it where torch.optim would (default: None).
        differentiable: :meth:`step` runs with autograd on, so the update is
            differentiable in the parameters' history, a tensor ``lr`` and the
            step sizes: give it non-leaf parameters (e.g. clones of a
            model's weights) whose ``.grad`` was computed with
            ``create_graph=True`` (default: False).
        fused: the update compiled by ``torch.compile`` into one call per
            group (a kernel per device), as ``torch.optim.SGD(fused=True)``
            (GradScaler's unscaling and skipping inside); the second step
            compiles, and without a C++ compiler it warns and runs uncompiled
            (default: None).
        granularity: ``"element"`` (one step size per parameter element, the
            paper's :math:`\alpha`), ``"tensor"`` (one per parameter tensor) or
            ``"group"`` (one shared by the param group) (default: "element").
        parametrization: :math:`\phi`: ``"identity"`` (:math:`\phi(s)=s`,
            :math:`s_0=1`; step sizes may turn negative, as in the paper),
            ``"log"`` (:math:`\phi(s)=e^s`, :math:`s_0=0`) or ``"softplus"``
            (:math:`\phi(s)=\operatorname{softplus}(s)/\log 2`, :math:`s_0=0`)
            (default: "identity").
        lr_min, lr_max: optional bounds on the effective step size
            :math:`\alpha` (default: None). ``lr_max`` must be positive, and
            neither bound negative for the positive parametrizations. In the
            meta-gradient a bound blocks only what points further out: where
            :math:`\alpha` sits at a bound, the gradient of :math:`s` passes if
            a descent step would bring it back inside (decided per use: per
            inner loop, that is per task). :meth:`step` and the online rule
            apply the bounds as a projection.
        hypergrad_lr: :math:`\beta`, the rate at which :meth:`step` learns the
            step sizes online; 0 turns it off (default: 0). 0.1 is a good
            start at any granularity.

    State: ``state[p]`` is created at ``p``'s first step (or by a load), as in
    torch's optimizers, and holds ``"step_size"`` (its step-size parameter),
    ``"momentum_buffer"`` (with momentum) and the online rule's entries. The
    step sizes exist from construction (for :meth:`meta_parameters` and an
    outer optimizer) and :meth:`state_dict` always holds them. They are
    ``nn.Parameter`` leaves in their parameters' device and dtype (sharded
    like them for a DTensor), float32 for float16/bfloat16 ones, real for
    complex ones; they and the state follow a model moved or cast as a whole
    after the optimizer was built, as the same tensors.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> meta_opt = torch.optim.Adam([*model.parameters(), *opt.meta_parameters()])
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> opt.step()

    To start from random step sizes, as the paper does (uniform in
    [0.005, 0.1]): ``opt.uniform_step_sizes_(0.005, 0.1)``.

    To learn the step sizes while training, with no other change to the loop:

        >>> opt = MetaSGD(model.parameters(), lr=0.1, granularity="tensor", hypergrad_lr=0.1)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 4)).pow(2).mean().backward()
        ...     opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        granularity: str = "element",
        parametrization: str = "identity",
        lr_min: float | None = None,
        lr_max: float | None = None,
        hypergrad_lr: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            granularity=granularity,
            parametrization=parametrization,
            lr_min=lr_min,
            lr_max=lr_max,
            hypergrad_lr=hypergrad_lr,
        )
        validate_group(defaults)
        # Each parameter's step size, by the parameter: in state[p] too once p
        # has state, which then holds the live one (see _held_step_size).
        self._step_sizes: dict[Tensor, nn.Parameter] = {}
        self._views: dict[int, GroupView] = {}
        super().__init__(params, defaults)
        if fused:
            # GradScaler hands a fused step its scale and inf flag instead of unscaling.
            self._step_supports_amp_scaling = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in _SUBCLASS_HOOKS:
            hook(cls)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_step_sizes": self._step_sizes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not isinstance(self.__dict__.get("_step_sizes"), dict):
            self._step_sizes = {}  # a pickle of an older MetaSGD: its state holds them all
        self._views = {}
        for group in self.param_groups:
            for key, value in _LATER_OPTIONS.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, with fresh step sizes for its parameters.

        Takes what ``torch.optim.Optimizer.add_param_group`` takes (named
        parameters too); every option and parameter is checked, and the step
        sizes built, before the group counts: a failed call leaves the
        optimizer as it was.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_group(group)
            validate_params(group["params"], group)
            step_sizes = new_step_sizes(group["params"], group)
        except BaseException:
            self.param_groups.pop()
            raise
        self._step_sizes.update(zip(group["params"], step_sizes, strict=True))

    def _held_step_size(self, p: Tensor) -> Tensor | None:
        entry = self.state.get(p)
        s = entry.get(STATE_KEY) if entry else None
        return self._step_sizes.get(p) if s is None else s

    def _view(self, group: dict[str, Any]) -> GroupView:
        view = self._views.get(id(group))
        if view is None or not view.fits(group, self.state):
            view = self._views[id(group)] = self._derive_view(group)
        return view

    def _derive_view(self, group: dict[str, Any]) -> GroupView:
        params = group["params"]
        step_sizes = [self._held_step_size(p) for p in params]
        if group["granularity"] == "group" and params:
            shared = next((s for s in step_sizes if s is not None), None)
            shared = shared if shared is not None else new_step_sizes(params[:1], group)[0]
            step_sizes = [shared] * len(params)
        elif any(s is None for s in step_sizes):
            # Parameters put into param_groups directly, not by add_param_group.
            fresh = iter(
                new_step_sizes(
                    [p for p, s in zip(params, step_sizes, strict=True) if s is None], group
                )
            )
            step_sizes = [next(fresh) if s is None else s for s in step_sizes]
        for i, (p, s) in enumerate(zip(params, step_sizes, strict=True)):
            shape = tuple(p.shape) if group["granularity"] == "element" else ()
            if tuple(s.shape) != shape:
                raise ValueError(
                    f"Invalid step size of parameter {i}: shape {tuple(s.shape)}, where "
                    f"granularity={group['granularity']!r} needs {shape} (the granularity of a "
                    "group is fixed when its step sizes are made)"
                )
        follow_group(params, step_sizes, self.state, group["granularity"])
        self._step_sizes.update(zip(params, step_sizes, strict=True))
        return GroupView(group, step_sizes, self.state)

    def meta_parameters(self) -> list[Tensor]:
        """The step-size parameters, in parameter order, each listed once.

        Hand them to an outer optimizer, e.g.
        ``torch.optim.Adam([*model.parameters(), *opt.meta_parameters()])``.
        """
        seen: dict[int, Tensor] = {}
        for group in self.param_groups:
            for s in self._view(group).step_sizes:
                seen.setdefault(id(s), s)
        return list(seen.values())

    def step_sizes_by_group(self) -> list[list[Tensor]]:
        """The step-size parameter of every parameter, group by group, in parameter order.

        A ``"group"`` step size is listed once per parameter. The tensors are
        the live ones, on their parameters' devices.
        """
        return [list(self._view(group).step_sizes) for group in self.param_groups]

    def step_size(self, p: Tensor) -> Tensor:
        """The step-size parameter ``s`` of ``p`` (a leaf tensor, the live one)."""
        group, index = self._locate(p)
        return self._view(group).step_sizes[index]

    def effective_lr(self, p: Tensor) -> Tensor:
        r"""The step size :math:`\alpha` applied to ``p``: ``clamp(lr * f(s), lr_min, lr_max)``.

        Broadcastable to ``p`` and differentiable in the step-size parameter.
        """
        group, index = self._locate(p)
        return _kernels.effective_lrs(group, [self._view(group).step_sizes[index]])[0]

    @torch.no_grad()
    def effective_lr_summary(self) -> list[dict[str, float]]:
        r"""Per param group, the step sizes :math:`\alpha` it applies, for a logger: their
        ``"min"``, ``"median"``, ``"mean"`` and ``"max"``.

        With online step sizes the group's ``"lr"`` (what ``LearningRateMonitor``
        and the HF Trainer log) is only their base :math:`\gamma`. Over the
        elements for ``"element"`` granularity, the tensors for ``"tensor"``;
        for ``"group"`` all four are its one step size. Reads the values back
        to the host: call it when logging, not at every step.
        """
        summaries = []
        for group in self.param_groups:
            step_sizes = list({id(s): s for s in self._view(group).step_sizes}.values())
            if not step_sizes:
                summaries.append({})
                continue
            alphas = _kernels.effective_lrs(group, step_sizes)
            # A DTensor's values are gathered: every rank must call this alike.
            alphas = [a.full_tensor() if is_dtensor(a) else a for a in alphas]
            values = torch.cat([a.detach().float().reshape(-1).cpu() for a in alphas])
            summaries.append(
                dict(
                    min=values.min().item(),
                    median=values.median().item(),
                    mean=values.mean().item(),
                    max=values.max().item(),
                )
            )
        return summaries

    def _locate(self, p: Tensor) -> tuple[dict[str, Any], int]:
        for group in self.param_groups:
            for index, q in enumerate(group["params"]):
                if q is p:
                    return group, index
        raise ValueError(f"Tensor is not a parameter of this optimizer: {describe(p)}")

    @torch.no_grad()
    def uniform_step_sizes_(
        self, low: float, high: float, *, generator: torch.Generator | None = None
    ) -> MetaSGD:
        r"""Draw every effective step size uniformly from ``[low, high]``, in place.

        Sets :math:`s = \phi^{-1}(u / \gamma)` with :math:`u \sim U[low, high]`,
        so ``effective_lr(p)`` lies in ``[low, high]`` (the paper draws
        :math:`\alpha` from [0.005, 0.1]). Returns the optimizer.

        Step sizes of DTensor parameters (FSDP2) are drawn whole, as an
        unsharded model's would be, and rank 0's draw is scattered over their
        mesh: every rank of the mesh must call this, and the ranks agree
        whatever their random state.
        """
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"Invalid step-size range: [{low}, {high}]")
        for group in self.param_groups:
            if group["lr"] <= 0:
                raise ValueError(f"Invalid learning rate for uniform_step_sizes_: {group['lr']}")
            if parametrization(group["parametrization"]).positive and low <= 0:
                raise ValueError(
                    f"Invalid step-size range for {group['parametrization']!r}: "
                    f"[{low}, {high}] (step sizes are positive)"
                )
        for group in self.param_groups:
            phi = parametrization(group["parametrization"])
            for s in {id(s): s for s in self._view(group).step_sizes}.values():
                u = torch.rand(s.shape, generator=generator, dtype=s.dtype, device="cpu")
                u = (low + (high - low) * u).to(s.device)
                s.copy_(distributed_like(phi.inverse(u / group["lr"]), s))
        return self

    def _gather(self, group: dict[str, Any]) -> Batch | None:
        """The group's parameters with a gradient, and what their step needs; checked."""
        view = self._view(group)
        grads = [p.grad for p in view.params]
        complete = all(g is not None for g in grads)
        if complete:
            params, step_sizes = view.params, view.step_sizes
        else:
            kept = [
                (p, g, s)
                for p, g, s in zip(view.params, grads, view.step_sizes, strict=True)
                if g is not None
            ]
            if not kept:
                return None
            params, grads, step_sizes = map(list, zip(*kept, strict=True))
        has_sparse_grad = any(g.is_sparse for g in grads)
        validate_gradients(group, params, grads, has_sparse_grad)
        momentum_buffers = []
        if group["momentum"] != 0:
            # .get: a step that a GradScaler skips must leave no (empty) state behind.
            entries = map(self.state.get, params)
            momentum_buffers = [
                entry.get("momentum_buffer") if entry else None for entry in entries
            ]
        return Batch(
            group, view, params, grads, step_sizes, momentum_buffers, has_sparse_grad, complete
        )

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is gathered and checked before any moves.
        batches = [self._gather(group) for group in self.param_groups]
        amp = _fused.AmpFlags(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for batch in batches:
            if batch is None:
                continue
            if amp.found_inf is not None and amp.skips_new_state(batch, self._creates_state(batch)):
                continue
            self._add_state(batch)
            if batch.group["hypergrad_lr"] == 0:
                self._update(batch, amp)
            elif not _workspace.step_(batch, self.state, amp):
                hypergradient.step_(batch, self.state, amp, self._update)
        return loss

    def _creates_state(self, batch: Batch) -> bool:
        """Whether the step of ``batch`` makes a parameter's first state."""
        return (
            not batch.view.has_state
            or any(buf is None for buf in batch.momentum_buffers)
            or (batch.group["hypergrad_lr"] != 0 and hypergradient.creates_state(batch, self.state))
        )

    def _add_state(self, batch: Batch) -> None:
        """Create the state entries of the parameters that step for the first time."""
        view = batch.view
        if view.has_state:
            return
        for p, s in zip(batch.params, batch.step_sizes, strict=True):
            self.state[p].setdefault(STATE_KEY, s)
        view.has_state = batch.complete or all(
            p in self.state and STATE_KEY in self.state[p] for p in view.params
        )

    def _update(self, batch: Batch, amp: _fused.AmpFlags, keep_directions: bool = False):
        r""":math:`\theta \leftarrow \theta - \alpha \odot d` for the batch, in place; with
        ``keep_directions``, returns each :math:`d` (see :func:`_kernels.metasgd`)."""
        group = batch.group
        if group["fused"] or amp.given:
            directions = _fused.metasgd_fused(
                batch, amp, compiled=bool(group["fused"]), keep_directions=keep_directions
            )
        else:
            foreach = group["foreach"]
            if foreach is None:
                _, foreach = _default_to_fused_or_foreach(
                    batch.params, differentiable=group["differentiable"]
                )
            directions = _kernels.metasgd(
                batch.params,
                batch.grads,
                batch.momentum_buffers,
                batch.step_sizes,
                **_kernels.step_options(group),
                # As torch.optim.SGD: sparse gradients take the single-tensor path.
                foreach=foreach and not batch.has_sparse_grad,
                keep_directions=keep_directions,
            )
        if group["momentum"] != 0:
            for p, buf in zip(batch.params, batch.momentum_buffers, strict=True):
                self.state[p]["momentum_buffer"] = buf
        return directions

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, as ``torch.optim.Optimizer.state_dict``, with the step size of
        every parameter (``state[i]["step_size"]``), also of those that have not stepped."""
        missing = {}
        for group in self.param_groups:
            self._view(group)
            for p in group["params"]:
                entry = self.state.get(p)
                if entry is None or STATE_KEY not in entry:
                    missing[p] = entry
        # Lent to torch's packing (and to the hooks) as new entries, so that the
        # live ones are as they were once it returns.
        for p, entry in missing.items():
            self.state[p] = {**(entry or {}), STATE_KEY: self._held_step_size(p)}
        try:
            return super().state_dict()
        finally:
            for p, entry in missing.items():
                if entry is None:
                    del self.state[p]
                else:
                    self.state[p] = entry

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state; step sizes are written into the live tensors in place.

        An outer optimizer that already holds :meth:`meta_parameters` keeps
        training the same tensors after the load, and the step sizes keep
        their precision (float32 for half-precision parameters). A state dict
        without step sizes (``torch.optim.SGD``'s, to resume an SGD checkpoint
        with learnable step sizes) loads too: its momentum buffers carry over
        and the step sizes stay as they are. Options a saved group lacks
        (MetaSGD's own in an SGD state dict, newer ones in an old checkpoint)
        keep this optimizer's values. Hooks registered with
        ``register_load_state_dict_pre_hook`` see, and may rewrite, every entry.
        Everything is checked, after those hooks, before anything changes.
        """
        live = [self._view(group).step_sizes for group in self.param_groups]
        with _checkpoint.setting_aside(self, live) as kept:
            super().load_state_dict(state_dict)
        _checkpoint.restore(self, live, kept)


_SUBCLASS_HOOKS: list[Callable[[type[MetaSGD]], None]] = []


def for_each_subclass(hook: Callable[[type[MetaSGD]], None]) -> None:
    """Call ``hook(cls)`` for ``MetaSGD`` and each subclass, now and whenever one is defined.

    The ``higher`` twin registers every class this way: higher looks an
    optimizer's differentiable twin up by its exact type.
    """
    pending = [MetaSGD]
    while pending:
        cls = pending.pop()
        hook(cls)
        pending += cls.__subclasses__()
    _SUBCLASS_HOOKS.append(hook)
