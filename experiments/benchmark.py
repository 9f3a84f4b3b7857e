r"""The literature's benchmark on a CPU budget: statically binarised MNIST, every row trained for fixed minutes.

Each row trains on the 50,000 training images of ``binarized-mnist`` with ``--time-limit`` (the
run times its first epochs, fixes how many fit, anneals its learning rate over exactly those and
keeps the best validation epoch), then is scored the same way:

- log p(x) by importance sampling at K = 5000 (``--num-samples``) on the 10,000 validation images
  (and on the test images where ``binarized_mnist_test.amat`` is present) ± standard error, the
  ELBO, KL, active units, the share of images with Pareto k̂ > 0.7;
- epochs reached, training minutes, the training process's peak memory;
- AIS at ``pyrovae evaluate``'s defaults (T = 500, 4 chains, 5 leapfrog steps) on 1,000 test images
  drawn at random (validation images without a test file) for the two rows with the best validation
  log p(x), beside importance sampling on the same images;
- the published figure for the same model, with its source.

Rows (``ROWS``): the standard VAE (45 minutes), the IWAE bound (k = 5), MoG priors with K = 10
and K = 500, the VampPrior with K = 500 (90 minutes), the IAF guide, the two-level model with the
VampPrior, and the best recipe found (``--preset bmnist-best``, 30 minutes); the other rows train for
``--minutes`` (15). One figure, ``elbo_vs_minutes.png``: validation ELBO against training minutes,
one line per row.

Each row trains in a process of its own (so that its peak memory is its own) under
``OUT/runs/<row>``; a rerun reuses finished rows and their scores and resumes an interrupted one
from its last checkpoint, within what is left of its budget. Rows run one after another: two at
once would share the cores and each would fit fewer epochs into its minutes.

The paper rows (``vamp-paper``, ``hvae-vamp-paper``) train on the VampPrior paper's own schedule (up to 2,000
epochs, early stopping after 50 without a better validation ELBO), ``recipe-3h`` on its preset's (a cosine
over 100 minutes, early stopping) and ``recipe-3h-iaf``, ``recipe-3h-dreg``, ``recipe-3h-dreg-lr2e-3``,
``recipe-3h-dreg-lr3e-3`` on the same over 79 epochs: hours each; they run when ``--rows`` names them, or are
scored from finished runs of theirs with ``--reuse-from DIR`` (such as the shipped runs in
``docs/results/benchmark/runs``).
``--dataset caltech101-silhouettes`` runs the paper's three rows on Caltech 101 Silhouettes instead (the
standard VAE, the VampPrior and the two-level model, on the paper presets' settings), each for ``--minutes``.

Usage::

    python experiments/benchmark.py --data-dir DIR                      # every row (about 7 hours)
    python experiments/benchmark.py --data-dir DIR --dataset caltech101-silhouettes --minutes 10
    python experiments/benchmark.py --data-dir DIR --rows vae,vamp-500  # some rows
    python experiments/benchmark.py --data-dir DIR --rows vamp-paper,hvae-vamp-paper \
        --reuse-from docs/results/benchmark/runs                         # the shipped paper runs, scored
    python experiments/benchmark.py --data-dir DIR --quick              # tiny nets, seconds per row
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))

from pyrovae import TrainConfig  # noqa: E402
from pyrovae.cli import exit_code_of  # noqa: E402
from pyrovae.compare import compare_runs, markdown_table  # noqa: E402
from pyrovae.config import preset_settings, used_only  # noqa: E402
from pyrovae.files import write_json, write_text_atomic  # noqa: E402
from pyrovae.runs import read_metrics  # noqa: E402
from pyrovae.training import find_finished_run, prepare_data, train_or_reuse  # noqa: E402

VAMP = {"prior": "vamp", "prior_components": 500}
#: a row's minutes when it trains on its own schedule (its epochs, early stopping and its preset's own budget, if any)
NO_LIMIT = "no limit"
#: the VampPrior paper's test-split figures on Caltech 101 Silhouettes: its table (arXiv:1705.07120v5, AISTATS
#: 2018) could not be read from this project's offline machines, and no copy that names the model behind each
#: figure was found, so none is shown rather than one unchecked
_UNREAD = "not checked (Tomczak & Welling 2018 report it; their table could not be read offline)"
CALTECH_PUBLISHED = {"vae": _UNREAD, "vamp-500": _UNREAD, "hvae-vamp": _UNREAD}
#: the published figure each 3-hour recipe row is set against
TO_BEAT = "−83.19 (HVAE + VampPrior, Tomczak & Welling 2018, Table 2: the figure to beat)"
#: (name, what, settings on top of the defaults (a "preset" among them: its settings, under the others) or
#: "preset:NAME", minutes or None for --minutes, published); a row's minutes replace its preset's time_limit, so
#: hvae-vamp is the best row's model and settings for 15 minutes, without its weight decay
ROWS = [
    ("vae", "standard VAE, 784-400-50 (the bmnist-45m preset)", "preset:bmnist-45m", 45,
     "−89.9 (VAE, Rezende & Mohamed 2015, as listed in pythae's reproduction table)"),
    ("iwae-5", "IWAE bound, k = 5", {"elbo": "iwae", "num_particles": 5}, None,
     "−87.6 (IWAE k = 5, Burda et al. 2015, as listed in pythae's reproduction table)"),
    ("mog-10", "MoG prior, K = 10", {"prior": "mog", "prior_components": 10}, None, "—"),
    ("mog-500", "MoG prior, K = 500", {"prior": "mog", "prior_components": 500}, None, "—"),
    ("vamp-500", "VampPrior, K = 500", VAMP, 90,
     "−85.57 (VampPrior K = 500, Tomczak & Welling 2018, Table 2; up to 2,000 GPU epochs)"),
    ("iaf", "IAF guide, 4 steps", {"guide": "iaf", "flow_steps": 4}, None,
     "—"),
    ("hvae-vamp", "two levels (40/40, gated 300-300) + VampPrior K = 500, Adam from 1e-3",
     {"preset": "bmnist-best", "weight_decay": 0.0}, None,
     "−83.19 (HVAE + VampPrior, Tomczak & Welling 2018, Table 2)"),
    ("best", "the best recipe found (the bmnist-best preset): hvae-vamp with AdamW weight decay 0.02, 30 minutes",
     "preset:bmnist-best", 30,
     "−83.19 (the same model's published figure)"),
    ("vamp-paper", "VampPrior K = 500 on the paper's own schedule (the vampprior-paper preset: up to 2,000 epochs, "
     "early stopping; AdamNormGrad over whole tensors, as the shipped run was trained)",
     {"preset": "vampprior-paper", "norm_grad_by": "tensor"}, NO_LIMIT,
     "−85.57 (VampPrior K = 500, Tomczak & Welling 2018, Table 2)"),
    ("hvae-vamp-paper", "two levels + VampPrior on the paper's own schedule (the hvae-vampprior-paper preset; "
     "AdamNormGrad over whole tensors, as the shipped run was trained)",
     {"preset": "hvae-vampprior-paper", "norm_grad_by": "tensor"}, NO_LIMIT,
     "−83.19 (HVAE + VampPrior, Tomczak & Welling 2018, Table 2)"),
    ("recipe-3h", "the 3-hour recipe (the bmnist-3h preset): best's model with weight decay 0.1, trained by the "
     "IWAE bound (k = 20), weight-averaged (EMA 0.999), log-variances bounded to [−6, 2], a cosine over the epochs "
     "that fit in 100 minutes, early stopping after 10",
     "preset:bmnist-3h", NO_LIMIT,
     TO_BEAT),
    ("recipe-3h-iaf", "the 3-hour recipe with a two-step IAF guide on both levels, its cosine over 79 epochs (its "
     "epochs cost about twice the recipe's here, so 100 minutes hold too few), early stopping after 10",
     {"preset": "bmnist-3h", "guide": "iaf", "epochs": 79}, NO_LIMIT,
     TO_BEAT),
    ("recipe-3h-dreg", "the 3-hour recipe with the doubly reparameterised IWAE gradient (DReG, Tucker et al. "
     "2019) for its Gaussian guide, its cosine over 79 epochs as the IAF row's, early stopping after 10",
     {"preset": "bmnist-3h", "iwae_gradient": "dreg", "epochs": 79}, NO_LIMIT,
     TO_BEAT),
    ("recipe-3h-dreg-lr2e-3", "the DReG row at twice the learning rate, its cosine from 2e-3 down to 1e-4 over "
     "the same 79 epochs (AdamW's decay, scaled by the rate, doubles too), early stopping after 10",
     {"preset": "bmnist-3h", "iwae_gradient": "dreg", "lr": 2e-3, "epochs": 79}, NO_LIMIT,
     TO_BEAT),
    ("recipe-3h-dreg-lr3e-3", "the DReG row at three times the learning rate, its cosine from 3e-3 down to 1e-4 "
     "over the same 79 epochs (AdamW's decay triples too), early stopping after 10",
     {"preset": "bmnist-3h", "iwae_gradient": "dreg", "lr": 3e-3, "epochs": 79}, NO_LIMIT,
     TO_BEAT),
]
#: the rows run unless --rows names others (the rows on their own schedule train for hours: name them to run them)
DEFAULT_ROWS = [r[0] for r in ROWS if r[3] is not NO_LIMIT]

#: Caltech 101 Silhouettes (4,100 training images): the VampPrior paper's three one- and two-level rows, on its
#: own settings (the paper presets with the dataset swapped), each for --minutes
CALTECH = "caltech101-silhouettes"
CALTECH_ROWS = [
    ("vae", "standard VAE, gated 300-300, 40 latents (the vampprior-paper preset with --prior standard)",
     {"preset": "vampprior-paper", "prior": "standard"}, None, CALTECH_PUBLISHED["vae"]),
    ("vamp-500", "VampPrior K = 500 (the vampprior-paper preset)", {"preset": "vampprior-paper"}, None,
     CALTECH_PUBLISHED["vamp-500"]),
    ("hvae-vamp", "two levels + VampPrior K = 500 (the hvae-vampprior-paper preset)",
     {"preset": "hvae-vampprior-paper"}, None, CALTECH_PUBLISHED["hvae-vamp"]),
]
DATASET_ROWS = {"binarized-mnist": ROWS, CALTECH: CALTECH_ROWS}
_FIX = "rerun with another --out"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/benchmark.py",
        description="Train model configurations on statically binarised MNIST (or Caltech 101 Silhouettes), each "
        "for a fixed wall-clock budget, and report validation and test log p(x) (K importance samples), ELBO, KL, "
        "active units, Pareto k-hat, epochs, minutes, peak memory, AIS for the best two rows, and the published "
        "figure beside each.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding binarized_mnist_{train,valid}.amat (and "
                   "_test.amat where you have it), plain or .gz; with --dataset caltech101-silhouettes, "
                   "caltech101_silhouettes_28_split1.mat")
    p.add_argument("--dataset", default="binarized-mnist", choices=list(DATASET_ROWS),
                   help=f"the benchmark's data: binarized MNIST ({', '.join(r[0] for r in ROWS)}) or Caltech 101 "
                   f"Silhouettes ({', '.join(r[0] for r in CALTECH_ROWS)})")
    p.add_argument("--minutes", type=float, default=15, help="training minutes of each row without a budget of "
                   "its own (on binarized MNIST the vae, vamp-500 and best rows have 45, 90 and 30; the paper rows "
                   "train on their own schedule, without a budget, and recipe-3h on its preset's 100 minutes)")
    p.add_argument("--rows", default=None, help="comma-separated subset of rows (default: every row of the dataset "
                   f"but those on their own schedule, {', '.join(r[0] for r in ROWS if r[3] is NO_LIMIT)}: hours each)")
    p.add_argument("--num-samples", type=int, default=5000, help="importance samples K per image on the reported "
                   "split: test where the test file is present, else validation")
    p.add_argument("--val-num-samples", type=int, default=1000, help="K on validation when test is the reported "
                   "split: there the validation figures only rank the rows (for AIS) and guide the recipe, and "
                   "K = 1000 scores them in a fifth of the time")
    p.add_argument("--ais-examples", type=int, default=1000, help="images scored by AIS for the two rows with the "
                   "best validation log p(x), drawn at random by --seed (the test file is ordered by digit, so its "
                   "first images are no fair sample): test images where the test split is present, else validation "
                   "images (0 = no AIS)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run and of the evaluation")
    p.add_argument("--quick", action="store_true", help="tiny networks, a few seconds per row, K at most 20 on 50 "
                   "images: checks that everything runs (numbers mean nothing)")
    p.add_argument("--out", default="results/benchmark", help="output folder (runs under OUT/runs)")
    p.add_argument("--reuse-from", action="append", default=[], metavar="DIR",
                   help="a folder of finished runs (such as the shipped docs/results/benchmark/runs, or another "
                   "study's OUT/runs; may be given again): a run there with a row's settings is scored in place "
                   "instead of trained. Its folder, name and data location may differ; for the rows on their own "
                   "schedule (the paper rows, recipe-3h) also the --time-limit of the stretches it trained in, if "
                   "it ended by its own schedule (early stopping or its last epoch), not by a budget")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--train-row", help=argparse.SUPPRESS)  # internal: train one row in this process
    return p


def row_settings(name: str, args) -> dict:
    """The training settings of row ``name``: its own (or its preset's), the data, the seed and its budget."""
    _, _, spec, minutes, _ = _row(name, args.dataset)
    if isinstance(spec, str):
        spec = {"preset": spec.split(":", 1)[1]}
    own = {**(preset_settings(spec["preset"]) if "preset" in spec else {}),
           **{k: v for k, v in spec.items() if k != "preset"}}
    settings = {"epochs": 100000, **own, "dataset": args.dataset, "data_dir": str(args.data_dir),
                "seed": args.seed}
    if args.quick:
        settings.update(hidden_dims=[32] if settings.get("hierarchy") != "two-level" else [16, 16], latent_dim=4,
                        flow_hidden_dims=[16], flow_context_dim=8, batch_size=100, time_limit="3s", epochs=4)
        if settings.get("lower_latent_dims"):
            settings["lower_latent_dims"] = [3]
        if settings.get("prior_components", 1) > 20:
            settings["prior_components"] = 20
        settings["warmup_epochs"] = min(settings.get("warmup_epochs", 0), 1)
        settings = used_only(settings)  # (the small flow networks only where there is a flow)
    elif minutes is not NO_LIMIT:
        settings["time_limit"] = f"{minutes or args.minutes:g}m"
    # (a preset's settings that the row's own change leaves unused, such as the pseudo-inputs of a
    # VampPrior preset under --prior standard, are dropped)
    return used_only(settings)


def _training_split(config: TrainConfig):
    from pyrovae import load_dataset

    return load_dataset(config.dataset, "train", data_dir=config.data_dir)


def _row(name: str, dataset: str) -> tuple:
    return next(r for r in DATASET_ROWS[dataset] if r[0] == name)


def _config(name: str, args) -> TrainConfig:
    return TrainConfig.from_dict({**row_settings(name, args), "out": str(Path(args.out) / "runs"), "name": name})


def _train_row(name: str, args) -> Path:
    """Train (or reuse, or resume: within what is left of its budget, or a raised one) one row in a child
    process, so that its peak memory is its own."""
    run_dir = Path(args.out) / "runs" / name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--train-row", name, "--data-dir", str(args.data_dir),
           "--dataset", args.dataset, "--minutes", f"{args.minutes:g}", "--seed", str(args.seed), "--out",
           str(args.out)]
    cmd += ["--quick"] * args.quick + ["--quiet"] * args.quiet
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ValueError(f"row {name} did not train: {last}")
    return run_dir


def reusable_run(name: str, args) -> Path | None:
    """A finished run under ``--reuse-from`` with row ``name``'s settings, or ``None``.

    Every setting must match but the run's folder and name, its data location (the data's identity is
    what its checkpoint fingerprints) and, for a row on the paper's own schedule, the ``--time-limit`` of
    the stretches it was trained in: such a run must have ended by that schedule (early stopping or its
    last epoch), since a run cut short by a budget is not the row."""
    own_schedule = _row(name, args.dataset)[3] is NO_LIMIT
    ignore = ("out", "name") + (("time_limit",) if own_schedule else ())
    ended_by_schedule = (lambda summary: summary.get("stopped_by") in ("patience", "epochs")) if own_schedule else None
    return find_finished_run(_config(name, args), args.reuse_from, ignore, accept=ended_by_schedule)


def _what_and_published(name: str, dataset: str) -> tuple[str, str]:
    row = _row(name, dataset)
    return row[1], row[4]


def _curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(training minutes at the end of each epoch, validation ELBO) of a run."""
    minutes, elbo, total = [], [], 0.0
    for r in read_metrics(run_dir / "metrics.jsonl"):
        total += r.get("epoch_seconds", 0.0)
        minutes.append(total / 60)
        elbo.append(r["val_elbo"])
    return minutes, elbo


def _plot(curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str) -> None:
    from pyrovae.files import write_atomic
    from pyrovae.plots import figure

    fig = figure(7.5, 4.5, dpi=110)
    ax = fig.subplots()
    for i, (name, (minutes, elbo)) in enumerate(curves.items()):  # past ten colours, dashed: no two lines alike
        ax.plot(minutes, elbo, label=name, lw=1.2, color=f"C{i % 10}", linestyle="-" if i < 10 else "--")
    longest = max((m[-1] for m, _ in curves.values() if m), default=0.0)
    if longest > 100:  # rows of 15 minutes beside rows of hours: a log axis shows both races
        ax.set_xscale("log")
    finite = [e for _, es in curves.values() for e in es if math.isfinite(e)]
    if finite:  # the first epochs are far below: show the last 15 nats of the race
        top = max(finite)
        ax.set_ylim(top - 15, top + 1)
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("validation ELBO (nats)")
    ax.set_title(f"{title}: time to quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))


def _minutes(s: dict) -> str:
    """Training minutes, of the row's budget or on its own schedule (a paper row's run may have trained in
    stretches, each with a --time-limit of its own: those are not the row's budget)."""
    if s.get("time_limit") and not s.get("own_schedule"):
        return f"{s['train_seconds'] / 60:.1f} of {s['time_limit']}"
    return f"{s['train_seconds'] / 60:.1f} ({s['epochs_done']} epochs, its own schedule)"


def headline(rows: list[dict], num_samples: int) -> str:
    """The README's table: one line per row with its minutes, ELBO and log p(x) by importance sampling on the test
    split (on validation where the data have no test split), AIS where it was run (with importance sampling's
    figure on the same images), and the published figure (a test-split figure)."""
    split = "test" if all("test" in r for r in rows) else "validation"
    lines = [f"| row | model | minutes | ELBO ({split}) | log p(x), IS K = {num_samples} ({split}) | log p(x), AIS "
             "(IS on the same images) | published (test split) |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        rep, s = (r["test"] if split == "test" else r["report"]), r["summary"]
        ais = "—"
        if "ais" in r:
            a = r["ais"]
            same = f"{a['is_log_px']:.2f}, " if a.get("is_log_px") is not None else ""
            ais = f"{a['log_px']:.2f} ± {a['log_px_se']:.2f} ({same}{a['num_examples']:,} random {a['split']} images)"
        lines.append(f"| {r['name']} | {r['what']} | {_minutes(s)} | {rep['elbo']:.2f} | "
                     f"{rep['log_px']:.2f} ± {rep['log_px_se']:.2f} | {ais} | {r['published'].split(' (')[0]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return exit_code_of("experiments/benchmark.py", _main, args, argv)


def _main(args, argv) -> int:
    if args.train_row:
        train_or_reuse(_config(args.train_row, args), progress=not args.quiet, fix=_FIX)
        return 0
    rows = DATASET_ROWS[args.dataset]
    default = DEFAULT_ROWS if rows is ROWS else [r[0] for r in rows]
    names = [n.strip() for n in (args.rows if args.rows is not None else ",".join(default)).split(",") if n.strip()]
    unknown = [n for n in names if n not in [r[0] for r in rows]]
    if unknown:
        raise ValueError(f"--rows: unknown rows {', '.join(unknown)} for {args.dataset}; choose from "
                         f"{', '.join(r[0] for r in rows)}")
    if not names:
        raise ValueError("--rows names no row; choose from " + ", ".join(r[0] for r in rows))
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--rows names {', '.join(twice)} more than once; name each row once")
    if not math.isfinite(args.minutes) or args.minutes <= 0:
        raise ValueError(f"--minutes must be a positive number (got {args.minutes:g})")
    for flag, k in (("--num-samples", args.num_samples), ("--val-num-samples", args.val_num_samples)):
        if k < 1:
            raise ValueError(f"{flag} must be at least 1 (got {k})")
    if args.ais_examples < 0:
        raise ValueError(f"--ais-examples must be 0 (no AIS) or more (got {args.ais_examples})")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must lie in [0, 2^63) (got {args.seed})")
    for folder in args.reuse_from:
        if not Path(folder).is_dir():
            raise ValueError(f"--reuse-from {folder}: not a folder; give a folder of finished runs, such as "
                             "docs/results/benchmark/runs")
    out = Path(args.out)
    for name in names:  # every row's settings are checked before the first one trains
        _config(name, args).resolved()
    base = _config(names[0], args).resolved()
    val = prepare_data(base, "val", "cpu")  # a missing data file stops the study before any training
    run_dirs = []
    for name in names:
        found = reusable_run(name, args)
        if found is not None and not args.quiet:
            print(f"{name}: scoring the finished run {found} (--reuse-from)", file=sys.stderr)
        run_dirs.append(found if found is not None else _train_row(name, args))

    quick = args.quick
    try:
        test = prepare_data(base, "test", "cpu")
    except (FileNotFoundError, ValueError):  # (Caltech's file may lack its test part: "no test split in ...")
        test = None
    num_samples, val_num_samples = args.num_samples, args.val_num_samples
    if quick:
        num_samples = min(num_samples, 20)
        val_num_samples = min(val_num_samples, num_samples)
        val, test = val.subset(50), None if test is None else test.subset(50)
    if test is None:  # validation is the reported split
        val_num_samples = num_samples
    score = {"seed": args.seed, "cache": True, "progress": not args.quiet}
    result = compare_runs(run_dirs, val, names=names, num_samples=val_num_samples, **score)
    test_result = None if test is None else compare_runs(run_dirs, test, names=names, num_samples=num_samples,
                                                         **score)

    # the best two are chosen on validation; AIS then scores them on test where there is one
    ranked = sorted((r for r in result["rows"]), key=lambda r: -r["report"]["log_px"])[:2]
    ais_rows = {}
    if args.ais_examples > 0:
        ais_split = test if test is not None else val
        ais_data = ais_split.subset(min(args.ais_examples, len(ais_split)), seed=args.seed)
        ais_options = {"num_steps": 10, "num_chains": 2} if quick else {}
        for r in ranked:
            ais = compare_runs([Path(r["report"]["run"])], ais_data, names=[r["name"]], num_samples=num_samples,
                               seed=args.seed, cache=True, progress=not args.quiet, estimator="ais",
                               ais_options=ais_options)["rows"][0]["report"]
            ais_rows[r["name"]] = {"num_examples": len(ais_data), "split": ais_split.split, "log_px": ais["log_px"],
                                   "log_px_se": ais["log_px_se"], "is_log_px": ais.get("is_log_px"),
                                   "diagnostics": ais.get("ais")}

    for row, run_dir in zip(result["rows"], run_dirs):
        summary = json.loads((run_dir / "summary.json").read_text())
        row["what"], row["published"] = _what_and_published(row["name"], args.dataset)
        row["summary"] = {k: summary.get(k) for k in ("epochs_done", "best_epoch", "stopped_by", "train_seconds",
                                                        "time_limit", "planned_epochs", "peak_rss_mb")}
        row["summary"]["own_schedule"] = "time_limit" not in row_settings(row["name"], args)
        row["settings"] = TrainConfig.load(run_dir / "config.json").to_dict()
        if test_result is not None:
            t = next(x for x in test_result["rows"] if x["name"] == row["name"])["report"]
            row["test"] = {"log_px": t["log_px"], "log_px_se": t["log_px_se"], "elbo": t["elbo"]}
        if row["name"] in ais_rows:
            row["ais"] = ais_rows[row["name"]]

    table = markdown_table(result, extra=[
        ("epochs (best)", lambda r: f"{r['summary']['epochs_done']} ({r['summary']['best_epoch']})"),
        ("minutes", lambda r: _minutes(r["summary"])),
        ("peak memory", lambda r: f"{r['summary']['peak_rss_mb'] / 1024:.1f} GiB"
         if r["summary"].get("peak_rss_mb") else "—"),
        ("AIS", lambda r: f"{r['ais']['log_px']:.2f} ± {r['ais']['log_px_se']:.2f} ({r['ais']['num_examples']:,} "
         f"random {r['ais']['split']})" if "ais" in r else "—"),
        ("test ELBO", lambda r: f"{r['test']['elbo']:.2f}" if "test" in r else "—"),
        ("test log p(x)", lambda r: f"{r['test']['log_px']:.2f} ± {r['test']['log_px_se']:.2f}" if "test" in r
         else "—"),
        ("published (test split)", lambda r: r["published"]),
    ])
    curves = {name: _curve(d) for name, d in zip(names, run_dirs)}
    out.mkdir(parents=True, exist_ok=True)
    title, published_on = (("binarized MNIST", "statically binarized MNIST") if args.dataset == "binarized-mnist"
                           else ("Caltech 101 Silhouettes",) * 2)
    _plot(curves, out / "elbo_vs_minutes.png", title)
    given = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(given):  # the data's folder is the user's own: the report names it DIR
        if a == "--data-dir" and i + 1 < len(given):
            given[i + 1] = "DIR"
        elif a.startswith("--data-dir="):
            given[i] = "--data-dir=DIR"
    command = "python experiments/benchmark.py " + " ".join(given)
    splits = f"{val.split} split, {len(val):,} images" + (f"; {test.split} split, {len(test):,}" if test else "")
    lines = [f"# {title} on a CPU budget ({splits})", "", table, "",
             *[f"- **{r['name']}**: {r['what']}" for r in result["rows"]], "",
             f"- Training: the {len(_training_split(base)):,} training images, each row for the minutes shown "
             "(`--time-limit`; the paper rows on their own schedule, up to 2,000 epochs with early stopping), the best "
             "validation epoch kept; minutes are the epochs' own seconds on 2 CPU cores.",
             f"- log p(x): importance sampling with each run's q(z|x), K = {num_samples} per image"
             + (f" on test and K = {val_num_samples} on validation (whose figures only rank the rows)"
                if val_num_samples != num_samples else "") + ", the same per-image "
             "noise streams for every row; Δ: paired over the same images, ± its standard error. ELBO: the mean of "
             "the same K log-weights per image, at the best validation epoch (training's own validation ELBO draws "
             "z once per image, so it can differ in the second decimal). The validation "
             "split also chose each row's best epoch, so its figures are slightly optimistic; the test column is "
             "clean where the test file is present.",
             "- AIS: `pyrovae evaluate --estimator ais` defaults (T = 500, 4 chains, 5 leapfrog steps) for the two "
             "rows with the best validation log p(x), on images of the test split drawn at random (validation where "
             "there is no test file); importance sampling's figure on the same images beside it.",
             f"- Published figures are on the test split of the same {published_on}, after hundreds "
             "to thousands of GPU epochs.",
             "", "![validation ELBO against training minutes](elbo_vs_minutes.png)", "", f"Command: `{command}`", ""]
    text = "\n".join(lines)
    write_text_atomic(out / "benchmark.md", text)
    write_text_atomic(out / "headline.md", headline(result["rows"], num_samples))
    def slim(compared):  # per-example values stay in each run's scores-*.json
        return compared and {**compared, "rows": [{**r, "report": {k: v for k, v in r["report"].items()
                                                                  if k != "per_example"}} for r in compared["rows"]]}

    write_json(out / "benchmark.json", {"command": command, "validation": slim(result), "test": slim(test_result),
                                        "rows": [{k: v for k, v in r.items() if k != "report"}
                                                 for r in result["rows"]]})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
