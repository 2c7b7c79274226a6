"""Helpers shared by the benchmarks: the meta-training loop, seeds, statistics, tables, files.

Under torchrun (``torchrun --nproc_per_node=2 benchmarks/sinusoid.py``) the
scripts call :func:`launch` and :func:`meta_train` splits every meta-batch's
tasks over the ranks; everything else (testing, printing, files) is rank 0's.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from torch_metasgd import MetaLearner, MetaSGD, ReptileLearner

Batch = tuple[Tensor, Tensor]

REPO = Path(__file__).resolve().parent.parent

# Two-sided 95% normal quantile: the paper's "± 95% confidence interval".
Z95 = 1.959963984540054


# The paper draws Meta-SGD's initial step sizes uniformly from this range.
ALPHA_INIT = (0.005, 0.1)
# The few-shot learners every paper benchmark trains side by side: the paper's
# two, and the first-order methods the field compares them with.
METHODS = ("maml", "metasgd", "reptile", "fomaml")
LABELS = {"maml": "MAML", "metasgd": "Meta-SGD", "reptile": "Reptile", "fomaml": "FOMAML"}
# Reptile (arXiv:1803.02999): k = 5 inner steps (its Omniglot runs; its
# sinusoid demo takes 5 minibatch steps per task). The paper's outer optimizer
# is SGD with a step epsilon annealed linearly to 0 (1.0 in its batched
# Omniglot runs) and it notes that Adam can take the Reptile direction as
# well; the benchmarks default to Adam, as for the other methods: with
# epsilon = 1 the 5-shot sinusoid training diverged (README).
REPTILE_STEPS = 5
REPTILE_OUTERS = ("adam", "sgd")
REPTILE_EPSILON = 1.0


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every default (not None or False), and the description as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph above the options, the rest below."""
    description, _, epilog = doc.partition("\n\n")
    return argparse.ArgumentParser(
        description=description, epilog=epilog or None, formatter_class=HelpFormatter
    )


def inner_optimizer(method: str, model: nn.Module, alpha: float, seed: int) -> MetaSGD:
    """Meta-SGD: elementwise steps in ALPHA_INIT; the others: a fixed scalar step ``alpha``."""
    if method in ("maml", "fomaml", "reptile"):
        opt = MetaSGD(model.parameters(), lr=alpha, granularity="group")
        # Fixed: no meta-gradient is computed for it.
        for s in opt.meta_parameters():
            s.requires_grad_(False)
        return opt
    if method == "metasgd":
        opt = MetaSGD(model.parameters(), lr=1.0)
        return opt.uniform_step_sizes_(*ALPHA_INIT, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"Invalid method: {method!r}")


def outer_parameters(method: str, model: nn.Module, opt: MetaSGD) -> list[Tensor]:
    """What the outer optimizer learns: only Meta-SGD learns its step sizes."""
    step_sizes = opt.meta_parameters() if method == "metasgd" else []
    return [*model.parameters(), *step_sizes]


def add_method_arguments(parser: argparse.ArgumentParser, *, reptile_alpha: float | None) -> None:
    """``--methods`` and Reptile's own settings, with their defaults shown in ``--help``.

    ``reptile_alpha=None``: Reptile's inner step defaults to MAML's.
    """
    alpha_default = "MAML's step" if reptile_alpha is None else reptile_alpha
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="learners, trained on the same tasks and budget (default: all four); fomaml is "
        "MAML with first_order=True, reptile is torch_metasgd.reptile_loss",
    )
    parser.add_argument(
        "--reptile-steps",
        type=int,
        default=REPTILE_STEPS,
        help=f"Reptile's inner steps k, in training and testing (default: {REPTILE_STEPS}, "
        "the paper's)",
    )
    parser.add_argument(
        "--reptile-alpha",
        type=float,
        default=reptile_alpha,
        help=f"Reptile's fixed inner SGD step (default: {alpha_default})",
    )
    parser.add_argument(
        "--reptile-outer",
        choices=REPTILE_OUTERS,
        default="adam",
        help="Reptile's outer optimizer: adam (the other methods' Adam and learning rate) or "
        "sgd (the paper's: step --reptile-epsilon annealed linearly to 0) (default: adam)",
    )
    parser.add_argument(
        "--reptile-epsilon",
        type=float,
        default=REPTILE_EPSILON,
        help=f"Reptile's initial outer SGD step with --reptile-outer sgd (default: "
        f"{REPTILE_EPSILON}, the paper's batched Omniglot setting)",
    )


def add_cost_arguments(parser: argparse.ArgumentParser, *, timing_rounds: int, calls: int) -> None:
    """The options of what :func:`method_costs` measures: time and memory per method."""
    parser.add_argument(
        "--timing-rounds",
        type=int,
        default=timing_rounds,
        help="rounds in which every method runs --timing-calls meta-iterations, for the median "
        f"time per meta-iteration (default: {timing_rounds})",
    )
    parser.add_argument(
        "--timing-calls",
        type=int,
        default=calls,
        help=f"meta-iterations per method and round (default: {calls})",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory runs (a process each)"
    )


@dataclass
class Learner:
    """One method's model, inner-loop ``MetaSGD``, outer optimizer and inner steps."""

    method: str
    model: nn.Module
    opt: MetaSGD
    outer: torch.optim.Optimizer
    steps: int  # inner steps, in meta-training and at test time
    objective: nn.Module  # support, query -> the loss to backward (meta_learner)
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None

    def step(self, support: Batch, query: Batch) -> Tensor:
        """One meta-iteration without the schedule, for timing and memory; the loss, detached."""
        loss = self.objective(support, query)
        self.outer.zero_grad()
        loss.backward()
        self.outer.step()
        return loss.detach()


def build_learner(
    method: str,
    model: nn.Module,
    args: argparse.Namespace,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    maml_alpha: float,
    steps: int,
    meta_lr: float,
    seed: int,
) -> Learner:
    """MAML, FOMAML, Meta-SGD: ``steps`` inner steps, Adam(``meta_lr``) as outer optimizer.

    Reptile: ``args.reptile_steps`` steps of ``args.reptile_alpha`` (if None,
    ``maml_alpha``); outer Adam(``meta_lr``) on the weights, or with
    ``args.reptile_outer == "sgd"`` SGD with step ``args.reptile_epsilon``
    annealed linearly to 0 over ``args.iterations`` (see
    :func:`add_method_arguments`).
    """
    if method == "reptile":
        steps = args.reptile_steps
        if args.reptile_alpha is not None:
            maml_alpha = args.reptile_alpha
    opt = inner_optimizer(method, model, maml_alpha, seed)
    objective = meta_learner(method, model, opt, loss_fn, steps=steps)
    if method != "reptile" or args.reptile_outer == "adam":
        outer = torch.optim.Adam(outer_parameters(method, model, opt), lr=meta_lr)
        return Learner(method, model, opt, outer, steps, objective)
    outer = torch.optim.SGD(model.parameters(), lr=args.reptile_epsilon)
    schedule = torch.optim.lr_scheduler.LinearLR(outer, 1.0, 0.0, max(args.iterations, 1))
    return Learner(method, model, opt, outer, steps, objective, schedule)


def meta_learner(
    method: str,
    model: nn.Module,
    opt: MetaSGD,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    steps: int,
    first_order: bool = False,
) -> nn.Module:
    """The module whose ``forward(support, query)`` is ``method``'s loss to backward.

    MAML, Meta-SGD: :func:`torch_metasgd.meta_loss` (a ``MetaLearner``);
    FOMAML: the same with ``first_order=True``; Reptile:
    :func:`torch_metasgd.reptile_loss` (a ``ReptileLearner``), whose value is
    the query loss after its inner steps. DDP can wrap either.
    """
    if method == "reptile":
        return ReptileLearner(model, opt, loss_fn, steps=steps)
    first_order = first_order or method == "fomaml"
    return MetaLearner(model, opt, loss_fn, steps=steps, first_order=first_order)


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
    method: str = "maml",
) -> dict[str, Any]:
    """Meta-train ``method`` (:func:`meta_learner`); ``sample()`` gives a meta-batch.

    Under torchrun every rank samples the same meta-batch and meta-trains on
    its share of the tasks (:func:`shard`) in ``DistributedDataParallel``, which
    averages the gradients of the weights and the step sizes: the outer step is
    that of one process with the whole meta-batch.

    ``after_step(i)`` runs after the ``i``-th outer step (``i`` from 1): lr
    schedules, validation. Returns ``{"train_seconds", "curve",
    "ranks_identical"}``, the curve as ``(iteration, mean meta-loss since the
    last point)``. The loss is read back once per curve point, not every
    iteration: on a GPU a read is a synchronisation.
    """
    learner = meta_learner(method, model, opt, loss_fn, steps=steps, first_order=first_order)
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


def train_learner(
    learner: Learner,
    sample: Callable[[], tuple[Batch, Batch]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    after_step: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`meta_train` of a :class:`Learner`; its schedule steps before ``after_step``."""

    def step_schedule(it: int) -> None:
        if learner.schedule is not None:
            learner.schedule.step()
        if after_step is not None:
            after_step(it)

    return meta_train(
        learner.model,
        learner.opt,
        learner.outer,
        sample,
        loss_fn,
        steps=learner.steps,
        method=learner.method,
        after_step=step_schedule,
        **kwargs,
    )


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


def save_figure(fig: Any, path: Path, *, dpi: int) -> None:
    """Write a matplotlib figure (its folder made if need be) and free it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


LAYER_KINDS = {nn.Conv2d: "conv", nn.BatchNorm2d: "batch norm", nn.Linear: "linear"}


def parameter_labels(model: nn.Module) -> dict[str, str]:
    """``{"4.weight": "conv 2 weight", ...}``: a tensor named by its layer's kind and rank."""
    layers = [
        (name, module, kind)
        for name, module in model.named_modules()
        for cls, kind in LAYER_KINDS.items()
        if isinstance(module, cls)
    ]
    totals = {kind: sum(k == kind for *_, k in layers) for kind in LAYER_KINDS.values()}
    labels, seen = {}, dict.fromkeys(LAYER_KINDS.values(), 0)
    for name, module, kind in layers:
        seen[kind] += 1
        layer = kind if totals[kind] == 1 else f"{kind} {seen[kind]}"
        for p, _ in module.named_parameters(recurse=False):
            labels[f"{name}.{p}" if name else p] = f"{layer} {p}"
    return labels


def threads_label(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def mark_no_data(ax: Any, text: str) -> None:
    """Say in the middle of a panel why it has nothing drawn (a NaN run, a method not run)."""
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        wrap=True,
        color="tab:red",
        bbox={"facecolor": "white", "edgecolor": "tab:red"},
    )


def plain_log_ticks(axis: Any) -> None:
    """Plain-number ticks (0.2, 1, 5; 1e-05 when tiny) on a log axis, after its data is drawn.

    matplotlib's own are ``10^0`` alone on an axis that spans less than a
    decade, or a crowd of ``6x10^-1``: here 1, 1.5, 2, 3, 5, 7 per decade on
    a short axis, 1, 2, 5 on a longer one, decades alone beyond 3.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = sorted(axis.get_view_interval())
    decades = math.log10(high / low) if low > 0 else math.inf
    subs = (1.0,) if decades > 3 else (1.0, 2.0, 5.0) if decades > 1.2 else (1, 1.5, 2, 3, 5, 7)
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def add_output_arguments(
    parser: argparse.ArgumentParser, script: str, also: str = "", torchrun: bool = False
) -> None:
    """``--out`` and ``--overwrite``: a folder per default command, nothing replaced silently.

    ``also`` names further default folders (``"results/omniglot_eval with --eval-only"``).
    """
    folder = f"results/{script}"
    defaults = f"{folder}; {folder}_quick with --quick" + (f"; {also}" if also else "")
    if torchrun:
        defaults += "; _2proc appended under torchrun with 2 processes"
    parser.add_argument(
        "--out",
        type=Path,
        help=f"folder of the JSON and PNG (default: {defaults}). The script stops at once, "
        "before any work, if its files are already there",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the files an earlier run left in --out"
    )


def claim_output(
    args: argparse.Namespace, script: str, files: Iterable[str], variant: str = ""
) -> Path:
    """Set and return ``args.out``; exit before any work if ``files`` are there already.

    The default is ``results/<script>[_<variant>][_quick][_<N>proc]``. Without
    ``--overwrite`` an existing file stops the script (status 2, like a usage
    error; under torchrun rank 0 alone says why). Call it before torchrun's
    process group exists: every rank then sees the folder as it was.
    """
    if args.out is None:
        name = "_".join([script, *filter(None, [variant, "quick" if args.quick else ""])])
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        args.out = Path("results") / (name + (f"_{processes}proc" if processes > 1 else ""))
    there = [name for name in files if (args.out / name).exists()]
    if there and not args.overwrite:
        if os.environ.get("RANK", "0") == "0":
            print(
                f"{script}.py: error: {args.out} already holds {' and '.join(there)} from an "
                "earlier run: pass --overwrite to replace them, or another --out",
                file=sys.stderr,
            )
        raise SystemExit(2)
    return args.out


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
    # DDP wrappers left in reference cycles go while the group lives (freed
    # after it, gloo aborts the process at exit); every rank arrives (the others
    # wait for rank 0's evaluation) before any tears the group down: gloo aborts
    # a process whose peer left first, at random.
    gc.collect()
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


# --------------------------------------------------------------------------- cost per method


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_memory_mib(run: Callable[[], object], device: torch.device) -> float:
    """The peak extra memory of ``run()`` in MiB.

    CUDA: tensor memory, ``torch.cuda.max_memory_allocated`` over what was
    allocated before. CPU (Linux): the growth of the peak resident set, VmHWM,
    reset to the current RSS through /proc/self/clear_refs, as
    ``benchmarks/speed.py`` measures it; memory this process freed earlier may
    be reused without growing the RSS, so call it in a fresh process
    (:func:`in_fresh_process`). NaN where neither is available.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        run()
        return float("nan")
    clear_refs.write_text("5")
    before = _status_mib("VmRSS")
    run()
    return _status_mib("VmHWM") - before


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new Python process (multiprocessing's spawn); ``fn`` importable."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def median_ms_interleaved(
    runs: dict[str, Callable[[], object]], rounds: int, device: torch.device, calls: int = 1
) -> dict[str, float]:
    """Median wall time (ms) of a call of each ``runs[name]`` over ``rounds`` rounds.

    Every round calls every name ``calls`` times (their mean is the round's
    figure), one name after the other, after one warm-up round: load from
    other jobs on a shared machine falls on all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r > 0:
                times[name].append(1000 * (time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def method_costs(
    learners: dict[str, Learner],
    sample: Callable[[], tuple[Batch, Batch]],
    device: torch.device,
    *,
    rounds: int,
    calls: int = 1,
    probe: Callable[..., float] | None = None,
    probe_args: tuple = (),
) -> dict[str, dict[str, float]]:
    """Per method: ``ms_per_iteration`` and ``peak_memory_mib``.

    The time is the median over ``rounds`` rounds of ``calls`` meta-iterations,
    the methods interleaved, on copies of ``learners`` (which stay as they are). The
    memory is ``probe(method, *probe_args)``, a function that builds a fresh
    learner and returns :func:`peak_memory_mib` of a few meta-iterations: on
    CPU it runs in a fresh process; NaN without a probe.
    """
    copies = {m: copy.deepcopy(learner) for m, learner in learners.items()}
    runs = {m: (lambda c=c: c.step(*sample())) for m, c in copies.items()}
    ms = median_ms_interleaved(runs, rounds, device, calls)
    costs = {}
    for m in learners:
        memory = float("nan")
        if probe is not None and device.type == "cuda":
            memory = probe(m, *probe_args)
        elif probe is not None:
            memory = in_fresh_process(probe, m, *probe_args)
        costs[m] = {"ms_per_iteration": ms[m], "peak_memory_mib": memory}
    return costs


def print_cost_table(table: str, device: torch.device) -> None:
    """Print :func:`method_costs`' table under the title that says how it was measured."""
    memory = "CUDA tensors" if device.type == "cuda" else "RSS, in a fresh process"
    print(
        "\nCost per meta-iteration: median ms (methods interleaved), peak extra memory in MiB "
        f"over 3 meta-iterations ({memory})\n"
    )
    print(table)


def cost_cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"
