"""FSDP2-sharded ``MetaSGD`` and ``torch.distributed.checkpoint`` (DCP) in 2 gloo processes.

The model is a 16-33-1 MLP in float64, each ``Linear`` and the root sharded by
``fully_shard`` on a 2-rank mesh: 33 rows split 17/16, and the output layer's
one row leaves rank 1 an empty shard. Each rank trains on its half of every
global batch, so the gradients FSDP2 reduces are those of the whole batch;
the reference is one process with the unsharded model on the whole batch.
Sums over shards are reordered there, so sharded runs match it to float
tolerance, not bitwise; a checkpoint resumed with the world size it was saved
with is bitwise the uninterrupted run.

All 2-rank runs happen in one spawn of 2 processes (the ``two_ranks``
fixture, a ``file://`` rendezvous in a temporary folder, a timeout), which
returns what each rank computed, and leaves its checkpoints for the tests
that resume them in this process (resharding, 2 ranks to 1).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from torch_metasgd import (
    MetaLearner,
    MetaSGD,
    _engine,
    adapt,
    adapt_tasks,
    hypergradient,
    inner_loop,
    meta_loss,
)

try:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without torch.distributed or FSDP2
    fully_shard = None

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    fully_shard is None or not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo and FSDP2 (fully_shard)",
)

DTYPE = torch.float64
WORLD = 2
LR = 0.05
STEPS = 8
#: Steps before a checkpoint, and after it.
SAVED_AT, AFTER = 10, 5
#: How long the 2-rank runs may take before the fixture gives up on them.
TIMEOUT_S = 300

DIRECTIONS = {
    "sgd": {},
    "momentum": dict(momentum=0.9),
    "nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=0.1),
}
#: Every granularity, parametrization and update path, plain and online.
CONFIGS = {
    "sgd-momentum": dict(momentum=0.9),
    "sgd-dampening-wd-maximize": dict(momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True),
    "tensor-nesterov": dict(granularity="tensor", momentum=0.9, nesterov=True),
    "group-log-wd": dict(granularity="group", parametrization="log", weight_decay=0.1),
    "element-softplus-bounds": dict(parametrization="softplus", lr_min=0.04, lr_max=0.055),
    "single-tensor": dict(momentum=0.5, foreach=False),
    "fused": dict(momentum=0.9, fused=True),
    "tensor-lr": dict(lr=torch.tensor(LR), momentum=0.9, parametrization="log"),
    "online-element-identity": dict(hypergrad_lr=0.1),
    "online-element-log-momentum": dict(parametrization="log", momentum=0.9, hypergrad_lr=0.1),
    "online-element-softplus-nesterov-wd": dict(
        parametrization="softplus", momentum=0.9, nesterov=True, weight_decay=0.1, hypergrad_lr=0.1
    ),
    # A rate at which the elements reach the cap above their tensor's geometric mean.
    "online-element-capped": dict(parametrization="log", hypergrad_lr=1.0),
    "online-element-bounds": dict(hypergrad_lr=0.1, lr_min=0.03, lr_max=0.08),
    "online-tensor-log-momentum": dict(
        granularity="tensor", parametrization="log", momentum=0.9, hypergrad_lr=0.1
    ),
    "online-tensor-identity-maximize": dict(granularity="tensor", maximize=True, hypergrad_lr=0.1),
    "online-group-softplus": dict(
        granularity="group", parametrization="softplus", hypergrad_lr=0.1
    ),
    "online-group-identity-momentum-bounds": dict(
        granularity="group", momentum=0.9, lr_max=0.07, hypergrad_lr=0.1
    ),
    "online-fused-nesterov": dict(momentum=0.9, nesterov=True, fused=True, hypergrad_lr=0.1),
    "online-single-tensor-dampening": dict(
        momentum=0.9, dampening=0.5, foreach=False, hypergrad_lr=0.1
    ),
    "online-tensor-lr": dict(lr=torch.tensor(LR), granularity="tensor", hypergrad_lr=0.1),
}
#: With ``-m slow``: every online combination of granularity, parametrization,
#: bounds and direction, and a second compiled step (each compiles once).
SLOW_CONFIGS = {
    "online-fused-momentum": dict(momentum=0.9, fused=True, hypergrad_lr=0.1, granularity="tensor"),
    **{
        f"online-{granularity}-{phi}-{bounds}-{direction}": dict(
            granularity=granularity,
            parametrization=phi,
            hypergrad_lr=0.1,
            **({"lr_min": 0.03, "lr_max": 0.08} if bounds == "bounded" else {}),
            **DIRECTIONS[direction],
        )
        for granularity, phi, bounds, direction in itertools.product(
            ("element", "tensor", "group"),
            ("identity", "log", "softplus"),
            ("unbounded", "bounded"),
            DIRECTIONS,
        )
    },
}
#: Run in float32 too: the unsharded reference then takes the fast workspace
#: (torch_metasgd/_engine.py), the sharded run the rule tensor by tensor.
FLOAT32 = ["online-element-log-momentum", "online-tensor-log-momentum", "online-group-softplus"]
#: Checkpointed, as in tests/test_checkpoint.py: plain and online state of every kind.
CHECKPOINTS = {
    "momentum": dict(momentum=0.9),
    "dampening-wd": dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    "online-element": dict(momentum=0.9, hypergrad_lr=0.1, parametrization="log"),
    "online-tensor-nesterov": dict(
        momentum=0.9, nesterov=True, hypergrad_lr=0.1, granularity="tensor"
    ),
    "online-group": dict(hypergrad_lr=0.1, granularity="group", parametrization="softplus"),
}
#: How the 2 ranks hold the model, and how DCP flattens the optimizer's state
#: (torchtitan flattens it).
LAYOUTS = {"fsdp2": False, "fsdp2-flat": True, "ddp": False}


# --------------------------------------------------------------------------- problems


def _mlp(dtype: torch.dtype = DTYPE, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 1)).to(dtype)


def _sharded(model: nn.Module) -> nn.Module:
    """``model`` with each ``Linear`` and the root sharded over all ranks (FSDP2)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _laid_out(layout: str, model: nn.Module) -> nn.Module:
    if layout == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return _sharded(model)


def _optimizer(model: nn.Module, options: dict) -> MetaSGD:
    options = {"lr": LR, **options}
    if isinstance(options["lr"], torch.Tensor):
        options["lr"] = options["lr"].clone()
    return MetaSGD(model.parameters(), **options)


def _drawn(opt: MetaSGD) -> MetaSGD:
    """``opt`` with step sizes drawn at random (the same on every rank and in every run):
    an element's step size must meet its own element, and bounds bind."""
    return opt.uniform_step_sizes_(0.03, 0.07, generator=torch.Generator().manual_seed(11))


def _batches(seed: int, steps: int, dtype: torch.dtype = DTYPE):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g, dtype=DTYPE)
        yield x.to(dtype), (x[:, :1] * 3).sin().to(dtype)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int | None) -> torch.Tensor:
    """The mean squared error of the whole batch, or (``rank``) of the rank's half of it."""
    if rank is not None:
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    return F.mse_loss(model(x), y)


def _train(
    model, opt, seed: int, steps: int, rank: int | None = None, dtype=DTYPE, in_turn=False
) -> None:
    """``steps`` steps; ``in_turn``: the ranks take each ``opt.step()`` one after the other
    (a step without collectives), so that rank 1 compiles where rank 0 has compiled."""
    for x, y in _batches(seed, steps, dtype):
        opt.zero_grad()
        _loss(model, x, y, rank).backward()
        for turn in range(WORLD if in_turn else 1):
            if not in_turn or turn == rank:
                opt.step()
            if in_turn:
                dist.barrier()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank calls it)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _snapshot(model: nn.Module, opt: MetaSGD) -> dict:
    """Weights, step sizes and every state entry, whole."""
    params = list(model.parameters())
    return {
        "params": [_whole(p) for p in params],
        "step_sizes": [_whole(opt.step_size(p)) for p in params],
        "state": [{k: _whole(v) for k, v in sorted(opt.state[p].items())} for p in params],
    }


def _layout(model: nn.Module, opt: MetaSGD) -> list[dict]:
    """Per parameter: how it, its step size and its state are laid out on this rank."""

    def of(t):
        if isinstance(t, DTensor):
            return ("DTensor", tuple(t.placements), tuple(t.to_local().shape))
        return ("Tensor", None, tuple(t.shape))

    return [
        {"param": of(p), "step_size": of(opt.step_size(p))}
        | {k: of(v) for k, v in opt.state[p].items() if k != "step_size"}
        for p in model.parameters()
    ]


def _save(model, opt, folder: Path, flatten: bool) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.save(state, checkpoint_id=str(folder))


def _load(model, opt, folder: Path, flatten: bool) -> None:
    """Resume into ``model`` and ``opt`` as DCP's documentation shows."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"], options=options)


def _meta_learner(seed: int = 0):
    """An MLP, its MetaSGD (element step sizes drawn at random) and the outer Adam."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.1)
    opt.uniform_step_sizes_(0.05, 0.2, generator=torch.Generator().manual_seed(seed))
    return model, opt


def _meta_train(learner, meta_opt, seed: int, iterations: int, rank: int | None) -> None:
    """Meta-iterations on 4 sinusoid tasks each; with ``rank``, on the rank's 2 of them."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        x = torch.rand(4, 10, 1, generator=g, dtype=DTYPE) * 10 - 5
        y = torch.sin(x + torch.rand(4, 1, 1, generator=g, dtype=DTYPE) * 3)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        meta_opt.zero_grad()
        learner((x[:, :5], y[:, :5]), (x[:, 5:], y[:, 5:])).backward()
        meta_opt.step()


def _meta_state(learner: nn.Module, meta_opt: torch.optim.Optimizer) -> dict:
    return {
        "params": [_whole(p) for p in learner.parameters()],
        "adam": [
            {k: _whole(v) for k, v in sorted(meta_opt.state[p].items())}
            for p in learner.parameters()
        ],
    }


def _one_process_checkpoint(name: str, folder: Path) -> None:
    """The unsharded run of ``name`` saved at step SAVED_AT (resumed by 2 FSDP2 ranks)."""
    model = _mlp()
    opt = _optimizer(model, CHECKPOINTS[name])
    _train(model, opt, seed=1, steps=SAVED_AT)
    _save(model, opt, folder / f"one-{name}", flatten=False)


# --------------------------------------------------------------------------- what each rank runs


def _rank_runs(rank: int, folder: Path, slow: bool) -> dict:
    torch.set_num_threads(1)
    out: dict = {}

    for name, options in {**CONFIGS, **(SLOW_CONFIGS if slow else {})}.items():
        dtypes = [DTYPE, torch.float32] if name in FLOAT32 else [DTYPE]
        for dtype in dtypes:
            model = _sharded(_mlp(dtype))
            opt = _drawn(_optimizer(model, options))
            # fused=True compiles its step at the second one: rank 0 first, with
            # inductor's caches (shared by the ranks) then warm for rank 1's.
            in_turn = options.get("fused") and not options.get("hypergrad_lr")
            _train(model, opt, seed=1, steps=STEPS, rank=rank, dtype=dtype, in_turn=in_turn)
            key = name if dtype is DTYPE else f"{name}/float32"
            out[f"steps/{key}"] = _snapshot(model, opt)
            out[f"layout/{key}"] = _layout(model, opt)

    # A NaN in the gradient of one element of rank 1's shard, at the last step.
    for granularity in ("element", "tensor", "group"):
        model = _sharded(_mlp())
        opt = _optimizer(model, dict(momentum=0.9, hypergrad_lr=0.1, granularity=granularity))
        _train(model, opt, seed=1, steps=STEPS - 1, rank=rank)
        before = _snapshot(model, opt)
        x, y = next(iter(_batches(seed=2, steps=1)))
        opt.zero_grad()
        _loss(model, x, y, rank).backward()
        if rank == 1:
            model[0].weight.grad.to_local()[NAN_ROW - 17, NAN_COLUMN] = float("nan")
        opt.step()
        out[f"nan/{granularity}"] = (before, _snapshot(model, opt))

    # Drawn step sizes: rank 0's draw, whatever each rank's random state.
    for granularity in ("element", "tensor"):
        model = _sharded(_mlp())
        opt = _optimizer(model, dict(granularity=granularity))
        opt.uniform_step_sizes_(0.01, 0.1, generator=torch.Generator().manual_seed(3))
        out[f"uniform/{granularity}/seeded"] = _snapshot(model, opt)["step_sizes"]
        torch.manual_seed(100 + rank)
        opt.uniform_step_sizes_(0.01, 0.1)
        out[f"uniform/{granularity}/unseeded"] = [
            opt.step_size(p).to_local().clone() for p in model.parameters()
        ]

    for layout, flatten in LAYOUTS.items():
        for name, options in CHECKPOINTS.items():
            model = _laid_out(layout, _mlp())
            opt = _optimizer(model, options)
            _train(model, opt, seed=1, steps=SAVED_AT, rank=rank)
            _save(model, opt, folder / f"{layout}-{name}", flatten)
            _train(model, opt, seed=2, steps=AFTER, rank=rank)
            out[f"dcp/{layout}/{name}/uninterrupted"] = _snapshot(model, opt)
            model = _laid_out(layout, _mlp(seed=5))
            opt = _optimizer(model, options)
            _load(model, opt, folder / f"{layout}-{name}", flatten)
            _train(model, opt, seed=2, steps=AFTER, rank=rank)
            out[f"dcp/{layout}/{name}/resumed"] = _snapshot(model, opt)

    # Resharding the other way: one process's checkpoint resumed by 2 FSDP2 ranks.
    for name, options in CHECKPOINTS.items():
        model = _sharded(_mlp(seed=5))
        opt = _optimizer(model, options)
        _load(model, opt, folder / f"one-{name}", flatten=False)
        _train(model, opt, seed=2, steps=AFTER, rank=rank)
        out[f"dcp/from-one/{name}"] = _snapshot(model, opt)

    # Meta-learning: DDP(MetaLearner), the model, its step sizes and the outer Adam.
    runs = {}
    for run in ("uninterrupted", "resumed"):
        model, opt = _meta_learner(seed=0 if run == "uninterrupted" else 5)
        learner = nn.parallel.DistributedDataParallel(MetaLearner(model, opt, F.mse_loss))
        meta_opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
        if run == "uninterrupted":
            _meta_train(learner, meta_opt, seed=1, iterations=3, rank=rank)
            _save(learner, meta_opt, folder / "meta-learner", flatten=False)
        else:
            _load(learner, meta_opt, folder / "meta-learner", flatten=False)
        _meta_train(learner, meta_opt, seed=2, iterations=2, rank=rank)
        out[f"meta/{run}"] = _meta_state(learner, meta_opt)
        runs[run] = learner
    del runs
    return out


NAN_ROW, NAN_COLUMN = 20, 3  # row 20 of the first layer's 33: rank 1's rows are 17 to 32


def _worker(rank: int, folder: str, slow: bool) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        out = _rank_runs(rank, Path(folder), slow)
        # The DDP wrappers sit in reference cycles: freed now, not after the
        # group is gone (gloo then aborts the process at exit).
        gc.collect()
        dist.barrier()  # no rank leaves while another still talks: gloo would abort it
    except BaseException:
        (Path(folder) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    torch.save(out, f"{folder}/rank{rank}.pt")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This process's references are tiny: a second thread would only contend with the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory) -> tuple[list[dict], Path]:
    folder = tmp_path_factory.mktemp("sharded")
    # The slow runs only where this session runs a slow test of this module.
    slow = any(
        item.module is request.module and item.get_closest_marker("slow")
        for item in request.session.items
    )
    for name in CHECKPOINTS:
        _one_process_checkpoint(name, folder)
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=_worker, args=(r, str(folder), slow)) for r in range(WORLD)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + TIMEOUT_S
    for process in ranks:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [process for process in ranks if process.is_alive()]
    for process in hung:
        process.kill()
        process.join()
    errors = [(folder / f"rank{r}.error") for r in range(WORLD)]
    errors = "\n".join(e.read_text() for e in errors if e.exists())
    assert not hung, f"the 2-rank runs took over {TIMEOUT_S} s\n{errors}"
    codes = [process.exitcode for process in ranks]
    assert codes == [0] * WORLD, (
        f"the ranks exited with {codes} (-11: a segmentation fault)\n{errors}"
    )
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)], folder


# --------------------------------------------------------------------------- comparisons


def _assert_same_run(run, expected, *, bitwise: bool, rtol: float = 1e-10, atol: float = 1e-12):
    assert len(run["params"]) == len(expected["params"])
    for entry, entry_expected in zip(run["state"], expected["state"], strict=True):
        assert entry.keys() == entry_expected.keys()
    if bitwise:
        for key in ("params", "step_sizes"):
            for x, y in zip(run[key], expected[key], strict=True):
                assert torch.equal(x, y), key
        for entry, entry_expected in zip(run["state"], expected["state"], strict=True):
            for key, value in entry.items():
                assert torch.equal(value, entry_expected[key]), key
        return
    torch.testing.assert_close(run, expected, rtol=rtol, atol=atol)


def _assert_ranks_identical(two_ranks, key: str) -> None:
    ranks, _ = two_ranks
    _assert_same_run(ranks[1][key], ranks[0][key], bitwise=True)


def _unsharded(options: dict, dtype: torch.dtype = DTYPE) -> dict:
    model = _mlp(dtype)
    opt = _drawn(_optimizer(model, options))
    _train(model, opt, seed=1, steps=STEPS, dtype=dtype)
    return _snapshot(model, opt)


# --------------------------------------------------------------------------- stepping


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_configuration_steps_fsdp2_parameters_as_one_process_on_the_whole_batch(
    two_ranks, name
):
    ranks, _ = two_ranks
    expected = _unsharded(CONFIGS[name])
    if CONFIGS[name].get("hypergrad_lr"):
        model = _mlp()
        opt = _drawn(_optimizer(model, CONFIGS[name]))
        drawn = [opt.step_size(p) for p in model.parameters()]
        assert not any(map(torch.equal, drawn, expected["step_sizes"])), "a step size stayed"
    for rank in range(WORLD):
        _assert_same_run(ranks[rank][f"steps/{name}"], expected, bitwise=False)
    _assert_ranks_identical(two_ranks, f"steps/{name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CONFIGS))
def test_every_online_combination_learns_on_fsdp2_shards_what_one_process_learns(two_ranks, name):
    ranks, _ = two_ranks
    expected = _unsharded(SLOW_CONFIGS[name])
    for rank in range(WORLD):
        _assert_same_run(ranks[rank][f"steps/{name}"], expected, bitwise=False)
    _assert_ranks_identical(two_ranks, f"steps/{name}")


@pytest.mark.parametrize("name", FLOAT32)
def test_online_float32_shards_learn_what_one_processs_fast_workspace_learns(two_ranks, name):
    ranks, _ = two_ranks
    expected = _unsharded(CONFIGS[name], torch.float32)
    for rank in range(WORLD):
        run = ranks[rank][f"steps/{name}/float32"]
        _assert_same_run(run, expected, bitwise=False, rtol=1e-5, atol=1e-6)


def test_the_cap_above_a_tensors_geometric_mean_binds_in_the_capped_run(monkeypatch):
    # So that the sharded run matching this one (above) shows its means are
    # over the whole tensors: the cap changes the step sizes it learns.
    capped = _unsharded(CONFIGS["online-element-capped"])
    for module in (hypergradient, _engine):
        monkeypatch.setattr(module, "ELEMENT_SPREAD", math.inf)
    uncapped = _unsharded(CONFIGS["online-element-capped"])
    assert not torch.allclose(capped["step_sizes"][0], uncapped["step_sizes"][0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_sizes_and_state_are_sharded_as_their_parameters(two_ranks, name):
    ranks, _ = two_ranks
    granularity = CONFIGS[name].get("granularity", "element")
    for rank, run in enumerate(ranks):
        for p_layout in run[f"layout/{name}"]:
            kind, placements, local_shape = p_layout["param"]
            assert (kind, placements) == ("DTensor", (Shard(0),))
            if granularity == "element":
                assert p_layout["step_size"] == p_layout["param"]
            else:
                assert p_layout["step_size"] == ("DTensor", (Replicate(),), ())
            for key in ("momentum_buffer", "hypergrad_direction"):
                if key in p_layout:
                    assert p_layout[key] == p_layout["param"], key
            if "hypergrad_scale" in p_layout:
                assert p_layout["hypergrad_scale"] == ("Tensor", None, ())
        # The output layer's one row: rank 1 holds an empty shard.
        assert run[f"layout/{name}"][2]["param"][2] == ((1, 33) if rank == 0 else (0, 33))


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
def test_a_nan_in_one_shard_skips_the_whole_tensors_step_sizes_on_every_rank(
    two_ranks, granularity
):
    ranks, _ = two_ranks
    model = _mlp()
    opt = _optimizer(model, dict(momentum=0.9, hypergrad_lr=0.1, granularity=granularity))
    _train(model, opt, seed=1, steps=STEPS - 1)
    x, y = next(iter(_batches(seed=2, steps=1)))
    opt.zero_grad()
    _loss(model, x, y, None).backward()
    model[0].weight.grad[NAN_ROW, NAN_COLUMN] = float("nan")
    opt.step()
    expected = _snapshot(model, opt)
    for run in ranks:
        before, after = run[f"nan/{granularity}"]
        # The first layer's step sizes (for "group", everyone's) stay exactly as they were,
        # on rank 0 too, whose shard of the gradient is finite.
        skipped = range(4) if granularity == "group" else [0]
        for i in skipped:
            assert torch.equal(after["step_sizes"][i], before["step_sizes"][i])
        if granularity != "group":  # the other tensors learn
            assert not torch.equal(after["step_sizes"][2], before["step_sizes"][2])
        torch.testing.assert_close(after, expected, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("granularity", ["element", "tensor"])
def test_drawn_step_sizes_are_rank_0s_draw_of_the_whole_tensors(two_ranks, granularity):
    ranks, _ = two_ranks
    model = _mlp()
    opt = _optimizer(model, dict(granularity=granularity))
    opt.uniform_step_sizes_(0.01, 0.1, generator=torch.Generator().manual_seed(3))
    expected = [opt.step_size(p).detach() for p in model.parameters()]
    for run in ranks:
        torch.testing.assert_close(run[f"uniform/{granularity}/seeded"], expected, rtol=0, atol=0)
    # Unseeded, each rank's random state differs, the shards still form one draw:
    # the replicated scalars agree.
    if granularity == "tensor":
        unseeded = [run["uniform/tensor/unseeded"] for run in ranks]
        for x, y in zip(*unseeded, strict=True):
            assert torch.equal(x, y)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_two_rank_dcp_checkpoint_resumes_bitwise_as_the_uninterrupted_run(
    two_ranks, layout, name
):
    ranks, _ = two_ranks
    for run in ranks:
        _assert_same_run(
            run[f"dcp/{layout}/{name}/resumed"],
            run[f"dcp/{layout}/{name}/uninterrupted"],
            bitwise=True,
        )
    _assert_ranks_identical(two_ranks, f"dcp/{layout}/{name}/resumed")


def _one_process_run(name: str) -> dict:
    model = _mlp()
    opt = _optimizer(model, CHECKPOINTS[name])
    _train(model, opt, seed=1, steps=SAVED_AT)
    _train(model, opt, seed=2, steps=AFTER)
    return _snapshot(model, opt)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_two_rank_dcp_checkpoint_resumes_in_one_process(two_ranks, layout, name):
    ranks, folder = two_ranks
    model = _mlp(seed=5)
    opt = _optimizer(model, CHECKPOINTS[name])
    # No process group: DCP loads in this process alone, resharding the shards.
    _load(model, opt, folder / f"{layout}-{name}", flatten=LAYOUTS[layout])
    _train(model, opt, seed=2, steps=AFTER)
    resumed = _snapshot(model, opt)
    _assert_same_run(resumed, ranks[0][f"dcp/{layout}/{name}/uninterrupted"], bitwise=False)
    _assert_same_run(resumed, _one_process_run(name), bitwise=False)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_a_one_process_dcp_checkpoint_resumes_in_two_fsdp2_ranks(two_ranks, name):
    ranks, _ = two_ranks
    expected = _one_process_run(name)
    for run in ranks:
        _assert_same_run(run[f"dcp/from-one/{name}"], expected, bitwise=False)


def test_meta_learner_under_ddp_resumes_bitwise_from_a_dcp_checkpoint(two_ranks):
    ranks, _ = two_ranks
    for run in ranks:
        resumed, uninterrupted = run["meta/resumed"], run["meta/uninterrupted"]
        for x, y in zip(resumed["params"], uninterrupted["params"], strict=True):
            assert torch.equal(x, y)
        for entry, expected in zip(resumed["adam"], uninterrupted["adam"], strict=True):
            assert entry.keys() == expected.keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert all(torch.equal(entry[k], expected[k]) for k in entry)
    # One process with all 4 tasks, uninterrupted: DDP averages the ranks' meta-gradients.
    model, opt = _meta_learner()
    learner = MetaLearner(model, opt, F.mse_loss)
    meta_opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    _meta_train(learner, meta_opt, seed=1, iterations=3, rank=None)
    _meta_train(learner, meta_opt, seed=2, iterations=2, rank=None)
    expected = _meta_state(learner, meta_opt)
    torch.testing.assert_close(ranks[0]["meta/resumed"], expected, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- meta-learning


@pytest.fixture
def sharded_alone(tmp_path):
    """A model sharded by FSDP2 over a process group of this process alone, and its MetaSGD."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    try:
        model = _sharded(_mlp())
        yield model, MetaSGD(model.parameters(), lr=LR)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("call", ["meta_loss", "adapt", "adapt_tasks", "inner_loop", "MetaLearner"])
def test_a_sharded_model_raises_naming_the_supported_ways(sharded_alone, call):
    model, opt = sharded_alone
    x, y = torch.randn(2, 5, 16, dtype=DTYPE), torch.randn(2, 5, 1, dtype=DTYPE)
    calls = {
        "meta_loss": lambda: meta_loss(model, opt, F.mse_loss, (x, y), (x, y)),
        "adapt": lambda: adapt(model, opt, F.mse_loss, x[0], y[0]),
        "adapt_tasks": lambda: adapt_tasks(model, opt, F.mse_loss, (x, y)),
        "inner_loop": lambda: inner_loop(model, opt).__enter__(),
        "MetaLearner": lambda: MetaLearner(model, opt, F.mse_loss),
    }
    with pytest.raises(TypeError, match=f"{call} got a sharded model") as error:
        calls[call]()
    message = str(error.value)
    assert "'0.weight' is a DTensor" in message
    assert "MetaLearner(model, opt, loss_fn)" in message
    assert "average_gradients" in message
    assert "hypergrad_lr" in message
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- benchmark


def test_sharded_benchmark_help_shows_every_default():
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sharded.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0
    for option in ("--quick", "--device", "--processes", "--repeats", "--layouts", "--out"):
        assert option in run.stdout
    assert run.stdout.count("(default:") >= 10


@pytest.mark.slow
def test_sharded_benchmark_layouts_agree_and_write_json_and_png(tmp_path):
    args = ["--width", "32", "--depth", "2", "--steps", "2", "--warmup", "1", "--repeats", "1"]
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sharded.py"), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    payload = json.loads((tmp_path / "sharded.json").read_text())
    assert set(payload["summary"]) == {"fsdp2", "ddp"}
    for layout in payload["summary"].values():
        assert set(layout) == {"SGD", "MetaSGD", "MetaSGD online"}
        assert all(cell["peak_mib"] > 0 and cell["step_s"] > 0 for cell in layout.values())
    for difference in payload["agreement"].values():
        assert max(difference.values()) < 1e-5
    assert (tmp_path / "sharded.png").stat().st_size > 1000
