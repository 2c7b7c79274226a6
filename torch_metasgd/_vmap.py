"""The ``"vmap"`` strategy: ``torch.func.grad`` inside ``torch.func.vmap`` over the tasks.

It runs any model (and ``loss_fn``) that ``functional_call`` and vmap can:
not recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells
have no batching rule: :func:`cannot_run` says so), nor code vmap refuses
(``.item()``, data-dependent control flow: torch raises). Batch, layer and
instance norms run as mean/variance arithmetic here (:class:`DecomposedNorms`),
because the native ops' second-order gradients through ``vmap(grad(...))``
are wrong in torch 2.13; group and RMS norms, attention, embeddings and the
activations are exact natively and run as they are. Under ``torch.compile``
every strategy runs as this one, the one that compiles with the same
gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ._plan import task_loss

__all__ = ["adapt_all", "losses", "cannot_run", "recurrent", "DecomposedNorms"]

_RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def recurrent(modules: Iterable[nn.Module]) -> nn.Module | None:
    """A recurrent layer among ``modules`` (vmap has no batching rule for them), or None."""
    return next((m for m in modules if isinstance(m, _RECURRENT)), None)


def cannot_run(model: nn.Module) -> str | None:
    """Why vmap cannot run ``model``, or None."""
    layer = recurrent(model.modules())
    if layer is None:
        return None
    return f"{type(layer).__name__}: torch.func.vmap has no batching rule for recurrent layers"


def adapt_all(model, plan, loss_fn, support, steps, first_order) -> dict[str, Tensor]:
    trainable = plan.trainable
    # torch.func.grad gives zeros where autograd gives None (a parameter the
    # loss never reaches); weight decay or momentum would then move it, which
    # torch.optim.SGD and the other strategies do not. Only then is the graph
    # searched for the parameters it reaches.
    find_unused = any(plan.options[n].weight_decay or plan.options[n].momentum for n in trainable)

    reached: list[set[str]] = []  # what each grad call's graph reached (aux must be tensors)

    def support_loss(theta, fixed, buffers, x, y):
        loss = task_loss(model, loss_fn, {**fixed, **theta}, buffers, x, y)
        if find_unused:
            reached.append(_reached(loss, theta))
        return loss

    def one_task(buffers, alphas, xs, ys):
        params, bufs = plan.params, plan.momentum
        for _ in range(steps):
            theta = {n: params[n] for n in trainable}
            fixed = {n: p for n, p in params.items() if n not in theta}
            if first_order:
                theta = {n: p.detach() for n, p in theta.items()}
                fixed = {n: p.detach() for n, p in fixed.items()}
            grads = grad(support_loss)(theta, fixed, buffers, xs, ys)
            if find_unused:
                used = reached.pop()
                grads = {n: g if n in used else None for n, g in grads.items()}
            params, bufs = plan.update(params, grads, bufs, alphas, first_order)
        return params

    # Copies: BatchNorm in train mode still counts num_batches_tracked in place.
    buffers = {k: b.clone() for k, b in plan.buffers.items()}
    with DecomposedNorms():
        return vmap(one_task, in_dims=(None, 0, 0, 0), randomness="different")(
            buffers, plan.alphas, *support
        )


def _reached(loss: Tensor, tensors: dict[str, Tensor]) -> set[str]:
    """The names of ``tensors`` (leaves of ``loss``'s graph) that ``loss``'s graph reaches."""
    names = {id(t): n for n, t in tensors.items()}
    reached, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None and id(variable) in names:
            reached.add(names[id(variable)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def losses(model, plan, loss_fn, adapted, batch) -> Tensor:
    buffers = {k: b.clone() for k, b in plan.buffers.items()}

    def one_task(params, x, y):
        return task_loss(model, loss_fn, params, buffers, x, y)

    with DecomposedNorms():
        return vmap(one_task, randomness="different")(adapted, *batch)


class DecomposedNorms(TorchFunctionMode):
    """Runs batch, layer and instance norms as mean/variance arithmetic, writing no statistics.

    Under ``vmap(grad(...))`` the second-order gradients of the native
    ``batch_norm``, of ``layer_norm`` with an affine weight and of
    ``instance_norm`` with one are wrong (torch 2.13: ~1e-3 relative, the loss
    right); their arithmetic is differentiated exactly. The native batch norm
    also writes running statistics in place, which vmap refuses for a tensor
    the tasks share. Group and RMS norms, attention, embeddings and the
    activations are exact natively and run as they are.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every op inside vmap comes here: the common case first, at the least cost.
        if func not in _DECOMPOSITIONS:
            return func(*args, **(kwargs or {}))
        return _DECOMPOSITIONS[func](*args, **(kwargs or {}))


def _normalize(x: Tensor, dims: list[int], eps: float) -> Tensor:
    # Both moments from one var_mean pass: a mean() apart is ~7x less accurate
    # in float32 on a large reduction (4e-7 against 6e-8 relative over a
    # 75x28x28 channel), and the centring error is divided by the standard
    # deviation. On the Omniglot conv net (most pixels exactly 0) the float32
    # meta-gradient was up to 7.5e-4 off float64 with it, 6e-6 without.
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, shape) -> Tensor:
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


def _batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if training:
        out = _normalize(x, [0, *range(2, x.dim())], eps)
    else:
        out = (x - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    return _affine(out, weight, bias, shape)


def _instance_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if use_input_stats:
        out = _normalize(x, list(range(2, x.dim())), eps)
    else:
        out = (x - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    return _affine(out, weight, bias, shape)


def _layer_norm(
    x: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    out = _normalize(x, list(range(-len(normalized_shape), 0)), eps)
    return _affine(out, weight, bias, tuple(normalized_shape))


_DECOMPOSITIONS = {
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.layer_norm: _layer_norm,
}
