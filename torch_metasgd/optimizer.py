"""``MetaSGD``: torch.optim.SGD with a learnable step size per parameter (element)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from . import _kernels, hypergradient
from ._parametrizations import parametrization

__all__ = ["MetaSGD", "for_each_subclass"]

GRANULARITIES = ("element", "tensor", "group")


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
    times its tensor's geometric mean. The rule, its constants and its state
    are written out in :mod:`torch_metasgd.hypergradient`.

    Args:
        params: an iterable of tensors or of dicts defining parameter groups;
            every keyword below can be overridden per group.
        lr: base learning rate :math:`\gamma` (default: 1e-3).
        momentum: momentum factor :math:`\mu` (default: 0).
        dampening: dampening for momentum :math:`\tau` (default: 0).
        weight_decay: L2 penalty :math:`\lambda` (default: 0).
        nesterov: enables Nesterov momentum (default: False).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the multi-tensor (``torch._foreach_*``) implementation;
            ``None`` picks it where torch.optim would (default: None).
        fused: run the step as one compiled kernel per device and dtype
            (``torch.compile``; floating-point parameters on CPU, CUDA or
            XPU), as ``torch.optim.SGD(fused=True)`` runs one; with
            ``GradScaler`` it unscales the gradients and skips a step with
            infs without reading anything back to the host. The first step
            runs uncompiled, the second compiles (about 30 s for 100
            parameter tensors on a 2-core CPU, 1-2 s for a few; cached
            across runs), and a change of ``lr`` does not recompile. Where
            ``torch.compile`` cannot build the step (no C++ compiler), a
            warning says so and the same step runs uncompiled. Not with
            ``foreach=True`` (default: None, not fused).
        granularity: ``"element"`` (one step size per parameter element, the
            paper's :math:`\alpha`), ``"tensor"`` (one per parameter tensor) or
            ``"group"`` (one shared by the param group) (default: "element").
        parametrization: :math:`\phi`: ``"identity"`` (:math:`\phi(s)=s`,
            :math:`s_0=1`; step sizes may turn negative, as in the paper),
            ``"log"`` (:math:`\phi(s)=e^s`, :math:`s_0=0`) or ``"softplus"``
            (:math:`\phi(s)=\operatorname{softplus}(s)/\log 2`, :math:`s_0=0`)
            (default: "identity").
        lr_min, lr_max: optional bounds on the effective step size
            :math:`\alpha` (default: None).
        hypergrad_lr: :math:`\beta`, the rate at which :meth:`step` learns the
            step sizes by hypergradient descent; 0 turns it off
            (default: 0). 0.1 is a good start at any granularity; see
            ``benchmarks/online.py`` and the README for what it reaches
            from initial learning rates between 1e-4 and 1.

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
        _validate_group(defaults)
        # step() reads each group's step sizes from this list: hashing every
        # parameter into self.state costs as much as the update on small tensors.
        self._step_sizes: list[list[Tensor]] = []
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
        self._list_step_sizes()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group and create its step-size parameters.

        The group is validated before anything is added.
        """
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        _validate_group({**self.defaults, **group})
        seen = set()
        for p in params:
            if isinstance(p, Tensor) and not p.is_leaf:
                raise ValueError(f"can't optimize a non-leaf Tensor: {describe(p)}")
            if id(p) in seen:
                raise ValueError(f"Parameter appears twice in a param group: {describe(p)}")
            seen.add(id(p))
        if isinstance(group["params"], Iterator):
            # Consumed above: hand torch the list, not an exhausted generator.
            group["params"] = params
        super().add_param_group(group)
        self._create_step_sizes(self.param_groups[-1])

    def _create_step_sizes(self, group: dict[str, Any]) -> None:
        s0 = parametrization(group["parametrization"]).initial
        params = group["params"]
        if group["granularity"] == "group" and params:
            shared = _leaf(torch.full((), s0, dtype=params[0].dtype, device=params[0].device))
        step_sizes = []
        for p in params:
            if group["granularity"] == "element":
                s = _leaf(torch.full_like(p, s0, memory_format=torch.preserve_format))
            elif group["granularity"] == "tensor":
                s = _leaf(torch.full((), s0, dtype=p.dtype, device=p.device))
            else:
                s = shared
            self.state[p]["step_size"] = s
            step_sizes.append(s)
        self._step_sizes.append(step_sizes)

    def _list_step_sizes(self) -> None:
        self._step_sizes = [
            [self.state[p]["step_size"] for p in group["params"]] for group in self.param_groups
        ]

    def meta_parameters(self) -> list[Tensor]:
        """The step-size parameters, in parameter order, each listed once.

        Hand them to an outer optimizer, e.g.
        ``torch.optim.Adam([*model.parameters(), *opt.meta_parameters()])``.
        """
        seen: dict[int, Tensor] = {}
        for step_sizes in self._step_sizes:
            for s in step_sizes:
                seen.setdefault(id(s), s)
        return list(seen.values())

    def step_size(self, p: Tensor) -> Tensor:
        """The step-size parameter ``s`` of ``p`` (a leaf tensor, the live one)."""
        return self.state[p]["step_size"]

    def effective_lr(self, p: Tensor) -> Tensor:
        r"""The step size :math:`\alpha` applied to ``p``: ``clamp(lr * f(s), lr_min, lr_max)``.

        Broadcastable to ``p`` and differentiable in the step-size parameter.
        """
        group = self._group_of(p)
        return _kernels.effective_lrs(group, [self.step_size(p)])[0]

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
    ) -> None:
        use_momentum = group["momentum"] != 0
        for p, s in zip(group["params"], group_step_sizes, strict=True):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MetaSGD does not support sparse gradients")
            if group["fused"] and not _kernels.fusable(p):
                raise ValueError(
                    f"Invalid parameter for fused=True: {describe(p)}, {p.dtype} on {p.device} "
                    f"(fused steps take floating-point tensors on {_kernels.FUSED_DEVICES})"
                )
            params.append(p)
            grads.append(p.grad)
            step_sizes.append(s)
            if use_momentum:
                momentum_buffers.append(self.state[p].get("momentum_buffer"))

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

        # Every group is gathered before any is updated: a sparse gradient in
        # a later group raises before an earlier one has moved.
        gathered = []
        for group, group_step_sizes in zip(self.param_groups, self._step_sizes, strict=True):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffers: list[Tensor | None] = []
            step_sizes: list[Tensor] = []
            self._init_group(group, group_step_sizes, params, grads, momentum_buffers, step_sizes)
            if params:
                gathered.append((group, params, grads, momentum_buffers, step_sizes))

        # Set by GradScaler for a fused step: the gradients are still scaled.
        amp = dict(
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None)
        )
        for group, params, grads, momentum_buffers, step_sizes in gathered:
            foreach = group["foreach"]
            if foreach is None and not group["fused"]:
                _, foreach = _default_to_fused_or_foreach(params, differentiable=False)
            online = group["hypergrad_lr"] != 0
            if online:
                # Before the update: the last direction may be the momentum
                # buffer, which the update advances in place.
                hypergradient.hypergradient_step_(
                    group, params, grads, step_sizes, self.state, amp["grad_scale"]
                )
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
                fused=bool(group["fused"]),
                **amp,
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
        training the same tensors after the load.
        """
        live = {id(p): self.state[p]["step_size"] for g in self.param_groups for p in g["params"]}
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded state dict has a group of {len(saved['params'])} parameters "
                    f"where this optimizer has {len(group['params'])}"
                )
            for key in ("granularity", "parametrization"):
                if saved.get(key, self.defaults[key]) != group[key]:
                    raise ValueError(
                        f"loaded state dict has {key}={saved.get(key)!r} "
                        f"where this optimizer has {group[key]!r}"
                    )
            for p, index in zip(group["params"], saved["params"], strict=True):
                s = state_dict["state"].get(index, {}).get("step_size")
                if s is None:
                    raise ValueError(f"loaded state dict has no step size for parameter {index}")
                if s.shape != live[id(p)].shape:
                    raise ValueError(
                        f"loaded step size of parameter {index} has shape {tuple(s.shape)}, "
                        f"expected {tuple(live[id(p)].shape)}"
                    )
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    s = live[id(p)]
                    s.copy_(self.state[p]["step_size"])
                    self.state[p]["step_size"] = s
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


def _validate_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        raise ValueError(f"Invalid learning rate: {lr} (MetaSGD takes a float lr)")
    if not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not math.isfinite(group["momentum"]) or group["momentum"] < 0.0:
        raise ValueError(f"Invalid momentum value: {group['momentum']}")
    if not math.isfinite(group["weight_decay"]) or group["weight_decay"] < 0.0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    if not math.isfinite(group["dampening"]):
        raise ValueError(f"Invalid dampening value: {group['dampening']}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if group["fused"] and group["foreach"]:
        raise ValueError("Invalid fused=True with foreach=True: a step is one or the other")
    if group["granularity"] not in GRANULARITIES:
        raise ValueError(
            f"Invalid granularity: {group['granularity']!r} (expected one of {GRANULARITIES})"
        )
    parametrization(group["parametrization"])
    lr_min, lr_max = group["lr_min"], group["lr_max"]
    for name, bound in (("lr_min", lr_min), ("lr_max", lr_max)):
        if bound is not None and math.isnan(bound):
            raise ValueError(f"Invalid {name} value: {bound}")
    if lr_min is not None and lr_max is not None and lr_min > lr_max:
        raise ValueError(f"Invalid step-size bounds: lr_min={lr_min} > lr_max={lr_max}")
    hypergrad_lr = group["hypergrad_lr"]
    if isinstance(hypergrad_lr, Tensor) or not math.isfinite(hypergrad_lr) or hypergrad_lr < 0:
        raise ValueError(f"Invalid hypergrad_lr value: {hypergrad_lr}")


def _leaf(t: Tensor) -> nn.Parameter:
    # A Parameter, so that a module can register the step sizes themselves
    # (e.g. for DistributedDataParallel to average their gradients).
    return nn.Parameter(t.detach())


def describe(t: Tensor) -> str:
    """How an error message names a tensor."""
    return f"Tensor of shape {tuple(t.shape)}"
