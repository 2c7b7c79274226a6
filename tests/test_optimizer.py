"""``MetaSGD``, the torch.optim optimizer.

Trajectories are compared with torch.optim.SGD run on the same gradients; the
step with learned step sizes, ``effective_lr`` and its gradient with the update
rule written out here and with finite differences. Equality with SGD is to
float rounding: MetaSGD computes ``p + (-lr * d) * s`` with ``addcmul`` where
SGD's ``add_`` may fuse the multiply-add.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _options import GRANULARITIES, PARAMETRIZATIONS, SGD_KEYS, SGD_VALUES, sgd_cases
from _options import options as metasgd_options
from _reference import ref_phi
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from torch_metasgd import MetaSGD

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-13, atol=1e-13)}


def ref_alpha(s, lr, parametrization, lr_min=None, lr_max=None):
    """The effective step size, written out: clamp(lr * phi(s), lr_min, lr_max)."""
    alpha = lr * ref_phi(s, parametrization)
    if lr_min is not None:
        alpha = torch.maximum(alpha, torch.tensor(lr_min, dtype=alpha.dtype))
    if lr_max is not None:
        alpha = torch.minimum(alpha, torch.tensor(lr_max, dtype=alpha.dtype))
    return alpha


def random_leaves(shapes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def run(opt, params, steps, *, seed=0, scheduler=None):
    """Step ``opt`` on gradients ``noise_t + 0.3 p``; the parameters after each step."""
    g = torch.Generator().manual_seed(seed)
    trajectory = []
    for _ in range(steps):
        for p in params:
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            noise = noise.to(device=p.device, dtype=p.dtype)
            p.grad = noise + 0.3 * p.detach()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def assert_same_trajectory(actual, expected, dtype=torch.float64):
    assert len(actual) == len(expected)
    for step_actual, step_expected in zip(actual, expected, strict=True):
        for a, e in zip(step_actual, step_expected, strict=True):
            torch.testing.assert_close(a, e, **TOL[dtype])


def set_step_sizes(opt, seed=0, low=0.5, high=1.5):
    """Distinct step sizes, so that every element's update is informative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in opt.meta_parameters():
            s.copy_(low + (high - low) * torch.rand(s.shape, generator=g, dtype=s.dtype))


# --------------------------------------------------------------------------
# Same trajectory as torch.optim.SGD
# --------------------------------------------------------------------------

SGD_CASES = sgd_cases()


@pytest.mark.parametrize("options", SGD_CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_matches_torch_sgd_trajectory(options):
    shapes = [(3, 4), (4,), ()]
    meta_params, sgd_params = random_leaves(shapes), random_leaves(shapes)
    metasgd = MetaSGD(meta_params, lr=0.1, **options)
    sgd = torch.optim.SGD(sgd_params, lr=0.1, **options)
    assert_same_trajectory(run(metasgd, meta_params, 5), run(sgd, sgd_params, 5))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("foreach", [False, True])
def test_untouched_step_sizes_give_torch_sgd_trajectory(granularity, parametrization, foreach):
    shapes = [(2, 3), (5,), ()]
    options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=foreach)
    meta_params, sgd_params = random_leaves(shapes), random_leaves(shapes)
    metasgd = MetaSGD(
        meta_params, granularity=granularity, parametrization=parametrization, **options
    )
    sgd = torch.optim.SGD(sgd_params, **options)
    assert_same_trajectory(run(metasgd, meta_params, 5), run(sgd, sgd_params, 5))


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    ],
    ids=["StepLR", "ExponentialLR"],
)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_lr_scheduler_scales_step_like_torch_sgd(make_scheduler, parametrization):
    shapes = [(3, 2), (2,)]
    meta_params, sgd_params = random_leaves(shapes), random_leaves(shapes)
    metasgd = MetaSGD(meta_params, lr=0.2, momentum=0.5, parametrization=parametrization)
    sgd = torch.optim.SGD(sgd_params, lr=0.2, momentum=0.5)
    expected = run(sgd, sgd_params, 6, scheduler=make_scheduler(sgd))
    actual = run(metasgd, meta_params, 6, scheduler=make_scheduler(metasgd))
    assert_same_trajectory(actual, expected)
    lr_now = sgd.param_groups[0]["lr"]
    assert metasgd.param_groups[0]["lr"] == lr_now != 0.2
    for p in meta_params:
        torch.testing.assert_close(
            metasgd.effective_lr(p), torch.full(p.shape, lr_now, dtype=p.dtype), rtol=1e-15, atol=0
        )


def group_options():
    return metasgd_options(
        lr=st.floats(1e-3, 0.5), keys=(*SGD_VALUES, "granularity", "parametrization")
    )


@st.composite
def problems(draw):
    """Initial parameter values, split into 1-3 groups, each with its own options."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n_groups = draw(st.integers(1, 3))
    groups = []
    for _ in range(n_groups):
        arrays = draw(
            st.lists(
                hnp.arrays(
                    "float64",
                    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
                    elements=st.floats(-10, 10, width=64),
                ),
                min_size=1,
                max_size=3,
            )
        )
        groups.append(([torch.tensor(a, dtype=dtype) for a in arrays], draw(group_options())))
    return dtype, groups


def build(cls, groups, use_add_param_group, keys):
    params = [[t.clone().requires_grad_() for t in tensors] for tensors, _ in groups]
    specs = [
        {"params": ps, **{k: v for k, v in options.items() if k in keys}}
        for ps, (_, options) in zip(params, groups, strict=True)
    ]
    if use_add_param_group:
        opt = cls(specs[:1])
        for spec in specs[1:]:
            opt.add_param_group(spec)
    else:
        opt = cls(specs)
    return opt, [p for ps in params for p in ps]


@settings(max_examples=60, deadline=None)
@given(
    problem=problems(),
    use_add_param_group=st.booleans(),
    scheduler=st.sampled_from([None, "StepLR", "ExponentialLR"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_param_groups_and_schedulers_match_torch_sgd(problem, use_add_param_group, scheduler, seed):
    dtype, groups = problem
    metasgd, meta_params = build(
        MetaSGD, groups, use_add_param_group, (*SGD_KEYS, "granularity", "parametrization")
    )
    sgd, sgd_params = build(torch.optim.SGD, groups, use_add_param_group, SGD_KEYS)

    def make_scheduler(opt):
        if scheduler == "StepLR":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
        if scheduler == "ExponentialLR":
            return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
        return None

    expected = run(sgd, sgd_params, 4, seed=seed, scheduler=make_scheduler(sgd))
    actual = run(metasgd, meta_params, 4, seed=seed, scheduler=make_scheduler(metasgd))
    assert_same_trajectory(actual, expected, dtype)


# --------------------------------------------------------------------------
# Learned step sizes: effective_lr and the update it makes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("bounds", [(None, None), (0.08, 0.12)])
def test_effective_lr_shape_and_value(granularity, parametrization, bounds):
    params = random_leaves([(3, 2), (4,), ()])
    opt = MetaSGD(
        params,
        lr=0.1,
        granularity=granularity,
        parametrization=parametrization,
        lr_min=bounds[0],
        lr_max=bounds[1],
    )
    set_step_sizes(opt, seed=1, low=-0.5, high=1.5)
    expected_shape = {"element": None, "tensor": (), "group": ()}[granularity]
    for p in params:
        eff = opt.effective_lr(p)
        assert eff.shape == (p.shape if expected_shape is None else expected_shape)
        assert eff.dtype == p.dtype
        torch.testing.assert_close(
            eff,
            ref_alpha(opt.step_size(p).detach(), 0.1, parametrization, *bounds),
            rtol=1e-14,
            atol=0,
        )
    if granularity == "group":
        assert opt.step_size(params[0]) is opt.step_size(params[1]) is opt.step_size(params[2])


def test_effective_lr_of_a_foreign_tensor_raises():
    opt = MetaSGD(random_leaves([(2,)]), lr=0.1)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.effective_lr(torch.zeros(2))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bounds", [(None, None), (0.1, 0.2)])
def test_step_with_learned_step_sizes_matches_update_rule(
    granularity, parametrization, foreach, bounds
):
    shapes = [(3, 2), (4,), ()]
    params = random_leaves(shapes, seed=2)
    options = dict(momentum=0.8, dampening=0.2, weight_decay=0.05)
    opt = MetaSGD(
        params,
        lr=0.15,
        foreach=foreach,
        granularity=granularity,
        parametrization=parametrization,
        lr_min=bounds[0],
        lr_max=bounds[1],
        **options,
    )
    set_step_sizes(opt, seed=3, low=-0.7, high=1.5)
    alphas = [ref_alpha(opt.step_size(p).detach(), 0.15, parametrization, *bounds) for p in params]
    thetas = [p.detach().clone() for p in params]
    buffers = [None] * len(params)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        opt.step()
        for i, grad in enumerate(grads):
            d = grad + 0.05 * thetas[i]
            buffers[i] = d if buffers[i] is None else 0.8 * buffers[i] + 0.8 * d
            thetas[i] = thetas[i] - alphas[i] * buffers[i]
        for p, theta in zip(params, thetas, strict=True):
            torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-12)


def test_changing_one_step_size_changes_only_its_element_by_the_formula():
    p = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    grad = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
    opt = MetaSGD([p], lr=0.1, parametrization="log")
    with torch.no_grad():
        opt.step_size(p)[1] = 0.7
    p.grad = grad
    opt.step()
    # Element 1 moves by lr * exp(0.7) * grad, the others by lr * grad.
    expected = torch.tensor(
        [1.0 - 0.1 * 0.5, -2.0 - 0.1 * math.exp(0.7) * 0.25, 3.0 + 0.1], dtype=torch.float64
    )
    torch.testing.assert_close(p.detach(), expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_effective_lr_gradient_reaches_step_size(granularity, parametrization):
    params = random_leaves([(2, 3), (3,)])
    opt = MetaSGD(
        params,
        lr=0.3,
        granularity=granularity,
        parametrization=parametrization,
        lr_min=1e-6,
        lr_max=1e3,
    )
    set_step_sizes(opt, seed=5, low=0.2, high=1.2)
    for p in params:
        s = opt.step_size(p)
        # gradcheck perturbs its input in place; the input is the live step size
        # itself, so both the numerical and the analytical Jacobian go through
        # opt.effective_lr.
        assert torch.autograd.gradcheck(lambda s, p=p: opt.effective_lr(p), (s,))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_meta_parameters_are_step_size_leaves_in_parameter_order(granularity):
    first = random_leaves([(2, 3), (4,)], dtype=torch.float64)
    second = random_leaves([(5,), (1, 2)], dtype=torch.float32)
    opt = MetaSGD(
        [{"params": first}, {"params": second, "granularity": "element"}],
        lr=0.1,
        granularity=granularity,
    )
    metas = opt.meta_parameters()
    if granularity == "group":
        owners = [(first[0], ()), *((p, p.shape) for p in second)]
    elif granularity == "tensor":
        owners = [(first[0], ()), (first[1], ()), *((p, p.shape) for p in second)]
    else:
        owners = [(p, p.shape) for p in [*first, *second]]
    assert len(metas) == len(owners)
    for s, (p, shape) in zip(metas, owners, strict=True):
        assert s is opt.step_size(p)
        assert s.is_leaf and s.requires_grad and s.grad is None
        assert s.dtype == p.dtype and s.device == p.device
        assert s.shape == shape
    if granularity == "group":
        assert opt.step_size(first[1]) is metas[0]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("low, high", [(0.005, 0.1), (0.3, 0.3), (1e-4, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_step_sizes_lie_in_range(granularity, parametrization, low, high, dtype):
    params = random_leaves([(20, 10), (30,), ()], dtype=dtype)
    # lr=1e-3 asks for multipliers up to 2000: phi^-1 must not overflow.
    opt = MetaSGD(
        [{"params": params[:2]}, {"params": params[2:], "lr": 1e-3}],
        lr=0.7,
        granularity=granularity,
        parametrization=parametrization,
    )
    metas = opt.meta_parameters()
    assert opt.uniform_step_sizes_(low, high, generator=torch.Generator().manual_seed(0)) is opt
    assert all(s is t for s, t in zip(opt.meta_parameters(), metas, strict=True))
    effective = torch.cat([opt.effective_lr(p).detach().flatten() for p in params])
    # The draw goes through phi^-1 and back: allow for rounding.
    slack = 4 * torch.finfo(dtype).eps
    assert effective.min() >= low * (1 - slack) and effective.max() <= high * (1 + slack)
    if low < high and granularity == "element":
        assert effective.unique().numel() > 100


def test_uniform_step_sizes_follow_generator():
    params = random_leaves([(3, 3)])
    opt = MetaSGD(params, lr=0.1)
    opt.uniform_step_sizes_(0.01, 0.1, generator=torch.Generator().manual_seed(7))
    first = opt.meta_parameters()[0].detach().clone()
    opt.uniform_step_sizes_(0.01, 0.1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, opt.meta_parameters()[0])


@pytest.mark.parametrize(
    "parametrization, low, high",
    [
        ("identity", 0.2, 0.1),
        ("identity", math.nan, 0.1),
        ("identity", 0.1, math.inf),
        ("identity", -math.inf, 0.1),
        ("log", 0.0, 0.1),
        ("softplus", -0.1, 0.1),
    ],
)
def test_uniform_step_sizes_rejects_bad_range(parametrization, low, high):
    params = random_leaves([(3,)])
    opt = MetaSGD(params, lr=0.1, parametrization=parametrization)
    set_step_sizes(opt)
    before = opt.meta_parameters()[0].detach().clone()
    with pytest.raises(ValueError, match=str(low)):
        opt.uniform_step_sizes_(low, high)
    assert torch.equal(opt.meta_parameters()[0], before)


# --------------------------------------------------------------------------
# foreach, missing gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("momentum, nesterov", [(0, False), (0.9, False), (0.9, True)])
def test_foreach_and_single_tensor_paths_agree(granularity, parametrization, momentum, nesterov):
    def make(foreach):
        # Mixed dtypes: the foreach path groups tensors by dtype.
        params = random_leaves([(3, 4), (5,)]) + random_leaves(
            [(2, 2), ()], seed=1, dtype=torch.float32
        )
        opt = MetaSGD(
            params,
            lr=0.1,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=0.01,
            maximize=True,
            foreach=foreach,
            granularity=granularity,
            parametrization=parametrization,
            lr_min=0.02,
            lr_max=0.15,
        )
        set_step_sizes(opt, seed=2, low=-1.0, high=1.5)
        return opt, params

    single, single_params = make(False)
    multi, multi_params = make(True)
    assert_same_trajectory(
        run(multi, multi_params, 4), run(single, single_params, 4), torch.float32
    )
    for p, q in zip(single_params, multi_params, strict=True):
        if single.state[p].get("momentum_buffer") is not None:
            torch.testing.assert_close(
                multi.state[q]["momentum_buffer"], single.state[p]["momentum_buffer"]
            )


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_parameter_without_grad_is_skipped(foreach, granularity):
    used, unused = random_leaves([(3,), (2,)])
    opt = MetaSGD([used, unused], lr=0.1, momentum=0.9, foreach=foreach, granularity=granularity)
    set_step_sizes(opt)
    sizes_before = [s.detach().clone() for s in opt.meta_parameters()]
    unused_before = unused.detach().clone()
    used_before = used.detach().clone()
    used.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert torch.equal(unused, unused_before)
    assert "momentum_buffer" not in opt.state[unused]
    assert not torch.equal(used, used_before)
    for s, before in zip(opt.meta_parameters(), sizes_before, strict=True):
        assert torch.equal(s, before)
    # A gradient that arrives later starts its own momentum from scratch.
    unused.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(
        unused.detach(), unused_before - ref_alpha(opt.step_size(unused).detach(), 0.1, "identity")
    )


@pytest.mark.parametrize(
    "options",
    [o for o in SGD_CASES if o["foreach"] is not None and o["momentum"]] + SGD_CASES[:4],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_step_leaves_gradients_untouched(options):
    params = random_leaves([(3, 2), (4,)])
    opt = MetaSGD(params, lr=0.1, **options)
    grads = [torch.randn_like(p) for p in params]
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad.clone()
    # Twice with the same .grad tensors: a momentum buffer aliasing .grad
    # would show up as a changed gradient after the second in-place update.
    for _ in range(2):
        opt.step()
        for p, grad in zip(params, grads, strict=True):
            assert torch.equal(p.grad, grad)


def test_deepcopy_of_model_and_optimizer_is_independent():
    params = random_leaves([(3, 2), (4,)])
    opt = MetaSGD(params, lr=0.1, momentum=0.9, granularity="tensor")
    set_step_sizes(opt)
    run(opt, params, 2)
    params_copy, opt_copy = copy.deepcopy((params, opt))
    assert all(
        s is not t for s, t in zip(opt.meta_parameters(), opt_copy.meta_parameters(), strict=True)
    )
    expected = run(opt, params, 2, seed=1)
    # The copy steps with its own step sizes, not the original's.
    with torch.no_grad():
        for s in opt.meta_parameters():
            s.fill_(100.0)
    assert_same_trajectory(run(opt_copy, params_copy, 2, seed=1), expected)


def test_step_returns_closure_loss_and_does_not_train_step_sizes():
    (p,) = random_leaves([(3,)])
    opt = MetaSGD([p], lr=0.1)
    before = opt.meta_parameters()[0].detach().clone()

    def closure():
        opt.zero_grad()
        loss = p.pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0
    assert torch.equal(opt.meta_parameters()[0], before)
    assert opt.meta_parameters()[0].grad is None


# --------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------


def trained_pair(granularity, parametrization, steps=3):
    """An optimizer with learned step sizes and momentum buffers, after ``steps`` steps."""
    params = random_leaves([(3, 2), (4,)], seed=8)
    opt = MetaSGD(
        [{"params": params[:1]}, {"params": params[1:], "lr": 0.05}],
        lr=0.1,
        momentum=0.9,
        granularity=granularity,
        parametrization=parametrization,
    )
    set_step_sizes(opt, seed=9)
    run(opt, params, steps, seed=10)
    return opt, params


def fresh_like(params, granularity, parametrization, **overrides):
    clones = [p.detach().clone().requires_grad_() for p in params]
    options = dict(lr=0.1, momentum=0.9, granularity=granularity, parametrization=parametrization)
    options.update(overrides)
    return MetaSGD([{"params": clones[:1]}, {"params": clones[1:], "lr": 0.05}], **options), clones


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_state_dict_round_trip_continues_trajectory(tmp_path, granularity, parametrization):
    opt, params = trained_pair(granularity, parametrization)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    loaded_params = [p.detach().clone().requires_grad_() for p in params]
    uninterrupted = run(opt, params, 3, seed=11)

    restored, restored_params = fresh_like(loaded_params, granularity, parametrization)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for p, q in zip(restored_params, params, strict=True):
        torch.testing.assert_close(restored.effective_lr(p), opt.effective_lr(q))
    assert_same_trajectory(run(restored, restored_params, 3, seed=11), uninterrupted)
    for p, q in zip(restored_params, params, strict=True):
        torch.testing.assert_close(
            restored.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"]
        )


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_load_state_dict_writes_into_live_step_sizes(granularity):
    source, params = trained_pair(granularity, "log")
    state = copy.deepcopy(source.state_dict())
    opt, opt_params = fresh_like(params, granularity, "log")
    live = opt.meta_parameters()
    live_of = [opt.step_size(p) for p in opt_params]
    opt.load_state_dict(state)
    after = opt.meta_parameters()
    assert len(after) == len(live)
    assert all(s is t for s, t in zip(after, live, strict=True))
    assert all(opt.step_size(p) is s for p, s in zip(opt_params, live_of, strict=True))
    for s, t in zip(after, source.meta_parameters(), strict=True):
        assert torch.equal(s, t)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_outer_optimizer_keeps_training_live_step_sizes_after_load(granularity):
    params = random_leaves([(3, 2), (4,)], seed=8)
    source, _ = fresh_like(params, granularity, "identity", momentum=0)
    set_step_sizes(source, seed=9)
    loaded = [s.detach().clone() for s in source.meta_parameters()]
    opt, opt_params = fresh_like(params, granularity, "identity", momentum=0)
    outer = torch.optim.SGD(opt.meta_parameters(), lr=1.0)
    opt.load_state_dict(copy.deepcopy(source.state_dict()))
    for s in opt.meta_parameters():
        s.grad = torch.full_like(s, 0.25)
    outer.step()
    before = [p.detach().clone() for p in opt_params]
    for p in opt_params:
        p.grad = torch.ones_like(p)
    opt.step()
    # The step uses the step sizes as the outer optimizer left them: loaded - 0.25.
    for p, b, lr, s in zip(opt_params, before, [0.1, 0.05], loaded, strict=True):
        torch.testing.assert_close(p.detach(), b - lr * (s - 0.25), rtol=1e-15, atol=1e-15)


def test_state_dict_is_loadable_with_weights_only(tmp_path):
    opt, _ = trained_pair("element", "softplus")
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    for index, state in opt.state_dict()["state"].items():
        assert torch.equal(loaded["state"][index]["step_size"], state["step_size"])
        assert torch.equal(loaded["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert loaded["param_groups"] == opt.state_dict()["param_groups"]


def snapshot(opt):
    return (
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        [s.detach().clone() for s in opt.meta_parameters()],
        {id(p): {k: v.clone() for k, v in entry.items()} for p, entry in opt.state.items()},
    )


def assert_unchanged(opt, snap):
    groups, sizes, state = snapshot(opt)
    assert groups == snap[0]
    assert all(torch.equal(a, b) for a, b in zip(sizes, snap[1], strict=True))
    assert state.keys() == snap[2].keys()
    for key in state:
        assert state[key].keys() == snap[2][key].keys()
        assert all(torch.equal(state[key][k], snap[2][key][k]) for k in state[key])


@pytest.mark.parametrize(
    "source_options, message",
    [
        (dict(granularity="tensor"), "granularity"),
        (dict(granularity="group"), "granularity"),
        (dict(parametrization="log"), "parametrization"),
    ],
)
def test_load_state_dict_rejects_mismatched_step_sizes(source_options, message):
    source, params = trained_pair(
        source_options.get("granularity", "element"),
        source_options.get("parametrization", "identity"),
    )
    opt, _ = trained_pair("element", "identity", steps=1)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(copy.deepcopy(source.state_dict()))
    assert_unchanged(opt, snap)


def test_load_state_dict_rejects_mismatched_shapes():
    source = MetaSGD(random_leaves([(3, 2), (4,)]), lr=0.1, momentum=0.9)
    run(source, source.param_groups[0]["params"], 1)
    params = random_leaves([(2, 3), (4,)])
    opt = MetaSGD(params, lr=0.1, momentum=0.9)
    run(opt, params, 1)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        opt.load_state_dict(copy.deepcopy(source.state_dict()))
    assert_unchanged(opt, snap)


def test_load_state_dict_rejects_different_number_of_groups():
    source, params = trained_pair("element", "identity")
    opt = MetaSGD([p.detach().clone().requires_grad_() for p in params], lr=0.1)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="groups"):
        opt.load_state_dict(copy.deepcopy(source.state_dict()))
    assert_unchanged(opt, snap)


def test_load_state_dict_rejects_different_group_size():
    source = MetaSGD(random_leaves([(3,), (3,)]), lr=0.1)
    params = random_leaves([(3,)])
    opt = MetaSGD(params, lr=0.1)
    set_step_sizes(opt)
    snap = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(copy.deepcopy(source.state_dict()))
    assert_unchanged(opt, snap)


def test_load_state_dict_fills_options_missing_from_older_checkpoints():
    source, params = trained_pair("element", "identity")
    state = copy.deepcopy(source.state_dict())
    for group in state["param_groups"]:
        for key in ("maximize", "foreach", "lr_min", "lr_max"):
            del group[key]
    opt, opt_params = fresh_like(params, "element", "identity")
    opt.load_state_dict(state)
    for group in opt.param_groups:
        assert group["maximize"] is False and group["foreach"] is None
        assert group["lr_min"] is None and group["lr_max"] is None
    assert_same_trajectory(run(opt, opt_params, 2, seed=12), run(source, params, 2, seed=12))


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(lr=-0.1), "-0.1"),
    (dict(lr=math.nan), "nan"),
    (dict(lr=math.inf), "inf"),
    (dict(momentum=-0.5), "-0.5"),
    (dict(weight_decay=-1e-3), "-0.001"),
    (dict(nesterov=True, momentum=0), "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
    (dict(granularity="layer"), "'layer'"),
    (dict(parametrization="exp"), "'exp'"),
    (dict(lr_min=0.5, lr_max=0.1), "lr_min=0.5 > lr_max=0.1"),
    (dict(lr_min=math.nan), "nan"),
    (dict(lr_min=math.inf), "lr_min value: inf"),
    (dict(lr_min=-math.inf), "lr_min value: -inf"),
    (dict(lr_max=math.inf), "lr_max value: inf"),
    (dict(lr_max=-0.1), "lr_max value: -0.1"),
    (dict(lr_max=0.0), "lr_max value: 0.0"),
    (dict(lr_max=-0.1, parametrization="log"), "lr_max value: -0.1"),
    (dict(lr_min=-0.1, parametrization="log"), "lr_min value: -0.1"),
    (dict(lr_min=-1e-3, parametrization="softplus"), "lr_min value: -0.001"),
    (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    (dict(lr="0.1"), "learning rate: 0.1"),
    (dict(momentum=None), "momentum value: None"),
    (dict(hypergrad_lr=True), "hypergrad_lr value: True"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_constructor_rejects_bad_option(options, message):
    with pytest.raises(ValueError, match=message):
        MetaSGD(random_leaves([(2,)]), **options)


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_constructor_rejects_bad_group_option(options, message):
    good, bad = random_leaves([(2,), (3,)])
    with pytest.raises(ValueError, match=message):
        MetaSGD([{"params": [good]}, {"params": [bad], **options}], lr=0.1)


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_add_param_group_rejects_bad_option_and_changes_nothing(options, message):
    opt, params = trained_pair("element", "identity", steps=1)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": random_leaves([(2,)]), **options})
    assert len(opt.param_groups) == 2
    assert_unchanged(opt, snap)
    run(opt, params, 1)


def test_rejects_non_leaf_parameter():
    leaf = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="non-leaf"):
        MetaSGD([leaf * 2], lr=0.1)
    opt = MetaSGD([leaf], lr=0.1)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="non-leaf"):
        opt.add_param_group({"params": [leaf + 1]})
    assert len(opt.param_groups) == 1
    assert_unchanged(opt, snap)


def test_a_parameter_twice_warns_as_torch_sgd_does_and_across_groups_raises():
    p, q = random_leaves([(3,), (2,)])
    for cls in (torch.optim.SGD, MetaSGD):
        with pytest.warns(UserWarning, match="duplicate parameters"):
            cls([p, q, p], lr=0.1)
        with pytest.raises(ValueError, match="more than one"):
            cls([{"params": [p]}, {"params": [q, p]}], lr=0.1)
    opt = MetaSGD([p], lr=0.1)
    snap = snapshot(opt)
    for group in ({"params": [q, p]}, {"params": p}):
        with pytest.raises(ValueError):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1
        assert_unchanged(opt, snap)
    assert q not in opt.state


def test_a_parameter_twice_in_an_online_group_raises_before_anything_changes():
    p, q = random_leaves([(3,), (2,)])
    with pytest.raises(ValueError, match="appears twice, with hypergrad_lr=0.1"):
        MetaSGD([p, q, p], lr=0.1, hypergrad_lr=0.1)
    opt = MetaSGD([p], lr=0.1, hypergrad_lr=0.1)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups) == 1
    assert_unchanged(opt, snap)


def test_add_param_group_creates_step_sizes_with_group_options():
    p, q = random_leaves([(3,), (2, 2)])
    opt = MetaSGD([p], lr=0.1)
    opt.add_param_group(
        {"params": (t for t in [q]), "granularity": "tensor", "parametrization": "log", "lr": 0.3}
    )
    assert opt.param_groups[1]["params"] == [q]
    assert opt.step_size(q).shape == () and opt.meta_parameters()[1] is opt.step_size(q)
    torch.testing.assert_close(opt.effective_lr(q), torch.tensor(0.3, dtype=torch.float64))


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("foreach", [None, False, True])
def test_step_sizes_follow_parameter_device(granularity, foreach):
    shapes = [(3, 4), (5,)]
    cpu = random_leaves(shapes)
    cuda = [p.detach().cuda().requires_grad_() for p in cpu]
    opt = MetaSGD(cuda, lr=0.1, momentum=0.9, granularity=granularity, foreach=foreach)
    reference = MetaSGD(cpu, lr=0.1, momentum=0.9, granularity=granularity)
    for s in opt.meta_parameters():
        assert s.device == cuda[0].device and s.is_leaf and s.requires_grad
    opt.uniform_step_sizes_(0.05, 0.1, generator=torch.Generator().manual_seed(0))
    reference.uniform_step_sizes_(0.05, 0.1, generator=torch.Generator().manual_seed(0))
    for s in opt.meta_parameters():
        assert s.device == cuda[0].device
    for p in cuda:
        assert opt.effective_lr(p).device == p.device
    assert_same_trajectory(
        [[p.cpu() for p in step] for step in run(opt, cuda, 3)], run(reference, cpu, 3)
    )
    live = opt.meta_parameters()
    opt.load_state_dict(reference.state_dict())
    assert all(
        s is t and s.device == cuda[0].device
        for s, t in zip(opt.meta_parameters(), live, strict=True)
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True),
        dict(momentum=0.5, dampening=0.2, maximize=True),
    ],
    ids=["plain", "momentum", "nesterov", "dampening-maximize"],
)
@pytest.mark.parametrize("foreach", [None, True, False])
def test_sparse_gradients_match_torch_sgd(options, foreach):
    def train(cls):
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(6, 3, sparse=True).double()
        dense = torch.nn.Linear(3, 1).double()
        opt = cls(
            [*embedding.parameters(), *dense.parameters()], lr=0.1, foreach=foreach, **options
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            opt.zero_grad()
            index = torch.randint(0, 6, (5,), generator=g)
            dense(embedding(index)).pow(2).sum().backward()
            opt.step()
        return [p.detach() for p in (*embedding.parameters(), *dense.parameters())]

    for actual, expected in zip(train(MetaSGD), train(torch.optim.SGD), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-13)


def test_sparse_gradients_follow_learned_step_sizes():
    embedding = torch.nn.Embedding(4, 2, sparse=True).double()
    opt = MetaSGD(embedding.parameters(), lr=0.5)
    set_step_sizes(opt, seed=3)
    before = embedding.weight.detach().clone()
    embedding(torch.tensor([1, 3, 3])).sum().backward()
    dense_grad = embedding.weight.grad.to_dense()
    opt.step()
    expected = before - 0.5 * opt.step_size(embedding.weight).detach() * dense_grad
    torch.testing.assert_close(embedding.weight.detach(), expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("option", [dict(weight_decay=0.1), dict(hypergrad_lr=0.1)])
def test_unsupported_sparse_gradients_raise_before_any_group_moves(option):
    dense = torch.nn.Parameter(torch.randn(3))
    embedding = torch.nn.Embedding(5, 2, sparse=True)
    opt = MetaSGD([{"params": [dense]}, {"params": embedding.parameters(), **option}], lr=0.1)
    dense.grad = torch.ones(3)
    embedding(torch.tensor([1, 2])).sum().backward()
    before = dense.detach().clone()
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=f"sparse gradients with {next(iter(option))}"):
        opt.step()
    assert torch.equal(dense, before)
    assert_unchanged(opt, snap)


def test_negative_lower_bound_is_accepted_for_identity_step_sizes():
    # The paper lets step sizes turn negative: only positive parametrizations forbid it.
    (p,) = random_leaves([(3,)])
    opt = MetaSGD([p], lr=0.1, lr_min=-0.05, lr_max=0.2)
    with torch.no_grad():
        opt.step_size(p).copy_(torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(
        opt.effective_lr(p), torch.tensor([-0.05, 0.05, 0.2], dtype=torch.float64)
    )


# --------------------------------------------------------------------------
# A failed call changes nothing
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.arange(3), ValueError, "Invalid parameter 1: .* dtype torch.int64"),
        (torch.zeros(2, dtype=torch.bool), ValueError, "Invalid parameter 1: .* torch.bool"),
        (torch.zeros(2, dtype=torch.uint8), ValueError, "Invalid parameter 1: .* torch.uint8"),
        ([1.0, 2.0], TypeError, "can only optimize Tensors, but one of the params is list"),
    ],
    ids=["int64", "bool", "uint8", "list"],
)
def test_add_param_group_with_a_bad_parameter_changes_nothing(bad, error, message):
    opt, params = trained_pair("element", "identity", steps=1)
    snap = snapshot(opt)
    good = random_leaves([(2,)], seed=5)[0]
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": [good, bad]})
    assert len(opt.param_groups) == 2 and good not in opt.state
    assert_unchanged(opt, snap)
    run(opt, params, 1)
    assert len(opt.meta_parameters()) == 2
    with pytest.raises(error, match=message):
        MetaSGD([good, bad], lr=0.1)


def test_step_size_of_a_foreign_tensor_raises():
    opt = MetaSGD(random_leaves([(2,)]), lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.step_size(torch.zeros(2))


# --------------------------------------------------------------------------
# Drop-in parity: tensor lr, SGD checkpoints
# --------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_tensor_lr_matches_torch_sgd_under_a_scheduler(foreach, parametrization):
    shapes = [(3, 2), (2,)]
    meta_params, sgd_params = random_leaves(shapes), random_leaves(shapes)
    options = dict(momentum=0.9, foreach=foreach)
    metasgd = MetaSGD(meta_params, lr=torch.tensor(0.2), parametrization=parametrization, **options)
    sgd = torch.optim.SGD(sgd_params, lr=torch.tensor(0.2), **options)

    def scheduler(opt):
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)

    expected = run(sgd, sgd_params, 4, scheduler=scheduler(sgd))
    assert_same_trajectory(run(metasgd, meta_params, 4, scheduler=scheduler(metasgd)), expected)
    assert isinstance(metasgd.param_groups[0]["lr"], torch.Tensor)
    torch.testing.assert_close(
        metasgd.effective_lr(meta_params[1]),
        torch.full((2,), 0.2 * 0.5**4, dtype=torch.float64),
    )


def test_compiled_step_with_tensor_lr_compiles_once_across_lr_changes():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    params = random_leaves([(3, 2), (2,)])
    opt = MetaSGD(params, lr=torch.tensor(0.1), momentum=0.9, foreach=True)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(2):  # the first step creates the momentum buffers (another graph)
        step()
    frames = counter.frame_count
    for _ in range(6):
        step()
        scheduler.step()
    assert counter.frame_count == frames
    torch._dynamo.reset()


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("momentum, nesterov", [(0.9, False), (0.9, True), (0.0, False)])
def test_loads_a_torch_sgd_state_dict_and_continues_its_trajectory(granularity, momentum, nesterov):
    shapes = [(3, 2), (4,)]
    sgd_params = random_leaves(shapes, seed=4)
    options = dict(lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=0.01)
    sgd = torch.optim.SGD(sgd_params, **options)
    run(sgd, sgd_params, 3, seed=1)
    checkpoint = copy.deepcopy(sgd.state_dict())
    meta_params = [p.detach().clone().requires_grad_() for p in sgd_params]
    opt = MetaSGD(meta_params, granularity=granularity, parametrization="log", **options)
    live = opt.meta_parameters()
    opt.load_state_dict(checkpoint)
    assert all(s is t for s, t in zip(opt.meta_parameters(), live, strict=True))
    assert all(torch.equal(s, torch.zeros_like(s)) for s in live)  # fresh: alpha = lr
    assert opt.param_groups[0]["granularity"] == granularity
    assert opt.param_groups[0]["parametrization"] == "log"
    assert_same_trajectory(run(opt, meta_params, 3, seed=2), run(sgd, sgd_params, 3, seed=2))


def test_a_state_dict_with_some_step_sizes_missing_is_rejected():
    source, params = trained_pair("element", "identity")
    state = copy.deepcopy(source.state_dict())
    del state["state"][1]["step_size"]
    opt, _ = fresh_like(params, "element", "identity")
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="no step size for parameter 1"):
        opt.load_state_dict(state)
    assert_unchanged(opt, snap)


# --------------------------------------------------------------------------
# Half precision: step sizes in float32
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_half_precision_parameters_keep_float32_step_sizes_that_learn(dtype, granularity):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 5).to(dtype)
    opt = MetaSGD(model.parameters(), lr=0.01, granularity=granularity)
    step_sizes = opt.meta_parameters()
    assert all(s.dtype == torch.float32 for s in step_sizes)
    outer = torch.optim.Adam(step_sizes, lr=1e-3)
    before = [s.detach().clone() for s in step_sizes]
    for _ in range(20):
        outer.zero_grad()
        for s in step_sizes:
            s.grad = torch.randn_like(s)
        outer.step()
    # Every element moved; in bfloat16 a change of 1e-3 to s = 1 rounds away.
    for s, b in zip(step_sizes, before, strict=True):
        assert (s != b).all()
    assert all(opt.effective_lr(p).dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_step_follows_torch_sgd_and_uniform_draws_stay_finite(dtype):
    shapes = [(4, 3), (3,)]
    meta_params = [p.detach().to(dtype).requires_grad_() for p in random_leaves(shapes)]
    sgd_params = [p.detach().clone().requires_grad_() for p in meta_params]
    expected = run(torch.optim.SGD(sgd_params, lr=0.05, momentum=0.9), sgd_params, 3)
    actual = run(MetaSGD(meta_params, lr=0.05, momentum=0.9), meta_params, 3)
    for step_actual, step_expected in zip(actual, expected, strict=True):
        for a, e in zip(step_actual, step_expected, strict=True):
            assert a.dtype == dtype
            # One rounding of the update apart at most.
            torch.testing.assert_close(a, e, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    # alpha / lr = 0.1 / 1e-6 overflows float16 (max 65504): not float32.
    opt = MetaSGD(meta_params, lr=1e-6).uniform_step_sizes_(0.05, 0.1)
    assert all(torch.isfinite(s).all() for s in opt.meta_parameters())
    for p in meta_params:
        assert 0.05 <= opt.effective_lr(p).min() and opt.effective_lr(p).max() <= 0.1 + 1e-6


def test_state_dict_round_trip_keeps_float32_step_sizes_of_bfloat16_parameters():
    model = torch.nn.Linear(3, 2).bfloat16()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        for s in opt.meta_parameters():
            s.add_(1e-4 * torch.arange(s.numel(), dtype=s.dtype).view_as(s))
    model(torch.randn(2, 3).bfloat16()).sum().backward()
    opt.step()
    twin = torch.nn.Linear(3, 2).bfloat16()
    loaded = MetaSGD(twin.parameters(), lr=0.1, momentum=0.9)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for s, t in zip(loaded.meta_parameters(), opt.meta_parameters(), strict=True):
        assert s.dtype == torch.float32 and torch.equal(s, t)


# --------------------------------------------------------------------------
# Step sizes follow their parameters
# --------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("cast, dtype", [("double", torch.float64), ("half", torch.float32)])
def test_step_sizes_follow_a_model_cast_after_construction(granularity, cast, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9, granularity=granularity)
    outer = torch.optim.Adam(opt.meta_parameters(), lr=0.1)
    live = opt.meta_parameters()
    model(torch.randn(5, 3)).sum().backward()
    opt.step()  # momentum buffers exist, in float32
    getattr(model, cast)()
    reference = copy.deepcopy(model).double()
    x = torch.randn(5, 3, dtype=next(model.parameters()).dtype)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert all(s is t for s, t in zip(opt.meta_parameters(), live, strict=True))
    assert all(s.dtype == dtype for s in live)
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"].dtype == p.dtype
        assert opt.effective_lr(p).dtype == dtype
    assert all(v.dtype == dtype for v in opt.state_dict()["state"][0].values() if v.dim() == 0)
    # The outer optimizer still trains the same tensors.
    for s in live:
        s.grad = torch.ones_like(s)
    before = [s.detach().clone() for s in live]
    outer.step()
    assert all((s < b).all() for s, b in zip(live, before, strict=True))
    del reference


def _after_a_move(use, move):
    """Build the model and MetaSGD in float32 on the CPU, ``move`` the model, then ``use`` them."""
    from torch_metasgd import StepSizeTuner, adapt, inner_loop, meta_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9, parametrization="log")
    live = opt.meta_parameters()
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    model.to(**move)
    x, y = torch.randn(2, 6, 2, **move), torch.randn(2, 6, 1, **move)
    mse = torch.nn.functional.mse_loss
    if use == "meta_loss":
        meta_loss(model, opt, mse, (x, y), (x, y)).backward()
    elif use == "adapt":
        fast = adapt(model, opt, mse, x[0], y[0])
        mse(torch.func.functional_call(model, fast, (x[0],)), y[0]).backward()
    elif use == "inner_loop":
        with inner_loop(model, opt) as (fmodel, diffopt):
            diffopt.step(mse(fmodel(x[0]), y[0]))
            mse(fmodel(x[1]), y[1]).backward()
    else:
        lookahead = StepSizeTuner(
            model, opt, lambda m, b: mse(m(b[0]), b[1]), (x[1], y[1]), every=1, unroll=1
        )
        lookahead.step((x[0], y[0]))
    return opt, live


MOVES = {
    "double": dict(dtype=torch.float64),
    "cuda": pytest.param(
        dict(device="cuda", dtype=torch.float32),
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
}


@pytest.mark.parametrize("move", MOVES.values(), ids=MOVES.keys())
@pytest.mark.parametrize("use", ["meta_loss", "adapt", "inner_loop", "StepSizeTuner"])
def test_every_path_works_after_the_model_is_moved(use, move):
    opt, live = _after_a_move(use, move)
    device = torch.device(move.get("device", "cpu"))
    assert all(s is t for s, t in zip(opt.meta_parameters(), live, strict=True))
    for s in live:
        assert s.dtype == move["dtype"] and s.device.type == device.type
        if use != "StepSizeTuner":  # StepSizeTuner consumes the gradient it computes
            assert s.grad is not None and s.grad.dtype == move["dtype"]
    for p in opt.param_groups[0]["params"]:
        buf = opt.state[p]["momentum_buffer"]
        assert buf.dtype == move["dtype"] and buf.device.type == device.type


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_step_sizes_follow_a_model_moved_to_cuda_after_construction(granularity):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9, granularity=granularity)
    reference = copy.deepcopy(model)
    ref_opt = MetaSGD(reference.parameters(), lr=0.1, momentum=0.9, granularity=granularity)
    live = opt.meta_parameters()
    model.cuda()
    x = torch.randn(4, 3)
    for m, o, inputs in ((model, opt, x.cuda()), (reference, ref_opt, x)):
        for _ in range(2):
            o.zero_grad()
            m(inputs).sum().backward()
            o.step()
    assert all(s is t and s.is_cuda for s, t in zip(opt.meta_parameters(), live, strict=True))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.cpu(), q)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(momentum=0.9), dict(lr_max=0.5)], ids=str)
def test_a_tensor_lr_of_any_one_element_shape_steps_as_torch_sgd(shape, foreach, options):
    params = random_leaves([(3, 2), (2,)])
    expected = random_leaves([(3, 2), (2,)])
    sgd_options = {k: v for k, v in options.items() if k != "lr_max"}
    sgd = torch.optim.SGD(expected, lr=torch.full(shape, 0.1), foreach=foreach, **sgd_options)
    opt = MetaSGD(params, lr=torch.full(shape, 0.1), foreach=foreach, **options)
    assert_same_trajectory(run(opt, params, 3), run(sgd, expected, 3))
    assert opt.effective_lr(params[0]).shape == (3, 2)


def test_numpy_scalars_are_taken_as_torch_sgd_takes_them():
    np = pytest.importorskip("numpy")
    options = dict(
        lr=np.float64(0.1),
        momentum=np.float32(0.5),
        dampening=np.int64(0),
        weight_decay=np.int64(0),
    )
    params, expected = random_leaves([(3, 2)]), random_leaves([(3, 2)])
    opt = MetaSGD(params, **options, lr_max=np.float64(1.0), hypergrad_lr=np.float32(0.0))
    sgd = torch.optim.SGD(expected, **options)
    assert_same_trajectory(run(opt, params, 3), run(sgd, expected, 3))
    with pytest.raises(ValueError, match="Invalid momentum value: -0.5"):
        MetaSGD(params, momentum=np.float64(-0.5))


def test_effective_lr_summary_gives_each_groups_step_sizes_for_a_logger():
    a, b, c = random_leaves([(2, 2), (3,), (4,)])
    opt = MetaSGD(
        [
            {"params": [a]},
            {"params": [b], "granularity": "tensor", "parametrization": "log"},
            {"params": [c], "granularity": "group", "lr": 0.5, "lr_max": 0.2},
        ],
        lr=0.1,
    )
    with torch.no_grad():
        opt.step_size(a).copy_(torch.tensor([[1.0, 2.0], [3.0, 10.0]]))
        opt.step_size(b).fill_(math.log(3.0))
    element, tensor, group = opt.effective_lr_summary()
    assert element == pytest.approx(dict(min=0.1, median=0.2, mean=0.4, max=1.0))
    assert tensor == pytest.approx(dict(min=0.3, median=0.3, mean=0.3, max=0.3))
    assert group == pytest.approx(dict(min=0.2, median=0.2, mean=0.2, max=0.2))
    assert len(opt.state) == 0
