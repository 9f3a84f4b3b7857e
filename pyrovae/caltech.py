r"""Caltech 101 Silhouettes, 28x28 (Marlin et al. 2010, split 1): ``--dataset caltech101-silhouettes``.

The published MATLAB file ``caltech101_silhouettes_28_split1.mat`` holds ``train_data`` (4,100 images),
``val_data`` (2,264) and ``test_data`` (2,307), each a uint8 matrix of 784 values 0/1 per row, with
``train_labels``, ``val_labels``, ``test_labels`` (1..101) and ``classnames``. Each row is an image stored
column-major (Fortran order) with the shape 0 and the background 1; pyrovae reads it upright and, as the
literature's code does (the VampPrior and Sylvester-flow papers), as :math:`1 - x`: the shape 1 on a 0
background. Labels are returned as 0..100. The pixels are fixed 0/1 values, never resampled
(``prebinarized`` in :data:`pyrovae.datasets.DATASETS`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .data import DataError, Dataset, _check_data_dir, _download_dir, fetch, file_problem
from .datasets import DATASETS

__all__ = ["FILE", "load_caltech101_silhouettes", "read_caltech_mat", "download_caltech101_silhouettes"]

#: the published file's name
FILE = "caltech101_silhouettes_28_split1.mat"
#: split -> (images key, labels key) in the file
_KEYS = {"train": ("train_data", "train_labels"), "val": ("val_data", "val_labels"),
         "test": ("test_data", "test_labels")}
#: the most bytes a valid file can hold (the published one is under 1 MB): a download stops past it
MAX_BYTES = 32 * 2**20
_SIDE = 28


def read_caltech_mat(path: str | os.PathLike) -> dict:
    """The variables of the ``.mat`` file at ``path`` (scipy's ``loadmat``), or one :class:`DataError`."""
    from scipy.io import loadmat

    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise DataError(f"{path} is {problem}: put the data file itself there")
    try:
        return loadmat(str(path))
    except (ValueError, TypeError, OSError, NotImplementedError, IndexError, EOFError) as e:
        # (scipy reads the header before it knows the file: a short foreign file fails with IndexError)
        raise DataError(f"{path}: not a MATLAB file that scipy can read ({' '.join(str(e).split())}); download it "
                        "again") from None


def _split(mat: dict, split: str, path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    images_key, labels_key = _KEYS[split]
    if images_key not in mat:
        present = ", ".join(k for k, _ in _KEYS.values() if k in mat) or "none of them"
        raise DataError(f"{path} holds no {split} split ({images_key} is missing; it holds {present}): the published "
                        f"file has train_data, val_data and test_data: download it with --download, or score another "
                        "split (--split val)")
    x = np.asarray(mat[images_key])
    if x.ndim != 2 or x.shape[1] != _SIDE * _SIDE or x.shape[0] == 0:
        raise DataError(f"{path}: {images_key} has shape {x.shape}, expected (images, {_SIDE * _SIDE}); download the "
                        "file again")
    if not np.isin(x, (0, 1)).all():
        raise DataError(f"{path}: {images_key} holds values other than 0 and 1; download the file again")
    # column-major rows: reshaped in C order each image is transposed; 1 - x puts the shape at 1
    upright = x.reshape(-1, _SIDE, _SIDE).transpose(0, 2, 1).reshape(-1, _SIDE * _SIDE)
    images = torch.from_numpy(1.0 - upright.astype(np.float32))
    labels = None
    if labels_key in mat:
        y = np.asarray(mat[labels_key]).reshape(-1)
        if y.shape[0] == images.shape[0]:
            labels = torch.from_numpy(y.astype(np.int64) - 1)
    return images, labels


def load_caltech101_silhouettes(name: str, split: str, data_dir: Path, download: bool,
                                progress: bool = True) -> Dataset:
    """The loader of ``caltech101-silhouettes`` (:data:`pyrovae.datasets.DATASETS`): the train, val or test
    part of the published file in ``data_dir``, or train and val together for ``all``."""
    data_dir = Path(data_dir)
    if download:
        download_caltech101_silhouettes(data_dir, progress=progress)
    _check_data_dir(data_dir)
    path = data_dir / FILE
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{FILE} not found in {data_dir}/: download it from {DATASETS[name].source} into "
                                f"{data_dir}/, or add --download where there is internet")
    mat = read_caltech_mat(path)
    if split == "all":
        parts = [_split(mat, s, path) for s in ("train", "val")]
        labels = None if any(y is None for _, y in parts) else torch.cat([y for _, y in parts])
        return Dataset(name, "all", torch.cat([x for x, _ in parts]), labels, (_SIDE, _SIDE))
    x, y = _split(mat, split, path)
    return Dataset(name, split, x, y, (_SIDE, _SIDE))


def download_caltech101_silhouettes(data_dir: str | os.PathLike, base_url: str | None = None,
                                    progress: bool = True) -> None:
    """Fetch the published file into ``data_dir`` (kept when a readable copy with all three splits is there).
    ``base_url`` defaults to ``$PYROVAE_CALTECH101_SILHOUETTES_URL`` or the folder of the published location;
    a ``file://`` URL or a plain folder works too. The download stops past :data:`MAX_BYTES`, and a file
    that is not the published one (no train, val and test parts) is removed and named."""
    spec = DATASETS["caltech101-silhouettes"]
    data_dir = _download_dir(Path(data_dir))
    target = data_dir / FILE
    if target.is_file():
        try:
            if all(k in read_caltech_mat(target) for k, _ in _KEYS.values()):
                return
        except DataError:
            pass
    base = base_url or os.environ.get(spec.url_variable) or spec.source.rsplit("/", 1)[0]
    tmp = data_dir / f".{FILE}.download"
    try:
        fetch(base, FILE, tmp, MAX_BYTES, progress=progress, by_hand=f"copy {FILE} into {data_dir}/ by hand",
              variable=spec.url_variable, exact=False)
        mat = read_caltech_mat(tmp)
        missing = [k for k, _ in _KEYS.values() if k not in mat]
        if missing:
            raise DataError(f"--download of {FILE} from {base}: the file holds no {', '.join(missing)}, so it is not "
                            f"the published one; nothing was kept: copy {FILE} into {data_dir}/ by hand")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
