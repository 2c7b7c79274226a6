"""Half-precision models (bfloat16, float16) in every differentiable path.

The step sizes of a half-precision parameter are float32 (master weights).
References: the in-place ``MetaSGD.step()`` on a copy (the adapted weights,
in the parameter's dtype), and the same meta-gradient computed on a float32
copy of the model (the half-precision one agrees to its rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_metasgd import (
    MetaSGD,
    StepSizeTuner,
    adapt,
    adapt_tasks,
    inner_loop,
    meta_loss,
    reptile_loss,
)

HALF = [torch.bfloat16, torch.float16]
STRATEGIES = ["vmap", "loop", "grouped"]
mse = nn.functional.mse_loss


def _problem(dtype, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    opt = MetaSGD(model.parameters(), lr=0.5, momentum=0.5, weight_decay=0.01)
    opt.uniform_step_sizes_(0.05, 0.2, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 16, 3, generator=g)
    y = torch.sin(x.sum(-1, keepdim=True))
    return (
        model,
        opt,
        (x[:, :8].to(dtype), y[:, :8].to(dtype)),
        (x[:, 8:].to(dtype), y[:, 8:].to(dtype)),
    )


def _stepped_in_place(model, opt, x, y, steps):
    """``steps`` of MetaSGD.step() on copies of the model and the optimizer."""
    work, work_opt = copy.deepcopy((model, opt))
    for _ in range(steps):
        work_opt.zero_grad()
        mse(work(x), y).backward()
        work_opt.step()
    return dict(work.named_parameters())


def _assert_same_to_rounding(actual, expected):
    """The same dtype, and equal to a few roundings at the tensor's scale (the support
    gradients are computed in half precision, in another order)."""
    assert actual.dtype == expected.dtype
    error = (actual.detach() - expected.detach()).abs().max()
    assert error <= 2 * torch.finfo(expected.dtype).eps * expected.detach().abs().max()


@pytest.mark.parametrize("dtype", HALF)
def test_adapted_weights_keep_the_parameter_dtype_and_equal_the_in_place_step(dtype):
    model, opt, (xs, ys), _ = _problem(dtype)
    expected = [_stepped_in_place(model, opt, xs[t], ys[t], 2) for t in range(3)]
    for strategy in STRATEGIES:
        fast = adapt_tasks(model, opt, mse, (xs, ys), steps=2, strategy=strategy)
        for name, p in fast.items():
            _assert_same_to_rounding(p, torch.stack([e[name] for e in expected]))
    for t in range(3):
        for name, p in adapt(model, opt, mse, xs[t], ys[t], steps=2).items():
            _assert_same_to_rounding(p, expected[t][name])
        with inner_loop(model, opt) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(mse(fmodel(xs[t]), ys[t]))
            for p, (name, _) in zip(fmodel.parameters(), model.named_parameters(), strict=True):
                _assert_same_to_rounding(p, expected[t][name])


def _float32_twin(model, opt):
    twin, twin_opt = copy.deepcopy((model, opt))
    twin.float()  # the step sizes follow the parameters, as the same float32 tensors
    return twin, twin_opt


def _assert_reaches_float32_step_sizes(step_sizes, grads, expected):
    """float32 gradients on every step size, the float32 model's to half-precision rounding."""
    for s, g, e in zip(step_sizes, grads, expected, strict=True):
        assert s.dtype == torch.float32 and g is not None and g.dtype == torch.float32
        assert torch.linalg.vector_norm(g - e) <= 0.05 * torch.linalg.vector_norm(e)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", HALF)
def test_meta_loss_reaches_the_float32_step_sizes(dtype, strategy):
    model, opt, support, query = _problem(dtype)
    loss = meta_loss(model, opt, mse, support, query, steps=2, strategy=strategy)
    assert loss.dtype == dtype
    grads = torch.autograd.grad(loss, opt.meta_parameters())
    twin, twin_opt = _float32_twin(model, opt)
    as_float = [tuple(t.float() for t in pair) for pair in (support, query)]
    twin_loss = meta_loss(twin, twin_opt, mse, *as_float, steps=2, strategy=strategy)
    expected = torch.autograd.grad(twin_loss, twin_opt.meta_parameters())
    _assert_reaches_float32_step_sizes(opt.meta_parameters(), grads, expected)


@pytest.mark.parametrize("dtype", HALF)
def test_reptile_loss_and_inner_loop_reach_the_float32_step_sizes(dtype):
    model, opt, support, query = _problem(dtype)
    twin, twin_opt = _float32_twin(model, opt)
    as_float = [tuple(t.float() for t in pair) for pair in (support, query)]
    reptile_loss(model, opt, mse, support, query, steps=2).backward()
    reptile_loss(twin, twin_opt, mse, *as_float, steps=2).backward()
    step_sizes = opt.meta_parameters()
    expected = [s.grad for s in twin_opt.meta_parameters()]
    _assert_reaches_float32_step_sizes(step_sizes, [s.grad for s in step_sizes], expected)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert p.grad.dtype == dtype
        assert torch.linalg.vector_norm(p.grad.float() - q.grad) <= 0.05 * q.grad.norm()

    def inner_loop_grads(model, opt, support, query):
        with inner_loop(model, opt) as (fmodel, diffopt):
            diffopt.step(mse(fmodel(support[0][0]), support[1][0]))
            loss = mse(fmodel(query[0][0]), query[1][0])
        return torch.autograd.grad(loss, opt.meta_parameters())

    _assert_reaches_float32_step_sizes(
        step_sizes,
        inner_loop_grads(model, opt, support, query),
        inner_loop_grads(twin, twin_opt, *as_float),
    )


@pytest.mark.parametrize("dtype", HALF)
def test_lookahead_updates_the_float32_step_sizes_of_a_half_precision_model(dtype):
    model, opt, (xs, ys), (xq, yq) = _problem(dtype)
    before = [s.detach().clone() for s in opt.meta_parameters()]
    lookahead = StepSizeTuner(
        model, opt, lambda m, b: mse(m(b[0]), b[1]), (xq[0], yq[0]), every=2, unroll=2
    )
    for t in range(2):
        assert lookahead.step((xs[t], ys[t])) is None or t == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, opt.meta_parameters(), strict=True))
    assert all(s.dtype == torch.float32 for s in opt.meta_parameters())
