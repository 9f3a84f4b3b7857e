"""experiments/paired_curves.py: epoch-by-epoch differences of two runs' recorded figures, and its refusals."""

import json
from pathlib import Path

import pytest
from conftest import load_experiment

paired_curves = load_experiment("paired_curves")


def _run(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(iwae, elbo, train, lr):
    return [{"epoch": e, "val_iwae": a, "val_elbo": b, "train_elbo": t, "lr": r}
            for e, (a, b, t, r) in enumerate(zip(iwae, elbo, train, lr), 1)]


def test_differences_are_candidate_minus_baseline_at_each_shared_epoch(tmp_path):
    base = _rows([-90.0, -88.5, -88.0, -88.25], [-95.0, -93.0, -92.5, -92.75], [-96.0, -92.0, -91.0, -90.0],
                 [1e-3, 8e-4, 5e-4, 2e-4])
    cand = _rows([-89.5, -88.0, -87.25], [-94.0, -92.5, -92.0], [-95.5, -93.0, -92.5], [1e-3, 1e-3, 4e-4])
    rows = paired_curves.differences(base, cand, [1, 3, 4])
    assert [r["epoch"] for r in rows] == [1, 3]  # the candidate never reached epoch 4
    assert rows[1]["d_val_iwae"] == pytest.approx(0.75)
    assert rows[1]["d_val_elbo"] == pytest.approx(0.5)
    assert rows[1]["gap_base"] == pytest.approx(1.5)  # -91.0 - (-92.5)
    assert rows[1]["gap_cand"] == pytest.approx(-0.5)
    assert rows[1]["lr_ratio"] == pytest.approx(0.8)
    assert paired_curves.best_epoch(base) == 3


def test_a_run_without_iwae_is_ranked_by_its_elbo_and_its_iwae_differences_say_na(tmp_path):
    base = [{"epoch": 1, "val_elbo": -95.0}, {"epoch": 2, "val_elbo": -94.0}, {"epoch": 3, "val_elbo": -94.5}]
    cand = [{"epoch": 2, "val_elbo": -93.0, "val_iwae": -90.0}]
    assert paired_curves.best_epoch(base) == 2
    (row,) = paired_curves.differences(base, cand, [2])
    assert row["d_val_iwae"] is None and row["d_val_elbo"] == pytest.approx(1.0)
    assert "n/a" in "\n".join(paired_curves.table("c", "b", [row]))


def test_the_script_writes_the_table_and_the_curves(tmp_path, capsys):
    base = _run(tmp_path / "base", _rows([-90.0, -88.0], [-95.0, -93.0], [-96.0, -92.0], [1e-3, 5e-4]))
    cand = _run(tmp_path / "cand", _rows([-89.0, -87.5], [-94.0, -92.0], [-95.0, -91.0], [1e-3, 5e-4]))
    out = tmp_path / "fig" / "curves.png"
    assert paired_curves.main([str(base), str(cand / "metrics.jsonl"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.with_suffix(".md").read_text()
    assert "| 2 | -88.00 | +0.50 | +1.00 | 1.00 | 1.00 | 1.000 |" in text
    assert "base: best epoch 2 of 2. cand: best epoch 2 of 2." in capsys.readouterr().out


def test_the_default_table_holds_every_runs_best_epoch_within_the_shared_epochs(tmp_path):
    def run(name, best, last):  # validation IWAE rises to the best epoch, then falls
        return _run(tmp_path / name, [{"epoch": e, "val_iwae": -90.0 - abs(e - best), "val_elbo": -95.0}
                                      for e in range(1, last + 1)])

    out = tmp_path / "curves.png"
    paths = [run("base", 13, 35), run("a", 27, 40), run("b", 40, 40)]
    assert paired_curves.main([*map(str, paths), "--out", str(out)]) == 0
    epochs = [int(line.split("|")[1]) for line in out.with_suffix(".md").read_text().splitlines()
              if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    shared = [1, 5, 10, 13, 20, 27, 30, 35]  # every run's best but 40, which lies past the 35 epochs all share
    assert epochs == shared * 2  # one table for each candidate, on the same epochs


def test_the_curves_draw_only_the_figures_some_run_recorded():
    elbo_only = {"a": [{"epoch": 1, "val_elbo": -95.0}], "b": [{"epoch": 1, "val_elbo": -94.0}]}
    (ax,) = paired_curves.curves(elbo_only).axes
    assert ax.get_ylabel().startswith("validation ELBO") and len(ax.lines) == 2
    mixed = {**elbo_only, "c": [{"epoch": 1, "val_elbo": -93.0, "val_iwae": -90.0}]}
    iwae, elbo = paired_curves.curves(mixed).axes
    assert iwae.get_ylabel().startswith("validation IWAE") and len(iwae.lines) == 1 and len(elbo.lines) == 3


@pytest.mark.parametrize("make, args, words", [
    (lambda p: p, ["--out", "x.png"], "no metrics.jsonl there"),
    (lambda p: _run(p, []), [], "holds no epoch yet"),
    (lambda p: _run(p, [{"epoch": 9, "val_elbo": -90.0}]), [], "share none of the epochs"),
    (lambda p: _run(p, [{"epoch": 1, "train_elbo": -90.0}]), [], "other: its metrics record neither val_iwae"),
    (lambda p: _run(p, [{"epoch": 1, "val_elbo": -90.0}]), ["--names", "a"], "give 2 non-empty labels"),
    (lambda p: _run(p, [{"epoch": 1, "val_elbo": -90.0}]), ["--epochs", "1,x"], "whole epoch numbers"),
    (lambda p: _run(p, [{"epoch": 1, "val_elbo": -90.0}]), ["--out", "c.pdf"], "must end in .png"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make, args, words):
    base = _run(tmp_path / "base", [{"epoch": 1, "val_elbo": -91.0}, {"epoch": 2, "val_elbo": -90.0}])
    other = make(tmp_path / "other")
    assert paired_curves.main([str(base), str(other), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and err.startswith("experiments/paired_curves.py: error:")


def test_each_runs_k_is_named_and_a_difference_in_k_is_flagged(tmp_path, capsys):
    from pyrovae.config import TrainConfig

    rows = _rows([-90.0, -88.0], [-95.0, -93.0], [-96.0, -92.0], [1e-3, 5e-4])
    runs = {}
    for name, elbo, k in (("k20", "iwae", 20), ("k50", "iwae", 50), ("also20", "iwae", 20), ("elbo", "trace", 1)):
        runs[name] = _run(tmp_path / name, rows)
        TrainConfig(elbo=elbo, num_particles=k).save(runs[name] / "config.json")
    assert [paired_curves.iwae_particles(runs[n]) for n in ("k20", "k50", "elbo")] == [20, 50, None]
    assert paired_curves.iwae_particles(runs["k50"] / "metrics.jsonl") == 50
    assert paired_curves.iwae_particles(_run(tmp_path / "bare", rows)) is None  # no config.json: unknown
    assert paired_curves.main([str(runs["k20"]), str(runs["k50"]), str(runs["also20"])]) == 0
    out = capsys.readouterr().out
    assert out.count("| epoch | k20 val IWAE (k = 20) |") == 2
    assert out.count("does not rank the runs") == 1 and "at k = 50 (k50) and k = 20 (k20)" in out  # k50 only
    fig = paired_curves.curves({n: rows for n in ("k20", "k50")}, {"k20": 20, "k50": 50})
    assert [line.get_label() for line in fig.axes[0].lines] == ["k20 (k = 20)", "k50 (k = 50)"]
    assert [line.get_label() for line in fig.axes[1].lines] == ["k20", "k50"]
