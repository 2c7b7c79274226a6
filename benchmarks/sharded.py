"""Sharded training (FSDP2): MetaSGD's step time and peak memory per rank against torch.optim.SGD.

Each run trains an MLP (``--depth`` layers ``--width`` wide, a 1-output head,
float32) for ``--warmup`` + ``--steps`` steps on one global batch of
``--batch`` examples split over the ranks, in one of two layouts:

* ``fsdp2``  every Linear and the root sharded by ``fully_shard``: each rank
             holds its shard of the weights, gradients, optimizer state and
             step sizes (the head's one row leaves rank 1 an empty shard)
* ``ddp``    DistributedDataParallel: every rank holds the whole model and
             state (the unsharded run)

with one of three optimizers, all with momentum 0.9:

* ``SGD``             torch.optim.SGD
* ``MetaSGD``         MetaSGD, a learnable step size per element
* ``MetaSGD online``  MetaSGD(parametrization="log", hypergrad_lr=0.1): the
                      online rule, tensor by tensor on DTensors (its sums
                      all-reduced over the shards), in the fast workspace on
                      plain tensors

Each (layout, optimizer) pair runs in a torchrun of its own (gloo on CPU,
127.0.0.1, one thread per process), ``--repeats`` times in alternation, so
that its peak memory is its own: per rank, the growth of the peak resident set
(VmHWM, reset through /proc/self/clear_refs after the process group is up)
from before the model is built to the end of the steps (CUDA: of
``max_memory_allocated``). Times are wall times per rank: ``optimizer.step()``
alone, and the whole iteration (forward, backward with FSDP2's or DDP's
collectives, step); the table gives, for each pair, the median over the timed
steps of all repeats of the slower rank's time, and the larger rank's peak
memory. Every run's final loss and weight norm is recorded: each optimizer
must end where it ends in the other layout (``agreement`` in the JSON).

    python benchmarks/sharded.py --quick     # 36 s on 2 idle cores
    python benchmarks/sharded.py --out results/sharded
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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
    peak_memory_mib,
    rank,
    save_figure,
    script_parser,
    world_size,
    write_json,
)
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from torch_metasgd import MetaSGD

LAYOUTS = ["fsdp2", "ddp"]
OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "MetaSGD": lambda params: MetaSGD(params, lr=0.01, momentum=0.9),
    "MetaSGD online": lambda params: MetaSGD(
        params, lr=0.01, momentum=0.9, parametrization="log", hypergrad_lr=0.1
    ),
}


def _model(width: int, depth: int, seed: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1)).to(device)


def _laid_out(layout: str, model: nn.Module, device: torch.device) -> nn.Module:
    if layout == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(args: argparse.Namespace, device: torch.device) -> dict:
    """Build the pair's model and optimizer and take every step; this rank's times and result."""
    model = _laid_out(args.layout, _model(args.width, args.depth, args.seed, device), device)
    opt = OPTIMIZERS[args.optimizer](model.parameters())
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.width, generator=g)
    y = x[:, :1].sin()
    x, y = (t.tensor_split(world_size())[rank()].to(device) for t in (x, y))
    steps, iterations = [], []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        _sync(device)
        # The ranks start the step together: the online rule's all-reduces would
        # otherwise wait, in the step's time, for the slower rank's backward.
        dist.barrier()
        before_step = time.perf_counter()
        opt.step()
        _sync(device)
        end = time.perf_counter()
        if i >= args.warmup:
            steps.append(end - before_step)
            iterations.append(end - start)
    return {"step_s": steps, "iteration_s": iterations, "loss": loss.detach(), "model": model}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: one (layout, optimizer) pair; rank 0 writes every rank's numbers."""
    device = launch(device_of(args.device))
    torch.set_num_threads(1)
    result: dict = {}
    peak = peak_memory_mib(lambda: result.update(_train(args, device)), device)
    model = result.pop("model")
    loss = result.pop("loss").to(torch.float64)
    dist.all_reduce(loss)
    weights = torch.cat([_whole(p.detach()).flatten().double() for p in model.parameters()])
    mine = {**result, "peak_mib": peak}
    ranks: list = [None] * world_size()
    dist.all_gather_object(ranks, mine)
    if rank() == 0:
        payload = {
            "ranks": ranks,
            "loss": float(loss) / world_size(),
            "weight_norm": float(weights.norm()),
        }
        write_json(Path(args.worker), payload)


def _torchrun(layout: str, optimizer: str, args: argparse.Namespace, path: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--local-addr", "127.0.0.1", "--nproc-per-node", str(args.processes), __file__]
    command += ["--worker", str(path), "--layout", layout, "--optimizer", optimizer]
    for option in ("width", "depth", "batch", "steps", "warmup", "seed", "device"):
        command += [f"--{option}", str(getattr(args, option))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """layout -> optimizer -> medians over every timed step of every repeat (the slower rank's
    time at each step) and the larger rank's peak memory (median over the repeats)."""
    out: dict = {}
    for layout, per_optimizer in runs.items():
        for name, repeats in per_optimizer.items():
            cell = {}
            for key in ("step_s", "iteration_s"):
                per_rank = [[k[key] for k in run["ranks"]] for run in repeats]
                slowest = [max(step) for run in per_rank for step in zip(*run, strict=True)]
                cell[key] = statistics.median(slowest)
            cell["peak_mib"] = statistics.median(
                max(k["peak_mib"] for k in run["ranks"]) for run in repeats
            )
            cell["loss"] = repeats[0]["loss"]
            cell["weight_norm"] = repeats[0]["weight_norm"]
            out.setdefault(layout, {})[name] = cell
    return out


def agreement(summary: dict) -> dict:
    """Per optimizer: the relative difference of the final weight norm and loss between layouts."""
    if not all(layout in summary for layout in LAYOUTS):
        return {}
    out = {}
    for name in summary[LAYOUTS[0]]:
        a, b = (summary[layout][name] for layout in LAYOUTS)
        out[name] = {
            key: abs(a[key] - b[key]) / max(abs(b[key]), 1e-30) for key in ("weight_norm", "loss")
        }
    return out


def table(summary: dict) -> str:
    """Per pair: times, peak memory, and MetaSGD's cost against SGD (same layout) and against
    the unsharded run (the same optimizer under DDP): step time, and the memory it adds."""
    header = ["layout", "optimizer", "step ms", "iteration ms", "peak MiB / rank"]
    header += ["step / SGD's", "MiB over SGD", "step / ddp's", "MiB over SGD / ddp's"]
    rows = []
    for layout, per_optimizer in summary.items():
        for name, cell in per_optimizer.items():
            sgd = per_optimizer.get("SGD")
            extra = cell["peak_mib"] - sgd["peak_mib"] if sgd else None
            unsharded = summary.get("ddp", {})
            cells = [
                layout,
                name,
                f"{cell['step_s'] * 1e3:.2f}",
                f"{cell['iteration_s'] * 1e3:.1f}",
                f"{cell['peak_mib']:.0f}",
                f"{cell['step_s'] / sgd['step_s']:.2f}x" if sgd else "-",
                f"{extra:+.0f}" if extra is not None else "-",
            ]
            if name in unsharded and "SGD" in unsharded:
                extra_unsharded = unsharded[name]["peak_mib"] - unsharded["SGD"]["peak_mib"]
                cells.append(f"{cell['step_s'] / unsharded[name]['step_s']:.2f}x")
                cells.append(f"{extra / extra_unsharded:.2f}x" if name != "SGD" else "-")
            else:
                cells += ["-", "-"]
            rows.append(cells)
    return format_table(header, rows)


def plot(summary: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(summary)
    names = list(next(iter(summary.values())))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    width = 0.8 / len(layouts)
    panels = [
        ("step_s", 1e3, "optimizer.step(), ms"),
        ("iteration_s", 1e3, "whole iteration, ms"),
        ("peak_mib", 1.0, "peak memory per rank, MiB"),
    ]
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        for k, layout in enumerate(layouts):
            values = [summary[layout][name][key] * scale for name in names]
            xs = [i + (k - (len(layouts) - 1) / 2) * width for i in range(len(names))]
            bars = ax.bar(xs, values, width, label=layout)
            ax.bar_label(bars, [f"{v:.3g}" for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the labels
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--width", type=int, default=1024, help="hidden width")
    parser.add_argument("--depth", type=int, default=8, help="hidden layers")
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over ranks)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps a run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="torchrun runs of each pair")
    parser.add_argument("--processes", type=int, default=2, help="ranks")
    parser.add_argument(
        "--layouts", nargs="+", default=LAYOUTS, choices=LAYOUTS, help="(default: fsdp2 ddp)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the batch")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="width 256, 4 layers, 10 steps, 1 repeat: 36 s on 2 idle cores",
    )
    add_output_arguments(parser, "sharded")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and not args.worker:
        args.width, args.depth, args.steps, args.repeats = 256, 4, 10, 1
    if args.processes < 2:
        parser.error("--processes must be at least 2: FSDP2 shards over the ranks")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    claim_output(args, "sharded", ["sharded.json", "sharded.png"])
    runs: dict[str, dict[str, list[dict]]] = {
        layout: {name: [] for name in OPTIMIZERS} for layout in args.layouts
    }
    plan = [
        (layout, name)
        for r in range(args.repeats)
        # Alternate the order between repeats, so that a drift in the machine's load
        # does not favour one pair.
        for layout in (args.layouts if r % 2 == 0 else args.layouts[::-1])
        for name in (list(OPTIMIZERS) if r % 2 == 0 else list(OPTIMIZERS)[::-1])
    ]
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (layout, name) in enumerate(tqdm(plan, desc="torchrun runs")):
            runs[layout][name].append(_torchrun(layout, name, args, Path(tmp) / f"{i}.json"))
    load.append(os.getloadavg())
    cpu = torch.device("cpu")
    summary = summarize(runs)
    text = table(summary)
    payload = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(),
        "cpu_count": os.cpu_count(),
        "load_average_before_after": load,
        "parameters": sum(p.numel() for p in _model(args.width, args.depth, 0, cpu).parameters()),
        "summary": summary,
        "agreement": agreement(summary),
        "runs": runs,
        "table": text,
    }
    print(
        f"\nMLP {args.depth}x{args.width}, {payload['parameters']:,} parameters, global batch "
        f"{args.batch}, {args.processes} processes, one thread each, {os.cpu_count()} CPUs, "
        f"load average {load[0][0]:.1f} before, {load[1][0]:.1f} after; medians\n"
    )
    print(text)
    for name, diff in payload["agreement"].items():
        print(
            f"{name}: fsdp2 against ddp, relative differences: weight norm "
            f"{diff['weight_norm']:.1e}, loss {diff['loss']:.1e}"
        )
    write_json(args.out / "sharded.json", payload)
    title = f"MLP {args.depth}x{args.width}, {args.processes} ranks on {args.device}, medians"
    plot(summary, title, args.out / "sharded.png")
    print(f"\nwrote {args.out}/sharded.json and sharded.png")
    return payload


if __name__ == "__main__":
    main()
