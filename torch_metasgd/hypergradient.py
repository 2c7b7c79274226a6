r"""Online step sizes: ``MetaSGD(..., hypergrad_lr=beta)`` learns them inside ``step()``.

Hypergradient descent (Baydin et al., 2018), made free of the loss's scale.
The last step of a parameter was :math:`\theta_t = \theta_{t-1} - \alpha \odot
d_{t-1}`, so its current gradient gives the derivative of the current loss in
the step sizes at no extra forward or backward pass: with :math:`g_t =
\pm\nabla f(\theta_t) + \lambda\theta_t` (the gradient of the objective the
step descends),

.. math::
    \frac{\partial f(\theta_t)}{\partial \alpha} = -g_t \odot d_{t-1}.

Summed over the elements that share a rule (a tensor, or the whole group for
``granularity="group"``) it gives :math:`p = \langle g_t, d_{t-1}\rangle`,
measured against its running magnitude :math:`v`, and every step size takes a
multiplicative step before the parameters' update:

.. math::
    \begin{aligned}
    v &\leftarrow \mu v + (1 - \mu)\,\|g_t\|\,\|d_{t-1}\|
        \quad (v = \|g_t\|\,\|d_{t-1}\| \text{ at first}) \\
    h &= \operatorname{clamp}(p / v,\; -\nu,\; 1) \\
    \log\alpha &\leftarrow \max\big(\log\alpha + \beta\,(h + \delta),\; \log(\epsilon\gamma)\big)
    \end{aligned}

with :math:`\mu` = :data:`SCALE_DECAY`, :math:`\nu` = :data:`MAX_SHRINK`,
:math:`\delta` = :data:`DRIFT` and :math:`\epsilon` = :data:`FLOOR`. At the
first step :math:`h = \cos(g_t, d_{t-1})`. While the gradients keep their
size, :math:`h` stays about a cosine, so a step size grows by at most
:math:`e^{\beta(1 + \delta)}` per step; when the loss blows up, the gradients
outgrow :math:`v` and the step sizes shrink in proportion, by up to
:math:`e^{-\beta(\nu - \delta)}` per step, so that one outlier batch cannot
wipe out what was learned. The drift :math:`\delta` offsets the bias of this
greedy (one-step) hypergradient under gradient noise: at a noisy stationary
point its expectation is negative for every step size (:math:`-\eta h_c / 2`
in a direction of curvature :math:`h_c`), which would shrink the step sizes
for ever. The update is free of the scale of the loss and of the parameters,
so one :math:`\beta` suits every model (the additive form
:math:`\alpha \leftarrow \alpha - \beta\,\partial f/\partial\alpha` diverges or
stalls depending on that scale; see ``benchmarks/online.py``).

The floor :math:`\epsilon\gamma` (``lr`` times :data:`FLOOR`) stops a collapse
that the drift cannot offset. Where a tensor's hypergradient is mostly
minibatch noise (a bias of one or a few elements), :math:`p / v` is
heavy-tailed with both signs, and the asymmetric clip to :math:`[-\nu, 1]`
gives it a mean of about -0.1 to -1: without the floor, the output bias of a
10-32-1 regression MLP fell from :math:`10^{-2}` to :math:`10^{-12}`-
:math:`10^{-19}` in 2000 steps (to exactly 0 with ``"identity"``). At the
floor the rule still lifts the step size as soon as the hypergradient says so.
Online step sizes are positive: a negative or zero step size
(``"identity"``) is lifted to the floor by its first update, since descent on
:math:`\alpha` would carry it across zero.

Per element (``granularity="element"``), each tensor's step sizes move
together by the tensor's :math:`h + \delta`, each element also by the sign of
its own hypergradient at :data:`ELEMENT_RATE` :math:`= \rho` of the rate, and
no element may exceed :math:`e^{\kappa}` (:data:`ELEMENT_SPREAD`
:math:`= \kappa`) times the geometric mean of its tensor's step sizes:

.. math::
    \log\alpha_i \leftarrow \min\Big(\ell_i,\; \operatorname{mean}_j \ell_j + \kappa\Big),
    \quad \ell_i = \max\Big(\log\alpha_i + \beta\big(h + \delta + \rho
        \operatorname{sign}(g_{t,i}\, d_{t-1,i})\big),\; \log(\epsilon\gamma)\Big).

The sign rule alone lets the step sizes of elements whose gradient keeps its
sign (output weights on separable data) grow until training diverges; the
cap stops that. Last, :math:`\alpha` is clamped to ``[lr_min, lr_max]`` and
:math:`s \leftarrow \phi^{-1}(\alpha / \gamma)`.

Which parameters learn: those with a gradient now and a last direction
:math:`d_{t-1}`, the direction of their last step (a parameter without a
gradient does not step, and its step sizes and :math:`v` do not move, so
when it steps again its last direction is still the one that its step sizes
scaled). A tensor whose :math:`p` or :math:`v` is not finite (a NaN or an
inf in its gradient or its last direction; for ``"group"``, in any of the
group's), or every tensor of a step that a ``GradScaler`` skips, leaves its
step sizes and :math:`v` exactly as they were. Any mix of dtypes and devices
may share a group: half-precision gradients are reduced in float32, a
complex parameter uses the real inner product :math:`\operatorname{Re}\langle
g, d\rangle` (the derivative in its real step size), and the sums, norms and
means of a DTensor (an FSDP2 parameter) are over the whole tensor, not the
rank's shard, so every rank learns what one process would.

State, per parameter, in ``optimizer.state`` (and so in the state dict),
made at the parameter's first step: the last direction :math:`d_{t-1}` is the
momentum buffer itself with momentum and without nesterov (the rule runs
before the update advances it), else ``"hypergrad_direction"``;
``"hypergrad_scale"`` is :math:`v` (0-dim, in the step sizes' dtype; 0 before
any history; one tensor shared by the group's parameters for ``"group"``).

This module is the rule, run tensor by tensor by :func:`step_` (any tensors:
half precision, complex, DTensor, a ``GradScaler``'s scaled gradients, a group
where some parameters have no gradient). :mod:`torch_metasgd._workspace` runs
the same rule, and the whole step, in a few kernels for all tensors of a group
of float32 or float64 tensors on one device each, where it can.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._kernels import effective_lr, group_lr
from ._parametrizations import Parametrization, parametrization
from ._step_sizes import is_dtensor

if TYPE_CHECKING:
    from ._fused import AmpFlags
    from ._groups import Batch

__all__ = [
    "SCALE_DECAY",
    "MAX_SHRINK",
    "DRIFT",
    "ELEMENT_RATE",
    "ELEMENT_SPREAD",
    "FLOOR",
    "Rule",
    "direction_key",
    "tensor_changes",
    "creates_state",
    "step_",
]

SCALE_DECAY = 0.99
MAX_SHRINK = 5.0
DRIFT = 0.02
ELEMENT_RATE = 0.2
ELEMENT_SPREAD = 1.0
FLOOR = 1e-3

LOG_FLOOR = math.log(FLOOR)
SCALE_KEY = "hypergrad_scale"
_HALF = (torch.float16, torch.bfloat16)


class Rule(NamedTuple):
    """A group's options that shape the step-size update."""

    beta: float
    lr: float | Tensor
    phi: Parametrization
    lr_min: float | None
    lr_max: float | None

    @classmethod
    def of(cls, group: dict[str, Any]) -> Rule:
        return cls(
            group["hypergrad_lr"],
            group_lr(group),
            parametrization(group["parametrization"]),
            group["lr_min"],
            group["lr_max"],
        )

    @property
    def bounded(self) -> bool:
        return self.lr_min is not None or self.lr_max is not None

    @property
    def in_log_space(self) -> bool:
        """``s = log(alpha / lr)``: the rule's own variable, written as it is."""
        return self.phi.is_exp and not self.bounded

    @property
    def learns_nothing(self) -> bool:
        """``lr = 0`` (e.g. torch.distributed.checkpoint's warm-up step): no step size to learn."""
        return not isinstance(self.lr, Tensor) and self.lr == 0

    def log_ratios(self, s: Tensor) -> Tensor:
        r""":math:`\log(\alpha/\gamma)` of step sizes ``s``, :math:`\alpha` lifted to the floor."""
        if self.in_log_space:
            return s.clamp_min(LOG_FLOOR)
        if not (self.phi.is_identity and not self.bounded):
            s = effective_lr(s, self.lr, self.phi, self.lr_min, self.lr_max) / self.lr
        return s.clamp_min(FLOOR).log()

    def step_sizes(self, logs: Tensor) -> Tensor:
        r"""The step sizes :math:`s = \phi^{-1}(\alpha/\gamma)` of :math:`\log(\alpha/\gamma)`,
        within the bounds."""
        if self.in_log_space:
            return logs
        ratios = logs.exp()
        if self.bounded:
            ratios = (ratios * self.lr).clamp(self.lr_min, self.lr_max) / self.lr
        return self.phi.inverse(ratios)


def direction_key(group: dict[str, Any]) -> str:
    """Where a parameter's last direction is kept in its state."""
    return (
        "momentum_buffer"
        if group["momentum"] != 0 and not group["nesterov"]
        else ("hypergrad_direction")
    )


def tensor_changes(
    dots: Tensor,
    g_norms: Tensor,
    d_norms: Tensor,
    scales: Tensor,
    beta: float,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per tensor: ``beta * (h + DRIFT)`` and 1, or 0 and 0 where the hypergradient is not
    finite (or not ``allowed``).

    Moves the running magnitudes ``scales`` in place, only where the change
    is 1; a scale of 0 (no history) starts at the magnitude itself, and ``h``
    is 0 where ``v`` is.
    """
    dots, magnitudes = dots.to(scales.dtype), (g_norms * d_norms).to(scales.dtype)
    v = torch.where(scales == 0, magnitudes, torch.lerp(magnitudes, scales, SCALE_DECAY))
    h = (dots / v.clamp_min(torch.finfo(v.dtype).tiny)).clamp(-MAX_SHRINK, 1.0)
    # h is clamped to [-MAX_SHRINK, 1] (NaN stays NaN), so h + v cannot overflow:
    # it is finite exactly where both are, in one test where two cost twice the kernels.
    finite = torch.isfinite(h + v)
    if allowed is not None:
        finite &= allowed
    torch.where(finite, v, scales, out=scales)
    return torch.where(finite, beta * (h + DRIFT), 0.0), finite.to(v.dtype)


def creates_state(batch: Batch, state: dict[Tensor, dict[str, Any]]) -> bool:
    """Whether the online step of ``batch`` makes a parameter's first direction."""
    key = direction_key(batch.group)
    return any(key not in state.get(p, ()) for p in batch.params)


def step_(
    batch: Batch,
    state: dict[Tensor, dict[str, Any]],
    amp: AmpFlags,
    update: Callable[..., list[Tensor] | None],
) -> None:
    """The whole online step of ``batch``: the rule moves the step sizes, then ``update``
    (``update(batch, amp, keep_directions)``) takes the group's ordinary step, and the new
    directions are kept. Under ``torch.no_grad()``.

    The rule runs first: the last direction may be the momentum buffer, which
    the update advances in place.
    """
    group = batch.group
    key = direction_key(group)
    entries = [state[p] for p in batch.params]
    last = [entry.get(key) for entry in entries]
    scales = _scales(batch, entries, state)
    rule = Rule.of(group)
    if not rule.learns_nothing:
        _learn_(batch, last, scales, rule, amp)
    directions = update(batch, amp, keep_directions=key == "hypergrad_direction")
    if key != "hypergrad_direction":
        return
    for entry, old, new in zip(entries, last, directions, strict=True):
        if old is not None and amp.found_inf is not None:
            new = torch.where(amp.found_inf.to(new.device) != 0, old, new)
        entry[key] = new


def _scales(batch: Batch, entries: list[dict[str, Any]], state) -> list[Tensor]:
    """Each parameter's running magnitude :math:`v` (made at its first step); for
    ``"group"``, the group's one tensor, in the state of every parameter that has one."""
    if batch.group["granularity"] != "group":
        return [
            entry.setdefault(SCALE_KEY, new_scale(s))
            for entry, s in zip(entries, batch.step_sizes, strict=True)
        ]
    params = batch.view.params
    scale = next((state[p][SCALE_KEY] for p in params if SCALE_KEY in state.get(p, ())), None)
    scale = new_scale(batch.step_sizes[0]) if scale is None else scale
    for p in params:
        if p in state:
            state[p][SCALE_KEY] = scale
    for entry in entries:
        entry[SCALE_KEY] = scale
    return [scale]


def new_scale(s: Tensor) -> Tensor:
    """A running magnitude with no history (0), in the dtype of step size ``s``, on its device
    (a plain tensor: every rank holds the same value)."""
    return torch.zeros((), dtype=s.dtype, device=s.device)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


def _real_pairs(t: Tensor) -> Tensor:
    """A tensor in the rule's precision: float32 for half, a complex one as real pairs."""
    t = _local(t)
    if t.is_complex():
        return torch.view_as_real(t)
    return t.float() if t.dtype in _HALF else t


def _learn_(
    batch: Batch, last: list[Tensor | None], scales: list[Tensor], rule: Rule, amp: AmpFlags
) -> None:
    """The rule: moves the step sizes of the parameters with a last direction, in place."""
    group = batch.group
    have = [i for i, d in enumerate(last) if d is not None]
    if not have:
        return
    params = [batch.params[i] for i in have]
    grads = [batch.grads[i] for i in have]
    directions = [last[i] for i in have]
    step_sizes = [batch.step_sizes[i] for i in have]
    if amp.grad_scale is not None:
        grads = [g / amp.grad_scale.to(g.device) for g in grads]
    if group["maximize"]:
        grads = [-g for g in grads]
    if group["weight_decay"] != 0:
        grads = [g.add(p, alpha=group["weight_decay"]) for g, p in zip(grads, params, strict=True)]
    g, d = [_real_pairs(t) for t in grads], [_real_pairs(t) for t in directions]
    dtype = scales[0].dtype
    device = scales[0].device
    sums = torch.stack(
        [
            torch.stack([(gi * di).sum(), gi.square().sum(), di.square().sum()]).to(device, dtype)
            for gi, di in zip(g, d, strict=True)
        ]
    )
    sums = _over_ranks(sums, params)
    allowed = None if amp.found_inf is None else amp.found_inf.to(device) == 0
    if group["granularity"] == "group":
        total = sums.sum(0, keepdim=True)
        changes, _ = tensor_changes(
            total[:, 0],
            total[:, 1].sqrt(),
            total[:, 2].sqrt(),
            scales[0].view(1),
            rule.beta,
            allowed,
        )
        _move_scalars_(step_sizes[:1], changes, rule)
        return
    v = torch.stack([scales[i].to(device) for i in have])
    changes, finite = tensor_changes(
        sums[:, 0], sums[:, 1].sqrt(), sums[:, 2].sqrt(), v, rule.beta, allowed
    )
    for i, value in zip(have, v.unbind(), strict=True):
        scales[i].copy_(value)
    if group["granularity"] == "tensor":
        _move_scalars_(step_sizes, changes, rule)
        return
    _move_elements_(params, g, d, step_sizes, changes, finite, rule)


def _move_scalars_(step_sizes: list[Tensor], changes: Tensor, rule: Rule) -> None:
    """The update of 0-dim step sizes, one change each (0 where the hypergradient was skipped)."""
    local = [_local(s) for s in step_sizes]
    s = torch.stack([x.to(changes.device) for x in local])
    old = rule.log_ratios(s)
    logs = (old + changes.to(s.dtype)).clamp_min(LOG_FLOOR)
    _store_([s], [old], [logs], rule)
    for x, value in zip(local, s.unbind(), strict=True):
        x.copy_(value)


def _move_elements_(params, g, d, step_sizes, changes, finite, rule: Rule) -> None:
    """The update of element step sizes: the tensor's change, each element's sign, the floor,
    then the cap above the tensor's geometric mean."""
    local = [_local(s) for s in step_sizes]
    olds, logs = [], []
    for s, gi, di, change, ok in zip(local, g, d, changes, finite, strict=True):
        products = gi * di
        if products.dim() > s.dim():  # complex: Re(conj(g) d) per element
            products = products.sum(-1)
        old = rule.log_ratios(s)
        rate = (ok * (rule.beta * ELEMENT_RATE)).to(old.device)
        new = (old + change.to(old.device)).addcmul_(products.sign().to(old.dtype), rate)
        olds.append(old)
        logs.append(new.clamp_min_(LOG_FLOOR))
    sums = torch.stack([x.sum().to(changes.device) for x in logs])
    counts = torch.tensor([max(p.numel(), 1) for p in params], dtype=sums.dtype, device=sums.device)
    caps = _over_ranks(sums[:, None], params)[:, 0] / counts + ELEMENT_SPREAD
    logs = [torch.minimum(x, cap.to(x.device)) for x, cap in zip(logs, caps, strict=True)]
    _store_(local, olds, logs, rule, finite)


def _store_(step_sizes, olds, logs, rule: Rule, finite: Tensor | None = None) -> None:
    """Write :math:`\\phi^{-1}(\\alpha/\\gamma)` of ``logs`` into ``step_sizes``, only where
    ``logs`` moved from ``olds``, the result is finite, and (per tensor) ``finite``: a
    skipped tensor stays exactly as it was, not a round trip through :math:`\\phi` away."""
    for i, (s, old, new_logs) in enumerate(zip(step_sizes, olds, logs, strict=True)):
        new = rule.step_sizes(new_logs)
        keep = torch.isfinite(new) & (new_logs != old)
        if finite is not None:
            keep &= finite[i].to(keep.device) > 0
        s.copy_(torch.where(keep, new, s))


def _over_ranks(sums: Tensor, tensors: list[Tensor]) -> Tensor:
    """Per-tensor sums (rows) of local shards, summed over the ranks that share each
    DTensor's shards, so that every rank holds the sums of whole tensors."""
    meshes: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
    for i, t in enumerate(tensors):
        if not is_dtensor(t):
            continue
        if any(placement.is_partial() for placement in t.placements):
            raise ValueError(
                f"Invalid parameter for hypergrad_lr: a DTensor with placements {t.placements} "
                "(a sharded or replicated one, as FSDP2's, is needed)"
            )
        dims = tuple(dim for dim, placement in enumerate(t.placements) if placement.is_shard())
        if dims:
            meshes.setdefault((t.device_mesh, dims), []).append(i)
    if not meshes:
        return sums
    sums = sums.clone()
    for (mesh, dims), rows in meshes.items():
        index = torch.tensor(rows, device=sums.device)
        part = sums.index_select(0, index)
        for dim in dims:
            dist.all_reduce(part, group=mesh.get_group(dim))
        sums.index_copy_(0, index, part)
    return sums
