r"""Paired learning curves: how far a candidate run is ahead of a baseline run, epoch by epoch.

Two runs trained from the same seed on the same data differ only in the settings that were changed, so
the difference of their validation figures at the same epoch is a paired measurement: most of what one
run's curve does from epoch to epoch the other's does too. This script reads the runs' ``metrics.jsonl``
and, for every candidate, reports at chosen epochs

- the difference of the validation IWAE bound (``val_iwae``, present when the run trains by ``--elbo iwae``)
  and of the validation ELBO (``val_elbo``), candidate minus baseline, in nats per image (positive: the
  candidate is ahead);
- each run's overfitting gap, training ELBO minus validation ELBO (``train_elbo - val_elbo``);
- the ratio of the two learning rates, which tells where a different time budget planned a different cosine.

and draws both validation figures against epochs, one line per run, into a PNG. Nothing is trained or
scored: the differences are those of the figures the runs recorded, on the whole validation split, with one
draw per image for the ELBO and ``k`` draws for the IWAE bound. A paired ``pyrovae compare`` at large K on
the finished runs is the measurement of log p(x); this is the view of the way there.

Each run's IWAE bound is at its own ``--num-particles`` k, read from the ``config.json`` beside its metrics.
For the same model, E log (1/k) Σ w_i rises with k towards log p(x), so between runs of different k the
difference of the bounds is not that of one figure: the table names each k and says so.

Usage::

    python experiments/paired_curves.py RUNS/bmnist-3h RUNS/bmnist-3h-iaf --out curves.png
    python experiments/paired_curves.py base/metrics.jsonl a/metrics.jsonl b/metrics.jsonl --epochs 1,10,25 \
        --out curves.png --names recipe,iaf,dropout

A run is its directory or its ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))

from pyrovae.cli import exit_code_of  # noqa: E402
from pyrovae.config import TrainConfig  # noqa: E402
from pyrovae.files import write_atomic, write_text_atomic  # noqa: E402
from pyrovae.plots import figure  # noqa: E402
from pyrovae.runs import read_metrics  # noqa: E402
from pyrovae.training import validation_samples  # noqa: E402

#: the validation figures compared, with their labels
FIGURES = (("val_iwae", "validation IWAE bound"), ("val_elbo", "validation ELBO"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/paired_curves.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("baseline", help="the baseline run: its directory or its metrics.jsonl")
    p.add_argument("candidates", nargs="+", help="one or more runs to set against it (directories or metrics.jsonl)")
    p.add_argument("--names", default=None,
                   help="comma-separated labels, baseline first (default: the run directories' names)")
    p.add_argument("--epochs", default=None,
                   help="comma-separated epochs for the table (default: 1, 5, every tenth, every run's best "
                        "epoch and the last epoch the runs share)")
    p.add_argument("--out", default=None, help="write the curves to this PNG, and the table beside it as .md")
    return p


def load_rows(run: str | Path) -> list[dict]:
    """The metrics rows of a run directory or of a ``metrics.jsonl``; ``ValueError`` when there are none."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run}: no metrics.jsonl there; give a run directory or its metrics.jsonl")
    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path}: holds no epoch yet; train the run for at least one epoch")
    return rows


def iwae_particles(run: str | Path) -> int | None:
    """The k of the IWAE bound a run records as ``val_iwae`` (its ``--num-particles``), read from the
    ``config.json`` beside its metrics; ``None`` where there is no such file or the run records no bound."""
    path = Path(run)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return None
    k = validation_samples(TrainConfig.load(config))
    return k if k > 1 else None


def _by_epoch(rows: list[dict]) -> dict[int, dict]:
    return {r["epoch"]: r for r in rows}


def _value(row: dict | None, key: str) -> float | None:
    v = None if row is None else row.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def best_epoch(rows: list[dict], name: str = "the run") -> int:
    """The epoch with the best validation IWAE bound, or the best validation ELBO where no row has one
    (what the trainer keeps as ``best.pt``); ``name`` says whose rows they are in the refusal."""
    key = "val_iwae" if any(_value(r, "val_iwae") is not None for r in rows) else "val_elbo"
    scored = [(v, r["epoch"]) for r in rows if (v := _value(r, key)) is not None]
    if not scored:
        raise ValueError(f"{name}: its metrics record neither val_iwae nor val_elbo; nothing to compare")
    return max(scored)[1]


def differences(base: list[dict], cand: list[dict], epochs: list[int]) -> list[dict]:
    """One row per epoch that both runs reached: the candidate's validation figures minus the
    baseline's, the two overfitting gaps (train ELBO minus validation ELBO) and the learning-rate ratio."""
    b, c = _by_epoch(base), _by_epoch(cand)
    out = []
    for e in epochs:
        if e not in b or e not in c:
            continue
        row: dict = {"epoch": e}
        for key, _ in FIGURES:
            vb, vc = _value(b[e], key), _value(c[e], key)
            row[key] = vb
            row[f"d_{key}"] = None if vb is None or vc is None else vc - vb
        for name, r in (("gap_base", b[e]), ("gap_cand", c[e])):
            t, v = _value(r, "train_elbo"), _value(r, "val_elbo")
            row[name] = None if t is None or v is None else t - v
        lb, lc = _value(b[e], "lr"), _value(c[e], "lr")
        row["lr_ratio"] = None if not lb or lc is None else lc / lb
        out.append(row)
    return out


def _default_epochs(bests: list[int], runs: list[list[dict]]) -> list[int]:
    shared = min(max(r["epoch"] for r in rows) for rows in runs)
    picks = {1, 5, shared, *bests} | set(range(10, shared + 1, 10))
    return sorted(e for e in picks if e <= shared)


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(name: str, base_name: str, rows: list[dict], k_base: int | None = None,
          k_cand: int | None = None) -> list[str]:
    """The differences as a markdown table; ``k_base`` and ``k_cand``, where known, are the particles of
    the two runs' IWAE bounds, named in the header, with a warning when they differ."""
    kb = "" if k_base is None else f" (k = {k_base})"
    lines = [f"{name} against {base_name} (candidate minus baseline, nats per image; gap = train ELBO minus "
             "validation ELBO):", ""]
    if k_base is not None and k_cand is not None and k_base != k_cand:
        lines += [f"The IWAE bounds are at k = {k_cand} ({name}) and k = {k_base} ({base_name}): the larger k "
                  "gives a tighter bound of the same log p(x), so Δ val IWAE does not rank the runs; compare "
                  "them with `pyrovae compare` at one K.", ""]
    lines += [f"| epoch | {base_name} val IWAE{kb} | Δ val IWAE | Δ val ELBO | gap {base_name} | gap {name} "
              "| lr ratio |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {_fmt(r['val_iwae'], '.2f')} | {_fmt(r['d_val_iwae'], '+.2f')} | "
                     f"{_fmt(r['d_val_elbo'], '+.2f')} | {_fmt(r['gap_base'], '.2f')} | "
                     f"{_fmt(r['gap_cand'], '.2f')} | {_fmt(r['lr_ratio'], '.3f')} |")
    return lines


def curves(runs: dict[str, list[dict]], particles: dict[str, int | None] | None = None):
    """Each validation figure that some run recorded against epochs, one panel each and one line per run,
    zoomed past the first epochs: runs trained by the ELBO alone have no IWAE panel. ``particles`` gives a
    run's k, shown in the IWAE panel's legend."""
    particles = particles or {}
    panels = []
    for key, label in FIGURES:
        lines = {(f"{name} (k = {particles[name]})" if key == "val_iwae" and particles.get(name) else name): pts
                 for name, rows in runs.items()
                 if (pts := [(r["epoch"], v) for r in rows if (v := _value(r, key)) is not None])}
        if lines:
            panels.append((label, lines))
    fig = figure(5 * len(panels), 3.8)
    for ax, (label, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name, pts in lines.items():
            ax.plot(*zip(*pts), label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{label} (nats per image)")
        top = max(v for pts in lines.values() for _, v in pts)
        ax.set_ylim(top - 4.0, top + 0.3)  # the last nats are where runs differ
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(runs: dict[str, list[dict]], path: Path, particles: dict[str, int | None] | None = None) -> Path:
    """:func:`curves` written to ``path`` as a PNG."""
    fig = curves(runs, particles)
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return exit_code_of("experiments/paired_curves.py", _main, args)


def _main(args) -> int:
    paths = [args.baseline, *args.candidates]
    if args.names is None:
        names = [Path(p).name if Path(p).is_dir() else Path(p).parent.name or Path(p).stem for p in paths]
    else:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != len(paths) or not all(names):
            raise ValueError(f"--names {args.names!r}: give {len(paths)} non-empty labels, baseline first")
    if len(set(names)) != len(names):
        raise ValueError(f"the runs' labels {names} repeat; give distinct ones with --names")
    if args.out is not None and Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: the file name must end in .png")
    runs = {n: load_rows(p) for n, p in zip(names, paths)}
    particles = {n: iwae_particles(p) for n, p in zip(names, paths)}
    base_name, base = names[0], runs[names[0]]
    best = {name: best_epoch(rows, name) for name, rows in runs.items()}
    if args.epochs is None:
        epochs = _default_epochs(list(best.values()), list(runs.values()))
    else:
        try:
            epochs = sorted({int(e) for e in args.epochs.split(",")})
        except ValueError:
            raise ValueError(f"--epochs {args.epochs!r}: give whole epoch numbers, comma separated") from None
    lines = [" ".join(f"{name}: best epoch {best[name]} of {max(r['epoch'] for r in rows)}."
                      for name, rows in runs.items()), ""]
    for name in names[1:]:
        rows = differences(base, runs[name], epochs)
        if not rows:
            raise ValueError(f"{name} and {base_name} share none of the epochs {epochs}; choose others with --epochs")
        lines += table(name, base_name, rows, particles[base_name], particles[name]) + [""]
    print("\n".join(lines))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot(runs, out, particles)
        write_text_atomic(out.with_suffix(".md"), "\n".join(lines))
        print(f"curves: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
