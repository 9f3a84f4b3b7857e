"""The literature's statically binarised MNIST (``--dataset binarized-mnist``): the .amat reader against
hand-written files, every malformed case, the splits, the download against a local file:// folder
(cut-off and offline transfers leave no file), and that the data are never resampled."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from conftest import cli

from pyrovae import TrainConfig, load_dataset
from pyrovae.data import DataError, download_binarized_mnist, read_amat


def amat_text(images: np.ndarray) -> str:
    return "".join(" ".join(str(int(v)) for v in row) + "\n" for row in images)


def images(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 784)) < 0.2).astype(np.uint8)


def write(path, text: str | bytes):
    data = text.encode() if isinstance(text, str) else text
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def amat_dir(tmp_path):
    """binarized_mnist_{train,valid,test}.amat with 30/12/8 images: train gzipped, the others plain."""
    d = tmp_path / "bm"
    d.mkdir()
    for name, n, suffix in (("train", 30, ".amat.gz"), ("valid", 12, ".amat"), ("test", 8, ".amat")):
        write(d / f"binarized_mnist_{name}{suffix}", amat_text(images(n, seed=len(name))))
    return d


@pytest.mark.parametrize("suffix", [".amat", ".amat.gz"])
def test_the_reader_gives_the_files_values_plain_or_gzipped(tmp_path, suffix):
    x = images(5)
    got = read_amat(write(tmp_path / f"f{suffix}", amat_text(x)))
    assert got.dtype == torch.float32 and got.shape == (5, 784)
    assert torch.equal(got, torch.from_numpy(x).float())


def test_other_whitespace_takes_the_line_by_line_path_to_the_same_values(tmp_path):
    x = images(4)
    text = "".join("  " + "\t".join(str(int(v)) for v in row) + " \r\n" for row in x) + "\n\n"
    assert torch.equal(read_amat(write(tmp_path / "w.amat", text)), torch.from_numpy(x).float())


def _lines(n=4):
    return amat_text(images(n)).splitlines(keepends=True)


@pytest.mark.parametrize("damage, words", [
    (lambda ls: ls[:2] + [ls[2].replace("0 ", "", 1)] + ls[3:], "line 3 holds 783 values, expected 784"),
    (lambda ls: ls[:1] + ["2" + ls[1][1:]] + ls[2:], "line 2 holds the value '2'"),
    (lambda ls: ls[:3] + [ls[3][:-2] + "0.5\n"], "line 4 holds the value '0.5'"),
    (lambda ls: ls[:1] + [ls[1][:-1] + " 1\n"] + ls[2:], "line 2 holds 785 values"),
    (lambda ls: [], "holds no images"),
])
def test_a_malformed_line_is_named_by_its_number(tmp_path, damage, words):
    path = write(tmp_path / "bad.amat", "".join(damage(_lines())))
    with pytest.raises(DataError) as e:
        read_amat(path)
    assert str(bad := e.value).startswith(str(path)) and words in str(bad), str(bad)


def test_a_truncated_gzip_is_named(tmp_path):
    whole = gzip.compress(amat_text(images(20)).encode())
    path = tmp_path / "cut.amat.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="gzip stream ends early"):
        read_amat(path)
    path.write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_amat(path)


def test_splits_are_the_three_files(amat_dir):
    sizes = {s: len(load_dataset("binarized-mnist", s, data_dir=amat_dir)) for s in ("train", "val", "test")}
    assert sizes == {"train": 30, "val": 12, "test": 8}
    val = load_dataset("binarized-mnist", "val", data_dir=amat_dir)
    assert val.image_shape == (28, 28) and val.labels is None
    assert torch.equal(val.images, torch.from_numpy(images(12, seed=5)).float())
    assert len(load_dataset("binarized-mnist", "all", data_dir=amat_dir)) == 42
    (amat_dir / "binarized_mnist_test.amat").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("binarized-mnist", "test", data_dir=amat_dir)
    assert "binarized_mnist_test.amat" in str(e.value) and "--download" in str(e.value)


def test_the_data_are_never_resampled_and_the_user_is_told(amat_dir, tmp_path, capsys):
    assert TrainConfig(dataset="binarized-mnist").resolved().binarize == "none"
    assert TrainConfig(dataset="binarized-mnist", binarize="dynamic").resolved().binarize == "none"
    code, _, err = cli(capsys, "train", "--dataset", "binarized-mnist", "--data-dir", str(amat_dir), "--binarize",
                       "dynamic", "--hidden-dims", "8", "--latent-dim", "2", "--epochs", "1", "--batch-size", "10",
                       "--out", str(tmp_path / "runs"), "--name", "r", "--quiet", "--no-tensorboard")
    assert code == 0, err
    assert "binary already" in err and "not resampled" in err
    stored = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert stored["binarize"] == "none"


def test_a_missing_file_ends_training_in_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--dataset", "binarized-mnist", "--data-dir", str(tmp_path / "none"),
                       "--out", str(tmp_path / "runs"), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "binarized_mnist_train.amat" in err and "--download" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def _published_size_file(folder, name, lines):
    """A canonical .amat of ``lines`` images (a published file's exact size), written fast."""
    row = amat_text(images(1)).encode()
    (folder / name).write_bytes(row * lines)


def test_download_fetches_checks_and_renames(tmp_path):
    src, dest = tmp_path / "mirror", tmp_path / "data"
    src.mkdir()
    _published_size_file(src, "binarized_mnist_valid.amat", 10_000)
    download_binarized_mnist(dest, base_url=src.as_uri(), splits=("val",), progress=False)
    assert (dest / "binarized_mnist_valid.amat").stat().st_size == 15_680_000
    assert sorted(p.name for p in dest.iterdir()) == ["binarized_mnist_valid.amat"]  # no temporary file left
    assert len(load_dataset("binarized-mnist", "val", data_dir=dest)) == 10_000


def test_a_cut_off_transfer_leaves_no_file(tmp_path):
    src, dest = tmp_path / "mirror", tmp_path / "data"
    src.mkdir()
    _published_size_file(src, "binarized_mnist_valid.amat", 6_000)  # stops early: 9,408,000 of 15,680,000 bytes
    with pytest.raises(DataError, match="stopped at 9,408,000 of 15,680,000 bytes"):
        download_binarized_mnist(dest, base_url=src.as_uri(), splits=("val",), progress=False)
    assert list(dest.iterdir()) == []


def test_download_offline_is_one_line_exit_2_and_no_file(tmp_path, capsys, monkeypatch):
    # nothing listens on the discard port of this machine: the connection is refused at once
    monkeypatch.setenv("PYROVAE_BINARIZED_MNIST_URL", "http://127.0.0.1:9/")
    code, _, err = cli(capsys, "train", "--dataset", "binarized-mnist", "--download", "--data-dir",
                       str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--download of binarized_mnist_train.amat" in err and "by hand" in err
    assert not list((tmp_path / "data").iterdir())
