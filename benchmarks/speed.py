"""Speed of a Meta-SGD meta-iteration: torch_metasgd against hand-written code and its peers.

One meta-iteration = the meta-loss of a meta-batch (every task's inner loop,
second order, per-element step sizes) and its ``.backward()``. Methods:

* ``meta_loss``   torch_metasgd.meta_loss (strategy "auto"); ``meta_loss[<s>]``
                  forces a strategy, ``meta_loss[compiled]`` runs it under
                  torch.compile (full runs only; the compile falls in the
                  warm-up rounds)
* ``inner_loop``  torch_metasgd.inner_loop (higher), one task at a time
* ``hand_loop``   hand-written: functional_call + autograd.grad, a loop over tasks
* ``hand_vmap``   hand-written: torch.func.grad inside torch.func.vmap over tasks
* ``higher_min``  higher with a minimal per-parameter step-size optimizer
                  (a 20-line DifferentiableOptimizer, step sizes passed live)
* ``torchopt``    torchopt.MetaSGD: a scalar learning rate only, so the closest
                  equivalent, not the same computation

Workloads: W1 sinusoid MLP 1-40-40-1, 25 tasks, 10 support + 10 query points,
1 inner step; W1b the same with 5 inner steps; conv4 (64 filters, BatchNorm in
train mode, ReLU, max-pool; 1x28x28 inputs), 1 inner step: W2 5-way 1-shot
with 15 queries per class, 8 tasks; W3 20-way 1-shot with 5 queries per
class, 16 tasks; W4 5-way 1-shot with 15 queries per class, 32 tasks. Plus
``MetaSGD.step()`` against ``torch.optim.SGD.step()`` (foreach, default and
fused) on a 50-layer MLP (100 parameter tensors).

Timing: all methods of a workload run in one process, interleaved (every
round runs each method once, in a fresh random order) so that machine noise
hits them alike; the figure is the median over rounds after warm-up rounds.
On CUDA every timing is taken after ``torch.cuda.synchronize()``.
Memory: the peak extra memory of a meta-iteration (autograd graph,
activations) over 3 meta-iterations. On CUDA, ``torch.cuda.max_memory_allocated``
above what model and data hold; on a CPU (Linux), each (workload, method)
runs again in a fresh subprocess, which resets its peak resident set size
(VmHWM, via /proc/self/clear_refs) once model and data exist.

    python benchmarks/speed.py --quick                # a smoke run (not a measurement)
    python benchmarks/speed.py                        # the full run on a CPU, one thread
    python benchmarks/speed.py --device cuda          # the full run on a GPU
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import higher
import torch
import torchopt
from _common import (
    add_output_arguments,
    claim_output,
    device_of,
    environment,
    format_table,
    mark_no_data,
    save_figure,
    script_parser,
)
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

import torch_metasgd
from torch_metasgd import MetaSGD, inner_loop, meta_loss

WORKLOADS = {
    "W1": dict(arch="mlp", tasks=25, support=10, query=10, steps=1),
    "W1b": dict(arch="mlp", tasks=25, support=10, query=10, steps=5),
    "W2": dict(arch="conv4", ways=5, tasks=8, support=5, query=75, steps=1),
    "W3": dict(arch="conv4", ways=20, tasks=16, support=20, query=100, steps=1),
    "W4": dict(arch="conv4", ways=5, tasks=32, support=5, query=75, steps=1),
}
METHODS = ["meta_loss", "inner_loop", "hand_loop", "hand_vmap", "higher_min", "torchopt"]
STRATEGY_METHODS = [
    "meta_loss[vmap]",
    "meta_loss[loop]",
    "meta_loss[grouped]",
    "meta_loss[compiled]",
]


# --------------------------------------------------------------------------- workloads


def _conv4(ways: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


class Case:
    """A model, its MetaSGD optimizer, step sizes for the hand-written versions, a meta-batch."""

    def __init__(self, workload: str, seed: int, device: torch.device) -> None:
        spec = WORKLOADS[workload]
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        self.steps = spec["steps"]
        t, ns, nq = spec["tasks"], spec["support"], spec["query"]
        if spec["arch"] == "mlp":
            self.model = _mlp()
            self.loss_fn = nn.functional.mse_loss
            self.xs = torch.rand(t, ns, 1, generator=g) * 10 - 5
            self.xq = torch.rand(t, nq, 1, generator=g) * 10 - 5
            amp, phase = torch.rand(t, 1, 1, generator=g) * 4.9 + 0.1, torch.rand(t, 1, 1) * 3.14
            self.ys, self.yq = amp * (self.xs + phase).sin(), amp * (self.xq + phase).sin()
        else:
            ways = spec["ways"]
            self.model = _conv4(ways).train()
            self.loss_fn = nn.functional.cross_entropy
            self.xs = torch.randn(t, ns, 1, 28, 28, generator=g)
            self.xq = torch.randn(t, nq, 1, 28, 28, generator=g)
            self.ys = torch.arange(ways).repeat(t, ns // ways)
            self.yq = torch.arange(ways).repeat_interleave(nq // ways).repeat(t, 1)
        self.model.to(device)
        self.xs, self.ys, self.xq, self.yq = (
            t.to(device) for t in (self.xs, self.ys, self.xq, self.yq)
        )
        self.opt = MetaSGD(self.model.parameters(), lr=1.0).uniform_step_sizes_(
            0.005, 0.1, generator=g
        )
        # The hand-written versions and higher_min get their own leaf step
        # sizes (the same values): alpha = s, as MetaSGD's identity parametrization.
        self.alphas = [s.detach().clone().requires_grad_() for s in self.opt.meta_parameters()]
        self.names = [n for n, _ in self.model.named_parameters()]

    def zero_grad(self) -> None:
        for t in [*self.model.parameters(), *self.opt.meta_parameters(), *self.alphas]:
            t.grad = None


def run_meta_loss(c: Case, strategy: str = "auto") -> None:
    meta_loss(
        c.model, c.opt, c.loss_fn, (c.xs, c.ys), (c.xq, c.yq), steps=c.steps, strategy=strategy
    ).backward()


def run_inner_loop(c: Case) -> None:
    n_tasks = c.xs.shape[0]
    for t in range(n_tasks):
        with inner_loop(c.model, c.opt) as (fmodel, diffopt):
            for _ in range(c.steps):
                diffopt.step(c.loss_fn(fmodel(c.xs[t]), c.ys[t]))
            (c.loss_fn(fmodel(c.xq[t]), c.yq[t]) / n_tasks).backward()


def run_hand_loop(c: Case) -> None:
    params = dict(c.model.named_parameters())
    losses = []
    for t in range(c.xs.shape[0]):
        fast = params
        for _ in range(c.steps):
            loss = c.loss_fn(functional_call(c.model, fast, (c.xs[t],)), c.ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {
                n: p - a * g for (n, p), a, g in zip(fast.items(), c.alphas, grads, strict=True)
            }
        losses.append(c.loss_fn(functional_call(c.model, fast, (c.xq[t],)), c.yq[t]))
    torch.stack(losses).mean().backward()


def run_hand_vmap(c: Case) -> None:
    params = dict(c.model.named_parameters())
    alphas = dict(zip(c.names, c.alphas, strict=True))
    n_tasks = c.xs.shape[0]
    # Per-task copies: train-mode BatchNorm writes running stats, which vmap
    # allows only into batched tensors.
    buffers = {n: b.expand(n_tasks, *b.shape).clone() for n, b in c.model.named_buffers()}

    def task(buffers, xs, ys, xq, yq):
        def support_loss(p, b):
            return c.loss_fn(functional_call(c.model, (p, b), (xs,)), ys)

        fast = params
        for _ in range(c.steps):
            g = grad(support_loss)(fast, buffers)
            fast = {n: fast[n] - alphas[n] * g[n] for n in fast}
        return c.loss_fn(functional_call(c.model, (fast, buffers), (xq,)), yq)

    vmap(task)(buffers, c.xs, c.ys, c.xq, c.yq).mean().backward()


class _StepSizeSGD(torch.optim.SGD):
    """A stand-in optimizer type so that higher picks the minimal differentiable one below."""


class _MinimalDiffMetaSGD(higher.optim.DifferentiableOptimizer):
    """``p <- p - alpha * g`` with one live step-size tensor per parameter.

    higher deep-copies ``param_groups``, so the step sizes cannot live there:
    they are set as ``diffopt.alphas`` after construction.
    """

    alphas: list[Tensor]

    def _update(self, grouped_grads, **kwargs) -> None:
        index = 0
        for group, grads in zip(self.param_groups, grouped_grads, strict=True):
            for i, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is not None:
                    group["params"][i] = p - self.alphas[index] * g
                index += 1


higher.register_optim(_StepSizeSGD, _MinimalDiffMetaSGD)


def run_higher_min(c: Case) -> None:
    if not hasattr(c, "plain_opt"):
        c.plain_opt = _StepSizeSGD(c.model.parameters(), lr=1.0)
    n_tasks = c.xs.shape[0]
    for t in range(n_tasks):
        with higher.innerloop_ctx(c.model, c.plain_opt, copy_initial_weights=False) as (
            fmodel,
            diffopt,
        ):
            diffopt.alphas = c.alphas
            for _ in range(c.steps):
                diffopt.step(c.loss_fn(fmodel(c.xs[t]), c.ys[t]))
            (c.loss_fn(fmodel(c.xq[t]), c.yq[t]) / n_tasks).backward()


def run_torchopt(c: Case) -> None:
    if not hasattr(c, "torchopt_opt"):
        # torchopt swaps the module's parameters in place: a copy of its own.
        c.torchopt_model = copy.deepcopy(c.model)
        c.torchopt_opt = torchopt.MetaSGD(c.torchopt_model, lr=0.05)
    net, opt = c.torchopt_model, c.torchopt_opt
    for p in net.parameters():
        p.grad = None
    net_state = torchopt.extract_state_dict(net)
    opt_state = torchopt.extract_state_dict(opt)
    n_tasks = c.xs.shape[0]
    for t in range(n_tasks):
        for _ in range(c.steps):
            opt.step(c.loss_fn(net(c.xs[t]), c.ys[t]))
        (c.loss_fn(net(c.xq[t]), c.yq[t]) / n_tasks).backward()
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(opt, opt_state)


def run_compiled_meta_loss(c: Case) -> None:
    # Compiled once per case, in the first (warm-up) call; torch.compile runs
    # meta_loss's vmap strategy (the one that compiles exactly).
    if not hasattr(c, "compiled_meta_loss"):
        c.compiled_meta_loss = torch.compile(
            lambda: meta_loss(c.model, c.opt, c.loss_fn, (c.xs, c.ys), (c.xq, c.yq), steps=c.steps)
        )
    c.compiled_meta_loss().backward()


def method_fn(name: str) -> Callable[[Case], None]:
    if name == "meta_loss[compiled]":
        return run_compiled_meta_loss
    if name.startswith("meta_loss["):
        strategy = name[len("meta_loss[") : -1]
        return lambda c: run_meta_loss(c, strategy)
    return {
        "meta_loss": run_meta_loss,
        "inner_loop": run_inner_loop,
        "hand_loop": run_hand_loop,
        "hand_vmap": run_hand_vmap,
        "higher_min": run_higher_min,
        "torchopt": run_torchopt,
    }[name]


def check_agreement(workload: str, seed: int, device: torch.device) -> float:
    """Relative difference of meta_loss's step-size gradient from the hand-written loop's."""
    c = Case(workload, seed, device)
    run_meta_loss(c)
    run_hand_loop(c)
    ours = torch.cat([s.grad.flatten() for s in c.opt.meta_parameters()])
    ref = torch.cat([a.grad.flatten() for a in c.alphas])
    return float((ours - ref).norm() / ref.norm())


# --------------------------------------------------------------------------- timing


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _synchronize(device: torch.device) -> None:
    # Kernels run asynchronously on a GPU: a clock read must wait for them.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_workload(
    workload: str,
    methods: list[str],
    rounds: int,
    warmup: int,
    seed: int,
    device: torch.device,
    progress: tqdm,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per meta-iteration, ``{clock: {method: [per round]}}``."""
    case = Case(workload, seed, device)
    rng = random.Random(seed)
    times = {clock: {m: [] for m in methods} for clock in CLOCKS}
    for r in range(warmup + rounds):
        order = methods[:]
        rng.shuffle(order)
        for m in order:
            fn = method_fn(m)
            case.zero_grad()
            _synchronize(device)
            start = {clock: now() for clock, now in CLOCKS.items()}
            fn(case)
            _synchronize(device)
            if r >= warmup:
                for clock, now in CLOCKS.items():
                    times[clock][m].append(now() - start[clock])
        progress.update(1)
    return times


def step_variants() -> dict[str, Callable]:
    """The optimizers of the step table, by label."""
    # Without momentum SGD's step is one kernel, so MetaSGD's extra read of the
    # step sizes shows most there; momentum 0.9 is the common case.
    variants = {}
    for momentum in (0.0, 0.9):
        for label, kind in (("foreach", dict(foreach=True)), ("default", {})):
            for name, cls in (("SGD", torch.optim.SGD), ("MetaSGD", MetaSGD)):
                variants[f"{name}({label}, momentum={momentum:g})"] = functools.partial(
                    cls, lr=0.01, momentum=momentum, **kind
                )
        variants[f"SGD(fused, momentum={momentum:g})"] = functools.partial(
            torch.optim.SGD, lr=0.01, momentum=momentum, fused=True
        )
    return variants


def time_optimizer_step(
    rounds: int,
    steps_per_round: int,
    seed: int,
    clock: str,
    device: torch.device,
    progress: tqdm,
) -> dict[str, list[float]]:
    """Seconds per ``step()`` of MetaSGD and torch.optim.SGD on a 50-layer MLP."""
    torch.manual_seed(seed)
    layers = [nn.Linear(64, 64, device=device) for _ in range(50)]
    params = [p for layer in layers for p in layer.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {name: make(params) for name, make in step_variants().items()}
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in opts}
    for r in range(rounds + 1):
        order = list(opts)
        rng.shuffle(order)
        for name in order:
            opt = opts[name]
            _synchronize(device)
            start = CLOCKS[clock]()
            for _ in range(steps_per_round):
                opt.step()
            _synchronize(device)
            if r > 0:
                times[name].append((CLOCKS[clock]() - start) / steps_per_round)
        progress.update(1)
    return times


# --------------------------------------------------------------------------- memory


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def cuda_memory(workload: str, method: str, iters: int, seed: int, device: torch.device) -> float:
    """Peak CUDA memory (MiB) that ``iters`` meta-iterations allocate above model and data."""
    case = Case(workload, seed, device)
    fn = method_fn(method)
    fn(case)  # first-call allocations (cuDNN workspaces, caches) are not the method's
    case.zero_grad()
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(iters):
        case.zero_grad()
        fn(case)
    _synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def child_memory(workload: str, method: str, iters: int, seed: int) -> None:
    """Run in a fresh process: print the peak RSS growth (MiB) over ``iters`` meta-iterations.

    Linux's peak RSS (VmHWM) is reset to the current RSS through
    /proc/self/clear_refs once the model and data exist, so the figure is the
    peak extra memory of the meta-iterations alone. (ru_maxrss cannot be
    used: a child process inherits its parent's peak.)
    """
    case = Case(workload, seed, torch.device("cpu"))
    fn = method_fn(method)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mib("VmRSS")
    for _ in range(iters):
        case.zero_grad()
        fn(case)
    print(json.dumps({"peak_rss_growth_mib": _status_mib("VmHWM") - before}))


def measure_memory(workload: str, method: str, threads: int, seed: int) -> float | None:
    cmd = [
        sys.executable,
        __file__,
        "--_child",
        workload,
        method,
        "--threads",
        str(threads),
        "--seed",
        str(seed),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"memory run failed for {workload}/{method}:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]


# --------------------------------------------------------------------------- report


def targets(
    med: dict[str, dict[str, float]], step: dict[str, float], device: torch.device
) -> list[dict]:
    """The project's targets on this kind of device, as ratios of medians measured in this run."""
    out = []

    def add(name: str, value: float, ok: bool) -> None:
        out.append({"target": name, "value": round(value, 3), "met": bool(ok)})

    gpu = device.type != "cpu"
    for w, m in med.items():
        best = min(m["hand_loop"], m["hand_vmap"])
        conv = WORKLOADS[w]["arch"] == "conv4"
        limit = 0.6 if gpu and conv else 1.1
        ratio = m["meta_loss"] / best
        add(f"{w}: meta_loss / best hand-written <= {limit}", ratio, ratio <= limit)
        ratio = m["inner_loop"] / m["higher_min"]
        add(f"{w}: inner_loop / higher_min <= 1.15", ratio, ratio <= 1.15)
        if gpu and conv:
            ratio = m["higher_min"] / m["meta_loss"]
            add(f"{w}: higher_min / meta_loss >= 15", ratio, ratio >= 15)
    if "W1" in med:
        ratio = med["W1"]["higher_min"] / med["W1"]["meta_loss"]
        add("W1: higher_min / meta_loss >= 5", ratio, ratio >= 5)
    for momentum in (0, 0.9):
        for kind in ("foreach", "default"):
            variant = f"{kind}, momentum={momentum}"
            ratio = step[f"MetaSGD({variant})"] / step[f"SGD({variant})"]
            add(f"MetaSGD.step / SGD.step ({variant}) <= 1.3", ratio, ratio <= 1.3)
    return out


def describe(workload: str, sep: str = ", ") -> str:
    """A workload in words, for titles: ``W2: conv4, 5-way 1-shot, 8 tasks, 1 inner step``."""
    spec = WORKLOADS[workload]
    if spec["arch"] == "mlp":
        model = "sinusoid MLP 1-40-40-1"
    else:
        model = f"conv4, {spec['ways']}-way {spec['support'] // spec['ways']}-shot"
    steps = f"{spec['steps']} inner step" + ("s" if spec["steps"] > 1 else "")
    return f"{workload}: {model}{sep}{spec['tasks']} tasks, {steps}"


# The colours of the meta-iteration bars, by who wrote the method.
KINDS = {
    "meta_loss (torch_metasgd, batched)": "tab:green",
    "inner_loop (torch_metasgd, task by task)": "tab:blue",
    "hand-written, higher, torchopt": "tab:gray",
}


def _number(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _kind(method: str) -> str:
    names = list(KINDS)
    return names[0] if method.startswith("meta_loss") else names[1 + (method != "inner_loop")]


def plot(path: Path, med: dict[str, dict[str, float]], step: dict[str, float], clock: str) -> None:
    """Bars from 0 on linear axes, each with its value: one panel per workload, one for step().

    Linear, although the methods differ up to 50x: a bar's length is then its
    time, and the printed value reads the short ones.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    plt.rcParams.update({"font.size": 9})
    panels = len(med) + 1
    columns = min(panels, 3)
    rows = -(-panels // columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(4.8 * columns, 0.4 + 3.1 * rows),
        squeeze=False,
        layout="constrained",
    )
    cells = list(axes.flat)
    for ax in cells[panels:]:
        ax.axis("off")

    def bars(ax, labels: list[str], values: list[float], colors: list[str], unit: str, ref):
        finite = [v for v in values if math.isfinite(v)]
        ax.barh(labels, [v if math.isfinite(v) else 0 for v in values], color=colors)
        ax.invert_yaxis()
        ax.set_xlim(0, max(finite, default=1.0) * 1.6)  # room for the values
        for i, v in enumerate(values):
            if not finite:
                break
            text = f"{_number(v)} {unit}" if math.isfinite(v) else "NaN: not measured"
            if math.isfinite(v) and ref is not None and math.isfinite(ref) and v != ref:
                text += f" ({v / ref:.2f}x)"
            ax.text(v if math.isfinite(v) else 0, i, " " + text, va="center", fontsize=8)
        if not finite:
            mark_no_data(ax, "no finite time (NaN): every run failed")

    for ax, (w, m) in zip(cells, med.items(), strict=False):
        names = list(m)
        bars(
            ax,
            names,
            [m[n] * 1e3 for n in names],
            [KINDS[_kind(n)] for n in names],
            "ms",
            m["meta_loss"] * 1e3 if "meta_loss" in m else None,
        )
        ax.set_xlabel(f"ms per meta-iteration ({clock} clock, median)\n(in brackets: x meta_loss)")
        ax.set_title(describe(w, sep="\n"))
    ax = cells[len(med)]
    labels = [name.replace("momentum=", "momentum ") for name in step]
    bars(
        ax,
        labels,
        [v * 1e6 for v in step.values()],
        ["tab:purple" if name.startswith("MetaSGD") else "tab:olive" for name in step],
        "us",
        None,
    )
    ax.set_xlabel(f"microseconds per step() ({clock} clock, median)")
    ax.set_title("optimizer step()\n50-layer MLP, 100 tensors")
    handles = [Patch(color=c, label=label) for label, c in KINDS.items()]
    handles += [
        Patch(color="tab:purple", label="MetaSGD.step()"),
        Patch(color="tab:olive", label="torch.optim.SGD.step()"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    save_figure(fig, path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (not a measurement: no targets): W1 and W2, 3 rounds, no strategy "
        "variants, no memory",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (default: cpu)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds per workload (default: 15 for the MLPs, 10 for the conv nets; "
        "3 with --quick)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=None,
        choices=list(WORKLOADS),
        help=f"default: {' '.join(WORKLOADS)} (W1 W2 with --quick)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"default: {' '.join(METHODS)}, plus {' '.join(STRATEGY_METHODS)} unless --quick",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, as every benchmark; 0 for torch's own choice",
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="what the table, targets and chart use: wall time, or this process's CPU time "
        "(steadier on a shared machine with --threads 1); the JSON holds both",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of models and tasks")
    add_output_arguments(parser, "speed")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        child_memory(*args._child, iters=3, seed=args.seed)
        return {}
    claim_output(args, "speed", ["speed.json", "speed.png"])

    device = device_of(args.device)
    methods = args.methods or (METHODS if args.quick else METHODS + STRATEGY_METHODS)
    default_workloads = ["W1", "W2"] if args.quick else list(WORKLOADS)
    workloads = args.workloads or default_workloads
    measure = not (args.no_memory or args.quick)
    warmup = 1 if args.quick else args.warmup
    rounds_of = {
        w: args.rounds or (3 if args.quick else 10 if WORKLOADS[w]["arch"] == "conv4" else 15)
        for w in workloads
    }
    step_rounds = 5 if args.quick else 20
    total = sum(warmup + r for r in rounds_of.values()) + step_rounds + 1
    progress = tqdm(total=total, desc="rounds")
    agreement = {w: check_agreement(w, args.seed, device) for w in workloads}
    both: dict[str, dict[str, dict[str, list[float]]]] = {}
    for w in workloads:
        progress.set_postfix_str(w)
        both[w] = time_workload(w, methods, rounds_of[w], warmup, args.seed, device, progress)
    raw = {w: t[args.clock] for w, t in both.items()}
    progress.set_postfix_str("optimizer step")
    raw_step = time_optimizer_step(step_rounds, 50, args.seed, args.clock, device, progress)
    progress.close()

    memory: dict[str, dict[str, float | None]] = {}
    if measure:
        cases = [(w, m) for w in workloads for m in methods]
        for w, m in tqdm(cases, desc="memory"):
            memory.setdefault(w, {})[m] = (
                cuda_memory(w, m, 3, args.seed, device)
                if device.type == "cuda"
                else measure_memory(w, m, torch.get_num_threads(), args.seed)
            )

    med = {w: {m: statistics.median(v) for m, v in t.items()} for w, t in raw.items()}
    step = {n: statistics.median(v) for n, v in raw_step.items()}
    rows = []
    for w, m in med.items():
        ref = m.get("meta_loss")
        for name, sec in m.items():
            mem = memory.get(w, {}).get(name)
            rows.append(
                [
                    w,
                    name,
                    f"{sec * 1e3:.1f}",
                    f"{sec / ref:.2f}" if ref else "-",
                    "-" if mem is None else f"{mem:.0f}",
                ]
            )
    where = environment()["cuda"] if device.type == "cuda" else f"{platform.machine()} CPU"
    memory_what = (
        "peak CUDA memory above model and data over 3 meta-iterations, MiB"
        if device.type == "cuda"
        else "peak RSS (VmHWM) growth over 3 meta-iterations in a fresh process, MiB"
    )
    print()
    print(
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} thread(s), "
        f"{args.clock} clock, median of {rounds_of} rounds after {warmup} warm-up"
    )
    memory_label = "peak CUDA memory (MiB)" if device.type == "cuda" else "peak RSS growth (MiB)"
    header = ["workload", "method", f"ms / meta-iter ({args.clock})", "x meta_loss", memory_label]
    print(format_table(header, rows))
    print(
        "meta_loss vs hand-written loop, relative difference of the step-size gradient: "
        + ", ".join(f"{w} {v:.1e}" for w, v in agreement.items())
    )
    print()
    sgd_rows = [[n, f"{v * 1e6:.1f}"] for n, v in step.items()]
    print(format_table(["step() on 100 tensors", "us / step"], sgd_rows))
    goals = targets(med, step, device) if set(METHODS) <= set(methods) and not args.quick else []
    if args.quick:
        print("\n--quick is a smoke run of 3 rounds, not a measurement: no targets are judged.")
    if goals:
        print()
        print(
            format_table(
                ["target", "ratio", "met"],
                [[g["target"], f"{g['value']:.2f}", "yes" if g["met"] else "NO"] for g in goals],
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join(sys.argv),
        "environment": {
            **environment(),
            "torch_metasgd": torch_metasgd.__version__,
            "higher": getattr(higher, "__version__", None),
            "torchopt": torchopt.__version__,
        },
        "workloads": WORKLOADS,
        "rounds": rounds_of,
        "warmup": warmup,
        "clock": args.clock,
        "seconds": {w: t["wall"] for w, t in both.items()},
        "cpu_seconds": {w: t["cpu"] for w, t in both.items()},
        "median_seconds": med,  # of the --clock
        "device": str(device),
        "memory": {"what": memory_what, "mib": memory},
        "optimizer_step_seconds": raw_step,
        "optimizer_step_median_seconds": step,
        "agreement_step_size_grad_rel_diff": agreement,
        "targets": goals,
    }
    (args.out / "speed.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(args.out / "speed.png", med, step, args.clock)
    print(f"\nwrote {args.out / 'speed.json'} and {args.out / 'speed.png'}")
    return payload


if __name__ == "__main__":
    main()
