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
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyro
import torch
import torch.distributed as tdist
from pyro.infer import SVI

from .averaging import CHECKPOINT_KEY as EMA_KEY
from .averaging import WeightAverage, averaged_state
from .board import Board
from .budget import TimeBudget
from .config import CONTINUES, PREBINARIZED, RESUMABLE, TrainConfig, parse_duration, resumed_config, unresumable
from .data import Dataset, binarize, check_likelihood, load_dataset, static_binarized
from .files import TMP_SUFFIX, OutputError, dumps, write_json, write_text_atomic
from .marginal import derive_seed, isolated_params
from .metrics import component_usage, responsibilities, split_scores
from .model import build_model
from .nets import set_autocast
from .objectives import Optimizer, build_elbo
from .runs import (
    CHECKPOINT_FORMAT,
    RunLock,
    link_checkpoint,
    load_checkpoint,
    load_state,
    read_metrics,
    save_checkpoint,
)

__all__ = ["train", "train_or_reuse", "TrainResult", "TrainingDiverged", "resolve_device", "prepare_data",
           "count_since_best", "finished_run", "data_fingerprint"]

#: importance samples per example for the test-split ELBO printed at the end of training
TEST_NUM_SAMPLES = 10
#: seed of the validation ELBO's noise: every epoch is scored with the same draws
VAL_SEED = 97
#: a mixture component of K counts as in use while it holds at least this share of 1/K of the
#: validation codes' responsibility (a tenth of an even share: 1% for K = 10)
COMPONENT_SHARE = 0.1


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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of ``--device name`` (``auto``, ``cpu`` or ``cuda``; ``auto`` picks CUDA where there is one),
    the GPU of ``local_rank`` for CUDA; ``ValueError`` for ``cuda`` without a visible device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device must be auto, cpu or cuda (got {name!r})")


@dataclass
class _Data:
    train_grey: torch.Tensor  # (N, D), on device; binarised per epoch when dynamic
    train_fixed: torch.Tensor  # the training images as scored (static-binarised or grey)
    val: torch.Tensor
    image_shape: tuple[int, int]
    train_labels: torch.Tensor | None


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


class _Dist:
    """This process's place in a data-parallel run (world size 1 without torchrun)."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_name, self.local_rank)
        self.owns_group = False
        if self.world > 1 and not tdist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            tdist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def raise_any(self, error: str | None) -> None:
        """Raise ``ValueError`` on every process if any process passes an error message
        (a collective: all processes must call it)."""
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise ValueError(errors[0])

    def close(self, finished: bool = True):
        """Leave the process group. After a finished run every rank first waits for the others:
        a rank that tears gloo down while rank 0 is still evaluating the test split could
        abort ("terminate called without an active exception", seen in 1 of 7 benchmark runs).
        After an error no barrier: the other ranks may never reach it."""
        if self.owns_group and tdist.is_initialized():
            if finished:
                tdist.barrier()
            tdist.destroy_process_group()


#: what resuming needs from last.pt beside the model
_RESUME_KEYS = ("optimizer", "global_step", "best_val_elbo", "best_epoch", "epochs_since_best", "rng")


def _is_run_file(name: str) -> bool:
    """Whether a file of this name is one a pyrovae run writes (before its first checkpoint)."""
    return (name in ("config.json", "metrics.jsonl", "elbo.png", "summary.json", "best.pt")
            or name.startswith("events.out.tfevents.") or (name.startswith(".") and name.endswith(TMP_SUFFIX)))


def _append_line(path: Path, line: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e.strerror}); free some space, then --resume "
                          f"{path.parent}") from None


def _run_dir(config: TrainConfig) -> Path:
    name = config.name or f"{Path(config.dataset).stem}-{config.model}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.out) / name


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
          write: bool = True) -> TrainResult:
    """Train the model of ``config`` (or continue the run in ``resume``) and return a summary.

    ``progress`` shows a tqdm bar over epochs; ``write=False`` keeps everything in memory
    (no run directory), for experiments that only need the numbers.
    """
    t_start = time.perf_counter()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig as its config (got {type(config).__name__}): build one with "
                        "TrainConfig(...) or, from a mapping of settings, TrainConfig.from_dict(...)")
    resume_state = None
    fresh = resume is None  # (a stored run's settings are not checked again by the rules of a new one)
    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: no such run directory; give the folder that pyrovae train printed")
        config = resumed_config(TrainConfig.load(run_dir / "config.json"),
                                {k: getattr(config, k) for k in RESUMABLE}, run_dir)
        if (run_dir / "last.pt").is_file():
            resume_state = load_checkpoint(run_dir / "last.pt")
        else:  # stopped before its first checkpoint: start it again, with its own settings
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"pyrovae train: {run_dir} holds no checkpoint yet (it stopped before its first epoch "
                      "ended): starting it again from epoch 0 with its config.json", file=sys.stderr)
            config = dataclasses.replace(config, out=str(run_dir.parent), name=run_dir.name)
            resume = None
    if fresh:  # its own messages first (the settings' checks), then the rule on unused ones
        config.resolved()
        config.check_used()
    if (config.dataset in PREBINARIZED and config.binarize in ("dynamic", "static")
            and int(os.environ.get("RANK", "0")) == 0 and resume is None):
        print(f"pyrovae train: note: {config.dataset} is binary already (sampled once by its authors); it is "
              f"used as it is, not resampled by --binarize {config.binarize}", file=sys.stderr)
    config = config.resolved()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size % world:  # before joining the process group, so that no process waits for the others
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {world} processes "
                         f"(torchrun --nproc-per-node x --nnodes): use a multiple of {world}")
    env = _Dist(config.device)
    finished = False
    trainer = None
    try:
        trainer = _Trainer(config, env, resume_state, Path(resume) if resume else None, progress, write)
        result = trainer.run(t_start)
        finished = True
        return result
    except KeyboardInterrupt as e:
        # (what the command line tells: a run to --resume, or none yet)
        e.run_dir = trainer.run_dir if trainer is not None and trainer.write else None
        raise
    finally:
        if trainer is not None:
            trainer.lock.release()
        env.close(finished)



def train_or_reuse(config: TrainConfig, *, progress: bool = True, fix: str = "choose another --out",
                   ignore: tuple[str, ...] = ("out", "name"),
                   reuse_from: str | os.PathLike | list[str | os.PathLike] | None = None) -> tuple[Path, str]:
    """The run of ``config`` in ``config.out/config.name``, for studies that must survive an
    interruption: ``"reused"`` when it finished there before, ``"resumed"`` when it was
    interrupted (from ``last.pt``), ``"trained"`` otherwise. Returns ``(run_dir, how)``.

    ``reuse_from``: a folder of runs (another study's ``runs/``), or a list of them searched in
    order; a finished run there with the same settings (but those in ``ignore``) is used
    instead of training again (``"reused"``).

    Refuses, with ``ValueError`` ending in ``fix``, a directory trained with other settings
    (any resolved setting but those in ``ignore``, and those a resume may change: a run whose
    ``--time-limit`` or ``--epochs`` was raised is resumed), and one holding files that are not
    a pyrovae run's; a run killed before its first checkpoint is started again.
    """
    wanted = config.resolved().to_dict()
    folders = reuse_from if isinstance(reuse_from, list) else [] if reuse_from is None else [reuse_from]
    for candidate in (c for f in folders if Path(f).is_dir() for c in sorted(Path(f).iterdir())):
        if (candidate / "summary.json").is_file() and (candidate / "config.json").is_file():
            try:
                stored = TrainConfig.load(candidate / "config.json").to_dict()
            except (ValueError, FileNotFoundError):
                continue
            if all(stored.get(k) == v for k, v in wanted.items() if k not in ignore):
                return candidate, "reused"
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
    if run_dir.exists() and any(not _is_run_file(p.name) for p in run_dir.iterdir()):
        raise ValueError(f"{run_dir} holds files that are not a pyrovae run's: remove it or {fix}")
    train(config, progress=progress)  # (a run killed before its first checkpoint is taken over)
    return run_dir, "trained"


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


class _Trainer:
    def __init__(self, config: TrainConfig, env: _Dist, resume_state, resume_dir, progress: bool, write: bool):
        self.config, self.env, self.progress = config, env, progress and env.main
        self.device = env.device
        self.write = write and env.main
        if config.batch_size % env.world:
            raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {env.world} processes")
        torch.manual_seed(config.seed)
        self.data = self._load_data()
        self.data_fingerprint = data_fingerprint(self.data.train_grey)
        self.model = build_model(config, data_dim=self.data.train_grey.shape[1], image_shape=self.data.image_shape,
                                 train_images=self.data.train_fixed).to(self.device)
        if config.amp == "bf16":
            set_autocast(self.model, torch.bfloat16)
        #: the weights' moving average (--ema), or None
        self.ema = WeightAverage(self.model, config.ema) if config.ema > 0 else None
        self.run_dir = resume_dir or _run_dir(config)
        self.lock = RunLock(self.run_dir if self.write else None)
        self._pending_resume = False
        self.start_epoch, self.global_step = 0, 0
        self.best_val, self.best_epoch, self.since_best = -math.inf, 0, 0
        #: seconds of training epochs so far (over every session of a resumed run), and the --time-limit plan
        saved = resume_state or {}  # (a resumed run's seconds spent and plan)
        self.budget = TimeBudget(parse_duration(config.time_limit) if config.time_limit is not None else None,
                                 config.epochs, spent=float(saved.get("train_seconds", 0.0)),
                                 planned_epochs=saved.get("planned_epochs"),
                                 planned_budget=saved.get("planned_budget"),
                                 planned_max_epochs=saved.get("planned_max_epochs"))
        self.resume_state = resume_state
        if resume_state is not None:
            missing = [k for k in _RESUME_KEYS if k not in resume_state]
            if missing:
                raise ValueError(f"{self.run_dir / 'last.pt'}: a damaged checkpoint ({', '.join(missing)} missing); "
                                 "resume from an intact last.pt or train again")
            load_state(self.model, resume_state["model"], self.run_dir / "last.pt")
            stored_print = resume_state.get("data_fingerprint")
            if stored_print is not None and stored_print != self.data_fingerprint:
                raise ValueError(f"{config.dataset} in --data-dir {config.data_dir} is not the data {self.run_dir} was "
                                 "trained on (its training split differs): point --data-dir at that data")
            if self.ema is not None:
                if EMA_KEY not in resume_state:
                    raise ValueError(f"{self.run_dir / 'last.pt'}: holds no averaged weights for --ema: resume it "
                                     "with the settings it was trained with")
                self.ema.load_state_dict(resume_state[EMA_KEY])
            self.start_epoch = int(resume_state["epoch"])
            self.global_step = int(resume_state["global_step"])
            self.best_val = float(resume_state["best_val_elbo"])
            self.best_epoch = int(resume_state["best_epoch"])
            self.since_best = int(resume_state["epochs_since_best"])
            ranks = resume_state["rng"]
            if len(ranks) == env.world:
                _set_rng_state(ranks[env.rank], self.device)
            else:  # another world size: continue deterministically, if not identically
                torch.manual_seed(derive_seed(config.seed, self.start_epoch, env.rank))
        elif env.world > 1:
            torch.manual_seed(derive_seed(config.seed, 0, env.rank))
        error = None
        if self.write:
            try:
                self._prepare_run_dir()
            except ValueError as e:
                error = str(e)
            except BaseException:
                self.lock.release()
                raise
        if error:
            self.lock.release()
        env.raise_any(error)  # every process learns of rank 0's error, or the others would wait forever
        self.board = Board(self.run_dir, enabled=self.write and not config.no_tensorboard,
                           start_epoch=self.start_epoch, images_every=config.tensorboard_images_every,
                           image_shape=self.data.image_shape, val_images=self.data.val, seed=config.seed)
        #: seconds of the last epoch's phases (steps, validation, checkpoint), for benchmarks
        self.phase_seconds: dict[str, float] = {}
        self._warned_components = False
        self._epochs_this_session = 0
        if (env.main and config.prior_init == "kmeans" and config.prior_init_epochs >= config.epochs
                and self.start_epoch <= config.prior_init_epochs):
            print(f"pyrovae train: warning: --prior-init-epochs {config.prior_init_epochs} is not below --epochs "
                  f"{config.epochs}: the run ends before k-means sets the mixture, so its prior stays N(0, I) "
                  "(resume with more --epochs, or lower --prior-init-epochs)", file=sys.stderr)

    # --- set-up ----------------------------------------------------------------------
    def _load_data(self) -> _Data:
        c = self.config
        if c.download and self.env.world > 1:
            # rank 0 fetches the files while the others wait (a download each would race)
            error = None
            if self.env.main:
                try:
                    load_dataset(c.dataset, "train", data_dir=c.data_dir, label_column=c.label_column, download=True,
                                 progress=self.progress)
                except (ValueError, FileNotFoundError) as e:
                    error = str(e)
            self.env.raise_any(error)
            c = dataclasses.replace(c, download=False)
        train = load_dataset(c.dataset, "train", data_dir=c.data_dir, label_column=c.label_column,
                             download=c.download, progress=self.progress)
        if len(train) == 0:
            raise ValueError(f"{c.dataset}: the training split is empty")
        train = train.to(self.device)
        if c.binarize == "none":
            check_likelihood(train, c.likelihood, "none")
        val = prepare_data(c, "val", self.device)
        fixed = static_binarized(train).images if c.binarize != "none" else train.images
        return _Data(train.images, fixed, val.images, train.image_shape, train.labels)

    def _prepare_run_dir(self) -> None:
        """Take the run directory: a new run creates it (or takes over one that an earlier run
        left without a checkpoint); a resumed run only reads it: nothing in it changes until
        the first new epoch has finished (:meth:`_commit_resume`)."""
        d = self.run_dir
        self.lock.acquire()
        if self.resume_state is None:
            if d.exists() and any(d.iterdir()):
                names = {p.name for p in d.iterdir()}
                if "last.pt" in names:
                    raise ValueError(f"{d} already exists: continue it with --resume {d}, or choose another --name")
                foreign = sorted(n for n in names if not _is_run_file(n))
                if foreign:
                    raise ValueError(f"{d} holds files that are not a pyrovae run's ({', '.join(foreign[:3])}): "
                                     "choose another --name or --out")
                print(f"pyrovae train: {d} holds no checkpoint (an earlier run stopped before its first epoch "
                      "ended): taking it over", file=sys.stderr)
                for p in d.iterdir():
                    p.unlink()
            d.mkdir(parents=True, exist_ok=True)
            self.config.save(d / "config.json")
            write_text_atomic(d / "metrics.jsonl", "")
        else:
            # read now, so that a damaged file stops the resume before anything is trained or written
            self._resume_rows = [r for r in read_metrics(d / "metrics.jsonl") if r["epoch"] <= self.start_epoch]
            self._pending_resume = True

    def _commit_resume(self) -> None:
        """After the first new epoch of a resumed run: write its settings back (e.g. more
        --epochs), drop metric rows of an epoch that was not checkpointed (killed in between),
        and remove temporary files that killed writes left."""
        d = self.run_dir
        self._pending_resume = False
        if TrainConfig.load(d / "config.json") != self.config:
            self.config.save(d / "config.json")
        write_text_atomic(d / "metrics.jsonl", "".join(dumps(r, indent=None) + "\n" for r in self._resume_rows))
        # the run is no longer finished: its summary is written again at its end
        (d / "summary.json").unlink(missing_ok=True)
        for p in d.glob(f".*{TMP_SUFFIX}"):
            try:
                p.unlink()
            except OSError:
                pass

    def _batches(self, epoch: int) -> list[torch.Tensor]:
        from torch.utils.data import DistributedSampler

        n = self.data.train_grey.shape[0]
        sampler = DistributedSampler(range(n), num_replicas=self.env.world, rank=self.env.rank, shuffle=True,
                                     seed=self.config.seed, drop_last=False)
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(iter(sampler)), dtype=torch.long, device=self.device)
        return list(idx.split(self.config.batch_size // self.env.world))

    def _train_images(self, epoch: int) -> torch.Tensor:
        c = self.config
        if c.binarize == "dynamic":
            return binarize(self.data.train_grey, derive_seed(c.seed, epoch, 1))
        return self.data.train_fixed

    def _lr(self, epoch: int) -> float:
        """The schedule's learning rate of ``epoch``: cosine over --epochs, or over the planned epochs of a
        --time-limit run (while its first epochs are timed, the schedule's start, --lr)."""
        c = self.config
        horizon = self.budget.horizon()
        if c.lr_schedule == "constant" or horizon is None:
            return c.lr
        return c.lr_min + 0.5 * (c.lr - c.lr_min) * (1 + math.cos(math.pi * min(epoch, horizon) / horizon))

    @property
    def planned_epochs(self) -> int | None:
        """The epochs that fit in --time-limit (``None`` without one, or before the plan is made)."""
        return self.budget.planned_epochs

    def _kl_scale(self, epoch: int, steps_per_epoch: int) -> float:
        """The KL warm-up's weight at this step of ``epoch`` (counted from 0): grown per step, or with
        ``--warmup-unit epoch`` held at (epoch + 1) / --warmup-epochs for the whole epoch."""
        w = self.config.warmup_epochs
        if w == 0:
            return 1.0
        if self.config.warmup_unit == "epoch":
            return min(1.0, (epoch + 1) / w)
        return min(1.0, (self.global_step + 1) / (w * steps_per_epoch))

    # --- the loop ----------------------------------------------------------------------
    def run(self, t_start: float) -> TrainResult:
        from tqdm.auto import tqdm

        c = self.config
        if c.model == "pca":
            return self._fit_pca(t_start)
        svi, elbo, optim = self._objective()
        self.budget.resume(self.start_epoch, c.time_limit, self.run_dir)
        bar = tqdm(total=self.planned_epochs or c.epochs, initial=self.start_epoch, desc="train", unit="epoch",
                   disable=not self.progress)
        stopped_early, epochs_done, stopped_by = False, self.start_epoch, "epochs"
        last = c.epochs
        if self.budget.stop(self.start_epoch):  # resumed with nothing left of the plan
            stopped_by, last = self.budget.stop(self.start_epoch), self.start_epoch
        try:
            with pyro.get_param_store().scope():
                for epoch in range(self.start_epoch, last):
                    row = self._epoch(epoch, svi, elbo, optim)
                    epochs_done = epoch + 1
                    bar.update(1)
                    bar.set_postfix(val_elbo=f"{row['val_elbo']:.2f}", best=f"{self.best_val:.2f}")
                    if c.patience and self.since_best >= c.patience:
                        stopped_early, stopped_by = True, "patience"
                        break
                    if self.budget.stop(epochs_done):
                        stopped_by = self.budget.stop(epochs_done)
                        break
                    if self.planned_epochs is not None and bar.total != self.planned_epochs:
                        bar.total = self.planned_epochs
                        bar.refresh()
        except KeyboardInterrupt:
            bar.close()
            self.board.close()
            if self.write and self._epochs_this_session:
                self._plot()
            raise
        except BaseException:
            self.board.close()
            raise
        bar.close()
        return self._finish(t_start, epochs_done, stopped_early, stopped_by)

    def _objective(self) -> tuple[SVI, object, Optimizer]:
        c = self.config
        elbo = build_elbo(c)
        optim = Optimizer(c.lr, c.clip_norm * c.batch_size, c.weight_decay,
                          normalize_grads=c.optimizer == "adamnormgrad",
                          after_step=self.ema.update if self.ema is not None else None)
        svi = SVI(self.model.model, self.model.guide, optim, loss=elbo)
        if self.resume_state is not None:
            optim.set_state(self.resume_state["optimizer"])
        return svi, elbo, optim

    def _epoch(self, epoch: int, svi: SVI, elbo, optim) -> dict:
        c, t0 = self.config, time.perf_counter()
        model = self.model
        if hasattr(model, "prior"):
            model.prior.before_epoch(epoch, lambda: _encode(model, self.data.train_fixed))
        x_epoch = self._train_images(epoch)
        batches = self._batches(epoch)
        optim.set_lr(self._lr(epoch))
        if hasattr(elbo, "reset_terms"):
            elbo.reset_terms()
        loss_sum, seen = 0.0, 0
        model.train()
        t_steps = time.perf_counter()
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            for step, idx in enumerate(batches):
                loss = svi.step(x_epoch[idx], self._kl_scale(epoch, len(batches)))
                if not math.isfinite(loss):
                    if epoch == 0:
                        where = ("no checkpoint was written yet: lower --lr or add --warmup-epochs and train again "
                                 "(the same command takes the directory over)")
                    else:
                        where = (f"the last good checkpoint is {self.run_dir / 'last.pt'} (epoch {epoch}): lower "
                                 "--lr or add --warmup-epochs, then --resume")
                    raise TrainingDiverged(f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}; {where}")
                loss_sum += loss
                seen += idx.numel()
                self.global_step += 1
        t_val = time.perf_counter()  # the loss of each step is a float already: the device is in step
        terms = elbo.pop_terms() if hasattr(elbo, "pop_terms") else {}
        recon = float(terms["recon"]) if "recon" in terms else math.nan
        kl = float(terms["kl"]) if "kl" in terms else math.nan
        loss_sum, seen, recon, kl = self.env.sum([loss_sum, float(seen), recon, kl])
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "lr": self._lr(epoch),
               "kl_scale": self._kl_scale(epoch, len(batches)) if c.warmup_epochs else 1.0}
        if c.model == "mixture":
            row["train_elbo"] = -loss_sum / seen  # exact: the component is summed out
        else:
            row["train_recon"] = recon / seen
            if not math.isnan(kl):
                row["train_kl"] = kl / seen
            row["train_elbo"] = (recon - kl) / seen if not math.isnan(kl) else recon / seen
        with self._averaged():
            val = self._val_scores()
            row.update({f"val_{k}": v for k, v in val.items() if v is not None})
            self._watch_components(row)
        improved = row["val_elbo"] > self.best_val
        if improved:
            self.best_val, self.best_epoch = row["val_elbo"], epoch + 1
        self.since_best = count_since_best(self.since_best, improved, epoch + 1, c.warmup_epochs,
                                           c.patience_after_warmup)
        t_save = time.perf_counter()
        # the budget's clock: the mean over processes, so that every process makes the same plan
        seconds = self.env.sum([t_save - t0])[0] / self.env.world
        self.budget.epoch_done(epoch + 1, seconds)
        if self.planned_epochs is not None:
            row["planned_epochs"] = self.planned_epochs
        rng = self.env.gather(_rng_state(self.device))
        if self.write:
            if hasattr(model, "fit_code_distribution"):
                with self._averaged():
                    model.fit_code_distribution(self.data.train_fixed)
            state = self._state(epoch + 1, optim, rng)
            row["epoch_seconds"] = time.perf_counter() - t0
            if self._pending_resume:
                self._commit_resume()
            _append_line(self.run_dir / "metrics.jsonl", dumps(row, indent=None))
            save_checkpoint(state, self.run_dir / "last.pt")
            self._epochs_this_session += 1
            if improved:
                link_checkpoint(self.run_dir / "last.pt", self.run_dir / "best.pt")
            with self._averaged():
                self.board.epoch(row, model)
        else:
            row["epoch_seconds"] = time.perf_counter() - t0
            if improved:
                with self._averaged():
                    self._best_in_memory = {k: v.detach().clone() for k, v in model.state_dict().items()}
        t_end = time.perf_counter()
        self.phase_seconds = {"data": t_steps - t0, "steps": t_val - t_steps, "validation": t_save - t_val,
                              "checkpoint": t_end - t_save, "epoch": t_end - t0}
        self.last_row = row
        return row

    def _averaged(self):
        """A block in which the model holds its averaged weights (with --ema; else the weights as they are)."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def _watch_components(self, row: dict) -> None:
        """For a mixture prior: how many components hold at least :data:`COMPONENT_SHARE` / K of the
        validation codes' responsibility (``val_components_used`` in the metrics), and one line
        on stderr the first time some fall below it (the mixture has then shrunk)."""
        prior = getattr(self.model, "prior", None)
        if prior is None or not getattr(self.model, "has_posterior", False) or prior.num_components < 2:
            return
        if not getattr(prior, "fitted", torch.tensor(True)):  # k-means has not run yet: N(0, I) for now
            return
        resp = responsibilities(self.model, self.data.val)
        k = resp.shape[1]
        usage = component_usage(resp, COMPONENT_SHARE / k)
        row["val_components_used"] = usage["components_used"]
        if usage["components_used"] < k and not self._warned_components and self.env.main:
            self._warned_components = True
            # (k-means is advice only for priors that have it and do not use it already)
            kmeans = "kmeans" in prior.inits and self.config.prior_init != "kmeans"
            print(f"pyrovae train: warning: epoch {row['epoch']}: only {usage['components_used']} of the prior's {k} "
                  f"components hold {100 * COMPONENT_SHARE / k:.2g}% or more of the validation data (a tenth of an "
                  "even share); the mixture is effectively smaller (val_components_used in metrics.jsonl; "
                  f"{'--prior-init kmeans or ' if kmeans else ''}fewer components keep them in use)", file=sys.stderr)

    def _val_scores(self) -> dict:
        """Mean validation scores, with fixed noise; in a data-parallel run every process
        scores its share of the split and the means are combined, so no process repeats
        another's work."""
        env, val = self.env, self.data.val
        shard = val[env.rank :: env.world] if val.shape[0] >= env.world else val
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(VAL_SEED + env.rank)
            scores = split_scores(self.model, shard, num_samples=1)
        if env.world == 1 or shard is val:
            return scores
        keys = sorted(k for k, v in scores.items() if v is not None)
        n = float(shard.shape[0])
        sums = env.sum([scores[k] * n for k in keys] + [n])
        return {k: total / sums[-1] for k, total in zip(keys, sums)}

    def _state(self, epochs_done: int, optim, rng: list) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "kind": self.model.kind,
            "data_dim": int(self.data.train_grey.shape[1]),
            "image_shape": list(self.data.image_shape),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": optim.get_state() if optim is not None else {},
            "epoch": epochs_done,
            "global_step": self.global_step,
            "best_val_elbo": self.best_val,
            "best_epoch": self.best_epoch,
            "epochs_since_best": self.since_best,
            **self.budget.state(),
            "rng": rng,
            "data_fingerprint": self.data_fingerprint,
            **({EMA_KEY: self.ema.state_dict()} if self.ema is not None else {}),
        }

    # --- PCA: one fit, same run directory ------------------------------------------------
    def _fit_pca(self, t_start: float) -> TrainResult:
        t0 = time.perf_counter()
        val = split_scores(self.model, self.data.val, num_samples=1)
        row = {"epoch": 1, **{f"val_{k}": v for k, v in val.items() if v is not None}}
        self.best_val, self.best_epoch = row.get("val_elbo", math.nan), 1
        if self.write:
            row["epoch_seconds"] = time.perf_counter() - t0
            _append_line(self.run_dir / "metrics.jsonl", dumps(row, indent=None))
            save_checkpoint(self._state(1, None, self.env.gather(_rng_state(self.device))), self.run_dir / "last.pt")
            link_checkpoint(self.run_dir / "last.pt", self.run_dir / "best.pt")
        self.last_row = row
        return self._finish(t_start, 1, False, "epochs")

    # --- the end ---------------------------------------------------------------------------
    def _finish(self, t_start: float, epochs_done: int, stopped_early: bool, stopped_by: str) -> TrainResult:
        test = None
        if self.env.main:
            if self.write:
                best = load_checkpoint(self.run_dir / "best.pt", map_location=self.device)
                load_state(self.model, averaged_state(best), self.run_dir / "best.pt")
            elif getattr(self, "_best_in_memory", None) is not None:
                self.model.load_state_dict(self._best_in_memory)
            test = self._test_scores()
        seconds = time.perf_counter() - t_start
        result = TrainResult(self.run_dir if self.write else None, epochs_done, self.best_epoch, self.best_val, test,
                             seconds, stopped_early, stopped_by, self.planned_epochs)
        if self.write:
            self._plot()
            summary = {"epochs_done": epochs_done, "best_epoch": self.best_epoch, "best_val_elbo": self.best_val,
                       "stopped_early": stopped_early, "stopped_by": stopped_by, "test": test, "seconds": seconds,
                       "train_seconds": self.budget.spent, "peak_rss_mb": _peak_rss_mb()}
            if self.budget.seconds is not None:
                summary.update(time_limit=self.config.time_limit, time_limit_seconds=self.budget.seconds,
                               planned_epochs=self.planned_epochs)
            write_json(self.run_dir / "summary.json", summary)
            self.board.finish(self.config.to_dict(), {"best_val_elbo": self.best_val, "epochs_done": epochs_done,
                                                      **({"test_elbo": test["elbo"]} if test and test.get("elbo")
                                                         is not None else {})})
        return result

    def _test_scores(self) -> dict | None:
        try:
            test = prepare_data(self.config, "test", self.device)
        except (FileNotFoundError, ValueError) as e:
            print(f"pyrovae train: note: no test-split score ({' '.join(str(e).split())})", file=sys.stderr)
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(VAL_SEED)
            scores = split_scores(self.model, test.images, num_samples=TEST_NUM_SAMPLES)
        return {"num_examples": len(test), "num_samples": TEST_NUM_SAMPLES, **scores}

    def _plot(self) -> None:
        from .plots import plot_training_curves

        rows = read_metrics(self.run_dir / "metrics.jsonl")
        if rows:
            plot_training_curves(rows, self.run_dir / "elbo.png")


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
