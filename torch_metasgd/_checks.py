"""Argument checks shared by the entry points that take a model and its ``MetaSGD``.

Each raises before anything is computed or changed, naming what is wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn

from ._step_sizes import is_dtensor
from ._validation import describe
from .optimizer import MetaSGD

__all__ = [
    "require_metasgd",
    "require_params_of",
    "require_no_hypergradient",
    "require_steps",
    "require_bool",
    "require_tasks",
    "require_scalar_loss",
    "scalar_loss",
    "require_bare_model",
    "uncompiled",
]


def require_metasgd(opt: object, who: str) -> None:
    """``TypeError`` unless ``opt`` is a :class:`~torch_metasgd.MetaSGD` (or subclass)."""
    if not isinstance(opt, MetaSGD):
        raise TypeError(f"{who} needs a torch_metasgd.MetaSGD optimizer, got {type(opt).__name__}")


def require_params_of(opt: MetaSGD, params: Iterable[Tensor], owner: str) -> None:
    """``ValueError`` unless every parameter of ``opt`` is one of ``params``, those of ``owner``."""
    known = {id(p) for p in params}
    foreign = [
        (g_idx, p_idx, p)
        for g_idx, group in enumerate(opt.param_groups)
        for p_idx, p in enumerate(group["params"])
        if id(p) not in known
    ]
    if foreign:
        g_idx, p_idx, p = foreign[0]
        raise ValueError(
            f"Parameter {p_idx} of param group {g_idx} of the optimizer ({describe(p)}) "
            f"is not a parameter of {owner} (in all, {len(foreign)} of the optimizer's "
            f"parameters are not parameters of {owner})"
        )


def require_no_hypergradient(opt: MetaSGD) -> None:
    """``ValueError`` if a group learns its step sizes online: they would not be differentiable."""
    for g_idx, group in enumerate(opt.param_groups):
        if group["hypergrad_lr"] != 0:
            raise ValueError(
                f"param group {g_idx} has hypergrad_lr={group['hypergrad_lr']}: online "
                "hypergradient step sizes are not differentiable; set hypergrad_lr=0 "
                "to meta-learn the step sizes through the inner loop"
            )


def require_steps(steps: Any) -> None:
    """``ValueError`` unless ``steps`` is a non-negative integer (0: the initial weights)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"Invalid number of inner steps: {steps}")


def require_bool(value: Any, name: str) -> None:
    """``ValueError`` unless ``value`` is a bool (a truthy string would switch an option on)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r} (expected True or False)")


def _leaves(tree: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` of every leaf of nested tuples, lists and dicts."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, f"{path}[{key!r}]")
    elif isinstance(tree, (tuple, list)):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, tree


def require_tasks(support: Any, query: Any = None, *, allow_none: bool = False) -> int:
    """The number of tasks ``T``: the leading size shared by every tensor of the batches.

    ``support`` and ``query`` are ``(inputs, targets)`` pairs, each a tensor or
    tuples, lists and dicts of tensors. Without ``query``, only the support set
    is checked. ``T`` is at least 1 unless ``allow_none``.
    """
    pairs = {"support": support} if query is None else {"support": support, "query": query}
    for name, pair in pairs.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"{name} must be a pair (inputs, targets)")
    leaves = {}
    for name, pair in pairs.items():
        for i, part in enumerate(pair):
            if isinstance(part, Tensor):  # the common case, without the walk
                leaves[f"{name}[{i}]"] = part
                continue
            found = dict(_leaves(part, f"{name}[{i}]"))
            if not found:
                raise ValueError(f"{name}[{i}] holds no tensor")
            leaves.update(found)
    what = "support and query" if query is not None else "support inputs and targets"
    sizes = {t.shape[0] if isinstance(t, Tensor) and t.dim() > 0 else None for t in leaves.values()}
    if None in sizes or len(sizes) != 1:
        shapes = {
            k: tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            for k, t in leaves.items()
        }
        raise ValueError(f"{what} must share a leading task dimension, got {shapes}")
    (n_tasks,) = sizes
    if n_tasks == 0 and not allow_none:
        raise ValueError(f"Invalid number of tasks: 0 ({what} hold no task)")
    return n_tasks


def require_scalar_loss(loss: Any) -> None:
    """``ValueError`` unless ``loss`` is a 0-dim tensor (inside ``vmap``: one per task)."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        what = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"Invalid loss: got {what}, expected a scalar (reduce it, e.g. reduction='mean')"
        )


def scalar_loss(loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``loss_fn``, checked to return a scalar."""

    def checked(*args: Any) -> Tensor:
        loss = loss_fn(*args)
        require_scalar_loss(loss)
        return loss

    return checked


def require_bare_model(model: nn.Module, who: str, params: dict[str, Tensor] | None = None) -> None:
    """``TypeError`` if ``model`` is wrapped in (Distributed)DataParallel or sharded (FSDP2,
    DTensor parameters), naming the supported ways.

    Their forward replicates, synchronizes or all-gathers the module, which a
    differentiable inner loop cannot run through: higher fails on the
    wrapper's class, ``torch.func.functional_call`` on storage-less tensors
    after one step, and FSDP2's forward all-gathers its own shards in place of
    the adapted weights (its collectives are not differentiable twice).
    ``params``: the model's ``named_parameters()``, if the caller has them.
    """
    data_parallel = ". To meta-train data-parallel, wrap the learner instead: "
    data_parallel += (
        "DistributedDataParallel(torch_metasgd.MetaLearner(model, opt, loss_fn)) for "
        "meta_loss, or call torch_metasgd.average_gradients(meta_parameters) after "
        "backward() for inner_loop and higher"
    )
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"{who} got a model wrapped in {type(model).__name__}, which cannot run a "
            f"differentiable inner loop; pass the bare model (its .module){data_parallel}"
        )
    params = dict(model.named_parameters()) if params is None else params
    sharded = next((name for name, p in params.items() if is_dtensor(p)), None)
    if sharded is not None:
        raise TypeError(
            f"{who} got a sharded model (parameter {sharded!r} is a DTensor, as "
            "torch.distributed.fsdp.fully_shard or tensor parallelism make them), through "
            "which torch.func and higher cannot differentiate an inner loop; meta-train an "
            f"unsharded model{data_parallel}. A sharded model can learn its step sizes "
            "online: MetaSGD(model.parameters(), ..., hypergrad_lr=0.1).step()"
        )


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``'d ``model`` wraps (the same parameters), else ``model``.

    The inner loops differentiate the model twice, which a compiled forward
    cannot do (aot_autograd has no double backward; higher recurses into the
    wrapper for ever), and the task-stacked strategy reads the layers of the
    module itself: it runs, eagerly, as the module it compiles.
    """
    # torch._dynamo is imported by the first torch.compile: without it there is no wrapper.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod
    return model
