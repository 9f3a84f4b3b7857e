"""The run directory as training writes it: its lock, its files, and what a resume may touch.

A new run creates ``<out>/<name>/`` with ``config.json`` and an empty ``metrics.jsonl`` (taking over
a directory that an earlier run left without a checkpoint); every epoch then appends its row and
replaces ``last.pt`` (and ``best.pt`` after a better validation ELBO); the end writes
``summary.json`` and ``elbo.png``. A resumed run changes nothing in the directory until its first
new epoch is saved (:meth:`RunDirectory.record`): then it writes its settings back, drops the rows of
an epoch that was never checkpointed and removes what killed writes left. Reading runs back is
:mod:`pyrovae.runs`; which settings a resume may change is :func:`pyrovae.config.resumed_config`.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from .averaging import CHECKPOINT_KEY as EMA_KEY
from .config import TrainConfig
from .files import TMP_SUFFIX, OutputError, dumps, write_json, write_text_atomic
from .runs import KEPT_KEY, RunLock, link_checkpoint, load_checkpoint, read_metrics, save_checkpoint

__all__ = ["RunDirectory", "export_run", "EXPORT_MARK"]


def is_run_file(name: str) -> bool:
    """Whether a file of this name is one a pyrovae run writes (before its first checkpoint)."""
    return (name in ("config.json", "metrics.jsonl", "elbo.png", "summary.json", "best.pt")
            or name.startswith("events.out.tfevents.") or (name.startswith(".") and name.endswith(TMP_SUFFIX)))


def default_run_dir(config: TrainConfig) -> Path:
    """``--out/--name``; without ``--name``, a name from the dataset, the model and the time."""
    name = config.name or f"{Path(config.dataset).stem}-{config.model}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.out) / name


def _append_line(path: Path, line: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e.strerror}); free some space, then --resume "
                          f"{path.parent}") from None


class RunDirectory:
    """One run's folder, held under its :class:`~pyrovae.runs.RunLock` from :meth:`open` to :meth:`release`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = RunLock(self.path)
        self._resume_rows: list[dict] | None = None

    def open(self, config: TrainConfig, resumed_epoch: int | None) -> None:
        """Take the folder: a new run (``resumed_epoch`` None) creates it or takes over one left
        without a checkpoint, and writes ``config.json``; a resumed run only reads its metrics now,
        so that a damaged file stops the resume before anything is trained or written.
        ``ValueError`` for a folder that belongs to another run or holds other files."""
        d = self.path
        self.lock.acquire()
        if resumed_epoch is not None:
            self._resume_rows = [r for r in read_metrics(d / "metrics.jsonl") if r["epoch"] <= resumed_epoch]
            self._config = config
            return
        if d.exists() and any(d.iterdir()):
            names = {p.name for p in d.iterdir()}
            if "last.pt" in names:
                raise ValueError(f"{d} already exists: continue it with --resume {d}, or choose another --name")
            foreign = sorted(n for n in names if not is_run_file(n))
            if foreign:
                raise ValueError(f"{d} holds files that are not a pyrovae run's ({', '.join(foreign[:3])}): "
                                 "choose another --name or --out")
            import sys

            print(f"pyrovae train: {d} holds no checkpoint (an earlier run stopped before its first epoch "
                  "ended): taking it over", file=sys.stderr)
            for p in d.iterdir():
                p.unlink()
        d.mkdir(parents=True, exist_ok=True)
        config.save(d / "config.json")
        write_text_atomic(d / "metrics.jsonl", "")

    def _commit_resume(self) -> None:
        """After the first new epoch of a resumed run: write its settings back (e.g. more
        --epochs), drop metric rows of an epoch that was not checkpointed (killed in between),
        and remove temporary files that killed writes left."""
        d, rows, self._resume_rows = self.path, self._resume_rows, None
        if TrainConfig.load(d / "config.json") != self._config:
            self._config.save(d / "config.json")
        write_text_atomic(d / "metrics.jsonl", "".join(dumps(r, indent=None) + "\n" for r in rows))
        # the run is no longer finished: its summary is written again at its end
        (d / "summary.json").unlink(missing_ok=True)
        for p in d.glob(f".*{TMP_SUFFIX}"):
            try:
                p.unlink()
            except OSError:
                pass

    def record(self, row: dict, state: dict, best: bool) -> None:
        """One finished epoch: its metrics row, ``last.pt``, and ``best.pt`` when ``best``."""
        if self._resume_rows is not None:
            self._commit_resume()
        _append_line(self.path / "metrics.jsonl", dumps(row, indent=None))
        save_checkpoint(state, self.path / "last.pt")
        if best:
            link_checkpoint(self.path / "last.pt", self.path / "best.pt")

    def best(self, device) -> dict:
        """The checkpoint of the best epoch, on ``device``."""
        return load_checkpoint(self.path / "best.pt", map_location=device)

    def finish(self, summary: dict) -> None:
        """The run's end: ``elbo.png`` and ``summary.json``."""
        self.plot()
        write_json(self.path / "summary.json", summary)

    def plot(self) -> None:
        """``elbo.png`` from the metrics so far."""
        from .plots import plot_training_curves

        rows = read_metrics(self.path / "metrics.jsonl")
        if rows:
            plot_training_curves(rows, self.path / "elbo.png")

    def release(self) -> None:
        self.lock.release()


#: what an exported run leaves out of its best checkpoint: what only resuming needs
EXPORT_DROPS = ("optimizer", "rng")
#: the file that marks an exported run (and says where it came from)
EXPORT_MARK = "exported.json"
#: values of ``export_run(weights=...)``: both the raw and the averaged weights, or the averaged ones only
EXPORT_WEIGHTS = ("both", "averaged")
_EXPORT_FILES = ("config.json", "metrics.jsonl", "summary.json", "elbo.png")


def export_run(run_dir: str | os.PathLike, dest: str | os.PathLike, weights: str = "both") -> dict:
    """Copy a finished run into ``dest`` compactly, for sharing: its settings, metrics, summary and curves, and
    its best checkpoint without the optimiser's state and the random states (:data:`EXPORT_DROPS`), which only
    ``--resume`` needs. ``pyrovae evaluate``, ``compare``, ``sample``, ``reconstruct`` and ``interpolate`` read
    the copy as they read the run (with ``--ema``, both the averaged and the raw weights are kept); it cannot be
    resumed. The data's folder is left out of its settings (it is the user's own: evaluate the copy with
    ``--data-dir DIR``), and ``out``/``name`` name the copy. Returns ``{"files": [...], "bytes": total}``.

    ``weights="averaged"`` keeps only the averaged weights of a run trained with ``--ema`` (about half the
    size): the copy scores exactly as the run does with its default, averaged weights, and refuses
    ``--weights raw``.

    ``ValueError`` for a folder that is not a finished run, a ``dest`` that already holds files, or
    ``weights="averaged"`` for a run without ``--ema``.
    """
    import shutil

    src, dest = Path(run_dir), Path(dest)
    if not (src / "best.pt").is_file() or not (src / "config.json").is_file():
        raise ValueError(f"{src}: not a pyrovae run directory (no best.pt and config.json): give the folder that "
                         "pyrovae train printed")
    if not (src / "summary.json").is_file():
        raise ValueError(f"{src}: the run has not finished (no summary.json): let it finish, or --resume it to its "
                         "end, then export it")
    if weights not in EXPORT_WEIGHTS:
        raise ValueError(f"weights must be 'both' or 'averaged' (got {weights!r})")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} already exists and is not an empty folder: choose a new one")
    state = load_checkpoint(src / "best.pt")
    slim = {k: v for k, v in state.items() if k not in EXPORT_DROPS}
    if weights == "averaged":
        if not state.get(EMA_KEY):
            raise ValueError(f"{src} was trained without --ema, so it has no averaged weights: export it without "
                             "--weights averaged")
        # the raw values of the averaged parameters go; the buffers, which are not averaged, stay
        slim["model"] = {k: v for k, v in state["model"].items() if k not in state[EMA_KEY]["params"]}
        slim[KEPT_KEY] = "averaged"
    # the folders are the user's own (--data-dir DIR for the data); the copy names itself
    local = {"data_dir": TrainConfig().data_dir, "out": str(dest.parent), "name": dest.name}
    slim["config"] = {**slim["config"], **local}
    dest.mkdir(parents=True, exist_ok=True)
    save_checkpoint(slim, dest / "best.pt")
    TrainConfig.from_dict({**TrainConfig.load(src / "config.json").to_dict(), **local},
                          str(src / "config.json")).save(dest / "config.json")
    names = ["best.pt", "config.json"]
    for name in _EXPORT_FILES[1:]:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
            names.append(name)
    left_out = list(EXPORT_DROPS) + (["raw weights"] if weights == "averaged" else [])
    write_json(dest / EXPORT_MARK, {"from": src.resolve().name, "epoch": int(state["epoch"]), "left_out": left_out})
    names.append(EXPORT_MARK)
    return {"files": names, "bytes": sum((dest / n).stat().st_size for n in names)}
