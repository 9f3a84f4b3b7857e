r"""Richer q(z|x): the Gaussian guide against inverse autoregressive flow guides.

The ELBO's gap to log p(x) is :math:`\mathrm{KL}(q(z|x) \,\|\, p(z|x))`, and importance
sampling with q as proposal is only as reliable as q is close to the posterior (Pareto
:math:`\hat k`). This study trains, on the same data, networks (784-400-50), prior and
number of epochs:

- the Gaussian guide (``--guide gaussian``);
- IAF guides with 2, 4 and 8 steps (``--guide iaf --flow-steps T``; Kingma et al. 2016);
- the VampPrior with K = 500 pseudo-inputs (Tomczak & Welling 2018), without and with an
  IAF guide of 4 steps (its components are the encoder's Gaussian base, see pyrovae/flows.py);

and scores each on the test split with the same seeds: test ELBO, log p(x) by importance
sampling at K = 5000 ± standard error, the paired differences of both against the Gaussian
guide on the same images, the gap log p(x) − ELBO, the share of images with
:math:`\hat k > 0.7` at that K, active units and seconds per epoch. It writes
``flows.md``, ``flows.json`` and ``flows.png`` under ``--out``.

Runs are kept under ``OUT/runs/``: a rerun reuses finished runs and their scores and resumes
unfinished ones (``--fresh`` starts over).

Usage::

    python experiments/flows.py            # mnist5k, the full study (about an hour on 2 cores)
    python experiments/flows.py --quick    # tiny networks, 2 epochs: under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))


from pyrovae import TrainConfig  # noqa: E402
from pyrovae.cli import exit_code_of  # noqa: E402
from pyrovae.compare import compare_runs, markdown_table  # noqa: E402
from pyrovae.config import used_only  # noqa: E402
from pyrovae.files import write_atomic, write_json, write_text_atomic  # noqa: E402
from pyrovae.plots import figure  # noqa: E402
from pyrovae.training import prepare_data, train_or_reuse  # noqa: E402

#: (row name, what it is, settings on top of the shared ones)
ROWS = [
    ("gaussian", "Gaussian guide", {}),
    ("iaf-2", "IAF guide, 2 steps", {"guide": "iaf", "flow_steps": 2}),
    ("iaf-4", "IAF guide, 4 steps", {"guide": "iaf", "flow_steps": 4}),
    ("iaf-8", "IAF guide, 8 steps", {"guide": "iaf", "flow_steps": 8}),
    ("vamp-500", "VampPrior K=500, Gaussian guide", {"prior": "vamp", "prior_components": 500}),
    ("vamp-500-iaf-4", "VampPrior K=500, IAF guide, 4 steps",
     {"prior": "vamp", "prior_components": 500, "guide": "iaf", "flow_steps": 4}),
]
_FIX = "rerun with --fresh, or choose another --out"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/flows.py",
        description="Gaussian guide against IAF guides (2, 4, 8 steps) and the VampPrior K=500 with and without "
        "IAF, same networks and budget: test ELBO, log p(x) at K importance samples, paired differences, the "
        "ELBO gap, Pareto k-hat, active units, seconds per epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist5k", help="any pyrovae dataset of 784-pixel images")
    p.add_argument("--data-dir", default="data", help="folder of IDX files, for --dataset mnist")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every row (default: pyrovae's default)")
    p.add_argument("--num-samples", type=int, default=5000, help="importance samples K per test image")
    p.add_argument("--rows", default=",".join(r[0] for r in ROWS), help="comma-separated subset of rows")
    p.add_argument("--seed", type=int, default=0, help="seed of every run and of the evaluation")
    p.add_argument("--quick", action="store_true", help="784-32-4 networks, 2 epochs, K=50 on 100 test images: "
                   "checks that everything runs (numbers mean nothing)")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs under --out first")
    p.add_argument("--out", default="results/flows", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _plot(result: dict, path: Path) -> Path:
    rows = [r for r in result["rows"] if "log_px_diff" in r]
    fig = figure(10, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    xs = list(range(len(rows)))
    for key, label, shift in (("log_px_diff", "log p(x)", -0.1), ("elbo_diff", "ELBO", 0.1)):
        ax1.errorbar([x + shift for x in xs], [r[key][0] for r in rows], yerr=[2 * r[key][1] for r in rows],
                     fmt="o", capsize=4, label=label)
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set_xticks(xs)
    ax1.set_xticklabels([r["name"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax1.set_ylabel(f"vs {result['baseline']} (nats, paired, ±2 s.e.)")
    ax1.legend(fontsize=8)
    names = [r["name"] for r in result["rows"]]
    ax2.bar(range(len(names)), [100 * r["report"]["pareto_k"]["frac_above_0.7"] for r in result["rows"]],
            color="tab:red", alpha=0.7, label="k̂ > 0.7 (%)")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax2.set_ylabel(f"test images with k̂ > 0.7 at K={result['num_samples']} (%)")
    ax2b = ax2.twinx()
    ax2b.plot(range(len(names)), [r["report"]["log_px"] - r["report"]["elbo"] for r in result["rows"]], "ko-",
              label="gap log p(x) − ELBO")
    ax2b.set_ylabel("gap log p(x) − ELBO (nats)")
    ax2.legend(loc="upper left", fontsize=8)
    ax2b.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return exit_code_of("experiments/flows.py", _main, args, argv)


def _main(args, argv) -> int:
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    known = [r[0] for r in ROWS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown rows {', '.join(unknown)}; choose from {', '.join(known)}")
    if "gaussian" not in names:
        raise ValueError("--rows must include gaussian: every row is compared with it")
    rows = [r for r in ROWS if r[0] in names]
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    runs = out / "runs"
    shared = {"dataset": args.dataset, "data_dir": args.data_dir, "seed": args.seed}
    if args.epochs is not None:
        shared["epochs"] = args.epochs
    num_samples = args.num_samples
    if args.quick:
        shared.update(epochs=2, hidden_dims=(32,), latent_dim=4, flow_hidden_dims=(16,), flow_context_dim=8,
                      batch_size=500)
        num_samples = 50
    base = TrainConfig(**shared).resolved()
    test = prepare_data(base, "test", "cpu")
    if args.quick:
        test = dataclasses.replace(test, images=test.images[::5][:100],
                                   labels=None if test.labels is None else test.labels[::5][:100])
    run_dirs = []
    for name, _, settings in rows:
        s = {**shared, **settings}
        if args.quick and s.get("prior") == "vamp":
            s["prior_components"] = 20
        config = TrainConfig(**used_only(s), out=str(runs), name=name)
        run_dirs.append(train_or_reuse(config, progress=not args.quiet, fix=_FIX)[0])
    result = compare_runs(run_dirs, test, names=[r[0] for r in rows], num_samples=num_samples, seed=args.seed,
                          cache=True, progress=not args.quiet)
    for row, (_, what, settings) in zip(result["rows"], rows):
        row["what"], row["settings"] = what, settings
    table = markdown_table(result, extra=[
        ("s / epoch", lambda r: f"{r['report']['seconds_per_epoch']:.2f}"),
        ("epochs (best)", lambda r: f"{r['report']['epochs']} ({r['report']['epoch']})"),
    ])
    out.mkdir(parents=True, exist_ok=True)
    png = _plot(result, out / "flows.png")
    command = "python experiments/flows.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg = base.to_dict()
    notes = [
        f"Data: {test.name}, test split, {len(test)} images, statically binarised; every row trained with the "
        f"shared settings below for {cfg['epochs']} epochs (the best validation epoch is kept).",
        f"log p(x): importance sampling with each row's own q(z|x) as proposal, K = {num_samples} per image, "
        "± the standard error over images; the same per-image noise streams (seed "
        f"{args.seed}) for every row. ELBO: the mean of the same K log-weights.",
        "Δ: the mean over the same test images of the row's value minus the Gaussian guide's, ± the standard error "
        "of that paired difference.",
        "gap log p(x) − ELBO: the KL from q(z|x) to the posterior (as far as the K-sample estimate of log p(x) "
        "reaches); k̂ > 0.7: the share of images whose importance weights PSIS flags as too heavy-tailed at K.",
        "The VampPrior's components are q(z|u_k) of the encoder's Gaussian base, also with the IAF guide.",
        "Wall times: 2-core CPU machine; compare them within this table only.",
    ]
    text = "\n".join([f"# Guides on {test.name}: Gaussian against inverse autoregressive flows", "", table, "",
                      *[f"- {n}" for n in notes], "", f"![paired differences and k-hat]({png.name})", "",
                      "## Shared settings", "", "```json", json.dumps(cfg, indent=2), "```", "",
                      f"Command: `{command}`", ""])
    write_text_atomic(out / "flows.md", text)
    write_json(out / "flows.json", {"command": command, "settings": cfg, **result})
    print(table)
    print(f"\nwrote {out / 'flows.md'}, {out / 'flows.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
