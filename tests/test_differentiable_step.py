"""``MetaSGD(..., differentiable=True)``: a step that autograd differentiates.

As ``torch.optim.SGD(differentiable=True)``: the step runs with autograd on,
on non-leaf parameters (copies of a model's weights), so that a loss after
the steps is differentiable in the weights, the gradients, the momentum
buffers, a tensor ``lr`` and the step sizes. Checked with ``gradcheck`` (the
method of torch's ``TestDifferentiableOptimizer``) and, as a way to
meta-learn, against the Meta-SGD meta-gradient written out by hand in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.nn import functional as F

from torch_metasgd import MetaSGD

CASES = {
    "plain": dict(),
    "momentum": dict(momentum=0.9),
    "nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    "dampening-maximize": dict(momentum=0.5, dampening=0.3, maximize=True),
    "tensor-log": dict(granularity="tensor", parametrization="log", momentum=0.9),
    "softplus-bounds": dict(parametrization="softplus", lr_min=0.05, lr_max=5.0),
    "group-foreach": dict(granularity="group", momentum=0.9, foreach=True),
}


def _step(p, grad, s, buf, lr, options):
    """One step of a fresh optimizer whose state (as torch's tests set it) holds the inputs."""
    p = p.clone()
    p.grad = grad
    opt = MetaSGD([p], lr=lr, differentiable=True, **options)
    opt.state[p]["step_size"] = s.clone()
    if options.get("momentum", 0) != 0:
        opt.state[p]["momentum_buffer"] = buf.clone()
    opt.step()
    return (p, *(v for v in opt.state[p].values() if v.requires_grad))


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_a_differentiable_step_passes_gradcheck_in_every_input(options):
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, low=-1.0, high=1.0):
        x = low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)
        return x.requires_grad_()

    shape = (3, 2)
    scalar = options.get("granularity") in ("tensor", "group")
    s = leaf(*(() if scalar else shape), low=0.5, high=1.5)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    inputs = (leaf(*shape), leaf(*shape), s, leaf(*shape), lr)
    assert gradcheck(lambda *x: _step(*x, options), inputs)


def test_step_sizes_shared_with_a_differentiable_optimizer_get_the_meta_sgd_meta_gradient():
    """MAML with learned step sizes, two inner steps with momentum: the fast weights step in
    place in a differentiable MetaSGD whose state holds the outer optimizer's step sizes."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.5).uniform_step_sizes_(0.05, 0.15)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    xq, yq = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]

    fast = [p.clone() for p in model.parameters()]
    inner = MetaSGD(fast, lr=0.1, momentum=0.5, differentiable=True)
    for p, q in zip(model.parameters(), fast, strict=True):
        inner.state[q]["step_size"] = opt.step_size(p)
    for _ in range(2):
        loss = F.mse_loss(functional_call(model, dict(zip(names, fast, strict=True)), (x,)), y)
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        for q, grad in zip(fast, grads, strict=True):
            q.grad = grad
        inner.step()
    query = F.mse_loss(functional_call(model, dict(zip(names, fast, strict=True)), (xq,)), yq)
    actual = torch.autograd.grad(query, [*model.parameters(), *opt.meta_parameters()])

    # Written out: theta_k = theta_{k-1} - alpha * b_k, b_k = 0.5 b_{k-1} + g_k (b_1 = g_1).
    theta = list(model.parameters())
    alphas = [0.1 * s for s in opt.meta_parameters()]
    buffers = [None, None]
    for _ in range(2):
        loss = F.mse_loss(functional_call(model, dict(zip(names, theta, strict=True)), (x,)), y)
        grads = torch.autograd.grad(loss, theta, create_graph=True)
        buffers = [g if b is None else 0.5 * b + g for b, g in zip(buffers, grads, strict=True)]
        theta = [t - a * b for t, a, b in zip(theta, alphas, buffers, strict=True)]
    query = F.mse_loss(functional_call(model, dict(zip(names, theta, strict=True)), (xq,)), yq)
    expected = torch.autograd.grad(query, [*model.parameters(), *opt.meta_parameters()])
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


def test_differentiable_rejects_what_cannot_have_a_graph():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="`fused` does not support `differentiable`"):
        MetaSGD([p], fused=True, differentiable=True)
    with pytest.raises(ValueError, match="hypergrad_lr value: 0.1 with differentiable=True"):
        MetaSGD([p], hypergrad_lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match="non-leaf"):
        MetaSGD([p * 2])
    MetaSGD([p * 2], differentiable=True)
