"""pyrovae compare: paired differences that are the differences of the per-example estimates,
refusal of runs of other data, and its JSON and Markdown."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cli

from pyrovae import TrainConfig, estimate_log_px, load_run, train
from pyrovae.training import prepare_data


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    common = dict(dataset="digits", hidden_dims=(16,), latent_dim=3, epochs=3, out=str(out), seed=0)
    for name, kw in (("std", {}), ("mog", {"prior": "mog", "prior_components": 3, "prior_init": "random"}),
                     ("iaf", {"guide": "iaf", "flow_hidden_dims": (8,), "flow_context_dim": 4})):
        train(TrainConfig(**common, **kw, name=name), progress=False)
    return out


def test_paired_differences_are_those_of_the_per_example_estimates(capsys, three_runs, tmp_path):
    runs = [str(three_runs / n) for n in ("std", "mog", "iaf")]
    code, out, err = cli(capsys, "compare", *runs, "--num-samples", "30", "--seed", "4", "--quiet",
                         "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md"),
                         "--plot", str(tmp_path / "c.png"))
    assert code == 0, err
    result = json.loads((tmp_path / "c.json").read_text())
    test = prepare_data(load_run(runs[0]).config, "test", "cpu").images
    direct = {}
    for r in runs:
        direct[r] = estimate_log_px(load_run(r).model, test, 30, seed=4).log_px
    for row, r in zip(result["rows"][1:], runs[1:]):
        d = direct[r] - direct[runs[0]]
        assert row["log_px_diff"][0] == pytest.approx(float(d.mean()), abs=1e-6)
        assert row["log_px_diff"][1] == pytest.approx(float(d.std() / len(d) ** 0.5), rel=1e-4)
    md = (tmp_path / "c.md").read_text()
    assert all(f"| {n} |" in md for n in ("std", "mog", "iaf")) and md.count("\n|") >= 4
    assert "| mog |" in out and (tmp_path / "c.png").stat().st_size > 0
    # --baseline: the others against the chosen run
    code, out, err = cli(capsys, "compare", *runs, "--baseline", runs[2], "--num-samples", "30", "--seed", "4",
                         "--quiet", "--json", "-")
    again = json.loads(out[out.index("{"):])
    assert again["baseline"] == "iaf"
    std_row = next(r for r in again["rows"] if r["name"] == "std")
    assert std_row["log_px_diff"][0] == pytest.approx(float((direct[runs[0]] - direct[runs[2]]).mean()), abs=1e-6)


def test_runs_of_other_data_are_refused(capsys, three_runs, tmp_path):
    path = tmp_path / "wide.npy"
    np.save(path, np.random.default_rng(0).random((60, 100)))
    train(TrainConfig(dataset=str(path), hidden_dims=(8,), latent_dim=2, epochs=1, out=str(tmp_path), name="wide"),
          progress=False)
    code, _, err = cli(capsys, "compare", str(three_runs / "std"), str(tmp_path / "wide"), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "values per example" in err
    code, _, err = cli(capsys, "compare", str(three_runs / "std"), str(tmp_path / "nothing"))
    assert code == 2 and "no such run directory" in err
