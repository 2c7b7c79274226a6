"""Argument checks shared by the entry points that take a model and its ``MetaSGD``.

Each raises before anything is computed or changed, naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from .optimizer import MetaSGD, describe

__all__ = ["require_metasgd", "require_params_of", "require_no_hypergradient", "require_bare_model"]


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


def require_bare_model(model: nn.Module, who: str) -> None:
    """``TypeError`` if ``model`` is wrapped in (Distributed)DataParallel, naming the supported way.

    Their forward replicates or synchronizes the module, which a differentiable
    inner loop cannot run through: higher fails on the wrapper's class, and
    ``torch.func.functional_call`` on storage-less tensors after one step.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"{who} got a model wrapped in {type(model).__name__}, which cannot run a "
            "differentiable inner loop; pass the bare model (its .module). To meta-train "
            "data-parallel, wrap the learner instead: "
            "DistributedDataParallel(torch_metasgd.MetaLearner(model, opt, loss_fn)) for "
            "meta_loss, or call torch_metasgd.average_gradients(meta_parameters) after "
            "backward() for inner_loop and higher"
        )
