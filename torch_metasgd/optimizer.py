"""``MetaSGD``: torch.optim.SGD with a learnable step size per parameter (element)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from . import _functional as F

__all__ = ["MetaSGD"]

# Keys of a param group that MetaSGD adds to torch.optim.SGD's.
_STEP_SIZE_KEYS = ("granularity", "parametrization", "lr_min", "lr_max", "hypergrad_lr")


class MetaSGD(Optimizer):
    r"""Stochastic gradient descent with learnable step sizes (Meta-SGD).

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
    :class:`torch_metasgd.LookAhead` do it against held-out data.

    With ``hypergrad_lr`` :math:`\beta > 0` every :meth:`step` first learns
    the step sizes online, by hypergradient descent (Baydin et al., 2018), at
    no extra forward or backward: the last step was
    :math:`\theta_{t-1} = \theta_{t-2} - \alpha \odot d_{t-1}`, so the current
    gradient gives the derivative of the current loss in the step sizes,
    :math:`\partial f(\theta_{t-1}) / \partial\alpha = -g_t \odot d_{t-1}`.
    Summed over the elements of a tensor (over the group for ``"group"``)
    it is :math:`p = \langle g_t, d_{t-1}\rangle`, which is measured against
    its running magnitude :math:`v`, and the step sizes take a multiplicative
    step before the update above:

    .. math::
        \begin{aligned}
        v &\leftarrow 0.99\, v + 0.01\, \|g_t\|\,\|d_{t-1}\|
            \quad (v = \|g_t\|\,\|d_{t-1}\| \text{ at first}) \\
        h &= \operatorname{clamp}(p / v,\; -5,\; 1) \\
        \log|\alpha| &\leftarrow \log|\alpha| + \beta\,\operatorname{sign}(\alpha)\,(h + \delta),
            \qquad \delta = 0.02,
        \end{aligned}

    then :math:`\alpha \leftarrow \operatorname{clamp}(\alpha, \alpha_{\min}, \alpha_{\max})`
    and :math:`s \leftarrow \phi^{-1}(\alpha / \gamma)`. At the first step
    :math:`h = \cos(g_t, d_{t-1})`; while the gradients keep their size
    :math:`h` is about that cosine, so a step size grows by at most
    :math:`e^{1.02\beta}` per step, but when the loss blows up the gradients
    outgrow :math:`v` and the step sizes shrink in proportion (by up to
    :math:`e^{-4.98\beta}` per step, so that one outlier batch cannot wipe
    out what was learned). The drift
    :math:`\delta` offsets the bias of this greedy one-step hypergradient
    under gradient noise (its expectation is negative at a noisy stationary
    point whatever the step size, so without :math:`\delta` the step sizes
    decay for ever). The update is free of the scale of the loss, so one
    :math:`\beta` suits every model (the additive form
    :math:`\alpha \leftarrow \alpha - \beta\,\partial f/\partial\alpha`
    diverges or stalls depending on that scale; see ``benchmarks/online.py``).
    For ``"element"`` the step sizes of a tensor move together by the
    tensor's :math:`h + \delta`, each element also by the sign of its own
    hypergradient at a fifth of the rate, and none may exceed :math:`e` times
    the geometric mean of its tensor's:

    .. math::
        \log|\alpha_i| \leftarrow \min\Big(\log|\alpha_i| + \beta\operatorname{sign}(\alpha_i)
            \big(h + \delta + \tfrac15\operatorname{sign}(g_{t,i}\,d_{t-1,i})\big),\;
            \operatorname{mean}_j \log|\alpha_j| + 1\Big)

    (the mean taken over the updated step sizes). Without the cap, the step
    sizes of elements whose gradient keeps its sign, such as output weights
    on separable data, grow until training diverges. The direction
    :math:`d_{t-1}` and the magnitude :math:`v` are kept in the optimizer
    state (per parameter, saved by :meth:`state_dict`).

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
            granularity=granularity,
            parametrization=parametrization,
            lr_min=lr_min,
            lr_max=lr_max,
            hypergrad_lr=hypergrad_lr,
        )
        _validate_group(defaults)
        self._step_sizes: list[list[Tensor]] = []
        super().__init__(params, defaults)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # higher finds a differentiable twin by exact type, so every subclass
        # is registered; imported here because differentiable imports this module.
        from .differentiable import _register

        _register(cls)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("granularity", "element")
            group.setdefault("parametrization", "identity")
            group.setdefault("lr_min", None)
            group.setdefault("lr_max", None)
            group.setdefault("hypergrad_lr", 0.0)
        self._step_sizes = [
            [self.state[p]["step_size"] for p in group["params"]] for group in self.param_groups
        ]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group and create its step-size parameters.

        The group is validated before anything is added.
        """
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        merged = {**self.defaults, **group}
        _validate_group(merged)
        seen = set()
        for p in params:
            if isinstance(p, Tensor) and not p.is_leaf:
                raise ValueError(f"can't optimize a non-leaf Tensor: {_describe(p)}")
            if id(p) in seen:
                raise ValueError(f"Parameter appears twice in a param group: {_describe(p)}")
            seen.add(id(p))
        if isinstance(group["params"], Iterator):
            # Consumed above: hand torch the list, not an exhausted generator.
            group["params"] = params
        super().add_param_group(group)
        self._create_step_sizes(self.param_groups[-1])

    def _create_step_sizes(self, group: dict[str, Any]) -> None:
        s0 = F.initial_step_size(group["parametrization"])
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
        # step() reads the step sizes from this list: hashing every parameter
        # into self.state costs as much as the update itself on small tensors.
        self._step_sizes.append(step_sizes)

    def meta_parameters(self) -> list[Tensor]:
        """The step-size parameters, in parameter order, each listed once.

        Hand them to an outer optimizer, e.g.
        ``torch.optim.Adam([*model.parameters(), *opt.meta_parameters()])``.
        """
        seen: dict[int, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state[p]["step_size"]
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
        return F.effective_lr(
            self.step_size(p),
            group["lr"],
            group["parametrization"],
            group["lr_min"],
            group["lr_max"],
        )

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
            if group["parametrization"] != "identity" and low <= 0:
                raise ValueError(
                    f"Invalid step-size range for {group['parametrization']!r}: "
                    f"[{low}, {high}] (step sizes are positive)"
                )
        for s in self.meta_parameters():
            u = torch.rand(s.shape, generator=generator, dtype=s.dtype, device="cpu")
            u = (low + (high - low) * u).to(s.device)
            group = self._group_of_step_size(s)
            s.copy_(F.inverse_transform(u / group["lr"], group["parametrization"]))
        return self

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"Tensor is not a parameter of this optimizer: {_describe(p)}")

    def _group_of_step_size(self, s: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(self.state[p]["step_size"] is s for p in group["params"]):
                return group
        raise AssertionError("unreachable: step size without a group")

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
            params.append(p)
            grads.append(p.grad)
            step_sizes.append(s)
            if use_momentum:
                momentum_buffers.append(self.state[p].get("momentum_buffer"))

    @torch.no_grad()
    def step(self, closure=None):
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

        for group, params, grads, momentum_buffers, step_sizes in gathered:
            foreach = group["foreach"]
            if foreach is None:
                _, foreach = _default_to_fused_or_foreach(params, differentiable=False)
            # Everything hypergradient sits behind this check: plain step() stays SGD's cost.
            directions: list[Tensor | None] | None = None
            if group["hypergrad_lr"] != 0:
                self._hypergradient_step(group, params, grads, step_sizes)
                directions = [None] * len(params)
            F.metasgd(
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
                directions=directions,
            )
            if group["momentum"] != 0:
                for p, buf in zip(params, momentum_buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buf
            if directions is not None:
                self._store_directions(group, params, directions)
        return loss

    def _hypergradient_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        step_sizes: list[Tensor],
    ) -> None:
        # Parameters without a previous direction (first step, or no gradient
        # last step, so the step sizes did not move them) contribute nothing.
        kept = [
            (p, g, s, self.state[p]["hypergrad_direction"])
            for p, g, s in zip(params, grads, step_sizes, strict=True)
            if "hypergrad_direction" in self.state[p]
        ]
        if not kept or group["lr"] == 0:
            return
        kept_params, kept_grads, kept_step_sizes, directions = map(list, zip(*kept, strict=True))
        scales = self._hypergradient_scales(group, kept_params, kept_step_sizes)
        F.hypergradient_step_(
            kept_params,
            kept_grads,
            directions,
            kept_step_sizes,
            scales,
            hypergrad_lr=group["hypergrad_lr"],
            granularity=group["granularity"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            lr=group["lr"],
            parametrization=group["parametrization"],
            lr_min=group["lr_min"],
            lr_max=group["lr_max"],
        )

    def _hypergradient_scales(
        self, group: dict[str, Any], params: list[Tensor], step_sizes: list[Tensor]
    ) -> list[Tensor]:
        """The running magnitudes of the hypergradient: 0-dim, one per parameter or per group.

        Created at 0 (no history). A group's one scale lives in the state of
        every parameter of the group, as one tensor (a loaded state dict
        holds copies: they are tied again here).
        """
        if group["granularity"] != "group":
            scales = []
            for p, s in zip(params, step_sizes, strict=True):
                state = self.state[p]
                if "hypergrad_scale" not in state:
                    state["hypergrad_scale"] = s.new_zeros(())
                scales.append(state["hypergrad_scale"])
            return scales
        scale = self.state[params[0]].get("hypergrad_scale")
        if scale is None:
            scale = step_sizes[0].new_zeros(())
        for p in group["params"]:
            self.state[p]["hypergrad_scale"] = scale
        return [scale]

    def _store_directions(
        self, group: dict[str, Any], params: list[Tensor], directions: list[Tensor | None]
    ) -> None:
        for p, d in zip(params, directions, strict=True):
            self.state[p]["hypergrad_direction"] = d
        if len(params) < len(group["params"]):
            stepped = {id(p) for p in params}
            for p in group["params"]:
                if id(p) not in stepped:
                    self.state[p].pop("hypergrad_direction", None)

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
            for key in _STEP_SIZE_KEYS[:2]:
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
        self._step_sizes = [
            [self.state[p]["step_size"] for p in group["params"]] for group in self.param_groups
        ]


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
    if group["granularity"] not in F.GRANULARITIES:
        raise ValueError(
            f"Invalid granularity: {group['granularity']!r} (expected one of {F.GRANULARITIES})"
        )
    if group["parametrization"] not in F.PARAMETRIZATIONS:
        raise ValueError(
            f"Invalid parametrization: {group['parametrization']!r} "
            f"(expected one of {F.PARAMETRIZATIONS})"
        )
    lr_min, lr_max = group["lr_min"], group["lr_max"]
    for name, bound in (("lr_min", lr_min), ("lr_max", lr_max)):
        if bound is not None and math.isnan(bound):
            raise ValueError(f"Invalid {name} value: {bound}")
    if lr_min is not None and lr_max is not None and lr_min > lr_max:
        raise ValueError(f"Invalid step-size bounds: lr_min={lr_min} > lr_max={lr_max}")
    hypergrad_lr = group["hypergrad_lr"]
    if isinstance(hypergrad_lr, Tensor) or not math.isfinite(hypergrad_lr) or hypergrad_lr < 0:
        raise ValueError(f"Invalid hypergrad_lr value: {hypergrad_lr}")


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True)


def _describe(p: Tensor) -> str:
    return f"Tensor of shape {tuple(p.shape)}"
