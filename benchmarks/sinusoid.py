"""Few-shot sinusoid regression (Meta-SGD paper, Section 4.1, Table 1): MAML vs Meta-SGD.

Tasks: ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``. The learner is a 1-40-40-1 ReLU
MLP; the inner loop is ONE step on the mean squared error of a K-shot support
set. One model per K and per method, on the same budget, seeds and tasks:

* ``maml``: learned initialization, fixed scalar step ``alpha = 0.01`` (MAML's
  value): ``MetaSGD(lr=0.01, granularity="group")`` whose step size is not
  given to the outer optimizer, so it stays 1 and the update is plain SGD;
* ``metasgd``: learned initialization and learned elementwise step sizes:
  ``MetaSGD(lr=1.0)`` (identity parametrization, so ``alpha = s``), ``alpha``
  drawn from ``U[0.005, 0.1]`` as in the paper.

Meta-training: Adam (lr 1e-3) on :func:`torch_metasgd.meta_loss`, meta-batches
of ``--meta-batch`` tasks, each with K support points and ``--train-query``
query points (default K, as MAML's reference code). Evaluation: ``--eval-tasks``
held-out tasks (the same for every method and K), each adapted with one step on
K support points and scored by the MSE on 100 points drawn uniformly from
[-5, 5]; the table gives the mean MSE and its 95% confidence interval.

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
    REPO,
    device_of,
    environment,
    format_table,
    inner_optimizer,
    launch,
    mean_ci95,
    meta_train,
    outer_parameters,
    rank,
    seed_everything,
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


def make_learner(
    method: str, seed: int, device: torch.device
) -> tuple[nn.Module, MetaSGD, torch.optim.Adam]:
    """The model, its inner-loop MetaSGD and the outer Adam, from the same init for every method."""
    torch.manual_seed(seed)
    model = make_model().to(device)
    opt = inner_optimizer(method, model, MAML_ALPHA, seed)
    return model, opt, torch.optim.Adam(outer_parameters(method, model, opt), lr=1e-3)


def train(
    method: str,
    k: int,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[nn.Module, MetaSGD, dict]:
    model, opt, outer = make_learner(method, args.seed, device)
    # Same task stream for both methods at a given K.
    gen = torch.Generator().manual_seed(args.seed * 1000 + k)
    n_query = args.train_query or k

    def sample() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        xs, ys, amp_phase = sample_tasks(args.meta_batch, k, gen)
        xq, yq, _ = sample_tasks(args.meta_batch, n_query, gen, amp_phase=amp_phase)
        return (xs.to(device), ys.to(device)), (xq.to(device), yq.to(device))

    log = meta_train(
        model,
        opt,
        outer,
        sample,
        F.mse_loss,
        iterations=args.iterations,
        steps=1,
        log_every=args.log_every,
        desc=f"{LABELS[method]:8s} K={k:2d}",
    )
    return model, opt, log


def evaluate(
    model: nn.Module, opt: MetaSGD, tasks: dict[str, Tensor], device: torch.device
) -> Tensor:
    """Per-task query MSE after one inner step on each task's support set."""
    losses = []
    for t in range(tasks["xs"].shape[0]):
        # first_order only drops the graph: the adapted values are the same.
        fast = adapt(
            model,
            opt,
            F.mse_loss,
            tasks["xs"][t].to(device),
            tasks["ys"][t].to(device),
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


def plot(
    results: dict, learners: dict, ks: list[int], args: argparse.Namespace, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 10 if 10 in ks else ks[0]
    tasks = eval_tasks(3, k, 1, args.seed)
    grid = torch.linspace(*X_RANGE, 200).view(1, -1, 1)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    colors = {"maml": "tab:orange", "metasgd": "tab:blue"}
    for t, ax in enumerate(axes[:3]):
        truth = target(grid, tasks["amp_phase"][t : t + 1])[0, :, 0]
        ax.plot(grid[0, :, 0], truth, "k-", lw=1.5, label="ground truth")
        for method in METHODS:
            model, opt = learners[(method, k)]
            dev = next(model.parameters()).device
            fast = adapt(
                model,
                opt,
                F.mse_loss,
                tasks["xs"][t].to(dev),
                tasks["ys"][t].to(dev),
                first_order=True,
            )
            with torch.no_grad():
                pred = functional_call(model, fast, (grid[0].to(dev),)).cpu()
            ax.plot(
                grid[0, :, 0],
                pred[:, 0],
                color=colors[method],
                lw=1.2,
                label=f"{LABELS[method]}, 1 step",
            )
        ax.scatter(
            tasks["xs"][t, :, 0],
            tasks["ys"][t, :, 0],
            c="k",
            marker="^",
            s=25,
            zorder=5,
            label=f"{k} shots",
        )
        ax.set_title(
            f"task {t + 1}: A={tasks['amp_phase'][t, 0]:.2f}, phase={tasks['amp_phase'][t, 1]:.2f}"
        )
        ax.set_xlabel("x")
    axes[0].legend(fontsize=7, loc="lower left")
    ax = axes[3]
    alphas = results["step_sizes"][str(k)]
    names = list(alphas)
    ax.boxplot([alphas[n] for n in names], showfliers=False)
    ax.axhline(MAML_ALPHA, color=colors["maml"], ls="--", lw=1, label=f"MAML alpha={MAML_ALPHA}")
    ax.set_xticks(
        range(1, len(names) + 1),
        [n.replace(".weight", ".w").replace(".bias", ".b") for n in names],
        fontsize=7,
    )
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(f"Meta-SGD learned step sizes (K={k})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shots", type=int, nargs="+", default=[5, 10, 20], help="K values (default: 5 10 20)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--iterations", type=int, default=6000, help="meta-iterations per model (default: 6000)"
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
    parser.add_argument("--seed", type=int, default=0)
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
    parser.add_argument(
        "--quick", action="store_true", help="about a minute: 700 iterations, 300 eval tasks"
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "sinusoid")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.eval_tasks = 700, 300
    torch.set_num_threads(args.threads)
    device = launch(device_of(args.device))
    seed_everything(args.seed)

    results: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    }
    results.update(environment=environment(), mse={}, train={}, step_sizes={})
    results.update(world_size=world_size(), ranks_identical=True)
    learners = {}
    start = time.perf_counter()
    for k in args.shots:
        tasks = eval_tasks(args.eval_tasks, k, args.eval_points, args.seed)
        for method in args.methods:
            model, opt, log = train(method, k, args, device)
            results["ranks_identical"] &= log["ranks_identical"]
            if rank() != 0:
                continue  # evaluation, printing and files: rank 0 only
            losses = evaluate(model, opt, tasks, device)
            mean, ci = mean_ci95(losses)
            results["mse"].setdefault(method, {})[str(k)] = {"mean": mean, "ci95": ci}
            results["train"].setdefault(method, {})[str(k)] = log
            if method == "metasgd":
                results["step_sizes"][str(k)] = step_sizes_by_layer(model, opt)
            learners[(method, k)] = (model, opt)
            print(
                f"{LABELS[method]:8s} K={k:2d}: MSE {mean:.3f} ± {ci:.3f}  "
                f"({log['train_seconds']:.0f} s training)"
            )
    results["wall_seconds"] = time.perf_counter() - start
    if rank() != 0:
        return results

    header = ["Method", *(f"{k}-shot" for k in args.shots)]
    rows = []
    for method in args.methods:
        paper = [
            f"{PAPER[method][k][0]:.2f} ± {PAPER[method][k][1]:.2f}" if k in PAPER[method] else "-"
            for k in args.shots
        ]
        mine = results["mse"][method]
        ours = [f"{mine[str(k)]['mean']:.2f} ± {mine[str(k)]['ci95']:.2f}" for k in args.shots]
        rows += [[f"{LABELS[method]} (paper)", *paper], [f"{LABELS[method]} (this run)", *ours]]
    table = format_table(header, rows)
    results["table"] = table
    print(
        f"\nSinusoid regression, MSE ± 95% CI over {args.eval_tasks} held-out tasks, 1 inner step, "
        f"{args.iterations} meta-iterations x {args.meta_batch} tasks per model, "
        f"{results['wall_seconds']:.0f} s in all\n"
    )
    print(table)
    write_json(args.out / "sinusoid.json", results)
    if not args.no_plot and set(args.methods) == set(METHODS):
        plot(results, learners, args.shots, args, args.out / "sinusoid.png")
    print(f"\nwrote {args.out}/sinusoid.json" + ("" if args.no_plot else " and sinusoid.png"))
    return results


if __name__ == "__main__":
    main()
