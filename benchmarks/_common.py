"""Helpers shared by the benchmarks: the meta-training loop, seeds, statistics, tables, files.

Under torchrun (``torchrun --nproc_per_node=2 benchmarks/sinusoid.py``) the
scripts call :func:`launch` and :func:`meta_train` splits every meta-batch's
tasks over the ranks; everything else (testing, printing, files) is rank 0's.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from torch_metasgd import MetaLearner, MetaSGD

Batch = tuple[Tensor, Tensor]

REPO = Path(__file__).resolve().parent.parent

# Two-sided 95% normal quantile: the paper's "± 95% confidence interval".
Z95 = 1.959963984540054


# The paper draws Meta-SGD's initial step sizes uniformly from this range.
ALPHA_INIT = (0.005, 0.1)
# The two few-shot learners every paper benchmark trains side by side.
METHODS = ("maml", "metasgd")
LABELS = {"maml": "MAML", "metasgd": "Meta-SGD"}


def inner_optimizer(method: str, model: nn.Module, maml_alpha: float, seed: int) -> MetaSGD:
    """MAML: a fixed scalar step ``maml_alpha``; Meta-SGD: elementwise steps in ALPHA_INIT."""
    if method == "maml":
        return MetaSGD(model.parameters(), lr=maml_alpha, granularity="group")
    if method == "metasgd":
        opt = MetaSGD(model.parameters(), lr=1.0)
        return opt.uniform_step_sizes_(*ALPHA_INIT, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"Invalid method: {method!r}")


def outer_parameters(method: str, model: nn.Module, opt: MetaSGD) -> list[Tensor]:
    """What the outer optimizer learns: MAML's step size stays fixed."""
    step_sizes = opt.meta_parameters() if method == "metasgd" else []
    return [*model.parameters(), *step_sizes]


def meta_train(
    model: nn.Module,
    opt: MetaSGD,
    outer: torch.optim.Optimizer,
    sample: Callable[[], tuple[Batch, Batch]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    iterations: int,
    steps: int,
    log_every: int,
    desc: str,
    first_order: bool = False,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Meta-train with :func:`torch_metasgd.meta_loss`; ``sample()`` gives a meta-batch.

    Under torchrun every rank samples the same meta-batch and meta-trains on
    its share of the tasks (:func:`shard`) in ``DistributedDataParallel``, which
    averages the gradients of the weights and the step sizes: the outer step is
    that of one process with the whole meta-batch.

    ``after_step(i)`` runs after the ``i``-th outer step (``i`` from 1): lr
    schedules, validation. Returns ``{"train_seconds", "curve", "ranks_identical"}``, the curve as
    ``(iteration, mean meta-loss since the last point)``. The loss is read back
    once per curve point, not every iteration: on a GPU a read is a
    synchronisation.
    """
    learner: nn.Module = MetaLearner(model, opt, loss_fn, steps=steps, first_order=first_order)
    if dist.is_initialized():
        learner = DistributedDataParallel(learner)
    curve: list[tuple[int, float]] = []
    running, count = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(range(iterations), desc=desc, leave=False, disable=rank() != 0)
    for it in bar:
        support, query, weight = shard(*sample())
        loss = learner(support, query)
        if weight != 1:
            loss = loss * weight
        outer.zero_grad()
        loss.backward()
        outer.step()
        if after_step is not None:
            after_step(it + 1)
        running, count = running + loss.detach(), count + 1
        if count == log_every or it == iterations - 1:
            curve.append((it + 1, mean_over_ranks(running) / count))
            bar.set_postfix(meta_loss=f"{curve[-1][1]:.3f}")
            running, count = 0.0, 0
    seconds = time.perf_counter() - start
    identical = ranks_identical([*model.parameters(), *opt.meta_parameters()])
    return {"train_seconds": seconds, "curve": curve, "ranks_identical": identical}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for the task sampler."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def mean_ci95(values: torch.Tensor | list[float]) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval of the mean."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), Z95 * float(v.std(unbiased=True)) / math.sqrt(v.numel())


def device_of(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def environment() -> dict[str, Any]:
    """What a reader needs to judge a wall time."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns (also valid Markdown)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# --------------------------------------------------------------------------- torchrun


def launch(device: torch.device) -> torch.device:
    """Join torchrun's process group if torchrun started this process; the device to train on.

    gloo on CPU, NCCL on CUDA, each rank on GPU ``LOCAL_RANK``. Without torchrun
    nothing happens and ``device`` is returned.
    """
    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_leave)
    return device


def _leave() -> None:
    # Every rank arrives (the others wait for rank 0's evaluation) before any
    # tears the group down: gloo aborts a process whose peer left first, at random.
    dist.barrier()
    dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(support: Batch, query: Batch) -> tuple[Batch, Batch, float]:
    """This rank's tasks of a meta-batch, and the weight of their mean loss.

    Rank ``r`` of ``R`` takes the ``r``-th of ``R`` contiguous slices of the
    ``T`` tasks (sizes ``T_r`` differing by at most one) and weighs its mean
    loss by ``R * T_r / T``: DDP's mean over ranks is then the mean over all
    ``T`` tasks.
    """
    world, n_tasks = world_size(), support[0].shape[0]
    if world == 1:
        return support, query, 1.0
    if n_tasks < world:
        raise ValueError(f"Invalid meta-batch: {n_tasks} tasks for {world} processes")
    xs, ys, xq, yq = (t.tensor_split(world)[rank()] for t in (*support, *query))
    return (xs, ys), (xq, yq), world * xs.shape[0] / n_tasks


def mean_over_ranks(value: Tensor) -> float:
    """The mean of a scalar ``value`` over the ranks (a collective under torchrun)."""
    if not dist.is_initialized():
        return float(value)
    total = value.to(torch.float64, copy=True)
    dist.all_reduce(total)
    return float(total) / world_size()


def ranks_identical(tensors: Iterable[Tensor]) -> bool:
    """Whether every rank holds bitwise the same ``tensors`` (a collective; True alone)."""
    if not dist.is_initialized():
        return True
    mine = torch.cat([t.detach().reshape(-1).view(torch.uint8) for t in tensors])
    rank_0s = mine.clone()
    dist.broadcast(rank_0s, src=0)
    same = torch.tensor(int(torch.equal(mine, rank_0s)), device=mine.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same)
