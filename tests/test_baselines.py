"""The baselines of the notes (deterministic autoencoder, PCA) behind the same commands as the VAE:
train, evaluate, sample, reconstruct and interpolate give what their maths says."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli
from PIL import Image

from pyrovae import load_dataset, load_run
from pyrovae.cli import main
from pyrovae.data import static_binarized
from pyrovae.marginal import isolated_params
from pyrovae.pictures import interpolation


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-D autoencoder (4 epochs) and 2- and 10-component PCAs on mnist5k, trained by the CLI."""
    out = tmp_path_factory.mktemp("runs")
    for name, args in {
        "ae": ["--model", "ae", "--latent-dim", "2", "--hidden-dims", "32", "--epochs", "4"],
        "pca2": ["--model", "pca", "--latent-dim", "2"],
        "pca10": ["--model", "pca", "--latent-dim", "10"],
    }.items():
        assert main(["train", *args, "--out", str(out), "--name", name, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def binary_splits():
    return {s: static_binarized(load_dataset("mnist5k", s)) for s in ("train", "test")}


def evaluate_json(capsys, run, tmp_path):
    path = tmp_path / f"{run.name}.json"
    code, out, err = cli(capsys, "evaluate", str(run), "--json", str(path), "--quiet")
    assert code == 0, err
    return json.loads(path.read_text())


def test_evaluate_pca_matches_sklearn_and_improves_with_components(capsys, runs, binary_splits, tmp_path):
    from sklearn.decomposition import PCA

    train, test = binary_splits["train"], binary_splits["test"]
    reports = {d: evaluate_json(capsys, runs / f"pca{d}", tmp_path) for d in (2, 10)}
    for d, report in reports.items():
        pca = PCA(n_components=d, random_state=0).fit(train.images.double().numpy())
        xhat = torch.from_numpy(pca.inverse_transform(pca.transform(test.images.double().numpy()))).clamp(0, 1)
        assert report["mse"] == pytest.approx(float(((xhat - test.images) ** 2).mean()), rel=1e-4)
    assert reports[10]["mse"] < reports[2]["mse"] and reports[10]["bce"] < reports[2]["bce"]
    mean_image_mse = float(((train.images.mean(0) - test.images) ** 2).mean())
    assert reports[2]["mse"] < mean_image_mse  # two components already beat the mean image


def test_evaluate_autoencoder_scores_its_reconstruction(capsys, runs, binary_splits, tmp_path, monkeypatch):
    import pyrovae.plots

    maps = []
    real = pyrovae.plots.plot_latent_2d
    monkeypatch.setattr(pyrovae.plots, "plot_latent_2d",
                        lambda *a, **k: maps.append(k) or real(*a, **k))
    report = evaluate_json(capsys, runs / "ae", tmp_path)
    # its score is the Bernoulli log-likelihood of the reconstruction: minus the BCE, by another code path
    assert report["elbo"] == pytest.approx(-report["bce"], rel=1e-3)
    assert "kl" not in report and "iwae" not in report  # no q(z|x) density: no bound to estimate
    test = binary_splits["test"]
    assert report["mse"] < float(((binary_splits["train"].images.mean(0) - test.images) ** 2).mean())
    # the latent map has no prior ellipse: the autoencoder never saw its prior
    assert len(maps) == 1 and maps[0]["mixture"] is None


def test_samples_come_from_the_gaussian_fitted_to_training_codes(runs, binary_splits):
    train = binary_splits["train"].images
    ae = load_run(runs / "ae").model
    pca = load_run(runs / "pca2").model
    torch.manual_seed(0)
    with torch.no_grad(), isolated_params():
        codes = ae.encode(train).double()
        assert torch.allclose(ae.code_loc.double(), codes.mean(0), atol=1e-3 * codes.std())
        cov = ae.code_scale_tril.double() @ ae.code_scale_tril.double().T
        assert torch.allclose(cov, torch.cov(codes.T), rtol=1e-3, atol=1e-3 * codes.var(0).mean())
        drawn = ae.sample_codes(20000).double()
        assert torch.allclose(drawn.mean(0), codes.mean(0), atol=0.05 * float(codes.std(0).max()))
        pca_codes = pca.encode(train).double()
        drawn = pca.sample_codes(20000).double()
        assert torch.allclose(drawn.var(0), pca_codes.var(0), rtol=0.05)
        assert pca_codes.mean(0).abs().max() < 1e-4  # PCA codes are centred: N(0, diag lambda) fits them


def test_pca_interpolation_is_linear_between_reconstructions(runs, binary_splits):
    test = binary_splits["test"].images
    pca = load_run(runs / "pca2").model
    xa, xb = test[0], test[-1]
    images, codes = interpolation(pca, xa, xb, steps=5)
    assert torch.allclose(codes[0], pca.encode(xa[None])[0], atol=1e-5)
    assert torch.allclose(codes[-1], pca.encode(xb[None])[0], atol=1e-5)
    assert torch.allclose(codes[2], 0.5 * (codes[0] + codes[-1]), atol=1e-5)
    # a linear decoder: the midpoint image is the average of the endpoint images (where nothing was clipped)
    raw = codes @ pca.components + pca.mean
    inside = ((raw > 0) & (raw < 1)).all(0)
    assert inside.sum() > 100
    assert torch.allclose(images[2][inside], 0.5 * (images[0] + images[-1])[inside], atol=1e-5)


@pytest.mark.parametrize("run", ["ae", "pca2"])
def test_picture_commands_on_baselines(capsys, runs, run):
    d = runs / run
    for args, png, size in [
        (["sample", "--num-images", "9"], "samples.png", (3 * 30 + 2, 3 * 30 + 2)),
        (["reconstruct", "--num-images", "4"], "reconstructions.png", (4 * 30 + 2, 2 * 30 + 2)),
        (["interpolate", "--pair", "0", "499", "--steps", "5"], "interpolate-0-499.png", (7 * 30 + 2, 30 + 2)),
    ]:
        code, _, err = cli(capsys, args[0], str(d), *args[1:])
        assert code == 0, err
        with Image.open(d / png) as im:
            assert im.size == size
    code, _, err = cli(capsys, "sample", str(d), "--by-component")
    assert code == 2 and "no prior with components" in err


def test_mnist5k_is_parsed_once_and_never_shared():
    a = load_dataset("mnist5k", "all")
    a.images.fill_(7.0)
    b = load_dataset("mnist5k", "all")
    assert float(b.images.max()) == 1.0 and b.images.shape == (5000, 784)
