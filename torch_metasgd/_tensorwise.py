"""The online step tensor by tensor: the rule of :mod:`torch_metasgd.hypergradient` on any tensors.

Every case the workspace (:mod:`torch_metasgd._engine`) does not take runs
here: half precision (the sums in float32), complex parameters (the real inner
product of their real pairs), DTensors (FSDP2's shards: every sum, norm and
mean is taken over the whole tensor, the ranks' partial sums added with one
all-reduce per mesh), a ``GradScaler``'s scaled gradients and its skipped
steps, and a group where some parameters have no gradient. One Python pass
per tensor, a few kernels each: slower than the workspace on many small
tensors, and written to be read against the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import hypergradient
from ._step_sizes import is_dtensor
from .hypergradient import Rule

if TYPE_CHECKING:
    from ._fused import AmpFlags
    from ._groups import Batch

__all__ = ["creates_state", "step_"]

_HALF = (torch.float16, torch.bfloat16)


def creates_state(batch: Batch, state: dict[Tensor, dict[str, Any]]) -> bool:
    """Whether the online step of ``batch`` makes a parameter's first direction."""
    key = hypergradient.direction_key(batch.group)
    return any(key not in state.get(p, ()) for p in batch.params)


def step_(
    batch: Batch,
    state: dict[Tensor, dict[str, Any]],
    amp: AmpFlags,
    update: Callable[..., list[Tensor] | None],
) -> None:
    """The whole online step of ``batch``: the rule moves the step sizes, then ``update``
    (``update(batch, state, amp, keep_directions)``) takes the group's ordinary step, and the
    new directions are kept. Under ``torch.no_grad()``.

    The rule runs first: the last direction may be the momentum buffer, which
    the update advances in place.
    """
    group = batch.group
    key = hypergradient.direction_key(group)
    entries = [state[p] for p in batch.params]
    last = [entry.get(key) for entry in entries]
    scales = _scales(batch, entries, state)
    rule = Rule.of(group)
    if not rule.learns_nothing:
        _learn_(batch, last, scales, rule, amp)
    directions = update(batch, state, amp, keep_directions=key == "hypergrad_direction")
    if key != "hypergrad_direction":
        return
    for entry, old, new in zip(entries, last, directions, strict=True):
        if old is not None and amp.found_inf is not None:
            new = torch.where(amp.found_inf.to(new.device) != 0, old, new)
        entry[key] = new


def _scales(batch: Batch, entries: list[dict[str, Any]], state) -> list[Tensor]:
    """Each parameter's running magnitude :math:`v` (made at its first step); for
    ``"group"``, the group's one tensor, in the state of every parameter that has one."""
    key = hypergradient.SCALE_KEY
    if batch.group["granularity"] != "group":
        return [
            entry.setdefault(key, hypergradient.new_scale(s))
            for entry, s in zip(entries, batch.step_sizes, strict=True)
        ]
    params = batch.view.params
    scale = next((state[p][key] for p in params if key in state.get(p, ())), None)
    scale = hypergradient.new_scale(batch.step_sizes[0]) if scale is None else scale
    for p in params:
        if p in state:
            state[p][key] = scale
    for entry in entries:
        entry[key] = scale
    return [scale]


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
        changes, _ = hypergradient.tensor_changes(
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
    changes, finite = hypergradient.tensor_changes(
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
    logs = (old + changes.to(s.dtype)).clamp_min(hypergradient.LOG_FLOOR)
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
        rate = (ok * (rule.beta * hypergradient.ELEMENT_RATE)).to(old.device)
        products = products.to(old.dtype)
        olds.append(old)
        logs.append(
            hypergradient.element_logs_(
                old.clone(), change.to(old.device), rate, products, hypergradient.LOG_FLOOR
            )
        )
    sums = torch.stack([x.sum().to(changes.device) for x in logs])
    counts = torch.tensor([max(p.numel(), 1) for p in params], dtype=sums.dtype, device=sums.device)
    caps = _over_ranks(sums[:, None], params)[:, 0] / counts + hypergradient.ELEMENT_SPREAD
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
