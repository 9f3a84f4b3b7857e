"""The wall-clock budget of ``--time-limit``, as a plan: seconds of epochs in, epochs to train out.

Nothing here reads a clock or a file: the trainer reports each epoch's seconds (:meth:`TimeBudget.epoch_done`)
and asks for the plan (:attr:`TimeBudget.planned_epochs`), and the checkpoint keeps :meth:`TimeBudget.state`.

- The first :data:`PROBE_EPOCHS` epochs after a session's first are timed; the plan is then how many epochs fit
  in what is left of the budget at their mean pace (the first epoch's one-off set-up is spent from the budget
  but is not taken as the pace), at most ``--epochs``.
- Should the session's pace later change so that the plan would end more than :data:`OVERRUN` of the budget
  past it or short of it, the plan is made again at the session's mean pace (the mean, not the last few epochs':
  a minute of other work must not move a long plan much).
- A resumed run keeps its plan while its budget and ``--epochs`` are the ones the plan was made for; otherwise,
  or when it was stopped before it had a plan, it plans again at once from the mean seconds of the epochs it has
  run. A budget already spent is refused.
"""

from __future__ import annotations

import math

__all__ = ["TimeBudget", "PROBE_EPOCHS", "OVERRUN"]

#: epochs timed before a plan is made (after a session's first, whose one-off set-up is spent from the budget but
#: not taken as the pace)
PROBE_EPOCHS = 3
#: the plan is made again when, at the session's mean pace, it would end more than this share of the budget past it
#: or short of it
OVERRUN = 0.05


class TimeBudget:
    """The plan of a run with ``seconds`` of budget (``None``: no budget) and at most ``max_epochs`` epochs.

    ``spent``, ``planned_epochs``, ``planned_budget`` and ``planned_max_epochs`` restore a checkpoint's
    :meth:`state` (the budget and ``--epochs`` the plan was made under: a resume with others plans again).
    """

    def __init__(self, seconds: float | None, max_epochs: int, *, spent: float = 0.0,
                 planned_epochs: int | None = None, planned_budget: float | None = None,
                 planned_max_epochs: int | None = None):
        self.seconds, self.max_epochs = seconds, max_epochs
        self.spent = float(spent)
        self.planned_epochs, self.planned_budget, self.planned_max_epochs = planned_epochs, planned_budget, \
            planned_max_epochs
        self.session: list[float] = []  # seconds of this session's epochs

    def state(self) -> dict:
        """What a checkpoint keeps: seconds spent and the plan."""
        return {"train_seconds": self.spent, "planned_epochs": self.planned_epochs,
                "planned_budget": self.planned_budget, "planned_max_epochs": self.planned_max_epochs}

    @property
    def pace(self) -> float:
        """Mean seconds of this session's epochs, without its first (when there are others)."""
        epochs = self.session[1:] or self.session
        return sum(epochs) / len(epochs)

    def plan(self, epochs_done: int, seconds_per_epoch: float) -> None:
        """Fix how many epochs fit in what is left at ``seconds_per_epoch`` (at most ``max_epochs``)."""
        left = max(0.0, self.seconds - self.spent)
        fit = int(left // seconds_per_epoch) if seconds_per_epoch > 0 else self.max_epochs
        self.planned_epochs = max(epochs_done, min(self.max_epochs, epochs_done + fit))
        self.planned_budget, self.planned_max_epochs = self.seconds, self.max_epochs

    def epoch_done(self, epochs_done: int, seconds: float) -> None:
        """Count an epoch of ``seconds``; make the plan once the probe epochs are timed (or the budget is
        spent), or follow the session's pace."""
        self.spent += seconds
        self.session.append(seconds)
        if self.seconds is None:
            return
        if self.planned_epochs is None:
            if len(self.session) > PROBE_EPOCHS or self.spent >= self.seconds:
                self.plan(epochs_done, self.pace)
            return
        if len(self.session) <= PROBE_EPOCHS or epochs_done >= self.planned_epochs:
            return
        end = self.spent + (self.planned_epochs - epochs_done) * self.pace
        late = end > self.seconds * (1 + OVERRUN)
        early = end < self.seconds * (1 - OVERRUN) and self.planned_epochs < self.max_epochs
        if late or early:
            self.plan(epochs_done, self.pace)

    def resume(self, epochs_done: int, time_limit: str, run: object) -> None:
        """Before a resumed session: keep the plan, or plan again at once (see the module's docstring);
        ``ValueError`` for a new budget already spent (``time_limit`` and ``run`` name it)."""
        if self.seconds is None or epochs_done == 0:
            return
        if self.seconds <= self.spent and self.seconds != self.planned_budget:
            raise ValueError(f"--time-limit {time_limit} is no more than the {self.spent:.0f} s {run} has trained "
                             f"already: give a longer budget to train on (such as --time-limit "
                             f"{math.ceil((self.spent + 60) / 60)}m)")
        same = (self.planned_epochs is not None and self.planned_budget == self.seconds
                and self.planned_max_epochs in (None, self.max_epochs)
                and (self.planned_max_epochs is not None or self.planned_epochs <= self.max_epochs))
        if not same:
            self.plan(epochs_done, self.spent / epochs_done)

    def horizon(self) -> int | None:
        """The epochs the learning-rate schedule anneals over: the plan (``None`` until it is made), or
        ``max_epochs`` without a budget."""
        return self.max_epochs if self.seconds is None else self.planned_epochs

    def stop(self, epochs_done: int) -> str | None:
        """What ends the run after ``epochs_done`` epochs: ``"epochs"`` (a plan as long as ``max_epochs``),
        ``"time_limit"`` (the budget's plan), or ``None`` to go on."""
        if self.planned_epochs is None or epochs_done < self.planned_epochs:
            return None
        return "epochs" if self.planned_epochs >= self.max_epochs else "time_limit"
