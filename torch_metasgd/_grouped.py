"""The tasks of a meta-batch as one wide network: tasks stacked along the channels.

For a plain ``nn.Sequential`` of convolutions, batch norms, pools, linear
layers and activations, ``T`` copies of the network with per-task weights are
one network with ``T`` times the channels: a convolution becomes a grouped
convolution (``groups = T``), a batch norm one over ``T * C`` channels (so
each task keeps its own batch statistics), a linear layer a batched matrix
product. Every op stays a native kernel with its native double backward, so
this beats both ``vmap`` (which decomposes and expands) and a Python loop over
tasks on convolutional networks.

Activations live in one of two layouts: ``(N, T * C, *spatial)`` ("channels",
from the first convolution, batch norm or pool on) or ``(T, N, *, F)``
("features": a task's ``(N, *, F)`` examples, as its ``nn.Linear`` takes them,
before any of those or after ``Flatten``).

The layers are run by their type, not through their ``forward``: a module
whose ``forward`` could do something else (a subclass, a hook, a
parametrization, a weight that is not a parameter of the model) is not
supported. A module used twice runs twice; tensors are found by identity, so
weights tied between modules stay tied.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn import functional as F

_POINTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_CHANNELS = (nn.Conv2d, nn.BatchNorm2d, *_POOLS)
_FEATURES = (nn.Linear, nn.BatchNorm1d)
_WITH_WEIGHTS = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
_KINDS = (*_CHANNELS, *_FEATURES, nn.Flatten, *_POINTWISE)


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _layers(model: nn.Sequential) -> Iterator[nn.Module]:
    """Every layer in the order it runs, nested Sequentials flattened, repeats included.

    ``named_children`` would skip the second use of a module.
    """
    for child in model._modules.values():
        if _is_sequential(child):
            yield from _layers(child)
        elif child is not None:
            yield child


def _kind(layer: nn.Module) -> type[nn.Module] | None:
    """The supported class whose computation ``layer`` is (its ``forward`` not overridden)."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        return None
    if type(layer) in _KINDS:
        return type(layer)
    for kind in _KINDS:
        if isinstance(layer, kind):
            return kind if type(layer).forward is kind.forward else None
    return None


def _hooked_container(model: nn.Sequential) -> bool:
    return bool(model._forward_hooks or model._forward_pre_hooks) or any(
        _hooked_container(child) for child in model._modules.values() if _is_sequential(child)
    )


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is a ``Sequential`` this module can run task-stacked."""
    return cannot_run(model) is None


def cannot_run(model: nn.Module) -> str | None:
    """Why the task-stacked network cannot run ``model``, or None."""
    if not _is_sequential(model):
        return f"a {type(model).__name__} is not an nn.Sequential"
    if _hooked_container(model):
        return "a Sequential of it has a forward hook"
    spatial = None  # unknown until the first layer that needs one layout
    for layer in _layers(model):
        kind = _kind(layer)
        if kind is None:
            return f"{type(layer).__name__} is not one of them, or has its own forward or a hook"
        # A weight that is not the layer's own parameter (a parametrization's,
        # or one a hook sets) would not be read. A layer of the exact class
        # has no property that could shadow its parameters.
        if (
            kind in _WITH_WEIGHTS
            and type(layer) is not kind
            and any(
                t is not None and layer._parameters.get(name) is not t
                for name, t in (("weight", layer.weight), ("bias", layer.bias))
            )
        ):
            return f"a {type(layer).__name__}'s weights are not its own parameters"
        if kind is nn.Conv2d and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            return "a Conv2d pads other than with zeros given in numbers"
        if kind in _CHANNELS:
            if spatial is False:
                return f"a {kind.__name__} after a Flatten or Linear layer"
            spatial = True
        elif kind in _FEATURES:
            if spatial:
                return f"a {kind.__name__} on images (before a Flatten)"
            spatial = False
        elif kind is nn.Flatten:
            if layer.start_dim != 1 or layer.end_dim != -1:
                return "a Flatten other than Flatten(1, -1)"
            spatial = False
    return None


def _starts_with_channels(layers: list[nn.Module]) -> bool:
    for layer in layers:
        if isinstance(layer, (*_CHANNELS, *_FEATURES, nn.Flatten)):
            return isinstance(layer, _CHANNELS)
    return False


def forward(
    model: nn.Sequential, params: dict[str, Tensor], names: dict[int, str], x: Tensor
) -> Tensor:
    """``model`` applied to ``x[t]`` with the parameters ``params[name][t]``, for every task ``t``.

    ``params`` hold every parameter of ``model`` by name, with a leading task
    dimension ``T``; ``names`` give the name of each of the model's
    parameters by ``id``; ``x`` is ``(T, N, ...)`` and the result
    ``(T, N, ...)``. Batch norms in train mode use each task's batch
    statistics and write no running statistics.
    """
    by_id = {i: params[name] for i, name in names.items()}

    def tensor(layer: nn.Module, attr: str) -> Tensor | None:
        t = getattr(layer, attr)
        return None if t is None else by_id[id(t)]

    layers = list(_layers(model))
    n_tasks, n = x.shape[:2]
    channels = _starts_with_channels(layers)
    if channels:
        if x.dim() != 5:
            raise ValueError(
                "a convolutional network needs inputs of shape (tasks, examples, channels, "
                f"height, width), got {tuple(x.shape)}"
            )
        h = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])
    else:
        h = x
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            w, b = tensor(layer, "weight"), tensor(layer, "bias")
            h = F.conv2d(
                h,
                w.reshape(-1, *w.shape[2:]),
                None if b is None else b.reshape(-1),
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups * n_tasks,
            )
        elif isinstance(layer, nn.Linear):
            h = _linear(h, tensor(layer, "weight"), tensor(layer, "bias"))
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            weight, bias = tensor(layer, "weight"), tensor(layer, "bias")
            h = _batch_norm(layer, weight, bias, h, channels, n_tasks)
        elif isinstance(layer, nn.Flatten):
            if channels:
                h, channels = h.reshape(n, n_tasks, -1).transpose(0, 1), False
            else:
                h = h.flatten(2)
        else:
            h = layer(h)
    if channels:
        h = h.reshape(n, n_tasks, -1, *h.shape[2:]).transpose(0, 1)
    return h


def _linear(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """Every task's ``(N, *, F)`` examples through its own weights: one batched product."""
    # (T, N, *, F) as (T, N * ..., F); the reshapes only where there are extra
    # dimensions (two more graph nodes per layer and backward).
    rows = h if h.dim() == 3 else h.flatten(1, -2)
    if b is None:
        out = torch.bmm(rows, w.transpose(1, 2))
    else:
        out = torch.baddbmm(b.unsqueeze(1), rows, w.transpose(1, 2))
    return out if h.dim() == 3 else out.unflatten(1, h.shape[1:-1])


def _batch_norm(layer, weight, bias, h, channels, n_tasks) -> Tensor:
    use_batch_stats = layer.training or layer.running_mean is None
    running_mean = running_var = None
    if not use_batch_stats:
        running_mean = layer.running_mean.repeat(n_tasks)
        running_var = layer.running_var.repeat(n_tasks)
    # Features (T, N, C, *rest) -> (N, T * C, *rest): a batch norm over T * C channels.
    stacked = h if channels else h.transpose(0, 1).flatten(1, 2)
    out = F.batch_norm(
        stacked,
        running_mean,
        running_var,
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        use_batch_stats,
        0.0,
        layer.eps,
    )
    return out if channels else out.unflatten(1, (n_tasks, -1)).transpose(0, 1)


def adapt_all(model, plan, loss_fn, support, steps, first_order) -> dict[str, Tensor]:
    trainable = plan.trainable
    # Every task starts from the same weights: expanded views, so the
    # meta-gradient of the T copies sums into the shared parameter.
    params = {n: p.expand(plan.n_tasks, *p.shape) for n, p in plan.params.items()}
    # (T,) step sizes of scalar granularity broadcast over each task's tensor.
    alphas = {
        n: a.reshape(*a.shape, *(1,) * (params[n].dim() - a.dim())) for n, a in plan.alphas.items()
    }
    bufs = plan.momentum
    for _ in range(steps):
        theta = params
        if first_order:
            theta = {n: p.detach().requires_grad_(n in plan.alphas) for n, p in params.items()}
        out = forward(model, theta, plan.names, support[0])
        # Tasks are independent: the gradient of the sum is every task's own.
        loss = vmap(loss_fn)(out, support[1]).sum()
        grads = torch.autograd.grad(
            loss,
            [theta[n] for n in trainable],
            create_graph=not first_order,
            allow_unused=True,
        )
        grads = dict(zip(trainable, grads, strict=True))
        params, bufs = plan.update(params, grads, bufs, alphas, first_order)
    return params


def losses(model, plan, loss_fn, adapted, batch) -> Tensor:
    return vmap(loss_fn)(forward(model, adapted, plan.names, batch[0]), batch[1])
