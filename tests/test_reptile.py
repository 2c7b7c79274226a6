"""``reptile_loss`` (``torch_metasgd.reptile``) against hand-written references.

References: k steps of ``torch.optim.SGD`` on a copy of the model per task,
then the paper's interpolation; the one-step closed form; the in-place
``MetaSGD.step`` (itself pinned to torch.optim.SGD and the written-out rule in
``test_optimizer``) on copies, for every option; the first-order step-size
gradient unrolled by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _options import cases
from _reference import ref_phi
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from torch_metasgd import MetaSGD, ReptileLearner, adapt_tasks, meta_loss, reptile_loss

STRATEGIES = ["loop", "vmap", "grouped"]
mse = nn.functional.mse_loss


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)]
    return nn.Sequential(*layers).double()


def _tasks(n_tasks: int = 3, n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tasks, n, 2, generator=g, dtype=torch.double)
    return x, torch.sin(3 * x.sum(-1, keepdim=True))


def _reptile_by_hand(model, opt, support, steps):
    """Reptile by the paper: per task, ``steps`` in-place steps of ``opt`` (torch.optim.SGD
    or MetaSGD) on a copy of the model and the optimizer; returns the mean adapted weights."""
    adapted = []
    for x, y in zip(*support, strict=True):
        work, work_opt = copy.deepcopy((model, opt))
        for _ in range(steps):
            work_opt.zero_grad()
            mse(work(x), y).backward()
            work_opt.step()
        adapted.append([p.detach() for p in work.parameters()])
    return [torch.stack(ps).mean(0) for ps in zip(*adapted, strict=True)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("steps", [1, 3])
def test_matches_torch_sgd_inner_loop_then_interpolation(steps, strategy):
    model, epsilon = _mlp(), 0.3
    before = [p.detach().clone() for p in model.parameters()]
    support = _tasks()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    mean_adapted = _reptile_by_hand(model, sgd, support, steps)
    opt = MetaSGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(model.parameters(), lr=epsilon)
    reptile_loss(model, opt, mse, support, steps=steps, strategy=strategy).backward()
    for p, theta, mean in zip(model.parameters(), before, mean_adapted, strict=True):
        torch.testing.assert_close(p.grad, theta - mean, rtol=1e-10, atol=1e-14)
    outer.step()
    for p, theta, mean in zip(model.parameters(), before, mean_adapted, strict=True):
        torch.testing.assert_close(p, theta + epsilon * (mean - theta), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("parametrization", ["identity", "log", "softplus"])
def test_one_step_one_task_direction_is_step_size_times_support_gradient(parametrization):
    model = _mlp()
    opt = MetaSGD(model.parameters(), lr=0.5, parametrization=parametrization)
    opt.uniform_step_sizes_(0.01, 0.2, generator=torch.Generator().manual_seed(3))
    x, y = _tasks(1)
    grads = torch.autograd.grad(mse(model(x[0]), y[0]), list(model.parameters()))
    reptile_loss(model, opt, mse, (x, y), steps=1).backward()
    for p, g in zip(model.parameters(), grads, strict=True):
        alpha = 0.5 * ref_phi(opt.step_size(p).detach(), parametrization)
        # theta - theta_1 rounds at the scale of theta (about 1).
        torch.testing.assert_close(p.grad, alpha * g, rtol=1e-12, atol=1e-15)


# Every option of MetaSGD, plus param groups with a parameter the optimizer
# does not hold and momentum buffers at call time.
OPTION_CASES = {
    **{name: (options, False, False) for name, options in cases(0.05, skip=("foreach",)).items()},
    "groups_and_frozen": (dict(lr=0.05, momentum=0.5), True, False),
    "momentum_state": (dict(lr=0.05, momentum=0.9, weight_decay=0.01), False, True),
}


def _make(options, split, with_state):
    model = _mlp()
    if split:
        # Two groups with different rules; the last bias is left out of the optimizer.
        groups = [
            {"params": list(model[0].parameters())},
            {"params": [model[2].weight, model[2].bias, model[4].weight], "weight_decay": 0.1},
        ]
        opt = MetaSGD(groups, **options)
    else:
        opt = MetaSGD(model.parameters(), **options)
    opt.uniform_step_sizes_(0.02, 0.08, generator=torch.Generator().manual_seed(4))
    if with_state:
        model(_tasks(1)[0][0]).pow(2).mean().backward()
        opt.step()
        model.zero_grad()
    return model, opt


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_direction_matches_in_place_metasgd_for_every_option(case, strategy):
    options, split, with_state = OPTION_CASES[case]
    model, opt = _make(options, split, with_state)
    support = _tasks()
    mean_adapted = _reptile_by_hand(model, opt, support, 2)
    state = copy.deepcopy(opt.state_dict())
    reptile_loss(model, opt, mse, support, steps=2, strategy=strategy).backward()
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    for p, mean in zip(model.parameters(), mean_adapted, strict=True):
        if id(p) in held:
            torch.testing.assert_close(p.grad, p.detach() - mean, rtol=1e-9, atol=1e-13)
        else:
            torch.testing.assert_close(mean, p.detach(), rtol=0, atol=0)
            assert p.grad is None
    assert all(s.grad is None for s in opt.meta_parameters())  # no query set, no signal
    for index, entry in state["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(opt.state_dict()["state"][index][key], value, rtol=0, atol=0)


def _first_order_step_size_grads(model, opt, support, query, steps):
    """Plain Meta-SGD (identity, per element): dL/ds = -lr * sum_j g_j * grad L_query, by hand."""
    names = [n for n, _ in model.named_parameters()]
    step_sizes = [opt.step_size(p).detach() for p in model.parameters()]
    lr = opt.param_groups[0]["lr"]

    def grads_at(theta, x, y):
        theta = [t.detach().requires_grad_() for t in theta]
        out = functional_call(model, dict(zip(names, theta, strict=True)), (x,))
        return torch.autograd.grad(mse(out, y), theta)

    total = [torch.zeros_like(s) for s in step_sizes]
    for xs, ys, xq, yq in zip(*support, *query, strict=True):
        theta = [p.detach() for p in model.parameters()]
        directions = [torch.zeros_like(t) for t in theta]
        for _ in range(steps):
            grads = grads_at(theta, xs, ys)
            theta = [t - lr * s * g for t, s, g in zip(theta, step_sizes, grads, strict=True)]
            directions = [d + g for d, g in zip(directions, grads, strict=True)]
        query_grads = grads_at(theta, xq, yq)
        total = [a - lr * d * q for a, d, q in zip(total, directions, query_grads, strict=True)]
    return [t / support[0].shape[0] for t in total]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_step_sizes_get_first_order_query_gradient(strategy):
    model = _mlp()
    opt = MetaSGD(model.parameters(), lr=0.5)
    opt.uniform_step_sizes_(0.02, 0.2, generator=torch.Generator().manual_seed(5))
    support, query = _tasks(seed=6), _tasks(seed=7)
    loss = reptile_loss(model, opt, mse, support, query, steps=3, strategy=strategy)
    loss.backward()
    expected = _first_order_step_size_grads(model, opt, support, query, 3)
    for s, g in zip(opt.meta_parameters(), expected, strict=True):
        torch.testing.assert_close(s.grad, g, rtol=1e-9, atol=1e-14)
    # The value: the mean query loss at the adapted weights.
    fast = adapt_tasks(model, opt, mse, support, steps=3, strategy="loop")
    losses = [
        mse(functional_call(model, {n: p[t] for n, p in fast.items()}, (query[0][t],)), query[1][t])
        for t in range(3)
    ]
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["default", "momentum=0.9", "group+softplus+bounds"])
def test_step_size_gradient_equals_first_order_meta_loss(case):
    options, split, with_state = OPTION_CASES[case]
    model, opt = _make(options, split, with_state)
    support, query = _tasks(seed=8), _tasks(seed=9)
    reptile_loss(model, opt, mse, support, query, steps=2).backward()
    step_sizes = opt.meta_parameters()
    first_order = meta_loss(model, opt, mse, support, query, steps=2, first_order=True)
    for s, g in zip(step_sizes, torch.autograd.grad(first_order, step_sizes), strict=True):
        torch.testing.assert_close(s.grad, g, rtol=1e-10, atol=1e-15)


def _conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(27, 4),
    ).double()


def test_strategies_agree_on_a_conv_net_with_batch_norm():
    model = _conv_bn_net()
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(10)
    xs = torch.randn(3, 8, 1, 6, 6, generator=g, dtype=torch.double)
    xq = torch.randn(3, 10, 1, 6, 6, generator=g, dtype=torch.double)
    ys, yq = torch.randint(0, 4, (3, 8), generator=g), torch.randint(0, 4, (3, 10), generator=g)
    wrt = [*model.parameters(), *opt.meta_parameters()]
    results = {}
    for strategy in STRATEGIES:
        loss = reptile_loss(
            model, opt, nn.functional.cross_entropy, (xs, ys), (xq, yq), steps=3, strategy=strategy
        )
        results[strategy] = (loss, torch.autograd.grad(loss, wrt))
    for strategy in ("vmap", "grouped"):
        torch.testing.assert_close(results[strategy][0], results["loop"][0], rtol=1e-10, atol=0)
        for a, b in zip(results[strategy][1], results["loop"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


def test_strategies_agree_in_float32_on_sinusoid_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    opt = MetaSGD(model.parameters(), lr=0.02, granularity="group")
    xs, ys, xq, yq = (torch.randn(8, 10, 1) for _ in range(4))
    grads = {}
    for strategy in STRATEGIES:
        loss = reptile_loss(model, opt, mse, (xs, ys), (xq, yq), steps=3, strategy=strategy)
        grads[strategy] = torch.autograd.grad(loss, list(model.parameters()))
    for strategy in ("vmap", "grouped"):
        for a, b in zip(grads[strategy], grads["loop"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_inside_no_grad_returns_the_loss_alone_and_leaves_every_grad():
    model, opt = _make(dict(lr=0.05, momentum=0.9), False, True)
    support, query = _tasks(seed=14), _tasks(seed=15)
    with torch.no_grad():
        loss = reptile_loss(model, opt, mse, support, query, steps=2)
    assert loss.grad_fn is None and not loss.requires_grad
    expected = reptile_loss(model, opt, mse, support, query, steps=2)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    assert all(t.grad is None for t in [*model.parameters(), *opt.meta_parameters()])


def test_frozen_step_sizes_get_no_gradient_and_change_nothing_else():
    support, query = _tasks(seed=16), _tasks(seed=17)
    grads = {}
    for frozen in (False, True):
        model, opt = _make(dict(lr=0.05), False, False)
        for s in opt.meta_parameters():
            s.requires_grad_(not frozen)
        reptile_loss(model, opt, mse, support, query, steps=2).backward()
        grads[frozen] = [p.grad for p in model.parameters()]
        assert all((s.grad is None) == frozen for s in opt.meta_parameters())
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_under_any_outer_optimizer_accumulates_like_a_gradient():
    model = _mlp()
    opt = MetaSGD(model.parameters(), lr=0.1)
    support = _tasks()
    loss = reptile_loss(model, opt, mse, support, steps=2)
    wrt = list(model.parameters())
    direction = torch.autograd.grad(loss, wrt, retain_graph=True)
    for p in wrt:
        p.grad = torch.ones_like(p)
    loss.backward()
    for p, d in zip(wrt, direction, strict=True):
        torch.testing.assert_close(p.grad, 1 + d, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=-1), "Invalid number of inner steps: -1"),
        (dict(steps=2.5), "Invalid number of inner steps: 2.5"),
        (dict(strategy="threads"), "Invalid strategy: 'threads'"),
        (dict(query=(torch.zeros(2, 6, 2), torch.zeros(2, 6, 1))), "leading task dimension"),
    ],
)
def test_invalid_arguments_raise_before_anything_changes(kwargs, match):
    model, opt = _make(dict(lr=0.05, momentum=0.9), False, True)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        reptile_loss(model, opt, mse, _tasks(), **kwargs)
    assert all(p.grad is None for p in model.parameters())
    for p, before in zip(model.parameters(), params, strict=True):
        torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)
    assert opt.state_dict()["state"].keys() == state["state"].keys()


def test_invalid_support_raises():
    model, opt = _make(dict(lr=0.05), False, False)
    x, y = _tasks()
    with pytest.raises(ValueError, match="support must be a pair"):
        reptile_loss(model, opt, mse, (x,))
    with pytest.raises(TypeError, match="MetaSGD"):
        reptile_loss(model, torch.optim.SGD(model.parameters(), lr=0.1), mse, (x, y))


def _reptile_learner() -> ReptileLearner:
    """The network and its step sizes as one module (learned step sizes, a query set)."""
    net = _mlp()
    opt = MetaSGD(net.parameters(), lr=0.1)
    opt.uniform_step_sizes_(0.02, 0.2, generator=torch.Generator().manual_seed(11))
    return ReptileLearner(net, opt, mse, steps=3)


def test_reptile_learner_is_reptile_loss_with_the_step_sizes_registered():
    learner = _reptile_learner()
    support, query = _tasks(seed=18), _tasks(seed=19)
    params = list(learner.parameters())
    assert params == [*learner.model.parameters(), *learner.opt.meta_parameters()]
    expected = reptile_loss(learner.model, learner.opt, mse, support, query, steps=3)
    expected_grads = torch.autograd.grad(expected, params)
    loss = learner(support, query)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for g, e in zip(torch.autograd.grad(loss, params), expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _ddp_worker(rank: int, world: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    model = DistributedDataParallel(_reptile_learner())
    support, query = _tasks(4, seed=12), _tasks(4, seed=13)
    mine = slice(2 * rank, 2 * rank + 2)
    model((support[0][mine], support[1][mine]), (query[0][mine], query[1][mine])).backward()
    if rank == 0:
        torch.save([p.grad for p in model.module.parameters()], f"{path}.grads")
    # DDP freed and every rank done before the group goes: gloo aborts otherwise.
    del model
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel_averages_to_the_reptile_direction_of_all_tasks(tmp_path):
    # Two processes with two tasks each: DDP's average of their gradients is
    # the single-process gradient over the four tasks.
    path = str(tmp_path / "rendezvous")
    mp.spawn(_ddp_worker, args=(2, path), nprocs=2)
    averaged = torch.load(f"{path}.grads", weights_only=True)
    single = _reptile_learner()
    single(_tasks(4, seed=12), _tasks(4, seed=13)).backward()
    for p, g in zip(single.parameters(), averaged, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-15)


def test_complex_parameters_get_the_sgd_reptile_direction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1)).to(torch.complex128)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 6, 2, generator=g, dtype=torch.complex128)
    y = torch.randn(3, 6, 1, generator=g, dtype=torch.complex128)

    def loss_fn(out, target):
        return (out - target).abs().pow(2).mean()

    before = [p.detach().clone() for p in model.parameters()]
    adapted = []
    for t in range(3):  # torch.optim.SGD, task by task
        work = copy.deepcopy(model)
        sgd = torch.optim.SGD(work.parameters(), lr=0.1)
        for _ in range(2):
            sgd.zero_grad()
            loss_fn(work(x[t]), y[t]).backward()
            sgd.step()
        adapted.append([p.detach() for p in work.parameters()])
    opt = MetaSGD(model.parameters(), lr=0.1)
    for strategy in STRATEGIES:
        model.zero_grad()
        loss = reptile_loss(model, opt, loss_fn, (x, y), steps=2, strategy=strategy)
        assert not loss.is_complex()
        loss.backward()
        for i, p in enumerate(model.parameters()):
            mean = torch.stack([a[i] for a in adapted]).mean(0)
            torch.testing.assert_close(p.grad, before[i] - mean, rtol=1e-10, atol=1e-14)
