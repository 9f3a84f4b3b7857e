"""experiments/benchmark.py runs end to end in its --quick mode on small .amat files, reuses what it
finished, and refuses bad input in one line."""

from __future__ import annotations

import json

import numpy as np
from conftest import load_experiment
from PIL import Image


def _amat_dir(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 200), ("valid", 60), ("test", 30)):
        x = (rng.random((n, 784)) < 0.15).astype(np.uint8)
        (folder / f"binarized_mnist_{name}.amat").write_text("".join(" ".join(map(str, r)) + "\n" for r in x))
    return folder


def test_benchmark_quick_trains_scores_and_reuses(tmp_path, capsys):
    study = load_experiment("benchmark")
    data, out = _amat_dir(tmp_path / "data"), tmp_path / "b"
    args = ["--quick", "--quiet", "--val-num-samples", "7", "--data-dir", str(data), "--out", str(out), "--rows",
            "vae,hvae-vamp", "--ais-examples", "10"]
    assert study.main(args) == 0
    result = json.loads((out / "benchmark.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["vae", "hvae-vamp"]
    for r in rows.values():
        assert r["summary"]["stopped_by"] in ("epochs", "time_limit") and r["summary"]["epochs_done"] >= 1
        assert r["summary"]["peak_rss_mb"] > 50  # the child process's own peak
        assert r["settings"]["dataset"] == "binarized-mnist" and r["settings"]["time_limit"] == "3s"
        assert "ais" in r and r["ais"]["num_examples"] == 10  # the best two rows: here both
        assert "test" in r and r["test"]["log_px"] < 0
    assert rows["hvae-vamp"]["settings"]["hierarchy"] == "two-level"
    assert "−89.9" in rows["vae"]["published"] and "−83.19" in rows["hvae-vamp"]["published"]
    assert result["validation"]["num_examples"] == 50 and result["test"]["num_examples"] == 30
    # test, the reported split, at --num-samples (at most 20 in --quick); validation, which only ranks, at its own K
    assert (result["test"]["num_samples"], result["validation"]["num_samples"]) == (20, 7)
    text = (out / "benchmark.md").read_text()
    assert "| vae |" in text and "| hvae-vamp |" in text and "Command: `python experiments/benchmark.py" in text
    assert "--data-dir DIR" in text and str(data) not in text
    head = (out / "headline.md").read_text().splitlines()  # the README's table, from the same figures
    assert len(head) == 4 and head[2].startswith("| vae | standard VAE")
    vae = result["test"]["rows"][0]["report"]  # the test split's figures, where it is present
    assert "(test)" in head[0] and f"| {vae['elbo']:.2f} | {vae['log_px']:.2f} ± {vae['log_px_se']:.2f} |" in head[2]
    assert "10 random test images" in head[2]  # AIS for the best two (chosen on validation) on random test images
    assert f"{rows['vae']['ais']['log_px']:.2f} ± " in head[2] and head[2].endswith("| −89.9 |")
    with Image.open(out / "elbo_vs_minutes.png") as im:
        assert im.size[0] > 400
    trained = (out / "runs" / "vae" / "metrics.jsonl").stat().st_mtime_ns
    assert study.main(args[:-3] + ["vae", "--ais-examples", "0"]) == 0  # a rerun reuses the finished row
    assert (out / "runs" / "vae" / "metrics.jsonl").stat().st_mtime_ns == trained
    capsys.readouterr()
    assert study.main(args[:-3] + ["vae,nope"]) == 2
    assert "unknown rows nope" in capsys.readouterr().err
    assert study.main(["--quick", "--data-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "binarized_mnist_valid.amat" in capsys.readouterr().err


def test_the_two_level_row_is_the_best_row_without_its_weight_decay_for_fewer_minutes(tmp_path):
    """A row's spec may name a preset and override some of its settings: the 15-minute two-level row
    is the best recipe's model and schedule, less the weight decay that recipe adds."""
    study = load_experiment("benchmark")
    args = study._parser().parse_args(["--data-dir", str(tmp_path)])
    two_level, best = study.row_settings("hvae-vamp", args), study.row_settings("best", args)
    assert {k for k in two_level.keys() | best.keys() if two_level.get(k) != best.get(k)} == {"weight_decay",
                                                                                             "time_limit"}
    assert two_level["weight_decay"] == 0 and best["weight_decay"] == 0.02
    assert (two_level["time_limit"], best["time_limit"]) == ("15m", "30m")
    assert best["hierarchy"] == "two-level" and best["prior"] == "vamp" and best["lr"] == 1e-3


def test_the_paper_rows_train_on_the_papers_schedule_and_run_only_when_named(tmp_path):
    study = load_experiment("benchmark")
    args = study._parser().parse_args(["--data-dir", str(tmp_path)])
    paper = study.row_settings("vamp-paper", args)
    assert "time_limit" not in paper and paper["epochs"] == 2000 and paper["patience"] == 50
    assert "vamp-paper" not in study.DEFAULT_ROWS and "hvae-vamp-paper" not in study.DEFAULT_ROWS
    # the 3-hour recipe is its preset to the letter: its 100 minutes (not --minutes), early stopping, IWAE-20, EMA
    recipe = study.row_settings("recipe-3h", args)
    assert recipe["time_limit"] == "100m" and "recipe-3h" not in study.DEFAULT_ROWS
    assert {k: recipe[k] for k in ("epochs", "patience", "elbo", "num_particles", "ema", "hierarchy", "weight_decay")} \
        == {"epochs": 100, "patience": 10, "elbo": "iwae", "num_particles": 20, "ema": 0.999, "hierarchy": "two-level",
            "weight_decay": 0.1}


def test_each_shipped_run_is_the_finished_run_of_exactly_one_row(tmp_path):
    """--reuse-from docs/results/benchmark/runs scores the shipped runs in place: each matches its own row's
    settings (its own schedule, whatever budgets its stretches had) and no other row's."""
    study = load_experiment("benchmark")
    shipped = study.ROOT / "docs" / "results" / "benchmark" / "runs"
    args = study._parser().parse_args(["--data-dir", str(tmp_path), "--reuse-from", str(shipped)])
    found = {name: study.reusable_run(name, args) for name, *_ in study.ROWS}
    assert {name: p.name for name, p in found.items() if p is not None} == {
        "vamp-paper": "vampprior-paper", "hvae-vamp-paper": "hvae-vampprior-paper", "recipe-3h": "bmnist-3h",
        "recipe-3h-iaf": "bmnist-3h-iaf", "recipe-3h-dreg": "bmnist-3h-dreg",
        "recipe-3h-dreg-lr2e-3": "bmnist-3h-dreg-lr2e-3", "recipe-3h-dreg-lr3e-3": "bmnist-3h-dreg-lr3e-3"}


def test_the_caltech_benchmark_runs_its_three_rows_on_validation_when_the_file_has_no_test_part(tmp_path, capsys):
    from test_caltech import write_mat

    study = load_experiment("benchmark")
    data, out = tmp_path / "data", tmp_path / "c"
    data.mkdir()
    write_mat(data, splits=("train", "val"), sizes=(120, 40, 0))
    args = ["--quick", "--quiet", "--dataset", "caltech101-silhouettes", "--data-dir", str(data), "--out", str(out),
            "--val-num-samples", "7", "--ais-examples", "10"]
    assert study.main(args) == 0
    result = json.loads((out / "benchmark.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["vae", "vamp-500", "hvae-vamp"] and result["test"] is None
    assert result["validation"]["num_samples"] == 20  # with no test part, validation is reported: --num-samples
    assert rows["vae"]["settings"]["prior"] == "standard" and rows["hvae-vamp"]["settings"]["hierarchy"] == "two-level"
    assert all(r["settings"]["dataset"] == "caltech101-silhouettes" for r in rows.values())
    assert sum("ais" in r for r in rows.values()) == 2 and all(r["ais"]["split"] == "val" for r in rows.values()
                                                             if "ais" in r)
    head = (out / "headline.md").read_text().splitlines()
    assert "(validation)" in head[0] and "Caltech 101 Silhouettes" in (out / "benchmark.md").read_text()
    capsys.readouterr()
    assert study.main(args[:-2] + ["--rows", "iaf"]) == 2  # a binarized-MNIST row is not a Caltech row
    assert "unknown rows iaf for caltech101-silhouettes" in capsys.readouterr().err


def test_finished_runs_elsewhere_are_scored_in_place_when_every_setting_that_counts_matches(tmp_path, capsys):
    study = load_experiment("benchmark")
    data, first, second = _amat_dir(tmp_path / "data"), tmp_path / "first", tmp_path / "second"
    common = ["--quick", "--quiet", "--data-dir", str(data), "--ais-examples", "0"]
    assert study.main(common + ["--out", str(first), "--rows", "iwae-5,vamp-paper"]) == 0
    paper = first / "runs" / "vamp-paper"
    summary = json.loads((paper / "summary.json").read_text())
    config = json.loads((paper / "config.json").read_text())
    # a paper row's run may have trained in stretches of any --time-limit, if its own schedule ended it ...
    (paper / "summary.json").write_text(json.dumps({**summary, "stopped_by": "patience"}))
    (paper / "config.json").write_text(json.dumps({**config, "time_limit": "5h"}))
    args = common + ["--out", str(second), "--rows", "iwae-5,vamp-paper", "--reuse-from", str(first / "runs")]
    assert study.main(args) == 0
    assert not (second / "runs").exists()  # nothing trained: both scored where they are
    runs = [r["report"]["run"] for r in json.loads((second / "benchmark.json").read_text())["validation"]["rows"]]
    assert runs == [str(first / "runs" / "iwae-5"), str(paper)]
    study_args = study._parser().parse_args(["--data-dir", str(data)])  # a paper row's stretches are no budget
    assert study._minutes({"train_seconds": 600.0, "epochs_done": 7, "time_limit": "5h",
                           "own_schedule": "time_limit" not in study.row_settings("vamp-paper", study_args)}) == \
        "10.0 (7 epochs, its own schedule)"
    # ... but not one that a budget cut short, and a budgeted row's --time-limit must match
    (paper / "summary.json").write_text(json.dumps({**summary, "stopped_by": "time_limit"}))
    iwae = first / "runs" / "iwae-5" / "config.json"
    iwae.write_text(json.dumps({**json.loads(iwae.read_text()), "time_limit": "5h"}))
    assert study.main(args) == 0
    assert sorted(p.name for p in (second / "runs").iterdir()) == ["iwae-5", "vamp-paper"]
    capsys.readouterr()
    assert study.main(common + ["--out", str(second), "--reuse-from", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--reuse-from" in err and "not a folder" in err
