"""Run directories and checkpoints.

A run directory holds ``config.json``, ``metrics.jsonl``, ``last.pt``, ``best.pt`` and
pictures. Checkpoints are written to a temporary file in the same folder and renamed over
the old one, so a process killed at any moment leaves the previous checkpoint intact; they
hold only tensors and plain values and are read with ``torch.load(weights_only=True)``, so
a downloaded checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .averaging import CHECKPOINT_KEY as EMA_KEY
from .averaging import averaged_state
from .config import TrainConfig
from .files import write_atomic
from .marginal import nonfinite_tensors
from .model import build_model

__all__ = ["Run", "RunLock", "load_run", "save_checkpoint", "load_checkpoint", "read_metrics"]

CHECKPOINT_FORMAT = 1


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename);
    a full disk or a missing permission is a one-line :class:`~pyrovae.files.OutputError`."""
    def write(f):
        with _without_crc32():
            torch.save(state, f)

    write_atomic(path, write)


@contextlib.contextmanager
def _without_crc32():
    """``torch.save`` without its per-record CRC-32: computing it costs about 1 ms per MB
    (8 ms of a 784-400-50 checkpoint with its Adam state, every epoch), and ``torch.load``
    never checks it; the write-then-rename already keeps a cut-off file from replacing a
    good one."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:  # torch < 2.6 always computes it
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def link_checkpoint(src: Path, dst: Path) -> None:
    """Make ``dst`` hold what ``src`` holds now, atomically and without copying: a hard link
    to the current file survives ``src`` being replaced later (copy where links fail)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


#: a checkpoint key that only an export with ``--weights averaged`` writes: its model state holds the buffers,
#: and the parameters are the averaged ones under the averaging's key alone
KEPT_KEY = "weights_kept"

#: what a checkpoint must hold, and of which type
_CHECKPOINT_KEYS = {"format": int, "config": dict, "kind": str, "data_dim": int, "image_shape": list, "model": dict,
                    "epoch": int}


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint safely (``torch.load(weights_only=True)``: no code runs); a missing,
    truncated, foreign or incomplete file, or one whose weights are not finite, raises a
    one-line ``ValueError``/``FileNotFoundError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train a run first or check the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        import zipfile

        if zipfile.is_zipfile(path) and ("Unsupported global" in str(e) or "GLOBAL" in str(e)):
            why = "it holds Python objects other than tensors and numbers (code), which pyrovae never loads"
        else:
            why = "it is truncated, corrupt or not a torch file"
        raise ValueError(f"{path}: not a pyrovae checkpoint: {why}; use best.pt or last.pt of a pyrovae run") \
            from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a pyrovae checkpoint (format {CHECKPOINT_FORMAT}); "
                         "use best.pt or last.pt of a run")
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"{path}: a damaged pyrovae checkpoint ({key!r} is missing or not a "
                             f"{kind.__name__}); use best.pt or last.pt of an intact run")
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise ValueError(f"{path}: a damaged pyrovae checkpoint (its model holds values that are not tensors); "
                         "use best.pt or last.pt of an intact run")
    bad = nonfinite_tensors(state["model"])
    if bad:
        raise ValueError(f"{path}: the model's weights hold NaN or infinite values ({bad}): the run diverged before "
                         "this checkpoint; use an earlier one or train again")
    return state


def load_state(model: nn.Module, state_dict: dict, source: Path) -> None:
    """``load_state_dict`` with a one-line error when the architecture differs."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ValueError(
            f"{source}: the checkpoint's tensors do not match the architecture in config.json "
            f"({detail[:300]}); the files come from different runs: keep config.json with its checkpoints"
        ) from None


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``, one per epoch. A last line cut off by a kill is dropped
    (its epoch was never checkpointed); any other line that is not a JSON object with a
    whole ``epoch`` raises a one-line ``ValueError`` naming the file and the line, rather
    than silently losing the history after it."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; it is damaged: restore it, or remove it to lose the run's "
                         "history (training can still resume from last.pt)") from None
    rows = []
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for n, (i, line) in enumerate(numbered):
        try:
            row = json.loads(line, parse_constant=_refuse_constant)
            ok = isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool)
        except ValueError:
            ok, row = False, None
        if not ok:
            if n == len(numbered) - 1 and row is None:
                break  # the last line, cut by a kill
            raise ValueError(f"{path}: line {i} is not a metrics row ({line[:40]!r}); repair or delete that line "
                             "(training resumes from last.pt either way)")
        rows.append(row)
    return rows


def _refuse_constant(name: str):
    raise ValueError(name)


class RunLock:
    """An exclusive lock on a run directory, held by the process that trains it.

    An OS lock (``fcntl.flock``) on ``<out>/.<name>.lock`` beside the directory, which holds
    the holder's process id: a second ``pyrovae train --resume`` of the same run is refused
    with one line naming that process, and a killed process never leaves a stale lock (the
    kernel releases it; the file it leaves is taken over). A finished run removes the file.
    Where ``fcntl`` does not exist (Windows) nothing is locked.
    """

    def __init__(self, run_dir: Path | None):
        self.path = None if run_dir is None else Path(run_dir).parent / f".{Path(run_dir).name}.lock"
        self._file = None

    def acquire(self) -> None:
        if self.path is None or self._file is not None:
            return
        try:
            import fcntl
        except ImportError:
            return
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                f = open(self.path, "a+")
            except OSError as e:
                raise ValueError(f"{self.path}: cannot create the run's lock file ({e.strerror}); check --out") \
                    from None
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                run = self.path.with_name(self.path.name[1:-5])
                raise ValueError(f"{run} is being trained by process {holder}: wait for it to finish or stop it "
                                 "first (one process per run)") from None
            try:  # the holder before us may have removed the file while we opened it: lock the current one
                if os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            try:
                os.unlink(self.path)  # while still holding it: the next process creates a fresh one
            except OSError:
                pass
            self._file.close()  # closing releases the flock
            self._file = None


@dataclass
class Run:
    """A trained run: its directory, settings, model (in eval mode) and checkpoint facts."""

    dir: Path
    config: TrainConfig
    model: nn.Module
    image_shape: tuple[int, int]
    data_dim: int
    epoch: int
    checkpoint: Path
    device: torch.device
    #: which weights the model holds: "averaged" (the run's --ema average) or "raw"
    weights: str = "raw"


#: values of ``load_run(weights=...)`` and of the commands' ``--weights``
WEIGHTS = ("averaged", "raw")


def load_run(path: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu",
             weights: str = "averaged") -> Run:
    """Load a run directory (``which`` = ``best`` or ``last``) or a checkpoint file.

    ``weights``: for a run trained with ``--ema``, ``"averaged"`` (the default) loads the moving
    average of the weights, ``"raw"`` the optimiser's own; a run without ``--ema`` has raw weights only
    (``Run.weights`` says which were loaded).

    Examples
    --------
    A run of one epoch of a small model, written into a scratch folder, then loaded:

    >>> import shutil, tempfile
    >>> from pyrovae import TrainConfig, train, load_run
    >>> out = tempfile.mkdtemp()
    >>> config = TrainConfig(epochs=1, hidden_dims=(32,), latent_dim=2, out=out, name="first", no_tensorboard=True)
    >>> result = train(config, progress=False)
    >>> sorted(p.name for p in result.run_dir.iterdir())
    ['best.pt', 'config.json', 'elbo.png', 'last.pt', 'metrics.jsonl', 'summary.json']
    >>> run = load_run(result.run_dir)  # the best checkpoint; load_run(..., which="last") the last one
    >>> type(run.model).__name__, run.config.latent_dim, run.checkpoint.name
    ('VAE', 2, 'best.pt')
    >>> shutil.rmtree(out)
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last' (got {which!r})")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'averaged' or 'raw' (got {weights!r})")
    path = Path(path)
    if path.is_dir():
        ckpt = path / f"{which}.pt"
        if not ckpt.is_file() and (path / "last.pt").is_file():
            ckpt = path / "last.pt"
        run_dir = path
    else:
        ckpt, run_dir = path, path.parent
    if not run_dir.exists():
        raise FileNotFoundError(f"{path}: no such run directory; give the folder that `pyrovae train` printed")
    state = load_checkpoint(ckpt)
    config_path = run_dir / "config.json"
    if config_path.is_file():
        config = TrainConfig.load(config_path)
    else:
        config = TrainConfig.from_dict(state["config"], str(ckpt))
    model = build_model(config, data_dim=int(state["data_dim"]), image_shape=tuple(state["image_shape"]))
    if weights == "raw" and state.get(KEPT_KEY) == "averaged":
        raise ValueError(f"{ckpt}: this copy keeps only the averaged weights (pyrovae export --weights averaged); "
                         "use them (leave out --weights raw), or score the original run for the raw ones")
    averaged = weights == "averaged" and bool(state.get(EMA_KEY))
    load_state(model, averaged_state(state) if averaged else state["model"], ckpt)
    device = torch.device(device)
    model.to(device).eval()
    return Run(run_dir, config, model, tuple(state["image_shape"]), int(state["data_dim"]), int(state["epoch"]), ckpt,
               device, "averaged" if averaged else "raw")
