"""experiments/bench_marginal.py and experiments/iwae.py run end to end with --quick."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_experiment


def test_bench_marginal_quick(tmp_path, idx_dir, capsys):
    bench = load_experiment("bench_marginal")
    bench.main(["--quick", "--data-dir", str(idx_dir), "--out", str(tmp_path / "b"), "--quiet"])
    r = json.loads((tmp_path / "b" / "bench.json").read_text())
    md = (tmp_path / "b" / "bench.md").read_text()
    assert md == capsys.readouterr().out.split("wrote ")[0].rstrip("\n") + "\n"
    assert "MNIST test set (60 images" in r["data"] and "repeated 4 times" in r["data"]
    assert "untrained" in r["model"] and "smoke test" in md
    assert (r["num_images"], r["num_samples"], r["reference"]["images"]) == (200, 100, 100)
    assert r["flops_per_sample_image"] == 2 * (50 * 400 + 400 * 784)
    assert r["flops_encoder_per_image"] == 2 * (784 * 400 + 400 * 100)
    for part in (r["estimator"], r["reference"]):
        assert part["wall_s"] > 0 and part["gflops"] > 0 and part["peak_rss_mb"] > 0
    assert r["matmul_gflops"]["best"] >= max(r["matmul_gflops"]["before"].values())
    assert [s["chunk_size"] for s in r["sweep"]] == [1024, 2048]
    # the two estimators estimate the same IWAE bound: independent draws agree within noise
    ref = r["reference"]
    assert abs(ref["estimator_minus_reference"]) < 4 * ref["difference_se"]
    assert r["targets"]["wall_under_600_s"] is None  # not a full-size run: no claim made


def test_bench_marginal_refuses_bad_sizes(tmp_path):
    bench = load_experiment("bench_marginal")
    with pytest.raises(ValueError, match="--num-samples must be at least 1"):
        bench.main(["--quick", "--num-samples", "0", "--out", str(tmp_path)])


def test_iwae_quick_then_reused(tmp_path, capsys):
    iwae = load_experiment("iwae")
    result = iwae.main(["--quick", "--out", str(tmp_path), "--quiet"])
    assert {(m["objective"], m["k"]) for m in result["models"]} == {("vae", 1), ("iwae", 1), ("iwae", 5), ("iwae", 50)}
    for name in ("iwae.md", "iwae.json", "iwae.png"):
        assert (tmp_path / name).is_file()
    md = (tmp_path / "iwae.md").read_text()
    assert "-84.78" in md and "-85.54" in md and "-86.76" in md  # Burda et al.'s anchors, beside
    by = {(m["objective"], m["k"]): m["test"] for m in result["models"]}
    # the ELBO and IWAE with one particle are the same objective with the same gradient: same seed, same model
    assert by[("vae", 1)]["log_px"] == pytest.approx(by[("iwae", 1)]["log_px"], abs=0.05)
    for t in by.values():
        assert t["num_samples"] == 100 and t["num_examples"] == 100
        assert math.isfinite(t["log_px"]) and t["log_px"] > t["elbo"]
    # a second call reuses the finished runs instead of training again
    again = iwae.main(["--quick", "--out", str(tmp_path), "--quiet"])
    assert {m["run_was"] for m in again["models"]} == {"reused"}


def test_iwae_refuses_bad_settings(tmp_path):
    iwae = load_experiment("iwae")
    with pytest.raises(ValueError, match="--hidden-dims must be comma-separated"):
        iwae.main(["--hidden-dims", "4x", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--epochs must be at least 1"):
        iwae.main(["--quick", "--epochs", "0", "--out", str(tmp_path)])
