"""The fourth hardening round: each class of defect a hostile probe found, tested as a class.

Stale finished runs, budgets that say what stopped them, k-hat at small K, downloads, data files, resuming
after the data moved, the benchmark's flags, the Python API's refusals, settings a model does not use, and
evaluate's estimate of its own time."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import cli, interrupted_at, load_experiment
from test_binarized_mnist import _published_size_file, amat_text, images, write

from pyrovae import TrainConfig, build_model, estimate_log_px, load_run, train
from pyrovae.config import presets
from pyrovae.data import DataError, download_binarized_mnist, load_dataset, read_amat
from pyrovae.marginal import PSIS_MIN_SAMPLES, estimator_pace
from pyrovae.runs import load_checkpoint, read_metrics
from pyrovae.training import finished_run, train_or_reuse


def tiny(tmp_path, name, **kw) -> TrainConfig:
    settings = dict(dataset="digits", hidden_dims=(16,), latent_dim=2, epochs=3, out=str(tmp_path), name=name,
                    no_tensorboard=True)
    settings.update(kw)
    return TrainConfig(**settings)


# --- 1. a run is finished only when its summary belongs to its last checkpoint ------------------------------
def test_a_resumed_and_killed_run_is_resumed_again_not_reported_as_finished(tmp_path):
    train(tiny(tmp_path, "r", epochs=2), progress=False)
    assert finished_run(tmp_path / "r")
    with interrupted_at(3, after=True):  # the raised budget's session is killed after its 4th epoch is saved
        train(tiny(tmp_path, "r", epochs=6), resume=tmp_path / "r", progress=False)
    assert not finished_run(tmp_path / "r")  # its old summary (2 epochs) is gone or no longer its checkpoint's
    run_dir, how = train_or_reuse(tiny(tmp_path, "r", epochs=6), progress=False)
    assert how == "resumed"
    assert json.loads((run_dir / "summary.json").read_text())["epochs_done"] == 6


# --- 2. budgets -------------------------------------------------------------------------------------------
def test_a_run_ended_by_its_epochs_says_so_under_a_long_budget(tmp_path, capsys):
    code, out, err = cli(capsys, "train", "--dataset", "digits", "--hidden-dims", "16", "--latent-dim", "2",
                         "--epochs", "5", "--time-limit", "1h", "--out", str(tmp_path), "--name", "b", "--quiet",
                         "--no-tensorboard")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["stopped_by"] == "epochs"
    assert "fit in" not in out


def test_a_budget_already_spent_is_refused_and_nothing_changes(tmp_path, capsys):
    train(tiny(tmp_path, "s", epochs=4, time_limit="1h"), progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir() if p.is_file()}
    spent = load_checkpoint(tmp_path / "s" / "last.pt")["train_seconds"]
    limit = f"{max(spent / 2, 1e-3):.6f}s"
    code, _, err = cli(capsys, "train", "--resume", str(tmp_path / "s"), "--time-limit", limit, "--epochs", "8",
                       "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has trained already" in err, err
    after = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir() if p.is_file()}
    assert after == before


def test_fewer_epochs_on_resume_shorten_the_plan_and_the_rate_anneals_over_it(tmp_path):
    c = tiny(tmp_path, "p", epochs=8, time_limit="1h")
    with interrupted_at(5, after=True):  # the plan (bounded by --epochs 8) is made after the 4th epoch
        train(c, progress=False)
    assert load_checkpoint(tmp_path / "p" / "last.pt")["planned_epochs"] == 8
    train(tiny(tmp_path, "p", epochs=7, time_limit="1h"), resume=tmp_path / "p", progress=False)
    rows = read_metrics(tmp_path / "p" / "metrics.jsonl")
    assert len(rows) == 7 and rows[-1]["planned_epochs"] == 7
    lr, lr_min = c.resolved().lr, c.lr_min
    want = lr_min + 0.5 * (lr - lr_min) * (1 + np.cos(np.pi * 6 / 7))  # epoch 7 (index 6) of a 7-epoch cosine
    assert rows[-1]["lr"] == pytest.approx(want, rel=1e-9)


def test_a_run_killed_before_its_plan_plans_at_once_when_resumed(tmp_path):
    with interrupted_at(1, after=True):
        train(tiny(tmp_path, "k", epochs=50, time_limit="1h"), progress=False)
    assert load_checkpoint(tmp_path / "k" / "last.pt")["planned_epochs"] is None
    with interrupted_at(2, after=True):
        train(tiny(tmp_path, "k", epochs=50, time_limit="1h"), resume=tmp_path / "k", progress=False)
    rows = read_metrics(tmp_path / "k" / "metrics.jsonl")
    assert rows[-1]["epoch"] == 3 and rows[-1]["planned_epochs"] == 50  # planned in the resumed session's first
    assert rows[-1]["lr"] < rows[0]["lr"]  # and the schedule anneals from there


# --- 3. k-hat at small K ---------------------------------------------------------------------------------
def test_k_hat_below_the_psis_minimum_is_undefined_not_infinite(tmp_path, capsys):
    train(tiny(tmp_path, "e"), progress=False)
    code, out, err = cli(capsys, "evaluate", str(tmp_path / "e"), "--num-samples", str(PSIS_MIN_SAMPLES - 1),
                         "--json", "-", "--quiet")
    assert code == 0, err
    assert f"undefined (K too small for PSIS; need at least {PSIS_MIN_SAMPLES})" in out
    report = json.loads(out[out.index("{"):])
    pk = report["pareto_k"]
    assert pk["frac_above_0.7"] is None and pk["max"] is None and pk["num_defined"] == 0
    assert "inf" not in out.lower().replace("info", "")
    run = load_run(tmp_path / "e")
    x = load_dataset("digits", "test").images[:5]
    x = (x > 0.5).float()
    ok = estimate_log_px(run.model, x, PSIS_MIN_SAMPLES, seed=0).summary()["pareto_k"]
    assert ok["num_defined"] == 5 and ok["frac_above_0.7"] is not None


# --- 4. downloads ------------------------------------------------------------------------------------------
def test_a_source_that_never_ends_stops_one_byte_past_the_size_and_keeps_nothing(tmp_path):
    src, dest = tmp_path / "mirror", tmp_path / "data"
    src.mkdir()
    os.symlink("/dev/zero", src / "binarized_mnist_valid.amat")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="longer than its published 15,680,000 bytes"):
        download_binarized_mnist(dest, base_url=src.as_uri(), splits=("val",), progress=False)
    assert list(dest.iterdir()) == [] and time.perf_counter() - t0 < 120


def test_a_file_too_long_is_called_too_long(tmp_path):
    src, dest = tmp_path / "mirror", tmp_path / "data"
    src.mkdir()
    _published_size_file(src, "binarized_mnist_valid.amat", 10_001)
    with pytest.raises(DataError, match="longer than"):
        download_binarized_mnist(dest, base_url=src.as_uri(), splits=("val",), progress=False)
    assert list(dest.iterdir()) == []


def test_a_left_over_part_file_is_removed_and_said_so_and_a_plain_folder_is_a_source(tmp_path, capsys):
    src, dest = tmp_path / "mirror", tmp_path / "data"
    src.mkdir()
    dest.mkdir()
    _published_size_file(src, "binarized_mnist_valid.amat", 10_000)
    (dest / ".binarized_mnist_valid.amat.part").write_bytes(b"0 1" * 1000)
    download_binarized_mnist(dest, base_url=str(src), splits=("val",), progress=False)  # a folder, not a URL
    assert sorted(p.name for p in dest.iterdir()) == ["binarized_mnist_valid.amat"]
    assert "removed" in capsys.readouterr().err
    with pytest.raises(DataError, match="neither a URL"):
        download_binarized_mnist(tmp_path / "d2", base_url=str(tmp_path / "nowhere"), splits=("val",),
                                 progress=False)


def test_gzipped_files_already_there_are_not_fetched_and_quiet_draws_no_bar(tmp_path, capsys, monkeypatch):
    d = tmp_path / "bm"
    d.mkdir()
    for name, n in (("train", 30), ("valid", 12), ("test", 8)):
        write(d / f"binarized_mnist_{name}.amat.gz", amat_text(images(n, seed=len(name))))
    monkeypatch.setenv("PYROVAE_BINARIZED_MNIST_URL", "http://127.0.0.1:9/")  # offline
    code, _, err = cli(capsys, "train", "--dataset", "binarized-mnist", "--download", "--data-dir", str(d),
                       "--hidden-dims", "8", "--latent-dim", "2", "--epochs", "1", "--out", str(tmp_path / "runs"),
                       "--quiet", "--no-tensorboard")
    assert code == 0, err
    assert "%|" not in err and "B/s" not in err


def test_ctrl_c_before_the_first_epoch_does_not_advise_a_resume(tmp_path, capsys, monkeypatch):
    import pyrovae.training as training

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "load_dataset", interrupted)
    code, _, err = cli(capsys, "train", "--dataset", "digits", "--out", str(tmp_path), "--quiet")
    assert code == 130 and "nothing to resume" in err and "--resume" not in err


# --- 5. data files --------------------------------------------------------------------------------------------
def test_a_plain_and_a_gzipped_copy_must_agree(tmp_path):
    d = tmp_path / "bm"
    d.mkdir()
    write(d / "binarized_mnist_valid.amat", amat_text(images(4, seed=1)))
    write(d / "binarized_mnist_valid.amat.gz", amat_text(images(4, seed=1)))
    assert len(load_dataset("binarized-mnist", "val", data_dir=d)) == 4  # the same images: either is fine
    write(d / "binarized_mnist_valid.amat.gz", amat_text(images(4, seed=2)))
    with pytest.raises(DataError, match="hold different images"):
        load_dataset("binarized-mnist", "val", data_dir=d)


@pytest.mark.parametrize("make, words", [
    (lambda p: p.mkdir(), "a folder, not a file"),
    (lambda p: os.symlink(p, p), "loops back to itself"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: os.symlink(p.parent / "gone", p), "broken symbolic link"),
])
def test_a_data_file_that_is_not_a_file_is_named_for_what_it_is(tmp_path, make, words):
    d = tmp_path / "bm"
    d.mkdir()
    make(d / "binarized_mnist_valid.amat")
    with pytest.raises(DataError, match=words):
        load_dataset("binarized-mnist", "val", data_dir=d)


def test_a_data_dir_that_is_a_file_is_named_so(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_dataset("binarized-mnist", "val", data_dir=f)


def test_a_byte_order_mark_and_form_feeds_are_named_or_read_with_true_line_numbers(tmp_path):
    x = images(3)
    with pytest.raises(DataError, match="byte-order mark"):
        read_amat(write(tmp_path / "bom.amat", b"\xef\xbb\xbf" + amat_text(x).encode()))
    rows = ["\x0c".join(str(int(v)) for v in row) for row in x]  # form feeds as separators: still whitespace
    assert torch.equal(read_amat(write(tmp_path / "ff.amat", "\n".join(rows) + "\n")), torch.from_numpy(x).float())
    bad = rows[:2] + [rows[2].replace("0", "\xe9", 1)]
    with pytest.raises(DataError, match="line 3 holds the byte 0xC3"):
        read_amat(write(tmp_path / "bad.amat", "\n".join(bad) + "\n"))


def test_a_missing_test_file_is_one_plain_line(tmp_path, capsys):
    d = tmp_path / "bm"
    d.mkdir()
    for name, n in (("train", 30), ("valid", 12)):
        write(d / f"binarized_mnist_{name}.amat", amat_text(images(n, seed=len(name))))
    code, _, err = cli(capsys, "train", "--dataset", "binarized-mnist", "--data-dir", str(d), "--hidden-dims", "8",
                       "--latent-dim", "2", "--epochs", "1", "--out", str(tmp_path / "runs"), "--quiet",
                       "--no-tensorboard")
    assert code == 0, err  # (the suite turns warnings into errors: a UserWarning would fail it)
    lines = [x for x in err.splitlines() if "test-split" in x]
    assert len(lines) == 1 and "binarized_mnist_test.amat" in lines[0] and "Warning" not in err


# --- 6. resuming after the data moved ---------------------------------------------------------------------
def test_a_run_resumes_from_a_moved_data_dir_holding_the_same_data_only(tmp_path, capsys):
    d = tmp_path / "bm"
    d.mkdir()
    for name, n in (("train", 30), ("valid", 12), ("test", 8)):
        write(d / f"binarized_mnist_{name}.amat", amat_text(images(n, seed=len(name))))
    common = ["--hidden-dims", "8", "--latent-dim", "2", "--quiet"]
    code, _, err = cli(capsys, "train", "--dataset", "binarized-mnist", "--data-dir", str(d), "--epochs", "1",
                       "--out", str(tmp_path / "runs"), "--name", "m", "--no-tensorboard", *common)
    assert code == 0, err
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    shutil.rmtree(d)
    code, _, err = cli(capsys, "train", "--resume", str(tmp_path / "runs" / "m"), "--data-dir", str(moved),
                       "--epochs", "2", "--quiet")
    assert code == 0, err
    assert TrainConfig.load(tmp_path / "runs" / "m" / "config.json").data_dir == str(moved)
    write(moved / "binarized_mnist_train.amat", amat_text(images(30, seed=99)))  # other data
    code, _, err = cli(capsys, "train", "--resume", str(tmp_path / "runs" / "m"), "--epochs", "3", "--quiet")
    assert code == 2 and "is not the data" in err and len(err.strip().splitlines()) == 1


# --- 7. the benchmark's flags -------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--rows", "mog-10,mog-10"], "more than once"),
    (["--num-samples", "0"], "--num-samples"),
    (["--val-num-samples", "0"], "--val-num-samples"),
    (["--ais-examples", "-1"], "--ais-examples"),
])
def test_the_benchmark_checks_every_flag_before_any_work(tmp_path, capsys, flags, words):
    bench = load_experiment("benchmark")
    code = bench.main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--quick", *flags])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "runs").exists()


# --- 8. the Python API ----------------------------------------------------------------------------------------
def test_the_python_api_refuses_in_its_own_words(tmp_path):
    with pytest.raises(TypeError, match="TrainConfig"):
        train({"dataset": "digits"})
    c = TrainConfig(dataset="digits").resolved()
    for bad in (-1, 0, 64.0, "64", True):
        with pytest.raises(ValueError, match="data_dim"):
            build_model(c, data_dim=bad)
    with pytest.raises(ValueError, match="image_shape"):
        build_model(c, data_dim=64, image_shape=(7, 7))
    with pytest.raises(TypeError, match="build_model"):
        build_model({"dataset": "digits"}, data_dim=64)
    with pytest.raises(ValueError, match="'valid' is not a split"):
        download_binarized_mnist(tmp_path, splits=("valid",))
    with pytest.raises(TypeError, match="splits"):
        download_binarized_mnist(tmp_path, splits="val")
    train(tiny(tmp_path, "a", epochs=1), progress=False)
    with pytest.raises(ValueError, match="which"):
        load_run(tmp_path / "a", which="middle")
    with pytest.raises(ValueError, match="weights"):
        load_run(tmp_path / "a", weights="mean")


# --- 9. settings a model does not use -----------------------------------------------------------------------
@pytest.mark.parametrize("flags, flag", [
    (["--model", "ae", "--prior", "vamp"], "--prior"),
    (["--flow-steps", "3"], "--flow-steps"),
    (["--prior", "mog", "--pseudo-inputs", "hardtanh"], "--pseudo-inputs"),
    (["--warmup-unit", "epoch"], "--warmup-unit"),
    (["--lr-schedule", "constant", "--lr-min", "0.0002"], "--lr-min"),
    (["--net", "gated", "--activation", "relu"], "--activation"),
    (["--model", "mixture", "--scale-head", "clipped-log-var"], "--scale-head"),
    (["--lower-latent-dims", "4", "--hierarchy", "two-level", "--layer-hidden-dims", "8"], "--layer-hidden-dims"),
])
def test_a_setting_the_model_does_not_use_is_refused_by_one_rule(tmp_path, capsys, flags, flag):
    code, _, err = cli(capsys, "train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path), *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{flag} " in err and "not used" in err, err
    assert not any(tmp_path.iterdir())


def test_a_presets_setting_that_the_flags_make_unused_goes_back_to_its_default(tmp_path, capsys):
    """--optimizer adam over the paper preset leaves its --norm-grad-by map unused: the user did not give it, so it
    is dropped, not refused; given as a flag beside --optimizer adam it is still refused."""
    d = tmp_path / "bm"
    d.mkdir()
    for name, n in (("train", 40), ("valid", 12)):
        write(d / f"binarized_mnist_{name}.amat", amat_text(images(n, seed=len(name))))
    small = ["--data-dir", str(d), "--epochs", "1", "--batch-size", "20", "--hidden-dims", "8,8",
             "--latent-dim", "3", "--lower-latent-dims", "3", "--prior-components", "5", "--quiet"]
    code, _, err = cli(capsys, "train", "--preset", "hvae-vampprior-paper", "--optimizer", "adam", *small,
                       "--out", str(tmp_path / "runs"), "--name", "adam")
    assert code == 0, err
    stored = json.loads((tmp_path / "runs" / "adam" / "config.json").read_text())
    assert stored["optimizer"] == "adam" and stored["norm_grad_by"] == TrainConfig().norm_grad_by
    assert stored["hierarchy"] == "two-level" and stored["init"] == "he"  # what is still used stays
    code, _, err = cli(capsys, "train", "--preset", "hvae-vampprior-paper", "--optimizer", "adam",
                       "--norm-grad-by", "map", *small, "--out", str(tmp_path / "runs2"))
    assert code == 2 and "--norm-grad-by " in err and "not used" in err, err


def test_every_preset_is_used_whole():
    from pyrovae.config import preset_settings

    for name in presets():
        TrainConfig.from_dict(preset_settings(name)).resolved()  # no setting it gives goes unused


# --- 10. small things a user sees ----------------------------------------------------------------------------
def test_every_presets_first_line_is_a_whole_description():
    for name, (path, text) in presets().items():
        second = path.read_text(encoding="utf-8").splitlines()[1]
        # the --help text is the first line: the second starts a sentence of its own or the settings
        assert not second.startswith("#") or second[2:3].isupper(), (name, second)
        assert not text.endswith((",", ";", "what", "over")), (name, text)


def test_by_component_on_one_component_fills_the_grid_and_compare_on_one_example_says_n_a(tmp_path, capsys):
    train(tiny(tmp_path, "one", epochs=1), progress=False)
    code, out, err = cli(capsys, "sample", str(tmp_path / "one"), "--by-component", "--num-images", "16",
                         "--output", str(tmp_path / "c.png"))
    assert code == 0, err
    from PIL import Image

    with Image.open(tmp_path / "c.png") as im:
        w, h = im.size
    assert w > 8 * 8 and h < 2 * 8 + 10  # one row of 16 images, not of 1
    code, out, err = cli(capsys, "compare", str(tmp_path / "one"), str(tmp_path / "one"), "--num-samples", "30",
                         "--dataset", "digits", "--split", "test", "--quiet")
    assert code == 0, err
    code, out, err = cli(capsys, "compare", str(tmp_path / "one"), "--num-samples", "30", "--quiet")
    assert code == 0, err
    assert "nan" not in out


def test_one_example_shows_n_a_for_its_standard_error():
    from pyrovae.compare import plus_minus

    assert plus_minus(-1.0, float("nan")) == "-1.00 ± n/a (1 example)"
    assert plus_minus(-1.0, 0.25, signed=True) == "-1.00 ± 0.25"


# --- 11. evaluate's estimate of its own time ----------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(),
    dict(hierarchy="two-level", lower_latent_dims=(3,), net="gated", prior="vamp", prior_components=10),
    dict(guide="iaf", flow_hidden_dims=(8,), flow_context_dim=4),
    dict(prior="mog", prior_components=10, prior_init="random"),
])
def test_the_estimators_predicted_pace_is_within_2x_of_a_timed_pass(kw):
    c = TrainConfig(dataset="digits", hidden_dims=(16, 16), latent_dim=2, **kw).resolved()
    model = build_model(c, data_dim=64, train_images=torch.rand(50, 64)).eval()
    x = (torch.rand(200, 64) < 0.3).float()
    ratios = []
    for _ in range(2):  # (a shared machine's noise: the closer of two tries)
        per_pair, per_example = estimator_pace(model, x)
        predicted = 100 * (1000 * per_pair + per_example)
        t0 = time.perf_counter()
        estimate_log_px(model, x[:100], 1000, seed=1)
        ratios.append(predicted / (time.perf_counter() - t0))
    assert 0.5 < min(ratios, key=lambda r: abs(np.log(r))) < 2.0, ratios


def test_a_budget_without_an_epoch_count_rules_and_with_both_the_first_reached_stops():
    from pyrovae.config import BUDGET_EPOCHS, DEFAULT_EPOCHS

    assert TrainConfig().resolved().epochs == DEFAULT_EPOCHS
    assert TrainConfig(time_limit="45m").resolved().epochs == BUDGET_EPOCHS  # not cut at 450 (about 26 minutes)
    assert TrainConfig(time_limit="45m", epochs=300).resolved().epochs == 300
    assert TrainConfig(epochs=300).resolved().time_limit is None


def test_what_a_resume_may_change_is_one_rule_for_the_command_line_and_the_api(tmp_path, capsys):
    from pyrovae.config import RESUMABLE, resumed_config, unresumable

    train(tiny(tmp_path, "u", epochs=1), progress=False)
    stored = TrainConfig.load(tmp_path / "u" / "config.json")
    assert resumed_config(stored, {"epochs": 3, "latent_dim": None}, "u").epochs == 3  # None: not given
    with pytest.raises(ValueError, match="--latent-dim cannot change when resuming"):
        resumed_config(stored, {"latent_dim": 5}, "u")
    assert unresumable(stored.to_dict(), {"latent_dim": 5, "epochs": 9}) == ["latent_dim"]
    assert unresumable(stored.to_dict(), {k: "x" for k in RESUMABLE}) == []
    code, _, err = cli(capsys, "train", "--resume", str(tmp_path / "u"), "--latent-dim", "5", "--quiet")
    assert code == 2 and "--latent-dim cannot change when resuming" in err


def test_evaluate_scores_n_examples_at_random_by_seed_or_the_first_n_when_asked(tmp_path, capsys):
    """Quadrature is exact and draws no noise, so each example's figure is the same in any evaluation: the
    subsets' per-example figures are the whole split's at the examples :meth:`Dataset.subset` picks."""
    from pyrovae import Dataset

    train(tiny(tmp_path, "n", epochs=1), progress=False)

    def per_example(*flags):
        code, out, err = cli(capsys, "evaluate", str(tmp_path / "n"), "--estimator", "quadrature",
                             "--quadrature-resolution", "64", "--json", "-", "--quiet", *flags)
        assert code == 0, err
        report = json.loads(out[out.index("{"):])
        return report, report["per_example"]["log_px"]

    _, whole = per_example()
    numbered = Dataset("d", "test", torch.zeros(len(whole), 1), torch.arange(len(whole)), (1, 1))
    for seed in (0, 3):
        report, got = per_example("--num-examples", "7", "--seed", str(seed))
        picked = numbered.subset(7, seed=seed).labels.tolist()
        assert picked != list(range(7)) and got == [whole[i] for i in picked]
        assert report["num_examples"] == 7 and f"7 of {len(whole)} drawn at random (--seed {seed})" == report["picked"]
    report, got = per_example("--num-examples", "7", "--pick", "first")
    assert got == whole[:7] and report["picked"] == f"the first 7 of {len(whole)}"
    report, got = per_example("--num-examples", str(10 * len(whole)))
    assert got == whole and "picked" not in report
    code, _, err = cli(capsys, "evaluate", str(tmp_path / "n"), "--num-examples", "0", "--quiet")
    assert code == 2 and "--num-examples" in err
    code, _, err = cli(capsys, "evaluate", str(tmp_path / "n"), "--pick", "first", "--quiet")
    assert code == 2 and "--pick" in err and "--num-examples" in err and len(err.strip().splitlines()) == 1


def test_a_random_subset_is_distinct_sorted_repeatable_and_a_fair_sample_of_an_ordered_split():
    from pyrovae import Dataset

    labels = torch.arange(10).repeat_interleave(100)  # ordered in blocks, as binarized MNIST's test file is
    ds = Dataset("d", "test", labels[:, None].float(), labels, (1, 1))
    first = ds.subset(100)
    assert first.labels.unique().tolist() == [0]  # the first 100 are one class
    index = torch.arange(len(ds))
    a, b, c = (Dataset("d", "test", ds.images, index, (1, 1)).subset(100, seed=s).labels for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 100 and torch.equal(a, a.sort().values) and 0 <= a.min() and a.max() < len(ds)
    assert torch.equal(ds.subset(100, seed=0).images[:, 0].long(), labels[a])  # images and labels stay paired
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.min() >= 3 and counts.max() <= 20  # every class, near 10 each (binomial, p = 0.1: 3..20 is +-3.3 sd)
    assert len(ds.subset(5000, seed=0)) == len(ds) and torch.equal(ds.subset(5000, seed=0).labels, labels)
    with pytest.raises(ValueError, match="n must be"):
        ds.subset(0, seed=0)
