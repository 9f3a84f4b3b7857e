r"""Paired comparisons of trained runs on the same examples with the same seeds.

Two models' log p(x) are compared example by example: with :math:`d_i = \log \hat p_a(x_i) -
\log \hat p_b(x_i)` over the same n examples, the difference is :math:`\bar d \pm
\mathrm{sd}(d)/\sqrt{n}`, far tighter than either model's own standard error, because how
hard each example is cancels. ``pyrovae compare`` and the studies in ``experiments/`` build
their tables with :func:`compare_runs` and :func:`markdown_table`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from .data import Dataset
from .files import write_json
from .metrics import evaluate
from .runs import load_run, read_metrics

__all__ = ["paired_difference", "score_run", "compare_runs", "markdown_table", "plot_differences"]


def paired_difference(a, b) -> tuple[float, float]:
    r"""Mean of :math:`a_i - b_i` over the same examples and its standard error
    :math:`\mathrm{sd}(a - b)/\sqrt{n}` (``nan`` for one example)."""
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    return float(d.mean()), float(d.std()) / math.sqrt(d.numel()) if d.numel() > 1 else math.nan


def _data_key(data: Dataset) -> str:
    h = hashlib.sha1()
    h.update(data.images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def score_run(run_dir: str | Path, data: Dataset, *, num_samples: int = 1000, seed: int = 0, which: str = "best",
              chunk_size: int | None = None, batch_size: int = 100, progress: bool = False,
              cache: bool = False, device: str = "cpu", estimator: str = "is", ais_options: dict | None = None,
              quadrature_resolution: int = 256, weights: str = "averaged") -> dict:
    """``evaluate``'s report of one run on ``data`` with per-example values (``report["per_example"]``),
    training facts from the run directory (epochs, seconds per epoch), and the seconds the
    evaluation took. With ``cache``, kept in ``RUN/scores-<key>.json`` and reused while the
    checkpoint, data, K and seed are the same. ``weights``: as :func:`~pyrovae.runs.load_run` takes it."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, which=which, device=device, weights=weights)
    options = {"estimator": estimator, "ais_options": ais_options or {}, "quadrature_resolution": quadrature_resolution}
    weights_key = "" if run.weights == "raw" else "-ema"
    key = f"{which}{weights_key}-e{run.epoch}-{data.name.replace('/', '_')}-{data.split}-n{len(data)}-" \
          f"{_data_key(data)}-K{num_samples}-s{seed}" \
          + ("" if estimator == "is" else f"-{json.dumps(options, sort_keys=True)}")
    path = run_dir / f"scores-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if cache and path.is_file():
        report = json.loads(path.read_text())
        if report.get("key") == key:
            return report
    if data.data_dim != run.data_dim:
        raise ValueError(f"{run_dir} was trained on {run.data_dim} values per example, {data.name} has "
                         f"{data.data_dim}: compare runs on data of their own shape")
    t0 = time.perf_counter()
    images = data.images.to(run.device)
    labels = None if data.labels is None else data.labels.to(run.device)
    report = evaluate(run.model, images, labels, num_samples=num_samples, chunk_size=chunk_size,
                      batch_size=batch_size, progress=progress, seed=seed, per_example=True, **options)
    rows = read_metrics(run_dir / "metrics.jsonl")
    seconds = [r["epoch_seconds"] for r in rows if "epoch_seconds" in r]
    report.update({"key": key, "run": str(run_dir), "checkpoint": run.checkpoint.name, "epoch": run.epoch,
                   "weights": run.weights,
                   "epochs": len(rows), "train_seconds": sum(seconds),
                   "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else math.nan,
                   "eval_seconds": time.perf_counter() - t0, "dataset": data.name, "split": data.split})
    if cache:
        write_json(path, report)
    return report


def compare_runs(run_dirs: list[str | Path], data: Dataset, *, baseline: int = 0, names: list[str] | None = None,
                 **score_kwargs) -> dict:
    """Score every run on ``data`` (:func:`score_run`) and each against ``run_dirs[baseline]``:
    the paired difference of log p(x) and of the ELBO over the same examples, with standard errors."""
    if not run_dirs:
        raise ValueError("give at least one run directory to compare")
    _check_comparable(run_dirs, data)
    names = names or [Path(r).name for r in run_dirs]
    if len(set(names)) != len(names):
        names = [str(r) for r in run_dirs]
    reports = [score_run(r, data, **score_kwargs) for r in run_dirs]
    base = reports[baseline]
    rows = []
    for name, rep in zip(names, reports):
        row = {"name": name, "report": rep}
        if rep is not base and "per_example" in rep and "per_example" in base:
            row["log_px_diff"] = paired_difference(rep["per_example"]["log_px"], base["per_example"]["log_px"])
            row["elbo_diff"] = paired_difference(rep["per_example"]["elbo"], base["per_example"]["elbo"])
        rows.append(row)
    estimator = score_kwargs.get("estimator", "is")
    label = None
    if estimator == "ais":
        a = score_kwargs.get("ais_options") or {}
        label = f"AIS, T={a.get('num_steps')}, {a.get('num_chains')} chains"
    elif estimator == "quadrature":
        label = "quadrature"
    return {"baseline": names[baseline], "num_examples": len(data), "dataset": data.name, "split": data.split,
            "num_samples": score_kwargs.get("num_samples", 1000), "estimator": estimator, "estimator_label": label,
            "rows": rows}


def _check_comparable(run_dirs, data: Dataset) -> None:
    """Refuse runs that did not model the same kind of data as ``data``: another number of values
    per example, or binary against grey values."""
    from .config import TrainConfig
    from .runs import load_checkpoint

    seen = []
    for r in run_dirs:
        r = Path(r)
        ckpt = r / "best.pt" if (r / "best.pt").is_file() else r / "last.pt"
        state = load_checkpoint(ckpt)
        config = TrainConfig.load(r / "config.json") if (r / "config.json").is_file() else \
            TrainConfig.from_dict(state["config"], str(ckpt))
        seen.append((r, int(state["data_dim"]), config.binarize != "none"))
    first = seen[0]
    for r, dim, binary in seen:
        if dim != data.data_dim or dim != first[1]:
            raise ValueError(f"{r} models {dim} values per example, {seen[0][0]} {first[1]} and the data "
                             f"{data.data_dim}: compare runs trained on data of one shape")
        if binary != first[2]:
            raise ValueError(f"{r} models {'binarised' if binary else 'grey'} images and {first[0]} "
                             f"{'binarised' if first[2] else 'grey'} ones: their log p(x) are not comparable")


def _f(v, spec=".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


def plus_minus(mean: float, se: float | None, signed: bool = False) -> str:
    """``mean ± se``; with no standard error (one example) ``mean ± n/a (1 example)``."""
    m = format(mean, "+.2f" if signed else ".2f")
    if se is None or not math.isfinite(se):
        return f"{m} ± n/a (1 example)"
    return f"{m} ± {se:.2f}"


def markdown_table(result: dict, extra: list[tuple[str, callable]] = ()) -> str:
    """One Markdown table: per run ELBO, log p(x) ± s.e., KL, active units, the share of
    examples with Pareto k̂ > 0.7, and the paired differences against the baseline; ``extra``
    adds columns ``(header, row -> text)``."""
    what = result.get("estimator_label") or f"K={result['num_samples']}"
    head = ["run", "ELBO", f"log p(x) ({what})", f"Δ log p(x) vs {result['baseline']} (paired)",
            "Δ ELBO (paired)", "gap log p(x) − ELBO", "KL", "active units", "k̂ > 0.7", *[h for h, _ in extra]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        r = row["report"]
        pk = r.get("pareto_k")
        diff = row.get("log_px_diff")
        ediff = row.get("elbo_diff")
        cells = [
            row["name"], _f(r.get("elbo")),
            plus_minus(r["log_px"], r.get("log_px_se")) if r.get("log_px") is not None else "—",
            plus_minus(*diff, signed=True) if diff else "—",
            plus_minus(*ediff, signed=True) if ediff else "—",
            _f(r["log_px"] - r["elbo"]) if r.get("log_px") is not None and r.get("elbo") is not None else "—",
            _f(r.get("kl")),
            f"{r['active_units']} / {r['latent_dim']}" if "active_units" in r else "—",
            (f"{100 * pk['frac_above_0.7']:.1f}%" if pk.get("frac_above_0.7") is not None else "undefined") if pk
            else "—",
            *[fn(row) for _, fn in extra],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_differences(result: dict, path: str | Path, title: str = "") -> Path:
    """A PNG of each run's paired log p(x) difference to the baseline, with ±2 s.e. bars; ``path``
    must end in .png."""
    from .files import write_atomic
    from .plots import figure, image_path

    path = image_path("--plot", path, (".png",))
    rows = [r for r in result["rows"] if "log_px_diff" in r]
    fig = figure(1.6 + 0.9 * max(1, len(rows)), 3.6)
    ax = fig.subplots()
    xs = range(len(rows))
    ax.errorbar(list(xs), [r["log_px_diff"][0] for r in rows], yerr=[2 * r["log_px_diff"][1] for r in rows],
                fmt="o", capsize=4)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"log p(x) − {result['baseline']} (nats, ±2 s.e.)")
    ax.set_title(title or f"paired over {result['num_examples']} {result['split']} examples", fontsize=9)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))
