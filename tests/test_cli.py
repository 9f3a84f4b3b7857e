"""Every command runs; every bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cli, run_cli
from PIL import Image

from pyrovae.cli import main


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A tiny 784-pixel run (one epoch on mnist5k) shared by the tests here."""
    out = tmp_path_factory.mktemp("runs")
    code = main(["train", "--epochs", "1", "--hidden-dims", "32", "--latent-dim", "2", "--prior", "mog",
                 "--prior-components", "3", "--out", str(out), "--name", "m", "--quiet"])
    assert code == 0
    return out / "m"


def test_train_prints_run_directory_and_test_elbo(capsys, tmp_path):
    code, out, err = cli(capsys, "train", "--dataset", "digits", "--epochs", "2", "--hidden-dims", "16",
                         "--latent-dim", "2", "--out", str(tmp_path), "--name", "d", "--quiet")
    assert code == 0, err
    assert f"run: {tmp_path / 'd'}" in out and "test ELBO" in out
    assert json.loads((tmp_path / "d" / "config.json").read_text())["hidden_dims"] == [16]


def test_evaluate_prints_table_and_writes_json(capsys, mnist_run, tmp_path):
    code, out, err = cli(capsys, "evaluate", str(mnist_run), "--num-samples", "20", "--json",
                         str(tmp_path / "r.json"), "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("elbo", "iwae", "log_px", "log_px_se", "kl", "recon", "pareto_k", "active_units", "components"):
        assert key in report, key
    assert report["num_examples"] == 500 and report["num_samples"] == 20
    assert "IWAE bound, K=20" in out and "active units" in out
    assert (mnist_run / "latent-test.png").is_file()  # latent_dim 2: the map with the components' ellipses


def test_evaluate_on_a_folder_holding_only_the_t10k_files(capsys, mnist_run, idx_dir):
    code, out, err = cli(capsys, "evaluate", str(mnist_run), "--dataset", "mnist", "--data-dir", str(idx_dir),
                         "--split", "test", "--num-samples", "10", "--quiet")
    assert code == 0, err
    assert "examples" in out and " 60" in out


@pytest.mark.parametrize("args, png, size", [
    (["sample", "--num-images", "16"], "samples.png", (4 * 30 + 2, 4 * 30 + 2)),
    (["sample", "--by-component", "--components", "3", "--num-images", "12"], "samples-by-component.png",
     (4 * 30 + 2, 3 * 30 + 2)),
    (["reconstruct", "--num-images", "5"], "reconstructions.png", (5 * 30 + 2, 2 * 30 + 2)),
    (["interpolate", "--pair", "0", "7", "--steps", "6"], "interpolate-0-7.png", (8 * 30 + 2, 30 + 2)),
])
def test_picture_commands(capsys, mnist_run, args, png, size):
    code, out, err = cli(capsys, args[0], str(mnist_run), *args[1:])
    assert code == 0, err
    with Image.open(mnist_run / png) as im:
        assert im.size == size  # 28x28 images with 2-pixel padding


@pytest.mark.parametrize("command", ["train", "evaluate", "sample", "reconstruct", "interpolate"])
def test_help(capsys, command):
    code, out, _ = cli(capsys, command, "--help")
    assert code == 0 and "usage: pyrovae" in out and "--debug" in out


def test_help_from_a_fresh_process():
    r = run_cli("--help", timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "evaluate" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "nosuch"], "unknown dataset 'nosuch'"),
    (["train", "--dataset", "mnist", "--data-dir", "/nonexistent"], "train-images-idx3-ubyte.gz"),
    (["train", "--prior", "mog", "--prior-components", "0"], "--prior-components must be at least 1"),
    (["train", "--epochs", "0"], "--epochs must be at least 1"),
    (["train", "--epochs", "ten"], "--epochs: expected a whole number, got 'ten'"),
    (["train", "--hidden-dims", "4x"], "comma-separated sizes"),
    (["train", "--prior", "vamp", "--prior-init", "kmeans"], "--prior-init kmeans does not apply to --prior vamp"),
    (["train", "--dataset", "digits", "--prior", "vamp", "--prior-components", "5000"],
     "needs 5000 distinct training images, the training split has 1437"),
    (["train", "--dataset", "digits", "--prior", "mog", "--prior-init", "kmeans", "--prior-components", "2000"],
     "needs at least 2000 training examples"),
    (["train", "--device", "cuda"], None),  # only an error where there is no GPU
    (["evaluate", "/nonexistent/run"], "no such run directory"),
    (["sample", "/nonexistent/run"], "no such run directory"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, message):
    import torch

    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out, err = cli(capsys, *args, "--out", str(tmp_path)) if args[0] == "train" else cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyrovae")
    if message:
        assert message in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_checkpoint_and_wrong_shape_data(capsys, mnist_run, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = cli(capsys, "evaluate", str(bad))
    assert code == 2 and "not a pyrovae checkpoint: it is truncated" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "evaluate", str(mnist_run), "--dataset", "digits")
    assert code == 2 and "64 values per example but the run was trained on 784" in err
    np.save(tmp_path / "nan.npy", np.full((20, 784), np.nan))
    code, _, err = cli(capsys, "evaluate", str(mnist_run), "--dataset", str(tmp_path / "nan.npy"))
    assert code == 2 and "NaN or infinite" in err


def test_resume_refuses_changed_settings_and_existing_names(capsys, mnist_run):
    before = (mnist_run / "last.pt").read_bytes()
    code, _, err = cli(capsys, "train", "--resume", str(mnist_run), "--lr", "0.1")
    assert code == 2 and "--lr cannot change when resuming" in err
    code, _, err = cli(capsys, "train", "--out", str(mnist_run.parent), "--name", "m", "--epochs", "1")
    assert code == 2 and "already exists" in err
    assert (mnist_run / "last.pt").read_bytes() == before


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError):
        main(["train", "--epochs", "0", "--debug"])
