"""Datasets: splits, binarisation, the IDX reader on files written here, and every bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from conftest import fake_mnist, idx_bytes, write_idx

from pyrovae.data import DataError, binarize, check_likelihood, load_dataset, static_binarized

# --- bundled data -----------------------------------------------------------------------


def test_mnist5k_split_is_stratified_disjoint_and_deterministic():
    splits = {s: load_dataset("mnist5k", s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4000, 500, 500]
    for s in ("val", "test"):
        assert torch.bincount(splits[s].labels).tolist() == [50] * 10
    rows = torch.cat([splits[s].images for s in splits])
    assert torch.unique(rows, dim=0).shape[0] == 5000  # no example in two splits
    again = load_dataset("mnist5k", "test")
    assert torch.equal(again.images, splits["test"].images)
    x = splits["train"].images
    assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_digits_split():
    sizes = [len(load_dataset("digits", s)) for s in ("train", "val", "test")]
    assert sizes == [1437, 180, 180]
    assert load_dataset("digits", "test").image_shape == (8, 8)


def test_static_binarisation_is_fixed_and_dynamic_differs_by_seed():
    ds = load_dataset("digits", "val")
    a, b = static_binarized(ds).images, static_binarized(ds).images
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(binarize(ds.images, 1), binarize(ds.images, 2))
    # binarisation is unbiased: the mean of many draws approaches the grey values
    mean = torch.stack([binarize(ds.images, s) for s in range(200)]).mean(0)
    assert float((mean - ds.images).abs().max()) < 0.15


# --- IDX files ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_idx_reader_round_trip(tmp_path, gz, layout):
    images, labels = fake_mnist(30)
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    ext = ".gz" if gz else ""
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", labels)
    ds = load_dataset("mnist", "test", data_dir=tmp_path)
    assert ds.images.shape == (30, 784) and ds.image_shape == (28, 28)
    assert torch.allclose(ds.images, torch.from_numpy(images.reshape(30, -1) / 255.0).float())
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))


def test_idx_train_and_val_come_from_the_training_file(tmp_path):
    images, labels = fake_mnist(5100)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    train = load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    val = load_dataset("fashion-mnist", "val", data_dir=tmp_path)
    assert len(train) == 100 and len(val) == 5000  # the last 5,000 are validation


def test_missing_idx_file_names_file_folders_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", "test", data_dir=tmp_path)
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg and "--download" in msg


def _write_pair(folder, images_bytes, labels_bytes, gz=True):
    ext = ".gz" if gz else ""
    for name, data in (("t10k-images-idx3-ubyte", images_bytes), ("t10k-labels-idx1-ubyte", labels_bytes)):
        path = folder / (name + ext)
        if gz:
            with gzip.open(path, "wb") as f:
                f.write(data)
        else:
            path.write_bytes(data)


def test_truncated_gzip(tmp_path):
    images, labels = fake_mnist(20)
    _write_pair(tmp_path, idx_bytes(images), idx_bytes(labels))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_corrupt_gzip(tmp_path):
    images, labels = fake_mnist(20)
    _write_pair(tmp_path, idx_bytes(images), idx_bytes(labels))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(DataError, match="not a valid gzip file"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_truncated_idx_body(tmp_path):
    images, labels = fake_mnist(20)
    _write_pair(tmp_path, idx_bytes(images)[:-784 * 3], idx_bytes(labels), gz=False)
    with pytest.raises(DataError, match=r"expected 20 images .* holds 17 \(truncated\?\)"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_wrong_magic_number_says_which_kind_it_is(tmp_path):
    images, labels = fake_mnist(20)
    _write_pair(tmp_path, idx_bytes(labels), idx_bytes(images))  # swapped
    with pytest.raises(DataError, match="magic number 2049, expected 2051.*swapped"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_image_label_count_mismatch(tmp_path):
    images, labels = fake_mnist(20)
    _write_pair(tmp_path, idx_bytes(images), idx_bytes(labels[:15]))
    with pytest.raises(DataError, match="20 images but the labels file 15 labels"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_empty_idx_file(tmp_path):
    _write_pair(tmp_path, idx_bytes(np.zeros((0, 28, 28))), idx_bytes(np.zeros(0)))
    with pytest.raises(DataError, match="holds no images"):
        load_dataset("mnist", "test", data_dir=tmp_path)


# --- user arrays ---------------------------------------------------------------------------


def test_npz_with_labels_and_0_255_values(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 16)).astype(np.float64)
    y = rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "d.npz"), "all")
    assert ds.images.shape == (50, 16) and ds.image_shape == (4, 4)
    assert torch.allclose(ds.images, torch.from_numpy(x / 255).float())
    assert torch.equal(ds.labels, torch.from_numpy(y))
    sizes = [len(load_dataset(str(tmp_path / "d.npz"), s)) for s in ("train", "val", "test")]
    assert sizes == [40, 5, 5]


def test_csv_with_header_and_label_column(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((20, 9))
    y = np.arange(20) % 2
    table = np.column_stack([y, x])
    path = tmp_path / "d.csv"
    path.write_text("label," + ",".join(f"p{i}" for i in range(9)) + "\n" +
                    "\n".join(",".join(f"{v:.6f}" for v in row) for row in table) + "\n")
    ds = load_dataset(str(path), "all", label_column=0)
    assert ds.images.shape == (20, 9) and ds.image_shape == (3, 3)
    assert torch.equal(ds.labels, torch.from_numpy(y.astype(np.int64)))
    assert torch.allclose(ds.images, torch.from_numpy(x).float(), atol=1e-6)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([[0.1, np.nan], [0.2, 0.3]]), "NaN or infinite"),
        (np.array([[0.1, np.inf], [0.2, 0.3]]), "NaN or infinite"),
        (np.array([[0.1, 300.0], [0.2, 0.3]]), "values must lie in 0-255 or 0-1"),
        (np.array([[-0.5, 0.2], [0.2, 0.3]]), "values must lie in 0-255 or 0-1"),
        (np.zeros((0, 4)), "empty"),
        (np.zeros((2, 2, 2, 2)), "one example per row"),
    ],
)
def test_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message) as e:
        load_dataset(str(tmp_path / "bad.npy"), "all")
    assert "bad.npy" in str(e.value)


def test_missing_and_unreadable_user_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npy"):
        load_dataset(str(tmp_path / "nothere.npy"))
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="junk.npy: cannot be read"):
        load_dataset(str(tmp_path / "junk.npy"), "all")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar10")


def test_label_count_mismatch_in_npz(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4)), y=np.zeros(7))
    with pytest.raises(DataError, match="10 images but labels of shape"):
        load_dataset(str(tmp_path / "d.npz"), "all")


def test_bernoulli_refuses_grey_values_without_binarisation():
    ds = load_dataset("digits", "val")
    with pytest.raises(DataError, match="needs binary pixels"):
        check_likelihood(ds, "bernoulli", "none")
    check_likelihood(ds, "gaussian", "none")
    check_likelihood(static_binarized(ds), "bernoulli", "none")
