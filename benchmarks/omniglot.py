"""Few-shot Omniglot classification (Meta-SGD paper, Section 4.2, Table 2): four meta-learners.

Data (``--data``, see ``_omniglot_data.py``; ``--download`` fetches them):
the official Omniglot archives. Meta-training draws its classes from one or
more sets (``--train-set``), testing from another (``--test-set``); by default

* ``images_background`` -> ``images_evaluation`` (the full split) when both
  are there, else
* ``images_background_small1`` -> ``images_background_small2`` (the official
  minimal sets).

A test character that a training set also holds is dropped from the test set
(the minimal sets share Greek and Latin, 50 characters with identical
images), so no test character is seen in training. Images are 28x28 and every
character's four rotations by multiples of 90 degrees are distinct classes,
as in MAML and Meta-SGD.

Model: four blocks of 3x3 conv (64 channels), batch norm (batch statistics,
as in MAML), ReLU and 2x2 max pooling, then a linear N-way classifier. Inner
loop: ``--steps`` step(s) of cross-entropy on the N*K support images
(``--test-steps`` at test time).

* ``maml``: fixed scalar step ``--maml-alpha`` (MAML's 0.4 for 5-way, 0.1
  for 20-way): ``MetaSGD(lr=alpha, granularity="group")`` whose step size
  the outer optimizer does not learn;
* ``metasgd``: elementwise step sizes, ``MetaSGD(lr=1.0)`` with ``alpha``
  drawn from ``U[0.005, 0.1]`` and learned with the initialization;
* ``fomaml``: MAML without second derivatives (``first_order=True``);
* ``reptile``: :func:`torch_metasgd.reptile_loss`, ``--reptile-steps`` (5, the
  paper's) inner SGD steps of MAML's size (``--reptile-alpha``) on the support
  images, in training and testing; the query images give the loss logged.
  (The paper's inner optimizer is Adam; of the SGD steps 0.05, 0.1 and 0.4,
  0.4 did best on training-set episodes at 5-way 1-shot.)

Meta-training: Adam on :func:`torch_metasgd.meta_loss` (Reptile: on
:func:`torch_metasgd.reptile_loss`), its learning rate
``--meta-lr`` annealed to 0 by a cosine (``--meta-lr-schedule``), with
meta-batches of ``--meta-batch`` episodes and ``--query`` query images per
class, drawn on the training device; ``--augment`` warps the training images
at random (small affine warps; the rotations stay classes). ``--val-fraction``
of the training characters (or the alphabets ``--val-alphabets``) are held
out: every ``--val-every`` iterations the model is tested on fixed validation
episodes and the best one is kept. (A prior pulling the step sizes towards
their tensor's mean and a first-order warm-up were tried and cost accuracy:
see the ablation in docs/results.md.)

Testing: ``--eval-episodes`` episodes (the same for every method), each with
``--eval-query`` query images per class, with classes drawn from the whole
test set ("mixed", the paper's protocol) and from one alphabet at a time
("within-alphabet", Lake et al.'s harder one); mean accuracy, its 95%
confidence interval, and the accuracy per alphabet. Cost per method: the
median time of a meta-iteration (the methods interleaved) and the peak memory
of three meta-iterations (CPU: peak RSS growth in a fresh process; CUDA:
``torch.cuda.max_memory_allocated``).

Under torchrun every meta-batch's episodes are split over the processes (DDP,
gloo on CPU, NCCL on CUDA): the same training as one process, up to float
rounding. Every rank validates (on the same episodes, so they keep the same
checkpoint); rank 0 tests, prints and writes; the JSON records ``world_size``
and ``ranks_identical``.

    python benchmarks/omniglot.py --download --quick
    torchrun --standalone --nproc_per_node=2 benchmarks/omniglot.py --quick
    python benchmarks/omniglot.py --ways 5 --shots 1 --iterations 800 --save results/o.pt
    python benchmarks/omniglot.py --load results/o.pt --eval-only --test-steps 3
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _common import (
    LABELS,
    METHODS,
    REPO,
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
    inner_optimizer,
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
from _omniglot_data import (
    SHA256,
    SPLITS,
    DownloadError,
    Episodes,
    Split,
    augment,
    download,
    load_split,
)
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from torch_metasgd import MetaSGD, adapt

# Meta-SGD arXiv:1707.09835, Table 2: accuracy (%) ± 95% CI.
PAPER = {
    "maml": {(5, 1): (98.7, 0.4), (5, 5): (99.9, 0.1), (20, 1): (95.8, 0.3), (20, 5): (98.9, 0.2)},
    "metasgd": {
        (5, 1): (99.53, 0.26),
        (5, 5): (99.93, 0.09),
        (20, 1): (95.93, 0.38),
        (20, 5): (98.97, 0.19),
    },
}
DEFAULT_DATA = REPO / "data" / "omniglot"
PROTOCOLS = ("mixed", "within-alphabet")


# --------------------------------------------------------------------------- data


def split_from_args(args: argparse.Namespace, device: torch.device | str) -> Split:
    return load_split(
        args.data,
        args.cache,
        args.train_set,
        args.test_set,
        val_fraction=args.val_fraction,
        val_alphabets=args.val_alphabets,
        seed=args.seed,
        rotations=not args.no_rotations,
        device=device,
    )


# --------------------------------------------------------------------------- model


def make_model(ways: int, hidden: int = 64) -> nn.Sequential:
    def block(c_in: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    # 28 -> 14 -> 7 -> 3 -> 1
    return nn.Sequential(
        *block(1),
        *block(hidden),
        *block(hidden),
        *block(hidden),
        nn.Flatten(),
        nn.Linear(hidden, ways),
    )


def make_learner(
    method: str, ways: int, maml_alpha: float, seed: int, device: torch.device
) -> tuple[nn.Sequential, MetaSGD]:
    """The model on ``device`` and its inner-loop MetaSGD, from the same init for every method."""
    torch.manual_seed(seed)
    # On its device before the optimizer: its step sizes are created beside the parameters.
    model = make_model(ways).to(device)
    return model, inner_optimizer(method, model, maml_alpha, seed)


# --------------------------------------------------------------------------- testing


def fixed_episodes(
    episodes: Episodes, n: int, ways: int, shots: int, query: int, seed: int, protocol: str
) -> tuple[Tensor, Tensor]:
    """Indices of ``n`` episodes drawn on the CPU from ``seed``: the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    classes, drawings = episodes.draw(n, ways, shots, query, gen, protocol == "within-alphabet")
    device = episodes.images.device
    return classes.to(device), drawings.to(device)


def query_correct(
    model: nn.Module,
    opt: MetaSGD,
    episodes: Episodes,
    draws: tuple[Tensor, Tensor],
    shots: int,
    steps: int,
) -> Tensor:
    """``(episodes, N*Q)`` bool on the device: the query images the adapted model gets right."""
    classes, drawings = draws
    correct = []
    for t in range(classes.shape[0]):
        (xs, ys), (xq, yq) = episodes.episodes(classes[t : t + 1], drawings[t : t + 1], shots)
        # first_order only drops the graph: the adapted values are the same.
        fast = adapt(model, opt, F.cross_entropy, xs[0], ys[0], steps=steps, first_order=True)
        with torch.no_grad():
            correct.append(functional_call(model, fast, (xq[0],)).argmax(1) == yq[0])
    return torch.stack(correct)


def accuracy(correct: Tensor) -> tuple[float, float]:
    """Mean episode accuracy (%) and its 95% confidence interval."""
    return mean_ci95(100.0 * correct.float().mean(1).cpu())


def per_alphabet(correct: Tensor, episodes: Episodes, classes: Tensor) -> dict[str, dict]:
    """Accuracy (%) on each alphabet's query images, as a mean over the episodes it is in."""
    query = correct.shape[1] // classes.shape[1]
    ids = episodes.alphabet[classes].repeat_interleave(query, dim=1).cpu()
    correct = correct.cpu().float()
    out = {}
    for a, name in enumerate(episodes.alphabets):
        mine = ids == a
        present = mine.any(1)
        if present.any():
            acc = 100.0 * (correct * mine).sum(1)[present] / mine.sum(1)[present]
            mean, ci = mean_ci95(acc)
            out[name] = {"accuracy": mean, "ci95": ci, "episodes": int(present.sum())}
    return out


class Validation:
    """Accuracy on fixed validation episodes after some iterations; keeps the best state."""

    def __init__(
        self, model: nn.Module, opt: MetaSGD, episodes: Episodes, draws, shots: int, steps: int
    ):
        self.model, self.opt, self.episodes, self.draws = model, opt, episodes, draws
        self.shots, self.steps = shots, steps
        self.curve: list[tuple[int, float, float]] = []
        self.best, self.best_iteration, self.seconds = -1.0, 0, 0.0
        self._state: tuple[dict, dict] | None = None

    def __call__(self, iteration: int) -> None:
        start = time.perf_counter()
        acc, ci = accuracy(
            query_correct(self.model, self.opt, self.episodes, self.draws, self.shots, self.steps)
        )
        self.curve.append((iteration, acc, ci))
        if acc > self.best:
            self.best, self.best_iteration = acc, iteration
            self._state = copy.deepcopy((self.model.state_dict(), self.opt.state_dict()))
        self.seconds += time.perf_counter() - start

    def restore_best(self) -> None:
        """Load the best state into the live model and step sizes."""
        model_state, opt_state = self._state
        self.model.load_state_dict(model_state)
        self.opt.load_state_dict(opt_state)

    def log(self) -> dict:
        return {
            "val_curve": self.curve,
            "best_iteration": self.best_iteration,
            "best_val_accuracy": self.best,
            "val_seconds": self.seconds,
        }


# --------------------------------------------------------------------------- training


def train(
    method: str, ways: int, shots: int, split: Split, args: argparse.Namespace, device
) -> tuple[Learner, dict]:
    trained = learner(method, ways, args, device)
    if trained.schedule is None and args.meta_lr_schedule == "cosine":
        trained.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            trained.outer, max(args.iterations, 1)
        )
    validation = None
    if split.validation is not None:
        draws = fixed_episodes(
            split.validation, args.val_episodes, ways, shots, args.eval_query, args.seed, "mixed"
        )
        validation = Validation(
            trained.model, trained.opt, split.validation, draws, shots, eval_steps(args, trained)
        )

    def after_step(it: int) -> None:
        if validation is not None and (it % args.val_every == 0 or it == args.iterations):
            validation(it)

    log = train_learner(
        trained,
        episode_stream(ways, shots, split, args, device),
        F.cross_entropy,
        iterations=args.iterations,
        log_every=args.log_every,
        desc=f"{LABELS[method]:8s} {ways}w{shots}s",
        after_step=after_step,
    )
    if validation is not None and validation.curve:
        validation.restore_best()
        log |= validation.log()
        # Meta-training time alone; the validations' is val_seconds.
        log["train_seconds"] -= validation.seconds
    return trained, log


def learner(method: str, ways: int, args: argparse.Namespace, device: torch.device) -> Learner:
    """The model on ``device`` and its optimizers, from the same initialization for every method."""
    torch.manual_seed(args.seed)
    # On its device before the optimizer: its step sizes are created beside the parameters.
    return build_learner(
        method,
        make_model(ways).to(device),
        args,
        loss_fn=F.cross_entropy,
        maml_alpha=maml_alpha(args, ways),
        steps=args.steps,
        meta_lr=args.meta_lr,
        seed=args.seed,
    )


def episode_stream(ways: int, shots: int, split: Split, args: argparse.Namespace, device):
    """``sample()``: meta-batches of the episode stream every method trains on at (N, K)."""
    gen = torch.Generator(device).manual_seed(args.seed * 1000 + ways * 10 + shots)

    def sample():
        draws = split.train.draw(
            args.meta_batch, ways, shots, args.query, gen, args.within_alphabet
        )
        support, query = split.train.episodes(*draws, shots)
        if args.augment:
            support, query = (
                (augment(support[0], gen), support[1]),
                (augment(query[0], gen), query[1]),
            )
        return support, query

    return sample


def peak_memory(method: str, ways: int, shots: int, args: argparse.Namespace) -> float:
    """Peak extra memory (MiB) of three meta-iterations of a fresh learner (CPU: run it fresh)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args.device)
    split = split_from_args(args, device)
    trained = learner(method, ways, args, device)
    sample = episode_stream(ways, shots, split, args, device)
    return peak_memory_mib(lambda: [trained.step(*sample()) for _ in range(3)], device)


def evaluate(
    model: nn.Module,
    opt: MetaSGD,
    split: Split,
    ways: int,
    shots: int,
    args: argparse.Namespace,
    steps: int,
) -> dict:
    """Accuracy on the test set under each protocol, and per alphabet, adapting ``steps`` steps."""
    out = {}
    for i, protocol in enumerate(PROTOCOLS):
        seed = 10_000_019 + args.seed * 1000 + ways * 10 + shots + i
        draws = fixed_episodes(
            split.test, args.eval_episodes, ways, shots, args.eval_query, seed, protocol
        )
        correct = query_correct(model, opt, split.test, draws, shots, steps)
        mean, ci = accuracy(correct)
        out[protocol] = {
            "accuracy": mean,
            "ci95": ci,
            "per_alphabet": per_alphabet(correct, split.test, draws[0]),
        }
    return out


def maml_alpha(args: argparse.Namespace, ways: int) -> float:
    if args.maml_alpha is not None:
        return args.maml_alpha
    return 0.4 if ways <= 5 else 0.1


def eval_steps(args: argparse.Namespace, trained: Learner) -> int:
    """Inner steps in validation and testing: ``--test-steps``, else the method's own."""
    return args.test_steps or trained.steps


# --------------------------------------------------------------------------- files


def save_path(base: Path, method: str, ways: int, shots: int, several: bool) -> Path:
    """``--save PATH`` as given for a single run, else one file per run beside it."""
    if not several:
        return base
    return base.with_name(f"{base.stem}_{ways}w{shots}s_{method}{base.suffix}")


def plain_config(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def save_checkpoint(path: Path, model: nn.Module, opt: MetaSGD, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "metasgd": opt.state_dict(), "config": config}, path)


def load_checkpoint(path: Path, device: torch.device) -> tuple[nn.Module, MetaSGD, dict]:
    blob = torch.load(path, map_location=device, weights_only=True)
    config = blob["config"]
    model, opt = make_learner(config["method"], config["ways"], config["alpha"], 0, device)
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["metasgd"])
    return model, opt, config


def plot(results: dict, path: Path) -> None:
    """Meta-training loss, validation accuracy (a star at the checkpoint kept), Meta-SGD's
    mean step size per tensor; one colour per run, explained in one legend below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    plt.rcParams.update({"font.size": 9})
    runs = [run for run in results["runs"] if run["curve"]]  # --iterations 0: no curves
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), layout="constrained")
    handles = []
    for i, run in enumerate(runs):
        color = f"C{i}"
        label = f"{LABELS[run['method']]} {run['ways']}-way {run['shots']}-shot"
        it, loss = zip(*run["curve"], strict=True)
        if not any(math.isfinite(v) for v in loss):
            label += " (NaN: diverged)"
        axes[0].plot(it, loss, color=color)
        handles.append(Line2D([], [], color=color, label=label))
        if run.get("val_curve"):
            it, acc, _ = zip(*run["val_curve"], strict=True)
            axes[1].plot(it, acc, "o-", ms=3, color=color)
            axes[1].plot(
                run["best_iteration"],
                run["best_val_accuracy"],
                "*",
                ms=13,
                color=color,
                mec="black",
                mew=0.6,
                zorder=5,
            )
        if run["method"] == "metasgd":
            names = list(run["step_sizes"])
            means = [run["step_sizes"][n]["mean"] for n in names]
            axes[2].plot(range(len(names)), means, "o-", color=color)
            labels = parameter_labels(make_model(run["ways"]))
            axes[2].set_xticks(
                range(len(names)), [labels.get(n, n) for n in names], rotation=60, ha="right"
            )
    axes[0].set(
        xlabel="meta-iteration",
        ylabel="query loss after the inner loop (log)",
        title="meta-training loss",
    )
    if any(math.isfinite(v) for run in runs for _, v in run["curve"]):
        axes[0].set_yscale("log")
        plain_log_ticks(axes[0].yaxis)
    else:
        mark_no_data(axes[0], "no finite meta-training loss (NaN): training diverged")
    axes[1].set(
        xlabel="meta-iteration",
        ylabel="validation accuracy (%)",
        title="validation accuracy (held-out characters)",
    )
    if not any(run.get("val_curve") for run in runs):
        mark_no_data(axes[1], "no validation: --val-fraction 0")
    elif not any(math.isfinite(a) for run in runs for _, a, _ in run.get("val_curve", [])):
        mark_no_data(axes[1], "no finite validation accuracy (NaN)")
    axes[2].set(
        xlabel="parameter tensor",
        ylabel="mean |step size| in the tensor",
        title="Meta-SGD's learned step sizes",
    )
    metasgd = [run for run in runs if run["method"] == "metasgd"]
    if not metasgd:
        mark_no_data(axes[2], "no Meta-SGD run: see --methods")
        axes[2].set(xticks=[], yticks=[])
    elif not any(math.isfinite(t["mean"]) for run in metasgd for t in run["step_sizes"].values()):
        mark_no_data(axes[2], "Meta-SGD's step sizes are NaN: its training diverged")
    if any(run.get("val_curve") for run in runs):
        handles.append(
            Line2D(
                [],
                [],
                color="0.5",
                marker="*",
                ms=12,
                mec="black",
                mew=0.6,
                ls="",
                label="the checkpoint kept (best validation accuracy), tested",
            )
        )
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4))
    save_figure(fig, path, dpi=100)


def step_size_summary(model: nn.Module, opt: MetaSGD) -> dict[str, dict[str, float]]:
    with torch.no_grad():
        out = {}
        for name, p in model.named_parameters():
            a = opt.effective_lr(p).flatten().float()
            out[name] = {
                "mean": float(a.abs().mean()),
                "min": float(a.min()),
                "max": float(a.max()),
            }
        return out


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--data", type=Path, default=DEFAULT_DATA, help="folder of the Omniglot zips (or folders)")
    add(
        "--download",
        action="store_true",
        help=f"first fetch the missing official archives into --data ({', '.join(SHA256)}, "
        "SHA-256 checked; base URL from $OMNIGLOT_URL if set)",
    )
    add(
        "--train-set",
        nargs="+",
        help=f"set(s) to meta-train on (default: {SPLITS[0][0]} if present, else {SPLITS[1][0]})",
    )
    add(
        "--test-set",
        help=f"set to test on (default: {SPLITS[0][1]} if present, else {SPLITS[1][1]})",
    )
    add(
        "--cache",
        type=Path,
        default=REPO / "results" / "omniglot_cache",
        help="where decoded images are cached",
    )
    add("--ways", type=int, nargs="+", default=[5, 20], help="N")
    add("--shots", type=int, nargs="+", default=[1, 5], help="K")
    add_method_arguments(parser, reptile_alpha=None)
    add("--iterations", type=int, default=2000, help="meta-iterations per model; 0 tests the init")
    add("--meta-batch", type=int, default=4, help="episodes per meta-iteration")
    add("--query", type=int, default=1, help="query images per class in training")
    add("--steps", type=int, default=1, help="inner steps in training")
    add("--test-steps", type=int, help="inner steps in validation and testing (default: --steps)")
    add("--meta-lr", type=float, default=1e-3, help="Adam's learning rate")
    add(
        "--meta-lr-schedule",
        choices=("constant", "cosine"),
        default="cosine",
        help="cosine: anneal the meta learning rate to 0 over --iterations",
    )
    add(
        "--augment",
        action="store_true",
        help="random affine warps of training images (shift <= 2 px, rotation <= 10 degrees, "
        "scale 0.9-1.1, shear <= 0.1)",
    )
    add(
        "--within-alphabet",
        action="store_true",
        help="draw each training episode's classes from one alphabet",
    )
    add("--maml-alpha", type=float, help="MAML's step (default: 0.4 for 5-way, 0.1 above)")
    add(
        "--val-fraction",
        type=float,
        default=0.15,
        help="fraction of the training characters held out for validation (0: none)",
    )
    add("--val-alphabets", nargs="+", help="hold out these training alphabets instead")
    add("--val-every", type=int, default=100, help="iterations between validations")
    add("--val-episodes", type=int, default=200, help="validation episodes")
    add("--eval-episodes", type=int, default=600, help="test episodes per protocol")
    add("--eval-query", type=int, default=5, help="query images per class in validation and test")
    add("--no-rotations", action="store_true", help="no rotated classes")
    add("--seed", type=int, default=0, help="seed of the init, episodes and validation split")
    add("--device", default="cpu", help="cpu, cuda, ... or auto")
    add("--threads", type=int, default=1, help="torch CPU threads, 0 for torch's default")
    add("--log-every", type=int, default=25, help="iterations per point of the loss curve")
    add("--save", type=Path, help="checkpoint path (one file per run when several)")
    add("--load", type=Path, help="checkpoint to evaluate (with --eval-only)")
    add("--eval-only", action="store_true", help="only test the --load checkpoint")
    add(
        "--quick",
        action="store_true",
        help="a smoke run: 5-way 1-shot, 60 iterations of 2 episodes, 100 test episodes",
    )
    add_output_arguments(
        parser, "omniglot", also="results/omniglot_eval with --eval-only", torchrun=True
    )
    add_cost_arguments(parser, timing_rounds=10, calls=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.ways, args.shots, args.iterations, args.meta_batch = [5], [1], 60, 2
        args.eval_episodes, args.val_episodes, args.val_every, args.log_every = 100, 50, 20, 10
    if args.eval_only and args.load is None:
        parser.error("--eval-only needs --load PATH")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"Invalid --val-fraction: {args.val_fraction} (expected 0 <= f < 1)")
    return args


def fetch(args: argparse.Namespace) -> None:
    """``--download``: rank 0 fetches, the other ranks wait for it and fail with it, silently.

    Rank 0 raises its own error (a :class:`DownloadError` becomes one message
    in ``__main__``); the others exit with status 1, so the message appears once.
    """
    failure: Exception | None = None
    if rank() == 0:
        wanted = [*(args.train_set or []), *filter(None, [args.test_set])] or list(SPLITS[-1])
        try:
            for path in download(args.data, wanted):
                print(f"downloaded {path}")
        except Exception as error:  # re-raised below, once every rank knows
            failure = error
    failed = [failure is not None]
    if dist.is_initialized():
        dist.broadcast_object_list(failed, src=0)
    if failure is not None:
        raise failure
    if failed[0]:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    variant = "eval" if args.eval_only else ""
    claim_output(args, "omniglot", ["omniglot.json", "omniglot.png"], variant)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = launch(device_of(args.device))
    seed_everything(args.seed)
    if args.download:
        fetch(args)
    start = time.perf_counter()
    if args.eval_only:
        model, opt, config = load_checkpoint(args.load, device)
        args.train_set = args.train_set or config["train_set"]
        steps = config["reptile_steps"] if config["method"] == "reptile" else config["steps"]
        steps = args.test_steps or steps
        trained = [(config["method"], config["ways"], config["shots"], model, opt, steps, {})]
    split = split_from_args(args, device)
    results: dict = {
        "config": plain_config(args),
        "environment": environment(),
        "split": {k: v for k, v in split.record.items() if k != "validation"},
        "validation": split.record["validation"],
        "runs": [],
        "world_size": world_size(),
        "ranks_identical": True,
    }
    costs: dict[tuple[str, int, int], dict] = {}
    if not args.eval_only:
        trained = []
        several = len(args.ways) * len(args.shots) * len(args.methods) > 1
        for ways in args.ways:
            for shots in args.shots:
                learners = {}
                for method in args.methods:
                    one, log = train(method, ways, shots, split, args, device)
                    results["ranks_identical"] &= log["ranks_identical"]
                    if rank() != 0:
                        continue  # testing, printing and files: rank 0 only
                    learners[method] = one
                    steps = eval_steps(args, one)
                    trained.append((method, ways, shots, one.model, one.opt, steps, log))
                    if args.save:
                        config = {
                            **plain_config(args),
                            "train_set": results["split"]["train"]["sets"],
                            "method": method,
                            "ways": ways,
                            "shots": shots,
                            # The inner step: MAML's, Reptile's, or Meta-SGD's lr.
                            "alpha": one.opt.param_groups[0]["lr"],
                        }
                        path = save_path(args.save, method, ways, shots, several)
                        save_checkpoint(path, one.model, one.opt, config)
                if rank() != 0:
                    continue
                measured = method_costs(
                    learners,
                    episode_stream(ways, shots, split, args, device),
                    device,
                    rounds=args.timing_rounds,
                    calls=args.timing_calls,
                    probe=None if args.no_memory else peak_memory,
                    probe_args=(ways, shots, args),
                )
                for method, cost in measured.items():
                    costs[(method, ways, shots)] = cost
    if rank() != 0:
        return results
    for method, ways, shots, model, opt, steps, log in trained:
        scores = evaluate(model, opt, split, ways, shots, args, steps)
        run = {"method": method, "ways": ways, "shots": shots, "steps": steps, **scores["mixed"]}
        run |= {"within_alphabet": scores["within-alphabet"]}
        run |= {"step_sizes": step_size_summary(model, opt), **log}
        run |= costs.get((method, ways, shots), {})
        results["runs"].append(run)
        within = scores["within-alphabet"]
        line = (
            f"{LABELS[method]:8s} {ways}-way {shots}-shot: {run['accuracy']:.2f} ± "
            f"{run['ci95']:.2f} % (within-alphabet {within['accuracy']:.2f} ± {within['ci95']:.2f})"
        )
        if "best_iteration" in log:
            line += f", validation best {log['best_val_accuracy']:.2f} % at {log['best_iteration']}"
        if log:
            line += f", {log['train_seconds']:.0f} s training"
        print(line)
    results["wall_seconds"] = time.perf_counter() - start
    results["table"], results["per_alphabet_table"], results["cost_table"] = tables(results["runs"])
    budget = (
        "checkpoint"
        if args.eval_only
        else f"{args.iterations} meta-iterations x {args.meta_batch} episodes per model"
    )
    print(
        f"\nOmniglot ({' + '.join(results['split']['train']['sets'])} -> "
        f"{results['split']['test']['set']}), accuracy % ± 95% CI over {args.eval_episodes} "
        f"test episodes, {budget}, "
        f"{results['wall_seconds']:.0f} s in all\n"
    )
    print(results["table"])
    print("\nPer test alphabet (mixed episodes):\n")
    print(results["per_alphabet_table"])
    if not args.eval_only:
        print_cost_table(results["cost_table"], device)
    write_json(args.out / "omniglot.json", results)
    # Without meta-training there are no curves or learned step sizes to draw.
    plotted = not args.eval_only and args.iterations > 0
    if plotted:
        plot(results, args.out / "omniglot.png")
    print(f"\nwrote {args.out}/omniglot.json" + (" and omniglot.png" if plotted else ""))
    return results


def tables(runs: list[dict]) -> tuple[str, str, str]:
    """The accuracy table (paper, this run, within-alphabet), the per-alphabet one, the costs."""

    def cell(score: dict) -> str:
        return f"{score['accuracy']:.2f} ± {score['ci95']:.2f}"

    configs = sorted({(r["ways"], r["shots"]) for r in runs})
    rows, cost_rows = [], []
    for method in METHODS:
        mine = {(r["ways"], r["shots"]): r for r in runs if r["method"] == method}
        if not mine:
            continue
        steps = str(next(iter(mine.values()))["steps"])
        if method in PAPER:
            paper = PAPER[method]
            rows.append(
                [
                    f"{LABELS[method]} (paper)",
                    "1",
                    *(f"{paper[c][0]} ± {paper[c][1]}" if c in paper else "-" for c in configs),
                ]
            )
        rows += [
            [
                f"{LABELS[method]} (this run)",
                steps,
                *(cell(mine[c]) if c in mine else "-" for c in configs),
            ],
            [
                f"{LABELS[method]} (this run, within-alphabet)",
                steps,
                *(cell(mine[c]["within_alphabet"]) if c in mine else "-" for c in configs),
            ],
        ]
        cost_rows.append(
            [
                LABELS[method],
                *(
                    cost_cell(mine[c].get(key, float("nan"))) if c in mine else "-"
                    for c in configs
                    for key in ("ms_per_iteration", "peak_memory_mib")
                ),
            ]
        )
    header = ["Method", "inner steps", *(f"{n}-way {k}-shot" for n, k in configs)]
    table = format_table(header, rows)
    cost_header = ["Method", *(f"{n}w{k}s: {unit}" for n, k in configs for unit in ("ms", "MiB"))]
    alphabets = sorted({a for r in runs for a in r["per_alphabet"]})
    header = ["Alphabet", *(f"{LABELS[r['method']]} {r['ways']}w{r['shots']}s" for r in runs)]
    rows = [
        [a, *(cell(r["per_alphabet"][a]) if a in r["per_alphabet"] else "-" for r in runs)]
        for a in alphabets
    ]
    return table, format_table(header, rows), format_table(cost_header, cost_rows)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, DownloadError) as error:
        # Missing data is the user's next step, not a bug: the message, no traceback, and
        # under torchrun from rank 0 alone (every rank fails alike).
        if os.environ.get("RANK", "0") != "0":
            raise SystemExit(1) from None
        raise SystemExit(f"omniglot.py: error: {error}") from None
