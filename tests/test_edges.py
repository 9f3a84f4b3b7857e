"""The edges of the suite: exit codes through main(), the k-hat warning on a proposal known to be
bad, the report's relations, pictures decoded and read, and settings no other test trains with."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import cli, interrupted_at
from PIL import Image

import pyrovae.marginal as marginal
from pyrovae import TrainConfig, estimate_log_px, load_run, train
from pyrovae.runs import load_checkpoint, read_metrics, save_checkpoint
from pyrovae.training import prepare_data, train_or_reuse

TINY = ["--dataset", "digits", "--hidden-dims", "16", "--latent-dim", "3", "--quiet", "--no-tensorboard"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("edges")
    train(TrainConfig(dataset="digits", hidden_dims=(32,), latent_dim=4, epochs=3, out=str(out), name="r",
                      prior="mog", prior_components=4, prior_init="random", no_tensorboard=True), progress=False)
    return out / "r"


# --- exit codes through main() --------------------------------------------------------------------------


def test_a_checkpoint_of_another_architecture_is_one_line_and_exit_2(capsys, run, tmp_path):
    import shutil

    d = tmp_path / "other"
    shutil.copytree(run, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "hidden_dims": [48]}))
    code, _, err = cli(capsys, "evaluate", str(d), "--num-samples", "5", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "do not match the architecture" in err


# --- the k-hat warning and the ESS ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow_run(tmp_path_factory):
    """A linear-Gaussian run whose proposal q(z|x) is made far narrower than its posterior."""
    out = tmp_path_factory.mktemp("narrow")
    result = train(TrainConfig(dataset="digits", binarize="none", likelihood="gaussian", hidden_dims=(), latent_dim=3,
                               epochs=5, out=str(out), name="n", no_tensorboard=True), progress=False)
    import shutil

    shutil.copytree(result.run_dir, out / "fitted")  # the proposal as trained
    state = load_checkpoint(result.run_dir / "best.pt")
    bias = state["model"]["encoder.net.0.bias"]
    bias[3:] -= 3.0  # every posterior scale divided by e^3
    save_checkpoint(state, result.run_dir / "best.pt")
    return result.run_dir


def test_a_proposal_much_narrower_than_the_posterior_gives_k_hat_above_0_7_and_the_warning(capsys, narrow_run,
                                                                                            tmp_path):
    reports = {}
    for name, d in (("fitted", narrow_run.parent / "fitted"), ("narrow", narrow_run)):
        code, out, err = cli(capsys, "evaluate", str(d), "--num-samples", "200", "--quiet", "--json",
                             str(tmp_path / f"{name}.json"))
        assert code == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    narrow, fitted = reports["narrow"], reports["fitted"]
    assert "warning:" in err and "Pareto k-hat > 0.7" in err
    assert narrow["pareto_k"]["mean"] > 0.85 and narrow["pareto_k"]["frac_above_0.7"] > 0.7
    assert narrow["pareto_k"]["frac_above_0.7"] > fitted["pareto_k"]["frac_above_0.7"] + 0.2
    assert narrow["exact_log_px"] - narrow["log_px"] > 1.0  # its estimates are indeed far below the exact value


def test_ess_is_computed_from_the_very_log_weights_the_estimate_used(monkeypatch, narrow_run):
    model = load_run(narrow_run).model
    x = prepare_data(load_run(narrow_run).config, "test", "cpu").images[:6]
    seen = []
    score = marginal.score_traces

    def spy(*args):
        terms = score(*args)
        seen.append((terms["log_lik"] + terms["log_prior"] - terms["log_q"]).double())
        return terms

    monkeypatch.setattr(marginal, "score_traces", spy)
    est = estimate_log_px(model, x, 50, seed=3, chunk_size=60, batch_size=6)
    log_w = torch.cat(seen)  # (K, B), chunk after chunk
    w = (log_w - log_w.max(0).values).exp()
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    assert torch.allclose(est.ess, ess, rtol=1e-9)
    assert bool((est.ess >= 1).all()) and bool((est.ess <= 50).all()) and float(est.ess.min()) < 10


# --- the report's relations -----------------------------------------------------------------------------


def test_the_evaluate_report_holds_its_relations(capsys, run, tmp_path):
    code, _, err = cli(capsys, "evaluate", str(run), "--num-samples", "30", "--quiet", "--json",
                       str(tmp_path / "r.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["iwae"] == r["log_px"] == r["is_log_px"]
    assert r["log_px"] >= r["elbo"]
    assert r["elbo"] == pytest.approx(r["recon"] - r["kl"], abs=1e-6)
    assert 1 <= r["ess"]["min"] <= r["ess"]["mean"] <= r["num_samples"]
    assert 0 <= r["active_units"] <= r["latent_dim"] == 4
    assert 0 <= r["pareto_k"]["frac_above_0.7"] <= 1


# --- pictures, decoded ---------------------------------------------------------------------------------------


def _cells(png, rows, cols, side=8, pad=2):
    """The image grid's cells as (rows, cols, side, side) grey values in [0, 1]."""
    a = np.asarray(Image.open(png).convert("L"), dtype=np.float64) / 255
    cells = np.empty((rows, cols, side, side))
    for i in range(rows):
        for j in range(cols):
            top, left = pad + i * (side + pad), pad + j * (side + pad)
            cells[i, j] = a[top: top + side, left: left + side]
    return cells


def test_reconstructions_show_the_originals_on_top(capsys, run, tmp_path):
    png = tmp_path / "rec.png"
    code, _, err = cli(capsys, "reconstruct", str(run), "--num-images", "5", "--output", str(png))
    assert code == 0, err
    test = prepare_data(load_run(run).config, "test", "cpu").images[:5].numpy().reshape(5, 8, 8)
    cells = _cells(png, 2, 5)
    assert np.abs(cells[0] - test).max() < 1 / 255 + 1e-9  # the originals, exactly
    model = load_run(run).model
    with torch.no_grad():
        rec = model.decode(model.encode(torch.as_tensor(test.reshape(5, 64), dtype=torch.float32))).numpy()
    assert np.abs(cells[1] - rec.reshape(5, 8, 8)).max() < 1.5 / 255  # their reconstructions below


def test_interpolation_ends_are_the_originals(capsys, run, tmp_path):
    png = tmp_path / "i.png"
    code, _, err = cli(capsys, "interpolate", str(run), "--pair", "0", "3", "--steps", "4", "--output", str(png))
    assert code == 0, err
    test = prepare_data(load_run(run).config, "test", "cpu").images.numpy().reshape(-1, 8, 8)
    cells = _cells(png, 1, 6)[0]
    assert np.abs(cells[0] - test[0]).max() < 1 / 255 + 1e-9 and np.abs(cells[-1] - test[3]).max() < 1 / 255 + 1e-9


def test_sample_rows_are_the_components_heaviest_first(capsys, run, tmp_path):
    png = tmp_path / "c.png"
    code, out, err = cli(capsys, "sample", str(run), "--by-component", "--components", "4", "--num-images", "8",
                         "--output", str(png))
    assert code == 0, err
    order = json.loads(out.split("rows: components ")[1].split(")")[0])
    logits = load_run(run).model.prior.logits.detach()
    assert order == logits.argsort(descending=True).tolist()
    assert _cells(png, 4, 2).shape == (4, 2, 8, 8)


# --- settings that no other test trains with ----------------------------------------------------------------


@pytest.mark.parametrize("flags, check", [
    (["--elbo", "meanfield"], lambda c, rows: c["elbo"] == "meanfield"),
    (["--likelihood", "gaussian", "--likelihood-scale", "pixel"],
     lambda c, rows: c["likelihood_scale"] == "pixel"),
    (["--binarize", "static"], lambda c, rows: c["binarize"] == "static"),
    (["--lr-schedule", "cosine", "--lr", "0.01", "--lr-min", "0.001"],
     lambda c, rows: rows[0]["lr"] == pytest.approx(0.01) and rows[-1]["lr"] < rows[0]["lr"]),
])
def test_settings_train_end_to_end(capsys, tmp_path, flags, check):
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "3", *flags, "--out", str(tmp_path), "--name", "s")
    assert code == 0, err
    rows = read_metrics(tmp_path / "s" / "metrics.jsonl")
    assert check(json.loads((tmp_path / "s" / "config.json").read_text()), rows)
    assert rows[-1]["val_elbo"] > rows[0]["val_elbo"] and all(math.isfinite(r["train_elbo"]) for r in rows)


def test_pixel_scales_are_learned_per_pixel(tmp_path):
    result = train(TrainConfig(dataset="digits", likelihood="gaussian", likelihood_scale="pixel", hidden_dims=(16,),
                               latent_dim=3, epochs=3, out=str(tmp_path), name="p", no_tensorboard=True),
                   progress=False)
    scale = load_run(result.run_dir).model.likelihood.scale.detach()
    assert scale.shape == (64,) and float(scale.std()) > 1e-3  # pixels got scales of their own


def test_resume_may_change_patience_and_device(capsys, tmp_path):
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "2", "--out", str(tmp_path), "--name", "r")
    assert code == 0, err
    code, _, err = cli(capsys, "train", "--resume", str(tmp_path / "r"), "--epochs", "4", "--patience", "1",
                       "--device", "cpu", "--quiet")
    assert code == 0, err
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    assert stored["patience"] == 1 and stored["device"] == "cpu" and stored["epochs"] == 4
    code, _, err = cli(capsys, "train", "--resume", str(tmp_path / "r"), "--latent-dim", "5")
    assert code == 2 and "cannot change when resuming" in err


def test_a_study_continues_an_interrupted_run(tmp_path, monkeypatch):
    """train_or_reuse's three answers: trained, then (after an interruption) resumed, then reused."""

    config = TrainConfig(dataset="digits", hidden_dims=(16,), latent_dim=3, epochs=3, out=str(tmp_path), name="s",
                         no_tensorboard=True)
    with interrupted_at(2):
        train_or_reuse(config, progress=False)
    assert train_or_reuse(config, progress=False)[1] == "resumed"
    assert [r["epoch"] for r in read_metrics(tmp_path / "s" / "metrics.jsonl")] == [1, 2, 3]
    assert train_or_reuse(config, progress=False)[1] == "reused"
    with pytest.raises(ValueError, match="other settings"):
        train_or_reuse(TrainConfig(**{**config.to_dict(), "latent_dim": 4}), progress=False)
    # a setting a resume may change (more epochs, a larger --time-limit) continues the finished run
    more = TrainConfig(**{**config.to_dict(), "epochs": 4})
    assert train_or_reuse(more, progress=False)[1] == "resumed"
    assert [r["epoch"] for r in read_metrics(tmp_path / "s" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert train_or_reuse(more, progress=False)[1] == "reused"
    config = more
    # another study's folders, searched in order: the finished run of the same settings is taken,
    # whatever its name; a run of other settings there is not
    elsewhere = TrainConfig(**{**config.to_dict(), "out": str(tmp_path / "other"), "name": "t"})
    assert train_or_reuse(elsewhere, progress=False, reuse_from=[tmp_path / "none", tmp_path]) == (
        tmp_path / "s", "reused")
    fewer = TrainConfig(**{**elsewhere.to_dict(), "epochs": 2})
    assert train_or_reuse(fewer, progress=False, reuse_from=[tmp_path])[1] == "trained"
