"""experiments/priors.py runs end to end in its --quick mode and writes what it promises."""

from __future__ import annotations

import json

from conftest import load_experiment
from PIL import Image


def test_priors_experiment_quick_mode(tmp_path, capsys):
    experiment = load_experiment("priors")
    out = tmp_path / "priors"
    assert experiment.main(["--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "85.57" in printed and "94.46%" in printed and "-153.5" in printed  # the anchors
    result = json.loads((out / "priors.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == [r.name for r in experiment.ROWS]
    assert {"standard", "mog-10", "mog-512", "vamp-500", "mixture-512"} <= set(rows)
    for name, r in rows.items():
        rep = r["report"]
        assert rep["num_examples"] == 100
        assert rep["log_px"] < 0 and rep["train_seconds"] > 0
        if rep["model"] == "mixture":
            assert rep["exact_log_px"] == rep["log_px"] or abs(rep["exact_log_px"] - rep["log_px"]) < 1e-3
        else:
            assert rep["num_samples"] == 20 and rep["log_px"] >= rep["elbo"] - 1.0  # IWAE_20 is above the ELBO
            if name in experiment.QUICK_MAPS:
                with Image.open(out / r["latent_png"]) as im:
                    assert im.size[0] > 100
        if name != "standard":
            comp = rep["components"]
            assert 1 <= comp["components_used"] <= comp["num_components"]
            assert 1 <= comp["usage_perplexity"] <= comp["num_components"] + 1e-6
            assert 0 <= comp["cluster_accuracy"] <= 1 and 0 <= comp["nmi"] <= 1
        with Image.open(out / r["samples_png"]) as im:
            assert im.size == (10 * 30 + 2, 10 * 30 + 2)  # 10 x 10 grid of 28x28 digits
    table = (out / "priors.md").read_text()
    assert table.count("\n| ") >= len(rows) + 1 and "cluster acc." in table and "| exact |" in table
    # a second call reuses the finished runs and their evaluations
    assert experiment.main(["--quick", "--out", str(out), "--quiet", "--rows", "standard,mixture-10"]) == 0
    # and refuses runs made with other settings
    assert experiment.main(["--quick", "--out", str(out), "--quiet", "--rows", "standard", "--seed", "3"]) == 2
    assert "trained with other settings (seed)" in capsys.readouterr().err
