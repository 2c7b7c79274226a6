"""Data-parallel meta-training (``torch_metasgd.distributed``) in 2 gloo processes.

The reference is one process with the whole meta-batch (or, for ``StepSizeTuner``,
an unroll written out by hand). The 2-rank runs all happen in one spawn of 2
processes (the ``two_ranks`` fixture, a ``file://`` rendezvous in a temporary
folder), which returns what each rank computed; the tests compare. The
benchmarks run under torchrun on 127.0.0.1.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from torch_metasgd import (
    MetaLearner,
    MetaSGD,
    ReptileLearner,
    StepSizeTuner,
    adapt,
    adapt_tasks,
    average_gradients,
    inner_loop,
)
from torch_metasgd import meta_loss as metasgd_meta_loss

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import _common  # noqa: E402
import sinusoid  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed, gloo"
)

DTYPE = torch.float64
WORLD = 2
TASKS = 4  # a meta-batch: TASKS // WORLD per rank
# name: (model, MetaLearner options, DistributedDataParallel options)
META_LOSS_CASES = {
    "mlp-vmap": ("mlp", dict(strategy="vmap"), {}),
    "mlp-loop": ("mlp", dict(strategy="loop"), {}),
    "mlp-grouped-2-steps-static-graph": (
        "mlp",
        dict(strategy="grouped", steps=2),
        dict(static_graph=True),
    ),
    "mlp-first-order-find-unused": (
        "mlp",
        dict(strategy="vmap", first_order=True),
        dict(find_unused_parameters=True),
    ),
    "mlp-first-layer-held": ("mlp-first-layer", dict(strategy="vmap"), {}),
    "conv-loop": ("conv", dict(strategy="loop"), {}),
}

# name: (model, learner, its options), a rank with no task
ZERO_TASK_CASES = {
    "meta_loss-vmap": ("mlp", MetaLearner, dict(strategy="vmap")),
    "meta_loss-loop-2-steps": ("mlp", MetaLearner, dict(strategy="loop", steps=2)),
    "meta_loss-grouped-conv": ("conv", MetaLearner, dict(strategy="grouped")),
    "reptile-auto": ("mlp", ReptileLearner, dict(steps=2)),
}


# --------------------------------------------------------------------------- problems


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind.startswith("mlp"):
        model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4, track_running_stats=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 3),
        )
    return model.to(DTYPE)


def _learner(kind: str, seed: int = 0) -> tuple[nn.Module, MetaSGD]:
    model = _model(kind, seed)
    # "mlp-first-layer": the optimizer leaves the last layer fixed in the inner loop.
    held = model[0].parameters() if kind == "mlp-first-layer" else model.parameters()
    opt = MetaSGD(held, lr=0.1, momentum=0.5)
    opt.uniform_step_sizes_(0.05, 0.2, generator=torch.Generator().manual_seed(seed))
    return model, opt


def _tasks(kind: str, n_tasks: int, seed: int):
    """``support, query, loss_fn``: ``n_tasks`` tasks of regression (mlp) or 3-way images (conv)."""
    g = torch.Generator().manual_seed(seed)
    if kind.startswith("mlp"):
        xs, ys, xq, yq = (torch.randn(n_tasks, 5, 1, generator=g, dtype=DTYPE) for _ in range(4))
        return (xs, ys), (xq, yq), F.mse_loss
    xs, xq = (torch.randn(n_tasks, 6, 1, 5, 5, generator=g, dtype=DTYPE) for _ in range(2))
    ys, yq = (torch.randint(0, 3, (n_tasks, 6), generator=g) for _ in range(2))
    return (xs, ys), (xq, yq), F.cross_entropy


def _shard(pair, rank: int):
    per_rank = TASKS // WORLD
    return tuple(t[rank * per_rank : (rank + 1) * per_rank] for t in pair)


def _grads(model: nn.Module, opt: MetaSGD) -> list[torch.Tensor]:
    return [t.grad.clone() for t in [*model.parameters(), *opt.meta_parameters()]]


def _state(model: nn.Module, opt: MetaSGD) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *opt.meta_parameters()]]


def _inner_loop_meta_gradients(model, opt, support, query, loss_fn) -> None:
    """A user's loop: one backward per task, the query losses averaged over these tasks."""
    n_tasks = support[0].shape[0]
    for t in range(n_tasks):
        with inner_loop(model, opt) as (fmodel, diffopt):
            diffopt.step(loss_fn(fmodel(support[0][t]), support[1][t]))
            (loss_fn(fmodel(query[0][t]), query[1][t]) / n_tasks).backward()


def _lookahead_problem(rank: int):
    """A linear model and, per rank, 3 training batches and a held-out batch."""
    model = nn.Linear(3, 1).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]]))
        model.bias.fill_(0.05)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(32, 3, generator=g, dtype=DTYPE)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DTYPE)
    return model, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)], (x[24:], y[24:])


# --------------------------------------------------------------------------- what each rank runs


def _rank_runs(rank: int) -> dict:
    torch.set_num_threads(1)
    out: dict = {}

    for name, (kind, options, ddp_options) in META_LOSS_CASES.items():
        model, opt = _learner(kind)
        support, query, loss_fn = _tasks(kind, TASKS, seed=1)
        learner = DistributedDataParallel(
            MetaLearner(model, opt, loss_fn, **options), **ddp_options
        )
        learner(_shard(support, rank), _shard(query, rank)).backward()
        out[f"meta_loss/{name}"] = _grads(model, opt)

    # Rank 0 holds the whole meta-batch, rank 1 none: rank r's loss weighted by
    # R * T_r / T (2 on rank 0, anything on rank 1). Two iterations: the
    # second would fail if the first had left DDP's reducer waiting.
    for name, (kind, learner_type, options) in ZERO_TASK_CASES.items():
        model, opt = _learner(kind)
        support, query, loss_fn = _tasks(kind, TASKS, seed=1)
        learner = DistributedDataParallel(learner_type(model, opt, loss_fn, **options))
        mine = slice(0, TASKS if rank == 0 else 0)
        for _ in range(2):
            learner.zero_grad()
            loss = learner(tuple(t[mine] for t in support), tuple(t[mine] for t in query))
            (WORLD * loss if rank == 0 else loss).backward()
        out[f"zero_tasks/{name}"] = _grads(model, opt)
        out[f"zero_tasks/{name}/loss"] = loss.detach()
    model, opt = _learner("mlp")
    support, _, loss_fn = _tasks("mlp", 0, seed=1)
    fast = adapt_tasks(model, opt, loss_fn, support)
    out["zero_tasks/adapt_tasks"] = {n: tuple(p.shape) for n, p in fast.items()}

    model, opt = _learner("mlp")
    support, query, loss_fn = _tasks("mlp", TASKS, seed=1)
    _inner_loop_meta_gradients(model, opt, _shard(support, rank), _shard(query, rank), loss_fn)
    average_gradients([*model.parameters(), *opt.meta_parameters()])
    out["inner_loop"] = _grads(model, opt)

    # Every rank draws other initial step sizes; DDP starts all from rank 0's.
    model, opt = _learner("mlp", seed=rank)
    out["initial/own"] = _state(model, opt)
    learner = DistributedDataParallel(MetaLearner(model, opt, F.mse_loss))
    out["initial/wrapped"] = _state(model, opt)
    # Then 20 meta-iterations, each rank on its own tasks.
    meta_opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for it in range(20):
        support, query, _ = _tasks("mlp", TASKS // WORLD, seed=1000 * it + rank)
        meta_opt.zero_grad()
        learner(support, query).backward()
        meta_opt.step()
    out["train/meta_loss"] = _state(model, opt)
    out["train/data"] = support[0]

    model, opt = _learner("mlp")
    meta_params = [*model.parameters(), *opt.meta_parameters()]
    meta_opt = torch.optim.Adam(meta_params, lr=1e-2)
    for it in range(20):
        support, query, _ = _tasks("mlp", TASKS // WORLD, seed=1000 * it + rank)
        meta_opt.zero_grad()
        _inner_loop_meta_gradients(model, opt, support, query, F.mse_loss)
        average_gradients(meta_params)
        meta_opt.step()
    out["train/inner_loop"] = _state(model, opt)

    # Online step sizes: every rank on its half of each batch.
    model = _model("mlp")
    opt = MetaSGD(model.parameters(), lr=0.05, parametrization="log", hypergrad_lr=0.1)
    ddp = DistributedDataParallel(model)
    for x, y in _hypergradient_batches():
        opt.zero_grad()
        F.mse_loss(ddp(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
        opt.step()
    out["hypergradient"] = _state(model, opt)

    model, train, held_out = _lookahead_problem(rank)
    opt = MetaSGD(model.parameters(), lr=0.05, granularity="tensor", parametrization="log")
    ddp = DistributedDataParallel(model)
    lookahead = StepSizeTuner(
        ddp,
        opt,
        lambda m, b: F.mse_loss(m(b[0]), b[1]),
        held_out,
        every=1,
        unroll=1,
        meta_optimizer=torch.optim.SGD(opt.meta_parameters(), lr=0.5),
    )
    for i, (x, y) in enumerate(train):
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        opt.step()
        lookahead.step((x, y))
        out[f"lookahead/{i}"] = _state(model, opt)

    # average_gradients: a gradient missing on one rank counts as zeros, one
    # missing everywhere ends as zeros; tiny buckets and two dtypes.
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, 2, requires_grad=True)
    c, d = torch.ones(5, dtype=DTYPE, requires_grad=True), torch.ones(1, requires_grad=True)
    a.grad = torch.full_like(a, float(rank + 1))
    b.grad = torch.full_like(b, 4.0) if rank == 1 else None
    c.grad = torch.arange(5, dtype=DTYPE) * (rank + 1)
    average_gradients([a, b, c, d, a], bucket_mb=12 / 2**20)
    out["average"] = [a.grad, b.grad, c.grad, d.grad]
    return out


def _hypergradient_batches():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        x = torch.randn(16, 1, generator=g, dtype=DTYPE)
        yield x, torch.sin(3 * x)


def _worker(rank: int, folder: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        out = _rank_runs(rank)
        # The DDP wrappers of the runs sit in reference cycles: freed now, not
        # after the group is gone (gloo then aborts the process at exit).
        gc.collect()
        dist.barrier()  # no rank leaves while another still talks: gloo would abort it
    finally:
        dist.destroy_process_group()
    torch.save(out, f"{folder}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(folder),), nprocs=WORLD)
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def _assert_bitwise_equal(xs, ys) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- meta-gradients


@pytest.mark.parametrize("case", list(META_LOSS_CASES))
def test_meta_loss_gradients_of_two_ranks_match_one_process_with_all_tasks(two_ranks, case):
    kind, options, _ = META_LOSS_CASES[case]
    model, opt = _learner(kind)
    support, query, loss_fn = _tasks(kind, TASKS, seed=1)
    metasgd_meta_loss(model, opt, loss_fn, support, query, **options).backward()
    expected = _grads(model, opt)
    for ranks in two_ranks:
        torch.testing.assert_close(ranks[f"meta_loss/{case}"], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", list(ZERO_TASK_CASES))
def test_a_rank_with_no_task_adds_nothing_and_keeps_ddp_in_step(two_ranks, case):
    kind, learner_type, options = ZERO_TASK_CASES[case]
    model, opt = _learner(kind)
    support, query, loss_fn = _tasks(kind, TASKS, seed=1)
    learner_type(model, opt, loss_fn, **options)(support, query).backward()
    expected = _grads(model, opt)
    for ranks in two_ranks:
        torch.testing.assert_close(ranks[f"zero_tasks/{case}"], expected, rtol=1e-12, atol=1e-14)
    assert two_ranks[1][f"zero_tasks/{case}/loss"] == 0


def test_adapt_tasks_on_a_rank_with_no_task_gives_every_parameter_for_none(two_ranks):
    model, _ = _learner("mlp")
    expected = {n: (0, *p.shape) for n, p in model.named_parameters()}
    assert all(ranks["zero_tasks/adapt_tasks"] == expected for ranks in two_ranks)


def test_zero_tasks_in_one_process_are_still_an_error():
    model, opt = _learner("mlp")
    support, query, loss_fn = _tasks("mlp", 0, seed=1)
    with pytest.raises(ValueError, match="Invalid number of tasks: 0"):
        MetaLearner(model, opt, loss_fn)(support, query)


def test_inner_loop_gradients_averaged_over_two_ranks_match_one_process(two_ranks):
    model, opt = _learner("mlp")
    support, query, loss_fn = _tasks("mlp", TASKS, seed=1)
    _inner_loop_meta_gradients(model, opt, support, query, loss_fn)
    expected = _grads(model, opt)
    for ranks in two_ranks:
        torch.testing.assert_close(ranks["inner_loop"], expected, rtol=1e-12, atol=1e-14)


def test_average_gradients_counts_a_missing_gradient_as_zeros(two_ranks):
    expected = [
        torch.full((3,), 1.5),
        torch.full((2, 2), 2.0),
        torch.arange(5, dtype=DTYPE) * 1.5,
        torch.zeros(1),
    ]
    for ranks in two_ranks:
        _assert_bitwise_equal(ranks["average"], expected)


# --------------------------------------------------------------------------- identical ranks


def test_ddp_starts_every_rank_from_rank_0s_weights_and_step_sizes(two_ranks):
    assert not torch.equal(two_ranks[0]["initial/own"][-1], two_ranks[1]["initial/own"][-1])
    for ranks in two_ranks:
        _assert_bitwise_equal(ranks["initial/wrapped"], two_ranks[0]["initial/own"])


@pytest.mark.parametrize("path", ["meta_loss", "inner_loop"])
def test_ranks_are_bitwise_identical_after_20_meta_iterations_on_their_own_tasks(two_ranks, path):
    assert not torch.equal(two_ranks[0]["train/data"], two_ranks[1]["train/data"])
    before = _state(*_learner("mlp"))
    after = two_ranks[0][f"train/{path}"]
    assert all(not torch.equal(x, y) for x, y in zip(before, after, strict=True))
    _assert_bitwise_equal(after, two_ranks[1][f"train/{path}"])


def test_online_step_sizes_under_ddp_follow_one_process_with_the_whole_batch(two_ranks):
    model = _model("mlp")
    opt = MetaSGD(model.parameters(), lr=0.05, parametrization="log", hypergrad_lr=0.1)
    for x, y in _hypergradient_batches():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    expected = _state(model, opt)
    assert not torch.equal(expected[-1], torch.zeros_like(expected[-1]))  # the step sizes moved
    _assert_bitwise_equal(two_ranks[0]["hypergradient"], two_ranks[1]["hypergradient"])
    torch.testing.assert_close(two_ranks[0]["hypergradient"], expected, rtol=1e-10, atol=1e-12)


def test_lookahead_under_ddp_steps_along_the_ranks_mean_held_out_meta_gradient(two_ranks):
    lr, meta_lr = 0.05, 0.5
    problems = [_lookahead_problem(rank) for rank in range(WORLD)]
    w0, b0 = (p.detach() for p in problems[0][0].parameters())

    def grad_of_mse(w, b, x, y):
        return torch.func.grad(lambda wb: F.mse_loss(x @ wb[0].T + wb[1], y))((w, b))

    # The training step, on DDP's averaged gradient.
    train_grads = [grad_of_mse(w0, b0, *train[0]) for _, train, _ in problems]
    w = w0 - lr * sum(g[0] for g in train_grads) / WORLD
    b = b0 - lr * sum(g[1] for g in train_grads) / WORLD
    # Each rank's unroll on its batch and its held-out loss, written out.
    log_alphas = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    meta_grads = []
    for _, train, (xh, yh) in problems:
        gw, gb = grad_of_mse(w, b, *train[0])
        w1 = w - lr * log_alphas[0].exp() * gw
        b1 = b - lr * log_alphas[1].exp() * gb
        meta_grads.append(torch.autograd.grad(F.mse_loss(xh @ w1.T + b1, yh), log_alphas)[0])
    expected = -meta_lr * sum(meta_grads) / WORLD

    torch.testing.assert_close(
        torch.stack(two_ranks[0]["lookahead/0"][-2:]), expected, rtol=1e-12, atol=1e-14
    )
    for i in range(3):
        _assert_bitwise_equal(two_ranks[0][f"lookahead/{i}"], two_ranks[1][f"lookahead/{i}"])


# --------------------------------------------------------------------------- one process


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def _wrapped_model_calls(model, opt):
    x, y = torch.randn(2, 5, 1, dtype=DTYPE), torch.randn(2, 5, 1, dtype=DTYPE)
    return {
        "meta_loss": lambda: metasgd_meta_loss(model, opt, F.mse_loss, (x, y), (x, y)),
        "adapt": lambda: adapt(model, opt, F.mse_loss, x[0], y[0]),
        "inner_loop": lambda: inner_loop(model, opt).__enter__(),
        "MetaLearner": lambda: MetaLearner(model, opt, F.mse_loss),
    }


@pytest.mark.parametrize("wrapper", ["DistributedDataParallel", "DataParallel"])
@pytest.mark.parametrize("call", ["meta_loss", "adapt", "inner_loop", "MetaLearner"])
def test_a_data_parallel_model_raises_naming_the_supported_ways(one_rank, wrapper, call):
    model, opt = _learner("mlp")
    wrapped = getattr(nn.parallel, wrapper)(model)
    before = _state(model, opt)
    with pytest.raises(TypeError, match=f"{call} got a model wrapped in {wrapper}") as error:
        _wrapped_model_calls(wrapped, opt)[call]()
    assert "MetaLearner(model, opt, loss_fn)" in str(error.value)
    assert "average_gradients" in str(error.value)
    _assert_bitwise_equal(_state(model, opt), before)
    assert all(t.grad is None for t in [*model.parameters(), *opt.meta_parameters()])


def test_average_gradients_in_one_process_group_of_one_rank_keeps_the_gradients(one_rank):
    a = torch.ones(3, requires_grad=True)
    a.grad = torch.tensor([1.0, -2.0, 0.25])
    average_gradients([a])
    assert torch.equal(a.grad, torch.tensor([1.0, -2.0, 0.25]))


def test_average_gradients_without_a_process_group_raises():
    a = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        average_gradients([a])


def test_average_gradients_rejects_a_sparse_gradient_and_a_bad_bucket(one_rank):
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    a.grad = torch.ones(3)
    b.grad = torch.ones(3).to_sparse()
    with pytest.raises(ValueError, match="Invalid gradient: sparse"):
        average_gradients([a, b])
    with pytest.raises(ValueError, match="Invalid bucket_mb value: 0"):
        average_gradients([a], bucket_mb=0)


# --------------------------------------------------------------------------- MetaLearner


def test_meta_learner_registers_the_optimizers_own_step_sizes():
    model, opt = _learner("mlp")
    learner = MetaLearner(model, opt, F.mse_loss)
    ids = [id(t) for t in learner.parameters()]
    assert ids == [id(t) for t in [*model.parameters(), *opt.meta_parameters()]]


def test_meta_learner_forward_is_meta_loss():
    model, opt = _learner("conv")
    support, query, loss_fn = _tasks("conv", 3, seed=2)
    learner = MetaLearner(model, opt, loss_fn, steps=2, first_order=True)
    expected = metasgd_meta_loss(model, opt, loss_fn, support, query, steps=2, first_order=True)
    assert torch.equal(learner(support, query), expected)


def test_meta_learner_state_dict_loads_into_the_live_step_sizes():
    model, opt = _learner("mlp", seed=0)
    saved = MetaLearner(model, opt, F.mse_loss).state_dict()
    model, opt = _learner("mlp", seed=1)
    live = opt.meta_parameters()
    MetaLearner(model, opt, F.mse_loss).load_state_dict(saved)
    assert [id(s) for s in opt.meta_parameters()] == [id(s) for s in live]
    _assert_bitwise_equal(_state(model, opt), _state(*_learner("mlp", seed=0)))


def test_meta_learner_validates_before_wrapping():
    model, opt = _learner("mlp")
    for learner in (MetaLearner, ReptileLearner):
        with pytest.raises(ValueError, match="Invalid strategy: 'threads'"):
            learner(model, opt, F.mse_loss, strategy="threads")
        bilinear = nn.Bilinear(1, 1, 1)
        with pytest.raises(ValueError, match='strategy="grouped" needs an nn.Sequential'):
            learner(bilinear, MetaSGD(bilinear.parameters()), F.mse_loss, strategy="grouped")
        recurrent = nn.GRU(1, 1)
        with pytest.raises(ValueError, match='strategy="vmap" cannot run GRU'):
            learner(recurrent, MetaSGD(recurrent.parameters()), F.mse_loss, strategy="vmap")
    with pytest.raises(ValueError, match="Invalid number of inner steps: -1"):
        MetaLearner(model, opt, F.mse_loss, steps=-1)
    with pytest.raises(ValueError, match="is not a parameter of"):
        MetaLearner(nn.Linear(1, 1), opt, F.mse_loss)
    with pytest.raises(TypeError, match="needs a torch_metasgd.MetaSGD"):
        MetaLearner(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss)


# --------------------------------------------------------------------------- benchmarks


def test_shards_partition_the_meta_batch_and_weigh_to_its_mean_loss(monkeypatch):
    world, n_tasks = 3, 7
    losses = torch.rand(n_tasks, dtype=DTYPE)
    tasks = torch.arange(n_tasks)
    monkeypatch.setattr(_common, "world_size", lambda: world)
    seen, total = [], 0.0
    for r in range(world):
        monkeypatch.setattr(_common, "rank", lambda r=r: r)
        (xs, _), (xq, _), weight = _common.shard((tasks, tasks), (tasks, tasks))
        assert torch.equal(xs, xq)
        seen += xs.tolist()
        total += weight * losses[xs].mean() / world
    assert seen == tasks.tolist()
    torch.testing.assert_close(total, losses.mean(), rtol=1e-14, atol=0)


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--local-addr", "127.0.0.1", "--nproc-per-node", str(WORLD)]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run(
        [*command, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_sinusoid_under_torchrun_trains_as_one_process_and_reports_identical_ranks(tmp_path):
    # 5 tasks: shards of 3 and 2.
    args = ["--iterations", "20", "--meta-batch", "5", "--eval-tasks", "10", "--shots", "5"]
    args += ["--methods", "metasgd", "--log-every", "5", "--no-plot"]
    run = _torchrun("sinusoid.py", *args, "--out", str(tmp_path / "two"))
    alone = sinusoid.main([*args, "--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "sinusoid.json").read_text())
    assert run.stdout.count("wrote") == 1  # rank 0 alone prints
    assert (two["world_size"], two["ranks_identical"]) == (2, True)
    assert (alone["world_size"], alone["ranks_identical"]) == (1, True)
    curve_two = two["train"]["metasgd"]["5"]["curve"]
    curve_one = alone["train"]["metasgd"]["5"]["curve"]
    assert [i for i, _ in curve_two] == [i for i, _ in curve_one] == [5, 10, 15, 20]
    assert [v for _, v in curve_two] == pytest.approx([v for _, v in curve_one], rel=1e-5)
    mse = two["mse"]["metasgd"]["5"]["mean"]
    assert mse == pytest.approx(alone["mse"]["metasgd"]["5"]["mean"], rel=1e-5)


@pytest.mark.slow
def test_omniglot_under_torchrun_trains_as_one_process_and_saves_on_rank_0(tmp_path):
    import omniglot
    from test_omniglot import fake_set

    fake_set(tmp_path, "images_background_small1", {"Greek": 8})
    fake_set(tmp_path, "images_background_small2", {"Tagalog": 2})
    args = ["--data", str(tmp_path), "--cache", str(tmp_path / "cache"), "--ways", "5"]
    args += ["--shots", "1", "--methods", "metasgd", "--iterations", "4", "--meta-batch", "2"]
    args += ["--log-every", "2", "--eval-episodes", "3", "--val-fraction", "0.25"]
    args += ["--val-every", "2", "--val-episodes", "2", "--augment"]
    _torchrun("omniglot.py", *args, "--out", str(tmp_path / "two"), "--save", str(tmp_path / "c"))
    alone = omniglot.main([*args, "--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "omniglot.json").read_text())
    assert (two["world_size"], two["ranks_identical"]) == (2, True)
    curve_two, curve_one = two["runs"][0]["curve"], alone["runs"][0]["curve"]
    assert [v for _, v in curve_two] == pytest.approx([v for _, v in curve_one], rel=1e-5)
    # Every rank validates the same model on the same episodes, and keeps the same checkpoint.
    val_two, val_one = two["runs"][0]["val_curve"], alone["runs"][0]["val_curve"]
    assert [acc for _, acc, _ in val_two] == pytest.approx([acc for _, acc, _ in val_one])
    assert two["runs"][0]["accuracy"] == pytest.approx(alone["runs"][0]["accuracy"])
    assert set(torch.load(tmp_path / "c", weights_only=True)) == {"model", "metasgd", "config"}


def test_ddp_benchmark_help_shows_every_default():
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ddp.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0
    for option in ("--quick", "--device", "--processes", "--repeats", "--rounds", "--out"):
        assert option in run.stdout
    assert run.stdout.count("(default:") >= 8


@pytest.mark.slow
def test_ddp_benchmark_ways_agree_with_one_process_and_write_json_and_png(tmp_path):
    args = ["--workloads", "W1", "--repeats", "1", "--rounds", "1", "--warmup", "0"]
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ddp.py"), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    payload = json.loads((tmp_path / "ddp.json").read_text())
    for processes in ("1", "2"):
        assert max(payload["agreement"][processes]["W1"].values()) < 1e-5
    assert set(payload["seconds_per_iteration"]["wall"]["2"]["W1"]) == {
        "meta_loss ddp",
        "meta_loss avg",
        "inner_loop avg",
        "inner_loop ddp",
    }
    assert (tmp_path / "ddp.png").stat().st_size > 1000
