"""Cost of a Reptile meta-iteration: torch_metasgd.reptile_loss against a hand-written Reptile.

One meta-iteration = k inner SGD steps on each task of a meta-batch, then the
outer step theta <- theta + epsilon * mean_t(theta_t - theta). Methods, all
with the same update (checked before timing):

* ``reptile_loss``      torch_metasgd.reptile_loss (strategy "auto"), its
                        ``.backward()`` and ``torch.optim.SGD(lr=epsilon).step()``
* ``reptile_loss[loop]``  the same with strategy="loop" (one task at a time)
* ``adapt_tasks+grad``  torch_metasgd.adapt_tasks, then theta - mean_t theta_t
                        written into ``.grad`` by hand and the SGD step: what
                        reptile_loss's surrogate scalar costs beyond that
* ``hand``              the paper's code: per task a ``copy.deepcopy`` of the
                        model, k steps of ``torch.optim.SGD``, then the
                        interpolation in place

Before timing, one meta-iteration of each method from the same weights, in
float64, must give the same weights as ``hand`` (the relative difference is
printed).

Workloads: R1 sinusoid MLP 1-40-40-1, 25 tasks of 10 points, k = 5, inner
step 0.02; R2 conv4 (64 filters, BatchNorm, ReLU, max-pool; 1x28x28 random
images), 5-way 1-shot, 4 tasks, k = 5, inner step 0.4. Time: the median over
``--rounds`` rounds, the methods interleaved; memory: peak RSS growth over 3
meta-iterations in a fresh process (CUDA: ``torch.cuda.max_memory_allocated``).

    python benchmarks/reptile_speed.py --quick
    python benchmarks/reptile_speed.py --threads 1 --out results/reptile_speed
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
from _common import (
    add_output_arguments,
    claim_output,
    cost_cell,
    device_of,
    environment,
    format_table,
    in_fresh_process,
    mark_no_data,
    median_ms_interleaved,
    peak_memory_mib,
    save_figure,
    script_parser,
    threads_label,
    write_json,
)
from torch import nn

from torch_metasgd import MetaSGD, adapt_tasks, reptile_loss

WORKLOADS = {
    "R1": dict(arch="mlp", tasks=25, shots=10, steps=5, alpha=0.02),
    "R2": dict(arch="conv4", tasks=4, shots=5, steps=5, alpha=0.4),
}
METHODS = ["reptile_loss", "reptile_loss[loop]", "adapt_tasks+grad", "hand"]
EPSILON = 0.5


class Case:
    """A model, its inner MetaSGD and outer SGD, and one meta-batch of support sets."""

    def __init__(
        self, workload: str, seed: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> None:
        spec = WORKLOADS[workload]
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        t, n = spec["tasks"], spec["shots"]
        if spec["arch"] == "mlp":
            self.model = nn.Sequential(
                nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
            )
            self.loss_fn = nn.functional.mse_loss
            x = torch.rand(t, n, 1, generator=g) * 10 - 5
            y = (torch.rand(t, 1, 1, generator=g) * 4.9 + 0.1) * x.sin()
        else:
            blocks = [
                [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]
                for c in (1, 64, 64, 64)
            ]
            self.model = nn.Sequential(*sum(blocks, []), nn.Flatten(), nn.Linear(64, 5))
            self.loss_fn = nn.functional.cross_entropy
            x = torch.randn(t, n, 1, 28, 28, generator=g)
            y = torch.arange(5).repeat(t, n // 5)
        self.model.to(device, dtype)
        self.support = (x.to(device, dtype), y.to(device, dtype if y.is_floating_point() else None))
        self.steps, self.alpha = spec["steps"], spec["alpha"]
        self.opt = MetaSGD(self.model.parameters(), lr=self.alpha, granularity="group")
        self.outer = torch.optim.SGD(self.model.parameters(), lr=EPSILON)


def run_reptile_loss(c: Case, strategy: str = "auto") -> None:
    c.outer.zero_grad()
    reptile_loss(c.model, c.opt, c.loss_fn, c.support, steps=c.steps, strategy=strategy).backward()
    c.outer.step()


def run_adapt_tasks(c: Case) -> None:
    adapted = adapt_tasks(c.model, c.opt, c.loss_fn, c.support, steps=c.steps, first_order=True)
    for name, p in c.model.named_parameters():
        p.grad = (p.detach() - adapted[name].detach()).mean(0)
    c.outer.step()


def run_hand(c: Case) -> None:
    total = [torch.zeros_like(p) for p in c.model.parameters()]
    for x, y in zip(*c.support, strict=True):
        work = copy.deepcopy(c.model)
        sgd = torch.optim.SGD(work.parameters(), lr=c.alpha)
        for _ in range(c.steps):
            sgd.zero_grad()
            c.loss_fn(work(x), y).backward()
            sgd.step()
        torch._foreach_add_(total, [p.detach() for p in work.parameters()])
    with torch.no_grad():
        for p, s in zip(c.model.parameters(), total, strict=True):
            p.add_(s / len(c.support[0]) - p, alpha=EPSILON)


RUNS = {
    "reptile_loss": run_reptile_loss,
    "reptile_loss[loop]": lambda c: run_reptile_loss(c, "loop"),
    "adapt_tasks+grad": run_adapt_tasks,
    "hand": run_hand,
}


def disagreement(workload: str, args: argparse.Namespace) -> float:
    """Largest relative difference of the weights after one meta-iteration from ``hand``'s.

    In float64: in float32 the inner steps amplify rounding differences (on
    R2 to about 2e-5), which would hide a real one.
    """
    device = device_of(args.device)
    after = {}
    for method in METHODS:
        case = Case(workload, args.seed, device, torch.float64)
        RUNS[method](case)
        after[method] = torch.cat([p.detach().flatten() for p in case.model.parameters()])
    ref = after["hand"]
    return max(float((w - ref).norm() / ref.norm()) for w in after.values())


def peak_memory(method: str, workload: str, args: argparse.Namespace) -> float:
    """Peak extra memory (MiB) of three meta-iterations (CPU: call it in a fresh process)."""
    torch.set_num_threads(args.threads)
    device = device_of(args.device)
    case = Case(workload, args.seed, device)
    return peak_memory_mib(lambda: [RUNS[method](case) for _ in range(3)], device)


def describe(workload: str) -> str:
    """A workload in words, for titles."""
    spec = WORKLOADS[workload]
    model = "sinusoid MLP 1-40-40-1" if spec["arch"] == "mlp" else "conv4, 5-way 1-shot"
    return f"{workload}: {model}, {spec['tasks']} tasks, k = {spec['steps']} inner steps"


def plot(results: dict, path: Path) -> None:
    """Per workload, each method's median time as a bar (linear, from 0) with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    plt.rcParams.update({"font.size": 9})
    colors = {"torch_metasgd": "tab:green", "hand-written (the Reptile paper's code)": "tab:gray"}
    n = len(results["ms"])
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 2.9), squeeze=False, layout="constrained")
    for ax, (workload, ms) in zip(axes[0], results["ms"].items(), strict=True):
        names, values = list(ms), [ms[m] for m in ms]
        finite = [v for v in values if math.isfinite(v)]
        ax.barh(
            names,
            [v if math.isfinite(v) else 0 for v in values],
            color=[list(colors.values())[m == "hand"] for m in names],
        )
        ax.invert_yaxis()
        right = max(finite, default=1.0)
        hand = ms.get("hand", math.nan)
        for i, (name, v) in enumerate(zip(names, values, strict=True)):
            if not finite:
                continue
            if not math.isfinite(v):
                label = "NaN: no time"
            elif name == "hand" or not math.isfinite(hand):
                label = f"{v:.3g} ms"
            else:
                label = f"{v:.3g} ms ({v / hand:.2f}x hand)"
            ax.text(v if math.isfinite(v) else 0, i, " " + label, va="center")
        ax.set_xlim(0, right * 1.6)  # room for the labels
        ax.set_xlabel(
            f"ms per meta-iteration (median of {results['config']['rounds']} rounds, "
            f"{threads_label(results['environment']['threads'])})"
        )
        ax.set_title(describe(workload))
        if not finite:
            mark_no_data(ax, "no finite time: every method's run failed (NaN)")
    handles = [Patch(color=c, label=label) for label, c in colors.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    save_figure(fig, path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS), help="workloads"
    )
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds (default: 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... or auto (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of models and tasks")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory runs (a process each)"
    )
    parser.add_argument("--quick", action="store_true", help="5 rounds, no memory runs")
    add_output_arguments(parser, "reptile_speed")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.no_memory = 5, True
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    claim_output(args, "reptile_speed", ["reptile_speed.json", "reptile_speed.png"])
    torch.set_num_threads(args.threads)
    device = device_of(args.device)
    results: dict = {"config": {**vars(args), "out": str(args.out)}, "environment": environment()}
    results.update(ms={}, peak_memory_mib={}, disagreement={})
    for workload in args.workloads:
        results["disagreement"][workload] = disagreement(workload, args)
        runs = {}
        for m in METHODS:
            case = Case(workload, args.seed, device)
            runs[m] = lambda m=m, case=case: RUNS[m](case)
        results["ms"][workload] = median_ms_interleaved(runs, args.rounds, device)
        memory = results["peak_memory_mib"][workload] = dict.fromkeys(METHODS, float("nan"))
        for m in [] if args.no_memory else METHODS:
            fresh = device.type != "cuda"
            memory[m] = (
                in_fresh_process(peak_memory, m, workload, args)
                if fresh
                else peak_memory(m, workload, args)
            )
    header = ["method", *(f"{w}: {u}" for w in args.workloads for u in ("ms", "x hand", "MiB"))]
    rows = [
        [
            m,
            *(
                cell
                for w in args.workloads
                for cell in (
                    f"{results['ms'][w][m]:.1f}",
                    f"{results['ms'][w][m] / results['ms'][w]['hand']:.2f}",
                    cost_cell(results["peak_memory_mib"][w][m]),
                )
            ),
        ]
        for m in METHODS
    ]
    results["table"] = format_table(header, rows)
    print(results["table"])
    print(
        "largest relative difference of the weights from hand's after one meta-iteration "
        "(float64): " + ", ".join(f"{w} {d:.1e}" for w, d in results["disagreement"].items())
    )
    write_json(args.out / "reptile_speed.json", results)
    plot(results, args.out / "reptile_speed.png")
    print(f"wrote {args.out}/reptile_speed.json and reptile_speed.png")
    return results


if __name__ == "__main__":
    main()
