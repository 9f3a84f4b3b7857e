"""Shared fixtures: fresh Pyro state, tiny configs, and IDX files written by the tests."""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: the shipped finished runs (settings, metrics and best weights)
SHIPPED = ROOT / "docs" / "results" / "benchmark" / "runs"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in one worker per core (pytest -n 2): one thread each, and each command a test
    # starts inherits it, so that the workers do not oversubscribe the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_state():
    pyro.clear_param_store()
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes for a uint8 array (images: 3-D, labels: 1-D)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fake_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 uint8 images with structure (a bright square whose place depends on the label)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = 2 + 2 * (y % 5), 2 + 10 * (y // 5)
        images[i, r : r + 10, c : c + 10] = 230
    return images, labels


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """A folder holding only the two t10k files of a small fake MNIST, gzipped."""
    images, labels = fake_mnist(60)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    return tmp_path


def child_env(**extra: str) -> dict:
    """The environment for a child Python that imports this checkout: ``ROOT`` put ahead of any
    ``PYTHONPATH`` already set (replacing it would lose packages installed there), plus ``extra``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300):
    """Run ``python -m pyrovae ARGS`` in a subprocess; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "pyrovae", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def cli(capsys, *args: str):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from pyrovae.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def load_experiment(name: str):
    """Import ``experiments/<name>.py`` as a module (registered in ``sys.modules``, where
    dataclasses look their module up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def interrupted_at(epoch: int, *, after: bool = False):
    """Training inside the block is stopped by a KeyboardInterrupt (as by Ctrl-C) at the start of
    ``epoch``, or with ``after=True`` once that epoch's row is written; the block expects it."""
    from pyrovae.training import Hook, hooked

    class Interrupt(Hook):
        def epoch_start(self, trainer, e):
            if e == epoch and not after:
                raise KeyboardInterrupt

        def epoch_end(self, trainer, row):
            if after and row["epoch"] == epoch + 1:
                raise KeyboardInterrupt

    with hooked(Interrupt()):
        with pytest.raises(KeyboardInterrupt):
            yield
