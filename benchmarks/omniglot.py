"""Few-shot Omniglot classification (Meta-SGD paper, Section 4.2, Table 2): four meta-learners.

Data: ``--data`` is a folder of Omniglot archives (zips, or the folders they
extract to). Meta-training draws its classes from one set, testing from
another, so no test character is seen in training:

* ``images_background`` -> ``images_evaluation`` (the full split) when both
  are there, else
* ``images_background_small1`` -> ``images_background_small2`` (the official
  minimal sets; 136 and 156 characters).

Images are resized to 28x28 (strokes bright) and every character's four
rotations by multiples of 90 degrees are distinct classes, as in MAML and
Meta-SGD. Decoding happens once: the uint8 tensor is cached in ``--cache``,
keyed by the archive's name and size.

Model: four blocks of 3x3 conv (64 channels), batch norm (batch statistics,
as in MAML), ReLU and 2x2 max pooling, then a linear N-way classifier. Inner
loop: ``--steps`` (default 1) step(s) of cross-entropy on the N*K support
images, for training and testing alike.

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

Meta-training: Adam (lr 1e-3) on :func:`torch_metasgd.meta_loss` (Reptile:
on :func:`torch_metasgd.reptile_loss`), meta-batches of ``--meta-batch``
episodes with ``--query`` query images per class. Testing:
``--eval-episodes`` episodes (the same for every method), each with
``--eval-query`` query images per class; the table gives the mean accuracy
and its 95% confidence interval. Cost per method: the median time of a
meta-iteration (the methods interleaved) and the peak memory of three
meta-iterations (CPU: peak RSS growth in a fresh process; CUDA:
``torch.cuda.max_memory_allocated``).

Under torchrun every meta-batch's episodes are split over the processes (DDP,
gloo on CPU, NCCL on CUDA): the same training as one process, up to float
rounding. Rank 0 tests, prints and writes; the JSON records ``world_size``
and ``ranks_identical``.

    python benchmarks/omniglot.py --quick
    torchrun --standalone --nproc_per_node=2 benchmarks/omniglot.py --quick
    python benchmarks/omniglot.py --ways 5 --shots 1 --iterations 800 --save results/o.pt
    python benchmarks/omniglot.py --load results/o_5w1s_metasgd.pt --eval-only
"""

from __future__ import annotations

import argparse
import io
import os
import time
import zipfile
from pathlib import Path

import torch
from _common import (
    LABELS,
    METHODS,
    REPO,
    Learner,
    add_cost_arguments,
    add_method_arguments,
    build_learner,
    cost_cell,
    device_of,
    environment,
    format_table,
    inner_optimizer,
    launch,
    mean_ci95,
    method_costs,
    peak_memory_mib,
    rank,
    seed_everything,
    train_learner,
    world_size,
    write_json,
)
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from tqdm import tqdm

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
SPLITS = (
    ("images_background", "images_evaluation"),
    ("images_background_small1", "images_background_small2"),
)
DEFAULT_DATA = REPO.parent / "shared" / "data" / "omniglot"
SIZE = 28


# --------------------------------------------------------------------------- data


def _source(data: Path, name: str) -> Path | None:
    for path in (data / f"{name}.zip", data / name):
        if path.exists():
            return path
    return None


def default_split(data: Path) -> tuple[str, str]:
    """The first (train, test) pair of sets present in ``data``."""
    for train, test in SPLITS:
        if _source(data, train) and _source(data, test):
            return train, test
    wanted = " or ".join(f"{a}+{b}" for a, b in SPLITS)
    raise FileNotFoundError(f"no Omniglot sets in {data} (expected {wanted}, as .zip or folders)")


def _decode(raw: bytes) -> Tensor:
    from PIL import Image

    img = Image.open(io.BytesIO(raw)).convert("L").resize((SIZE, SIZE), Image.LANCZOS)
    # Omniglot draws black strokes on white; invert so the background is 0.
    return 255 - torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(SIZE, SIZE)


def _read_drawings(path: Path) -> dict[str, list[tuple[str, bytes]]]:
    """``{"alphabet/character": [(file name, png bytes), ...]}`` from a zip or a folder."""
    chars: dict[str, list[tuple[str, bytes]]] = {}
    if path.is_dir():
        files = [(f.relative_to(path).as_posix(), f.read_bytes) for f in path.rglob("*.png")]
    else:
        archive = zipfile.ZipFile(path)
        files = [(n, lambda n=n: archive.read(n)) for n in archive.namelist() if n.endswith(".png")]
    for name, read in files:
        parts = name.split("/")
        chars.setdefault("/".join(parts[-3:-1]), []).append((parts[-1], read()))
    return chars


def load_set(data: Path, name: str, cache: Path) -> tuple[Tensor, list[str]]:
    """``(images, characters)``: uint8 images ``(characters, drawings, 28, 28)``."""
    path = _source(data, name)
    if path is None:
        raise FileNotFoundError(f"{name}.zip (or folder {name}/) not found in {data}")
    size = path.stat().st_size if path.is_file() else sum(1 for _ in path.rglob("*.png"))
    cached = cache / f"{name}-{size}-{SIZE}px.pt"
    if cached.exists():
        blob = torch.load(cached, weights_only=True)
        return blob["images"], blob["characters"]
    chars = _read_drawings(path)
    names = sorted(chars)
    drawings = {len(chars[c]) for c in names}
    if len(drawings) != 1:
        raise ValueError(
            f"{path}: characters have different numbers of drawings: {sorted(drawings)}"
        )
    images = torch.stack(
        [
            torch.stack([_decode(raw) for _, raw in sorted(chars[c])])
            for c in tqdm(names, desc=f"decoding {name}", leave=False)
        ]
    )
    cache.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: torchrun's ranks may fill the cache at once.
    partial = cached.with_name(f"{cached.name}.{os.getpid()}")
    torch.save({"images": images, "characters": names}, partial)
    partial.replace(cached)
    return images, names


class Episodes:
    """N-way K-shot episodes over a set's characters and their four rotations."""

    def __init__(self, images: Tensor, rotations: bool = True) -> None:
        self.images = images
        self.n_rotations = 4 if rotations else 1
        self.n_classes = images.shape[0] * self.n_rotations

    def sample(
        self, n_episodes: int, ways: int, shots: int, query: int, generator: torch.Generator
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``support, query``: images ``(T, N*K or N*Q, 1, 28, 28)`` in [0, 1], labels ``(T, .)``.

        Labels are ``0..N-1``, class by class.
        """
        n_drawings = self.images.shape[1]
        if shots + query > n_drawings:
            raise ValueError(
                f"shots + query = {shots + query} exceeds {n_drawings} drawings per class"
            )
        if ways > self.n_classes:
            raise ValueError(
                f"{ways}-way episodes need {ways} classes, the set has {self.n_classes}"
            )
        xs, xq = [], []
        for _ in range(n_episodes):
            classes = torch.randperm(self.n_classes, generator=generator)[:ways]
            per_class = []
            for c in classes.tolist():
                char, rot = divmod(c, self.n_rotations)
                pick = torch.randperm(n_drawings, generator=generator)[: shots + query]
                per_class.append(torch.rot90(self.images[char, pick], rot, dims=(1, 2)))
            episode = torch.stack(per_class)  # (N, K+Q, 28, 28)
            xs.append(episode[:, :shots].reshape(-1, 1, SIZE, SIZE))
            xq.append(episode[:, shots:].reshape(-1, 1, SIZE, SIZE))
        labels = torch.arange(ways)
        ys = labels.repeat_interleave(shots).expand(n_episodes, -1)
        yq = labels.repeat_interleave(query).expand(n_episodes, -1)
        return (torch.stack(xs).float() / 255, ys), (torch.stack(xq).float() / 255, yq)


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
    method: str, ways: int, maml_alpha: float, seed: int
) -> tuple[nn.Sequential, MetaSGD]:
    """The model and its inner-loop MetaSGD, from the same init for every method."""
    torch.manual_seed(seed)
    model = make_model(ways)
    return model, inner_optimizer(method, model, maml_alpha, seed)


# --------------------------------------------------------------------------- train / test


def train(
    method: str,
    ways: int,
    shots: int,
    episodes: Episodes,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[Learner, dict]:
    trained = learner(method, ways, args, device)
    log = train_learner(
        trained,
        episode_stream(ways, shots, episodes, args, device),
        F.cross_entropy,
        iterations=args.iterations,
        log_every=args.log_every,
        desc=f"{LABELS[method]:8s} {ways}w{shots}s",
    )
    return trained, log


def learner(method: str, ways: int, args: argparse.Namespace, device: torch.device) -> Learner:
    """The model and its optimizers, from the same initialization for every method."""
    torch.manual_seed(args.seed)
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


def episode_stream(ways, shots, episodes: Episodes, args, device):
    """``sample()``: meta-batches from the episode stream every method trains on at (N, K)."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + ways * 10 + shots)

    def sample() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        (xs, ys), (xq, yq) = episodes.sample(args.meta_batch, ways, shots, args.query, gen)
        return (xs.to(device), ys.to(device)), (xq.to(device), yq.to(device))

    return sample


def peak_memory(method: str, ways: int, shots: int, args: argparse.Namespace) -> float:
    """Peak extra memory (MiB) of three meta-iterations of a fresh learner (CPU: run it fresh)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args.device)
    train_name, _ = split_names(args)
    episodes = Episodes(
        load_set(args.data, train_name, args.cache)[0], rotations=not args.no_rotations
    )
    trained = learner(method, ways, args, device)
    sample = episode_stream(ways, shots, episodes, args, device)
    return peak_memory_mib(lambda: [trained.step(*sample()) for _ in range(3)], device)


def evaluate(
    model: nn.Module,
    opt: MetaSGD,
    episodes: Episodes,
    ways: int,
    shots: int,
    args: argparse.Namespace,
    device: torch.device,
    steps: int,
) -> Tensor:
    """Per-episode query accuracy (%) on ``args.eval_episodes`` seeded test episodes."""
    gen = torch.Generator().manual_seed(10_000_019 + args.seed * 1000 + ways * 10 + shots)
    accs = []
    for _ in tqdm(range(args.eval_episodes), desc="testing", leave=False):
        (xs, ys), (xq, yq) = episodes.sample(1, ways, shots, args.eval_query, gen)
        # first_order only drops the graph: the adapted values are the same.
        fast = adapt(
            model,
            opt,
            F.cross_entropy,
            xs[0].to(device),
            ys[0].to(device),
            steps=steps,
            first_order=True,
        )
        with torch.no_grad():
            pred = functional_call(model, fast, (xq[0].to(device),)).argmax(1)
        accs.append(100.0 * (pred.cpu() == yq[0]).float().mean().item())
    return torch.tensor(accs)


def split_names(args: argparse.Namespace) -> tuple[str, str]:
    """The (train, test) sets: ``--train-set``/``--test-set``, else the default split."""
    train_name, test_name = (
        default_split(args.data) if not (args.train_set and args.test_set) else (None, None)
    )
    return args.train_set or train_name, args.test_set or test_name


def tables(runs: list[dict]) -> tuple[str, str]:
    """The accuracy table (with the paper's figures) and the cost table."""
    configs = sorted({(r["ways"], r["shots"]) for r in runs})
    header = ["Method", "inner steps", *(f"{n}-way {k}-shot" for n, k in configs)]
    cost_header = ["Method", *(f"{n}w{k}s: {unit}" for n, k in configs for unit in ("ms", "MiB"))]
    rows, cost_rows = [], []
    for method in METHODS:
        mine = {(r["ways"], r["shots"]): r for r in runs if r["method"] == method}
        if not mine:
            continue
        if method in PAPER:
            paper = [
                f"{PAPER[method][c][0]} ± {PAPER[method][c][1]}" if c in PAPER[method] else "-"
                for c in configs
            ]
            rows.append([f"{LABELS[method]} (paper)", "1", *paper])
        ours = [
            f"{mine[c]['accuracy']:.2f} ± {mine[c]['ci95']:.2f}" if c in mine else "-"
            for c in configs
        ]
        steps = str(next(iter(mine.values()))["steps"])
        rows.append([f"{LABELS[method]} (this run)", steps, *ours])
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
    return format_table(header, rows), format_table(cost_header, cost_rows)


def maml_alpha(args: argparse.Namespace, ways: int) -> float:
    if args.maml_alpha is not None:
        return args.maml_alpha
    return 0.4 if ways <= 5 else 0.1


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
    blob = torch.load(path, map_location="cpu", weights_only=True)
    config = blob["config"]
    model, opt = make_learner(config["method"], config["ways"], config["alpha"], 0)
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["metasgd"])
    return model.to(device), opt, config


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for run in runs:
        if not run["curve"]:  # --iterations 0: the untrained initialization
            continue
        it, loss = zip(*run["curve"], strict=True)
        axes[0].plot(
            it, loss, label=f"{LABELS[run['method']]} {run['ways']}-way {run['shots']}-shot"
        )
    axes[0].set_xlabel("meta-iteration")
    axes[0].set_ylabel("meta-training query loss")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    for run in runs:
        if run["method"] == "metasgd":
            names = list(run["step_sizes"])
            axes[1].plot(
                range(len(names)),
                [run["step_sizes"][n]["mean"] for n in names],
                "o-",
                label=f"{run['ways']}-way {run['shots']}-shot",
            )
            axes[1].set_xticks(range(len(names)), names, rotation=60, fontsize=6)
    axes[1].set_yscale("log")
    axes[1].set_title("Meta-SGD: mean |learned step size| per tensor")
    if any(run["method"] == "metasgd" for run in runs):
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help=f"folder of Omniglot zips (default: {DEFAULT_DATA})",
    )
    parser.add_argument("--train-set", help="set to meta-train on (default: see above)")
    parser.add_argument("--test-set", help="set to test on (default: see above)")
    parser.add_argument("--cache", type=Path, default=REPO / "results" / "omniglot_cache")
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 20], help="N (default: 5 20)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="K (default: 1 5)")
    add_method_arguments(parser, reptile_alpha=None)
    parser.add_argument(
        "--iterations",
        type=int,
        default=2000,
        help="meta-iterations per model; 0 tests the initialization (default: 2000)",
    )
    parser.add_argument(
        "--meta-batch", type=int, default=4, help="episodes per meta-iteration (default: 4)"
    )
    parser.add_argument(
        "--query", type=int, default=1, help="query images per class in training (default: 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=1, help="inner steps, training and testing (default: 1)"
    )
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument(
        "--maml-alpha",
        type=float,
        default=None,
        help="MAML's step (default: 0.4 for 5-way, 0.1 above)",
    )
    parser.add_argument(
        "--eval-episodes", type=int, default=600, help="test episodes (default: 600)"
    )
    parser.add_argument(
        "--eval-query", type=int, default=5, help="query images per class in testing (default: 5)"
    )
    parser.add_argument("--no-rotations", action="store_true", help="no rotated classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... or auto (default: cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, 0 for torch's default (default: 1)",
    )
    parser.add_argument("--log-every", type=int, default=25)
    add_cost_arguments(parser, timing_rounds=10, calls=1)
    parser.add_argument("--save", type=Path, help="checkpoint path (one file per run when several)")
    parser.add_argument("--load", type=Path, help="checkpoint to evaluate (with --eval-only)")
    parser.add_argument("--eval-only", action="store_true", help="only test the --load checkpoint")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about a minute: 5-way 1-shot, 60 iterations, 100 test episodes",
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "omniglot")
    args = parser.parse_args(argv)
    if args.quick:
        args.ways, args.shots, args.iterations, args.eval_episodes, args.meta_batch = (
            [5],
            [1],
            60,
            100,
            2,
        )
        args.log_every = 10
    if args.eval_only and args.load is None:
        parser.error("--eval-only needs --load PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = launch(device_of(args.device))
    seed_everything(args.seed)

    train_name, test_name = split_names(args)
    test_set = Episodes(
        load_set(args.data, test_name, args.cache)[0], rotations=not args.no_rotations
    )
    results: dict = {
        "config": plain_config(args),
        "environment": environment(),
        "split": [train_name, test_name],
        "runs": [],
        "world_size": world_size(),
        "ranks_identical": True,
    }
    start = time.perf_counter()
    if args.eval_only:
        model, opt, config = load_checkpoint(args.load, device)
        steps = config["reptile_steps"] if config["method"] == "reptile" else config["steps"]
        log = {"train_seconds": 0.0, "curve": []}
        runs = [(config["method"], config["ways"], config["shots"], model, opt, steps, log)]
        run_costs = {}
    else:
        train_set = Episodes(
            load_set(args.data, train_name, args.cache)[0], rotations=not args.no_rotations
        )
        runs, run_costs = [], {}
        several = len(args.ways) * len(args.shots) * len(args.methods) > 1
        for ways in args.ways:
            for shots in args.shots:
                learners = {}
                for method in args.methods:
                    trained, log = train(method, ways, shots, train_set, args, device)
                    results["ranks_identical"] &= log["ranks_identical"]
                    if rank() != 0:
                        continue  # testing, printing and files: rank 0 only
                    learners[method] = trained
                    model, opt = trained.model, trained.opt
                    runs.append((method, ways, shots, model, opt, trained.steps, log))
                    if args.save:
                        # The inner step: MAML's, Reptile's or Meta-SGD's lr.
                        alpha = opt.param_groups[0]["lr"]
                        config = {
                            **plain_config(args),
                            "method": method,
                            "ways": ways,
                            "shots": shots,
                            "alpha": alpha,
                        }
                        save_checkpoint(
                            save_path(args.save, method, ways, shots, several), model, opt, config
                        )
                if rank() != 0:
                    continue
                costs = method_costs(
                    learners,
                    episode_stream(ways, shots, train_set, args, device),
                    device,
                    rounds=args.timing_rounds,
                    calls=args.timing_calls,
                    probe=None if args.no_memory else peak_memory,
                    probe_args=(ways, shots, args),
                )
                for method, c in costs.items():
                    run_costs[(method, ways, shots)] = c
    if rank() != 0:
        return results
    for method, ways, shots, model, opt, steps, log in runs:
        accs = evaluate(model, opt, test_set, ways, shots, args, device, steps)
        mean, ci = mean_ci95(accs)
        results["runs"].append(
            {
                "method": method,
                "ways": ways,
                "shots": shots,
                "steps": steps,
                "accuracy": mean,
                "ci95": ci,
                "step_sizes": step_size_summary(model, opt),
                **log,
                **run_costs.get((method, ways, shots), {}),
            }
        )
        print(
            f"{LABELS[method]:8s} {ways}-way {shots}-shot: {mean:.2f} ± {ci:.2f} %  "
            f"({log['train_seconds']:.0f} s training)"
        )
    results["wall_seconds"] = time.perf_counter() - start

    results["table"], results["cost_table"] = tables(results["runs"])
    budget = (
        "checkpoint"
        if args.eval_only
        else f"{args.iterations} meta-iterations x {args.meta_batch} episodes per model"
    )
    print(
        f"\nOmniglot ({train_name} -> {test_name}), accuracy % ± 95% CI over "
        f"{args.eval_episodes} test episodes, {budget}, "
        f"{results['wall_seconds']:.0f} s in all\n"
    )
    print(results["table"])
    if not args.eval_only:
        memory = "CUDA tensors" if device.type == "cuda" else "RSS, in a fresh process"
        print(
            "\nCost per meta-iteration: median ms (methods interleaved), peak extra memory in MiB "
            f"over 3 meta-iterations ({memory})\n"
        )
        print(results["cost_table"])
    write_json(args.out / "omniglot.json", results)
    if not args.eval_only:
        plot(results, args.out / "omniglot.png")
    print(f"\nwrote {args.out}/omniglot.json" + ("" if args.eval_only else " and omniglot.png"))
    return results


if __name__ == "__main__":
    main()
