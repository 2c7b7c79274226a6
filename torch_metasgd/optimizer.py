"""``MetaSGD``: torch.optim.SGD with a learnable step size per parameter (element)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from . import _fused, _kernels, hypergradient
from ._parametrizations import parametrization
from ._step_sizes import follow_params, moved, new_step_sizes
from ._validation import (
    describe,
    validate_gradients,
    validate_group,
    validate_params,
    validate_state_dict,
)

__all__ = ["MetaSGD", "for_each_subclass"]


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
    ``higher.innerloop_ctx`` or :func:`torch_metasgd.meta_loss`, or let
    :class:`torch_metasgd.LookAhead` do it against held-out data. With
    ``hypergrad_lr`` :math:`\beta > 0`, every :meth:`step` first moves the
    step sizes by hypergradient descent, at no extra forward or backward
    pass: :math:`\log|\alpha|` follows the (clipped, scale-free) cosine
    between the current gradient and the last direction, with a small upward
    drift; per element, also each element's own sign, capped at :math:`e`
    times its tensor's geometric mean; never below ``lr / 1000``, and a
    tensor whose gradient is not finite skips the update. The rule, its
    constants and its state are written out in :mod:`torch_metasgd.hypergradient`.

    Args:
        params: an iterable of tensors or of dicts defining parameter groups;
            every keyword below can be overridden per group.
        lr: base learning rate :math:`\gamma`, a float or a 1-element tensor
            (default: 1e-3).
        momentum: momentum factor :math:`\mu` (default: 0).
        dampening: dampening for momentum :math:`\tau` (default: 0).
        weight_decay: L2 penalty :math:`\lambda` (default: 0).
        nesterov: enables Nesterov momentum (default: False).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the multi-tensor (``torch._foreach_*``) implementation;
            ``None`` picks it where torch.optim would (default: None).
        fused: the update compiled by ``torch.compile`` into one call per
            group (a kernel per device), as ``torch.optim.SGD(fused=True)``
            (GradScaler's unscaling and skipping inside); the second step
            compiles, and without a C++ compiler it warns and runs uncompiled.
            With ``hypergrad_lr > 0`` and no GradScaler the step runs in the
            hypergradient's workspace instead, a few kernels for all tensors
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
            inner loop, that is per task), so a clamped step size is never
            pinned for good. :meth:`step` and the hypergradient rule apply the
            bounds as a projection.
        hypergrad_lr: :math:`\beta`, the rate at which :meth:`step` learns the
            step sizes by hypergradient descent; 0 turns it off
            (default: 0). 0.1 is a good start at any granularity; see
            ``benchmarks/online.py`` and the README for what it reaches
            from initial learning rates between 1e-4 and 1. The online step
            of float32 and float64 parameters runs in a workspace whose views
            are the momentum buffers, the last directions and the step
            sizes; it holds one to three more buffers the size of the
            parameters (:mod:`torch_metasgd.hypergradient`).

    The step sizes are ``nn.Parameter`` leaves in their parameters' device and
    dtype, float32 for float16/bfloat16 ones (master weights: a change of 1e-3
    to :math:`s = 1` is below bfloat16's resolution), real for complex ones;
    they and the state follow a model moved or cast after the optimizer was
    built, in place. Sparse gradients work as in ``torch.optim.SGD``.

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
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
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
            fused=fused,
            granularity=granularity,
            parametrization=parametrization,
            lr_min=lr_min,
            lr_max=lr_max,
            hypergrad_lr=hypergrad_lr,
        )
        validate_group(defaults)
        # step() reads each group's step sizes from this list: hashing every
        # parameter into self.state costs as much as the update on small tensors.
        self._step_sizes: list[list[Tensor]] = []
        self._hypergradient_workspaces: dict = {}
        super().__init__(params, defaults)
        if fused:
            # GradScaler hands a fused step its scale and inf flag instead of unscaling.
            self._step_supports_amp_scaling = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in _SUBCLASS_HOOKS:
            hook(cls)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("granularity", "element")
            group.setdefault("parametrization", "identity")
            group.setdefault("lr_min", None)
            group.setdefault("lr_max", None)
            group.setdefault("hypergrad_lr", 0.0)
        self._hypergradient_workspaces = {}
        self._list_step_sizes()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group and create its step-size parameters.

        Everything is validated, and the step sizes are built, before the
        group is added: a failed call leaves the optimizer as it was.
        """
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        options = {**self.defaults, **group}
        validate_group(options)
        validate_params(params)
        step_sizes = new_step_sizes(params, options)
        if isinstance(group["params"], Iterator):
            # Consumed above: hand torch the list, not an exhausted generator.
            group["params"] = params
        super().add_param_group(group)
        for p, s in zip(params, step_sizes, strict=True):
            self.state[p]["step_size"] = s
        self._step_sizes.append(step_sizes)

    def _list_step_sizes(self) -> None:
        # Inside load_state_dict a loaded SGD state has no step sizes yet:
        # they are put back, and listed again, right after.
        self._step_sizes = [
            [self.state[p].get("step_size") for p in group["params"]] for group in self.param_groups
        ]

    def meta_parameters(self) -> list[Tensor]:
        """The step-size parameters, in parameter order, each listed once.

        Hand them to an outer optimizer, e.g.
        ``torch.optim.Adam([*model.parameters(), *opt.meta_parameters()])``.
        """
        self._follow_params()
        seen: dict[int, Tensor] = {}
        for step_sizes in self._step_sizes:
            for s in step_sizes:
                seen.setdefault(id(s), s)
        return list(seen.values())

    def step_size(self, p: Tensor) -> Tensor:
        """The step-size parameter ``s`` of ``p`` (a leaf tensor, the live one)."""
        s = self.state[p].get("step_size") if p in self.state else None
        if s is None:
            raise ValueError(f"Tensor is not a parameter of this optimizer: {describe(p)}")
        return s

    def step_sizes_by_group(self) -> list[list[Tensor]]:
        """The step-size parameter of every parameter, group by group, in parameter order.

        A ``"group"`` step size is listed once per parameter. The tensors are
        the live ones, on their parameters' devices.
        """
        self._follow_params()
        return [list(step_sizes) for step_sizes in self._step_sizes]

    def effective_lr(self, p: Tensor) -> Tensor:
        r"""The step size :math:`\alpha` applied to ``p``: ``clamp(lr * f(s), lr_min, lr_max)``.

        Broadcastable to ``p`` and differentiable in the step-size parameter.
        """
        group = self._group_of(p)
        self._follow_params()
        return _kernels.effective_lrs(group, [self.step_size(p)])[0]

    def _follow_params(self) -> None:
        if follow_params(self.param_groups, self._step_sizes, self.state):
            # Scratch buffers on the old device or in the old dtype.
            self._hypergradient_workspaces.clear()

    def state_dict(self) -> dict[str, Any]:
        self._follow_params()
        return super().state_dict()

    @torch.no_grad()
    def uniform_step_sizes_(
        self, low: float, high: float, *, generator: torch.Generator | None = None
    ) -> MetaSGD:
        r"""Draw every effective step size uniformly from ``[low, high]``, in place.

        Sets :math:`s = \phi^{-1}(u / \gamma)` with :math:`u \sim U[low, high]`,
        so ``effective_lr(p)`` lies in ``[low, high]`` (the paper draws
        :math:`\alpha` from [0.005, 0.1]). Returns the optimizer.
        """
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"Invalid step-size range: [{low}, {high}]")
        self._follow_params()
        for group in self.param_groups:
            if group["lr"] <= 0:
                raise ValueError(f"Invalid learning rate for uniform_step_sizes_: {group['lr']}")
            if parametrization(group["parametrization"]).positive and low <= 0:
                raise ValueError(
                    f"Invalid step-size range for {group['parametrization']!r}: "
                    f"[{low}, {high}] (step sizes are positive)"
                )
        for group, step_sizes in zip(self.param_groups, self._step_sizes, strict=True):
            phi = parametrization(group["parametrization"])
            for s in {id(s): s for s in step_sizes}.values():
                u = torch.rand(s.shape, generator=generator, dtype=s.dtype, device="cpu")
                u = (low + (high - low) * u).to(s.device)
                s.copy_(phi.inverse(u / group["lr"]))
        return self

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"Tensor is not a parameter of this optimizer: {describe(p)}")

    def _init_group(
        self,
        group: dict[str, Any],
        group_step_sizes: list[Tensor],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        step_sizes: list[Tensor],
    ) -> bool:
        """Gather the parameters with a gradient; returns whether a gradient is sparse."""
        use_momentum = group["momentum"] != 0
        has_sparse_grad = False
        # A model is moved or cast as a whole: its group's first parameter
        # tells (checking every one would cost ~15% of a small step).
        if group_step_sizes and moved(group["params"][0], group_step_sizes[0]):
            self._follow_params()
        for p, s in zip(group["params"], group_step_sizes, strict=True):
            grad = p.grad
            if grad is None:
                continue
            has_sparse_grad |= grad.is_sparse
            params.append(p)
            grads.append(grad)
            step_sizes.append(s)
            if use_momentum:
                momentum_buffers.append(self.state[p].get("momentum_buffer"))
        validate_gradients(group, params, grads, has_sparse_grad)
        return has_sparse_grad

    @torch.no_grad()
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

        # Every group is gathered before any is updated: an unsupported sparse
        # gradient in a later group raises before an earlier one has moved.
        gathered = []
        for group, group_step_sizes in zip(self.param_groups, self._step_sizes, strict=True):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffers: list[Tensor | None] = []
            step_sizes: list[Tensor] = []
            has_sparse_grad = self._init_group(
                group, group_step_sizes, params, grads, momentum_buffers, step_sizes
            )
            if params:
                gathered.append(
                    (group, params, grads, momentum_buffers, step_sizes, has_sparse_grad)
                )

        # Set by GradScaler for a fused step: the gradients are still scaled.
        amp = dict(
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None)
        )
        for group, params, grads, momentum_buffers, step_sizes, has_sparse_grad in gathered:
            foreach = group["foreach"]
            if foreach is None and not group["fused"]:
                _, foreach = _default_to_fused_or_foreach(params, differentiable=False)
            # As torch.optim.SGD: sparse gradients take the single-tensor path.
            foreach = foreach and not has_sparse_grad
            online = group["hypergrad_lr"] != 0
            amp_step = amp["grad_scale"] is not None or amp["found_inf"] is not None
            if online and hypergradient.steps_in_workspace(
                group, grads, momentum_buffers, amp_step
            ):
                hypergradient.online_step_(
                    group,
                    params,
                    grads,
                    momentum_buffers,
                    step_sizes,
                    self.state,
                    self._hypergradient_workspaces,
                )
                continue
            if online:
                # Before the update: the last direction may be the momentum
                # buffer, which the update advances in place.
                hypergradient.hypergradient_step_(
                    group,
                    params,
                    grads,
                    step_sizes,
                    self.state,
                    self._hypergradient_workspaces,
                    amp["grad_scale"],
                )
            if group["fused"] or amp_step:
                directions = _fused.metasgd_fused(
                    params,
                    grads,
                    momentum_buffers,
                    step_sizes,
                    group,
                    compiled=bool(group["fused"]),
                    keep_directions=online,
                    **amp,
                )
            else:
                directions = _kernels.metasgd(
                    params,
                    grads,
                    momentum_buffers,
                    step_sizes,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    dampening=group["dampening"],
                    nesterov=group["nesterov"],
                    maximize=group["maximize"],
                    parametrization=group["parametrization"],
                    lr_min=group["lr_min"],
                    lr_max=group["lr_max"],
                    foreach=foreach,
                    keep_directions=online,
                )
            if group["momentum"] != 0:
                for p, buf in zip(params, momentum_buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buf
            if online:
                hypergradient.remember_directions(group, params, directions, self.state)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state; step sizes are written into the live tensors in place.

        An outer optimizer that already holds :meth:`meta_parameters` keeps
        training the same tensors after the load, and the step sizes keep
        their precision (float32 for half-precision parameters). A state dict
        without step sizes (``torch.optim.SGD``'s, to resume an SGD checkpoint
        with learnable step sizes) loads too: its momentum buffers carry over
        and the step sizes stay as they are. Options a saved group lacks
        (MetaSGD's own in an SGD state dict, newer ones in an old checkpoint)
        keep this optimizer's values. Everything is checked before anything
        changes.
        """
        self._follow_params()
        saved_groups = state_dict["param_groups"]
        pairs = validate_state_dict(self.param_groups, self._step_sizes, state_dict)
        saved_state = state_dict["state"]
        saved_step_sizes = [saved_state.get(index, {}).get("step_size") for _, index, _ in pairs]
        completed = [
            {**{k: v for k, v in group.items() if k != "params"}, **saved}
            for group, saved in zip(self.param_groups, saved_groups, strict=True)
        ]
        super().load_state_dict({**state_dict, "param_groups": completed})
        with torch.no_grad():
            for (p, index, s), saved in zip(pairs, saved_step_sizes, strict=True):
                state = self.state[p]
                if saved is not None:
                    s.copy_(saved)
                # torch casts loaded state to the parameter's dtype; the step
                # sizes' own statistics keep the step size's.
                for key, value in saved_state.get(index, {}).items():
                    if isinstance(value, Tensor) and value.shape != p.shape:
                        state[key] = value.to(device=s.device, dtype=s.dtype)
                state["step_size"] = s
        # The load's __setstate__ listed the loaded copies: step() must read the live tensors.
        self._list_step_sizes()


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
