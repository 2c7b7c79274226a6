"""``meta_loss`` / ``adapt`` (``torch_metasgd.batched``) against a hand-written loop over tasks."""

import copy
import math

import pytest
import torch
from _options import cases
from _options import options as metasgd_options
from _reference import ref_inward_clamp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from torch_metasgd import MetaSGD, adapt, adapt_tasks, inner_loop, meta_loss

STRATEGIES = ["vmap", "loop", "grouped"]

# Each case: (MetaSGD keyword arguments, whether to split into two groups with a
# frozen parameter, whether the optimizer holds momentum buffers at call time).
OPTION_CASES = {
    **{name: (options, False, False) for name, options in cases(0.05, skip=("foreach",)).items()},
    # The paper's setting: lr = 1, so the step size is s itself.
    "lr=1+bounds": (dict(lr=1.0, lr_min=0.02, lr_max=0.05), False, False),
    "groups_and_frozen": (dict(lr=0.05, momentum=0.5), True, False),
    "momentum_state": (dict(lr=0.05, momentum=0.9, weight_decay=0.01), False, True),
}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _make(options, split, with_state, seed=0):
    torch.manual_seed(seed)
    model = _mlp().double()
    if split:
        # Two groups with different rules; the last bias is left out of the optimizer.
        groups = [
            {"params": list(model[0].parameters())},
            {
                "params": [model[2].weight, model[4].weight],
                "lr": 0.02,
                "weight_decay": 0.1,
                "granularity": "tensor",
            },
        ]
        opt = MetaSGD(groups, **options)
    else:
        opt = MetaSGD(model.parameters(), **options)
    low = 0.02 if "lr_min" not in options else 0.01
    opt.uniform_step_sizes_(low, 0.08)
    if with_state:
        model(torch.randn(5, 2, dtype=torch.double)).pow(2).mean().backward()
        opt.step()
        model.zero_grad()
    return model, opt


def _tasks(n_tasks=3, n=6, seed=1, dtype=torch.double):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n_tasks, n, *shape, generator=g, dtype=dtype) for shape in ((2,), (1,))]


def _phi(s, parametrization):
    if parametrization == "identity":
        return s
    if parametrization == "log":
        return torch.exp(s)
    return torch.log1p(torch.exp(s)) / math.log(2.0)


def _reference_adapt(model, opt, loss_fn, x, y, steps, first_order):
    """The inner loop of one task, written out by hand on a copy of the model."""
    work = copy.deepcopy(model)  # BatchNorm writes its running stats into the copy
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    rules = {}
    for group in opt.param_groups:
        # One inner loop is one use of each step size (a "group" one is shared):
        # at a bound, its outward gradient is blocked for this task as a whole.
        alphas = {}
        for p in group["params"]:
            s = opt.step_size(p)
            if id(s) not in alphas:
                alpha = group["lr"] * _phi(s, group["parametrization"])
                if group["lr_min"] is not None or group["lr_max"] is not None:
                    alpha = ref_inward_clamp(alpha, group["lr_min"], group["lr_max"])
                alphas[id(s)] = alpha
            buf = opt.state[p].get("momentum_buffer")
            rules[names[id(p)]] = (group, alphas[id(s)], buf)
    bufs = {n: (None if r[2] is None else r[2].detach()) for n, r in rules.items()}
    for _ in range(steps):
        loss = loss_fn(functional_call(work, params, (x,)), y)
        trained = list(rules)
        grads = torch.autograd.grad(
            loss, [params[n] for n in trained], create_graph=not first_order
        )
        new = dict(params)
        for n, g in zip(trained, grads, strict=True):
            group, alpha, _ = rules[n]
            p = params[n]
            d = -g if group["maximize"] else g
            d = d + group["weight_decay"] * (p.detach() if first_order else p)
            if group["momentum"]:
                if bufs[n] is None:
                    bufs[n] = d
                else:
                    bufs[n] = group["momentum"] * bufs[n] + (1 - group["dampening"]) * d
                d = d + group["momentum"] * bufs[n] if group["nesterov"] else bufs[n]
            new[n] = p - alpha * d
        params = new
    return params


def _reference_meta_loss(model, opt, loss_fn, support, query, steps, first_order):
    losses = []
    for t in range(support[0].shape[0]):
        fast = _reference_adapt(
            model, opt, loss_fn, support[0][t], support[1][t], steps, first_order
        )
        out = functional_call(copy.deepcopy(model), fast, (query[0][t],))
        losses.append(loss_fn(out, query[1][t]))
    return sum(losses) / len(losses)


def _wrt(model, opt):
    return [*model.parameters(), *opt.meta_parameters()]


def _assert_grads_close(actual, expected, rtol=1e-9):
    for a, e in zip(actual, expected, strict=True):
        assert torch.linalg.vector_norm(a - e) <= rtol * torch.linalg.vector_norm(e) + 1e-12


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_meta_loss_matches_hand_written_loop_for_every_option(case, strategy):
    options, split, with_state = OPTION_CASES[case]
    model, opt = _make(options, split, with_state)
    xs, ys = _tasks(seed=1)
    xq, yq = _tasks(seed=2)
    loss_fn = nn.functional.mse_loss
    loss = meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), steps=2, strategy=strategy)
    expected = _reference_meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), 2, False)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    wrt = _wrt(model, opt)
    _assert_grads_close(
        torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True),
        torch.autograd.grad(expected, wrt, allow_unused=True, materialize_grads=True),
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_matches_hand_written_loop(strategy, steps):
    model, opt = _make(dict(lr=0.05, momentum=0.9, weight_decay=0.1), False, False)
    xs, ys = _tasks(seed=3)
    xq, yq = _tasks(seed=4)
    loss_fn = nn.functional.mse_loss
    loss = meta_loss(
        model, opt, loss_fn, (xs, ys), (xq, yq), steps=steps, first_order=True, strategy=strategy
    )
    expected = _reference_meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), steps, True)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    wrt = _wrt(model, opt)
    grads = torch.autograd.grad(loss, wrt)
    _assert_grads_close(grads, torch.autograd.grad(expected, wrt))
    second_order = meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), steps=steps)
    assert any(
        not torch.allclose(a, b)
        for a, b in zip(grads, torch.autograd.grad(second_order, wrt), strict=True)
    )


def test_backward_fills_grad_of_parameters_and_step_sizes():
    model, opt = _make(dict(lr=0.05), False, False)
    xs, ys = _tasks(seed=5)
    xq, yq = _tasks(seed=6)
    meta_loss(model, opt, nn.functional.mse_loss, (xs, ys), (xq, yq)).backward()
    for t in _wrt(model, opt):
        assert t.grad is not None and t.grad.abs().sum() > 0


def _bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    )


def _eval_bn_net() -> nn.Module:
    model = _bn_net()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def _odd_conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False),
        nn.Sequential(nn.Tanh(), nn.Conv2d(4, 4, 2, groups=2)),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 4),
    )


def _bn1d_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(36, 6), nn.BatchNorm1d(6), nn.ELU(), nn.Linear(6, 4, bias=False)
    )


class _Residual(nn.Module):
    """Not a Sequential: only vmap and the loop can run it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 36, 4)

    def forward(self, x):
        return self.head((self.norm(self.conv(x)).relu() + x).flatten(1))


MODELS = {
    "conv_bn_train": _bn_net,
    "conv_bn_eval": _eval_bn_net,
    "conv_strided_grouped": _odd_conv_net,
    "mlp_bn1d": _bn1d_mlp,
    "residual": _Residual,
}


@pytest.mark.parametrize(
    "arch, strategy",
    [
        (arch, strategy)
        for arch in MODELS
        for strategy in [*STRATEGIES, "auto"]
        # The grouped strategy takes only nn.Sequential models.
        if not (arch == "residual" and strategy == "grouped")
    ],
)
def test_models_match_hand_written_loop_and_leave_buffers(arch, strategy):
    torch.manual_seed(0)
    model = MODELS[arch]().double()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(7)
    # Tasks with very different input scales: shared batch statistics would change the loss.
    scale = torch.tensor([0.1, 1.0, 10.0], dtype=torch.double).view(3, 1, 1, 1, 1)
    xs = torch.randn(3, 8, 1, 6, 6, generator=g, dtype=torch.double) * scale
    xq = torch.randn(3, 10, 1, 6, 6, generator=g, dtype=torch.double) * scale
    ys = torch.randint(0, 4, (3, 8), generator=g)
    yq = torch.randint(0, 4, (3, 10), generator=g)
    before = {k: b.clone() for k, b in model.named_buffers()}
    loss_fn = nn.functional.cross_entropy
    loss = meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), steps=2, strategy=strategy)
    expected = _reference_meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), 2, False)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    wrt = _wrt(model, opt)
    grads = torch.autograd.grad(loss, wrt)
    _assert_grads_close(grads, torch.autograd.grad(expected, wrt))
    for k, b in model.named_buffers():
        torch.testing.assert_close(b, before[k], rtol=0, atol=0)
    via_inner_loop = _inner_loop_meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), 2, False)
    _assert_grads_close(grads, torch.autograd.grad(via_inner_loop, wrt))


def test_grouped_strategy_rejects_other_models():
    model = _Residual()
    opt = MetaSGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 4, 1, 6, 6), torch.randint(0, 4, (2, 4))
    with pytest.raises(ValueError, match="grouped"):
        meta_loss(model, opt, nn.functional.cross_entropy, (x, y), (x, y), strategy="grouped")


def test_meta_loss_leaves_optimizer_state_and_step_sizes_unchanged():
    model, opt = _make(dict(lr=0.05, momentum=0.9), False, True)
    state = copy.deepcopy(opt.state_dict())
    xs, ys = _tasks(seed=8)
    meta_loss(model, opt, nn.functional.mse_loss, (xs, ys), (xs, ys), steps=2).backward()
    after = opt.state_dict()
    for index, entry in state["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(after["state"][index][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("first_order", [False, True])
def test_adapt_returns_parameters_for_functional_call(first_order):
    model, opt = _make(dict(lr=0.05, momentum=0.9, nesterov=True), True, False)
    (xs, ys), (xq, yq) = _tasks(1, seed=9), _tasks(1, seed=10)
    loss_fn = nn.functional.mse_loss
    fast = adapt(model, opt, loss_fn, xs[0], ys[0], steps=3, first_order=first_order)
    assert set(fast) == {n for n, _ in model.named_parameters()}
    expected = _reference_adapt(model, opt, loss_fn, xs[0], ys[0], 3, first_order)
    for name in fast:
        torch.testing.assert_close(fast[name], expected[name], rtol=1e-10, atol=1e-12)
    loss = loss_fn(functional_call(model, fast, (xq[0],)), yq[0])
    ref_loss = loss_fn(functional_call(model, expected, (xq[0],)), yq[0])
    wrt = _wrt(model, opt)
    _assert_grads_close(
        torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True),
        torch.autograd.grad(ref_loss, wrt, allow_unused=True, materialize_grads=True),
    )


def test_strategies_agree_in_float32_on_sinusoid_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    opt = MetaSGD(model.parameters(), lr=1.0).uniform_step_sizes_(0.005, 0.1)
    xs, ys, xq, yq = (torch.randn(25, 10, 1) for _ in range(4))
    wrt = _wrt(model, opt)
    grads = {}
    for strategy in STRATEGIES:
        loss = meta_loss(model, opt, nn.functional.mse_loss, (xs, ys), (xq, yq), strategy=strategy)
        grads[strategy] = torch.autograd.grad(loss, wrt)
    _assert_grads_close(grads["vmap"], grads["loop"], rtol=1e-5)
    _assert_grads_close(grads["grouped"], grads["loop"], rtol=1e-5)


@pytest.mark.parametrize(
    "support_shapes, query_shapes",
    [
        (((3, 6, 2), (3, 6, 1)), ((4, 6, 2), (4, 6, 1))),
        (((3, 6, 2), (2, 6, 1)), ((3, 6, 2), (3, 6, 1))),
        (((3, 6, 2), ()), ((3, 6, 2), (3, 6, 1))),
    ],
)
def test_mismatched_task_dimensions_raise(support_shapes, query_shapes):
    model, opt = _make(dict(lr=0.05), False, False)
    support = tuple(torch.zeros(s, dtype=torch.double) for s in support_shapes)
    query = tuple(torch.zeros(s, dtype=torch.double) for s in query_shapes)
    with pytest.raises(ValueError, match="leading task dimension"):
        meta_loss(model, opt, nn.functional.mse_loss, support, query)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(steps=-1), "inner steps: -1"), (dict(strategy="threads"), "Invalid strategy")],
)
def test_invalid_arguments_raise(kwargs, match):
    model, opt = _make(dict(lr=0.05), False, False)
    xs, ys = _tasks()
    with pytest.raises(ValueError, match=match):
        meta_loss(model, opt, nn.functional.mse_loss, (xs, ys), (xs, ys), **kwargs)


def test_non_metasgd_optimizer_raises():
    model = _mlp()
    xs, ys = _tasks(dtype=torch.float32)
    with pytest.raises(TypeError, match="MetaSGD"):
        meta_loss(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            nn.functional.mse_loss,
            (xs, ys),
            (xs, ys),
        )


def _inner_loop_meta_loss(model, opt, loss_fn, support, query, steps, first_order):
    losses = []
    for t in range(support[0].shape[0]):
        with inner_loop(model, opt, first_order=first_order) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fmodel(support[0][t]), support[1][t]))
            losses.append(loss_fn(fmodel(query[0][t]), query[1][t]))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_meta_loss_matches_mean_of_inner_loop(case, strategy, first_order):
    options, split, with_state = OPTION_CASES[case]
    model, opt = _make(options, split, with_state)
    xs, ys = _tasks(seed=11)
    xq, yq = _tasks(seed=12)
    loss_fn = nn.functional.mse_loss
    support, query = (xs, ys), (xq, yq)
    loss = meta_loss(
        model, opt, loss_fn, support, query, steps=2, first_order=first_order, strategy=strategy
    )
    expected = _inner_loop_meta_loss(model, opt, loss_fn, support, query, 2, first_order)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    wrt = _wrt(model, opt)
    _assert_grads_close(
        torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True),
        torch.autograd.grad(expected, wrt, allow_unused=True, materialize_grads=True),
    )


def test_optimizer_over_foreign_parameters_raises():
    model = _mlp()
    opt = MetaSGD([*model.parameters(), nn.Parameter(torch.zeros(3))], lr=0.1)
    xs, ys = _tasks(dtype=torch.float32)
    with pytest.raises(ValueError, match="not parameters of the Sequential"):
        meta_loss(model, opt, nn.functional.mse_loss, (xs, ys), (xs, ys))


@settings(max_examples=15, deadline=None)
@given(
    options=metasgd_options(
        lr=0.05,
        keys=(
            "momentum",
            "dampening",
            "nesterov",
            "weight_decay",
            "maximize",
            "granularity",
            "parametrization",
            "bounds",
        ),
    ),
    steps=st.integers(1, 3),
    first_order=st.booleans(),
    strategy=st.sampled_from(STRATEGIES),
)
def test_any_option_combination_matches_hand_written_loop(options, steps, first_order, strategy):
    model, opt = _make(options, False, False)
    xs, ys = _tasks(2, seed=13)
    xq, yq = _tasks(2, seed=14)
    loss_fn = nn.functional.mse_loss
    loss = meta_loss(
        model,
        opt,
        loss_fn,
        (xs, ys),
        (xq, yq),
        steps=steps,
        first_order=first_order,
        strategy=strategy,
    )
    expected = _reference_meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), steps, first_order)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    wrt = _wrt(model, opt)
    _assert_grads_close(torch.autograd.grad(loss, wrt), torch.autograd.grad(expected, wrt))


# --------------------------------------------------------------------------
# Bad input: a clear error, whatever the strategy
# --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [*STRATEGIES, "auto"])
def test_a_loss_that_is_not_a_scalar_is_rejected_by_every_strategy(strategy):
    model, opt = _make(dict(lr=0.05), False, False)
    xs, ys = _tasks()

    def per_example(out, y):
        return nn.functional.mse_loss(out, y, reduction="none")

    with pytest.raises(ValueError, match=r"Invalid loss: got shape \(6, 1\)"):
        meta_loss(model, opt, per_example, (xs, ys), (xs, ys), strategy=strategy)
    with pytest.raises(ValueError, match=r"Invalid loss: got shape \(6, 1\)"):
        adapt(model, opt, per_example, xs[0], ys[0])


@pytest.mark.parametrize("strategy", [*STRATEGIES, "auto"])
def test_zero_tasks_are_rejected(strategy):
    model, opt = _make(dict(lr=0.05), False, False)
    xs, ys = (t[:0] for t in _tasks())
    with pytest.raises(ValueError, match="Invalid number of tasks: 0"):
        meta_loss(model, opt, nn.functional.mse_loss, (xs, ys), (xs, ys), strategy=strategy)


@pytest.mark.parametrize("steps", [2.5, True, "2"])
def test_steps_must_be_a_non_negative_integer(steps):
    model, opt = _make(dict(lr=0.05), False, False)
    xs, ys = _tasks()
    with pytest.raises(ValueError, match="Invalid number of inner steps"):
        meta_loss(model, opt, nn.functional.mse_loss, (xs, ys), (xs, ys), steps=steps)
    with pytest.raises(ValueError, match="Invalid number of inner steps"):
        adapt(model, opt, nn.functional.mse_loss, xs[0], ys[0], steps=steps)


def test_online_step_sizes_are_rejected_as_by_inner_loop():
    model = _mlp()
    opt = MetaSGD(model.parameters(), lr=0.1, hypergrad_lr=0.05)
    xs, ys = _tasks(dtype=torch.float32)
    for call in (
        lambda: meta_loss(model, opt, nn.functional.mse_loss, (xs, ys), (xs, ys)),
        lambda: adapt(model, opt, nn.functional.mse_loss, xs[0], ys[0]),
    ):
        with pytest.raises(ValueError, match="hypergrad_lr=0.05"):
            call()
    with pytest.raises(ValueError, match="hypergrad_lr=0.05"):
        with inner_loop(model, opt):
            pass


# --------------------------------------------------------------------------
# Evaluation inside torch.no_grad()
# --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_meta_loss_inside_no_grad_is_the_first_order_loss_without_graph(strategy):
    model, opt = _make(dict(lr=0.05, momentum=0.9), False, True)
    xs, ys = _tasks(seed=20)
    xq, yq = _tasks(seed=21)
    loss_fn = nn.functional.mse_loss
    with torch.no_grad():
        loss = meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), steps=2, strategy=strategy)
    assert loss.grad_fn is None and not loss.requires_grad
    expected = _reference_meta_loss(model, opt, loss_fn, (xs, ys), (xq, yq), 2, True)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=0)
    assert all(p.grad is None for p in _wrt(model, opt))


def test_adapt_inside_no_grad_returns_the_adapted_values_without_graph():
    model, opt = _make(dict(lr=0.05, momentum=0.9, nesterov=True), True, False)
    xs, ys = _tasks(1, seed=22)
    with torch.no_grad():
        fast = adapt(model, opt, nn.functional.mse_loss, xs[0], ys[0], steps=3)
    expected = _reference_adapt(model, opt, nn.functional.mse_loss, xs[0], ys[0], 3, True)
    for name, value in fast.items():
        assert not value.requires_grad
        torch.testing.assert_close(value, expected[name].detach(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------
# Bounds: a step size beyond a bound comes back, one pushed outward stays
# --------------------------------------------------------------------------


def _regression_tasks(n_tasks, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_tasks, 1, 3, generator=g, dtype=torch.double)
    x = torch.randn(n_tasks, 16, 3, generator=g, dtype=torch.double)
    return (x[:, :8], (x[:, :8] * w).sum(-1, keepdim=True)), (
        x[:, 8:],
        (x[:, 8:] * w).sum(-1, keepdim=True),
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_step_sizes_clamped_at_a_bound_are_not_pinned_for_good(strategy):
    # One linear layer, identity step sizes (alpha = s), bounds [0, 0.3]: the
    # best single step on these tasks is well inside. Start with every step
    # size beyond a bound: half below 0, half above 0.3.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).double()
    opt = MetaSGD(model.parameters(), lr=1.0, lr_min=0.0, lr_max=0.3)
    with torch.no_grad():
        opt.step_size(model[0].weight).copy_(torch.tensor([[-0.2, 0.6, 0.9]]))
    outer = torch.optim.Adam(opt.meta_parameters(), lr=0.02)
    for it in range(150):
        support, query = _regression_tasks(4, seed=it)
        outer.zero_grad()
        meta_loss(model, opt, nn.functional.mse_loss, support, query, strategy=strategy).backward()
        outer.step()
    alpha = opt.effective_lr(model[0].weight).detach()
    assert ((alpha > 0.01) & (alpha < 0.29)).all(), alpha


def test_a_step_size_pushed_beyond_a_bound_does_not_drift_away():
    # The meta-gradient keeps asking for a larger step than lr_max allows:
    # the step size stays where it is rather than running off.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).double()
    opt = MetaSGD(model.parameters(), lr=1.0, lr_max=0.01, granularity="tensor")
    with torch.no_grad():
        opt.step_size(model[0].weight).fill_(0.02)
    outer = torch.optim.SGD(opt.meta_parameters(), lr=0.1)
    for it in range(20):
        support, query = _regression_tasks(4, seed=it)
        outer.zero_grad()
        meta_loss(model, opt, nn.functional.mse_loss, support, query).backward()
        assert opt.step_size(model[0].weight).grad == 0
        outer.step()
    assert opt.step_size(model[0].weight).item() == 0.02


@pytest.mark.parametrize(
    "arch, device, expected",
    [
        ("conv_bn_train", "cpu", "loop"),
        ("mlp_bn1d", "cpu", "grouped"),
        ("residual", "cpu", "loop"),
        ("conv_bn_train", "cuda", "grouped"),
        ("mlp_bn1d", "cuda", "grouped"),
        ("residual", "cuda", "vmap"),
    ],
)
def test_auto_strategy_depends_on_the_model_and_the_device(arch, device, expected):
    from torch_metasgd.batched import _auto_strategy

    assert _auto_strategy(MODELS[arch](), torch.device(device)) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", [*STRATEGIES, "auto"])
def test_meta_loss_on_cuda_matches_the_cpu(strategy):
    torch.manual_seed(0)
    model = _bn_net().double()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(3, 8, 1, 6, 6, generator=g, dtype=torch.double)
    ys = torch.randint(0, 4, (3, 8), generator=g)
    loss_fn = nn.functional.cross_entropy
    expected = meta_loss(model, opt, loss_fn, (xs, ys), (xs, ys), steps=2, strategy=strategy)
    expected_grads = torch.autograd.grad(expected, _wrt(model, opt))
    model.cuda()
    cuda = (xs.cuda(), ys.cuda())
    loss = meta_loss(model, opt, loss_fn, cuda, cuda, steps=2, strategy=strategy)
    grads = torch.autograd.grad(loss, _wrt(model, opt))
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-9, atol=1e-12)
    _assert_grads_close([g.cpu() for g in grads], expected_grads)


@pytest.mark.parametrize("strategy", [*STRATEGIES, "auto"])
def test_compiled_meta_loss_has_the_eager_gradients_whatever_the_strategy(strategy):
    # aot_eager runs aot_autograd (which has no double backward) without
    # compiling kernels, so no C++ compiler is needed.
    torch._dynamo.reset()
    model, opt = _make(dict(lr=0.05, momentum=0.9), False, False)
    xs, ys = _tasks(seed=30)
    xq, yq = _tasks(seed=31)
    wrt = _wrt(model, opt)

    def loss(strategy):
        return meta_loss(model, opt, nn.functional.mse_loss, (xs, ys), (xq, yq), strategy=strategy)

    expected = torch.autograd.grad(loss("vmap"), wrt)
    compiled = torch.compile(loss, backend="aot_eager")
    _assert_grads_close(torch.autograd.grad(compiled(strategy), wrt), expected)
    torch._dynamo.reset()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("first_order", [False, True])
def test_adapt_tasks_matches_adapt_per_task(strategy, first_order):
    model, opt = _make(dict(lr=0.05, momentum=0.9, nesterov=True), True, True)
    xs, ys = _tasks(seed=15)
    loss_fn = nn.functional.mse_loss
    fast = adapt_tasks(
        model, opt, loss_fn, (xs, ys), steps=3, first_order=first_order, strategy=strategy
    )
    assert set(fast) == {n for n, _ in model.named_parameters()}
    for t in range(3):
        one = adapt(model, opt, loss_fn, xs[t], ys[t], steps=3, first_order=first_order)
        for name, p in one.items():
            torch.testing.assert_close(fast[name][t], p, rtol=1e-10, atol=1e-14)
    # The same dependence on the initial weights and the step sizes.
    probes = {n: torch.randn_like(p[1]) for n, p in fast.items()}
    wrt = _wrt(model, opt)
    _assert_grads_close(
        torch.autograd.grad(
            sum((fast[n][1] * probes[n]).sum() for n in fast),
            wrt,
            allow_unused=True,
            materialize_grads=True,
        ),
        torch.autograd.grad(
            sum(
                (one_task * probes[n]).sum()
                for n, one_task in adapt(
                    model, opt, loss_fn, xs[1], ys[1], steps=3, first_order=first_order
                ).items()
            ),
            wrt,
            allow_unused=True,
            materialize_grads=True,
        ),
    )


def test_adapt_tasks_rejects_support_without_a_shared_task_dimension():
    model, opt = _make(dict(lr=0.05), False, False)
    xs, ys = _tasks()
    with pytest.raises(ValueError, match="support inputs and targets must share"):
        adapt_tasks(model, opt, nn.functional.mse_loss, (xs, ys[:2]))


# --------------------------------------------------------------------------
# A parameter the loss never touches: left alone, as torch.optim.SGD leaves it
# --------------------------------------------------------------------------


class _WithSpare(nn.Module):
    """An MLP with a registered layer its forward never calls."""

    def __init__(self):
        super().__init__()
        self.body = _mlp()
        self.spare = nn.Linear(2, 3)

    def forward(self, x):
        return self.body(x)


def _sgd_adapted(model, sgd_options, buffers, x, y, steps):
    """``steps`` of torch.optim.SGD on a copy, from the given momentum buffers."""
    work = copy.deepcopy(model)
    sgd = torch.optim.SGD(work.parameters(), **sgd_options)
    for p, buf in zip(work.parameters(), buffers, strict=True):
        if buf is not None:
            sgd.state[p]["momentum_buffer"] = buf.clone()
    for _ in range(steps):
        sgd.zero_grad()
        nn.functional.mse_loss(work(x), y).backward()
        sgd.step()
    return dict(work.named_parameters())


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize(
    "sgd_options, with_state",
    [(dict(lr=0.05, weight_decay=0.1), False), (dict(lr=0.05, momentum=0.9), True)],
    ids=["weight_decay", "momentum_buffers"],
)
def test_a_parameter_without_gradient_stays_where_sgd_leaves_it(sgd_options, with_state, strategy):
    from torch_metasgd import reptile_loss

    torch.manual_seed(0)
    model = _WithSpare().double()
    opt = MetaSGD(model.parameters(), **sgd_options)  # fresh step sizes: SGD's steps
    xs, ys = _tasks(seed=40)
    if with_state:  # buffers for every parameter, the spare one's included
        (model(xs[0]).sum() + model.spare(xs[0]).sum()).backward()
        opt.step()
        model.zero_grad()
    buffers = [opt.state[p].get("momentum_buffer") for p in model.parameters()]
    fast = adapt_tasks(model, opt, nn.functional.mse_loss, (xs, ys), steps=2, strategy=strategy)
    expected = [
        _sgd_adapted(model, sgd_options, buffers, xs[t], ys[t], 2) for t in range(xs.shape[0])
    ]
    for name, p in fast.items():
        torch.testing.assert_close(
            p, torch.stack([e[name] for e in expected]).detach(), rtol=1e-12, atol=1e-14
        )
    reptile_loss(
        model, opt, nn.functional.mse_loss, (xs, ys), steps=2, strategy=strategy
    ).backward()
    for name, p in model.named_parameters():
        direction = p.detach() - torch.stack([e[name] for e in expected]).detach().mean(0)
        torch.testing.assert_close(p.grad, direction, rtol=1e-10, atol=1e-14)


def test_a_flag_that_is_not_a_bool_is_rejected_by_every_entry_point():
    from torch_metasgd import MetaLearner, StepSizeTuner, reptile_loss

    model, opt = _make(dict(lr=0.05), False, False)
    xs, ys = _tasks()
    loss_fn = nn.functional.mse_loss
    calls = [
        lambda: meta_loss(model, opt, loss_fn, (xs, ys), (xs, ys), first_order="no"),
        lambda: adapt(model, opt, loss_fn, xs[0], ys[0], first_order="no"),
        lambda: adapt_tasks(model, opt, loss_fn, (xs, ys), first_order="no"),
        lambda: MetaLearner(model, opt, loss_fn, first_order="no"),
        lambda: StepSizeTuner(model, opt, lambda m, b: m(b).sum(), xs[0], first_order="no"),
        lambda: inner_loop(model, opt, first_order="no").__enter__(),
        lambda: inner_loop(model, opt, track_higher_grads="no").__enter__(),
    ]
    for call in calls:
        with pytest.raises(
            ValueError, match=r"Invalid (first_order|track_higher_grads) value: 'no'"
        ):
            call()
    assert all(p.grad is None for p in _wrt(model, opt))
    reptile_loss(model, opt, loss_fn, (xs, ys))  # takes no first_order: always first order


class _Flat(nn.Module):
    """Not a Sequential, no convolution: vmap runs it under "auto"."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(36, 4)

    def forward(self, x):
        return self.linear(x.flatten(1))


@pytest.mark.parametrize(
    "make, inputs, expected, why",
    [
        (_bn1d_mlp, "tensor", "grouped", "task-stacked network runs"),
        (_bn_net, "tensor", "loop", "convolutional network on a CPU"),
        (_Flat, "tensor", "vmap", "is not an nn.Sequential"),
        (_bn1d_mlp, "tuple", "vmap", "inputs are not one tensor"),
    ],
)
def test_strategy_for_says_which_strategy_a_call_runs_and_why(make, inputs, expected, why):
    from unittest import mock

    from torch_metasgd import _grouped, _loop, _vmap, strategy_for

    model = make().double()
    x = torch.randn(3, 4, 1, 6, 6, dtype=torch.double)
    choice = strategy_for(model, x if inputs == "tensor" else (x,))
    assert choice.name == expected and why in choice.reason
    assert strategy_for(model, x, "loop") == ("loop", "asked for")
    with pytest.raises(ValueError, match="Invalid strategy: 'fast'"):
        strategy_for(model, x, "fast")
    if inputs != "tensor":
        return
    opt = MetaSGD(model.parameters(), lr=0.1)
    module = {"grouped": _grouped, "loop": _loop, "vmap": _vmap}[expected]
    with mock.patch.object(module, "adapt_all", wraps=module.adapt_all) as ran:
        meta_loss(model, opt, lambda out, y: out.square().mean(), (x, x), (x, x))
    assert ran.called
