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
after convolutions) or ``(T, N, F)`` ("features", after ``Flatten``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
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


def _layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _layers(child, f"{path}.")
        else:
            yield path, child


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is a ``Sequential`` this module can run task-stacked."""
    if not isinstance(model, nn.Sequential):
        return False
    spatial = None  # unknown until the first layer that needs one layout
    for _, layer in _layers(model):
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str) or spatial is False:
                return False
            spatial = True
        elif isinstance(layer, (nn.BatchNorm2d, *_POOLS)):
            if spatial is False:
                return False
            spatial = True
        elif isinstance(layer, (nn.Linear, nn.BatchNorm1d)):
            if spatial:
                return False
            spatial = False
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return False
            spatial = False
        elif not isinstance(layer, _POINTWISE):
            return False
    return True


def forward(
    model: nn.Sequential, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor
) -> Tensor:
    """``model`` applied to ``x[t]`` with the parameters ``params[name][t]``, for every task ``t``.

    ``params`` hold a leading task dimension ``T``; ``x`` is ``(T, N, ...)``
    and the result ``(T, N, ...)``. Batch norms in train mode use each task's
    batch statistics and write no running statistics.
    """
    n_tasks, n = x.shape[:2]
    if x.dim() > 3:
        h, channels = x.transpose(0, 1).reshape(n, -1, *x.shape[3:]), True
    else:
        h, channels = x, False
    for name, layer in _layers(model):
        if isinstance(layer, nn.Conv2d):
            w = params[f"{name}.weight"]
            b = params.get(f"{name}.bias")
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
            w = params[f"{name}.weight"]
            b = params.get(f"{name}.bias")
            if b is None:
                h = torch.bmm(h, w.transpose(1, 2))
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            h = _batch_norm(layer, name, params, buffers, h, channels, n_tasks)
        elif isinstance(layer, nn.Flatten):
            if channels:
                h, channels = h.reshape(n, n_tasks, -1).transpose(0, 1), False
        else:
            h = layer(h)
    if channels:
        h = h.reshape(n, n_tasks, -1, *h.shape[2:]).transpose(0, 1)
    return h


def _batch_norm(layer, name, params, buffers, h, channels, n_tasks) -> Tensor:
    weight = params.get(f"{name}.weight")
    bias = params.get(f"{name}.bias")
    use_batch_stats = layer.training or layer.running_mean is None
    running_mean = running_var = None
    if not use_batch_stats:
        running_mean = buffers[f"{name}.running_mean"].repeat(n_tasks)
        running_var = buffers[f"{name}.running_var"].repeat(n_tasks)
    features = not channels
    if features:
        # (T, N, F) -> (N, T * F): a batch norm over T * F channels.
        t, n = h.shape[:2]
        h = h.transpose(0, 1).reshape(n, -1)
    out = F.batch_norm(
        h,
        running_mean,
        running_var,
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        use_batch_stats,
        0.0,
        layer.eps,
    )
    if features:
        out = out.reshape(n, t, -1).transpose(0, 1)
    return out
