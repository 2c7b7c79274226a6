"""benchmarks/omniglot.py and _omniglot_data.py: archives, download, splits, episodes, training."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import _omniglot_data as data  # noqa: E402
import omniglot  # noqa: E402

SMALL1, SMALL2 = "images_background_small1", "images_background_small2"


def fake_set(
    root: Path, name: str, alphabets: dict[str, int], drawings: int = 20, as_zip: bool = True
) -> tuple[torch.Tensor, list[str]]:
    """Writes a set in Omniglot's layout; returns the expected 28x28 uint8 images and names.

    A character's drawings depend only on its name, so two sets that share a
    character share its images, as the official minimal sets do.
    """
    names = sorted(f"{a}/character{c + 1:02d}" for a, n in alphabets.items() for c in range(n))
    expected = torch.empty(len(names), drawings, 28, 28, dtype=torch.uint8)
    files = {}
    for i, char in enumerate(names):
        rng = np.random.default_rng(zlib.crc32(char.encode()))
        for d in range(drawings):
            # Black strokes on white, as Omniglot.
            pixels = np.where(rng.random((105, 105)) < 0.1, 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            files[f"{name}/{char}/{i:04d}_{d + 1:02d}.png"] = buf.getvalue()
            small = np.asarray(img.resize((28, 28), Image.LANCZOS))
            expected[i, d] = torch.from_numpy(255 - small)
    if as_zip:
        with zipfile.ZipFile(root / f"{name}.zip", "w") as z:
            for path, raw in files.items():
                z.writestr(path, raw)
    else:
        for path, raw in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(raw)
    return expected, names


def marked_images(n_chars: int, drawings: int) -> torch.Tensor:
    """Every drawing a distinct, asymmetric image: pixel (0, 0) holds 1 + its index."""
    images = torch.zeros(n_chars, drawings, 28, 28, dtype=torch.uint8)
    images[:, :, 0, 0] = 1 + torch.arange(n_chars * drawings).view(n_chars, drawings)
    return images


# --------------------------------------------------------------------------- archives


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_set_decodes_inverted_28px_images_and_caches_them(tmp_path, as_zip, monkeypatch):
    expected, names = fake_set(tmp_path, SMALL1, {"Greek": 2, "Latin": 1}, 4, as_zip)
    cache = tmp_path / "cache"
    images, loaded = data.load_set(tmp_path, SMALL1, cache)
    assert images.dtype == torch.uint8 and images.shape == (3, 4, 28, 28)
    torch.testing.assert_close(images, expected)
    assert loaded == names and len(list(cache.iterdir())) == 1

    def no_decoding(raw):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_decode", no_decoding)
    again, _ = data.load_set(tmp_path, SMALL1, cache)
    torch.testing.assert_close(again, images)


def test_default_split_prefers_the_full_sets_and_says_how_to_get_them(tmp_path):
    for name in (SMALL1, SMALL2):
        (tmp_path / f"{name}.zip").write_bytes(b"")
    assert data.default_split(tmp_path) == (SMALL1, SMALL2)
    for name in ("images_background", "images_evaluation"):
        (tmp_path / name).mkdir()
    assert data.default_split(tmp_path) == ("images_background", "images_evaluation")
    with pytest.raises(FileNotFoundError, match="no Omniglot sets") as error:
        data.default_split(tmp_path / "missing")
    assert "--download" in str(error.value) and "brendenlake/omniglot" in str(error.value)
    with pytest.raises(FileNotFoundError, match="--download"):
        data.load_set(tmp_path / "missing", SMALL1, tmp_path / "cache")


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A file:// mirror of the two minimal sets, with their checksums registered."""
    root = tmp_path / "mirror"
    root.mkdir()
    fake_set(root, SMALL1, {"Greek": 3, "Balinese": 3})
    fake_set(root, SMALL2, {"Greek": 3, "Tagalog": 2})
    for name in (SMALL1, SMALL2):
        digest = hashlib.sha256((root / f"{name}.zip").read_bytes()).hexdigest()
        monkeypatch.setitem(data.SHA256, name, digest)
    monkeypatch.setenv(data.URL_VARIABLE, root.as_uri())
    return root


def test_download_fetches_missing_archives_from_the_url_and_checks_them(tmp_path, mirror):
    target = tmp_path / "data"
    assert data.download(target, [SMALL1, SMALL2]) == [
        target / f"{SMALL1}.zip",
        target / f"{SMALL2}.zip",
    ]
    for name in (SMALL1, SMALL2):
        assert (target / f"{name}.zip").read_bytes() == (mirror / f"{name}.zip").read_bytes()
    assert data.download(target, [SMALL1, SMALL2]) == []  # present: nothing fetched


def test_download_with_a_wrong_checksum_leaves_nothing(tmp_path, mirror, monkeypatch):
    monkeypatch.setitem(data.SHA256, SMALL1, "0" * 64)
    with pytest.raises(RuntimeError, match="invalid hash"):
        data.download(tmp_path / "data", [SMALL1])
    assert list((tmp_path / "data").iterdir()) == []


def test_download_refuses_sets_without_a_known_checksum(tmp_path, mirror):
    with pytest.raises(ValueError, match="Invalid set to download: 'images_evaluation'"):
        data.download(tmp_path / "data", [SMALL1, "images_evaluation"])
    assert not (tmp_path / "data").exists()  # raised before anything was written


def test_download_without_network_raises_what_to_do_instead(tmp_path, monkeypatch):
    def offline(url, dst, hash_prefix=None):
        raise URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(data.DownloadError) as error:
        data.download(tmp_path / "data", [SMALL1, SMALL2])
    message = str(error.value)
    assert f"{data.OFFICIAL_URL}/{SMALL1}.zip" in message and "Name or service" in message
    assert f"{SMALL1}.zip and {SMALL2}.zip" in message and "brendenlake/omniglot" in message
    assert f"--data (now {tmp_path / 'data'})" in message
    assert list((tmp_path / "data").iterdir()) == []


def test_download_failure_exits_with_one_message_not_a_traceback(tmp_path):
    # Nothing listens on the discard port: the connection is refused at once, network or not.
    env = {**os.environ, data.URL_VARIABLE: "http://127.0.0.1:9"}
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "omniglot.py"), "--download", "--quick"]
        + ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.count("omniglot.py: error: could not download") == 1
    assert "--data" in out.stderr and "brendenlake/omniglot" in out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_download_failure_under_torchrun_is_reported_by_rank_0_alone(tmp_path):
    env = {**os.environ, data.URL_VARIABLE: "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCHMARKS.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr"]
        + ["127.0.0.1", "--nproc-per-node", "2", str(BENCHMARKS / "omniglot.py"), "--download"]
        + ["--quick", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode != 0
    # torchrun's own summary of the failed processes follows; the script's message comes once.
    assert out.stderr.count("omniglot.py: error: could not download") == 1
    assert "URLError" not in out.stderr and "ConnectionRefused" not in out.stderr


def test_main_downloads_then_trains_and_tests(tmp_path, mirror):
    out = tmp_path / "out"
    results = omniglot.main(
        ["--download", "--data", str(tmp_path / "data"), "--cache", str(tmp_path / "cache")]
        + ["--ways", "5", "--shots", "1", "--methods", "maml", "--iterations", "1"]
        + ["--meta-batch", "1", "--val-fraction", "0", "--eval-episodes", "2", "--out", str(out)]
    )
    assert {p.name for p in (tmp_path / "data").iterdir()} == {f"{SMALL1}.zip", f"{SMALL2}.zip"}
    assert results["split"]["test"]["alphabets"] == {"Tagalog": 2}


# --------------------------------------------------------------------------- splits


def split_args(tmp_path: Path, *extra: str):
    return omniglot.parse_args(["--data", str(tmp_path), "--cache", str(tmp_path / "c"), *extra])


def test_test_set_drops_the_characters_a_training_set_holds(tmp_path):
    fake_set(tmp_path, SMALL1, {"Greek": 3, "Balinese": 3})
    fake_set(tmp_path, SMALL2, {"Greek": 3, "Tagalog": 2})
    split = omniglot.split_from_args(
        split_args(tmp_path, "--val-fraction", "0"), torch.device("cpu")
    )
    assert split.test.alphabets == ["Tagalog"] and split.test.n_classes == 2 * 4
    assert split.record["test"]["dropped"]["alphabets"] == {"Greek": 3}
    assert split.train.n_classes == 6 * 4 and split.validation is None


def test_several_training_sets_are_joined_without_duplicate_characters(tmp_path):
    fake_set(tmp_path, SMALL1, {"Greek": 3, "Balinese": 3})
    fake_set(tmp_path, SMALL2, {"Greek": 3, "Tagalog": 2})
    fake_set(tmp_path, "images_evaluation", {"Angelic": 2})
    args = split_args(tmp_path, "--train-set", SMALL1, SMALL2, "--test-set", "images_evaluation")
    split = omniglot.split_from_args(args, torch.device("cpu"))
    assert split.record["train"]["sets"] == [SMALL1, SMALL2]
    together = split.record["train"]["characters"] + split.record["validation"]["characters"]
    assert together == 3 + 3 + 2
    assert split.test.alphabets == ["Angelic"]
    with pytest.raises(ValueError, match="Invalid test set"):
        omniglot.split_from_args(
            split_args(tmp_path, "--train-set", SMALL1, SMALL2, "--test-set", SMALL2), "cpu"
        )


def test_validation_holds_out_named_alphabets_or_a_seeded_fraction(tmp_path):
    fake_set(tmp_path, SMALL1, {"Greek": 4, "Balinese": 4, "Latin": 2}, drawings=2)
    fake_set(tmp_path, SMALL2, {"Tagalog": 2}, drawings=2)
    split = omniglot.split_from_args(split_args(tmp_path, "--val-alphabets", "Latin"), "cpu")
    assert split.record["validation"]["alphabets"] == {"Latin": 2}
    assert split.validation.alphabets == ["Latin"] and "Latin" not in split.train.alphabets
    chars = [
        f"{a}/character{i:02d}" for a, n in (("Balinese", 4), ("Greek", 4)) for i in range(1, n + 1)
    ]
    chars += ["Latin/character01", "Latin/character02"]
    args = split_args(tmp_path, "--val-fraction", "0.3")
    held = data.validation_characters(sorted(chars), 0.3, None, seed=0)
    assert len(held) == 3 and held == data.validation_characters(sorted(chars), 0.3, None, 0)
    split = omniglot.split_from_args(args, "cpu")
    assert split.record["validation"]["names"] == held
    assert split.train.n_classes == (10 - 3) * 4
    with pytest.raises(ValueError, match="Invalid validation alphabet: 'Klingon'"):
        omniglot.split_from_args(split_args(tmp_path, "--val-alphabets", "Klingon"), "cpu")


# --------------------------------------------------------------------------- episodes


def test_episodes_hold_rotated_classes_with_labels_class_by_class():
    n_chars, drawings = 6, 20
    eps = data.Episodes(marked_images(n_chars, drawings), [f"A/c{i}" for i in range(n_chars)])
    assert eps.n_classes == 4 * n_chars
    gen = torch.Generator().manual_seed(0)
    classes, picks = eps.draw(3, ways=5, shots=2, query=3, generator=gen)
    (xs, ys), (xq, yq) = eps.episodes(classes, picks, shots=2)
    assert xs.shape == (3, 10, 1, 28, 28) and xq.shape == (3, 15, 1, 28, 28)
    assert ys[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert yq[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    corners = {
        (0, 0): 0,
        (27, 0): 1,
        (27, 27): 2,
        (0, 27): 3,
    }  # where np.rot90 k times sends (0, 0)
    for t in range(3):
        for label in range(5):
            both = torch.cat([xs[t][ys[t] == label], xq[t][yq[t] == label]])
            marks = []
            for img in (both[:, 0] * 255).round().to(torch.uint8):
                (pos,) = [p for p in corners if img[p] != 0]
                marks.append((int(img[pos]) - 1, corners[pos]))
            char, rot = divmod(int(classes[t, label]), 4)
            # Class c is character c // 4 rotated c % 4 times; support then query drawings.
            assert marks == [(char * drawings + int(d), rot) for d in picks[t, label]]


def test_sampler_balances_classes_and_drawings_and_keeps_support_and_query_apart():
    n_chars, drawings, n = 6, 20, 6000
    eps = data.Episodes(marked_images(n_chars, drawings), [f"A/c{i}" for i in range(n_chars)])
    gen = torch.Generator().manual_seed(0)
    classes, picks = eps.draw(n, ways=5, shots=1, query=3, generator=gen)
    # N distinct classes per episode, K + Q distinct drawings per class.
    assert (classes.sort(1).values.diff(dim=1) > 0).all()
    assert (picks.sort(2).values.diff(dim=2) > 0).all()

    def chi2(counts: torch.Tensor) -> float:
        expected = counts.sum() / counts.numel()
        return float(((counts - expected) ** 2 / expected).sum())

    # Pearson's chi-square against the uniform law; the bounds are the 99.99% quantiles
    # for 23, 19 and 119 degrees of freedom (with a margin).
    assert chi2(torch.bincount(classes.flatten(), minlength=24).double()) < 60
    assert chi2(torch.bincount(picks[..., 0].flatten(), minlength=drawings).double()) < 53
    # Every label takes every class equally often: no class is tied to a position.
    per_label = torch.stack([torch.bincount(classes[:, k], minlength=24) for k in range(5)])
    assert chi2(per_label[:, :24].double().flatten()) < 180


def test_within_alphabet_episodes_draw_one_alphabet_with_enough_classes_uniformly():
    # Alphabets of 1, 2 and 3 characters: 4, 8 and 12 classes.
    names = ["A/c0", "B/c0", "B/c1", "C/c0", "C/c1", "C/c2"]
    eps = data.Episodes(marked_images(6, 20), names)
    gen = torch.Generator().manual_seed(0)
    classes, _ = eps.draw(4000, ways=5, shots=1, query=1, generator=gen, within_alphabet=True)
    alphabets = eps.alphabet[classes]
    assert (alphabets == alphabets[:, :1]).all()
    picked = torch.bincount(alphabets[:, 0], minlength=3)
    assert picked[0] == 0 and abs(int(picked[1]) - 2000) < 150  # A is too small for 5-way
    # Within the alphabet, its classes are drawn uniformly.
    counts = torch.bincount(classes[alphabets[:, 0] == 2].flatten(), minlength=24)[12:]
    assert counts.min() > 0.85 * counts.float().mean()
    with pytest.raises(ValueError, match="Invalid ways: 13-way within-alphabet"):
        eps.draw(1, ways=13, shots=1, query=1, generator=gen, within_alphabet=True)


def test_sampler_rejects_impossible_episodes():
    eps = data.Episodes(marked_images(2, 5), ["A/c0", "A/c1"])
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="Invalid ways: 9-way"):
        eps.draw(1, ways=9, shots=1, query=1, generator=gen)
    with pytest.raises(ValueError, match="Invalid shots"):
        eps.draw(1, ways=2, shots=3, query=3, generator=gen)


def test_augment_moves_each_image_a_little_and_keeps_the_background():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 12:16, 10:18] = 1.0  # a bar in the middle
    y = data.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 + 1e-6
    assert (y[:, :, :5] == 0).all() and (y[:, :, -5:] == 0).all()  # far from the bar
    grid = torch.arange(28.0)

    def centre(img):
        mass = img.sum((-1, -2))
        return (
            torch.stack([(img.sum(-1) * grid).sum(-1), (img.sum(-2) * grid).sum(-1)], -1)
            / mass[..., None]
        )

    shift = (centre(y) - centre(x)).abs()
    # Up to 2 px of translation, plus what scale/rotation/shear do about the centre (13.5, 13.5).
    assert shift.max() <= 2.0 + 1.0 and shift.max() > 0.5
    assert not torch.allclose(y[0], y[1])  # one warp per image


# --------------------------------------------------------------------------- training


def test_validation_keeps_and_restores_the_best_state(monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = _common.inner_optimizer("metasgd", model, 0.4, seed=0)
    accs = iter([50.0, 80.0, 60.0])
    monkeypatch.setattr(omniglot, "query_correct", lambda *args: None)
    monkeypatch.setattr(omniglot, "accuracy", lambda correct: (next(accs), 0.0))
    validation = omniglot.Validation(model, opt, None, None, shots=1, steps=1)
    states = []
    for it in (10, 20, 30):
        with torch.no_grad():
            model.weight.add_(1.0)
            opt.meta_parameters()[0].add_(0.5)
        states.append((model.weight.detach().clone(), opt.meta_parameters()[0].detach().clone()))
        validation(it)
    step_size = opt.meta_parameters()[0]
    validation.restore_best()
    torch.testing.assert_close(model.weight.detach(), states[1][0])
    torch.testing.assert_close(step_size.detach(), states[1][1])  # the live tensor, rewritten
    log = validation.log()
    assert log["best_iteration"] == 20 and [p[:2] for p in log["val_curve"]] == [
        (10, 50.0),
        (20, 80.0),
        (30, 60.0),
    ]


def test_tiny_run_records_validation_protocols_and_alphabets(tmp_path):
    fake_set(tmp_path, SMALL1, {"Greek": 4, "Balinese": 4})
    fake_set(tmp_path, SMALL2, {"Greek": 3, "Tagalog": 2, "Sanskrit": 2})
    out = tmp_path / "out"
    results = omniglot.main(
        ["--data", str(tmp_path), "--cache", str(tmp_path / "c"), "--ways", "5", "--shots", "1"]
        + ["--iterations", "3", "--meta-batch", "1", "--val-every", "2", "--val-episodes", "2"]
        + ["--val-fraction", "0.25"]
        + ["--eval-episodes", "3", "--within-alphabet", "--out", str(out)]
    )
    saved = json.loads((out / "omniglot.json").read_text())
    assert saved["validation"]["held_out"] == "random characters"
    assert saved["validation"]["characters"] == 2  # 25% of 8
    assert (out / "omniglot.png").stat().st_size > 1000
    for run in results["runs"]:
        assert [it for it, *_ in run["val_curve"]] == [2, 3]
        assert run["best_iteration"] in (2, 3)
        assert set(run["per_alphabet"]) <= {"Tagalog", "Sanskrit"}
        assert set(run["within_alphabet"]) == {"accuracy", "ci95", "per_alphabet"}
        # Within-alphabet 5-way episodes exist only in alphabets of >= 5 classes: both here.
        assert sum(a["episodes"] for a in run["within_alphabet"]["per_alphabet"].values()) == 3
    assert "within-alphabet" in saved["table"] and "Tagalog" in saved["per_alphabet_table"]


def test_untrained_run_tests_the_initialization_and_draws_no_empty_plot(tmp_path):
    fake_set(tmp_path, SMALL1, {"Greek": 4, "Balinese": 4})
    fake_set(tmp_path, SMALL2, {"Tagalog": 5})
    out = tmp_path / "out"
    results = omniglot.main(
        ["--data", str(tmp_path), "--cache", str(tmp_path / "c"), "--ways", "5", "--shots", "1"]
        + ["--iterations", "0", "--methods", "maml", "--eval-episodes", "3", "--no-memory"]
        + ["--val-fraction", "0.25"]
        + ["--out", str(out)]
    )
    assert [run["method"] for run in results["runs"]] == ["maml"]
    assert 0 <= results["runs"][0]["accuracy"] <= 100
    assert (out / "omniglot.json").is_file() and not (out / "omniglot.png").exists()


@pytest.mark.parametrize("method", ["metasgd", "reptile"])
def test_checkpoint_loads_with_weights_only_and_evaluates_alike(tmp_path, method):
    fake_set(tmp_path, SMALL1, {"Greek": 3})
    fake_set(tmp_path, SMALL2, {"Tagalog": 2})
    common = ["--data", str(tmp_path), "--cache", str(tmp_path / "c"), "--eval-episodes", "3"]
    ckpt = tmp_path / "ckpt.pt"
    trained = omniglot.main(
        [*common, "--ways", "5", "--shots", "1", "--methods", method, "--iterations", "2"]
        + ["--meta-batch", "1", "--val-every", "1", "--val-episodes", "2", "--save", str(ckpt)]
        + ["--timing-rounds", "1", "--no-memory", "--out", str(tmp_path / "out")]
    )
    blob = torch.load(ckpt, weights_only=True)
    assert set(blob) == {"model", "metasgd", "config"}
    assert blob["config"]["method"] == method and blob["config"]["ways"] == 5
    assert trained["runs"][0]["steps"] == (5 if method == "reptile" else 1)
    assert trained["runs"][0]["ms_per_iteration"] > 0
    assert blob["config"]["train_set"] == [SMALL1]
    common += ["--load", str(ckpt), "--eval-only", "--out", str(tmp_path / "eval")]
    loaded = omniglot.main(common)
    # Same (best) weights, step sizes and test episodes: the same accuracy.
    assert loaded["runs"][0]["accuracy"] == pytest.approx(trained["runs"][0]["accuracy"])
    assert loaded["split"] == trained["split"]
    more = omniglot.main([*common, "--test-steps", "3", "--overwrite"])
    assert more["config"]["test_steps"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_trains_saves_and_reloads_on_the_device(tmp_path):
    fake_set(tmp_path, SMALL1, {"Greek": 3})
    fake_set(tmp_path, SMALL2, {"Tagalog": 2})
    common = ["--data", str(tmp_path), "--cache", str(tmp_path / "c"), "--eval-episodes", "3"]
    common += ["--device", "cuda"]
    ckpt = tmp_path / "ckpt.pt"
    trained = omniglot.main(
        [*common, "--ways", "5", "--shots", "1", "--methods", "metasgd", "--iterations", "2"]
        + ["--meta-batch", "2", "--augment", "--val-every", "1", "--val-episodes", "2"]
        + ["--save", str(ckpt), "--out", str(tmp_path / "out")]
    )
    loaded = omniglot.main(
        [*common, "--load", str(ckpt), "--eval-only", "--out", str(tmp_path / "e")]
    )
    assert loaded["runs"][0]["accuracy"] == pytest.approx(trained["runs"][0]["accuracy"])


def test_help_shows_every_default():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "omniglot.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for option in ("--eval-only", "--data", "--download", "--val-fraction", "--augment"):
        assert option in out.stdout
    text = " ".join(out.stdout.split())  # argparse wraps to the terminal's width
    assert "(default: 2000)" in text and "(default: 0.15)" in text


def test_missing_data_exits_with_the_instructions_not_a_traceback(tmp_path):
    script = str(BENCHMARKS / "omniglot.py")
    out = subprocess.run(
        [sys.executable, script, "--data", str(tmp_path / "none"), "--quick"]
        + ["--out", str(tmp_path / "out")],  # not the working folder's results/omniglot_quick
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "--download" in out.stderr and "brendenlake/omniglot" in out.stderr


def test_plot_explains_its_colours_and_marks_a_diverged_run(tmp_path, monkeypatch):
    import matplotlib.text

    model = omniglot.make_model(5)
    opt = _common.inner_optimizer("metasgd", model, 0.4, seed=0)
    nan_sizes = {
        name: dict.fromkeys(("mean", "min", "max"), float("nan"))
        for name in omniglot.step_size_summary(model, opt)
    }
    runs = [
        {"method": "maml", "ways": 5, "shots": 1, "curve": [(10, 1.5), (20, 1.2)]}
        | {"val_curve": [(10, 40.0, 2.0), (20, 45.0, 2.0)], "best_iteration": 20}
        | {"best_val_accuracy": 45.0},
        {"method": "metasgd", "ways": 5, "shots": 1, "curve": [(10, float("nan"))]}
        | {"step_sizes": nan_sizes},
    ]
    texts: list[str] = []
    save = omniglot.save_figure

    def spy(fig, path, **kwargs):
        save(fig, path, **kwargs)
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))

    monkeypatch.setattr(omniglot, "save_figure", spy)
    omniglot.plot({"runs": runs}, tmp_path / "o.png")
    assert (tmp_path / "o.png").stat().st_size > 1000
    assert "Meta-SGD 5-way 1-shot (NaN: diverged)" in texts and "MAML 5-way 1-shot" in texts
    assert "the checkpoint kept (best validation accuracy), tested" in texts
    assert "Meta-SGD's step sizes are NaN: its training diverged" in texts
    assert {"conv 1 weight", "batch norm 4 bias", "linear weight"} <= set(texts)
