"""Few-shot sinusoid regression (Meta-SGD paper, Section 4.1, Table 1): four meta-learners.

Tasks: ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``. The learner is a 1-40-40-1 ReLU
MLP; the inner loop runs on the mean squared error of a K-shot support set.
One model per K and per method, on the same budget, seeds and tasks:

* ``maml``: learned initialization, ONE inner step of fixed scalar size
  ``alpha = 0.01`` (MAML's value): ``MetaSGD(lr=0.01, granularity="group")``
  whose step size is not given to the outer optimizer, so it stays 1 and the
  update is plain SGD;
* ``metasgd``: learned initialization and learned elementwise step sizes, one
  inner step: ``MetaSGD(lr=1.0)`` (identity parametrization, so
  ``alpha = s``), ``alpha`` drawn from ``U[0.005, 0.1]`` as in the paper;
* ``fomaml``: MAML without second derivatives (``first_order=True``);
* ``reptile``: :func:`torch_metasgd.reptile_loss`, ``--reptile-steps`` (5)
  inner steps of ``--reptile-alpha`` (0.02, the inner step of the Reptile
  paper's sinusoid demo); its update does not use the query points (they
  give the loss logged). ``--reptile-outer sgd`` replaces Adam by the paper's
  SGD with step ``--reptile-epsilon`` (1.0) annealed linearly to 0.

Meta-training: Adam (lr 1e-3) on :func:`torch_metasgd.meta_loss` (Reptile:
on :func:`torch_metasgd.reptile_loss`), meta-batches of ``--meta-batch``
tasks, each with K support points and ``--train-query`` query points
(default K, as MAML's reference code). Evaluation: ``--eval-tasks``
held-out tasks (the same for every method and K), each adapted on K support
points with the method's own inner loop (one step; Reptile: its 5) and
scored by the MSE on 100 points drawn uniformly from [-5, 5]; the table
gives the mean MSE and its 95% confidence interval. Cost per method: the
median time of a meta-iteration (the methods interleaved,
``--timing-rounds`` rounds) and the peak memory of three meta-iterations
(CPU: peak RSS growth in a fresh process; CUDA:
``torch.cuda.max_memory_allocated``).

Under torchrun every meta-batch's tasks are split over the processes (DDP,
gloo on CPU, NCCL on CUDA): the same training as one process, up to float
rounding. Rank 0 evaluates, prints and writes; the JSON records
``world_size`` and ``ranks_identical``.

    python benchmarks/sinusoid.py --quick
    python benchmarks/sinusoid.py              # 6000 meta-iterations per model
    torchrun --standalone --nproc_per_node=2 benchmarks/sinusoid.py --quick
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from _common import (
    LABELS,
    METHODS,
    Learner,
    add_cost_arguments,
    add_method_arguments,
    add_output_arguments,
    build_learner,
    claim_output,
    cost_cell,
    device_of,
    environment,
    format_table,
    launch,
    mark_no_data,
    mean_ci95,
    method_costs,
    parameter_labels,
    peak_memory_mib,
    plain_log_ticks,
    print_cost_table,
    rank,
    save_figure,
    script_parser,
    seed_everything,
    train_learner,
    world_size,
    write_json,
)
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from torch_metasgd import MetaSGD, adapt

# Meta-SGD arXiv:1707.09835, Table 1: MSE ± 95% CI after one inner step.
PAPER = {
    "maml": {5: (1.13, 0.18), 10: (0.77, 0.11), 20: (0.48, 0.08)},
    "metasgd": {5: (0.90, 0.16), 10: (0.53, 0.09), 20: (0.31, 0.05)},
}
AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
MAML_ALPHA = 0.01
# The inner SGD step of the Reptile paper's sinusoid demo (its gist, linked
# from openai.com/blog/reptile).
REPTILE_ALPHA = 0.02


def sample_tasks(
    n_tasks: int, n_points: int, generator: torch.Generator, *, amp_phase: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, y, amp_phase)``: ``x, y`` of shape ``(n_tasks, n_points, 1)``.

    Pass ``amp_phase`` (``(n_tasks, 2)``) to draw fresh points of given tasks.
    """
    if amp_phase is None:
        u = torch.rand(n_tasks, 2, generator=generator)
        amp = AMPLITUDE[0] + (AMPLITUDE[1] - AMPLITUDE[0]) * u[:, 0]
        phase = PHASE[0] + (PHASE[1] - PHASE[0]) * u[:, 1]
        amp_phase = torch.stack([amp, phase], dim=1)
    x = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * torch.rand(
        n_tasks, n_points, 1, generator=generator
    )
    return x, target(x, amp_phase), amp_phase


def target(x: Tensor, amp_phase: Tensor) -> Tensor:
    amp, phase = amp_phase[:, 0].view(-1, 1, 1), amp_phase[:, 1].view(-1, 1, 1)
    return amp * torch.sin(x - phase)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def learner(method: str, args: argparse.Namespace, device: torch.device) -> Learner:
    """The model and its optimizers, from the same initialization for every method."""
    torch.manual_seed(args.seed)
    return build_learner(
        method,
        make_model().to(device),
        args,
        loss_fn=F.mse_loss,
        maml_alpha=MAML_ALPHA,
        steps=1,
        meta_lr=1e-3,
        seed=args.seed,
    )


def task_stream(k: int, args: argparse.Namespace, device: torch.device):
    """``sample()``: meta-batches from the stream of K-shot tasks every method trains on."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + k)
    n_query = args.train_query or k

    def sample() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        xs, ys, amp_phase = sample_tasks(args.meta_batch, k, gen)
        xq, yq, _ = sample_tasks(args.meta_batch, n_query, gen, amp_phase=amp_phase)
        return (xs.to(device), ys.to(device)), (xq.to(device), yq.to(device))

    return sample


def train(
    method: str, k: int, args: argparse.Namespace, device: torch.device
) -> tuple[Learner, dict]:
    trained = learner(method, args, device)
    log = train_learner(
        trained,
        task_stream(k, args, device),
        F.mse_loss,
        iterations=args.iterations,
        log_every=args.log_every,
        desc=f"{LABELS[method]:8s} K={k:2d}",
    )
    return trained, log


def peak_memory(method: str, k: int, args: argparse.Namespace) -> float:
    """Peak extra memory (MiB) of three meta-iterations of a fresh learner (CPU: run it fresh)."""
    torch.set_num_threads(args.threads)
    device = device_of(args.device)
    trained, sample = learner(method, args, device), task_stream(k, args, device)
    return peak_memory_mib(lambda: [trained.step(*sample()) for _ in range(3)], device)


def evaluate(
    model: nn.Module, opt: MetaSGD, tasks: dict[str, Tensor], device: torch.device, steps: int = 1
) -> Tensor:
    """Per-task query MSE after ``steps`` inner steps on each task's support set."""
    losses = []
    for t in range(tasks["xs"].shape[0]):
        # first_order only drops the graph: the adapted values are the same.
        fast = adapt(
            model,
            opt,
            F.mse_loss,
            tasks["xs"][t].to(device),
            tasks["ys"][t].to(device),
            steps=steps,
            first_order=True,
        )
        with torch.no_grad():
            pred = functional_call(model, fast, (tasks["xq"][t].to(device),))
            losses.append(F.mse_loss(pred, tasks["yq"][t].to(device)).item())
    return torch.tensor(losses)


def eval_tasks(n_tasks: int, k: int, n_query: int, seed: int) -> dict[str, Tensor]:
    # Disjoint from the training streams (seed * 1000 + K).
    gen = torch.Generator().manual_seed(10_000_019 + seed)
    xs, ys, amp_phase = sample_tasks(n_tasks, 20, gen)
    xq, yq, _ = sample_tasks(n_tasks, n_query, gen, amp_phase=amp_phase)
    # The first k of 20 support points: the K-shot sets are nested, the tasks the same for every K.
    return {"xs": xs[:, :k], "ys": ys[:, :k], "xq": xq, "yq": yq, "amp_phase": amp_phase}


def step_sizes_by_layer(model: nn.Module, opt: MetaSGD) -> dict[str, list[float]]:
    with torch.no_grad():
        return {
            name: opt.effective_lr(p).flatten().tolist() for name, p in model.named_parameters()
        }


COLORS = {"maml": "tab:orange", "metasgd": "tab:blue", "reptile": "tab:green", "fomaml": "tab:red"}


def _finite(values) -> bool:
    return any(math.isfinite(v) for v in values)


def plot(
    results: dict, learners: dict, ks: list[int], args: argparse.Namespace, path: Path
) -> None:
    """Three test tasks fitted after adaptation, the meta-training curves, Meta-SGD's step sizes.

    A method whose values are NaN (diverged training) says so in the legend;
    a panel with nothing finite to draw says why.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    k = 10 if 10 in ks else ks[0]
    methods = [m for m in METHODS if (m, k) in learners]
    tasks = eval_tasks(3, k, 1, args.seed)
    grid = torch.linspace(*X_RANGE, 200).view(1, -1, 1)
    plt.rcParams.update({"font.size": 9})
    fig = plt.figure(figsize=(12, 6.8), layout="constrained")
    spec = fig.add_gridspec(2, 6)
    task_axes = [fig.add_subplot(spec[0, 2 * t : 2 * t + 2]) for t in range(3)]
    diverged = set()
    for t, ax in enumerate(task_axes):
        truth = target(grid, tasks["amp_phase"][t : t + 1])[0, :, 0]
        ax.plot(grid[0, :, 0], truth, "k-", lw=1.5, label="ground truth")
        for method in methods:
            trained = learners[(method, k)]
            dev = next(trained.model.parameters()).device
            with torch.no_grad():
                fast = adapt(
                    trained.model,
                    trained.opt,
                    F.mse_loss,
                    tasks["xs"][t].to(dev),
                    tasks["ys"][t].to(dev),
                    steps=trained.steps,
                )
                pred = functional_call(trained.model, fast, (grid[0].to(dev),)).cpu()
            if not _finite(pred[:, 0].tolist()):
                diverged.add(method)
            steps = f"after {trained.steps} inner step" + ("s" if trained.steps > 1 else "")
            ax.plot(
                grid[0, :, 0],
                pred[:, 0],
                color=COLORS[method],
                lw=1.2,
                label=f"{LABELS[method]} {steps}" + (" (NaN: diverged)" * (method in diverged)),
            )
        ax.scatter(
            tasks["xs"][t, :, 0],
            tasks["ys"][t, :, 0],
            c="k",
            marker="^",
            s=25,
            zorder=5,
            label=f"the {k} support points (shots)",
        )
        amplitude, phase = tasks["amp_phase"][t].tolist()
        ax.set(
            title=f"test task {t + 1}: A = {amplitude:.2f}, phase = {phase:.2f}",
            xlabel="x",
            ylabel="y",
        )
    handles, labels = task_axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=3)

    ax = fig.add_subplot(spec[1, :3])
    curves = {m: results["train"][m][str(k)]["curve"] for m in methods}
    nan = [LABELS[m] for m, curve in curves.items() if curve and not _finite(v for _, v in curve)]
    for method, curve in curves.items():
        if curve:  # empty with --iterations 0
            it, loss = zip(*curve, strict=True)
            ax.plot(it, loss, color=COLORS[method], lw=1.2)
    ax.set(
        xlabel="meta-iteration",
        ylabel="query MSE after the inner loop (log)",
        title=f"meta-training loss, K = {k} (colours as above)",
    )
    if len(nan) < sum(map(bool, curves.values())):
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
        if nan:
            ax.text(
                0.98,
                0.97,
                f"NaN, diverged: {', '.join(nan)}",
                transform=ax.transAxes,
                ha="right",
                va="top",
                color="tab:red",
            )
    else:
        why = "NaN, diverged" if nan else "no meta-training (--iterations 0)"
        mark_no_data(ax, f"no finite meta-training loss: {why}")

    if "metasgd" in methods:
        ax = fig.add_subplot(spec[1, 3:])
        alphas = results["step_sizes"][str(k)]
        names = list(alphas)
        labels = parameter_labels(learners[("metasgd", k)].model)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.axhline(MAML_ALPHA, color=COLORS["maml"], ls="--", lw=1.2)
        finite = [[a for a in alphas[n] if math.isfinite(a)] for n in names]
        ax.boxplot(
            finite,
            showfliers=False,
            medianprops={"color": "black"},
            boxprops={"color": COLORS["metasgd"]},
            whiskerprops={"color": COLORS["metasgd"]},
            capprops={"color": COLORS["metasgd"]},
        )
        ticks = [
            "\n".join(labels.get(n, n).rsplit(" ", 1))
            + f"\n({len(alphas[n])})"
            + ("\nNaN" if len(f) < len(alphas[n]) else "")
            for n, f in zip(names, finite, strict=True)
        ]
        ax.set_xticks(range(1, len(names) + 1), ticks)
        ax.set(
            xlabel="parameter tensor (its number of elements)",
            ylabel="learned step size alpha",
            title=f"Meta-SGD's learned step sizes, K = {k}",
        )
        ax.legend(
            handles=[
                Patch(facecolor="white", edgecolor=COLORS["metasgd"], label="middle half"),
                Line2D([], [], color=COLORS["metasgd"], label="whiskers: 1.5 IQR"),
                Line2D([], [], color="black", label="median"),
                Line2D([], [], color=COLORS["maml"], ls="--", label=f"MAML's fixed {MAML_ALPHA}"),
            ],
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
            title="a tensor's elements",
        )
        if not any(finite):
            mark_no_data(ax, "Meta-SGD's step sizes are NaN: its training diverged")
    save_figure(fig, path, dpi=90)


def tables(results: dict, args: argparse.Namespace) -> tuple[str, str]:
    """The MSE table (with the paper's figures) and the cost table."""
    header = ["Method", "inner steps", *(f"{k}-shot" for k in args.shots)]
    rows = []
    for method in args.methods:
        steps = str(args.reptile_steps if method == "reptile" else 1)
        if method in PAPER:
            paper = [
                f"{PAPER[method][k][0]:.2f} ± {PAPER[method][k][1]:.2f}"
                if k in PAPER[method]
                else "-"
                for k in args.shots
            ]
            rows.append([f"{LABELS[method]} (paper)", "1", *paper])
        mine = results["mse"][method]
        ours = [f"{mine[str(k)]['mean']:.2f} ± {mine[str(k)]['ci95']:.2f}" for k in args.shots]
        rows.append([f"{LABELS[method]} (this run)", steps, *ours])
    cost_header = ["Method", *(f"{k}-shot: {unit}" for k in args.shots for unit in ("ms", "MiB"))]
    cost_rows = [
        [
            LABELS[method],
            *(
                cost_cell(value)
                for k in args.shots
                for value in (
                    results["cost"][method][str(k)]["ms_per_iteration"],
                    results["cost"][method][str(k)]["peak_memory_mib"],
                )
            ),
        ]
        for method in args.methods
    ]
    return format_table(header, rows), format_table(cost_header, cost_rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--shots", type=int, nargs="+", default=[5, 10, 20], help="K values (default: 5 10 20)"
    )
    add_method_arguments(parser, reptile_alpha=REPTILE_ALPHA)
    parser.add_argument(
        "--iterations",
        type=int,
        default=6000,
        help="meta-iterations per model; 0 tests the initialization (default: 6000)",
    )
    parser.add_argument(
        "--meta-batch", type=int, default=25, help="tasks per meta-iteration (default: 25)"
    )
    parser.add_argument(
        "--train-query", type=int, default=0, help="query points per training task (default: K)"
    )
    parser.add_argument(
        "--eval-tasks", type=int, default=1000, help="held-out tasks (default: 1000)"
    )
    parser.add_argument(
        "--eval-points", type=int, default=100, help="query points per held-out task (default: 100)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the models, tasks and step sizes"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... or auto (default: cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; tiny nets thrash with more)",
    )
    parser.add_argument(
        "--log-every", type=int, default=100, help="iterations per learning-curve point"
    )
    add_cost_arguments(parser, timing_rounds=20, calls=10)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="700 iterations, 300 eval tasks: 70 s with one thread on 2 idle cores",
    )
    add_output_arguments(parser, "sinusoid", torchrun=True)
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.eval_tasks = 700, 300
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    claim_output(args, "sinusoid", ["sinusoid.json", "sinusoid.png"])
    torch.set_num_threads(args.threads)
    device = launch(device_of(args.device))
    seed_everything(args.seed)

    results: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    }
    results.update(environment=environment(), mse={}, train={}, step_sizes={}, cost={})
    results.update(world_size=world_size(), ranks_identical=True)
    learners = {}
    start = time.perf_counter()
    for k in args.shots:
        tasks = eval_tasks(args.eval_tasks, k, args.eval_points, args.seed)
        for method in args.methods:
            trained, log = train(method, k, args, device)
            results["ranks_identical"] &= log["ranks_identical"]
            if rank() != 0:
                continue  # evaluation, printing and files: rank 0 only
            losses = evaluate(trained.model, trained.opt, tasks, device, trained.steps)
            mean, ci = mean_ci95(losses)
            results["mse"].setdefault(method, {})[str(k)] = {"mean": mean, "ci95": ci}
            results["train"].setdefault(method, {})[str(k)] = log
            if method == "metasgd":
                results["step_sizes"][str(k)] = step_sizes_by_layer(trained.model, trained.opt)
            learners[(method, k)] = trained
            print(
                f"{LABELS[method]:8s} K={k:2d}: MSE {mean:.3f} ± {ci:.3f}  "
                f"({log['train_seconds']:.0f} s training)"
            )
        if rank() != 0:
            continue
        costs = method_costs(
            {m: learners[(m, k)] for m in args.methods},
            task_stream(k, args, device),
            device,
            rounds=args.timing_rounds,
            calls=args.timing_calls,
            probe=None if args.no_memory else peak_memory,
            probe_args=(k, args),
        )
        for method, c in costs.items():
            results["cost"].setdefault(method, {})[str(k)] = c
    results["wall_seconds"] = time.perf_counter() - start
    if rank() != 0:
        return results

    results["table"], results["cost_table"] = tables(results, args)
    print(
        f"\nSinusoid regression, MSE ± 95% CI over {args.eval_tasks} held-out tasks, "
        f"{args.iterations} meta-iterations x {args.meta_batch} tasks per model, "
        f"{results['wall_seconds']:.0f} s in all\n"
    )
    print(results["table"])
    print_cost_table(results["cost_table"], device)
    write_json(args.out / "sinusoid.json", results)
    if not args.no_plot:
        plot(results, learners, args.shots, args, args.out / "sinusoid.png")
    print(f"\nwrote {args.out}/sinusoid.json" + ("" if args.no_plot else " and sinusoid.png"))
    return results


if __name__ == "__main__":
    main()
