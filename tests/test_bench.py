"""experiments/bench.py runs end to end in --quick mode and writes its JSON and table.

No assertion here is about time: timings are the benchmark's to report, measured against its
own reference in the same run. What is checked is that every section produced its figures,
and one piece of maths: the plain loop and pyrovae optimise the same estimator.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT


def _run_bench(out, *flags):
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench.py"), "--quick", "--out", str(out), *flags],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_bench_quick_writes_every_section(tmp_path):
    r, res, md = _run_bench(tmp_path, "--sections", "main,profile,variants,scaling,memory,log_px")
    assert md.strip() in r.stdout  # printed as well as written
    # the two loops optimise the same estimator: same value and gradient for the same weights and noise
    assert res["same_objective"]["loss_rel_diff"] < 1e-5
    assert res["same_objective"]["grad_rel_diff"] < 1e-4
    main = res["main"]["1"]
    for arm in ("plain", "svi", "pyrovae"):
        assert main[arm]["ms_per_step"] > 0 and main[arm]["ms_per_epoch"] > 0
    p = main["pyrovae"]
    assert p["step_ratio"] > 0 and p["epoch_ratio"] > 0
    # the epoch's phases add up to (at most) the epoch
    assert p["ms_steps"] + p["ms_validation"] + p["ms_checkpoint"] <= p["ms_per_epoch"] * 1.001
    assert "pyrovae against the plain loop" in md and "Where pyrovae's step goes" in md
    shares = [g["share"] for g in res["profile"]["groups"].values()]
    assert math.isclose(sum(shares), 1.0, rel_tol=1e-6)
    assert "svi JitTrace_ELBO" in res["variants"]
    assert [row["train_size"] for row in res["scaling"]["rows"]] == [128, 256, 512]
    mem = res["memory"]["rows"]
    assert [row["batch_size"] for row in mem] == [32, 128]
    # activations grow with the batch (the gradients, a fixed part, are there at every size)
    assert mem[1]["steps_peak_mib"] > mem[0]["steps_peak_mib"] > 0
    assert res["log_px"]["plain"]["samples_per_second"] > 0


@pytest.mark.slow
def test_bench_quick_with_the_data_parallel_runs(tmp_path):
    r, res, md = _run_bench(tmp_path, "--sections", "distributed")
    d = res["distributed"]
    assert set(d) == {"1 process x 1 thread", "1 process x 2 threads", "2 processes x 1 thread (torchrun, gloo)"}
    assert all(v["s_per_epoch"] > 0 and v["final_val_elbo"] < 0 for v in d.values())
    assert "Data-parallel training" in md
