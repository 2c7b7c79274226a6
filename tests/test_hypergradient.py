"""Online step sizes: MetaSGD's hypergradient mode (``torch_metasgd.hypergradient``)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch.nn import functional as F

from torch_metasgd import MetaSGD
from torch_metasgd._parametrizations import parametrization
from torch_metasgd.hypergradient import (
    DRIFT,
    ELEMENT_RATE,
    ELEMENT_SPREAD,
    FLOOR,
    MAX_SHRINK,
    SCALE_DECAY,
)

DTYPE = torch.float64


def _regression(seed: int = 0, n: int = 16, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=DTYPE)
    y = torch.randn(n, 1, generator=g, dtype=DTYPE)
    w = torch.randn(dim, 1, generator=g, dtype=DTYPE)
    b = torch.randn(1, generator=g, dtype=DTYPE)
    return x, y, w, b


def _loss(w, b, x, y):
    return 0.5 * (x @ w + b - y).pow(2).mean()


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("parametrization", ["identity", "log", "softplus"])
@pytest.mark.parametrize(
    "hyper",
    [
        dict(),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=0.1),
        dict(weight_decay=0.3, maximize=True),
    ],
    ids=["plain", "momentum", "nesterov-wd", "wd-maximize"],
)
def test_hypergradient_step_follows_autograd_derivative_of_loss_after_step(
    granularity, parametrization, hyper
):
    x, y, w0, b0 = _regression()
    lr, beta = 0.05, 0.1
    sign = -1.0 if hyper.get("maximize") else 1.0
    wd = hyper.get("weight_decay", 0.0)

    def objective(w, b):
        # The objective the step descends: +-f plus the L2 penalty of weight decay.
        return sign * _loss(w, b, x, y) + 0.5 * wd * (w.square().sum() + b.square().sum())

    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = MetaSGD(
        [w, b],
        lr=lr,
        granularity=granularity,
        parametrization=parametrization,
        hypergrad_lr=beta,
        **hyper,
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for s in opt.meta_parameters():
            s.add_(0.2 * torch.rand(s.shape, dtype=DTYPE, generator=gen))
    alpha0 = [opt.effective_lr(p).detach().clone() for p in (w, b)]
    _loss(w, b, x, y).backward()
    opt.step()  # no previous direction yet: the step sizes stay
    for p, a in zip((w, b), alpha0, strict=True):
        torch.testing.assert_close(opt.effective_lr(p).detach(), a)

    # Reference: theta_1(alpha) = theta_0 - alpha * d_1 written by hand, differentiated by autograd.
    theta0 = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    g0 = torch.autograd.grad(objective(*theta0), theta0)
    momentum, nesterov = hyper.get("momentum", 0.0), hyper.get("nesterov", False)
    d1 = [(1 + momentum) * g if nesterov else g for g in g0]
    alphas = [a.clone().requires_grad_() for a in alpha0]
    theta1 = [t.detach() - a * d for t, a, d in zip(theta0, alphas, d1, strict=True)]
    dfdalpha = torch.autograd.grad(objective(*theta1), alphas)
    leaves = [t.detach().requires_grad_() for t in theta1]
    g1 = torch.autograd.grad(objective(*leaves), leaves)

    opt.zero_grad()
    _loss(w, b, x, y).backward()
    opt.step()

    def norm(ts):
        return math.sqrt(sum(t.square().sum().item() for t in ts))

    # The first hypergradient step has no history: the hypergradient is
    # measured against its own magnitude, i.e. it is the cosine.
    if granularity == "element":
        # The tensor's cosine plus each element's own sign, capped at e^spread x the geometric mean.
        logratios = []
        for h, g, d, a in zip(dfdalpha, g1, d1, alpha0, strict=True):
            cos = -h.sum() / (norm([g]) * norm([d]))
            log_alpha = a.log() + beta * (cos + DRIFT + ELEMENT_RATE * torch.sign(-h))
            log_alpha = torch.minimum(log_alpha, log_alpha.mean() + ELEMENT_SPREAD)
            logratios.append(log_alpha - a.log())
    elif granularity == "tensor":
        logratios = [
            (-h.sum() / (norm([g]) * norm([d])) + DRIFT) * beta
            for h, g, d in zip(dfdalpha, g1, d1, strict=True)
        ]
    else:
        cos = -sum(h.sum() for h in dfdalpha) / (norm(g1) * norm(d1))
        logratios = [(cos + DRIFT) * beta, (cos + DRIFT) * beta]
    for p, a, r in zip((w, b), alpha0, logratios, strict=True):
        torch.testing.assert_close(opt.effective_lr(p).detach(), a * torch.exp(r))


def _train(opt_factory, seed: int = 0, start=None):
    """Train a small MLP; returns (model, opt). ``start`` = (model_state, opt_state) to resume."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(
        DTYPE
    )
    opt = opt_factory(model.parameters())
    if start is not None:
        model.load_state_dict(start[0])
        opt.load_state_dict(start[1])
    return model, opt


def _run(model, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g, dtype=DTYPE)
        y = x.sum(1, keepdim=True).sin()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def test_hypergrad_lr_zero_is_plain_metasgd_and_follows_torch_sgd():
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    model, opt = _train(lambda p: MetaSGD(p, hypergrad_lr=0.0, **hyper))
    reference, ref_opt = _train(lambda p: torch.optim.SGD(p, **hyper))
    _run(model, opt, 20, seed=1)
    _run(reference, ref_opt, 20, seed=1)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    for p in model.parameters():
        assert torch.equal(opt.step_size(p), torch.ones_like(opt.step_size(p)))
        assert "hypergrad_direction" not in opt.state[p]


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_round_trip_mid_training_continues_the_same_trajectory(granularity, momentum):
    def factory(params):
        return MetaSGD(
            params,
            lr=0.05,
            momentum=momentum,
            granularity=granularity,
            parametrization="log",
            hypergrad_lr=0.05,
        )

    model, opt = _train(factory)
    _run(model, opt, 10, seed=1)
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)
    _run(model, opt, 10, seed=2)

    buffer.seek(0)
    resumed, resumed_opt = _train(factory, seed=5, start=torch.load(buffer))
    # With momentum (and without nesterov) the last direction is the momentum buffer.
    direction = "momentum_buffer" if momentum else "hypergrad_direction"
    for p in resumed.parameters():
        assert {direction, "hypergrad_scale", "step_size"} <= resumed_opt.state[p].keys()
    _run(resumed, resumed_opt, 10, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt.step_size(p), resumed_opt.step_size(q), rtol=0, atol=0)


def test_a_group_step_size_has_one_running_magnitude_even_after_a_load():
    model, opt = _train(lambda p: MetaSGD(p, lr=0.05, granularity="group", hypergrad_lr=0.1))
    _run(model, opt, 3, seed=1)
    resumed, resumed_opt = _train(
        lambda p: MetaSGD(p, lr=0.05, granularity="group", hypergrad_lr=0.1),
        start=(model.state_dict(), opt.state_dict()),
    )
    _run(resumed, resumed_opt, 1, seed=2)
    for o in (opt, resumed_opt):
        scales = {id(o.state[p]["hypergrad_scale"]) for p in o.param_groups[0]["params"]}
        assert len(scales) == 1
    scale = resumed_opt.state[next(resumed.parameters())]["hypergrad_scale"]
    assert scale.dim() == 0 and scale.item() > 0


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize(
    "hyper",
    [
        dict(),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(maximize=True, weight_decay=0.01),
        dict(lr_min=0.01, lr_max=0.2),
    ],
    ids=["plain", "momentum", "nesterov-wd", "maximize-wd", "bounds"],
)
def test_foreach_and_single_tensor_trajectories_agree(granularity, hyper):
    runs = []
    for foreach in (False, True):

        def factory(params, foreach=foreach):
            return MetaSGD(
                params, lr=0.05, granularity=granularity, hypergrad_lr=0.1, foreach=foreach, **hyper
            )

        model, opt = _train(factory)
        if hyper.get("maximize"):
            opt.param_groups[0]["lr"] = 0.01
        _run(model, opt, 15, seed=1)
        runs.append((model, opt))
    _assert_same_runs(*runs)
    model, opt = runs[0]
    assert any(
        not torch.allclose(opt.effective_lr(p), torch.tensor(0.05, dtype=DTYPE))
        for p in model.parameters()
    )


def _assert_same_runs(run_a, run_b) -> None:
    """Two (model, optimizer) runs reached the same weights and step sizes."""
    (m1, o1), (m2, o2) = run_a, run_b
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(o1.effective_lr(p), o2.effective_lr(q))


def _quadratic_reference(lr: float, beta: float, steps: int) -> list[tuple[float, float]]:
    """The tensor-granularity rule on f(theta) = theta^2 / 2, by hand: [(alpha, theta)] per step."""
    theta, alpha, scale, direction = 1.0, lr, 0.0, None
    trajectory = []
    for _ in range(steps):
        grad = theta
        if direction is not None:
            magnitude = abs(grad) * abs(direction)
            scale = magnitude if scale == 0 else SCALE_DECAY * scale + (1 - SCALE_DECAY) * magnitude
            h = max(min(grad * direction / scale, 1.0), -MAX_SHRINK)
            alpha *= math.exp(beta * (h + DRIFT))
        theta -= alpha * grad
        direction = grad
        trajectory.append((alpha, theta))
    return trajectory


@pytest.mark.parametrize("parametrization", ["identity", "log", "softplus"])
@pytest.mark.parametrize("lr", [0.1, 1.5, 3.0])
def test_tensor_step_sizes_follow_a_hand_written_reference_on_a_quadratic(lr, parametrization):
    # lr = 0.1 undershoots the minimum, 1.5 overshoots it and 3.0 diverges.
    theta = torch.tensor([1.0], dtype=DTYPE, requires_grad=True)
    opt = MetaSGD(
        [theta], lr=lr, granularity="tensor", parametrization=parametrization, hypergrad_lr=0.1
    )
    for alpha, value in _quadratic_reference(lr, 0.1, 12):
        opt.zero_grad()
        (0.5 * theta.square()).sum().backward()
        opt.step()
        assert opt.effective_lr(theta).item() == pytest.approx(alpha, rel=1e-9)
        assert theta.item() == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_step_sizes_grow_when_undershooting_and_shrink_when_the_loss_blows_up():
    # From lr = 0.1 every step grows the step size, by at most e^(beta (1 + drift)).
    alphas = [a for a, _ in _quadratic_reference(0.1, 0.1, 8)]
    growth = [b / a for a, b in zip(alphas[1:], alphas[2:], strict=False)]  # from step 2 on
    assert all(1 < r <= math.exp(0.1 * (1 + DRIFT)) + 1e-12 for r in growth), growth
    # From lr = 3, |1 - 3| = 2: |theta| doubles per step.
    # The gradients outgrow their running magnitude, so the step size falls by
    # much more than the e^-0.1 per step of a bounded (cosine) rule, and the
    # run recovers within a few steps.
    alphas, thetas = zip(*_quadratic_reference(3.0, 0.1, 12), strict=True)
    assert alphas[3] < 1.2 and max(abs(t) for t in thetas) < 4
    assert abs(thetas[-1]) < 1e-8


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
def test_one_outlier_gradient_shrinks_step_sizes_by_at_most_max_shrink(granularity):
    # f = c * theta with c = 1, 1, then -100: the third gradient is 100x the
    # running magnitude and opposes the last step (h = -50, clipped).
    theta = torch.zeros(1, dtype=DTYPE, requires_grad=True)
    opt = MetaSGD([theta], lr=0.1, granularity=granularity, hypergrad_lr=0.1)
    for c in (1.0, 1.0, -100.0):
        opt.zero_grad()
        (c * theta).sum().backward()
        opt.step()
    rate = ELEMENT_RATE if granularity == "element" else 0.0  # the element's own sign
    expected = (
        0.1 * math.exp(0.1 * (1 + DRIFT + rate)) * math.exp(0.1 * (-MAX_SHRINK + DRIFT - rate))
    )
    assert opt.effective_lr(theta).item() == pytest.approx(expected)
    scale = opt.state[theta]["hypergrad_scale"]
    assert scale.item() == pytest.approx(SCALE_DECAY * 1 + (1 - SCALE_DECAY) * 100)


def test_step_sizes_respect_bounds():
    theta = torch.tensor([1.0], dtype=DTYPE, requires_grad=True)
    opt = MetaSGD([theta], lr=0.1, granularity="tensor", hypergrad_lr=0.5, lr_max=0.15)
    for _ in range(10):
        opt.zero_grad()
        (0.5 * theta.square()).sum().backward()
        opt.step()
    # Projected onto the bound, not stuck beyond it where the clamp's gradient vanishes.
    assert opt.step_size(theta).item() == pytest.approx(1.5)


@pytest.mark.parametrize("granularity", ["element", "tensor"])
def test_mixed_dtypes_in_one_group_step_as_if_alone(granularity):
    # The hypergradient step buckets tensors by dtype; each bucket must see
    # only its own tensors.
    def run(params):
        opt = MetaSGD(params, lr=0.1, granularity=granularity, hypergrad_lr=0.1)
        for k in range(4):
            opt.zero_grad()
            sum(((p - k) ** 2).sum() * (i + 1) for i, p in enumerate(params)).backward()
            opt.step()
        return [opt.effective_lr(p).detach() for p in params]

    a = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
    b = torch.linspace(2, 0, 4, dtype=torch.float32)
    together = run([a.clone().requires_grad_(), b.clone().requires_grad_()])
    alone = run([a.clone().requires_grad_()])[0]
    assert together[0].dtype == torch.float64 and together[1].dtype == torch.float32
    torch.testing.assert_close(together[0], alone)
    assert not torch.equal(together[0], torch.full_like(together[0], 0.1))
    assert not torch.equal(together[1], torch.full_like(together[1], 0.1))


@pytest.mark.parametrize(
    "granularity, rate", [("element", 1 + DRIFT + ELEMENT_RATE), ("tensor", 1 + DRIFT)]
)
def test_a_parameter_without_gradient_keeps_its_step_size_and_then_learns_from_its_last_move(
    granularity, rate
):
    a = torch.ones(3, dtype=DTYPE, requires_grad=True)
    b = torch.ones(3, dtype=DTYPE, requires_grad=True)
    opt = MetaSGD([a, b], lr=0.1, hypergrad_lr=0.1, granularity=granularity)
    (a.square().sum() + b.square().sum()).backward()
    opt.step()  # b: 1 -> 0.8, by its direction d = 2
    opt.zero_grad(set_to_none=True)
    a.square().sum().backward()  # b gets no gradient and does not move
    opt.step()
    assert torch.equal(opt.step_size(b), torch.ones_like(opt.step_size(b)))
    assert torch.equal(b.detach(), torch.full((3,), 0.8, dtype=DTYPE))
    opt.zero_grad(set_to_none=True)
    (a.square().sum() + b.square().sum()).backward()
    opt.step()
    # b's last move was by d = 2, two steps ago, and its step sizes have not
    # moved since: its hypergradient is exact, cos(g = 1.6, d = 2) = 1, and the
    # running magnitude starts at |g||d|, so log(alpha) grows by beta * rate.
    expected = torch.full_like(opt.step_size(b), math.exp(0.1 * rate))
    torch.testing.assert_close(opt.step_size(b), expected, rtol=1e-14, atol=0)


def test_direction_survives_zero_grad_in_place():
    # With momentum 0 the direction is p.grad itself, which zero_grad(set_to_none=False) zeroes.
    theta = torch.tensor([1.0], dtype=DTYPE, requires_grad=True)
    opt = MetaSGD([theta], lr=0.1, hypergrad_lr=0.1)
    (0.5 * theta.square()).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    (0.5 * theta.square()).sum().backward()
    opt.step()
    # One element: the tensor's cosine (+1), the drift and the element's own sign (+1).
    expected = 0.1 * math.exp(0.1 * (1 + DRIFT + ELEMENT_RATE))
    assert opt.effective_lr(theta).item() == pytest.approx(expected)


@pytest.mark.parametrize("parametrization", ["identity", "log", "softplus"])
def test_element_step_sizes_are_capped_relative_to_their_tensor(parametrization):
    theta = torch.ones(4, dtype=DTYPE, requires_grad=True)
    opt = MetaSGD([theta], lr=0.1, parametrization=parametrization, hypergrad_lr=0.1)
    f = lambda: (0.5 * (theta - 3).square()).sum()  # noqa: E731 - every gradient keeps its sign
    f().backward()
    opt.step()
    alpha = torch.tensor([0.1, 0.1, 0.1, 10.0], dtype=DTYPE)
    with torch.no_grad():
        opt.step_size(theta).copy_(_inverse(alpha / 0.1, parametrization))
    opt.zero_grad()
    f().backward()
    opt.step()
    log_alpha = (alpha.log() + 0.1 * (1 + DRIFT + ELEMENT_RATE)).clone()
    log_alpha = torch.minimum(log_alpha, log_alpha.mean() + ELEMENT_SPREAD)
    torch.testing.assert_close(opt.effective_lr(theta).detach(), log_alpha.exp())


def _inverse(x, name):
    return parametrization(name).inverse(x)


def test_negative_and_zero_identity_step_sizes_are_lifted_to_the_floor():
    theta = torch.ones(4, dtype=DTYPE, requires_grad=True)
    opt = MetaSGD([theta], lr=0.1, hypergrad_lr=0.1)
    f = lambda: (0.5 * (theta - 3).square()).sum()  # noqa: E731 - every gradient keeps its sign
    f().backward()
    opt.step()
    s0 = torch.tensor([0.01, -0.01, 0.0, -5.0], dtype=DTYPE)
    with torch.no_grad():
        opt.step_size(theta).copy_(s0)
    opt.zero_grad()
    f().backward()
    opt.step()
    # Descent on alpha would carry -0.01, 0 and -5 across zero: they start from
    # the floor (FLOOR * lr, i.e. s = FLOOR), and every element grows by its
    # tensor's cosine (1), the drift and its own sign (+1); 0.01 is then capped
    # at e^spread times the geometric mean.
    log_s = s0.clamp_min(FLOOR).log() + 0.1 * (1 + DRIFT + ELEMENT_RATE)
    expected = torch.minimum(log_s, log_s.mean() + ELEMENT_SPREAD).exp()
    torch.testing.assert_close(opt.step_size(theta).detach(), expected)


@pytest.mark.parametrize(
    "parametrization, granularity", [("identity", "element"), ("log", "tensor")]
)
def test_noise_does_not_collapse_the_step_sizes_of_a_small_mlp(parametrization, granularity):
    # On minibatch noise a small tensor's ratio p / v is heavy-tailed with both
    # signs; clipped to [-MAX_SHRINK, 1] its mean is negative. Without the floor
    # the output bias's step size fell from 1e-2 to about 1e-7 within these 300
    # steps, and to 1e-12..1e-19 (exactly 0 with "identity") by step 2000.

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = MetaSGD(
        model.parameters(),
        lr=0.01,
        hypergrad_lr=0.1,
        granularity=granularity,
        parametrization=parametrization,
    )
    w = torch.randn(10, 1)
    for _ in range(300):
        x = torch.randn(32, 10)
        y = torch.sin(x @ w) + 0.1 * torch.randn(32, 1)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        assert opt.effective_lr(p).min().item() >= 0.01 * FLOOR * (1 - 1e-6)
    assert opt.effective_lr(model[0].weight).mean().item() > 0.01  # the weights still learn


@pytest.mark.parametrize("granularity", ["element", "tensor"])
@pytest.mark.parametrize("parametrization", ["identity", "log"])
def test_a_step_size_that_noise_drove_to_the_floor_climbs_again(parametrization, granularity):
    # A scalar at the minimum of a noisy quadratic: its hypergradient is noise,
    # and its step size sinks to the floor. Then the minimum moves far away: the
    # gradient keeps its sign and the step size climbs by about e^(beta (1 + DRIFT))
    # per step, back above lr within 100 steps (from 1e-20, where it sank
    # without the floor, it would take some 400).
    theta = torch.zeros(1, dtype=DTYPE, requires_grad=True)
    opt = MetaSGD(
        [theta], lr=0.01, granularity=granularity, parametrization=parametrization, hypergrad_lr=0.1
    )
    g = torch.Generator().manual_seed(0)

    def train(steps: int, minimum: float) -> None:
        for _ in range(steps):
            theta.grad = theta.detach() - minimum + torch.randn(1, generator=g, dtype=DTYPE)
            opt.step()

    train(400, minimum=0.0)
    assert 0.01 * FLOOR * (1 - 1e-9) <= opt.effective_lr(theta).item() < 0.01 * FLOOR * 10
    train(100, minimum=20.0)
    assert opt.effective_lr(theta).item() > 0.01


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("parametrization", ["identity", "log", "softplus"])
def test_step_sizes_never_fall_below_the_floor(granularity, parametrization):
    # Gradients that always oppose the last direction: h = -1 at every step.
    theta = torch.ones(3, dtype=DTYPE, requires_grad=True)
    opt = MetaSGD(
        [theta], lr=0.5, granularity=granularity, parametrization=parametrization, hypergrad_lr=1.0
    )
    for t in range(40):
        theta.grad = torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE) * (-1) ** t
        opt.step()
    torch.testing.assert_close(
        opt.effective_lr(theta).detach(),
        torch.full((3,), 0.5 * FLOOR, dtype=DTYPE).squeeze()
        if granularity == "element"
        else torch.tensor(0.5 * FLOOR, dtype=DTYPE),
    )


@pytest.mark.parametrize("dtype", [DTYPE, torch.bfloat16], ids=["workspace", "per-tensor"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("parametrization", ["identity", "log", "softplus"])
def test_a_non_finite_gradient_skips_the_step_size_update_of_its_tensor(
    granularity, parametrization, bad, dtype
):
    a = torch.zeros(4, dtype=dtype, requires_grad=True)
    b = torch.zeros(3, dtype=dtype, requires_grad=True)
    opt = MetaSGD(
        [a, b], lr=0.1, granularity=granularity, parametrization=parametrization, hypergrad_lr=0.1
    )

    def step(grad_a, grad_b):
        a.grad = torch.as_tensor(grad_a, dtype=dtype).expand(4).clone()
        b.grad = torch.as_tensor(grad_b, dtype=dtype).expand(3).clone()
        opt.step()

    def snapshot(p):
        return opt.step_size(p).detach().clone(), opt.state[p]["hypergrad_scale"].clone()

    step(1.0, 1.0)
    step(0.5, 0.5)
    before = {p: snapshot(p) for p in (a, b)}
    grad_a = torch.full((4,), 0.5, dtype=dtype)
    grad_a[1] = bad
    step(grad_a, 0.5)
    for p in (a, b):
        s, v = snapshot(p)
        assert torch.isfinite(s).all() and torch.isfinite(v)
    # The tensor with the bad element (with "group", the whole group) keeps
    # its step sizes and running magnitude exactly; the others learn as usual.
    assert torch.equal(snapshot(a)[0], before[a][0])
    assert torch.equal(snapshot(a)[1], before[a][1])
    assert torch.equal(snapshot(b)[0], before[b][0]) == (granularity == "group")
    # The parameters take SGD's step, non-finite element included.
    assert not torch.isfinite(a[1]) and torch.isfinite(a[[0, 2, 3]]).all()

    with torch.no_grad():
        a.zero_()  # the user repairs the weights
    step(0.5, 0.5)  # the last direction holds the bad element: skipped once more
    s_a = opt.step_size(a).detach().clone()
    assert torch.equal(s_a, before[a][0])
    step(0.5, 0.5)
    assert torch.isfinite(opt.step_size(a)).all()
    assert not torch.equal(opt.step_size(a).detach(), s_a)


def _real_view(t):
    return torch.view_as_real(t) if t.is_complex() else t


def _learn_quadratics(params, granularity, parametrization, steps=4):
    opt = MetaSGD(
        params, lr=0.1, granularity=granularity, parametrization=parametrization, hypergrad_lr=0.1
    )
    for k in range(steps):
        opt.zero_grad()
        loss = sum(
            (_real_view(p).double() - k).square().sum() * (i + 1) for i, p in enumerate(params)
        )
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("parametrization", ["identity", "log", "softplus"])
def test_any_mix_of_dtypes_in_one_group_learns_finite_step_sizes(granularity, parametrization):
    dtypes = [torch.float32, torch.float64, torch.complex64, torch.float16, torch.bfloat16]
    params = [
        torch.linspace(-1, 1, 3 + i, dtype=torch.float64).to(dtype).requires_grad_()
        for i, dtype in enumerate(dtypes)
    ]
    opt = _learn_quadratics(params, granularity, parametrization)
    for p, dtype in zip(params, dtypes, strict=True):
        alpha = opt.effective_lr(p).detach()
        assert (
            p.dtype == dtype
            and torch.isfinite(torch.view_as_real(alpha) if alpha.is_complex() else alpha).all()
        )
        assert not torch.equal(alpha, torch.full_like(alpha, 0.1))
        assert opt.state[p]["hypergrad_scale"].dtype in (torch.float32, torch.float64)


@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_a_complex_parameter_learns_its_step_size_as_its_real_view_does(granularity):
    z = torch.tensor([1 + 2j, -0.5 + 1j, 3 - 1j], dtype=torch.complex128, requires_grad=True)
    x = torch.view_as_real(z.detach()).clone().requires_grad_()
    opt_z = _learn_quadratics([z], granularity, "identity", steps=6)
    opt_x = _learn_quadratics([x], granularity, "identity", steps=6)
    torch.testing.assert_close(torch.view_as_real(z.detach()), x.detach())
    alpha_z = opt_z.effective_lr(z).detach()
    assert not alpha_z.is_complex()  # a complex parameter's step sizes are real
    torch.testing.assert_close(alpha_z, opt_x.effective_lr(x).detach())


def test_a_complex_element_follows_the_sign_of_its_real_hypergradient():
    # d L / d Re(alpha_i) = -Re(conj(g_i) d_i): element 0's gradient keeps its
    # direction, element 1's turns by 180 degrees, element 2's by 90 degrees.
    z = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    opt = MetaSGD([z], lr=0.1, hypergrad_lr=0.1, parametrization="log")
    z.grad = torch.tensor([1 + 1j, 1 + 1j, 1 + 0j], dtype=torch.complex128)
    opt.step()
    z.grad = torch.tensor([2 + 2j, -1 - 1j, 1j], dtype=torch.complex128)
    opt.step()
    s = opt.step_size(z).detach()
    own = s - s.mean()  # the tensor's common change cancels
    expected = 0.1 * ELEMENT_RATE * torch.tensor([1.0, -1.0, 0.0], dtype=DTYPE)
    torch.testing.assert_close(own, expected - expected.mean())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_online_step_on_cuda_follows_the_one_on_cpu(granularity, dtype):
    def run(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            *[torch.nn.Linear(20, 20) for _ in range(10)], torch.nn.Linear(20, 1)
        ).to(device, dtype)
        opt = MetaSGD(
            model.parameters(), lr=0.05, momentum=0.9, granularity=granularity, hypergrad_lr=0.1
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            x = torch.randn(16, 20, generator=g, dtype=dtype).to(device)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return [t.detach().cpu() for p in model.parameters() for t in (p, opt.effective_lr(p))]

    for x, y in zip(run("cuda"), run("cpu"), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("parametrization", ["identity", "log"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_online_step_on_cuda_reads_nothing_back_to_the_host(
    granularity, parametrization, momentum
):
    # Past the first steps (workspaces made, step sizes tied), a step only
    # queues kernels: torch raises on any synchronizing call in this mode.
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(20, 20) for _ in range(10)]).cuda()
    opt = MetaSGD(
        model.parameters(),
        lr=0.05,
        momentum=momentum,
        granularity=granularity,
        parametrization=parametrization,
        hypergrad_lr=0.1,
    )
    x = torch.randn(16, 20, device="cuda")
    for step in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step >= 3:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(opt.effective_lr(p)).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
def test_a_group_across_devices_learns_as_on_one_device(granularity):
    def run(devices):
        params = [
            torch.linspace(-1, 1, 3 + i, dtype=DTYPE, device=device).requires_grad_()
            for i, device in enumerate(devices)
        ]
        opt = _learn_quadratics(params, granularity, "log")
        return [opt.effective_lr(p).detach().cpu() for p in params]

    for x, y in zip(run(["cuda", "cpu"]), run(["cpu", "cpu"]), strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("granularity", ["element", "tensor"])
@pytest.mark.parametrize("parametrization", ["identity", "log", "softplus"])
@pytest.mark.parametrize(
    "shapes",
    [
        [(3, 50), (64,), (128,), (), (0,), (2, 3, 11), (65,), (70,)],
        [(300, 70), (5000,), (), (0,), (3,), (64, 65), (700,), (2, 900)],
    ],
    ids=["small", "large"],
)
def test_many_tensors_of_any_size_in_one_group_each_follow_the_closed_form(
    granularity, parametrization, shapes
):
    # Sizes around the rule's internal rows (64 elements for the small
    # tensors, 256 for the large: several rows, a partial last row, none at
    # all), three dtypes and a complex parameter in one group, step sizes
    # spread over e^+-4 so that the cap binds: each tensor's first update is
    # the closed form of its own g and d, as if it were alone.
    dtypes = [DTYPE] * 5 + [torch.float32, torch.float32, torch.complex128]
    gen = torch.Generator().manual_seed(0)
    params = [torch.zeros(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes, strict=True)]
    for p in params:
        p.requires_grad_()
    opt = MetaSGD(
        params,
        lr=1e-3,
        granularity=granularity,
        parametrization=parametrization,
        hypergrad_lr=0.1,
    )
    with torch.no_grad():
        for s in opt.meta_parameters():
            spread = 2 * torch.rand(s.shape, dtype=s.dtype, generator=gen) - 1
            s.copy_(torch.exp(4 * spread) if parametrization == "identity" else 4 * spread)
    alpha0 = [opt.effective_lr(p).detach().to(DTYPE) for p in params]
    last, now = ([torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params] for _ in "ab")
    for grads in (last, now):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, a, d, g in zip(params, alpha0, last, now, strict=True):
        products = (g.conj() * d).real.to(DTYPE)  # Re(conj(g) d): the derivative in a real alpha
        cosine = products.sum() / (g.to(torch.complex128).abs().norm() * d.abs().norm())
        if p.numel() == 0:
            cosine = torch.zeros((), dtype=DTYPE)
        log_alpha = a.log() + 0.1 * (cosine + DRIFT)
        if granularity == "element":
            log_alpha = log_alpha + 0.1 * ELEMENT_RATE * products.sign()
            log_alpha = torch.minimum(log_alpha, log_alpha.mean() + ELEMENT_SPREAD)
        assert (log_alpha > math.log(1e-3 * FLOOR)).all()  # the floor plays no part here
        tolerance = 1e-5 if p.dtype is torch.float32 else 1e-7
        actual = opt.effective_lr(p).detach().to(DTYPE)
        torch.testing.assert_close(actual, log_alpha.exp(), rtol=tolerance, atol=0)


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("parametrization", ["identity", "log"])
@pytest.mark.parametrize(
    "hyper",
    [
        dict(),
        dict(momentum=0.9),
        dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
        dict(momentum=0.5, nesterov=True, maximize=True),
    ],
    ids=["plain", "momentum", "dampening-wd", "nesterov-maximize"],
)
def test_every_online_step_moves_each_parameter_by_its_step_sizes_times_sgds_direction(
    granularity, parametrization, hyper
):
    # theta_t = theta_{t-1} - alpha_t * d_t, alpha_t as the optimizer reports it
    # after the step, d_t SGD's direction written here (in float64). Tensors of
    # sizes around the rule's internal rows, two of them float32 (a second
    # workspace); one parameter misses a step (no gradient), and the optimizer
    # is saved and reloaded half way.
    shapes = [(3, 50), (64,), (), (2, 3, 11), (70,), (5, 7)]
    dtypes = [DTYPE] * 4 + [torch.float32] * 2
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(shape, dtype=DTYPE, generator=gen).to(dtype).requires_grad_()
        for shape, dtype in zip(shapes, dtypes, strict=True)
    ]

    def make(params):
        return MetaSGD(
            params,
            lr=0.01,
            granularity=granularity,
            parametrization=parametrization,
            hypergrad_lr=0.1,
            **hyper,
        )

    opt = make(params)
    momentum, dampening = hyper.get("momentum", 0.0), hyper.get("dampening", 0.0)
    sign = -1.0 if hyper.get("maximize") else 1.0
    buffers = [None] * len(params)
    for step in range(8):
        if step == 4:
            saved = io.BytesIO()
            torch.save(opt.state_dict(), saved)
            saved.seek(0)
            opt = make(params)
            opt.load_state_dict(torch.load(saved))
        grads = [torch.randn(p.shape, dtype=DTYPE, generator=gen).to(p.dtype) for p in params]
        skipped = 3 if step == 2 else None
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p.grad = None if i == skipped else g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        for i, (p, g, old) in enumerate(zip(params, grads, before, strict=True)):
            if i == skipped:
                torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)
                continue
            tolerance = (
                dict(rtol=1e-12, atol=1e-14) if p.dtype is DTYPE else dict(rtol=1e-5, atol=1e-6)
            )
            g, old = g.to(DTYPE), old.to(DTYPE)
            g = sign * g + hyper.get("weight_decay", 0.0) * old
            d = g
            if momentum:
                b = g if buffers[i] is None else momentum * buffers[i] + (1 - dampening) * g
                buffers[i] = b
                d = g + momentum * b if hyper.get("nesterov") else b
                torch.testing.assert_close(
                    opt.state[p]["momentum_buffer"].to(DTYPE), b, **tolerance
                )
            expected = old - opt.effective_lr(p).detach().to(DTYPE) * d
            torch.testing.assert_close(p.detach().to(DTYPE), expected, **tolerance)


@pytest.mark.parametrize("granularity", ["element", "tensor"])
@pytest.mark.parametrize("parametrization", ["identity", "log"])
def test_step_sizes_changed_between_steps_in_place_or_replaced_are_where_the_next_step_starts(
    parametrization, granularity
):
    # The same gradient twice from a fresh optimizer: the first hypergradient
    # is a cosine of 1, so every step size grows by e^(beta (1 + DRIFT)), and
    # per element by e^(beta ELEMENT_RATE) more (every sign agrees).
    params = [torch.ones(70, dtype=DTYPE, requires_grad=True) for _ in range(3)]
    opt = MetaSGD(
        params, lr=0.1, hypergrad_lr=0.1, parametrization=parametrization, granularity=granularity
    )
    grads = [torch.linspace(1, 2, 70, dtype=DTYPE) for _ in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()
    start = [1.0, 2.0, 3.0]  # alpha / lr: as it was, changed in place, replaced
    with torch.no_grad():
        opt.step_size(params[1]).copy_(_step_size_for(2.0, parametrization))
        replaced = opt.step_size(params[2])
        replaced.data = torch.full_like(replaced, _step_size_for(3.0, parametrization))
    opt.step()
    growth = math.exp(0.1 * (1 + DRIFT + (ELEMENT_RATE if granularity == "element" else 0)))
    for p, a in zip(params, start, strict=True):
        expected = torch.full(opt.step_size(p).shape, 0.1 * a * growth, dtype=DTYPE)
        torch.testing.assert_close(opt.effective_lr(p).detach(), expected)
    assert opt.step_size(params[2]) is replaced


def _step_size_for(ratio: float, name: str) -> float:
    """The s at which alpha / lr = ratio."""
    return ratio if name == "identity" else math.log(ratio)


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
def test_a_deep_copy_of_model_and_optimizer_trains_as_the_original(granularity):
    model, opt = _train(
        lambda ps: MetaSGD(ps, lr=0.05, momentum=0.9, granularity=granularity, hypergrad_lr=0.1)
    )
    _run(model, opt, 5, seed=1)
    twin, twin_opt = copy.deepcopy((model, opt))
    _run(model, opt, 5, seed=2)
    _run(twin, twin_opt, 5, seed=2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt.step_size(p), twin_opt.step_size(q), rtol=0, atol=0)
        assert opt.step_size(p).data_ptr() != twin_opt.step_size(q).data_ptr()


def test_element_step_sizes_do_not_run_away_from_their_tensor():
    # softplus(-theta_0) never stops decreasing along +theta_0 (as the output
    # weights on separable data), so theta_0's gradient keeps its sign for
    # ever, while the stiff quadratic in the other elements flips theirs.
    # The sign rule alone would open a gap of 2 * 0.1 * ELEMENT_RATE per step
    # (14.5 in log after 500 steps); the cap holds it near ELEMENT_SPREAD.
    theta = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=DTYPE, requires_grad=True)
    opt = MetaSGD([theta], lr=0.1, hypergrad_lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        loss = F.softplus(-theta[0]) + 7.5 * theta[1:].square().sum()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01
    log_alpha = opt.effective_lr(theta).detach().log()
    assert (log_alpha - log_alpha.mean()).max().item() <= ELEMENT_SPREAD + 0.05


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_invalid_hypergrad_lr_is_rejected_with_its_value(value):
    with pytest.raises(ValueError, match=f"Invalid hypergrad_lr value: {value}"):
        MetaSGD([torch.zeros(2, requires_grad=True)], hypergrad_lr=value)
    opt = MetaSGD([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="hypergrad_lr"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "hypergrad_lr": value})


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("options", [dict(), dict(parametrization="softplus", lr_max=0.2)])
def test_a_tensor_lr_learns_the_step_sizes_a_float_lr_does(granularity, options):
    runs = []
    for lr in (0.05, torch.tensor(0.05, dtype=DTYPE)):
        model, opt = _train(
            lambda p, lr=lr: MetaSGD(
                p, lr=lr, granularity=granularity, hypergrad_lr=0.1, momentum=0.9, **options
            )
        )
        _run(model, opt, 10, seed=1)
        runs.append((model, opt))
    _assert_same_runs(*runs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_parameters_of_one_shape_that_take_turns_keep_state_of_their_own(
    dtype, granularity, momentum
):
    """Heads of one shape stepping in turns (multi-task heads, partial freezing): each head's
    momentum buffer is SGD's (it does not depend on the step sizes), and each learns the step
    sizes it learns alone, its per-tensor rule seeing only its own gradients (a "group" step
    size is the group's: one tensor, and one running magnitude)."""
    schedule = [(0, 1), (0, 2), (0, 1), (1, 2), (0, 1, 2), (2,), (0, 2), (0, 1, 2)]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=g, dtype=dtype) for _ in range(3)]
    grads = [[torch.randn(4, 3, generator=g, dtype=dtype) for _ in range(3)] for _ in schedule]
    options = dict(lr=0.05, momentum=momentum, hypergrad_lr=0.1, granularity=granularity)

    def run(indices):
        params = [start[i].clone().requires_grad_() for i in indices]
        opt = MetaSGD(params, **options)
        sgd = torch.optim.SGD(
            [p.detach().clone().requires_grad_() for p in params], lr=0.05, momentum=momentum
        )
        for turn, step_grads in zip(schedule, grads, strict=True):
            for p, q, i in zip(params, sgd.param_groups[0]["params"], indices, strict=True):
                p.grad = step_grads[i].clone() if i in turn else None
                q.grad = p.grad
            if any(p.grad is not None for p in params):
                opt.step()
                sgd.step()
        return params, opt, sgd

    heads, opt, sgd = run([0, 1, 2])
    storages = {"step_size": set(), "momentum_buffer": set(), "hypergrad_direction": set()}
    for p, q in zip(heads, sgd.param_groups[0]["params"], strict=True):
        if momentum:
            torch.testing.assert_close(
                opt.state[p]["momentum_buffer"],
                sgd.state[q]["momentum_buffer"],
                rtol=1e-6,
                atol=1e-6,
            )
        for key, seen in storages.items():
            if key in opt.state[p] and not (key == "step_size" and granularity == "group"):
                pointer = opt.state[p][key].data_ptr()
                assert pointer not in seen, f"two heads share one {key}"
                seen.add(pointer)
    if granularity == "group":
        assert len({id(opt.state[p]["hypergrad_scale"]) for p in heads}) == 1
        return
    for i, head in enumerate(heads):
        (alone,), alone_opt, _ = run([i])
        torch.testing.assert_close(
            opt.step_size(head), alone_opt.step_size(alone), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(head, alone, rtol=1e-5, atol=1e-6)


ENGINE_CASES = {
    "plain": dict(),
    "momentum": dict(momentum=0.9),
    "nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    "dampening-maximize": dict(momentum=0.5, dampening=0.3, maximize=True),
    "bounds": dict(lr_min=0.02, lr_max=0.3),
    "tensor-lr": dict(lr=torch.tensor(0.1, dtype=DTYPE)),
}


@pytest.mark.parametrize("options", ENGINE_CASES.values(), ids=ENGINE_CASES.keys())
@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("parametrization", ["identity", "log", "softplus"])
def test_the_workspace_and_the_rule_run_tensor_by_tensor_learn_the_same_step_sizes(
    options, granularity, parametrization, monkeypatch
):
    """Two implementations of one rule: the workspace's (all tensors in a few kernels) and
    the one tensor by tensor that every other case (half precision, DTensor, a parameter
    without a gradient) takes."""
    from torch_metasgd import _engine

    def train(per_tensor: bool):
        if per_tensor:
            monkeypatch.setattr(_engine, "step_", lambda *args: False)
        else:
            monkeypatch.undo()
        model, opt = _train(
            lambda p: MetaSGD(
                p,
                **{"lr": 0.1, **options},
                granularity=granularity,
                parametrization=parametrization,
                hypergrad_lr=0.1,
            )
        )
        _run(model, opt, 12, seed=3)
        return model, opt

    (model, opt), (reference, reference_opt) = train(False), train(True)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(
            opt.step_size(p), reference_opt.step_size(q), rtol=1e-12, atol=1e-15
        )
