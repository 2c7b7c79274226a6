"""Smoke tests of benchmarks/speed.py: its options, its JSON and figure, its targets."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import matplotlib.text
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import speed  # noqa: E402


def test_speed_help_shows_device_and_defaults():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "speed.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for flag in ("--device", "--quick", "--workloads", "W3", "W4", "default: cpu"):
        assert flag in out.stdout


def test_speed_tiny_run_writes_json_and_png_and_judges_no_targets_when_quick(tmp_path, capsys):
    payload = speed.main(
        [
            "--quick",
            "--workloads",
            "W1",
            "--methods",
            "meta_loss",
            "hand_loop",
            "--rounds",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert payload["targets"] == [] and "not a measurement" in capsys.readouterr().out
    assert payload["device"] == "cpu" and payload["environment"]["threads"] == 1
    assert set(payload["median_seconds"]["W1"]) == {"meta_loss", "hand_loop"}
    assert any(name.startswith("SGD(fused") for name in payload["optimizer_step_median_seconds"])
    assert (tmp_path / "speed.json").exists() and (tmp_path / "speed.png").stat().st_size > 0


def test_gpu_targets_ask_more_of_the_conv_workloads():
    med = {
        w: {
            "meta_loss": 1.0,
            "hand_loop": 2.0,
            "hand_vmap": 1.5,
            "inner_loop": 1.0,
            "higher_min": 20.0,
        }
        for w in ("W1", "W3")
    }
    step = {name: 1.0 for name in speed.step_variants()}
    cpu = {g["target"] for g in speed.targets(med, step, torch.device("cpu"))}
    gpu = {g["target"] for g in speed.targets(med, step, torch.device("cuda"))}
    assert "W3: meta_loss / best hand-written <= 1.1" in cpu
    assert "W3: meta_loss / best hand-written <= 0.6" in gpu
    assert "W3: higher_min / meta_loss >= 15" in gpu
    assert "W1: meta_loss / best hand-written <= 1.1" in gpu


def test_speed_plot_draws_linear_bars_with_values_and_marks_nan_times(tmp_path, monkeypatch):
    texts: list[str] = []
    save = speed.save_figure

    def spy(fig, path, **kwargs):
        save(fig, path, **kwargs)
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        texts.extend(ax.get_xscale() for ax in fig.axes)

    monkeypatch.setattr(speed, "save_figure", spy)
    med = {
        "W1": {"meta_loss": 0.002, "inner_loop": 0.05, "hand_loop": math.nan},
        "W2": {"meta_loss": math.nan, "hand_loop": math.nan},
    }
    step = {name: 1e-4 for name in speed.step_variants()}
    speed.plot(tmp_path / "s.png", med, step, "wall")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert "log" not in texts  # bar lengths are times
    assert " 2 ms" in texts and " 50 ms (25.00x)" in texts and " NaN: not measured" in texts
    assert "no finite time (NaN): every run failed" in texts
    assert "W2: conv4, 5-way 1-shot\n8 tasks, 1 inner step" in texts
    assert "meta_loss (torch_metasgd, batched)" in texts and "MetaSGD.step()" in texts
