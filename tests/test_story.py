"""experiments/story.py: its measurements do what their docstrings say, and --quick runs end to end."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from conftest import load_experiment

from pyrovae import TrainConfig
from pyrovae.model import build_model


@pytest.fixture(scope="module")
def story():
    module = load_experiment("story")
    yield module
    sys.modules.pop(module.__name__, None)


def test_pairs_have_different_labels_and_are_reproducible(story):
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    pairs = story.choose_pairs(labels, 12, seed=3)
    assert len(set(pairs)) == 12 and len({frozenset(p) for p in pairs}) == 12
    assert all(labels[i] != labels[j] for i, j in pairs)
    assert pairs == story.choose_pairs(labels, 12, seed=3) != story.choose_pairs(labels, 12, seed=4)


@torch.no_grad()
def test_latent_grid_is_equal_probability_through_the_code_gaussian(story):
    n = 9
    vae = build_model(TrainConfig(latent_dim=2, hidden_dims=(8,)).resolved(), data_dim=16)
    images, codes = story.latent_grid(vae, n)
    assert images.shape == (n * n, 16) and codes.shape == (n * n, 2)
    u = (torch.arange(n) + 0.5) / n
    g = torch.distributions.Normal(0.0, 1.0).icdf(u)
    # row-major from the top left: z1 grows along a row, z2 falls down the rows
    assert torch.allclose(codes[:n, 0], g, atol=1e-6) and torch.allclose(codes[::n, 1], g.flip(0), atol=1e-6)
    # equal probability: the prior's CDF maps the codes of a row back to the cell centres (i + 1/2) / n
    assert torch.allclose(torch.distributions.Normal(0.0, 1.0).cdf(codes[:n, 0]), u, atol=1e-6)

    ae = build_model(TrainConfig(model="ae", latent_dim=2, hidden_dims=(8,)).resolved(), data_dim=16)
    L = torch.tensor([[2.0, 0.0], [-1.5, 0.5]])
    ae.code_loc.copy_(torch.tensor([3.0, -7.0]))
    ae.code_scale_tril.copy_(L)
    _, codes = story.latent_grid(ae, n)
    assert torch.allclose(codes.mean(0), ae.code_loc, atol=1e-5)
    # the standard grid's coordinates are independent with equal variance v: cov = v L L^T exactly
    v = float(g.var(unbiased=False))
    cov = torch.cov(codes.T.double(), correction=0)
    assert torch.allclose(cov, v * (L @ L.T).double(), atol=1e-4)


def test_judge_distance_and_confidence(story):
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(40, 16, generator=gen)
    labels = torch.arange(40) % 4
    vae = build_model(TrainConfig(latent_dim=2, hidden_dims=(8,)).resolved(), data_dim=16)
    judge = story.Judge(train, labels, vae, elbo_samples=2, seed=0)
    assert torch.allclose(judge.nearest(train[:5]), torch.zeros(5, dtype=torch.float64), atol=1e-6)
    moved = train[:1] + 0.01  # every pixel 0.01 further than from itself: RMS 0.01 unless another is nearer
    assert float(judge.nearest(moved)) <= 0.01 + 1e-6
    conf = judge.confidence(train)
    assert ((conf >= 0.25) & (conf <= 1)).all()  # max of 4 probabilities
    elbo = judge.elbo(train[:6])
    assert elbo.shape == (6,) and (elbo < 0).all()
    assert torch.equal(elbo, judge.elbo(train[:6]))  # fixed binarisation and noise: the same score twice


def test_verdict_reads_the_sign_and_its_noise(story):
    assert story._verdict(0.3, 0.1).startswith("as predicted (+3.0")
    assert "within noise" in story._verdict(0.1, 0.1)
    assert "not as predicted" in story._verdict(-0.3, 0.1)


@pytest.fixture(scope="module")
def quick_run(story, tmp_path_factory):
    out = tmp_path_factory.mktemp("story")
    assert story.main(["--quick", "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_table_and_figure(story, quick_run):
    out, numbers = quick_run
    report = (out / "report.md").read_text()
    assert "python experiments/story.py --quick --out" in report  # the command that made it
    for heading in ("## 1. Reconstruction against code size", "## 2. Between two codes", "## 3. Far from the codes",
                    "## 4. The map", "## Verdicts"):
        assert heading in report
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert figures == ["reconstruction.png", "interpolation.png", "random_codes.png", "map.png"]
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name).stat().st_size < 150_000
    s = story.StorySettings(**story.QUICK)
    assert len(list((out / "runs").glob("*/best.pt"))) == 3 * len(s.sizes) + 2 + 1  # sweep, 2 deep models, judge
    # PCA: more components, smaller reconstruction error
    rec = numbers["reconstruction"]
    assert rec["pca-d5"]["mse"] < rec["pca-d2"]["mse"] and rec["pca-d5"]["bce"] < rec["pca-d2"]["bce"]
    for name, r in numbers["random_codes"].items():
        assert sum(r["class_counts"]) == s.num_codes, name
        assert 0.1 <= r["confidence"][0] <= 1 and r["judge_elbo"][0] < 0
    for r in numbers["interpolation"].values():
        assert len(r["confidence"]) == s.steps and all(0.1 <= c <= 1 for c, _ in r["confidence"])
    assert 0.5 < numbers["classifier_accuracy"] <= 1


@pytest.mark.slow
def test_a_rerun_reuses_every_run_and_measures_the_same_numbers(story, quick_run):
    out, numbers = quick_run
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/best.pt")}
    assert story.main(["--quick", "--out", str(out), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/best.pt")} == before
    again = json.loads((out / "results.json").read_text())
    for key in ("reconstruction", "interpolation", "random_codes", "map", "calibration"):
        assert again[key] == numbers[key], key


def test_runs_are_reused_continued_or_refused(story, tmp_path):
    config = TrainConfig(model="pca", latent_dim=3, dataset="digits", out=str(tmp_path), name="p")
    best = tmp_path / "p" / "best.pt"
    story._train_or_load(config, retrain=False, progress=False)
    first = best.stat().st_mtime_ns
    run = story._train_or_load(config, retrain=False, progress=False)
    assert best.stat().st_mtime_ns == first and run.model.latent_dim == 3  # reused, not refitted
    with pytest.raises(ValueError, match="latent_dim.*--retrain"):
        story._train_or_load(TrainConfig(**{**config.to_dict(), "latent_dim": 4}), retrain=False, progress=False)
    assert best.stat().st_mtime_ns == first
    story._train_or_load(config, retrain=True, progress=False)
    assert best.stat().st_mtime_ns != first
    # killed before its first checkpoint: started again
    for name in ("best.pt", "last.pt", "summary.json", "elbo.png"):
        (tmp_path / "p" / name).unlink()
    assert story._train_or_load(config, retrain=False, progress=False).model.latent_dim == 3
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a pyrovae run"):
        story._train_or_load(TrainConfig(**{**config.to_dict(), "name": "q"}), retrain=False, progress=False)
    assert (tmp_path / "q" / "notes.txt").read_text() == "mine"


def test_help_explains_the_study(story, capsys):
    with pytest.raises(SystemExit) as e:
        story.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--quick" in text and "--retrain" in text and "report.md" in text
