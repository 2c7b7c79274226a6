"""Helpers shared by the benchmarks: the meta-training loop, seeds, statistics, tables, files."""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from torch_metasgd import MetaSGD, meta_loss

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
    after_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Meta-train with :func:`torch_metasgd.meta_loss`; ``sample()`` gives a meta-batch.

    ``after_step(i)`` runs after the ``i``-th outer step (``i`` from 1): lr
    schedules, validation. Returns ``{"train_seconds", "curve"}``, the curve
    as ``(iteration, mean meta-loss since the last point)``. The loss is read
    back once per curve point, not every iteration: on a GPU a read is a
    synchronisation.
    """
    curve: list[tuple[int, float]] = []
    running, count = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(range(iterations), desc=desc, leave=False)
    for it in bar:
        support, query = sample()
        loss = meta_loss(model, opt, loss_fn, support, query, steps=steps)
        outer.zero_grad()
        loss.backward()
        outer.step()
        if after_step is not None:
            after_step(it + 1)
        running, count = running + loss.detach(), count + 1
        if count == log_every or it == iterations - 1:
            curve.append((it + 1, float(running) / count))
            bar.set_postfix(meta_loss=f"{curve[-1][1]:.3f}")
            running, count = 0.0, 0
    return {"train_seconds": time.perf_counter() - start, "curve": curve}


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
