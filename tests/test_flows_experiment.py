"""experiments/flows.py end to end in --quick mode, and its reuse of finished runs."""

from __future__ import annotations

import json

from conftest import load_experiment


def test_flows_quick_writes_the_table_the_json_and_the_plot_then_reuses_its_runs(tmp_path, capsys):
    flows = load_experiment("flows")
    out = tmp_path / "flows"
    assert flows.main(["--quick", "--quiet", "--out", str(out), "--rows", "gaussian,iaf-2,vamp-500-iaf-4"]) == 0
    result = json.loads((out / "flows.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["gaussian", "iaf-2", "vamp-500-iaf-4"]
    g, f = rows["gaussian"]["report"], rows["iaf-2"]["report"]
    # the paired difference is the mean of the per-image differences
    d = [a - b for a, b in zip(f["per_example"]["log_px"], g["per_example"]["log_px"])]
    assert abs(rows["iaf-2"]["log_px_diff"][0] - sum(d) / len(d)) < 1e-9
    assert f["num_samples"] == 50 and len(d) == 100
    text = (out / "flows.md").read_text()
    assert "| iaf-2 |" in text and "flows.png" in text and (out / "flows.png").stat().st_size > 0
    mtimes = {p: p.stat().st_mtime for p in (out / "runs").rglob("*.pt")}
    capsys.readouterr()
    assert flows.main(["--quick", "--quiet", "--out", str(out), "--rows", "gaussian,iaf-2,vamp-500-iaf-4"]) == 0
    assert {p: p.stat().st_mtime for p in (out / "runs").rglob("*.pt")} == mtimes  # nothing retrained
    assert json.loads((out / "flows.json").read_text())["rows"][1]["log_px_diff"] == rows["iaf-2"]["log_px_diff"]


def test_flows_refuses_unknown_rows(tmp_path, capsys):
    flows = load_experiment("flows")
    assert flows.main(["--quick", "--out", str(tmp_path), "--rows", "gaussian,iaf-3"]) == 2
    err = capsys.readouterr().err
    assert "iaf-3" in err and len(err.strip().splitlines()) == 1
