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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig
from .model import build_model

__all__ = ["Run", "load_run", "save_checkpoint", "load_checkpoint", "read_metrics"]

CHECKPOINT_FORMAT = 1


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f, _without_crc32():
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint safely; a missing, corrupt or foreign file raises a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train a run first or check the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{path}: not a readable pyrovae checkpoint ({msg[:200]}); it may be truncated or from elsewhere: "
            "use best.pt or last.pt of a finished run"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise ValueError(f"{path}: not a pyrovae checkpoint (format {CHECKPOINT_FORMAT}); "
                         "use best.pt or last.pt of a run")
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
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything before it is good
    return rows


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


def load_run(path: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu") -> Run:
    """Load a run directory (``which`` = ``best`` or ``last``) or a checkpoint file."""
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
    load_state(model, state["model"], ckpt)
    device = torch.device(device)
    model.to(device).eval()
    return Run(run_dir, config, model, tuple(state["image_shape"]), int(state["data_dim"]), int(state["epoch"]), ckpt,
               device)
