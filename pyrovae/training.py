r"""Training by stochastic variational inference: ``pyro.infer.SVI`` over the run's data.

One call of :func:`train` builds the data, the model and the objective from a
:class:`~pyrovae.config.TrainConfig`, trains with early stopping on the validation ELBO,
and leaves a run directory::

    runs/<name>/config.json     every setting
    runs/<name>/metrics.jsonl   one line per epoch: train/val ELBO, KL, reconstruction, seconds
    runs/<name>/last.pt         the latest epoch (model, optimiser, epoch, RNG states)
    runs/<name>/best.pt         the epoch with the best validation ELBO
    runs/<name>/elbo.png        the curves
    runs/<name>/summary.json    best epoch, test-split ELBO, wall time

A wall-clock budget (``--time-limit``): the run times its first :data:`~pyrovae.budget.PROBE_EPOCHS` epochs,
fixes how many epochs fit in the budget (``planned_epochs``, at most ``--epochs``), anneals the
learning-rate schedule over exactly those and stops there; should the epochs slow down or speed up
later (a busier or an idler machine) so that the plan would end more than :data:`~pyrovae.budget.OVERRUN` past or
short of its budget, the plan is made again at the session's pace. The plan and the seconds spent are
kept in every checkpoint, so ``--resume`` continues the same plan within what is left of the
budget, or, given a larger ``--time-limit``, plans again from the epochs' measured pace.
``summary.json`` records what ended the run (``stopped_by``).

Randomness: data order and dynamic binarisation come from generators seeded by
``(seed, epoch)``; the guide's noise from torch's global generator, whose state every
checkpoint keeps. A resumed run therefore continues exactly as the uninterrupted run would.

Data-parallel: under ``torchrun`` every process takes a ``DistributedSampler`` shard of each
global batch, gradients are summed over processes before each step (gloo on CPU, nccl on
GPU), metrics are summed over processes, and only rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI

from .averaging import CHECKPOINT_KEY as EMA_KEY
from .averaging import WeightAverage, averaged_state
from .board import Board
from .budget import TimeBudget
from .config import (
    CONTINUES,
    PREBINARIZED,
    RESUMABLE,
    TrainConfig,
    check_used,
    parse_duration,
    resumed_config,
    unresumable,
)
from .data import Dataset, binarize, check_likelihood, load_dataset, static_binarized
from .distributed import ProcessGroup, rank, resolve_device, world_size  # noqa: F401 (resolve_device: its old home)
from .marginal import derive_seed, isolated_params
from .metrics import COMPONENT_SHARE, component_usage, responsibilities, split_scores
from .model import build_model
from .nets import set_autocast
from .objectives import Optimizer, build_elbo
from .rundir import EXPORT_MARK, RunDirectory, default_run_dir, is_run_file
from .runs import CHECKPOINT_FORMAT, load_checkpoint, load_state

__all__ = ["train", "Trainer", "Hook", "hooked", "TrainResult", "TrainingDiverged", "TrainingData", "Progress",
           "load_training_data", "prepare_data", "train_or_reuse", "find_finished_run", "finished_run",
           "validation_samples"]

#: importance samples per example for the test-split ELBO printed at the end of training
TEST_NUM_SAMPLES = 10
#: seed of the validation ELBO's noise: every epoch is scored with the same draws
VAL_SEED = 97


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path | None
    epochs_done: int
    best_epoch: int
    best_val_elbo: float
    test: dict | None
    seconds: float
    stopped_early: bool
    #: what ended the run: "epochs" (--epochs reached), "patience" or "time_limit"
    stopped_by: str = "epochs"
    #: with --time-limit: the epochs that fit in the budget
    planned_epochs: int | None = None


def count_since_best(since_best: int, improved: bool, epoch: int, warmup_epochs: int, after_warmup: bool) -> int:
    """Epochs without a better validation ELBO after ``epoch`` (counted from 1), which ``--patience``
    compares with: 0 after a gain, else one more; with ``after_warmup`` (``--patience-after-warmup``,
    the VampPrior code's loop) also 0 in every epoch before the ``warmup_epochs``-th."""
    if improved or (after_warmup and epoch < warmup_epochs):
        return 0
    return since_best + 1


def prepare_data(config: TrainConfig, split: str, device, fix: str | None = None) -> Dataset:
    """Load ``split`` of the run's dataset, binarised the way the run scores data
    (static for a binarised run, grey otherwise), checked against the likelihood, on ``device``;
    ``fix``: the advice of that check's error, where training's flags are not the remedy."""
    ds = load_dataset(config.dataset, split, data_dir=config.data_dir, label_column=config.label_column,
                      download=config.download, progress=False)
    if config.binarize != "none":
        ds = static_binarized(ds)  # drawn on the host (no round trip): the same images on every device
    ds = ds.to(device)
    check_likelihood(ds, config.likelihood, "static" if config.binarize != "none" else "none", fix)
    return ds


#: what resuming needs from last.pt beside the model
_RESUME_KEYS = ("optimizer", "global_step", "best_val_elbo", "best_epoch", "epochs_since_best", "rng")


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(config: TrainConfig, *, resume: str | os.PathLike | None = None, progress: bool = True,
          write: bool = True, hooks: tuple[Hook, ...] | list[Hook] = ()) -> TrainResult:
    """Train the model of ``config`` (or continue the run in ``resume``) and return a summary.

    ``progress`` shows a tqdm bar over epochs; ``write=False`` keeps everything in memory
    (no run directory), for experiments that only need the numbers; ``hooks``: :class:`Hook` objects
    the :class:`Trainer` runs at each epoch's start, each step, each epoch's end and the end.

    Examples
    --------
    One epoch of a small model on mnist5k, kept in memory (``write=False``: no run directory):

    >>> from pyrovae import TrainConfig, train
    >>> result = train(TrainConfig(epochs=1, hidden_dims=(32,), latent_dim=2), progress=False, write=False)
    >>> result.run_dir is None, result.epochs_done, result.best_epoch, result.stopped_by
    (True, 1, 1, 'epochs')
    >>> result.test["num_examples"], result.test["elbo"] < 0  # the test split's ELBO, nats per image
    (500, True)
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig as its config (got {type(config).__name__}): build one with "
                        "TrainConfig(...) or, from a mapping of settings, TrainConfig.from_dict(...)")
    fresh = resume is None  # (a stored run's settings are not checked again by the rules of a new one)
    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: no such run directory; give the folder that pyrovae train printed")
        config = resumed_config(TrainConfig.load(run_dir / "config.json"),
                                {k: getattr(config, k) for k in RESUMABLE}, run_dir)
        if (run_dir / EXPORT_MARK).is_file():
            raise ValueError(f"{run_dir} is an exported run (settings, metrics and best weights only): it cannot "
                             f"be resumed; train it again: pyrovae train --config {run_dir / 'config.json'} --name NEW")
        if not (run_dir / "last.pt").is_file():  # stopped before its first checkpoint: start it again, as it was
            if rank() == 0:
                print(f"pyrovae train: {run_dir} holds no checkpoint yet (it stopped before its first epoch "
                      "ended): starting it again from epoch 0 with its config.json", file=sys.stderr)
            config = dataclasses.replace(config, out=str(run_dir.parent), name=run_dir.name)
            resume = None
    if fresh:  # its own messages first (the settings' checks), then the rule on unused ones
        config.resolved()
        check_used(config)
    if config.dataset in PREBINARIZED and config.binarize in ("dynamic", "static") and rank() == 0 and resume is None:
        print(f"pyrovae train: note: {config.dataset} is binary already (sampled once by its authors); it is "
              f"used as it is, not resampled by --binarize {config.binarize}", file=sys.stderr)
    config = config.resolved()
    world = world_size()
    if config.batch_size % world:  # before joining the process group, so that no process waits for the others
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {world} processes "
                         f"(torchrun --nproc-per-node x --nnodes): use a multiple of {world}")
    env = ProcessGroup(config.device)
    finished = False
    trainer = None
    try:
        trainer = Trainer(config, resume=resume, progress=progress, write=write, hooks=hooks, processes=env)
        result = trainer.fit()
        finished = True
        return result
    except KeyboardInterrupt as e:
        # (what the command line tells: a run to --resume, or none yet)
        e.run_dir = trainer.run_dir if trainer is not None and trainer.write else None
        raise
    finally:
        if trainer is not None:
            trainer.close()
        env.close(finished)


def train_or_reuse(config: TrainConfig, *, progress: bool = True, fix: str = "choose another --out",
                   ignore: tuple[str, ...] = ("out", "name"),
                   reuse_from: str | os.PathLike | list[str | os.PathLike] | None = None) -> tuple[Path, str]:
    """The run of ``config`` in ``config.out/config.name``, for studies that must survive an
    interruption: ``"reused"`` when it finished there before, ``"resumed"`` when it was
    interrupted (from ``last.pt``), ``"trained"`` otherwise. Returns ``(run_dir, how)``.

    ``reuse_from``: a folder of runs (another study's ``runs/``), or a list of them searched in
    order; a finished run there with the same settings (as :func:`find_finished_run` compares
    them) is used instead of training again (``"reused"``).

    Refuses, with ``ValueError`` ending in ``fix``, a directory trained with other settings
    (any resolved setting but those in ``ignore``, and those a resume may change: a run whose
    ``--time-limit`` or ``--epochs`` was raised is resumed), and one holding files that are not
    a pyrovae run's; a run killed before its first checkpoint is started again.
    """
    wanted = config.resolved().to_dict()
    folders = reuse_from if isinstance(reuse_from, list) else [] if reuse_from is None else [reuse_from]
    found = find_finished_run(config, folders, ignore)
    if found is not None:
        return found, "reused"
    run_dir = Path(config.out) / config.name
    raised = False  # only settings a resume may change differ (a raised --time-limit or --epochs): resume
    if (run_dir / "config.json").is_file():
        stored = TrainConfig.load(run_dir / "config.json").to_dict()
        changed = sorted(k for k in wanted if k not in ignore and stored.get(k) != wanted[k])
        fixed = unresumable(stored, {k: wanted[k] for k in changed}, ignore)
        if fixed:
            raise ValueError(f"{run_dir} was trained with other settings ({', '.join(fixed)}): {fix}")
        raised = any(k in CONTINUES for k in changed) and (run_dir / "last.pt").is_file()
    if finished_run(run_dir) and not raised:
        return run_dir, "reused"
    if (run_dir / "last.pt").is_file():
        train(config, resume=run_dir, progress=progress)
        return run_dir, "resumed"
    if run_dir.exists() and any(not is_run_file(p.name) for p in run_dir.iterdir()):
        raise ValueError(f"{run_dir} holds files that are not a pyrovae run's: remove it or {fix}")
    train(config, progress=progress)  # (a run killed before its first checkpoint is taken over)
    return run_dir, "trained"


def find_finished_run(config: TrainConfig, folders: list[str | os.PathLike], ignore: tuple[str, ...] = ("out", "name"),
                      accept: typing.Callable[[dict], bool] | None = None) -> Path | None:
    """The first run, in ``folders`` searched in order (each a folder of run directories; one that
    is missing is skipped), that has a ``summary.json`` and every resolved setting of ``config`` but
    those in ``ignore`` and those that change only where and how a run runs (the resumable settings
    outside :data:`~pyrovae.config.CONTINUES`: device, data location, TensorBoard); with ``accept``, also
    one whose summary it accepts. ``None`` if there is none. Runs whose settings or summary cannot be
    read are passed over."""
    ignore = tuple(ignore) + tuple(k for k in RESUMABLE if k not in CONTINUES)
    wanted = config.resolved().to_dict()
    for candidate in (c for f in folders if Path(f).is_dir() for c in sorted(Path(f).iterdir())):
        if not ((candidate / "summary.json").is_file() and (candidate / "config.json").is_file()):
            continue
        try:
            stored = TrainConfig.load(candidate / "config.json").to_dict()
            if accept is not None and not accept(json.loads((candidate / "summary.json").read_text(encoding="utf-8"))):
                continue
        except (ValueError, FileNotFoundError):
            continue
        if all(stored.get(k) == v for k, v in wanted.items() if k not in ignore):
            return candidate
    return None


def finished_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run: a ``summary.json`` written for its ``last.pt`` (the same
    epoch). A run resumed and then killed has a ``last.pt`` past its old summary (which resuming removes
    once the first new epoch is saved): it is not finished, whatever files remain."""
    import json

    summary, last = run_dir / "summary.json", run_dir / "last.pt"
    if not summary.is_file():
        return False
    if not last.is_file():
        return False
    try:
        epochs = json.loads(summary.read_text(encoding="utf-8")).get("epochs_done")
        return epochs == int(load_checkpoint(last)["epoch"])
    except (ValueError, OSError, KeyError, TypeError):
        return False


def data_fingerprint(images: torch.Tensor) -> str:
    """A short hash of a split's images (their float32 bytes and shape): what a resumed run checks against
    its checkpoint, so that a moved --data-dir must hold the data the run was trained on."""
    import hashlib

    x = images.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha1(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class TrainingData:
    """A run's data on its device. ``train_grey`` is what an epoch draws from (binarised again each
    epoch with ``--binarize dynamic``), ``train_fixed`` the training images as scored (statically
    binarised, or grey), ``val`` the validation split as scored. A benchmark may give the trainer a
    subset (``dataclasses.replace(trainer.data, train_grey=..., train_fixed=...)``) to time epochs
    on fewer images."""

    train_grey: torch.Tensor
    train_fixed: torch.Tensor
    val: torch.Tensor
    image_shape: tuple[int, int]
    train_labels: torch.Tensor | None


def load_training_data(config: TrainConfig, processes: ProcessGroup, progress: bool = False) -> TrainingData:
    """The training and validation splits of ``config``'s dataset on ``processes.device``, checked
    against the likelihood; with ``--download`` under ``torchrun`` rank 0 fetches the files while the
    other processes wait (a download each would race)."""
    c = config
    if c.download and processes.world > 1:
        error = None
        if processes.main:
            try:
                load_dataset(c.dataset, "train", data_dir=c.data_dir, label_column=c.label_column, download=True,
                             progress=progress)
            except (ValueError, FileNotFoundError) as e:
                error = str(e)
        processes.raise_any(error)
        c = dataclasses.replace(c, download=False)
    train = load_dataset(c.dataset, "train", data_dir=c.data_dir, label_column=c.label_column,
                         download=c.download, progress=progress)
    if len(train) == 0:
        raise ValueError(f"{c.dataset}: the training split is empty")
    train = train.to(processes.device)
    if c.binarize == "none":
        check_likelihood(train, c.likelihood, "none")
    val = prepare_data(c, "val", processes.device)
    fixed = static_binarized(train).images if c.binarize != "none" else train.images
    return TrainingData(train.images, fixed, val.images, train.image_shape, train.labels)


def learning_rate(config: TrainConfig, epoch: int, horizon: int | None) -> float:
    r"""The rate of ``epoch`` (counted from 0): ``--lr`` for a constant schedule or before a ``--time-limit``
    plan exists (``horizon`` None), else the cosine from ``--lr`` down to ``--lr-min`` over ``horizon`` epochs,

    .. math:: \eta_e = \eta_{\min} + \tfrac12 (\eta - \eta_{\min}) \big(1 + \cos(\pi \min(e, H) / H)\big).
    """
    if config.lr_schedule == "constant" or horizon is None:
        return config.lr
    return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1 + math.cos(math.pi * min(epoch, horizon) / horizon))


def kl_scale(config: TrainConfig, epoch: int, global_step: int, steps_per_epoch: int) -> float:
    """The KL warm-up's weight at a step of ``epoch`` (counted from 0): grown per step to 1 over
    ``--warmup-epochs`` epochs' steps, or with ``--warmup-unit epoch`` held at (epoch + 1) / --warmup-epochs
    for the whole epoch; 1 without warm-up."""
    w = config.warmup_epochs
    if w == 0:
        return 1.0
    if config.warmup_unit == "epoch":
        return min(1.0, (epoch + 1) / w)
    return min(1.0, (global_step + 1) / (w * steps_per_epoch))


class Hook:
    """Code run by a :class:`Trainer` at fixed points of training; subclass it and override what you need.

    Hooks run on every process of a data-parallel run, in the order given. A hook may raise: an exception
    ends training the way the same exception inside an epoch would (``KeyboardInterrupt`` as Ctrl-C does,
    keeping every saved epoch). Pass hooks to :func:`train` or :class:`Trainer`, or make every trainer in a
    block run them with :func:`hooked` (for a run started by the command line).
    """

    def epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first step of ``epoch`` (counted from 0)."""

    def step(self, trainer: Trainer, epoch: int, step: int, loss: float) -> None:
        """After each optimisation step, with the batch's loss (a sum over its examples)."""

    def epoch_end(self, trainer: Trainer, row: dict) -> None:
        """After an epoch's metrics row is written and its checkpoint saved (``row["epoch"]`` counts from 1)."""

    def end(self, trainer: Trainer) -> None:
        """When the last epoch is over, before the best epoch's weights are restored and scored on test."""


_HOOKED: list[Hook] = []


@contextlib.contextmanager
def hooked(*hooks: Hook):
    """Every :class:`Trainer` built inside the block also runs ``hooks`` (after its own)."""
    _HOOKED.extend(hooks)
    try:
        yield
    finally:
        del _HOOKED[len(_HOOKED) - len(hooks):]


@dataclass
class Progress:
    """Where a run stands besides its weights: the counters ``last.pt`` keeps so that ``--resume`` goes on
    exactly (``epoch``: epochs done; ``since_best``: what ``--patience`` compares, :func:`count_since_best`)."""

    epoch: int = 0
    global_step: int = 0
    best_val: float = -math.inf
    best_epoch: int = 0
    since_best: int = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "global_step": self.global_step, "best_val_elbo": self.best_val,
                "best_epoch": self.best_epoch, "epochs_since_best": self.since_best}

    @classmethod
    def from_state(cls, state: dict, source: Path) -> Progress:
        missing = [k for k in _RESUME_KEYS if k not in state]
        if missing:
            raise ValueError(f"{source}: a damaged checkpoint ({', '.join(missing)} missing); "
                             "resume from an intact last.pt or train again")
        return cls(int(state["epoch"]), int(state["global_step"]), float(state["best_val_elbo"]),
                   int(state["best_epoch"]), int(state["epochs_since_best"]))

    def scored(self, val_elbo: float, config: TrainConfig) -> bool:
        """Count one more finished epoch with this validation figure (:func:`selection_key`); whether it is
        the best so far."""
        self.epoch += 1
        improved = val_elbo > self.best_val
        if improved:
            self.best_val, self.best_epoch = val_elbo, self.epoch
        self.since_best = count_since_best(self.since_best, improved, self.epoch, config.warmup_epochs,
                                           config.patience_after_warmup)
        return improved


class Recorder:
    """Where a run's epochs go: its :class:`~pyrovae.rundir.RunDirectory` and TensorBoard (rank 0 with
    ``write``), or memory (the best epoch's weights only)."""

    def __init__(self, path: Path, write: bool):
        self.run, self.write = RunDirectory(path), write
        self.board: Board | None = None
        self.best_in_memory: dict | None = None
        self.epochs_this_session = 0

    def open(self, trainer: Trainer, resumed: bool) -> None:
        """Take the run directory (on rank 0; every process learns of its error) and open TensorBoard."""
        c, error = trainer.config, None
        if self.write:
            try:
                self.run.open(c, trainer.progress.epoch if resumed else None)
            except ValueError as e:
                error = str(e)
            except BaseException:
                self.run.release()
                raise
        if error:
            self.run.release()
        trainer.processes.raise_any(error)  # (or the others would wait forever)
        self.board = Board(self.run.path, enabled=self.write and not c.no_tensorboard,
                           start_epoch=trainer.progress.epoch, images_every=c.tensorboard_images_every,
                           image_shape=trainer.data.image_shape, val_images=trainer.data.val, seed=c.seed)

    def epoch(self, trainer: Trainer, row: dict, improved: bool, t0: float) -> None:
        """Write the epoch (row, ``last.pt``, ``best.pt``, TensorBoard), or keep the best weights in memory."""
        rng = trainer.processes.gather(_rng_state(trainer.device))  # (a collective: every process takes part)
        model = trainer.model
        if self.write:
            if hasattr(model, "fit_code_distribution"):
                with trainer.averaged():
                    model.fit_code_distribution(trainer.data.train_fixed)
            state = checkpoint_state(trainer, rng)
            row["epoch_seconds"] = time.perf_counter() - t0
            self.run.record(row, state, improved)
            self.epochs_this_session += 1
            with trainer.averaged():
                self.board.epoch(row, model)
        else:
            row["epoch_seconds"] = time.perf_counter() - t0
            if improved:
                with trainer.averaged():
                    self.best_in_memory = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore_best(self, model, device) -> None:
        """Give ``model`` the best epoch's weights (averaged, with --ema)."""
        if self.write:
            load_state(model, averaged_state(self.run.best(device)), self.run.path / "best.pt")
        elif self.best_in_memory is not None:
            model.load_state_dict(self.best_in_memory)

    def interrupted(self) -> None:
        self.board.close()
        if self.write and self.epochs_this_session:
            self.run.plot()

    def finish(self, config: TrainConfig, summary: dict) -> None:
        if self.write:
            self.run.finish(summary)
            test = summary["test"]
            self.board.finish(config.to_dict(), {"best_val_elbo": summary["best_val_elbo"],
                                                 "epochs_done": summary["epochs_done"],
                                                 **({"test_elbo": test["elbo"]} if test and test.get("elbo")
                                                    is not None else {})})


class Trainer:
    r"""Trains one model by SVI: the loop behind :func:`train`, with :class:`Hook`\ s for code of your own.

    Building it seeds torch with ``--seed``, loads the data, builds the model and takes the run
    directory (``write=False``: none, everything in memory); with ``resume`` (a run directory) it
    restores the model, optimiser, averaged weights, counters and random state from its ``last.pt``.
    :meth:`fit` trains to the end (``--epochs``, ``--patience`` or ``--time-limit``) and returns a
    :class:`TrainResult`; :meth:`epoch` runs one epoch, for benchmarks that time them. Use it as a
    context manager, or call :meth:`close`, to release the run directory's lock.

    ``processes``: the :class:`~pyrovae.distributed.ProcessGroup` to train in (default: one made
    from ``--device`` and ``torchrun``'s environment); ``data``: the run's :class:`TrainingData`
    when it is loaded already (by :func:`load_training_data`, e.g. for many trainers over one dataset).
    """

    def __init__(self, config: TrainConfig, *, resume: str | os.PathLike | None = None, progress: bool = True,
                 write: bool = True, hooks: tuple[Hook, ...] | list[Hook] = (), processes: ProcessGroup | None = None,
                 data: TrainingData | None = None):
        self._t_start = time.perf_counter()  # (the run's wall time counts its set-up too)
        self.processes = env = processes or ProcessGroup(config.device)
        self.config, self.device = config, env.device
        self.show_progress, self.write = progress and env.main, write and env.main
        self.hooks = (*hooks, *_HOOKED)
        if config.batch_size % env.world:
            raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {env.world} processes")
        torch.manual_seed(config.seed)
        self.data = data if data is not None else load_training_data(config, env, self.show_progress)
        self.data_fingerprint = data_fingerprint(self.data.train_grey)
        self.model = build_model(config, data_dim=self.data.train_grey.shape[1], image_shape=self.data.image_shape,
                                 train_images=self.data.train_fixed).to(self.device)
        if config.amp == "bf16":
            set_autocast(self.model, torch.bfloat16)
        #: the weights' moving average (--ema), or None
        self.ema = WeightAverage(self.model, config.ema) if config.ema > 0 else None
        self.recorder = Recorder(Path(resume) if resume is not None else default_run_dir(config), self.write)
        self.run_dir = self.recorder.run.path
        state = load_checkpoint(self.run_dir / "last.pt") if resume is not None else {}
        #: the counters (epochs done, steps, best epoch) and the --time-limit plan, as checkpoints keep them
        self.progress = Progress.from_state(state, self.run_dir / "last.pt") if state else Progress()
        self.start_epoch = self.progress.epoch
        self.budget = TimeBudget(parse_duration(config.time_limit) if config.time_limit is not None else None,
                                 config.epochs, spent=float(state.get("train_seconds", 0.0)),
                                 planned_epochs=state.get("planned_epochs"), planned_budget=state.get("planned_budget"),
                                 planned_max_epochs=state.get("planned_max_epochs"))
        if state:
            restore_checkpoint(self, state)
        elif env.world > 1:
            torch.manual_seed(derive_seed(config.seed, 0, env.rank))
        #: ``pyro.infer.SVI`` over the model and guide, its ELBO and its optimiser (None for a kind fitted once)
        self.svi, self.elbo, self.optimizer = (build_svi(config, self.model, self.ema, state.get("optimizer"))
                                               if self.model.trains_by_svi else (None, None, None))
        self.recorder.open(self, resumed=bool(state))
        self._params: dict = {"params": {}, "constraints": {}}
        #: seconds of the last epoch's phases (data, steps, validation, checkpoint), for benchmarks
        self.phase_seconds: dict[str, float] = {}
        self.last_row: dict | None = None
        self._warned_components = False
        if env.main:
            _warn_if_kmeans_never_runs(config, self.start_epoch)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the run directory's lock (a trainer that never trains must still do this)."""
        self.recorder.run.release()

    @property
    def planned_epochs(self) -> int | None:
        """The epochs that fit in --time-limit (``None`` without one, or before the plan is made)."""
        return self.budget.planned_epochs

    def averaged(self):
        """A block in which the model holds its averaged weights (with --ema; else the weights as they are)."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def fit(self) -> TrainResult:
        """Train from where the run stands to its end, then score the best epoch on the test split."""
        from tqdm.auto import tqdm

        t_start, c = self._t_start, self.config
        if not self.model.trains_by_svi:
            return self._fit_once(t_start)
        self.budget.resume(self.start_epoch, c.time_limit, self.run_dir)
        bar = tqdm(total=self.planned_epochs or c.epochs, initial=self.start_epoch, desc="train", unit="epoch",
                   disable=not self.show_progress)
        stopped_by, last = "epochs", c.epochs
        if self.budget.stop(self.start_epoch):  # resumed with nothing left of the plan
            stopped_by, last = self.budget.stop(self.start_epoch), self.start_epoch
        try:
            for epoch in range(self.start_epoch, last):
                row = self.epoch(epoch)
                for hook in self.hooks:
                    hook.epoch_end(self, row)
                bar.update(1)
                bar.set_postfix({(k := selection_key(c)): f"{row[k]:.2f}", "best": f"{self.progress.best_val:.2f}"})
                if c.patience and self.progress.since_best >= c.patience:
                    stopped_by = "patience"
                    break
                if self.budget.stop(epoch + 1):
                    stopped_by = self.budget.stop(epoch + 1)
                    break
                if self.planned_epochs is not None and bar.total != self.planned_epochs:
                    bar.total = self.planned_epochs
                    bar.refresh()
        except KeyboardInterrupt:
            bar.close()
            self.recorder.interrupted()
            raise
        except BaseException:
            self.recorder.board.close()
            raise
        bar.close()
        return self._finish(t_start, stopped_by)

    def epoch(self, epoch: int) -> dict:
        """Train one epoch (``epoch`` counted from 0), score the validation split, save the epoch
        (when writing) and return its metrics row."""
        for hook in self.hooks:
            hook.epoch_start(self, epoch)
        c, t0 = self.config, time.perf_counter()
        model, elbo, progress = self.model, self.elbo, self.progress
        if hasattr(model, "prior"):
            model.prior.before_epoch(epoch, lambda: _encode(model, self.data.train_fixed))
        x_epoch = (binarize(self.data.train_grey, derive_seed(c.seed, epoch, 1)) if c.binarize == "dynamic"
                   else self.data.train_fixed)
        batches = epoch_batches(self.data.train_grey.shape[0], self.processes, c, epoch)
        lr = learning_rate(c, epoch, self.budget.horizon())
        self.optimizer.set_lr(lr)
        if hasattr(elbo, "reset_terms"):
            elbo.reset_terms()
        loss_sum, seen = 0.0, 0
        model.train()
        t_steps = time.perf_counter()
        # (the trainer's own Pyro parameter store: two trainers in one process never share names)
        with warnings.catch_warnings(), pyro.validation_enabled(False), pyro.get_param_store().scope(self._params):
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            for step, idx in enumerate(batches):
                loss = self.svi.step(x_epoch[idx], kl_scale(c, epoch, progress.global_step, len(batches)))
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}; "
                                           + _diverged_advice(epoch, self.run_dir))
                loss_sum += loss
                seen += idx.numel()
                progress.global_step += 1
                for hook in self.hooks:
                    hook.step(self, epoch, step, loss)
        t_val = time.perf_counter()  # the loss of each step is a float already: the device is in step
        row = train_row(c, model, elbo, self.processes, [loss_sum, float(seen)], epoch, lr,
                        kl_scale(c, epoch, progress.global_step, len(batches)))
        with self.averaged():
            row.update({f"val_{k}": v for k, v in validation_scores(model, self.data.val, self.processes,
                                                                     validation_samples(c)).items()
                        if v is not None})
            self._warned_components = watch_components(model, self.data.val, row, c, self.processes.main,
                                                       self._warned_components)
        improved = progress.scored(row[selection_key(c)], c)
        t_save = time.perf_counter()
        # the budget's clock: the mean over processes, so that every process makes the same plan
        self.budget.epoch_done(epoch + 1, self.processes.sum([t_save - t0])[0] / self.processes.world)
        if self.planned_epochs is not None:
            row["planned_epochs"] = self.planned_epochs
        self.recorder.epoch(self, row, improved, t0)
        t_end = time.perf_counter()
        self.phase_seconds = {"data": t_steps - t0, "steps": t_val - t_steps, "validation": t_save - t_val,
                              "checkpoint": t_end - t_save, "epoch": t_end - t0}
        self.last_row = row
        return row

    def _fit_once(self, t_start: float) -> TrainResult:
        """A kind fitted in closed form when built (PCA): one row, one checkpoint, same run directory."""
        t0 = time.perf_counter()
        val = split_scores(self.model, self.data.val, num_samples=1)
        row = {"epoch": 1, **{f"val_{k}": v for k, v in val.items() if v is not None}}
        self.progress = Progress(epoch=1, best_val=row.get("val_elbo", math.nan), best_epoch=1)
        self.recorder.epoch(self, row, True, t0)
        self.last_row = row
        return self._finish(t_start, "epochs")

    def _finish(self, t_start: float, stopped_by: str) -> TrainResult:
        for hook in self.hooks:
            hook.end(self)
        test = None
        if self.processes.main:
            self.recorder.restore_best(self.model, self.device)
            test = None if self.config.no_test_score else test_scores(self.config, self.model, self.device)
        p, seconds = self.progress, time.perf_counter() - t_start
        summary = {"epochs_done": p.epoch, "best_epoch": p.best_epoch, "best_val_elbo": p.best_val, "test": test,
                   "selected_by": selection_key(self.config), "stopped_by": stopped_by, "seconds": seconds,
                   "stopped_early": stopped_by == "patience", "train_seconds": self.budget.spent,
                   "peak_rss_mb": _peak_rss_mb()}
        if self.budget.seconds is not None:
            summary.update(time_limit=self.config.time_limit, time_limit_seconds=self.budget.seconds,
                           planned_epochs=self.planned_epochs)
        self.recorder.finish(self.config, summary)
        return TrainResult(self.run_dir if self.write else None, p.epoch, p.best_epoch, p.best_val, test, seconds,
                           stopped_by == "patience", stopped_by, self.planned_epochs)


def restore_checkpoint(trainer: Trainer, state: dict) -> None:
    """Give ``trainer`` what ``state`` (its run's ``last.pt``) keeps besides the counters: the weights, the
    averaged weights (--ema) and each process's random state; ``ValueError`` where the data or the settings
    are not the ones the run was trained with."""
    c, env, last = trainer.config, trainer.processes, trainer.run_dir / "last.pt"
    load_state(trainer.model, state["model"], last)
    stored_print = state.get("data_fingerprint")
    if stored_print is not None and stored_print != trainer.data_fingerprint:
        raise ValueError(f"{c.dataset} in --data-dir {c.data_dir} is not the data {trainer.run_dir} was "
                         "trained on (its training split differs): point --data-dir at that data")
    if trainer.ema is not None:
        if EMA_KEY not in state:
            raise ValueError(f"{last}: holds no averaged weights for --ema: resume it with the settings it "
                             "was trained with")
        trainer.ema.load_state_dict(state[EMA_KEY])
    ranks = state["rng"]
    if len(ranks) == env.world:
        _set_rng_state(ranks[env.rank], trainer.device)
    else:  # another world size: continue deterministically, if not identically
        torch.manual_seed(derive_seed(c.seed, trainer.start_epoch, env.rank))


def _warn_if_kmeans_never_runs(config: TrainConfig, start_epoch: int) -> None:
    if (config.prior_init == "kmeans" and config.prior_init_epochs >= config.epochs
            and start_epoch <= config.prior_init_epochs):
        print(f"pyrovae train: warning: --prior-init-epochs {config.prior_init_epochs} is not below --epochs "
              f"{config.epochs}: the run ends before k-means sets the mixture, so its prior stays N(0, I) "
              "(resume with more --epochs, or lower --prior-init-epochs)", file=sys.stderr)


def checkpoint_state(trainer: Trainer, rng: list) -> dict:
    """The checkpoint of where ``trainer`` stands (:data:`~pyrovae.runs.CHECKPOINT_FORMAT`): settings, the
    model's weights, the optimiser, the counters, the time budget, every process's random state, the
    training data's fingerprint and, with --ema, the averaged weights."""
    t = trainer
    return {
        "format": CHECKPOINT_FORMAT,
        "config": t.config.to_dict(),
        "kind": t.model.kind,
        "data_dim": int(t.data.train_grey.shape[1]),
        "image_shape": list(t.data.image_shape),
        "model": {k: v.detach().cpu() for k, v in t.model.state_dict().items()},
        "optimizer": t.optimizer.get_state() if t.optimizer is not None else {},
        **t.progress.state(),
        **t.budget.state(),
        "rng": rng,
        "data_fingerprint": t.data_fingerprint,
        **({EMA_KEY: t.ema.state_dict()} if t.ema is not None else {}),
    }


def build_svi(config: TrainConfig, model, ema: WeightAverage | None, optimizer_state: dict | None = None):
    """``(SVI, its ELBO, its Optimizer)`` for ``model``: the ELBO of ``--elbo``
    (:func:`~pyrovae.objectives.build_elbo`), Adam (or AdamNormGrad) with ``--clip-norm`` and
    ``--weight-decay``, updating ``ema`` after each step."""
    elbo = build_elbo(config)
    optim = Optimizer(config.lr, config.clip_norm * config.batch_size, config.weight_decay,
                      normalize_grads=config.optimizer == "adamnormgrad", split_fused=config.norm_grad_by == "map",
                      after_step=ema.update if ema is not None else None)
    svi = SVI(model.model, model.guide, optim, loss=elbo)
    if optimizer_state is not None:
        optim.set_state(optimizer_state)
    return svi, elbo, optim


def epoch_batches(num_examples: int, processes: ProcessGroup, config: TrainConfig, epoch: int) -> list[torch.Tensor]:
    """This process's batches of ``epoch``: its ``DistributedSampler`` shard of a shuffle seeded by
    (``--seed``, epoch), in batches of ``--batch-size`` / processes."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(num_examples), num_replicas=processes.world, rank=processes.rank,
                                 shuffle=True, seed=config.seed, drop_last=False)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(iter(sampler)), dtype=torch.long, device=processes.device)
    return list(idx.split(config.batch_size // processes.world))


def train_row(config: TrainConfig, model, elbo, processes: ProcessGroup, sums: list[float], epoch: int, lr: float,
              scale: float) -> dict:
    """The epoch's training figures per example, summed over the processes: the loss (``sums`` =
    [loss, examples]), and the ELBO with its reconstruction and KL terms as the ELBO recorded them
    (for an :attr:`~pyrovae.model.ModelKind.enumerated` kind the loss is -log p(x) itself)."""
    terms = elbo.pop_terms() if hasattr(elbo, "pop_terms") else {}
    recon = float(terms["recon"]) if "recon" in terms else math.nan
    kl = float(terms["kl"]) if "kl" in terms else math.nan
    loss_sum, seen, recon, kl = processes.sum([*sums, recon, kl])
    row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "lr": lr,
           "kl_scale": scale if config.warmup_epochs else 1.0}
    if model.enumerated:
        row["train_elbo"] = -loss_sum / seen
    else:
        row["train_recon"] = recon / seen
        if not math.isnan(kl):
            row["train_kl"] = kl / seen
        row["train_elbo"] = (recon - kl) / seen if not math.isnan(kl) else recon / seen
    return row


def watch_components(model, val: torch.Tensor, row: dict, config: TrainConfig, main: bool, warned: bool) -> bool:
    """For a mixture prior: ``val_components_used`` in the row (:func:`components_in_use`), and one line on
    stderr (on the ``main`` process, unless ``warned`` already) the first time some fall below their share:
    the mixture has then shrunk. Returns whether it has warned."""
    used = components_in_use(model, val)
    if used is None:
        return warned
    row["val_components_used"], k = used, model.prior.num_components
    if used < k and not warned and main:
        # (k-means is advice only for priors that have it and do not use it already)
        kmeans = "kmeans" in model.prior.inits and config.prior_init != "kmeans"
        print(f"pyrovae train: warning: epoch {row['epoch']}: only {used} of the prior's {k} components hold "
              f"{100 * COMPONENT_SHARE / k:.2g}% or more of the validation data (a tenth of an even share); the "
              "mixture is effectively smaller (val_components_used in metrics.jsonl; "
              f"{'--prior-init kmeans or ' if kmeans else ''}fewer components keep them in use)", file=sys.stderr)
        return True
    return warned


def _diverged_advice(epoch: int, run_dir: Path) -> str:
    if epoch == 0:
        return ("no checkpoint was written yet: lower --lr or add --warmup-epochs and train again "
                "(the same command takes the directory over)")
    return (f"the last good checkpoint is {run_dir / 'last.pt'} (epoch {epoch}): lower --lr or add "
            "--warmup-epochs, then --resume")


def selection_key(config: TrainConfig) -> str:
    """The validation figure that picks the best epoch (and that ``--patience`` counts): the figure of
    the bound being trained. ``val_elbo`` for the ELBO; ``val_iwae``, the importance-weighted bound with
    ``--num-particles`` k, for ``--elbo iwae`` with k > 1, which trades ELBO for a tighter bound on
    log p(x): its ELBO may fall while the bound it optimises still rises. (``best_val_elbo`` in
    checkpoints and summaries holds this figure; ``selected_by`` in the summary names it.)"""
    return "val_iwae" if config.elbo == "iwae" and config.num_particles > 1 else "val_elbo"


def validation_samples(config: TrainConfig) -> int:
    """Draws of z per validation image: the k of the IWAE bound that :func:`selection_key` reads, else one."""
    return config.num_particles if selection_key(config) == "val_iwae" else 1


def validation_scores(model, val: torch.Tensor, processes: ProcessGroup, num_samples: int = 1) -> dict:
    """Mean validation scores (:func:`~pyrovae.metrics.split_scores`, ``num_samples`` draws per image,
    the fixed noise of :data:`VAL_SEED`); in a data-parallel run every process scores its share of the
    split and the means are combined, so no process repeats another's work."""
    env, device = processes, processes.device
    shard = val[env.rank :: env.world] if val.shape[0] >= env.world else val
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(VAL_SEED + env.rank)
        scores = split_scores(model, shard, num_samples=num_samples)
    if env.world == 1 or shard is val:
        return scores
    keys = sorted(k for k, v in scores.items() if v is not None)
    n = float(shard.shape[0])
    sums = env.sum([scores[k] * n for k in keys] + [n])
    return {k: total / sums[-1] for k, total in zip(keys, sums)}


def test_scores(config: TrainConfig, model, device) -> dict | None:
    """The test split's ELBO with :data:`TEST_NUM_SAMPLES` samples each (``None``, with a note, where
    the dataset has no test split)."""
    try:
        test = prepare_data(config, "test", device)
    except (FileNotFoundError, ValueError) as e:
        print(f"pyrovae train: note: no test-split score ({' '.join(str(e).split())})", file=sys.stderr)
        return None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(VAL_SEED)
        scores = split_scores(model, test.images, num_samples=TEST_NUM_SAMPLES)
    return {"num_examples": len(test), "num_samples": TEST_NUM_SAMPLES, **scores}


def components_in_use(model, val: torch.Tensor) -> int | None:
    """How many of a mixture prior's K components hold at least :data:`~pyrovae.metrics.COMPONENT_SHARE` / K of the
    validation codes' responsibility; ``None`` without a mixture prior in use (or before k-means has
    set it)."""
    prior = getattr(model, "prior", None)
    if not model.has_posterior or prior is None or prior.num_components < 2:
        return None
    if not getattr(prior, "fitted", torch.tensor(True)):  # k-means has not run yet: N(0, I) for now
        return None
    resp = responsibilities(model, val)
    return component_usage(resp)["components_used"]


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB: ``VmHWM`` where there is ``/proc`` (getrusage's
    maximum would carry over a parent's peak across ``exec``, as for a study's child process),
    else getrusage's; ``None`` where the platform says neither."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            hwm = next((line.split()[1] for line in f if line.startswith("VmHWM:")), None)
        if hwm is not None:
            return int(hwm) / 1024  # kB
    except OSError:
        pass
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return kib / 1024 if sys.platform != "darwin" else kib / 2**20
    except (ImportError, OSError):
        return None


@torch.no_grad()
def _encode(model, images: torch.Tensor) -> torch.Tensor:
    with isolated_params():
        return torch.cat([model.encode(x) for x in images.split(4096)])
