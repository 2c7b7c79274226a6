"""Data-parallel meta-training: meta-iterations per second with 1 and 2 processes (torchrun).

One meta-iteration = the meta-gradient of a whole meta-batch (second order,
per-element step sizes) averaged over the ranks, each rank computing its
share of the tasks (``_common.shard``). The ways to get it:

* ``meta_loss``       one process, the whole meta-batch, no torch.distributed
* ``inner_loop``      one process, one backward per task, no torch.distributed
* ``meta_loss ddp``   DistributedDataParallel(MetaLearner(...)): DDP's bucketed
                      all-reduce overlaps the backward
* ``meta_loss avg``   meta_loss, then average_gradients after the backward
* ``inner_loop avg``  inner_loop, one backward per task, then average_gradients
* ``inner_loop ddp``  DistributedDataParallel of a module whose forward runs the
                      inner loops of the rank's tasks (one backward, every graph held)

Workloads: ``benchmarks/speed.py``'s W1 (sinusoid MLP 1-40-40-1, 25 tasks, 10
support + 10 query points, 1 inner step) and W2 (conv4, 64 filters, 5-way
1-shot, 15 queries per class, 8 tasks, 1 inner step).

The script starts ``torchrun`` (gloo, 127.0.0.1) with 1 and then 2 processes,
one thread each, ``--repeats`` times alternately. Each run times its ways
interleaved over ``--rounds`` rounds (every rank in the same random order,
after a barrier); the table gives the median seconds per meta-iteration over
all rounds of all repeats, as meta-iterations per second, and each way's
speed-up over its one-process baseline.

    python benchmarks/ddp.py --quick     # 60 s: a thread per process, 2 idle cores
    python benchmarks/ddp.py --out results/ddp
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from _common import (
    REPO,
    add_output_arguments,
    claim_output,
    device_of,
    environment,
    format_table,
    launch,
    rank,
    save_figure,
    script_parser,
    shard,
    world_size,
    write_json,
)
from speed import WORKLOADS, Case
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from torch_metasgd import MetaLearner, average_gradients, inner_loop, meta_loss

BASELINES = ["meta_loss", "inner_loop"]  # one process, the whole meta-batch
WAYS = ["meta_loss ddp", "meta_loss avg", "inner_loop avg", "inner_loop ddp"]
# Wall time; and this process's CPU time, steadier on a shared machine: with
# one thread per process it shows how the work splits over the ranks.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _inner_loop_losses(model, opt, loss_fn, support, query, *, weight=1.0, backward=False):
    """The weighted mean query loss; with ``backward``, back-propagated task by task instead."""
    n_tasks, total = support[0].shape[0], 0.0
    for t in range(n_tasks):
        with inner_loop(model, opt) as (fmodel, diffopt):
            diffopt.step(loss_fn(fmodel(support[0][t]), support[1][t]))
            loss = weight * loss_fn(fmodel(query[0][t]), query[1][t]) / n_tasks
            if backward:
                loss.backward()
                loss = loss.detach()
            total = total + loss
    return total


class _InnerLoopLearner(MetaLearner):
    """A MetaLearner whose forward runs ``inner_loop`` task by task instead of ``meta_loss``."""

    def forward(self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor]) -> Tensor:
        return _inner_loop_losses(self.model, self.opt, self.loss_fn, support, query)


def _way(name: str, c: Case) -> Callable[[], None]:
    """The function that runs one meta-iteration of way ``name`` on ``c``."""
    tasks = ((c.xs, c.ys), (c.xq, c.yq))
    support, query, weight = (*tasks, 1.0) if name in BASELINES else shard(*tasks)
    params = [*c.model.parameters(), *c.opt.meta_parameters()]
    path, _, sync = name.partition(" ")
    if sync == "ddp":
        kind = MetaLearner if path == "meta_loss" else _InnerLoopLearner
        learner = DistributedDataParallel(kind(c.model, c.opt, c.loss_fn))

        def run() -> None:
            (weight * learner(support, query)).backward()

        return run

    def run() -> None:
        if path == "meta_loss":
            (weight * meta_loss(c.model, c.opt, c.loss_fn, support, query)).backward()
        else:
            _inner_loop_losses(
                c.model, c.opt, c.loss_fn, support, query, weight=weight, backward=True
            )
        if sync == "avg":
            average_gradients(params)

    return run


def _flat_grads(c: Case) -> Tensor:
    return torch.cat([t.grad.flatten() for t in [*c.model.parameters(), *c.opt.meta_parameters()]])


def _agreement(ways: dict[str, tuple[Case, Callable[[], None]]], ref: Case) -> dict:
    """Each way's relative gradient difference from one process's meta_loss on the whole batch."""
    meta_loss(ref.model, ref.opt, ref.loss_fn, (ref.xs, ref.ys), (ref.xq, ref.yq)).backward()
    expected = _flat_grads(ref)
    out = {}
    for name, (c, run) in ways.items():
        c.zero_grad()
        run()
        out[name] = float((_flat_grads(c) - expected).norm() / expected.norm())
    return out


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: time every way, interleaved; rank 0 writes the seconds per round."""
    device = launch(device_of(args.device))
    torch.set_num_threads(1)
    names = [*BASELINES, *WAYS] if world_size() == 1 else WAYS
    payload: dict = {"world_size": world_size(), "seconds": {}, "agreement": {}}
    for workload in args.workloads:
        cases = {name: Case(workload, args.seed, device) for name in names}
        ways = {name: (c, _way(name, c)) for name, c in cases.items()}
        payload["agreement"][workload] = _agreement(ways, Case(workload, args.seed, device))
        times = {clock: {name: [] for name in names} for clock in CLOCKS}
        order = random.Random(args.seed)  # the same order on every rank
        for r in range(args.warmup + args.rounds):
            for name in order.sample(names, len(names)):
                c, run = ways[name]
                c.zero_grad()
                dist.barrier()
                start = {clock: now() for clock, now in CLOCKS.items()}
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if r >= args.warmup:
                    for clock, now in CLOCKS.items():
                        times[clock][name].append(now() - start[clock])
        for clock in CLOCKS:
            payload["seconds"].setdefault(clock, {})[workload] = times[clock]
    if rank() == 0:
        write_json(Path(args.worker), payload)


def _torchrun(processes: int, args: argparse.Namespace, path: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--local-addr", "127.0.0.1", "--nproc-per-node", str(processes), __file__]
    command += ["--worker", str(path), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    command += ["--seed", str(args.seed), "--device", args.device, "--workloads", *args.workloads]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def _medians(runs: dict[int, list[dict]], clock: str) -> dict[int, dict[str, dict[str, float]]]:
    """processes -> workload -> way -> median seconds per meta-iteration over every run's rounds."""
    return {
        n: {
            w: {
                name: statistics.median(
                    t for run in results for t in run["seconds"][clock][w][name]
                )
                for name in per_way
            }
            for w, per_way in results[0]["seconds"][clock].items()
        }
        for n, results in runs.items()
    }


def _table(wall: dict, cpu: dict, workloads: list[str], processes: list[int]) -> str:
    """Meta-iterations per second for each process count, and the ratios to the baseline."""
    most = max(processes)
    header = ["workload", "way", *(f"{n} process(es), it/s" for n in processes)]
    # Against the one-process baseline of the same path: wall time (the
    # speed-up) and each rank's CPU time (the share of the work a rank does).
    header += [f"speed-up, {most} processes", f"baseline CPU / rank CPU, {most} processes"]
    rows = []
    for w in workloads:
        for name in [*BASELINES, *WAYS]:
            per_n = [wall[n][w].get(name) for n in processes]
            cells = [f"{1 / t:.2f}" if t is not None else "-" for t in per_n]
            ratios = ["-", "-"]
            if name in WAYS and name in wall[most][w]:
                base = name.partition(" ")[0]
                ratios = [f"{c[1][w][base] / c[most][w][name]:.2f}x" for c in (wall, cpu)]
            rows.append([w, name, *cells, *ratios])
    return format_table(header, rows)


def plot(wall: dict, workloads: list[str], processes: list[int], path: Path) -> None:
    """Meta-iterations per second of every way, a bar per process count, its value on it."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _common import mark_no_data
    from speed import describe

    plt.rcParams.update({"font.size": 9})
    names = [*BASELINES, *WAYS]
    ticks = [f"{name}\n(1 process only)" if name in BASELINES else name for name in names]
    fig, axes = plt.subplots(
        1,
        len(workloads),
        figsize=(5.5 * len(workloads), 4.0),
        squeeze=False,
        layout="constrained",
    )
    width = 0.8 / len(processes)
    for ax, w in zip(axes[0], workloads, strict=True):
        drawn = False
        for k, n in enumerate(processes):
            seconds = [wall[n][w].get(name, math.nan) for name in names]
            speeds = [1 / t if t > 0 else math.nan for t in seconds]
            xs = [i + (k - (len(processes) - 1) / 2) * width for i in range(len(names))]
            heights = [v if math.isfinite(v) else 0 for v in speeds]
            label = "1 process" if n == 1 else f"{n} processes"
            bars = ax.bar(xs, heights, width, label=label, color=f"C{k}")
            ran = [name in wall[n][w] for name in names]
            texts = [
                ("NaN" if not math.isfinite(v) else f"{v:.3g}") if r else ""
                for v, r in zip(speeds, ran, strict=True)
            ]
            ax.bar_label(bars, texts, fontsize=8)
            drawn |= any(math.isfinite(v) for v in speeds)
        ax.set_xticks(range(len(names)), ticks, rotation=30, ha="right")
        ax.set_xlabel(
            "how the meta-gradient is computed\n(ddp: DistributedDataParallel; "
            "avg: average_gradients after the backward)"
        )
        ax.set_ylabel("meta-iterations per second (median)")
        ax.set_ylim(0, max(ax.get_ylim()[1], 1e-9) * 1.12)  # room for the values
        ax.set_title(describe(w))
        if not drawn:
            mark_no_data(ax, "no finite time (NaN): every run failed")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=len(processes), frameon=False)
    save_figure(fig, path, dpi=90)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=["W1", "W2"],
        choices=list(WORKLOADS),
        help="(default: W1 W2)",
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="(default: 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="torchrun runs each (default: 3)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds a run (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL) (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of models and tasks")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 repeat of 3 rounds: 60 s on 2 idle cores",
    )
    add_output_arguments(parser, "ddp")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and not args.worker:
        args.repeats, args.rounds = 1, 3
    if 1 not in args.processes:
        parser.error("--processes must include 1: the baselines run in one process")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    claim_output(args, "ddp", ["ddp.json", "ddp.png"])

    runs: dict[int, list[dict]] = {n: [] for n in args.processes}
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        plan = [(r, n) for r in range(args.repeats) for n in args.processes]
        for r, n in tqdm(plan, desc="torchrun runs"):
            runs[n].append(_torchrun(n, args, Path(tmp) / f"{n}-{r}.json"))
    load.append(os.getloadavg())
    wall, cpu = _medians(runs, "wall"), _medians(runs, "cpu")
    table = _table(wall, cpu, args.workloads, args.processes)
    payload = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(),
        "cpu_count": os.cpu_count(),
        "load_average_before_after": load,
        "seconds_per_iteration": {"wall": wall, "cpu": cpu},
        "agreement": {n: results[0]["agreement"] for n, results in runs.items()},
        "runs": runs,
        "table": table,
    }
    print(
        f"\nMeta-iterations per second (median wall time), one thread per process, "
        f"{os.cpu_count()} CPUs, load average {load[0][0]:.1f} before, {load[1][0]:.1f} after\n"
    )
    print(table)
    write_json(args.out / "ddp.json", payload)
    plot(wall, args.workloads, args.processes, args.out / "ddp.png")
    print(f"\nwrote {args.out}/ddp.json and ddp.png")
    return payload


if __name__ == "__main__":
    main()
