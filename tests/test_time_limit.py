r"""``--time-limit``: the run times its first epochs, fixes how many fit, anneals over exactly those,
stops there, and ``--resume`` continues within what is left (or a raised budget).

The training loop's clock is replaced by one that advances one second per reading, so that every
epoch lasts exactly 3 s (it reads the clock three times from its start to the budget's stop watch) and
the plan is known in advance: with a budget of 30 s the first four epochs are timed (12 s), then
:math:`\lfloor (30 - 12) / 3 \rfloor = 6` more fit, 10 in all. No test reads the wall clock.
"""

from __future__ import annotations

import json
import math
import types

import pytest
from conftest import cli, interrupted_at

import pyrovae.training as training
from pyrovae import TrainConfig, train
from pyrovae.config import parse_duration
from pyrovae.runs import load_checkpoint, read_metrics
from pyrovae.training import Hook


class Pace(Hook):
    """Sets how far the fake clock moves per reading during each epoch: ``step_of(epoch)``."""

    def __init__(self, clock, step_of):
        self.clock, self.step_of = clock, step_of

    def epoch_start(self, trainer, epoch):
        self.clock["step"] = self.step_of(epoch)


@pytest.fixture
def clock(monkeypatch):
    ticks = {"now": 0.0, "step": 1.0}

    def perf_counter():
        ticks["now"] += ticks["step"]
        return ticks["now"]

    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=perf_counter))
    return ticks


def config(tmp_path, name="r", **kw) -> TrainConfig:
    return TrainConfig(**{"dataset": "digits", "hidden_dims": (16,), "latent_dim": 3, "epochs": 1000,
                          "time_limit": "30s", "out": str(tmp_path), "name": name, "no_tensorboard": True, **kw})


def cosine(c: TrainConfig, epoch: int, horizon: int) -> float:
    c = c.resolved()
    return c.lr_min + 0.5 * (c.lr - c.lr_min) * (1 + math.cos(math.pi * epoch / horizon))


def test_the_run_plans_from_its_first_epochs_anneals_over_the_plan_and_stops_there(tmp_path, clock):
    c = config(tmp_path)
    result = train(c, progress=False)
    assert (result.epochs_done, result.planned_epochs, result.stopped_by) == (10, 10, "time_limit")
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert len(rows) == 10
    assert [r.get("planned_epochs") for r in rows] == [None] * 3 + [10] * 7  # the plan is made after epoch 4
    assert [r["lr"] for r in rows[:4]] == [c.resolved().lr] * 4  # the schedule's start while it is timed
    assert [r["lr"] for r in rows[4:]] == pytest.approx([cosine(c, e, 10) for e in range(4, 10)])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["stopped_by"] == "time_limit" and summary["planned_epochs"] == 10
    assert summary["train_seconds"] == 30.0 <= summary["time_limit_seconds"] == 30.0
    state = load_checkpoint(tmp_path / "r" / "last.pt")
    assert (state["planned_epochs"], state["planned_budget"], state["train_seconds"]) == (10, 30.0, 30.0)


def test_a_budget_spent_while_timing_stops_at_once(tmp_path, clock):
    result = train(config(tmp_path, time_limit="5s"), progress=False)
    assert (result.epochs_done, result.planned_epochs, result.stopped_by) == (2, 2, "time_limit")


def test_an_interrupted_run_resumes_the_same_plan_to_the_same_numbers(tmp_path, clock):
    whole = train(config(tmp_path, name="whole"), progress=False)
    with interrupted_at(6, after=True):
        train(config(tmp_path, name="cut"), progress=False)
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 7
    resumed = train(config(tmp_path, name="cut"), resume=tmp_path / "cut", progress=False)
    assert (resumed.epochs_done, resumed.planned_epochs, resumed.stopped_by) == (10, 10, "time_limit")
    a, b = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("whole", "cut"))
    assert [r["val_elbo"] for r in a] == [r["val_elbo"] for r in b] and whole.best_val_elbo == resumed.best_val_elbo
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["train_seconds"] == 30.0


def test_a_raised_budget_plans_again_from_the_measured_pace(tmp_path, clock, capsys):
    train(config(tmp_path), progress=False)
    code, out, err = cli(capsys, "train", "--resume", str(tmp_path / "r"), "--time-limit", "45s", "--quiet")
    assert code == 0, err
    assert "epochs: 15 (best" in out and "fit in --time-limit 45s" in out  # (45 - 30) // 3 = 5 more
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert len(rows) == 15 and rows[-1]["planned_epochs"] == 15
    c = config(tmp_path)
    assert [r["lr"] for r in rows[10:]] == pytest.approx([cosine(c, e, 15) for e in range(10, 15)])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert (summary["time_limit"], summary["planned_epochs"], summary["stopped_by"]) == ("45s", 15, "time_limit")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["time_limit"] == "45s"
    # nothing left of the budget: a resume trains nothing and says so
    code, out, err = cli(capsys, "train", "--resume", str(tmp_path / "r"), "--quiet")
    assert code == 0 and "epochs: 15" in out and len(read_metrics(tmp_path / "r" / "metrics.jsonl")) == 15


def test_a_run_that_slows_down_after_its_plan_shortens_the_plan_to_keep_its_budget(tmp_path, clock, monkeypatch):
    """From epoch 7 on every epoch takes 9 s instead of 3: at epoch 7 the plan of 10 would end at 27 + 3 x 4
    (the mean of the session's epochs after its first) = 39 s, past 30 s by more than 5%, so it shrinks to the
    7 that fit."""
    result = train(config(tmp_path), progress=False, hooks=[Pace(clock, lambda e: 3.0 if e >= 6 else 1.0)])
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r.get("planned_epochs") for r in rows] == [None] * 3 + [10] * 3 + [7]
    assert (result.epochs_done, result.planned_epochs, result.stopped_by) == (7, 7, "time_limit")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["train_seconds"] == 27.0 <= 30.0


def test_a_resumed_sessions_slow_first_epoch_is_spent_but_does_not_set_the_pace(tmp_path, clock, monkeypatch):
    """A 60 s budget: the first four epochs are timed (12 s) and 16 more fit, 20 in all. Interrupted after 7
    epochs (21 s), the run resumes, and the resumed session's first epoch takes 9 s (its set-up). Taken as the
    pace it would cut the plan to 11 (30 s spent + 3 x 9 s); the pace counts only from three epochs after
    it, so at epoch 11 (39 s spent, 9 epochs left at 3 s: 66 s, past 63) the plan becomes the 18 that fit."""
    with interrupted_at(6, after=True):
        train(config(tmp_path, time_limit="60s"), progress=False)
    result = train(config(tmp_path, time_limit="60s"), resume=tmp_path / "r", progress=False,
                   hooks=[Pace(clock, lambda e: 3.0 if e == 7 else 1.0)])
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r.get("planned_epochs") for r in rows[3:]] == [20] * 7 + [18] * 8
    assert (result.epochs_done, result.stopped_by) == (18, "time_limit")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["train_seconds"] == 60.0


def test_a_run_that_speeds_up_after_its_plan_lengthens_the_plan_to_use_its_budget(tmp_path, clock, monkeypatch):
    """The first four epochs take 6 s (24 s of a 60 s budget): 6 more fit at that pace, 10 in all. From
    epoch 5 on every epoch takes 3 s. The session's mean pace (after its first epoch) falls, and the plan is
    made again whenever it would end more than 5% short of the budget: after epoch 5 the mean is 5.25 s, 27 s
    are spent and 5 epochs left would end at 53.25 s, under 57, so the plan becomes 5 + 33 // 5.25 = 11; and
    so on. The run ends inside the 5% band, having spent 57 s in 15 epochs (at the first pace, 60 s in 10).
    The schedule anneals over the plan in force at each epoch."""
    c = config(tmp_path, time_limit="60s")
    result = train(c, progress=False, hooks=[Pace(clock, lambda e: 2.0 if e < 4 else 1.0)])
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    plans = [r["planned_epochs"] for r in rows[3:]]
    assert plans == [10, 11, 12, 13, 13, 14, 14, 14, 15, 15, 15, 15]
    assert (result.epochs_done, result.stopped_by) == (15, "time_limit")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["train_seconds"] == 57.0
    # each epoch's rate is the cosine over the plan as it stood when that epoch began
    assert [r["lr"] for r in rows[4:]] == pytest.approx([cosine(c, e, p) for e, p in zip(range(4, len(rows)), plans)])


@pytest.mark.parametrize("text, seconds", [("900", 900), ("900s", 900), ("45m", 2700), ("1.5h", 5400),
                                           (" 2H ", 7200)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "m", "-5m", "0s", "45 minutes", "1e3s", "nan", "inf", "2d", "9999h"])
def test_a_bad_time_limit_is_one_line_and_exit_2(bad, capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--dataset", "digits", f"--time-limit={bad}", "--out", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--time-limit" in err and "45m" in err, err
    assert not any(tmp_path.iterdir())
