"""``meta_loss`` on the layers researchers use, every strategy against autograd task by task.

The reference (``_reference.per_task_meta_loss``) is the inner loop written out
with ``torch.autograd.grad(create_graph=True)``, one task at a time, in
float64: no ``torch.func``, no task-stacked network.
"""

from __future__ import annotations

import pytest
import torch
from _reference import per_task_meta_loss
from torch import nn

from torch_metasgd import MetaSGD, meta_loss

DTYPE = torch.float64
mse = nn.functional.mse_loss


def _mlp_with(layer: nn.Module, width: int = 6) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), layer, nn.Tanh(), nn.Linear(width, 1))


class _ConvThen(nn.Module):
    """A convolution, then ``norm`` on its (N, 4, 4, 4) output: normalizations of images."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = norm
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        h = self.conv(x.view(-1, 1, 4, 4))
        return self.head(torch.tanh(self.norm(h)).flatten(1))


class _Sequence(nn.Module):
    """A sequence model over (N, 4, 4) inputs: 4 steps of 4 features."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        h = self.body(x.view(-1, 4, 4))
        return self.head(h[0] if isinstance(h, tuple) else h).mean(1)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x)[0]


class _Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.embedding((x[:, 0].abs() * 3).long().clamp(max=7))))


def _tracked_instance_norm_eval() -> nn.Module:
    model = _ConvThen(nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.5, 2)
    return model.eval()


#: The layers of issue 25's list, with the inputs' features: 4 (an MLP's) or 16.
LAYERS = {
    "LayerNorm": (lambda: _mlp_with(nn.LayerNorm(6)), 4),
    "LayerNorm-no-affine": (lambda: _mlp_with(nn.LayerNorm(6, elementwise_affine=False)), 4),
    "LayerNorm-images": (lambda: _ConvThen(nn.LayerNorm([4, 4, 4])), 16),
    "GroupNorm": (lambda: _mlp_with(nn.GroupNorm(2, 6)), 4),
    "GroupNorm-images": (lambda: _ConvThen(nn.GroupNorm(2, 4)), 16),
    "RMSNorm": (lambda: _mlp_with(nn.RMSNorm(6)), 4),
    "InstanceNorm-affine": (lambda: _ConvThen(nn.InstanceNorm2d(4, affine=True)), 16),
    "InstanceNorm": (lambda: _ConvThen(nn.InstanceNorm2d(4)), 16),
    "InstanceNorm-tracked-eval": (_tracked_instance_norm_eval, 16),
    "BatchNorm1d": (lambda: _mlp_with(nn.BatchNorm1d(6)), 4),
    "MultiheadAttention": (lambda: _Sequence(_Attention()), 16),
    "TransformerEncoderLayer": (
        lambda: _Sequence(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)),
        16,
    ),
    "Embedding": (_Embedding, 4),
    "GELU": (lambda: _mlp_with(nn.GELU()), 4),
    "GELU-tanh": (lambda: _mlp_with(nn.GELU("tanh")), 4),
    "SiLU": (lambda: _mlp_with(nn.SiLU()), 4),
    "Mish": (lambda: _mlp_with(nn.Mish()), 4),
    "Dropout-eval": (lambda: _mlp_with(nn.Dropout(0.5)).eval(), 4),
}


def _problem(name: str, n_tasks: int = 3, seed: int = 0):
    make, features = LAYERS[name]
    torch.manual_seed(seed)
    model = make().to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    xs, xq = (torch.randn(n_tasks, 5, features, generator=g, dtype=DTYPE) for _ in range(2))
    ys, yq = (torch.randn(n_tasks, 5, 1, generator=g, dtype=DTYPE) for _ in range(2))
    return model, opt, (xs, ys), (xq, yq)


def _assert_close_in_norm(actual, expected, rtol=1e-9):
    """Every tensor within ``rtol`` of the norm of all of them (a gradient that is 0
    analytically, such as a bias before a normalization, is rounding noise)."""
    scale = torch.cat([e.flatten() for e in expected]).norm()
    for a, e in zip(actual, expected, strict=True):
        assert torch.linalg.vector_norm(a - e) <= rtol * scale, (a - e).abs().max()


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_second_order_meta_gradient_through_common_layers_matches_autograd_per_task(
    layer, strategy
):
    model, opt, support, query = _problem(layer)
    wrt = [*model.parameters(), *opt.meta_parameters()]
    loss = meta_loss(model, opt, mse, support, query, steps=2, strategy=strategy)
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = per_task_meta_loss(model, opt, mse, support, query, steps=2)
        expected_grads = torch.autograd.grad(
            expected, wrt, allow_unused=True, materialize_grads=True
        )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    _assert_close_in_norm(grads, expected_grads)


@pytest.mark.parametrize(
    "layer", ["LayerNorm", pytest.param("InstanceNorm-affine", marks=pytest.mark.slow)]
)
def test_compiled_meta_loss_through_a_normalization_matches_autograd_per_task(layer):
    # Compiled, every strategy runs as vmap; aot_eager compiles no kernels.
    torch._dynamo.reset()
    model, opt, support, query = _problem(layer)
    wrt = [*model.parameters(), *opt.meta_parameters()]
    compiled = torch.compile(meta_loss, backend="aot_eager")
    loss = compiled(model, opt, mse, support, query, strategy="loop")
    grads = torch.autograd.grad(loss, wrt)
    expected = per_task_meta_loss(model, opt, mse, support, query)
    _assert_close_in_norm(grads, torch.autograd.grad(expected, wrt))
    torch._dynamo.reset()
