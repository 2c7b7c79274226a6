"""The differentiable Meta-SGD inner loop (higher twin and ``inner_loop``).

Meta-gradients are checked against an unrolled inner loop written by hand with
``torch.autograd.grad(create_graph=True)`` on ``torch.func.functional_call``,
against finite differences (gradcheck) and against the first-order closed
form; the differentiable step's numbers against the in-place ``MetaSGD.step``.
"""

from __future__ import annotations

import copy
import gc
import weakref

import higher
import pytest
import torch
from _options import cases
from _options import options as metasgd_options
from _reference import per_task_meta_loss, ref_inward_clamp, ref_phi
from hypothesis import given, settings
from torch._subclasses.fake_tensor import FakeTensor
from torch.func import functional_call

from torch_metasgd import DifferentiableMetaSGD, MetaSGD, inner_loop

DTYPE = torch.float64


def make_model(seed: int = 0, batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(3, 5)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(5))
    layers += [torch.nn.Tanh(), torch.nn.Linear(5, 1)]
    return torch.nn.Sequential(*layers).to(DTYPE)


def make_task(seed: int = 1, n: int = 8) -> tuple[tuple[torch.Tensor, ...], ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, 3, generator=g, dtype=DTYPE)
    y = torch.sin(x.sum(1, keepdim=True))
    return (x[:n], y[:n]), (x[n:], y[n:])


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


def randomize_step_sizes(opt: MetaSGD, seed: int = 2) -> None:
    """Distinct step sizes per element, so every meta-gradient entry is informative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in opt.meta_parameters():
            s.add_(0.3 * torch.rand(s.shape, generator=g, dtype=s.dtype))


# --------------------------------------------------------------------------
# Independent reference: the unrolled inner loop, written out by hand.
# --------------------------------------------------------------------------


def ref_inner_loop(model, opt, support, steps, *, first_order=False):
    """Fast weights after ``steps`` unrolled Meta-SGD steps from the live weights.

    Every setting is read from ``opt.param_groups``; the arithmetic is written
    out here, independently of torch_metasgd.
    """
    names = [n for n, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    config = {}
    for group in opt.param_groups:
        # The loop is one use of each step size (a "group" one is shared): at a
        # bound its outward gradient is blocked for the loop as a whole.
        alphas = {}
        for p in group["params"]:
            s = opt.step_size(p)
            if id(s) not in alphas:
                alpha = group["lr"] * ref_phi(s, group["parametrization"])
                if group["lr_min"] is not None or group["lr_max"] is not None:
                    alpha = ref_inward_clamp(alpha, group["lr_min"], group["lr_max"])
                alphas[id(s)] = alpha
            config[id(p)] = (group, alphas[id(s)])
    bufs: dict[int, torch.Tensor] = {}
    x, y = support
    for _ in range(steps):
        out = functional_call(model, ({**dict(zip(names, theta, strict=True)), **buffers},), (x,))
        targets = [i for i, p in enumerate(model.parameters()) if id(p) in config]
        grads = torch.autograd.grad(
            mse(out, y), [theta[i] for i in targets], create_graph=not first_order
        )
        new = list(theta)
        for i, g in zip(targets, grads, strict=True):
            group, alpha = config[id(list(model.parameters())[i])]
            p = theta[i].detach() if first_order else theta[i]
            d = -g if group["maximize"] else g
            d = d + group["weight_decay"] * p
            mu = group["momentum"]
            if mu != 0:
                bufs[i] = d if i not in bufs else mu * bufs[i] + (1 - group["dampening"]) * d
                d = d + mu * bufs[i] if group["nesterov"] else bufs[i]
            new[i] = theta[i] - alpha * d
        theta = new
    return names, theta, buffers


def ref_meta_gradients(model, opt, support, query, steps, *, first_order=False):
    names, theta, buffers = ref_inner_loop(model, opt, support, steps, first_order=first_order)
    x, y = query
    loss = mse(
        functional_call(model, ({**dict(zip(names, theta, strict=True)), **buffers},), (x,)), y
    )
    inputs = [*model.parameters(), *opt.meta_parameters()]
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def loop_meta_gradients(model, opt, support, query, steps, **kwargs):
    inputs = [*model.parameters(), *opt.meta_parameters()]
    for t in inputs:
        t.grad = None
    with inner_loop(model, opt, **kwargs) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(mse(fmodel(support[0]), support[1]))
        mse(fmodel(query[0]), query[1]).backward()
    return [t.grad for t in inputs]


def assert_grads_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            assert a is not None
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------
# Meta-gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_meta_gradients_match_hand_written_unrolled_loop(steps, granularity, momentum):
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=momentum, granularity=granularity)
    randomize_step_sizes(opt)
    support, query = make_task()
    expected = ref_meta_gradients(model, opt, support, query, steps)
    actual = loop_meta_gradients(model, opt, support, query, steps)
    assert_grads_close(actual, expected)
    assert all(torch.count_nonzero(g) > 0 for g in actual)


OPTIONS = cases(lr=0.1, skip=("foreach",))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_meta_gradients_match_reference_for_every_option(options):
    model = make_model()
    opt = MetaSGD(model.parameters(), **options)
    randomize_step_sizes(opt)
    support, query = make_task()
    expected = ref_meta_gradients(model, opt, support, query, 2)
    assert_grads_close(loop_meta_gradients(model, opt, support, query, 2), expected)


def test_param_groups_with_different_granularities_and_parametrizations():
    model = make_model()
    first, last = model[0], model[2]
    opt = MetaSGD(
        [
            dict(params=first.parameters(), granularity="element", parametrization="log"),
            dict(params=[last.weight], granularity="tensor", momentum=0.5, lr=0.05),
            dict(params=[last.bias], granularity="group", parametrization="softplus"),
        ],
        lr=0.1,
    )
    randomize_step_sizes(opt)
    support, query = make_task()
    expected = ref_meta_gradients(model, opt, support, query, 3)
    assert_grads_close(loop_meta_gradients(model, opt, support, query, 3), expected)


def test_batchnorm_in_train_mode_uses_batch_statistics():
    model = make_model(batchnorm=True).train()
    running_mean = model[1].running_mean.clone()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9)
    randomize_step_sizes(opt)
    support, query = make_task()
    expected = ref_meta_gradients(model, opt, support, query, 3)
    assert_grads_close(loop_meta_gradients(model, opt, support, query, 3), expected)
    torch.testing.assert_close(model[1].running_mean, running_mean, rtol=0, atol=0)


def test_parameters_outside_the_optimizer_stay_fixed_and_get_meta_gradients():
    model = make_model()
    opt = MetaSGD(model[2].parameters(), lr=0.1)
    support, query = make_task()
    expected = ref_meta_gradients(model, opt, support, query, 2)
    actual = loop_meta_gradients(model, opt, support, query, 2)
    assert_grads_close(actual, expected)
    assert torch.count_nonzero(model[0].weight.grad) > 0


def test_step_size_meta_gradient_passes_gradcheck():
    model = make_model()
    opt = MetaSGD(
        [
            dict(params=model[0].parameters(), parametrization="softplus", momentum=0.9),
            dict(params=model[2].parameters(), granularity="tensor", weight_decay=0.1),
        ],
        lr=0.1,
    )
    randomize_step_sizes(opt)
    support, query = make_task()
    step_sizes = opt.meta_parameters()

    # gradcheck perturbs its inputs in place: those are the live step sizes,
    # which the inner loop reads from the optimizer.
    def query_loss(*inputs):
        assert all(a is b for a, b in zip(inputs, step_sizes, strict=True))
        with inner_loop(model, opt) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(mse(fmodel(support[0]), support[1]))
            return mse(fmodel(query[0]), query[1])

    assert torch.autograd.gradcheck(query_loss, tuple(step_sizes))


def test_copy_initial_weights_cuts_only_the_weights_meta_gradient():
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1)
    support, query = make_task()
    expected = ref_meta_gradients(model, opt, support, query, 2)
    actual = loop_meta_gradients(model, opt, support, query, 2, copy_initial_weights=True)
    n = len(list(model.parameters()))
    assert all(g is None for g in actual[:n])
    assert_grads_close(actual[n:], expected[n:])


def test_tensor_lr_override_receives_its_meta_gradient():
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, granularity="tensor")
    support, query = make_task()
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(mse(fmodel(support[0]), support[1]))
        mse(fmodel(query[0]), query[1]).backward()
    # s = 1 for every tensor, so d/d lr = sum over tensors of d/d s divided by lr.
    expected = sum(g for g in ref_meta_gradients(model, opt, support, query, 1)[4:]) / 0.1
    torch.testing.assert_close(lr.grad, expected)


# --------------------------------------------------------------------------
# first_order
# --------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
@pytest.mark.parametrize(
    "options", [dict(), dict(momentum=0.9, weight_decay=0.1), dict(parametrization="log")]
)
def test_first_order_gradients_match_closed_form(steps, granularity, options):
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, granularity=granularity, **options)
    randomize_step_sizes(opt)
    support, query = make_task()
    params = list(model.parameters())
    s = [opt.step_size(p) for p in params]
    mu, wd = options.get("momentum", 0.0), options.get("weight_decay", 0.0)

    # theta' = theta - alpha * sum_t d_t with the directions d_t held constant:
    # d L/d theta = g_query(theta') and d L/d s = -alpha'(s) * sum_t d_t * g_query.
    with torch.no_grad():
        log = options.get("parametrization") == "log"
        alpha = [0.1 * (si.exp() if log else si) for si in s]
        theta = [p.clone() for p in params]
        total = [torch.zeros_like(p) for p in params]
        bufs = [None] * len(params)
    for _ in range(steps):
        fast = [t.detach().requires_grad_() for t in theta]
        g = torch.autograd.grad(
            mse(
                functional_call(
                    model,
                    dict(zip([n for n, _ in model.named_parameters()], fast, strict=True)),
                    (support[0],),
                ),
                support[1],
            ),
            fast,
        )
        with torch.no_grad():
            for i in range(len(params)):
                d = g[i] + wd * theta[i]
                if mu:
                    bufs[i] = d if bufs[i] is None else mu * bufs[i] + d
                    d = bufs[i]
                total[i] += d
                theta[i] = theta[i] - alpha[i] * d
    fast = [t.detach().requires_grad_() for t in theta]
    names = [n for n, _ in model.named_parameters()]
    gq = torch.autograd.grad(
        mse(functional_call(model, dict(zip(names, fast, strict=True)), (query[0],)), query[1]),
        fast,
    )
    expected_theta = list(gq)
    expected_s: dict[int, torch.Tensor] = {}
    for i in range(len(params)):
        dalpha_ds = alpha[i] if log else torch.full_like(alpha[i], 0.1)
        contribution = -dalpha_ds * total[i] * gq[i]
        if s[i].dim() == 0:
            contribution = contribution.sum()
        expected_s[id(s[i])] = expected_s.get(id(s[i]), 0) + contribution

    actual = loop_meta_gradients(model, opt, support, query, steps, first_order=True)
    expected = expected_theta + [expected_s[id(m)] for m in opt.meta_parameters()]
    assert_grads_close(actual, expected)


def test_first_order_keeps_no_second_order_graph():
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9)
    support, _ = make_task()
    with inner_loop(model, opt, first_order=True) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(support[0]), support[1]))
        buffers = [st["momentum_buffer"] for st in diffopt.state[0].values()]
    assert buffers and all(not b.requires_grad for b in buffers)


# --------------------------------------------------------------------------
# The differentiable step takes MetaSGD.step()'s numbers
# --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(metasgd_options(lr=0.1))
def test_differentiable_step_equals_metasgd_step(options):
    model = make_model()
    twin = copy.deepcopy(model)
    opt = MetaSGD(model.parameters(), **options)
    randomize_step_sizes(opt)
    twin_opt = MetaSGD(twin.parameters(), **options)
    twin_opt.load_state_dict(opt.state_dict())
    support, _ = make_task()
    with inner_loop(twin, twin_opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(3):
            opt.zero_grad()
            mse(model(support[0]), support[1]).backward()
            opt.step()
            diffopt.step(mse(fmodel(support[0]), support[1]))
            for p, fast in zip(model.parameters(), fmodel.parameters(), strict=True):
                torch.testing.assert_close(fast, p, rtol=1e-12, atol=1e-14)


def test_inner_loop_starts_from_and_leaves_the_momentum_buffers():
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.2)
    support, _ = make_task()

    def metasgd_step(model, opt):
        opt.zero_grad()
        mse(model(support[0]), support[1]).backward()
        opt.step()

    for _ in range(2):
        metasgd_step(model, opt)
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    model_after, opt_after = copy.deepcopy((model, opt))
    metasgd_step(model_after, opt_after)
    with inner_loop(model, opt) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(support[0]), support[1]))
        for fast, p in zip(fmodel.parameters(), model_after.parameters(), strict=True):
            torch.testing.assert_close(fast, p, rtol=1e-12, atol=1e-14)
    for p, b in zip(model.parameters(), buffers, strict=True):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=0)


# --------------------------------------------------------------------------
# Plain higher
# --------------------------------------------------------------------------


class UserMetaSGD(MetaSGD):
    """A subclass, as users write them; higher looks twins up by exact type."""


@pytest.mark.parametrize("opt_type", [MetaSGD, UserMetaSGD])
def test_plain_higher_innerloop_ctx_works(opt_type):
    model = make_model()
    opt = opt_type(model.parameters(), lr=0.1, momentum=0.9)
    randomize_step_sizes(opt)
    support, query = make_task()
    expected = ref_meta_gradients(model, opt, support, query, 2)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        assert type(diffopt) is DifferentiableMetaSGD
        for _ in range(2):
            diffopt.step(mse(fmodel(support[0]), support[1]))
        mse(fmodel(query[0]), query[1]).backward()
    actual = [t.grad for t in [*model.parameters(), *opt.meta_parameters()]]
    assert_grads_close(actual, expected)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_inner_loop_rejects_other_optimizers():
    model = make_model()
    with pytest.raises(TypeError, match="SGD"):
        with inner_loop(model, torch.optim.SGD(model.parameters(), lr=0.1)):
            pass


def test_inner_loop_rejects_a_model_the_optimizer_does_not_optimize():
    model, other = make_model(), make_model(seed=3)
    with pytest.raises(ValueError, match="not a parameter of the Sequential model"):
        with inner_loop(model, MetaSGD(other.parameters(), lr=0.1)):
            pass


def test_inner_loop_rejects_online_hypergradient_step_sizes():
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, hypergrad_lr=0.02)
    with pytest.raises(ValueError, match="hypergrad_lr=0.02"):
        with inner_loop(model, opt):
            pass


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def test_evaluation_mode_keeps_no_graph_between_inner_steps():
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    support, _ = make_task()
    with inner_loop(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        previous = []
        for _ in range(20):
            diffopt.step(mse(fmodel(support[0]), support[1]))
            assert all(p.grad_fn is None for p in fmodel.parameters())
            assert all(r() is None for r in previous)
            previous = [weakref.ref(p) for p in fmodel.parameters()]


def count_tensors() -> int:
    """Live tensors with data: dynamo's fake tensors, left by a compiled test that ran
    before in the process, are released at unpredictable later points."""
    gc.collect()
    return sum(
        1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor)
    )


def test_no_graph_outlives_a_meta_iteration():
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9)
    meta_opt = torch.optim.Adam([*model.parameters(), *opt.meta_parameters()], lr=1e-3)
    support, query = make_task()
    previous: list[weakref.ref] = []
    counts = []
    for iteration in range(200):
        meta_opt.zero_grad()
        with inner_loop(model, opt) as (fmodel, diffopt):
            # Freed by reference counting alone, without waiting for gc.
            assert all(r() is None for r in previous)
            for _ in range(3):
                diffopt.step(mse(fmodel(support[0]), support[1]))
            mse(fmodel(query[0]), query[1]).backward()
            previous = [weakref.ref(p) for p in fmodel.parameters(time=-1)]
            previous += [weakref.ref(p) for p in fmodel.parameters(time=1)]
        meta_opt.step()
        if iteration in (10, 199):
            counts.append(count_tensors())
    assert counts[0] == counts[1]


def test_lr_override_during_the_loop_takes_effect_like_a_changed_lr():
    model = make_model()
    twin = copy.deepcopy(model)
    opt = MetaSGD(model.parameters(), lr=0.1, parametrization="log")
    twin_opt = MetaSGD(twin.parameters(), lr=0.1, parametrization="log")
    support, _ = make_task()
    with inner_loop(twin, twin_opt) as (fmodel, diffopt):
        for lr in (0.1, 0.05):
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            mse(model(support[0]), support[1]).backward()
            opt.step()
            diffopt.step(mse(fmodel(support[0]), support[1]), override={"lr": [lr]})
        for p, fast in zip(model.parameters(), fmodel.parameters(), strict=True):
            torch.testing.assert_close(fast, p, rtol=1e-12, atol=1e-14)


def bytes_held_for_the_meta_backward(steps: int, **kwargs) -> int:
    """Bytes of the tensors autograd holds for the query loss's backward after the loop."""
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9)
    support, query = make_task(n=64)
    held: dict[int, int] = {}

    class Saved:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t
            held[id(self)] = t.numel() * t.element_size()

        def __del__(self) -> None:
            held.pop(id(self))

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.t):
        with inner_loop(model, opt, **kwargs) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(mse(fmodel(support[0]), support[1]))
            loss = mse(fmodel(query[0]), query[1])
        total = sum(held.values())
        del loss, fmodel, diffopt
    return total


def test_first_order_and_evaluation_mode_hold_less_memory():
    second_order = [bytes_held_for_the_meta_backward(s) for s in (1, 8)]
    first_order = [bytes_held_for_the_meta_backward(s, first_order=True) for s in (1, 8)]
    evaluation = [bytes_held_for_the_meta_backward(s, track_higher_grads=False) for s in (1, 8)]
    assert second_order[1] > 4 * second_order[0]
    # First order: the query pass plus, per step, the direction (model-sized)
    # that the step sizes' gradient needs; a margin of one more for torch's choices.
    n_weights = sum(p.numel() for p in make_model().parameters())
    assert first_order[1] - first_order[0] <= 7 * 2 * n_weights * 8
    assert first_order[1] < second_order[1] / 4
    assert evaluation[0] == evaluation[1]


@pytest.mark.parametrize("track_higher_grads", [True, False])
def test_inner_loop_adapts_inside_no_grad_without_a_graph(track_higher_grads):
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9)
    randomize_step_sizes(opt)
    support, query = make_task()
    _, expected, _ = ref_inner_loop(model, opt, support, 3, first_order=True)
    with torch.no_grad():
        with inner_loop(model, opt, track_higher_grads=track_higher_grads) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(mse(fmodel(support[0]), support[1]))
            prediction = fmodel(query[0])
        assert not torch.is_grad_enabled()
    for fast, ref in zip(fmodel.parameters(), expected, strict=True):
        torch.testing.assert_close(fast.detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    # No graph reaches the model or the step sizes: a backward stops at the fast weights.
    prediction.sum().backward()
    assert all(p.grad is None for p in [*model.parameters(), *opt.meta_parameters()])


def test_a_step_on_a_loss_that_is_not_a_scalar_raises():
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1)
    support, _ = make_task()
    with inner_loop(model, opt) as (fmodel, diffopt):
        before = [p.detach().clone() for p in fmodel.parameters()]
        with pytest.raises(ValueError, match=r"Invalid loss: got shape \(8, 1\)"):
            diffopt.step((fmodel(support[0]) - support[1]).pow(2))
        for p, b in zip(fmodel.parameters(), before, strict=True):
            assert torch.equal(p, b)


def test_differentiable_twin_rejects_reference_parameters_missing_one_of_the_optimizer():
    model = make_model()
    opt = MetaSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of the reference parameters"):
        DifferentiableMetaSGD(opt, list(model.parameters())[1:])


def test_second_order_through_a_transformer_encoder_layer_matches_autograd():
    # On a CPU torch picks a flash attention kernel whose backward has no
    # derivative: the reference selects the math kernel, inner_loop must too.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
    model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(12, 1)).to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5)
    randomize_step_sizes(opt)
    g = torch.Generator().manual_seed(1)
    xs, xq = (torch.randn(1, 5, 3, 4, generator=g, dtype=DTYPE) for _ in range(2))
    ys, yq = (torch.randn(1, 5, 1, generator=g, dtype=DTYPE) for _ in range(2))
    grads = loop_meta_gradients(model, opt, (xs[0], ys[0]), (xq[0], yq[0]), 2)
    inputs = [*model.parameters(), *opt.meta_parameters()]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = per_task_meta_loss(model, opt, mse, (xs, ys), (xq, yq), steps=2)
        assert_grads_close(grads, torch.autograd.grad(expected, inputs))
