r"""``MetaSGD``: torch.optim.SGD with a learnable step size per parameter (element).

State, as in torch's optimizers: ``state[p]`` is made at ``p``'s first step
(or by a load) and holds ``"step_size"`` (its step-size parameter),
``"momentum_buffer"`` (with momentum) and the online rule's entries
(:mod:`torch_metasgd.hypergradient`). The step sizes themselves exist from
construction, for :meth:`MetaSGD.meta_parameters` and an outer optimizer
(:mod:`torch_metasgd._groups` keeps them), and :meth:`MetaSGD.state_dict`
always holds every one. They are ``nn.Parameter`` leaves on their
parameters' devices, in their dtype (float32 for float16/bfloat16 ones, as
master weights: a learned change of 1e-3 to :math:`s = 1` is below
bfloat16's resolution; real for complex ones), sharded like them for a
DTensor; they and the state follow a model moved or cast as a whole after
the optimizer was built, as the same tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _use_grad_for_differentiable

from . import _checkpoint, _fused, _kernels, _step
from ._groups import StepSizes
from ._step_sizes import draw_uniform_, new_step_sizes, summary
from ._validation import describe, validate_group, validate_params, validate_uniform_range

__all__ = ["MetaSGD", "for_each_subclass"]


class MetaSGD(Optimizer):
    r"""Stochastic gradient descent with learnable step sizes (Meta-SGD, arXiv:1707.09835).

    A drop-in for :class:`torch.optim.SGD`: same arguments, same update, with
    the learning rate scaled by a learnable step size :math:`s` per parameter
    (element):

    .. math::
        \begin{aligned}
            g_t &\leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda \theta_{t-1}
                 \quad (-\text{ if maximize}) \\
            b_t &\leftarrow \mu b_{t-1} + (1 - \tau) g_t \quad (b_1 = g_1) \\
            d_t &\leftarrow g_t + \mu b_t \text{ if nesterov, }
                 b_t \text{ if } \mu \ne 0, \; g_t \text{ otherwise} \\
            \alpha &= \operatorname{clamp}\big(\gamma\, \phi(s),\,
                 \alpha_{\min},\, \alpha_{\max}\big) \\
            \theta_t &\leftarrow \theta_{t-1} - \alpha \odot d_t
        \end{aligned}

    :math:`\gamma` is the group's ``lr`` and :math:`\phi` the parametrization,
    1 at the initial :math:`s`: a fresh ``MetaSGD`` follows SGD's trajectory,
    and an lr scheduler scales every learned step size. With
    ``hypergrad_lr=0`` :meth:`step` does not train the step sizes: hand
    :meth:`meta_parameters` to an outer optimizer and differentiate through
    the inner steps (:func:`torch_metasgd.inner_loop`, ``higher``,
    :func:`torch_metasgd.meta_loss`, or ``differentiable=True``). With
    ``hypergrad_lr > 0`` every :meth:`step` first moves them by hypergradient
    descent, at no extra forward or backward pass.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``)
            or dicts defining param groups; every keyword below can be set per group.
        lr: base learning rate :math:`\gamma`, a float or a 1-element tensor (default: 1e-3).
        momentum, dampening, weight_decay, nesterov, maximize: as in
            ``torch.optim.SGD`` (:math:`\mu`, :math:`\tau`, :math:`\lambda`).
        foreach: the multi-tensor implementation; ``None`` picks it where
            torch.optim would (default: None).
        differentiable: :meth:`step` runs with autograd on, differentiable in
            the parameters' history, a tensor ``lr`` and the step sizes (in
            ``state[p]["step_size"]``): give it non-leaf parameters whose
            ``.grad`` has a graph (default: False).
        fused: the update compiled by ``torch.compile`` into one call per
            group, as ``SGD(fused=True)`` (GradScaler's unscaling and skipping
            inside); without a C++ compiler it warns and runs uncompiled (default: None).
        granularity: ``"element"`` (the paper's :math:`\alpha`, shaped as the
            parameter), ``"tensor"`` (one per tensor) or ``"group"`` (one per
            param group) (default: "element").
        parametrization: :math:`\phi`: ``"identity"`` (:math:`s`, from 1; may
            turn negative, as in the paper), ``"log"`` (:math:`e^s`, from 0) or
            ``"softplus"`` (:math:`\operatorname{softplus}(s)/\log 2`, from 0)
            (default: "identity").
        lr_min, lr_max: bounds on :math:`\alpha` (default: None). In a
            meta-gradient a bound blocks only what points further out (decided
            per task); :meth:`step` and the online rule project onto them.
        hypergrad_lr: the online rule's rate :math:`\beta`; 0 turns it off
            (default: 0). 0.1 is a good start at any granularity.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> meta_opt = torch.optim.Adam([*model.parameters(), *opt.meta_parameters()])
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()

    The paper's random start: ``opt.uniform_step_sizes_(0.005, 0.1)``. Learning them
    while training: ``MetaSGD(model.parameters(), lr=0.1, hypergrad_lr=0.1)``.
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
        self._step_sizes = StepSizes()
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
        if not isinstance(self.__dict__.get("_step_sizes"), StepSizes):
            self._step_sizes = StepSizes()  # an older MetaSGD's pickle: its state holds them
        self._step_sizes.forget_views()
        for group in self.param_groups:  # options newer than a checkpoint: their defaults
            for option in _KEYWORD_OPTIONS:
                group.setdefault(option.name, option.default)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (what ``torch.optim.Optimizer`` takes), with fresh step sizes.

        Every option and parameter is checked, and the step sizes made, before
        the group counts: a failed call leaves the optimizer as it was.
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
        self._step_sizes.by_param.update(zip(group["params"], step_sizes, strict=True))

    def step_sizes_by_group(self) -> list[list[Tensor]]:
        """Every parameter's live step size, by group, in order (a ``"group"`` one repeated)."""
        return [list(self._step_sizes.view(g, self.state).step_sizes) for g in self.param_groups]

    def meta_parameters(self) -> list[Tensor]:
        """The step-size parameters, in parameter order, each listed once: hand them to an
        outer optimizer, ``torch.optim.Adam([*model.parameters(), *opt.meta_parameters()])``."""
        by_group = self.step_sizes_by_group()
        return list({id(s): s for step_sizes in by_group for s in step_sizes}.values())

    def step_size(self, p: Tensor) -> Tensor:
        """The step-size parameter ``s`` of ``p`` (a leaf tensor, the live one)."""
        for group, step_sizes in zip(self.param_groups, self.step_sizes_by_group(), strict=True):
            for q, s in zip(group["params"], step_sizes, strict=True):
                if q is p:
                    return s
        raise ValueError(f"Tensor is not a parameter of this optimizer: {describe(p)}")

    def effective_lr(self, p: Tensor) -> Tensor:
        r"""The step size :math:`\alpha = \operatorname{clamp}(\gamma\phi(s), \alpha_{\min},
        \alpha_{\max})` applied to ``p``: broadcastable to ``p``, differentiable in ``s``."""
        s = self.step_size(p)
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        return _kernels.effective_lrs(group, [s])[0]

    @torch.no_grad()
    def effective_lr_summary(self) -> list[dict[str, float]]:
        r"""Per param group, the ``"min"``, ``"median"``, ``"mean"`` and ``"max"`` of the step
        sizes :math:`\alpha` it applies (over elements, tensors, or its one), for a logger.

        With online step sizes a group's ``"lr"`` (what Lightning's
        ``LearningRateMonitor`` and the HF Trainer log) is only their base
        :math:`\gamma`. Reads back to the host: call it when logging.
        """
        summaries = []
        for group, step_sizes in zip(self.param_groups, self.step_sizes_by_group(), strict=True):
            unique = list({id(s): s for s in step_sizes}.values())
            summaries.append(summary(_kernels.effective_lrs(group, unique)) if unique else {})
        return summaries

    def uniform_step_sizes_(
        self, low: float, high: float, *, generator: torch.Generator | None = None
    ) -> MetaSGD:
        r"""Draw every effective step size uniformly from ``[low, high]``, in place.

        Sets :math:`s = \phi^{-1}(u / \gamma)`, :math:`u \sim U[low, high]` (the
        paper draws :math:`\alpha` from [0.005, 0.1]); a DTensor's whole, as an
        unsharded model's, rank 0's draw scattered over its mesh (every rank
        calls this). Returns the optimizer.
        """
        validate_uniform_range(self.param_groups, low, high)
        for group, step_sizes in zip(self.param_groups, self.step_sizes_by_group(), strict=True):
            unique = list({id(s): s for s in step_sizes}.values())
            draw_uniform_(group, unique, low, high, generator)
        return self

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
        views = [self._step_sizes.view(group, self.state) for group in self.param_groups]
        batches = [_step.gather(view) for view in views]
        amp = _fused.AmpFlags(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for batch in batches:
            if batch is not None:
                _step.take(batch, self.state, amp)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The state, as ``torch.optim.Optimizer.state_dict``'s, with every parameter's step
        size in its ``state[i]["step_size"]`` (also of those that have not stepped)."""
        pairs = [
            (p, s)
            for group, step_sizes in zip(self.param_groups, self.step_sizes_by_group(), strict=True)
            for p, s in zip(group["params"], step_sizes, strict=True)
        ]
        with _checkpoint.lending_step_sizes(self.state, pairs):
            return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state; step sizes are written into the live tensors in place.

        An outer optimizer that holds :meth:`meta_parameters` keeps training
        the same tensors, which keep their precision (float32 for
        half-precision parameters). A state dict without step sizes
        (``torch.optim.SGD``'s) loads too: its momentum buffers carry over and
        the step sizes stay. Options a saved group lacks keep this
        optimizer's values. Hooks registered with
        ``register_load_state_dict_pre_hook`` see, and may rewrite, every
        entry; everything is checked after them, before anything changes.
        """
        live = self.step_sizes_by_group()
        with _checkpoint.setting_aside(self, live) as kept:
            super().load_state_dict(state_dict)
        _checkpoint.restore(self, live, kept)


_SUBCLASS_HOOKS: list[Callable[[type[MetaSGD]], None]] = []
_KEYWORD_OPTIONS = [
    option
    for option in inspect.signature(MetaSGD.__init__).parameters.values()
    if option.kind is option.KEYWORD_ONLY
]


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
