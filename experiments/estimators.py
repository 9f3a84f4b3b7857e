r"""How far to trust log p(x): importance sampling against annealed importance sampling.

For each model (the default VAE, the VampPrior with K = 500, a VAE with a 4-step IAF guide),
on the same test images and with the same per-image random streams:

- importance sampling with q(z|x) as proposal (``evaluate --estimator is``) at K = 10 ... 50,000;
- AIS with HMC from q(z|x) (``evaluate --estimator ais``) at T = 10 ... 10,000 steps;
- BDMC on examples simulated from the model: the forward (lower) and reverse (upper) AIS
  bounds and their gap at T = 10, 100, 1000: the T at which the gap closes is the T to trust;
- a table of how far IS at K = 5000 lies below AIS at the largest T, on average and per image,
  against the image's Pareto k̂ (the question the k̂ warning raises).

Compute, on the plot's x-axis, is decoder passes per image: K for importance sampling, and for
AIS C·T·L gradient passes (forward and backward; C chains, L leapfrog steps).

Models come from ``--runs-from DIR`` (another study's run folder, e.g. ``results/flows/runs``:
any finished run there with the same settings) or are trained here. Every estimate is cached
under ``OUT/cache/`` as it finishes, so an interrupted study continues where it stopped.

Usage::

    python experiments/estimators.py --runs-from results/flows/runs     # after experiments/flows.py
    python experiments/estimators.py --quick                             # under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pyrovae import TrainConfig, estimate_log_px, load_run  # noqa: E402
from pyrovae.ais import ais_log_px, bdmc  # noqa: E402
from pyrovae.cli import exit_code_of  # noqa: E402
from pyrovae.compare import paired_difference  # noqa: E402
from pyrovae.config import used_only  # noqa: E402
from pyrovae.files import write_atomic, write_json, write_text_atomic  # noqa: E402
from pyrovae.plots import figure  # noqa: E402
from pyrovae.training import prepare_data, train_or_reuse  # noqa: E402

#: (name, what, settings on top of the defaults)
MODELS = [
    ("default", "the default VAE (784-400-50, Gaussian guide)", {}),
    ("vamp-500", "VampPrior K=500", {"prior": "vamp", "prior_components": 500}),
    ("iaf-4", "IAF guide, 4 steps", {"guide": "iaf", "flow_steps": 4}),
]
_FIX = "rerun with --fresh, or choose another --out"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/estimators.py",
        description="Importance sampling (K = 10 ... 50,000) against AIS (T = 10 ... 10,000) on the same test "
        "images for the default VAE, VampPrior K=500 and an IAF guide; BDMC gaps on simulated data; how far IS "
        "at K=5000 is from AIS at the largest T, against Pareto k-hat.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(m[0] for m in MODELS), help="comma-separated subset of models")
    p.add_argument("--runs-from", default=None, help="a folder of runs to reuse (e.g. results/flows/runs)")
    p.add_argument("--num-images", type=int, default=100, help="test images, spread evenly over the split (which "
                   "is sorted by class)")
    p.add_argument("--is-samples", default="10,100,1000,5000,50000", help="K of importance sampling")
    p.add_argument("--ais-steps", default="10,100,1000,10000", help="T of AIS")
    p.add_argument("--ais-chains", type=int, default=4, help="AIS chains per image")
    p.add_argument("--ais-leapfrog", type=int, default=5, help="leapfrog steps per HMC transition")
    p.add_argument("--reference-samples", type=int, default=5000, help="the K compared with AIS in the table")
    p.add_argument("--bdmc-examples", type=int, default=50, help="simulated examples for BDMC")
    p.add_argument("--bdmc-steps", default="10,100,1000", help="T of the BDMC runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the runs trained here and of every estimate")
    p.add_argument("--quick", action="store_true", help="784-32-4 networks, 2 epochs, 10 images, small K and T: "
                   "checks that everything runs (numbers mean nothing)")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs and cached estimates under --out")
    p.add_argument("--out", default="results/estimators", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _model_dir(name: str, settings: dict, shared: dict, args, runs: Path) -> Path:
    config = TrainConfig(**used_only({**shared, **settings}), out=str(runs), name=name)
    return train_or_reuse(config, progress=not args.quiet, fix=_FIX, reuse_from=args.runs_from)[0]


def _cached(cache: Path, key: str, compute) -> dict:
    path = cache / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    value = compute()
    value["seconds"] = time.perf_counter() - t0
    write_json(path, value)
    return value


def _plot(results: dict, path: Path) -> Path:
    fig = figure(8, 4.5)
    ax = fig.subplots()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for color, (name, r) in zip(colors, results.items()):
        ref = r["ais"][-1]["mean"]
        ax.plot([x["compute"] for x in r["is"]], [x["mean"] - ref for x in r["is"]], "o--", color=color,
                label=f"{name}: importance sampling")
        ax.plot([x["compute"] for x in r["ais"]], [x["mean"] - ref for x in r["ais"]], "s-", color=color,
                label=f"{name}: AIS")
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("decoder passes per image (AIS: forward + backward)")
    ax.set_ylabel("mean log p(x) − AIS at the largest T (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return exit_code_of("experiments/estimators.py", _main, args, argv)


def _main(args, argv) -> int:
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - {m[0] for m in MODELS})
    if unknown:
        raise ValueError(f"unknown models {', '.join(unknown)}; choose from {', '.join(m[0] for m in MODELS)}")
    is_ks, ais_ts, bdmc_ts = _ints(args.is_samples), _ints(args.ais_steps), _ints(args.bdmc_steps)
    ref_k, n_images, chains, leapfrog = args.reference_samples, args.num_images, args.ais_chains, args.ais_leapfrog
    bdmc_n = args.bdmc_examples
    shared: dict = {"seed": args.seed}
    if args.quick:
        shared.update(epochs=2, hidden_dims=(32,), latent_dim=4, flow_hidden_dims=(16,), flow_context_dim=8,
                      batch_size=500)
        is_ks, ais_ts, bdmc_ts, ref_k, n_images, bdmc_n = [10, 100], [5, 20], [3, 10], 100, 10, 10
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    runs, cache = out / "runs", out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    results, bdmc_results, table_rows = {}, {}, []
    progress = not args.quiet
    for name, what, settings in [m for m in MODELS if m[0] in names]:
        s = dict(settings)
        if args.quick and s.get("prior") == "vamp":
            s["prior_components"] = 20
        run_dir = _model_dir(name, s, shared, args, runs)
        run = load_run(run_dir)
        test = prepare_data(run.config, "test", "cpu")
        step = max(1, len(test) // n_images)
        x = test.images[::step][:n_images]  # every class: the split is sorted by class
        tag = f"{name}-{run.epoch}-n{len(x)}every{step}-s{args.seed}"
        is_rows = []
        for k in sorted(set(is_ks) | {ref_k}):
            r = _cached(cache, f"{tag}-is-K{k}", lambda k=k, m=run.model, x=x: _is(m, x, k, args.seed, progress))
            r.update(K=k, compute=k)
            is_rows.append(r)
        ais_rows = []
        for t in ais_ts:
            r = _cached(cache, f"{tag}-ais-T{t}-C{chains}-L{leapfrog}",
                        lambda t=t, m=run.model, x=x: _ais(m, x, t, chains, leapfrog, args.seed, progress))
            r.update(T=t, compute=chains * t * leapfrog)
            ais_rows.append(r)
        results[name] = {"what": what, "run": str(run_dir), "is": [r for r in is_rows if r["K"] in is_ks],
                         "ais": ais_rows}
        bdmc_results[name] = _cached(cache, f"{tag}-bdmc-N{bdmc_n}-C{chains}-L{leapfrog}-"
                                     + "_".join(map(str, bdmc_ts)),
                                     lambda m=run.model: bdmc(m, num_examples=bdmc_n, steps=bdmc_ts, num_chains=chains,
                                                              leapfrog=leapfrog, seed=args.seed, progress=progress))
        ref_is = next(r for r in is_rows if r["K"] == ref_k)
        best = ais_rows[-1]
        table_rows.append(_table_row(name, ref_is, best, ref_k))
    text = _report(args, argv, results, bdmc_results, table_rows, out, ref_k, chains, leapfrog)
    write_text_atomic(out / "estimators.md", text)
    write_json(out / "estimators.json", {"is_vs_ais": results, "bdmc": bdmc_results, "table": table_rows})
    print(text)
    return 0


def _is(model, x, k, seed, progress) -> dict:
    est = estimate_log_px(model, x, k, seed=seed, progress=progress)
    s = est.summary()
    return {"mean": s["log_px"], "se": s["log_px_se"], "elbo": s["elbo"], "per_image": est.log_px.tolist(),
            "pareto_k": est.pareto_k.tolist() if est.pareto_k is not None else None}


def _ais(model, x, t, chains, leapfrog, seed, progress) -> dict:
    r = ais_log_px(model, x, num_steps=t, num_chains=chains, leapfrog=leapfrog, seed=seed, progress=progress)
    s = r.summary()
    return {"mean": s["log_px"], "se": s["log_px_se"], "acceptance": s["acceptance"], "ess": s["ess"],
            "per_image": r.log_px.tolist()}


def _table_row(name: str, ref_is: dict, best: dict, ref_k: int) -> dict:
    ais = torch.tensor(best["per_image"], dtype=torch.float64)
    isk = torch.tensor(ref_is["per_image"], dtype=torch.float64)
    khat = torch.tensor(ref_is["pareto_k"], dtype=torch.float64)
    d = ais - isk  # how far IS lies below AIS
    mean, se = paired_difference(ais, isk)
    high = khat > 0.7
    row = {"model": name, "is_K": ref_k, "ais_T": best["T"], "is_mean": ref_is["mean"], "ais_mean": best["mean"],
           "ais_minus_is": mean, "ais_minus_is_se": se, "max_per_image": float(d.max()),
           "frac_khat_above_0.7": float(high.double().mean()),
           "ais_minus_is_where_khat_above_0.7": float(d[high].mean()) if bool(high.any()) else math.nan,
           "ais_minus_is_where_khat_below_0.7": float(d[~high].mean()) if bool((~high).any()) else math.nan}
    ok = ~khat.isnan()
    if int(ok.sum()) > 2:
        row["corr_khat_diff"] = float(torch.corrcoef(torch.stack([khat[ok], d[ok]]))[0, 1])
    return row


def _f(v, spec=".2f"):
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _report(args, argv, results, bdmc_results, table_rows, out, ref_k, chains, leapfrog) -> str:
    png = _plot(results, out / "estimators.png")
    command = "python experiments/estimators.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# How far to trust log p(x): importance sampling against AIS", ""]
    lines += [f"| model | IS, K={ref_k} | AIS, largest T | AIS − IS (paired) | largest per image | "
              "images with k̂ > 0.7 | AIS − IS where k̂ > 0.7 | where k̂ ≤ 0.7 | corr(k̂, AIS − IS) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in table_rows:
        lines.append(f"| {r['model']} | {r['is_mean']:.2f} | {r['ais_mean']:.2f} (T={r['ais_T']}) | "
                     f"{r['ais_minus_is']:+.3f} ± {r['ais_minus_is_se']:.3f} | {r['max_per_image']:+.2f} | "
                     f"{100 * r['frac_khat_above_0.7']:.0f}% | {_f(r['ais_minus_is_where_khat_above_0.7'], '+.3f')} | "
                     f"{_f(r['ais_minus_is_where_khat_below_0.7'], '+.3f')} | {_f(r.get('corr_khat_diff'))} |")
    lines += ["", f"![IS and AIS against compute]({png.name})", "", "## Estimates against compute", ""]
    for name, r in results.items():
        lines.append(f"**{name}** ({r['what']}; run `{r['run']}`)")
        lines.append("")
        lines.append("| estimator | setting | decoder passes per image | mean log p(x) | ± s.e. | seconds |")
        lines.append("|---|---|---|---|---|---|")
        for x in r["is"]:
            lines.append(f"| IS | K={x['K']} | {x['compute']:,} | {x['mean']:.3f} | {x['se']:.3f} | "
                         f"{x['seconds']:.0f} |")
        for x in r["ais"]:
            lines.append(f"| AIS | T={x['T']} | {x['compute']:,} | {x['mean']:.3f} | {x['se']:.3f} | "
                         f"{x['seconds']:.0f} (acceptance {x['acceptance']:.2f}) |")
        lines.append("")
    lines += ["## BDMC on simulated data", "",
              "| model | T | lower (forward AIS) | upper (reverse AIS) | gap (mean ± s.e.) | largest gap | seconds |",
              "|---|---|---|---|---|---|---|"]
    for name, b in bdmc_results.items():
        for r in b["rows"]:
            lines.append(f"| {name} | {r['num_steps']} | {r['lower']:.3f} | {r['upper']:.3f} | "
                         f"{r['gap']:.3f} ± {r['gap_se']:.3f} | {r['gap_max']:.3f} | {r['seconds']:.0f} |")
    some = next(iter(bdmc_results.values()), None)
    lines += ["", f"- AIS: {chains} chains per image, {leapfrog} leapfrog steps per transition, HMC step sizes "
              "adapted per image towards an acceptance rate of 0.65, started from q(z|x) (an IAF guide's Gaussian "
              "base). IS: q(z|x) as proposal. The same per-image random streams for every estimate.",
              f"- BDMC: {some['num_examples'] if some else 0} examples simulated from each model (z* ~ p(z), "
              "x ~ p(x|z*)); the upper bound runs AIS backwards from z*.",
              "- AIS − IS: the mean over the same test images of AIS at the largest T minus IS at K, ± its paired "
              "standard error; positive where IS underestimates log p(x).",
              "", f"Command: `{command}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
