"""The arithmetic of a Meta-SGD step (``torch_metasgd._kernels``).

``sgd_direction`` is checked against torch.optim.SGD itself (one SGD step with
``lr=1`` moves a parameter by exactly ``-d``) and against the algorithm as the
torch.optim.SGD documentation writes it; ``effective_lr`` against a
hand-written clamp and finite differences; the in-place step against the
update rule written out.
"""

from __future__ import annotations

import pytest
import torch
from _reference import ref_phi
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_metasgd._kernels import effective_lr, metasgd, sgd_direction
from torch_metasgd._parametrizations import PARAMETRIZATIONS as PHI

PARAMETRIZATIONS = ["identity", "log", "softplus"]


@st.composite
def sgd_options(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    return dict(
        weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        momentum=momentum,
        dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.5])),
        nesterov=nesterov,
        maximize=draw(st.booleans()),
    )


# --------------------------------------------------------------------------
# sgd_direction
# --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    options=sgd_options(),
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_sgd_direction_is_torch_sgd_step_with_unit_lr(options, shape, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=1.0, foreach=False, **options)
    theta, buf = p.detach().clone(), None
    for _ in range(4):
        grad = torch.randn(shape, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        before = p.detach().clone()
        sgd.step()
        d, buf = sgd_direction(theta, grad, buf, **options)
        torch.testing.assert_close(d, before - p.detach(), rtol=1e-12, atol=1e-12)
        if options["momentum"] != 0:
            torch.testing.assert_close(buf, sgd.state[p]["momentum_buffer"], rtol=1e-12, atol=1e-12)
        else:
            assert buf is None
        theta = p.detach().clone()


def ref_direction(param, grad, buf, *, weight_decay, momentum, dampening, nesterov, maximize):
    """torch.optim.SGD's algorithm as its documentation writes it."""
    g = -grad if maximize else grad
    g = g + weight_decay * param
    if momentum == 0:
        return g, None
    b = g if buf is None else momentum * buf + (1 - dampening) * g
    return (g + momentum * b if nesterov else b), b


@settings(max_examples=40, deadline=None)
@given(options=sgd_options(), seed=st.integers(0, 2**31 - 1))
def test_sgd_direction_matches_documented_algorithm(options, seed):
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(3, 2, generator=g, dtype=torch.float64)
    buf = ref_buf = None
    for _ in range(3):
        grad = torch.randn(3, 2, generator=g, dtype=torch.float64)
        d, buf = sgd_direction(param, grad, buf, **options)
        ref_d, ref_buf = ref_direction(param, grad, ref_buf, **options)
        torch.testing.assert_close(d, ref_d, rtol=1e-14, atol=1e-14)
        if ref_buf is None:
            assert buf is None
        else:
            torch.testing.assert_close(buf, ref_buf, rtol=1e-14, atol=1e-14)
        param = param - 0.1 * d


def test_sgd_direction_leaves_inputs_untouched():
    param, grad, buf = torch.randn(4), torch.randn(4), torch.randn(4)
    copies = param.clone(), grad.clone(), buf.clone()
    options = dict(weight_decay=0.1, momentum=0.9, dampening=0.0, nesterov=True, maximize=True)
    sgd_direction(param, grad, buf, **options)
    for tensor, copy in zip((param, grad, buf), copies, strict=True):
        assert torch.equal(tensor, copy)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_direction_gradient_matches_finite_differences(nesterov):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in "pgb"]
    options = dict(
        weight_decay=0.2,
        momentum=0.7,
        dampening=0.0 if nesterov else 0.3,
        nesterov=nesterov,
        maximize=False,
    )

    def direction_and_buffer(param, grad, buf):
        return sgd_direction(param, grad, buf, **options)

    assert torch.autograd.gradcheck(direction_and_buffer, inputs)


# --------------------------------------------------------------------------
# effective_lr
# --------------------------------------------------------------------------


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize(
    "lr_min, lr_max", [(None, None), (0.05, None), (None, 0.2), (0.05, 0.2), (0.1, 0.1)]
)
def test_effective_lr_is_clamped_scaled_multiplier(parametrization, lr_min, lr_max):
    s = torch.linspace(-3, 3, 25, dtype=torch.float64)
    lr = 0.1
    expected = lr * ref_phi(s, parametrization)
    if lr_min is not None:
        expected = torch.where(expected < lr_min, torch.full_like(expected, lr_min), expected)
    if lr_max is not None:
        expected = torch.where(expected > lr_max, torch.full_like(expected, lr_max), expected)
    got = effective_lr(s, lr, PHI[parametrization], lr_min, lr_max)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    if lr_min is not None:
        assert got.min() >= lr_min
    if lr_max is not None:
        assert got.max() <= lr_max


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_effective_lr_gradient_matches_finite_differences(parametrization):
    # Unclamped points, bounds far from them: the clamp passes the gradient through.
    s = torch.tensor([0.3, 0.7, 1.1, 1.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s: effective_lr(s, 0.25, PHI[parametrization], 1e-6, 1e3), (s,)
    )


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_effective_lr_gradient_at_a_bound_passes_only_inward(parametrization, sign):
    # s = -4 puts alpha below lr_min, s = 4 above lr_max, the last one at alpha = 1, inside.
    inside = PHI[parametrization].inverse(torch.tensor(1.0, dtype=torch.float64))
    s = torch.tensor([-4.0, 4.0, inside.item()], dtype=torch.float64, requires_grad=True)
    eff = effective_lr(s, 1.0, PHI[parametrization], lr_min=0.5, lr_max=1.5)
    torch.testing.assert_close(
        eff.detach(), ref_phi(s.detach(), parametrization).clamp(0.5, 1.5), rtol=1e-15, atol=0
    )
    (grad,) = torch.autograd.grad(eff, s, grad_outputs=torch.full((3,), sign, dtype=s.dtype))
    (unclamped,) = torch.autograd.grad(ref_phi(s, parametrization), s, torch.full_like(s, sign))
    # A descent step moves alpha by -grad: at lr_min a negative gradient
    # brings it back inside, at lr_max a positive one; inside it always passes.
    expected = unclamped.clone()
    if sign > 0:
        expected[0] = 0.0
    else:
        expected[1] = 0.0
    torch.testing.assert_close(grad, expected, rtol=1e-15, atol=0)


def test_effective_lr_with_bounds_and_no_graph_is_the_plain_clamp():
    s = torch.tensor([-4.0, 0.1, 4.0], dtype=torch.float64)
    with torch.no_grad():
        eff = effective_lr(s, 1.0, PHI["log"], lr_min=0.5, lr_max=1.5)
    torch.testing.assert_close(eff, s.exp().clamp(0.5, 1.5), rtol=1e-15, atol=0)


# --------------------------------------------------------------------------
# metasgd (the in-place step)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_metasgd_step_is_minus_effective_lr_times_direction(foreach):
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 2), (4,), ()]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    # One per-element, one per-tensor, one scalar step size.
    steps = [
        torch.rand(3, 2, generator=g, dtype=torch.float64) - 0.5,
        torch.tensor(0.4, dtype=torch.float64),
        torch.tensor(-0.2, dtype=torch.float64),
    ]
    options = dict(weight_decay=0.1, momentum=0.9, dampening=0.0, nesterov=True, maximize=False)
    buffers = [None, None, None]
    originals = [p.clone() for p in params]
    expected = []
    for p, grad, s in zip(params, grads, steps, strict=True):
        d, _ = ref_direction(p, grad, None, **options)
        expected.append(p - (0.3 * torch.exp(s)).clamp(0.05, 0.4) * d)
    metasgd(
        params,
        grads,
        buffers,
        steps,
        lr=0.3,
        parametrization="log",
        lr_min=0.05,
        lr_max=0.4,
        foreach=foreach,
        **options,
    )
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-14, atol=1e-14)
    # First step: every momentum buffer is the weight-decayed gradient.
    for buf, p0, grad in zip(buffers, originals, grads, strict=True):
        torch.testing.assert_close(buf, grad + 0.1 * p0, rtol=1e-14, atol=1e-14)
