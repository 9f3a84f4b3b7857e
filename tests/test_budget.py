"""The --time-limit plan as a pure unit: seconds of epochs in, the plan out (no clock, no files)."""

from __future__ import annotations

import pytest

from pyrovae.budget import OVERRUN, PROBE_EPOCHS, TimeBudget


def run(budget: TimeBudget, seconds: list[float], start: int = 0) -> list[int | None]:
    plans = []
    for i, s in enumerate(seconds):
        budget.epoch_done(start + i + 1, s)
        plans.append(budget.planned_epochs)
    return plans


def test_the_plan_is_made_after_the_probe_from_the_pace_without_the_first_epoch():
    b = TimeBudget(30.0, 1000)
    plans = run(b, [10.0, 2.0, 2.0, 2.0])  # a slow first epoch (set-up), then 2 s each
    assert PROBE_EPOCHS == 3 and plans == [None, None, None, 4 + (30 - 16) // 2]
    assert b.horizon() == 11 and b.stop(10) is None and b.stop(11) == "time_limit"


def test_a_plan_as_long_as_max_epochs_stops_by_epochs():
    b = TimeBudget(3600.0, 5)
    run(b, [1.0] * 4)
    assert b.planned_epochs == 5 and b.stop(5) == "epochs"


def test_without_a_budget_there_is_no_plan_and_the_horizon_is_max_epochs():
    b = TimeBudget(None, 7)
    run(b, [1.0] * 5)
    assert b.planned_epochs is None and b.horizon() == 7 and b.stop(7) is None and b.spent == 5.0


def test_a_slower_session_shortens_the_plan_and_a_faster_one_lengthens_it():
    b = TimeBudget(40.0, 1000)
    run(b, [1.0, 2.0, 2.0, 2.0])  # planned at 4 + 33 // 2 = 20
    assert b.planned_epochs == 20
    run(b, [8.0] * 3, start=4)  # mean pace now (2*3 + 8*3) / 6 = 5 s: 20 epochs would end far past 40 s
    assert b.planned_epochs < 20
    b2 = TimeBudget(40.0, 1000)
    run(b2, [1.0, 4.0, 4.0, 4.0])  # planned at 4 + 27 // 4 = 10
    run(b2, [0.5] * 4, start=4)
    assert b2.planned_epochs > 10
    assert OVERRUN == 0.05


def test_a_resume_keeps_its_plan_replans_on_a_new_budget_or_epochs_and_refuses_a_spent_one():
    state = {"spent": 20.0, "planned_epochs": 10, "planned_budget": 30.0, "planned_max_epochs": 1000}
    same = TimeBudget(30.0, 1000, **state)
    same.resume(8, "30s", "run")
    assert same.planned_epochs == 10
    longer = TimeBudget(60.0, 1000, **state)
    longer.resume(8, "60s", "run")
    assert longer.planned_epochs == 8 + int(40 // 2.5)  # at the mean pace of the 8 epochs run: 20 s / 8
    fewer = TimeBudget(30.0, 9, **state)
    fewer.resume(8, "30s", "run")
    assert fewer.planned_epochs == 9 and fewer.stop(9) == "epochs"
    with pytest.raises(ValueError, match="no more than the 20 s run has trained"):
        TimeBudget(15.0, 1000, **state).resume(8, "15s", "run")
    unplanned = TimeBudget(30.0, 1000, spent=6.0)  # killed after 2 epochs, before its plan
    unplanned.resume(2, "30s", "run")
    assert unplanned.planned_epochs == 2 + int(24 // 3)
