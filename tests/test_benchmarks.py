"""Smoke tests of the benchmarks: data, task samplers, baselines, statistics, CLI, checkpoints."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.text
import numpy as np
import pytest
import torch

import torch_metasgd

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import ddp  # noqa: E402
import navigation  # noqa: E402
import omniglot  # noqa: E402
import online  # noqa: E402
import reptile_speed  # noqa: E402
import sharded  # noqa: E402
import sinusoid  # noqa: E402
import speed  # noqa: E402

SCRIPTS = {"sinusoid": sinusoid, "omniglot": omniglot, "online": online}
SCRIPTS |= {"speed": speed, "reptile_speed": reptile_speed, "ddp": ddp}
SCRIPTS |= {"navigation": navigation, "sharded": sharded}

# --------------------------------------------------------------------------- statistics


def test_mean_ci95_matches_normal_interval_from_statistics_module():
    values = [0.3, 1.2, 0.7, 2.5, 0.1, 0.9]
    mean, half = _common.mean_ci95(values)
    expected = (
        statistics.NormalDist().inv_cdf(0.975) * statistics.stdev(values) / math.sqrt(len(values))
    )
    assert mean == pytest.approx(statistics.fmean(values))
    assert half == pytest.approx(expected)


def test_format_table_aligns_columns():
    table = _common.format_table(["a", "bbb"], [["xxxx", "y"]]).splitlines()
    assert len({len(line) for line in table}) == 1
    assert table[2] == "| xxxx | y   |"


def test_meta_train_passes_first_order_and_calls_after_step_after_each_outer_step(monkeypatch):
    model = torch.nn.Linear(2, 1)
    opt = _common.inner_optimizer("metasgd", model, 0.4, seed=0)
    outer = torch.optim.SGD(_common.outer_parameters("metasgd", model, opt), lr=0.1)
    seen = []
    real = torch_metasgd.distributed.meta_loss

    def recording(*args, **kwargs):
        seen.append(("loss", kwargs["first_order"]))
        return real(*args, **kwargs)

    def after_step(it):
        # Called after the step: the weights have already moved.
        seen.append(("after", it, not torch.equal(model.weight, start)))

    start = model.weight.detach().clone()
    monkeypatch.setattr(torch_metasgd.distributed, "meta_loss", recording)
    batch = (torch.randn(2, 3, 2), torch.randn(2, 3, 1))
    log = _common.meta_train(
        model,
        opt,
        outer,
        lambda: (batch, batch),
        torch.nn.functional.mse_loss,
        iterations=2,
        steps=1,
        log_every=1,
        desc="test",
        first_order=True,
        after_step=after_step,
    )
    assert seen == [("loss", True), ("after", 1, True), ("loss", True), ("after", 2, True)]
    assert [it for it, _ in log["curve"]] == [1, 2]


# --------------------------------------------------------------------------- output folders


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_the_output_folders_and_overwrite(script, capsys):
    with pytest.raises(SystemExit):
        SCRIPTS[script].parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"results/{script}; results/{script}_quick with --quick" in text
    assert "--overwrite" in text and "before any work" in text


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_refuses_an_earlier_runs_folder_before_any_work(script, tmp_path, capsys):
    earlier = tmp_path / f"{script}.json"
    earlier.write_text("{}")
    with pytest.raises(SystemExit) as stop:
        # --quick: were the check missing, this would run a short benchmark, not a long one.
        SCRIPTS[script].main(["--quick", "--out", str(tmp_path)])
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert f"{tmp_path} already holds {script}.json" in message and "--overwrite" in message
    assert earlier.read_text() == "{}" and list(tmp_path.iterdir()) == [earlier]


def test_every_script_with_a_thread_option_defaults_to_one_thread():
    scripts = {name: m for name, m in SCRIPTS.items() if "threads" in vars(m.parse_args([]))}
    assert set(scripts) == {"sinusoid", "omniglot", "speed", "reptile_speed", "navigation"}
    assert {name: m.parse_args([]).threads for name, m in scripts.items()} == dict.fromkeys(
        scripts, 1
    )


def test_default_folders_differ_per_command_and_process_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def folder(module, argv, *claim):
        return module.claim_output(module.parse_args(argv), *claim)

    assert folder(sinusoid, [], "sinusoid", []) == Path("results/sinusoid")
    assert folder(sinusoid, ["--quick"], "sinusoid", []) == Path("results/sinusoid_quick")
    evaluation = ["--load", "c.pt", "--eval-only"]
    assert folder(omniglot, evaluation, "omniglot", [], "eval") == Path("results/omniglot_eval")
    assert folder(speed, ["--out", "mine"], "speed", []) == Path("mine")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert folder(sinusoid, ["--quick"], "sinusoid", []) == Path("results/sinusoid_quick_2proc")


def test_overwrite_replaces_an_earlier_run(tmp_path, capsys):
    for name in ("reptile_speed.json", "reptile_speed.png"):
        (tmp_path / name).write_text("earlier")
    argv = ["--quick", "--workloads", "R1", "--rounds", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        reptile_speed.main(argv)
    assert "already holds reptile_speed.json and reptile_speed.png" in capsys.readouterr().err
    reptile_speed.main([*argv, "--overwrite"])
    assert "R1" in json.loads((tmp_path / "reptile_speed.json").read_text())["ms"]


# --------------------------------------------------------------------------- figures


def figure_texts(monkeypatch, module) -> list[str]:
    """Every text ``module``'s next figure holds (titles, labels, legends, marks), once saved."""
    texts: list[str] = []
    save = module.save_figure

    def spy(fig, path, **kwargs):
        save(fig, path, **kwargs)  # drawn: the tick labels exist
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))

    monkeypatch.setattr(module, "save_figure", spy)
    return texts


def test_sinusoid_plot_marks_a_diverged_meta_sgd(tmp_path, monkeypatch):
    args = sinusoid.parse_args(["--meta-batch", "2"])
    learners = {(m, 5): sinusoid.learner(m, args, torch.device("cpu")) for m in ("maml", "metasgd")}
    with torch.no_grad():
        for p in learners[("metasgd", 5)].model.parameters():
            p.fill_(math.nan)
    sizes = sinusoid.step_sizes_by_layer(
        learners[("metasgd", 5)].model, learners[("metasgd", 5)].opt
    )
    results = {
        "train": {"maml": {"5": {"curve": [(1, 2.0), (2, 1.5)]}}},
        "step_sizes": {"5": {name: [math.nan] * len(v) for name, v in sizes.items()}},
    }
    results["train"]["metasgd"] = {"5": {"curve": [(1, math.nan), (2, math.nan)]}}
    texts = figure_texts(monkeypatch, sinusoid)
    sinusoid.plot(results, learners, [5], args, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert "Meta-SGD after 1 inner step (NaN: diverged)" in texts
    assert "NaN, diverged: Meta-SGD" in texts
    assert "Meta-SGD's step sizes are NaN: its training diverged" in texts
    assert "linear 1\nweight\n(40)\nNaN" in texts  # tensors named by layer, not "0.weight"


def test_reptile_speed_plot_marks_nan_times_and_prints_values(tmp_path, monkeypatch):
    results = {
        "ms": {"R1": {"reptile_loss": 3.0, "hand": 30.0}, "R2": dict.fromkeys(["hand"], math.nan)},
        "config": {"rounds": 5},
        "environment": {"threads": 1},
    }
    texts = figure_texts(monkeypatch, reptile_speed)
    reptile_speed.plot(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert " 3 ms (0.10x hand)" in texts and " 30 ms" in texts
    assert "no finite time: every method's run failed (NaN)" in texts
    assert any(t.startswith("R1: sinusoid MLP") for t in texts)


def test_online_plot_marks_diverged_runs_and_draws_every_method(tmp_path, monkeypatch):
    def fake(loss: float, alpha: float) -> dict:
        curve = [(0, 2.0), (10, loss)]
        return {
            "train_loss": loss,
            "test_loss": loss,
            "test_acc": None,
            "diverged": not math.isfinite(loss),
            "curve": curve,
            "test_curve": curve,
            "step_sizes": [(0, [alpha, alpha]), (10, [alpha, alpha])],
        }

    lrs = [0.1, 1.0]
    runs = {m: {str(lr): [fake(0.5, lr)] for lr in lrs} for m in online.METHODS if m != "adam"}
    runs["adam"] = {"None": [fake(0.4, 1e-3)]}
    runs["metasgd-hd-element"]["1.0"] = [fake(math.inf, math.nan)]
    everything_diverged = {m: {k: [fake(math.nan, math.nan)] for k in v} for m, v in runs.items()}
    texts = figure_texts(monkeypatch, online)
    online.plot(
        {"lstsq": runs, "digits": everything_diverged}, ["lstsq", "digits"], tmp_path / "o.png", lrs
    )
    assert (tmp_path / "o.png").stat().st_size > 1000
    assert {online.NAMES[m] for m in online.METHODS} <= set(texts)  # every method of the table
    assert "lstsq: test loss, seed 0" in texts and "diverged (drawn at the top)" in texts
    assert "every run diverged: no finite test loss" in texts
    assert "no finite step size (NaN): the runs diverged" in texts


def test_ddp_plot_names_the_workloads_and_marks_nan_times(tmp_path, monkeypatch):
    one = {"W1": {name: 0.01 for name in [*ddp.BASELINES, *ddp.WAYS]}}
    two = {"W1": {name: 0.008 for name in ddp.WAYS}}
    one["W2"] = {name: math.nan for name in [*ddp.BASELINES, *ddp.WAYS]}
    two["W2"] = {name: math.nan for name in ddp.WAYS}
    texts = figure_texts(monkeypatch, ddp)
    ddp.plot({1: one, 2: two}, ["W1", "W2"], [1, 2], tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 1000
    assert "W1: sinusoid MLP 1-40-40-1, 25 tasks, 1 inner step" in texts
    assert "W2: conv4, 5-way 1-shot, 8 tasks, 1 inner step" in texts
    assert "100" in texts and "125" in texts  # meta-iterations per second on the bars
    assert "no finite time (NaN): every run failed" in texts
    assert any(t.startswith("how the meta-gradient is computed") for t in texts)


# --------------------------------------------------------------------------- sinusoid


def test_sinusoid_tasks_follow_the_paper_distribution():
    gen = torch.Generator().manual_seed(0)
    x, y, amp_phase = sinusoid.sample_tasks(2000, 7, gen)
    assert x.shape == y.shape == (2000, 7, 1)
    amp, phase = amp_phase[:, 0], amp_phase[:, 1]
    assert 0.1 <= amp.min() and amp.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    assert -5.0 <= x.min() and x.max() <= 5.0
    expected = amp.numpy()[:, None, None] * np.sin(x.numpy() - phase.numpy()[:, None, None])
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_sinusoid_query_points_belong_to_the_support_tasks():
    gen = torch.Generator().manual_seed(1)
    _, _, amp_phase = sinusoid.sample_tasks(4, 5, gen)
    xq, yq, same = sinusoid.sample_tasks(4, 9, gen, amp_phase=amp_phase)
    assert same is amp_phase
    np.testing.assert_allclose(
        yq.numpy(),
        amp_phase[:, :1, None].numpy() * np.sin(xq.numpy() - amp_phase[:, 1:, None].numpy()),
        atol=1e-5,
    )


def test_sinusoid_eval_support_sets_are_nested_across_k():
    five, ten = sinusoid.eval_tasks(6, 5, 3, seed=0), sinusoid.eval_tasks(6, 10, 3, seed=0)
    torch.testing.assert_close(ten["xs"][:, :5], five["xs"])
    torch.testing.assert_close(ten["xq"], five["xq"])


def test_only_metasgd_learns_its_step_sizes():
    args = sinusoid.parse_args(["--meta-batch", "4"])
    unchanged = {}
    for method in sinusoid.METHODS:
        trained = sinusoid.learner(method, args, torch.device("cpu"))
        model, opt = trained.model, trained.opt
        before = [opt.effective_lr(p).detach().clone() for p in model.parameters()]
        sample = sinusoid.task_stream(5, args, torch.device("cpu"))
        for _ in range(3):
            trained.step(*sample())
        after = [opt.effective_lr(p).detach() for p in model.parameters()]
        unchanged[method] = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        fixed = {"maml": sinusoid.MAML_ALPHA, "fomaml": sinusoid.MAML_ALPHA}
        fixed["reptile"] = sinusoid.REPTILE_ALPHA
        if method in fixed:
            assert all(torch.all(a == fixed[method]) for a in after)
        else:
            assert all(0.005 <= float(b.min()) and float(b.max()) <= 0.1 for b in before)
    assert unchanged == {"maml": True, "metasgd": False, "reptile": True, "fomaml": True}


def test_fomaml_step_takes_the_first_order_maml_gradient():
    args = sinusoid.parse_args([])
    trained = sinusoid.learner("fomaml", args, torch.device("cpu"))
    support, query = sinusoid.task_stream(5, args, torch.device("cpu"))()
    params = list(trained.model.parameters())
    loss = torch_metasgd.meta_loss(
        trained.model, trained.opt, torch.nn.functional.mse_loss, support, query, first_order=True
    )
    expected = torch.autograd.grad(loss, params)
    trained.step(support, query)
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_reptile_learner_takes_adam_or_the_papers_annealed_sgd():
    default = sinusoid.learner("reptile", sinusoid.parse_args([]), torch.device("cpu"))
    assert isinstance(default.outer, torch.optim.Adam) and default.schedule is None
    assert default.outer.param_groups[0]["params"] == list(default.model.parameters())
    args = sinusoid.parse_args(
        [
            "--iterations",
            "4",
            "--meta-batch",
            "2",
            "--reptile-outer",
            "sgd",
            "--reptile-epsilon",
            "0.5",
        ]
    )
    trained = sinusoid.learner("reptile", args, torch.device("cpu"))
    assert isinstance(trained.outer, torch.optim.SGD) and trained.steps == 5
    lrs = [trained.outer.param_groups[0]["lr"]]
    _common.train_learner(
        trained,
        sinusoid.task_stream(5, args, torch.device("cpu")),
        torch.nn.functional.mse_loss,
        iterations=4,
        log_every=2,
        desc="test",
        after_step=lambda it: lrs.append(trained.outer.param_groups[0]["lr"]),
    )
    assert lrs == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0])


def test_peak_memory_sees_a_large_allocation_and_runs_in_a_fresh_process():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc")
    peak = _common.peak_memory_mib(lambda: torch.ones(16 * 2**20).sum(), torch.device("cpu"))
    assert 60 <= peak < 200  # a 64 MiB tensor
    args = sinusoid.parse_args(["--meta-batch", "4"])
    probed = _common.in_fresh_process(sinusoid.peak_memory, "reptile", 5, args)
    assert 0 <= probed < 200


def test_timing_interleaves_the_methods():
    calls = []
    ms = _common.median_ms_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        rounds=3,
        device=torch.device("cpu"),
    )
    assert calls == ["a", "b"] * 4 and set(ms) == {"a", "b"}


def test_sinusoid_help_runs():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sinusoid.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "--quick" in out.stdout and "--device" in out.stdout


def test_sinusoid_tiny_run_writes_json_and_png(tmp_path):
    results = sinusoid.main(
        [
            "--iterations",
            "3",
            "--meta-batch",
            "2",
            "--eval-tasks",
            "4",
            "--shots",
            "5",
            "--timing-rounds",
            "2",
            "--no-memory",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "sinusoid.json").read_text())
    assert set(saved["mse"]) == set(saved["cost"]) == set(sinusoid.METHODS)
    assert all(saved["cost"][m]["5"]["ms_per_iteration"] > 0 for m in sinusoid.METHODS)
    assert saved["mse"]["metasgd"]["5"]["mean"] == pytest.approx(
        results["mse"]["metasgd"]["5"]["mean"]
    )
    assert (tmp_path / "sinusoid.png").stat().st_size > 1000


def test_sinusoid_zero_iterations_tests_the_initialization(tmp_path):
    argv = ["--iterations", "0", "--eval-tasks", "3", "--shots", "5", "--methods", "reptile"]
    argv += ["--timing-rounds", "1", "--timing-calls", "1", "--no-memory", "--out", str(tmp_path)]
    results = sinusoid.main(argv)
    assert results["train"]["reptile"]["5"]["curve"] == []
    assert (tmp_path / "sinusoid.png").exists()


@pytest.mark.slow
def test_sinusoid_quick_mode_metasgd_beats_maml(tmp_path):
    results = sinusoid.main(["--quick", "--out", str(tmp_path)])
    for k in ("5", "10", "20"):
        assert results["mse"]["metasgd"][k]["mean"] < results["mse"]["maml"][k]["mean"]


# --------------------------------------------------------------------------- reptile_speed


def test_reptile_speed_methods_take_the_same_update_and_write_json_and_png(tmp_path):
    argv = ["--quick", "--workloads", "R1", "--rounds", "1", "--out", str(tmp_path)]
    results = reptile_speed.main(argv)
    assert results["disagreement"]["R1"] < 1e-12
    saved = json.loads((tmp_path / "reptile_speed.json").read_text())
    assert set(saved["ms"]["R1"]) == set(reptile_speed.METHODS)
    # Memory not measured (--quick): "-", as in speed.py's table, not "nan".
    memory = [row.split("|")[4].strip() for row in saved["table"].splitlines()[2:]]
    assert memory == ["-"] * len(reptile_speed.METHODS)
    assert (tmp_path / "reptile_speed.png").stat().st_size > 1000


@pytest.mark.slow
def test_reptile_speed_methods_take_the_same_update_on_the_conv_net():
    args = argparse.Namespace(device="cpu", seed=0)
    assert reptile_speed.disagreement("R2", args) < 1e-12


# --------------------------------------------------------------------------- online


def test_online_help_runs():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "online.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "--quick" in out.stdout and "--hypergrad-lr" in out.stdout


def test_online_digits_objective_adds_the_l2_penalty_that_evaluation_leaves_out():
    regularised, plain = online.Problem("digits"), online.Problem("digits-noreg")
    assert torch.equal(regularised.x_train, plain.x_train)
    model = regularised.model(0)
    batch = (regularised.x_train[:32], regularised.y_train[:32])
    penalty = 0.5 * online.L2 * (model[0].weight.square().sum() + model[2].weight.square().sum())
    torch.testing.assert_close(regularised.loss(model, batch), plain.loss(model, batch) + penalty)
    assert regularised.evaluate(model) == plain.evaluate(model)


def test_online_digits_wide_is_the_digits_problem_with_two_wide_hidden_layers():
    digits, wide = online.Problem("digits"), online.Problem("digits-wide")
    shapes = [tuple(p.shape) for p in wide.model(0).parameters() if p.dim() > 1]
    assert shapes == [(1024, 64), (1024, 1024), (10, 1024)]
    assert [tuple(p.shape) for p in digits.model(0).parameters() if p.dim() > 1] == [
        (128, 64),
        (10, 128),
    ]
    assert wide.l2 == digits.l2 and torch.equal(wide.x_train, digits.x_train)


def test_online_digits_deep_has_the_hundred_small_tensors_of_the_cost_table():
    shapes = [tuple(p.shape) for p in online.Problem("digits-deep").model(0).parameters()]
    assert len(shapes) == 100 and shapes.count((64, 64)) == 49 and shapes[-2] == (10, 64)


def test_online_timing_only_reports_ratios_to_torchs_foreach_and_fused_sgd(tmp_path):
    # A full run's folder: --timing-only writes timing.json beside its online.json.
    (tmp_path / "online.json").write_text("{}")
    args = ["--timing-only", "--problems", "lstsq", "--timing-rounds", "1", "--momentum", "0.9"]
    payload = online.main([*args, "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / "online.json").read_text() == "{}"
    timing = payload["timing"]["lstsq"]
    assert list(timing)[:2] == ["SGD (foreach)", "SGD (fused)"]
    assert all(t["first_round_s"] > 0 for t in timing.values())
    saved = json.loads((tmp_path / "timing.json").read_text())
    assert "vs SGD fused" in saved["table"] and "momentum 0.9" in saved["table"]
    assert saved["environment"]["torch"] == torch.__version__


def test_online_scalar_sgd_hd_follows_baydins_additive_rule():
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = online.AdditiveHD([theta], lr=0.1, hypergrad_lr=0.01, granularity="global")
    grads = []
    for _ in range(2):
        opt.zero_grad()
        (theta.square() * torch.tensor([1.0, 3.0])).sum().backward()
        grads.append(theta.grad.clone())
        opt.step()
    # alpha_1 = lr + beta * g_1 . g_0, then theta_2 = theta_1 - alpha_1 g_1.
    alpha = 0.1 + 0.01 * torch.dot(grads[1], grads[0])
    expected = torch.tensor([1.0, -2.0]) - 0.1 * grads[0] - alpha * grads[1]
    torch.testing.assert_close(theta.detach(), expected)
    torch.testing.assert_close(opt.alpha, alpha)


def test_online_tiny_run_writes_json_png_and_cost_table(tmp_path):
    payload = online.main(
        [
            "--steps",
            "20",
            "--seeds",
            "1",
            "--problems",
            "lstsq",
            "--methods",
            "sgd",
            "sgd-hd",
            "metasgd-hd-element",
            "metasgd-hd-tensor",
            "--timing-rounds",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "online.json").read_text())
    assert (tmp_path / "online.png").stat().st_size > 0
    rows = saved["summary"]["lstsq"]["rows"]
    assert {(r["method"], r["lr"]) for r in rows} == {
        (m, lr)
        for m in ("sgd", "sgd-hd", "metasgd-hd-element", "metasgd-hd-tensor")
        for lr in online.LRS
    }
    sgd = {r["lr"]: r["test_loss"] for r in rows if r["method"] == "sgd"}
    assert saved["summary"]["lstsq"]["best_sgd_test_loss"] == min(sgd.values())
    assert set(payload["timing"]["lstsq"]) == set(online.TIMED)
    assert all(t["iteration_s"] > t["step_s"] > 0 for t in payload["timing"]["lstsq"].values())


def test_online_lrs_and_seeds_options_pick_the_grid_and_report_the_worst_seed(tmp_path):
    args = ["--steps", "10", "--seeds", "2", "--lrs", "0.1", "0.01", "--problems", "lstsq"]
    args += ["--methods", "sgd", "metasgd-hd-element", "--timing-rounds", "0"]
    payload = online.main([*args, "--out", str(tmp_path)])
    runs = payload["runs"]["lstsq"]["metasgd-hd-element"]
    assert set(runs) == {"0.1", "0.01"} and all(len(r) == 2 for r in runs.values())
    rows = {(r["method"], r["lr"]): r for r in payload["summary"]["lstsq"]["rows"]}
    row = rows[("metasgd-hd-element", 0.1)]
    assert row["worst_test_loss"] == max(r["test_loss"] for r in runs["0.1"])
    assert row["worst_test_loss"] >= row["test_loss"]
    assert "worst" in payload["table"] and "lr=0.01" in payload["table"]
    # --replot reads the grid back from the saved arguments.
    (tmp_path / "online.png").unlink()
    online.main(["--replot", "--out", str(tmp_path)])
    assert (tmp_path / "online.png").stat().st_size > 0
