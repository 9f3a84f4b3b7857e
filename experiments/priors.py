r"""Swap the prior: N(0, I), mixtures of Gaussians, the VampPrior, and the finite mixture.

The notes (NOTES.md section 3) read a VAE as an infinite mixture of Gaussians,
:math:`p(x) = \int p(z)\, p(x|z)\, dz`, and contrast it with a finite mixture
:math:`P(x) = \sum_m P(m) P(x|m)` of about 512 components. This study trains, on the same
data, network and number of epochs:

- the VAE with the standard prior :math:`p(z) = \mathcal{N}(0, I)`;
- the VAE with a learned mixture-of-Gaussians prior, K = 10, 50, 512
  (``--prior mog``, means set by k-means on the codes after ``--prior-init-epochs``);
- the VAE with the VampPrior (Tomczak & Welling 2018), K = 50, 500 pseudo-inputs;
- the finite mixture of K Bernoulli images itself (``--model mixture``), K = 10, 50, 512,
  its component summed out exactly (``TraceEnum_ELBO``);
- two labelled extras: MoG K=512 from random means (k-means on 4000 codes makes clusters of
  about 8 codes, whose spread ignores q's own variance), and MoG K=10 with a 20-dimensional
  code over three seeds (the clustering setting; seed spread of the cluster accuracy);

and scores each on the test split: log p(x) (importance sampling with K = 5000 samples per
example, or exact for the finite mixture), ELBO, KL, active units, components used,
cluster accuracy and NMI against the digit labels, and training wall time. It writes a
Markdown table, JSON, PNGs of samples (one row per component, heaviest first) and maps of
the test codes of 2-D variants of every VAE row (same settings, ``--latent-dim 2``,
``--map-epochs`` epochs) with each component's 2-sigma ellipse.

Runs are kept under ``OUT/runs/``: rerunning the script reuses finished runs and their
evaluations and resumes unfinished ones, so an interrupted study continues where it stopped
(``--fresh`` starts over).

Usage::

    python experiments/priors.py                       # mnist5k, the full study
    python experiments/priors.py --quick               # small nets, 1 epoch: under a minute
    python experiments/priors.py --dataset mnist --data-dir DIR --epochs 100

References: Tomczak & Welling (2018), "VAE with a VampPrior", AISTATS; Jiang et al. (2017),
"Variational Deep Embedding" (VaDE), IJCAI; Burda et al. (2015) for the importance-weighted
estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyrovae import TrainConfig, load_run
from pyrovae.cli import exit_code_of
from pyrovae.compare import compare_runs, markdown_table
from pyrovae.pictures import sample_images, samples_by_component
from pyrovae.plots import plot_latent_2d, save_image_grid
from pyrovae.training import prepare_data, train_or_reuse

#: published and reference numbers printed beside the table; none is on this data set
ANCHORS = [
    "VampPrior paper (Tomczak & Welling 2018, Table 2): log p(x) = -85.57 nats for a one-layer VAE "
    "with the VampPrior on statically binarised full MNIST (60k training images; 5000 importance samples).",
    "VaDE (Jiang et al. 2017): 94.46% cluster accuracy on full MNIST (70k images) with a 10-component "
    "mixture prior, a 500-500-2000-10 network and autoencoder pretraining.",
    "Finite Bernoulli mixture fitted by plain EM on the 5k digits (statically binarised), scored on real "
    "MNIST test digits (reference figures given when this study was set, not computed by pyrovae): "
    "K=10 -168.5, K=50 -160.3, K=512 -153.5 nats; a textbook VAE on the "
    "same digits about -96.",
]


@dataclass
class Row:
    name: str
    what: str
    settings: dict = field(default_factory=dict)
    #: also train a 2-D variant and draw its latent map
    latent_map: bool = True


ROWS = [
    Row("standard", "VAE, N(0, I) prior", {"prior": "standard"}),
    Row("mog-10", "VAE, MoG prior K=10", {"prior": "mog", "prior_components": 10, "prior_init": "kmeans"}),
    Row("mog-50", "VAE, MoG prior K=50", {"prior": "mog", "prior_components": 50, "prior_init": "kmeans"}),
    Row("mog-512", "VAE, MoG prior K=512", {"prior": "mog", "prior_components": 512, "prior_init": "kmeans"}),
    # k-means on 4000 codes makes 512 clusters of ~8 codes each: the same K from random means
    Row("mog-512-random", "VAE, MoG prior K=512, random init", {"prior": "mog", "prior_components": 512,
                                                                 "prior_init": "random"}, latent_map=False),
    Row("vamp-50", "VAE, VampPrior K=50", {"prior": "vamp", "prior_components": 50}),
    Row("vamp-500", "VAE, VampPrior K=500", {"prior": "vamp", "prior_components": 500}),
    Row("mixture-10", "finite Bernoulli mixture K=10", {"model": "mixture", "prior_components": 10}),
    Row("mixture-50", "finite Bernoulli mixture K=50", {"model": "mixture", "prior_components": 50}),
    Row("mixture-512", "finite Bernoulli mixture K=512", {"model": "mixture", "prior_components": 512}),
    # clustering setting for K = 10: a 20-dimensional code (VaDE clusters in 10 dimensions; at 10
    # this network loses 9 nats of ELBO and clusters worse), over three seeds for the spread
    *[Row(f"mog-10-z20-s{seed}", f"VAE, MoG prior K=10, latent 20, seed {seed} (clustering setting)",
          {"prior": "mog", "prior_components": 10, "prior_init": "kmeans", "latent_dim": 20, "seed": seed},
          latent_map=False) for seed in (0, 1, 2)],
]

#: how to get past a run directory trained with other settings
_FIX = "rerun with --fresh, or choose another --out"
#: the rows whose 2-D variant --quick draws
QUICK_MAPS = ("standard", "mog-10")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/priors.py",
        description="Compare priors (standard, MoG K=10/50/512, VampPrior K=50/500) and the finite mixture "
        "(K=10/50/512) on the same data, network and budget; writes a Markdown table, JSON and PNGs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="mnist5k", help="mnist5k, or mnist with --data-dir (any pyrovae dataset)")
    p.add_argument("--data-dir", default="data", help="folder of the IDX files for --dataset mnist")
    p.add_argument("--epochs", type=int, default=100, help="training epochs of every row (the shared budget)")
    p.add_argument("--map-epochs", type=int, default=30, help="epochs of the 2-D variants drawn as latent maps")
    p.add_argument("--hidden-dims", default="400", help="hidden layer sizes, comma separated (same for all rows)")
    p.add_argument("--latent-dim", type=int, default=50, help="dimension of z of the VAE rows")
    p.add_argument("--prior-init-epochs", type=int, default=10,
                   help="MoG rows: epochs under N(0, I) before k-means sets the mixture")
    p.add_argument("--num-samples", type=int, default=5000, help="importance samples per test example for log p(x)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--rows", default=",".join(r.name for r in ROWS),
                   help="comma-separated subset of rows to run")
    p.add_argument("--no-maps", action="store_true", help="skip the 2-D variants and their latent maps")
    p.add_argument("--quick", action="store_true",
                   help="smoke run in under a minute: 1 epoch at batch 500, 784-32-4 networks, 20 importance "
                   "samples, 100 test examples, latent maps for the first two rows only (numbers mean nothing)")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs under --out first")
    p.add_argument("--out", default="results/priors", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _settings(args) -> dict:
    """The shared settings of every row (each row adds its prior or model)."""
    hidden = tuple(int(h) for h in args.hidden_dims.split(",") if h.strip())
    s = dict(dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, hidden_dims=hidden,
             latent_dim=args.latent_dim, prior_init_epochs=args.prior_init_epochs, seed=args.seed)
    if args.quick:
        s.update(epochs=1, hidden_dims=(32,), latent_dim=4, prior_init_epochs=0, batch_size=500)
    return s



def _pictures(run_dir: Path, row: Row, out: Path) -> str:
    run = load_run(run_dir)
    torch.manual_seed(0)
    png = out / f"samples-{row.name}.png"
    with torch.no_grad():
        kind = run.model.kind
        k = run.model.num_components if kind == "mixture" else run.model.prior.num_components
        if k > 1:
            images, _ = samples_by_component(run.model, per_component=10, max_components=10)
        else:
            images = sample_images(run.model, 100)
    save_image_grid(images, run.image_shape, png, nrow=10)
    return png.name


def _latent_map(run_dir: Path, row: Row, test, out: Path) -> str:
    run = load_run(run_dir)
    with torch.no_grad():
        codes = run.model.encode(test.images)
        mixture = tuple(t.detach() for t in run.model.prior.mixture())
    png = plot_latent_2d(codes, test.labels, out / f"latent-{row.name}.png", mixture=mixture,
                         title=f"{row.what}, 2-D variant ({test.name} {test.split})")
    return png.name


def _fmt(v, spec=".2f", dash="—"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return dash
    return format(v, spec)


def table(result: dict) -> str:
    """The Markdown table of the study: pyrovae.compare's columns (Δ against the standard prior,
    paired), then how each mixture's components are used, and wall times."""
    def comp(key, spec):
        def cell(row):
            c = row["report"].get("components")
            return format(c[key], spec) if c and key in c else "—"
        return cell

    def used(row):
        c = row["report"].get("components")
        return f"{c['components_used']} / {c['num_components']}" if c else "—"

    def exact(row):
        return "exact" if row["report"]["model"] == "mixture" else "IS"

    return markdown_table(result, extra=[
        ("log p(x) by", exact), ("components used", used),
        ("effective components", comp("usage_perplexity", ".1f")), ("cluster acc.", comp("cluster_accuracy", ".3f")),
        ("NMI", comp("nmi", ".3f")), ("train s", lambda r: f"{r['report']['train_seconds']:.0f}"),
        ("eval s", lambda r: f"{r['report']['eval_seconds']:.0f}")])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return exit_code_of("experiments/priors.py", _main, args, argv)


def _main(args, argv) -> int:
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in {r.name for r in ROWS}]
    if unknown:
        print(f"experiments/priors.py: error: unknown rows {', '.join(unknown)}; choose from "
              f"{', '.join(r.name for r in ROWS)}", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if r.name in names]
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    shared = _settings(args)
    num_samples = 20 if args.quick else args.num_samples
    progress = not args.quiet
    base = TrainConfig(**shared, out=str(runs)).resolved()
    test = prepare_data(base, "test", "cpu")
    if args.quick:  # every 5th example: the split is sorted by class, its first 100 are 0s and 1s
        keep = torch.arange(0, len(test), max(1, len(test) // 100))[:100]
        test = dataclasses.replace(test, images=test.images[keep],
                                   labels=None if test.labels is None else test.labels[keep])

    from tqdm.auto import tqdm

    def row_settings(row) -> dict:
        settings = {**shared, **row.settings}
        if args.quick:  # one epoch: k-means must come first
            settings["prior_init_epochs"] = 0
        return settings

    run_dirs = []
    for row in tqdm(rows, desc="priors", unit="row", disable=not progress):
        config = TrainConfig(**row_settings(row), out=str(runs), name=row.name)
        run_dirs.append(train_or_reuse(config, progress=progress, fix=_FIX)[0])
    names = [r.name for r in rows]
    compared = compare_runs(run_dirs, test, names=names, baseline=names.index("standard") if "standard" in names
                            else 0, num_samples=num_samples, seed=0, cache=True, progress=progress)
    results = []
    for row, run_dir, scored in zip(rows, run_dirs, compared["rows"]):
        entry = {"row": row.name, "what": row.what, "settings": row.settings, "report": scored["report"],
                 "samples_png": _pictures(run_dir, row, out)}
        for key in ("log_px_diff", "elbo_diff"):
            if key in scored:
                entry[key] = scored[key]
        wants_map = not args.no_maps and row.latent_map and row.settings.get("model", "vae") == "vae"
        if wants_map and (not args.quick or row.name in QUICK_MAPS):
            map_settings = {**row_settings(row), "latent_dim": 2,
                            "epochs": 1 if args.quick else args.map_epochs}
            map_dir = train_or_reuse(TrainConfig(**map_settings, out=str(runs), name=f"{row.name}-2d"),
                                     progress=progress, fix=_FIX)[0]
            entry["latent_png"] = _latent_map(map_dir, row, test, out)
        results.append(entry)

    md = table(compared)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(base).items()}
    notes = [
        f"Data: {test.name}, test split ({len(test)} examples, statically binarised); training with the "
        f"library defaults below, {shared['epochs']} epoch(s) for every row (the best validation epoch is kept); "
        "MoG rows switch from N(0, I) to the mixture by k-means on the codes after "
        f"{shared['prior_init_epochs']} epoch(s).",
        "log p(x): importance sampling with the guide q(z|x) as proposal (in expectation the IWAE bound at "
        "that K, a lower bound), ± the standard error over test examples; the finite mixture's log p(x) is "
        "exact (its ELBO equals it: p(k|x) is computed exactly, and its KL is KL(p(k|x) || p(k))). "
        "Pareto k̂ > 0.7: the share of examples whose importance weights PSIS flags as too heavy-tailed for "
        "the estimate to have converged; read those rows' log p(x) as lower bounds.",
        "Δ vs standard: the mean over the same test examples of log p(x) minus the standard prior's, ± the "
        "standard error of that paired difference (examples' difficulty cancels, so it is far smaller than "
        "either row's own ± ).",
        "Components used: components holding at least a tenth of an even share, 1/(10K), of the test "
        "responsibility mass p(k|x) (at the code m(x) for a prior; the rule training's val_components_used "
        "follows); effective components: exp(entropy of the mass). Cluster accuracy maps components "
        "to digit classes (one-to-one when K <= 10, "
        "majority many-to-one when K > 10, which favours large K).",
        "The finite mixture rows train at --lr 0.05, the library's default for --model mixture (Adam moves a "
        "pixel logit by about lr per step, and they must travel far); every VAE row at the shared settings below.",
        "Wall times come from a shared, contended 2-core CPU machine: compare them within this table only.",
    ]
    text = "\n".join([
        f"# Priors on {test.name}", "", md, "", *[f"- {n}" for n in notes], "", "## Anchors (other data, other "
        "networks: for scale, not comparable)", "", *[f"- {a}" for a in ANCHORS], "",
        "## Pictures", "",
        *[f"- {r['row']}: samples `{r['samples_png']}`" + (f", latent map `{r['latent_png']}`" if "latent_png" in r
                                                          else "") for r in results], "",
        "## Shared settings", "", "```json", json.dumps({k: cfg[k] for k in (
            "dataset", "hidden_dims", "latent_dim", "likelihood", "binarize", "elbo", "num_particles", "epochs",
            "batch_size", "lr", "lr_schedule", "lr_min", "prior_init_epochs", "seed")}, indent=2), "```", "",
        f"Command: `python experiments/priors.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
    ])
    (out / "priors.md").write_text(text)
    (out / "priors.json").write_text(json.dumps({"num_samples": num_samples, "settings": cfg, "rows": results,
                                                 "anchors": ANCHORS}, indent=2) + "\n")
    print(md)
    print()
    print("Anchors (other data and networks; for scale only):")
    for a in ANCHORS:
        print(f"  - {a}")
    print(f"\nwrote {out / 'priors.md'}, {out / 'priors.json'} and PNGs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
