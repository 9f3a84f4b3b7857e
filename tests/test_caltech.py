"""Caltech 101 Silhouettes (``--dataset caltech101-silhouettes``) against small .mat files written here: the
column-major layout and 1 - x, a missing split in one line, the download from a file:// folder, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cli
from scipy.io import savemat

from pyrovae import load_dataset
from pyrovae.caltech import FILE, download_caltech101_silhouettes
from pyrovae.data import DataError
from pyrovae.datasets import DATASETS


def upright_images(n: int, seed: int) -> np.ndarray:
    """n 28x28 0/1 images, shape 1 on 0, each with an L (a bar down the left, one along the bottom) that
    tells up from down and left from right, plus noise."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 28, 28)) < 0.1).astype(np.uint8)
    x[:, 2:20, 3] = 1
    x[:, 19, 3:15] = 1
    return x


def as_published(x: np.ndarray) -> np.ndarray:
    """The published file's rows: each image column-major, the shape 0 on a 1 background."""
    return (1 - x).transpose(0, 2, 1).reshape(x.shape[0], 784).astype(np.uint8)


def write_mat(folder, splits=("train", "val", "test"), sizes=(30, 12, 8)):
    folder.mkdir(parents=True, exist_ok=True)
    keys = {"train": "train", "val": "val", "test": "test"}
    content, upright = {}, {}
    for split, n in zip(("train", "val", "test"), sizes):
        if split not in splits:
            continue
        x = upright_images(n, seed=n)
        upright[split] = x
        content[f"{keys[split]}_data"] = as_published(x)
        content[f"{keys[split]}_labels"] = (np.arange(n) % 101 + 1).reshape(n, 1).astype(np.uint8)
    savemat(folder / FILE, content)
    return upright


def test_the_images_are_read_upright_with_the_shape_at_1_and_labels_from_0(tmp_path):
    upright = write_mat(tmp_path / "c")
    for split, n in (("train", 30), ("val", 12), ("test", 8)):
        ds = load_dataset("caltech101-silhouettes", split, data_dir=tmp_path / "c")
        assert ds.images.shape == (n, 784) and ds.image_shape == (28, 28)
        assert torch.equal(ds.images, torch.from_numpy(upright[split].reshape(n, 784)).float())
        assert ds.labels.tolist() == [i % 101 for i in range(n)]
    img = load_dataset("caltech101-silhouettes", "train", data_dir=tmp_path / "c").images[0].reshape(28, 28)
    assert img[2:20, 3].eq(1).all() and img[19, 3:15].eq(1).all()  # the L, not its transpose
    assert len(load_dataset("caltech101-silhouettes", "all", data_dir=tmp_path / "c")) == 42


def test_a_missing_split_is_one_line_naming_it(tmp_path, capsys):
    write_mat(tmp_path / "c", splits=("train", "val"))
    with pytest.raises(DataError, match="holds no test split"):
        load_dataset("caltech101-silhouettes", "test", data_dir=tmp_path / "c")
    code, _, err = cli(capsys, "train", "--dataset", "caltech101-silhouettes", "--data-dir", str(tmp_path / "c"),
                       "--hidden-dims", "8", "--latent-dim", "2", "--epochs", "1", "--out", str(tmp_path / "runs"),
                       "--quiet", "--no-tensorboard")
    assert code == 0, err  # trains and scores validation; the missing test split is one plain line
    assert sum("no test-split score" in line and "holds no test split" in line for line in err.splitlines()) == 1


def test_a_missing_file_and_a_foreign_file_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{FILE} not found.*--download"):
        load_dataset("caltech101-silhouettes", "train", data_dir=tmp_path)
    (tmp_path / FILE).write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match="not a MATLAB file"):
        load_dataset("caltech101-silhouettes", "train", data_dir=tmp_path)


def test_download_from_a_folder_checks_the_content_and_keeps_nothing_foreign(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    write_mat(mirror)
    download_caltech101_silhouettes(tmp_path / "data", base_url=mirror.as_uri(), progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [FILE]
    assert len(load_dataset("caltech101-silhouettes", "test", data_dir=tmp_path / "data")) == 8
    partial = tmp_path / "partial"
    write_mat(partial, splits=("train",))
    with pytest.raises(DataError, match="not the published one"):
        download_caltech101_silhouettes(tmp_path / "d2", base_url=str(partial), progress=False)
    assert list((tmp_path / "d2").iterdir()) == []


def test_the_command_line_downloads_it_and_never_resamples_it(tmp_path, capsys, monkeypatch):
    mirror = tmp_path / "mirror"
    write_mat(mirror)
    monkeypatch.setenv(DATASETS["caltech101-silhouettes"].url_variable, mirror.as_uri())
    code, out, err = cli(capsys, "train", "--dataset", "caltech101-silhouettes", "--download", "--data-dir",
                         str(tmp_path / "data"), "--hidden-dims", "8", "--latent-dim", "2", "--epochs", "2",
                         "--out", str(tmp_path / "runs"), "--name", "c", "--quiet", "--no-tensorboard")
    assert code == 0, err
    assert "test ELBO" in out
    from pyrovae.config import TrainConfig

    assert TrainConfig.load(tmp_path / "runs" / "c" / "config.json").resolved().binarize == "none"
