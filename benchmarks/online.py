"""Online step-size learning in an ordinary training loop, from every initial learning rate.

Two problems, one task each:

* ``digits``: scikit-learn's 8x8 digits (standardised; a fixed 75/25
  train/test split, 10% of train held out for look-ahead), a 64-128-10 ReLU MLP,
  cross-entropy plus an L2 penalty ``0.5 * 1e-3 * |W|^2`` on the weight
  matrices, batches of 32. The penalty gives the training objective a
  minimiser, so the final test loss measures how well a method optimises;
  ``digits-noreg`` (not run by default) drops it, and there the test loss
  mostly measures how far a method has overfit when the budget ends.
* ``lstsq``: a synthetic ill-conditioned least-squares problem (50 features,
  feature scales log-spaced over 1e-2..1, so the Hessian's eigenvalues span
  1e-4..1, condition number 1e4), noisy targets, half the squared error,
  batches of 32; ``lstsq-steep`` (not run by default) has 10x larger features,
  so SGD diverges above lr = 0.02 and the gradients are 10x larger.
* ``digits-wide`` (not run by default): ``digits`` with a 64-1024-1024-10 MLP
  (1.1M parameters), to measure the cost of a step on a larger model;
  ``digits-deep``: with 49 hidden layers of 64 (50 ``Linear(64, 64)``-sized
  layers, 100 parameter tensors, 0.2M parameters), the cost on many small tensors.

Methods, on the same step budget, seeds and batches:

* ``sgd``: ``torch.optim.SGD`` at each initial lr;
* ``adam``: ``torch.optim.Adam`` at its default lr (one run, shown on every row);
* ``sgd-hd``: the scalar SGD-HD of Baydin et al. (2018), written here:
  ``alpha <- alpha + beta * g_t . g_{t-1}`` (their additive rule);
* ``additive-hd-element``: the same additive rule with one step size per
  element (the alternative to MetaSGD's normalised multiplicative rule);
* ``metasgd-hd-element`` / ``metasgd-hd-tensor``: ``MetaSGD(hypergrad_lr=...)``;
* ``tuner``: ``MetaSGD(granularity="tensor", parametrization="log")`` with
  ``torch_metasgd.StepSizeTuner`` on the held-out split.

Reports the final train loss (the data loss on the full training set,
without the penalty), test loss and accuracy per initial lr; plots, per
problem, the final test loss of every method against the initial lr (the
table), the test-loss curves of the step-size learner (MetaSGD HD, element)
and of SGD from each initial lr, and its learned step sizes over time; and
measures the cost of a
training iteration and of ``step()`` for each optimizer, as ratios to
``torch.optim.SGD``'s foreach and fused steps measured in the same run.

    python benchmarks/online.py --quick                # 28 s: one thread, 2 idle cores
    python benchmarks/online.py --problems digits      # 3000 steps x 3 seeds
    python benchmarks/online.py --problems digits --lrs 1 --seeds 16   # one lr, more seeds
    python benchmarks/online.py --timing-only --problems digits-deep --momentum 0.9 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from itertools import pairwise
from pathlib import Path

import torch
from _common import (
    add_output_arguments,
    claim_output,
    device_of,
    environment,
    format_table,
    mark_no_data,
    plain_log_ticks,
    save_figure,
    script_parser,
)
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from torch_metasgd import MetaSGD, StepSizeTuner

LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
METHODS = (
    "sgd",
    "adam",
    "sgd-hd",
    "additive-hd-element",
    "metasgd-hd-element",
    "metasgd-hd-tensor",
    "tuner",
)
PROBLEMS = ("digits", "lstsq", "digits-noreg", "lstsq-steep", "digits-wide", "digits-deep")
HIDDEN = {"digits-wide": (1024, 1024), "digits-deep": (64,) * 49}
L2 = 1e-3  # digits: the weight matrices' L2 penalty
DIVERGED = 1e6  # a train loss above this (or not finite) ends the run as diverged


# --------------------------------------------------------------------------- problems


class Problem:
    """Data, a model factory and a loss; batches drawn from a seeded generator."""

    def __init__(self, name: str, batch_size: int = 32, device: str | torch.device = "cpu") -> None:
        self.name = name
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.l2 = L2 if name in ("digits", "digits-wide", "digits-deep") else 0.0
        self.hidden = HIDDEN.get(name, (128,))
        if name.startswith("digits"):
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            x, y = load_digits(return_X_y=True)
            x_train, x_test, y_train, y_test = train_test_split(
                x, y, test_size=0.25, random_state=0, stratify=y
            )
            mean, std = x_train.mean(0), x_train.std(0)
            std[std == 0] = 1.0  # pixels blank in every training image
            self.x_train = torch.tensor((x_train - mean) / std, dtype=torch.float32)
            self.x_test = torch.tensor((x_test - mean) / std, dtype=torch.float32)
            self.y_train = torch.tensor(y_train)
            self.y_test = torch.tensor(y_test)
            self.classification = True
        else:
            g = torch.Generator().manual_seed(1234)
            dim, n_train, n_test = 50, 1000, 1000
            # "lstsq-steep": the same problem with 10x larger features (100x the curvature).
            scales = (
                torch.logspace(-1, 1, dim) if name == "lstsq-steep" else torch.logspace(-2, 0, dim)
            )
            w_true = torch.randn(dim, 1, generator=g)

            def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
                x = torch.randn(n, dim, generator=g) * scales
                return x, x @ w_true + 0.5 * torch.randn(n, 1, generator=g)

            self.x_train, self.y_train = sample(n_train)
            self.x_test, self.y_test = sample(n_test)
            self.classification = False
        for key in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, key, getattr(self, key).to(self.device))
        # Look-ahead's held-out batches come from the last 10% of the training set.
        n_held = len(self.x_train) // 10
        self.held_out = (self.x_train[-n_held:], self.y_train[-n_held:])

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.classification:
            widths = (64, *self.hidden)
            layers = [m for a, b in pairwise(widths) for m in (nn.Linear(a, b), nn.ReLU())]
            return nn.Sequential(*layers, nn.Linear(widths[-1], 10)).to(self.device)
        return nn.Linear(self.x_train.shape[1], 1).to(self.device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The training objective: the data loss plus the L2 penalty, if any."""
        loss = self.data_loss(model, batch)
        if self.l2:
            loss = loss + 0.5 * self.l2 * sum(
                p.square().sum() for p in model.parameters() if p.dim() > 1
            )
        return loss

    def data_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = model(x)
        if self.classification:
            return F.cross_entropy(out, y)
        return 0.5 * (out - y).pow(2).mean()

    def batches(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        n = len(self.x_train)
        while True:
            for idx in torch.randperm(n, generator=g).to(self.device).split(self.batch_size):
                if len(idx) == self.batch_size:
                    yield self.x_train[idx], self.y_train[idx]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        train = self.data_loss(model, (self.x_train, self.y_train)).item()
        test = self.data_loss(model, (self.x_test, self.y_test)).item()
        acc = None
        if self.classification:
            acc = (model(self.x_test).argmax(1) == self.y_test).float().mean().item()
        return {"train_loss": train, "test_loss": test, "test_acc": acc}


# --------------------------------------------------------------------------- baselines


class AdditiveHD(torch.optim.Optimizer):
    """SGD-HD with Baydin et al.'s additive rule, scalar ("global") or per element.

    ``alpha <- alpha + beta * g_t * g_{t-1}`` (summed over every element for
    the scalar form), then ``theta <- theta - alpha * g_t``.
    """

    def __init__(self, params, lr: float, hypergrad_lr: float, granularity: str) -> None:
        super().__init__(params, dict(lr=lr))
        self.beta = hypergrad_lr
        self.granularity = granularity
        self.alpha = torch.tensor(lr)
        self.prev: list[torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if self.granularity == "global":
            if self.prev is not None:
                dot = sum((g * d).sum() for g, d in zip(grads, self.prev, strict=True))
                self.alpha = self.alpha + self.beta * dot
            for p, g in zip(params, grads, strict=True):
                p.sub_(self.alpha * g)
        else:
            if self.prev is None:
                self.alphas = [torch.full_like(p, self.param_groups[0]["lr"]) for p in params]
            else:
                for a, g, d in zip(self.alphas, grads, self.prev, strict=True):
                    a.addcmul_(g, d, value=self.beta)
            for p, a, g in zip(params, self.alphas, grads, strict=True):
                p.addcmul_(a, g, value=-1)
        self.prev = [g.clone() for g in grads]

    def step_sizes(self) -> list[float]:
        if self.granularity == "global":
            return [self.alpha.item()]
        return [_geomean(a) for a in self.alphas] if self.prev is not None else []


def _geomean(t: torch.Tensor) -> float:
    # Additive step sizes can turn negative: summarise by the median instead.
    if (t <= 0).any():
        return t.median().item()
    return t.log().mean().exp().item()


# --------------------------------------------------------------------------- runs


def run(problem: Problem, method: str, lr: float, seed: int, steps: int, args) -> dict:
    model = problem.model(seed)
    tuner = None
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    elif method == "adam":
        opt = torch.optim.Adam(model.parameters())
    elif method == "sgd-hd":
        opt = AdditiveHD(model.parameters(), lr, args.sgd_hd_beta, "global")
    elif method == "additive-hd-element":
        opt = AdditiveHD(model.parameters(), lr, args.sgd_hd_beta, "element")
    elif method.startswith("metasgd-hd"):
        granularity = method.rsplit("-", 1)[1]
        opt = MetaSGD(
            model.parameters(),
            lr=lr,
            granularity=granularity,
            parametrization="log",
            hypergrad_lr=args.hypergrad_lr,
        )
    else:
        opt = MetaSGD(model.parameters(), lr=lr, granularity="tensor", parametrization="log")
        held_out = problem.held_out
        tuner = StepSizeTuner(
            model,
            opt,
            problem.loss,
            held_out,
            every=args.la_every,
            unroll=args.la_unroll,
            meta_lr=args.la_meta_lr,
        )

    curve, test_curve, lr_curve = [], [], []
    diverged = False
    batches = problem.batches(seed)
    eval_every = max(1, steps // 50)
    for t in range(steps + 1):
        if t % eval_every == 0:
            metrics = problem.evaluate(model)
            curve.append((t, metrics["train_loss"]))
            test_curve.append((t, metrics["test_loss"]))
            lr_curve.append((t, _step_sizes(opt, method)))
            if not math.isfinite(metrics["train_loss"]) or metrics["train_loss"] > DIVERGED:
                diverged = True
                break
        if t == steps:
            break
        batch = next(batches)
        opt.zero_grad()
        problem.loss(model, batch).backward()
        opt.step()
        if tuner is not None:
            tuner.step(batch)
    final = problem.evaluate(model)
    if diverged:
        final = {"train_loss": math.inf, "test_loss": math.inf, "test_acc": None}
    return {
        **final,
        "diverged": diverged,
        "curve": curve,
        "test_curve": test_curve,
        "step_sizes": lr_curve,
    }


def _step_sizes(opt, method: str) -> list[float]:
    """The step sizes in use: per parameter tensor (geometric mean), or the scalar."""
    if method == "sgd" or method == "adam":
        return [opt.param_groups[0]["lr"]]
    if isinstance(opt, AdditiveHD):
        return opt.step_sizes()
    return [_geomean(opt.effective_lr(p).detach()) for p in opt.param_groups[0]["params"]]


# --------------------------------------------------------------------------- cost


def _metasgd(**options):
    return lambda ps, lr, momentum: MetaSGD(ps, lr=lr, momentum=momentum, **options)


def _hd(granularity: str, parametrization: str, **options):
    return _metasgd(
        hypergrad_lr=0.1, granularity=granularity, parametrization=parametrization, **options
    )


#: The optimizers whose cost is measured; the first two are the baselines of the ratios.
TIMED = {
    "SGD (foreach)": lambda ps, lr, momentum: torch.optim.SGD(
        ps, lr=lr, momentum=momentum, foreach=True
    ),
    "SGD (fused)": lambda ps, lr, momentum: torch.optim.SGD(
        ps, lr=lr, momentum=momentum, fused=True
    ),
    "SGD-HD (scalar, no momentum)": lambda ps, lr, momentum: AdditiveHD(ps, lr, 1e-3, "global"),
    "MetaSGD": _metasgd(foreach=True),
    "MetaSGD (fused)": _metasgd(fused=True),
    "MetaSGD HD, element": _hd("element", "identity", foreach=True),
    "MetaSGD HD, element, log": _hd("element", "log", foreach=True),
    "MetaSGD HD, element, log (fused)": _hd("element", "log", fused=True),
    "MetaSGD HD, tensor": _hd("tensor", "identity", foreach=True),
    "MetaSGD HD, tensor, log": _hd("tensor", "log", foreach=True),
}


def _synchronize(device: torch.device) -> None:
    # Kernels run asynchronously on a GPU: a clock read must wait for them.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(
    problem: Problem, rounds: int, momentum: float = 0.0, iters: int = 50
) -> dict[str, dict]:
    """Seconds per training iteration and per ``step()``, per optimizer: the fastest round's.

    One iteration is ``zero_grad``, forward, backward and ``step``, on the
    benchmark's model and batches, on ``problem.device``; the optimizers take
    turns, round by round. On a shared machine the fastest round is the one
    least disturbed by other work (the medians are kept too). Round 0 warms
    up (a fused step compiles there): its seconds are ``first_round_s``.
    """
    device = problem.device
    batches = problem.batches(0)
    fixed = [next(batches) for _ in range(iters)]
    models = {name: problem.model(0) for name in TIMED}
    opts = {name: make(models[name].parameters(), 0.01, momentum) for name, make in TIMED.items()}
    iteration: dict[str, list[float]] = {name: [] for name in TIMED}
    step: dict[str, list[float]] = {name: [] for name in TIMED}
    first_round: dict[str, float] = {}
    for r in range(rounds + 1):
        for name, opt in opts.items():
            model, in_step = models[name], 0.0
            _synchronize(device)
            start = time.perf_counter()
            for batch in fixed:
                opt.zero_grad()
                problem.loss(model, batch).backward()
                _synchronize(device)
                t = time.perf_counter()
                opt.step()
                _synchronize(device)
                in_step += time.perf_counter() - t
            elapsed = time.perf_counter() - start
            if r == 0:
                first_round[name] = elapsed
            else:
                iteration[name].append(elapsed / iters)
                step[name].append(in_step / iters)
    return {
        name: {
            "iteration_s": min(iteration[name]),
            "step_s": min(step[name]),
            "median_iteration_s": statistics.median(iteration[name]),
            "median_step_s": statistics.median(step[name]),
            "first_round_s": first_round[name],
        }
        for name in TIMED
    }


def format_timing(timing: dict[str, dict], problem: Problem, momentum: float) -> str:
    foreach, fused = timing["SGD (foreach)"], timing["SGD (fused)"]
    rows = [
        [
            name,
            f"{t['iteration_s'] * 1e6:.0f}",
            f"{t['iteration_s'] / foreach['iteration_s']:.2f}x",
            f"{t['step_s'] * 1e6:.0f}",
            f"{t['step_s'] / foreach['step_s']:.2f}x",
            f"{t['step_s'] / fused['step_s']:.2f}x",
        ]
        for name, t in timing.items()
    ]
    header = [
        "optimizer",
        "iteration (us)",
        "vs SGD foreach",
        "step() (us)",
        "vs SGD foreach",
        "vs SGD fused",
    ]
    tensors = sum(1 for _ in problem.model(0).parameters())
    text = (
        f"\n## {problem.name}: cost per training iteration ({tensors} parameter tensors, "
        f"{problem.device}, {torch.get_num_threads()} thread(s), momentum {momentum:g}, "
        "fastest round)\n"
    )
    text += format_table(header, rows)
    compiled = [
        f"{name} {t['first_round_s']:.1f} s" for name, t in timing.items() if "fused" in name
    ]
    text += "\nfirst round, compiling included: " + ", ".join(compiled) + "\n"
    print(text)
    return text


# --------------------------------------------------------------------------- report


def summarise(results: dict, problems: list[str], methods: list[str], lrs=LRS) -> dict:
    summary = {}
    for name in problems:
        rows = {}
        for method in methods:
            for lr in lrs if method != "adam" else (None,):
                runs = results[name][method][str(lr)]
                rows[(method, lr)] = {
                    key: _mean([r[key] for r in runs])
                    for key in ("train_loss", "test_loss", "test_acc")
                } | {
                    "worst_test_loss": max(r["test_loss"] for r in runs),
                    "diverged": sum(r["diverged"] for r in runs),
                }
        best_sgd = min(rows[("sgd", lr)]["test_loss"] for lr in lrs)
        summary[name] = {"rows": rows, "best_sgd_test_loss": best_sgd}
    return summary


def _mean(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    if any(not math.isfinite(v) for v in values):
        return math.inf
    return sum(values) / len(values)


def print_table(summary: dict, methods: list[str], lrs=LRS, seeds: int = 1) -> str:
    """Mean test loss and its ratio to the best-tuned SGD's (with the worst seed's, if several).

    Adam runs once, at its default lr: its row has one cell, under the first lr.
    """
    lines = []
    for name, s in summary.items():
        best = s["best_sgd_test_loss"]
        has_accuracy = any(row["test_acc"] is not None for row in s["rows"].values())
        lines.append(
            f"\n## {name}: final test loss (ratio to best-tuned SGD {best:.4f})"
            + (", test accuracy" if has_accuracy else "")
        )
        header = ["method", *(f"lr={lr:g}" for lr in lrs)]
        rows, train_rows = [], []
        for method in methods:
            keys = [None] if method == "adam" else lrs
            cells, train_cells = [], []
            for lr in keys:
                row = s["rows"][(method, lr)]
                train_cells.append(
                    f"{row['train_loss']:.4f}" if math.isfinite(row["train_loss"]) else "diverged"
                )
                loss = row["test_loss"]
                if not math.isfinite(loss):
                    cells.append("diverged")
                    continue
                cell = f"{loss:.4f} ({loss / best:.2f}x"
                if seeds > 1:
                    cell += f", worst {row['worst_test_loss'] / best:.2f}x"
                cell += ")"
                if row["test_acc"] is not None:
                    cell += f" {100 * row['test_acc']:.1f}%"
                cells.append(cell)
            blank = [""] * (len(lrs) - len(keys))
            rows.append([method, *cells, *blank])
            train_rows.append([method, *train_cells, *blank])
        lines.append(format_table(header, rows))
        lines.append(f"\n{name}: final train loss")
        lines.append(format_table(header, train_rows))
    text = "\n".join(lines)
    print(text)
    return text


NAMES = {
    "sgd": "SGD",
    "adam": "Adam (default lr)",
    "sgd-hd": "SGD-HD (scalar, additive)",
    "additive-hd-element": "additive HD, per element",
    "metasgd-hd-element": "MetaSGD HD, element",
    "metasgd-hd-tensor": "MetaSGD HD, tensor",
    "tuner": "StepSizeTuner (tensor, log)",
}
STYLES = {
    "sgd": ("black", "o"),
    "adam": ("tab:red", ""),
    "sgd-hd": ("tab:orange", "s"),
    "additive-hd-element": ("tab:brown", "v"),
    "metasgd-hd-element": ("tab:blue", "D"),
    "metasgd-hd-tensor": ("tab:cyan", "^"),
    "tuner": ("tab:purple", "P"),
}
# The step-size learner whose curves the figure shows, the first of these that ran.
FEATURED = ("metasgd-hd-element", "metasgd-hd-tensor", "tuner", "sgd-hd", "additive-hd-element")


def _finite_points(points) -> tuple[list[float], list[float]]:
    """``(t, value)`` pairs as two lists, non-finite values as NaN (a gap in the line)."""
    t = [p[0] for p in points]
    return t, [
        v if v is not None and math.isfinite(v) else math.nan for v in (p[1] for p in points)
    ]


def plot(results: dict, problems: list[str], path: Path, lrs=LRS) -> None:
    """Per problem, a row: final test loss against the initial lr for every method (the
    table), the test-loss curves from each initial lr, the learned step sizes over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    plt.rcParams.update({"font.size": 9})
    methods = [m for m in METHODS if m in results[problems[0]]]
    featured = next((m for m in FEATURED if m in methods), None)
    summary = summarise(results, problems, methods, lrs)
    fig, axes = plt.subplots(
        len(problems),
        3,
        figsize=(14, 1.8 + 3.2 * len(problems)),
        squeeze=False,
        layout="constrained",
    )
    colors = plt.cm.viridis([i / max(len(lrs) - 1, 1) for i in range(len(lrs))])
    for (final, curves, alphas), name in zip(axes, problems, strict=True):
        rows, seeds = summary[name]["rows"], len(results[name]["sgd"][str(lrs[0])])
        finite = [r["test_loss"] for r in rows.values() if math.isfinite(r["test_loss"])]
        if finite:
            final.set_ylim(min(finite) / 1.3, max(finite) * 1.6)  # room for "diverged" marks
        top = final.get_ylim()[1]
        for method in methods:
            color, marker = STYLES[method]
            if method == "adam":
                loss = rows[("adam", None)]["test_loss"]
                if math.isfinite(loss):
                    final.axhline(loss, color=color, ls=":", lw=1.5)
                continue
            losses = [rows[(method, lr)]["test_loss"] for lr in lrs]
            final.plot(
                lrs,
                [v if math.isfinite(v) else math.nan for v in losses],
                color=color,
                marker=marker,
                ms=5,
                lw=2.5 if method == "sgd" else 1.2,  # visible under a method that ends alike
            )
            gone = [lr for lr, v in zip(lrs, losses, strict=True) if not math.isfinite(v)]
            if gone and finite:
                final.plot(gone, [top] * len(gone), "x", color=color, ms=9, mew=2, clip_on=False)
        best = summary[name]["best_sgd_test_loss"]
        if math.isfinite(best):
            final.axhline(best, color="0.6", lw=0.8, zorder=0)
        final.set(
            xscale="log",
            xlabel="initial learning rate",
            ylabel="final test loss (log)",
            title=f"{name}: final test loss, "
            + ("seed 0" if seeds == 1 else f"mean of {seeds} seeds"),
        )
        final.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        final.minorticks_off()
        if finite:
            final.set_yscale("log")
            plain_log_ticks(final.yaxis)
        else:
            mark_no_data(final, "every run diverged: no finite test loss")

        key = "test_curve" if "test_curve" in results[name]["sgd"][str(lrs[0])][0] else "curve"
        drawn = False
        shown = [(m, style) for m, style in ((featured, "-"), ("sgd", "--")) if m is not None]
        for lr, color in zip(lrs, colors, strict=True):
            for method, style in shown:
                t, loss = _finite_points(results[name][method][str(lr)][0][key])
                curves.plot(t, loss, color=color, ls=style, lw=1.2)
                drawn |= any(map(math.isfinite, loss))
        if "adam" in results[name]:
            t, loss = _finite_points(results[name]["adam"]["None"][0][key])
            curves.plot(t, loss, color=STYLES["adam"][0], ls=":", lw=1.5)
        what = "test loss" if key == "test_curve" else "train loss (no test curve in this JSON)"
        curves.set(xlabel="step", ylabel=f"{what} (log)", title=f"{name}: {what}, seed 0")
        if drawn:
            curves.set_yscale("log")
            plain_log_ticks(curves.yaxis)
        else:
            mark_no_data(curves, "no finite loss: every run diverged at once (NaN)")
            curves.set(xticks=[], yticks=[])

        if featured is None:
            mark_no_data(alphas, "no step-size learner in --methods")
            alphas.set_axis_off()
            continue
        drawn = False
        for lr, color in zip(lrs, colors, strict=True):
            run0 = results[name][featured][str(lr)][0]
            t = [p[0] for p in run0["step_sizes"]]
            per_tensor = list(zip(*[p[1] for p in run0["step_sizes"]], strict=True))
            for i, series in enumerate(per_tensor):
                values = [v if math.isfinite(v) and v > 0 else math.nan for v in series]
                drawn |= any(math.isfinite(v) for v in values)
                alphas.plot(t, values, color=color, lw=1, ls="-" if i % 2 == 0 else "--")
        alphas.set(
            xlabel="step",
            ylabel="step size, geometric mean per tensor (log)",
            title=f"{name}: {NAMES[featured]}, step sizes, seed 0",
        )
        if drawn:
            alphas.set_yscale("log")
            plain_log_ticks(alphas.yaxis)
        else:
            mark_no_data(alphas, "no finite step size (NaN): the runs diverged")
            alphas.set(xticks=[], yticks=[])

    # Each column's legend under its bottom panel.
    handles = [
        Line2D(
            [],
            [],
            color=STYLES[m][0],
            marker=STYLES[m][1],
            ls=":" if m == "adam" else "-",
            label=NAMES[m],
        )
        for m in methods
    ]
    handles += [
        Line2D([], [], color="0.6", lw=0.8, label="best-tuned SGD"),
        Line2D([], [], color="0.3", marker="x", ls="", mew=2, label="diverged (drawn at the top)"),
    ]
    below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "ncols": 2}
    final.legend(handles=handles, **below)
    handles = [
        Line2D([], [], color=c, lw=2, label=f"initial lr {lr:g}")
        for lr, c in zip(lrs, colors, strict=True)
    ]
    if featured:
        handles.append(Line2D([], [], color="0.3", label=NAMES[featured]))
    handles.append(Line2D([], [], color="0.3", ls="--", label="SGD"))
    if "adam" in methods:
        handles.append(Line2D([], [], color=STYLES["adam"][0], ls=":", label=NAMES["adam"]))
    curves.legend(handles=handles, **below)
    if featured:
        handles = [
            Line2D([], [], color="0.3", label="weights"),
            Line2D([], [], color="0.3", ls="--", label="biases"),
        ]
        alphas.legend(handles=handles, title="colours: initial lr, as in the middle", **below)
    save_figure(fig, path, dpi=90)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="400 steps, 1 seed: 28 s with one thread on 2 idle cores",
    )
    parser.add_argument("--steps", type=int, default=3000, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument(
        "--lrs", nargs="+", type=float, default=list(LRS), help="initial learning rates"
    )
    parser.add_argument(
        "--problems", nargs="+", default=["digits", "lstsq"], choices=PROBLEMS, help="problems"
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run"
    )
    parser.add_argument(
        "--hypergrad-lr",
        type=float,
        default=0.1,
        help="MetaSGD's hypergrad_lr (both granularities)",
    )
    parser.add_argument(
        "--sgd-hd-beta",
        type=float,
        default=1e-3,
        help="beta of the additive SGD-HD baselines (Baydin et al.'s value)",
    )
    parser.add_argument("--la-every", type=int, default=10, help="look-ahead: update every N steps")
    parser.add_argument("--la-unroll", type=int, default=5, help="look-ahead: unrolled steps k")
    parser.add_argument(
        "--la-meta-lr", type=float, default=0.1, help="look-ahead: Adam lr on log step sizes"
    )
    parser.add_argument(
        "--timing-rounds",
        type=int,
        default=5,
        help="rounds of the per-iteration cost measurement (0 skips it)",
    )
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="only measure the cost per iteration (on a quiet machine)",
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=0.0,
        help="momentum of every optimizer in the cost measurement (SGD-HD has none)",
    )
    parser.add_argument(
        "--device", default="cpu", help="where to train and measure: cpu, cuda or auto"
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only redraw online.png from the online.json already in --out",
    )
    add_output_arguments(parser, "online")
    args = parser.parse_args(argv)
    if "sgd" not in args.methods:
        parser.error("--methods must include sgd (the baseline of the ratios)")
    args.methods = [m for m in METHODS if m in args.methods]
    if args.quick:
        args.steps, args.seeds = 400, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # --replot replaces online.png by design; --timing-only writes timing.json alone.
    files = (
        []
        if args.replot
        else ["timing.json"]
        if args.timing_only
        else ["online.json", "online.png"]
    )
    claim_output(args, "online", files)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.replot:
        saved = json.loads((args.out / "online.json").read_text())
        lrs = saved["args"].get("lrs", list(LRS))
        plot(saved["runs"], list(saved["runs"]), args.out / "online.png", lrs)
        print(f"wrote {args.out / 'online.png'}")
        return saved
    device = device_of(args.device)
    problems = {name: Problem(name, device=device) for name in args.problems}
    if args.timing_only:
        timing = {
            name: time_iterations(problems[name], max(args.timing_rounds, 1), args.momentum)
            for name in problems
        }
        text = "".join(
            format_timing(t, problems[name], args.momentum) for name, t in timing.items()
        )
        (args.out / "timing.json").write_text(
            json.dumps({"timing": timing, "table": text, "environment": environment()}, indent=1)
        )
        print(f"wrote {args.out / 'timing.json'}")
        return {"timing": timing}
    jobs = [
        (name, method, lr, seed)
        for name in args.problems
        for method in args.methods
        for lr in (args.lrs if method != "adam" else (None,))
        for seed in range(args.seeds)
    ]
    results: dict = {name: {m: {} for m in args.methods} for name in args.problems}
    start = time.perf_counter()
    for name, method, lr, seed in tqdm(jobs, desc="runs"):
        out = run(problems[name], method, lr, seed, args.steps, args)
        results[name][method].setdefault(str(lr), []).append(out)
    elapsed = time.perf_counter() - start

    summary = summarise(results, args.problems, args.methods, args.lrs)
    table = print_table(summary, args.methods, args.lrs, args.seeds)
    print(f"\n{len(jobs)} runs of {args.steps} steps in {elapsed:.0f} s")
    timing = {}
    for name in args.problems if args.timing_rounds > 0 else []:
        timing[name] = time_iterations(problems[name], args.timing_rounds, args.momentum)
        table += format_timing(timing[name], problems[name], args.momentum)
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": {
            name: {
                "best_sgd_test_loss": s["best_sgd_test_loss"],
                "rows": [{"method": m, "lr": lr, **row} for (m, lr), row in s["rows"].items()],
            }
            for name, s in summary.items()
        },
        "runs": results,
        "table": table,
        "timing": timing,
        "environment": environment(),
        "seconds": elapsed,
    }
    (args.out / "online.json").write_text(json.dumps(payload, indent=1))
    plot(results, args.problems, args.out / "online.png", args.lrs)
    print(f"wrote {args.out / 'online.json'} and {args.out / 'online.png'}")
    return payload


if __name__ == "__main__":
    main()
