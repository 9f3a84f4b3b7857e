"""The ``pyrovae`` command line: train, evaluate, compare, bdmc, sample, reconstruct, interpolate.

The ``train`` flags are generated from :class:`~pyrovae.config.TrainConfig`, so a default
lives in one place. Bad input ends in one line on stderr and exit code 2 (``--debug``
shows the traceback); a diverged run exits 1; Ctrl-C exits 130 (training keeps every
completed epoch in last.pt).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings
from pathlib import Path

from .config import ESTIMATORS, RESUMABLE, WHOLE_LIMIT  # (config imports no torch: --help stays fast)

__all__ = ["main", "build_parser", "exit_code_of"]

#: the exceptions that mean bad input (a file, an array, a flag, a checkpoint): exit code 2
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError)


def exit_code_of(prog: str, fn, *args) -> int:
    """Call ``fn(*args)``: 0 when it returns (or its own exit code, when that is an int);
    bad input (:data:`BAD_INPUT`) becomes one line ``PROG: error: ...`` on stderr and 2.
    The experiment scripts end with ``sys.exit(exit_code_of(prog, main))``."""
    try:
        result = fn(*args)
    except BAD_INPUT as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0



class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cut(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def _whole(text: str) -> int:
    """A whole-number flag's value; one of 2^63 or more is no size or count (and would overflow the
    float arithmetic of the memory and time checks)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {_cut(text)}") from None
    if abs(value) >= WHOLE_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a whole number below 2^63, got {_cut(text)}")
    return value


def _path(text: str) -> str:
    """A file or folder flag's value: an empty one is refused, not read as "not given"."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file or folder name, got an empty one")
    return text


def _int_list(text: str) -> tuple[int, ...]:
    text = text.strip()
    if not text:
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 400 or 500,500, got {_cut(text)}") \
            from None
    if any(abs(v) >= WHOLE_LIMIT for v in values):
        raise argparse.ArgumentTypeError(f"expected sizes below 2^63, got {_cut(text)}")
    return values


#: defaults of the flags that size an estimate: the work check names, of the flags that multiply
#: into the largest cost, the one raised furthest above its default
_SIZE_DEFAULTS = {"--num-samples": 1000, "--ais-steps": 500, "--ais-chains": 4, "--ais-leapfrog": 5,
                 "--quadrature-resolution": 256, "--num-examples": 100, "--steps": (10, 100, 1000), "--chains": 4,
                 "--leapfrog": 5}


def _size_flag(p, flag: str, help: str, type=None) -> None:
    """A flag of :data:`_SIZE_DEFAULTS`, with its default there."""
    default = _SIZE_DEFAULTS[flag]
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    p.add_argument(flag, type=type or _whole, default=default, help=f"{help} (default: {shown})")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig, setting_choices, setting_fields

    defaults = TrainConfig()
    for f, tp in setting_fields():
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{f.metadata['help']} (default: {shown})"
        if tp is bool:
            p.add_argument(flag, action="store_true", help=help_text)
            continue
        args = typing.get_args(tp)
        if typing.get_origin(tp) is tuple:
            kind = _int_list
        elif typing.get_origin(tp) is typing.Union:  # Optional[X]
            kind = next(a for a in args if a is not type(None))
        else:
            kind = tp
        kind = _whole if kind is int else kind
        choices = setting_choices(f.name)
        p.add_argument(flag, type=kind, choices=choices, help=help_text,
                       metavar=f.name.upper() if not choices else None)


def estimator_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose and tune the log p(x) estimator (evaluate, compare)."""
    p.add_argument("--estimator", default="is", choices=ESTIMATORS,
                   help="log p(x) by importance sampling with q(z|x) (is, default; K = --num-samples), annealed "
                   "importance sampling with HMC (ais: a tighter stochastic lower bound; find its --ais-steps "
                   "with pyrovae bdmc), or quadrature over a 2-D latent (exact up to grid error)")
    _size_flag(p, "--ais-steps", "ais: intermediate distributions T")
    _size_flag(p, "--ais-chains", "ais: chains per example")
    _size_flag(p, "--ais-leapfrog", "ais: leapfrog steps per HMC transition")
    p.add_argument("--ais-init", default="guide", choices=("guide", "prior"),
                   help="ais: start from q(z|x) (default; a flow guide's Gaussian base) or the prior")
    _size_flag(p, "--quadrature-resolution", "quadrature: grid points per side around each example's posterior")


def estimator_options(args) -> dict:
    """``evaluate()`` keyword arguments from :func:`estimator_flags`' flags."""
    return {"estimator": args.estimator, "quadrature_resolution": args.quadrature_resolution,
            "ais_options": {"num_steps": args.ais_steps, "num_chains": args.ais_chains,
                            "leapfrog": args.ais_leapfrog, "init": args.ais_init}}


def _parser() -> argparse.ArgumentParser:
    root = _Parser(prog="pyrovae", description="The variational autoencoder of docs/theory.md as a Pyro program: "
                   "train, estimate log p(x), look at samples.")
    sub = root.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model; writes runs/<name>/",
                       description="Train by SVI. Writes config.json, metrics.jsonl, last.pt, best.pt, elbo.png "
                                   "and summary.json into --out/--name, then prints the run directory and the "
                                   "test-split ELBO.", argument_default=argparse.SUPPRESS)
    _add_config_flags(t)
    from .config import presets

    t.add_argument("--config", metavar="FILE", type=_path, help="read settings from a .json or .toml file of "
                   "TrainConfig keys "
                   "(a run's config.json works; see docs/config-example.toml); flags given beside it override it")
    t.add_argument("--preset", metavar="NAME", help="start from a shipped preset (flags and --config override it): "
                   + "; ".join(f"{name}: {text}" for name, (_, text) in presets().items()))
    t.add_argument("--resume", metavar="RUN", type=_path, help="continue the run in RUN from its last.pt (may change "
                   f"{', '.join('--' + r.replace('_', '-') for r in RESUMABLE)})")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    def weights_flag(p):
        p.add_argument("--weights", choices=("averaged", "raw"), default="averaged",
                       help="for a run trained with --ema: its averaged weights (default) or the optimiser's raw "
                       "ones; a run without --ema has raw weights only")

    def run_command(name, help, description):
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("run", metavar="RUN", help="run directory (or a .pt checkpoint)")
        p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                       help="which checkpoint (default: best)")
        weights_flag(p)
        p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="(default: cpu)")
        p.add_argument("--seed", type=_whole, default=0, help="seed of the sampling noise (default: 0); evaluate draws "
                       "each example's samples from a stream of its own, so its numbers do not depend on --chunk-size, "
                       "--batch-size or the number of processes")
        return p

    def data_flags(p, split_default="test", subset=False):
        p.add_argument("--dataset", help="dataset to use instead of the run's own (same shape); "
                       "a name or a .npy/.npz/.csv path")
        p.add_argument("--data-dir", type=_path, help="folder of IDX files (default: the run's)")
        p.add_argument("--label-column", type=_whole, help="for a .csv dataset: the labels' column")
        p.add_argument("--split", default=split_default, choices=("train", "val", "test", "all"),
                       help=f"(default: {split_default})")
        if subset:
            p.add_argument("--num-examples", type=_whole, default=None,
                           help="score only N examples of the split (default: all), such as AIS on a subset beside "
                           "importance sampling; which N: --pick")
            p.add_argument("--pick", choices=("random", "first"), default=None,
                           help="with --num-examples: random (default: N drawn without replacement, by --seed, a "
                           "fair sample of the split) or first (its first N; a split may be ordered: binarized "
                           "MNIST's test file runs through the digits in blocks)")

    def report_flags(p, what):
        p.add_argument("--allow-long", action="store_true", help="go on with work estimated to take over an hour")
        p.add_argument("--json", metavar="PATH", type=_path,
                       help=f"also write the {what} as JSON to PATH ('-' for stdout)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    e = run_command("evaluate", "ELBO, IWAE bound, log p(x) with diagnostics, KL, reconstruction",
                    "Score a run on a split: ELBO, the importance-weighted bound at K, log p(x) estimate with "
                    "standard error, KL, reconstruction term and errors, Pareto k-hat of the importance "
                    "weights, active units; component usage and cluster scores for mixture priors.")
    data_flags(e, subset=True)
    _size_flag(e, "--num-samples", "importance samples K per example")
    e.add_argument("--chunk-size", type=_whole, default=None,
                   help="at most this many (sample, example) pairs decoded at once: bounds memory "
                        "(default: 2048 per CPU thread, as larger chunks fall out of cache; 65536 on CUDA)")
    e.add_argument("--batch-size", type=_whole, default=100, help="examples per pass (default: 100)")
    estimator_flags(e)
    report_flags(e, "report")
    e.set_defaults(func=_evaluate)

    cp = sub.add_parser("compare", help="score several runs on the same examples with the same seeds: one table",
                        description="Score every RUN on the same examples with the same per-example random streams "
                        "and print one table: ELBO, log p(x) ± standard error, KL, active units, share of examples "
                        "with Pareto k-hat > 0.7, and each run's paired difference of log p(x) and ELBO against the "
                        "first RUN (or --baseline) with its standard error over examples. The data is the first "
                        "run's test split unless --dataset/--split say otherwise; runs trained on data of another "
                        "shape are refused.")
    cp.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    cp.add_argument("--baseline", metavar="RUN", type=_path,
                    help="the run the others are compared with (default: the first)")
    cp.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    weights_flag(cp)
    cp.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="(default: cpu)")
    cp.add_argument("--seed", type=_whole, default=0, help="seed of every example's random stream (default: 0)")
    data_flags(cp, subset=True)
    _size_flag(cp, "--num-samples", "importance samples K per example")
    cp.add_argument("--batch-size", type=_whole, default=100, help="examples per pass (default: 100)")
    estimator_flags(cp)
    report_flags(cp, "comparison")
    cp.add_argument("--markdown", metavar="PATH", type=_path, help="also write the table as Markdown")
    cp.add_argument("--plot", metavar="PATH", type=_path,
                    help="also draw the paired differences with ±2 s.e. bars (a .png file)")
    cp.set_defaults(func=_compare)

    bd = run_command("bdmc", "bidirectional Monte Carlo: lower and upper bounds on log p(x) of simulated data",
                     "Simulate examples from the model itself (z* ~ p(z), x ~ p(x|z*)); for each --steps T run AIS "
                     "forward from the start distribution (a stochastic lower bound on log p(x)) and backward from "
                     "z*, an exact posterior draw (a stochastic upper bound), and report both and their gap "
                     "(Grosse et al. 2015). The T whose gap is small enough is the T to trust for "
                     "evaluate --estimator ais on real data.")
    _size_flag(bd, "--num-examples", "simulated examples")
    _size_flag(bd, "--steps", "AIS steps T to try, comma separated", type=_int_list)
    _size_flag(bd, "--chains", "chains per example")
    _size_flag(bd, "--leapfrog", "leapfrog steps per HMC transition")
    bd.add_argument("--init", default="guide", choices=("guide", "prior"), help="AIS start: q(z|x) (default) "
                    "or the prior")
    bd.add_argument("--batch-size", type=_whole, default=100, help="examples per pass (default: 100)")
    report_flags(bd, "results")
    bd.set_defaults(func=_bdmc)

    s = run_command("sample", "PNG grid of images decoded from prior samples",
                    "Decode codes drawn from the model's generative distribution (the prior; for ae/pca a Gaussian "
                    "fitted to the training codes).")
    s.add_argument("--num-images", type=_whole, default=64, help="(default: 64)")
    s.add_argument("--by-component", action="store_true", help="one row per mixture component (heaviest first)")
    s.add_argument("--components", type=_whole, default=10, help="with --by-component: rows (default: 10)")
    s.add_argument("--output", type=_path, help="PNG path (default: RUN/samples.png or RUN/samples-by-component.png)")
    s.set_defaults(func=_sample)

    r = run_command("reconstruct", "PNG: originals above their reconstructions", "Originals (top row) above "
                    "decode(encode(x)) (bottom row).")
    data_flags(r)
    r.add_argument("--num-images", type=_whole, default=16, help="(default: 16)")
    r.add_argument("--output", type=_path, help="PNG path (default: RUN/reconstructions.png)")
    r.set_defaults(func=_reconstruct)

    i = run_command("interpolate", "PNG: decoded along the line between the codes of two images",
                    "Decode the straight line between the codes of images I and J of the split, originals at "
                    "both ends: what the decoder makes of the space between two codes.")
    data_flags(i)
    i.add_argument("--pair", type=_whole, nargs=2, metavar=("I", "J"), required=True, help="indices into the split")
    i.add_argument("--steps", type=_whole, default=10, help="images along the line (default: 10)")
    i.add_argument("--output", type=_path, help="PNG path (default: RUN/interpolate-I-J.png)")
    i.set_defaults(func=_interpolate)

    x = sub.add_parser("export", help="copy a finished run compactly (settings, metrics, best weights) for sharing",
                       description="Copy a finished run into DEST: config.json, metrics.jsonl, summary.json, elbo.png "
                       "and best.pt without the optimiser's state and the random states, which only --resume needs "
                       "(a third to a half of the size). evaluate, compare, sample, reconstruct and interpolate read "
                       "DEST as they read the run; it cannot be resumed.")
    x.add_argument("run", metavar="RUN", type=_path, help="a finished run directory")
    x.add_argument("dest", metavar="DEST", type=_path, help="a new (or empty) folder")
    x.add_argument("--weights", choices=("both", "averaged"), default="both",
                   help="for a run trained with --ema: keep both its raw and its averaged weights, or only the "
                   "averaged ones that every command uses by default (about half the size; the copy then refuses "
                   "--weights raw)")
    x.set_defaults(func=_export)

    for p in (t, e, cp, bd, s, r, i, x):
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    return root


def _export(args) -> int:
    from .rundir import export_run

    done = export_run(args.run, args.dest, weights=args.weights)
    print(f"{args.dest}: {', '.join(done['files'])} ({done['bytes'] / 2**20:.1f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``pyrovae`` command's argument parser: every subcommand and flag with its default, as
    ``pyrovae --help`` and ``pyrovae COMMAND --help`` print them. The documentation's command-line
    reference is generated from it.

    Examples
    --------
    >>> from pyrovae.cli import build_parser
    >>> args = build_parser().parse_args(["evaluate", "runs/first", "--num-samples", "100"])
    >>> args.command, args.run, args.num_samples, args.estimator
    ('evaluate', 'runs/first', 100, 'is')
    """
    return _parser()


# --- train ---------------------------------------------------------------------------------


def _train(args) -> int:
    from .config import TrainConfig, resumed_config, setting_fields
    from .training import train

    given = {f.name: getattr(args, f.name) for f, _ in setting_fields() if hasattr(args, f.name)}
    resume = getattr(args, "resume", None)
    config_file, preset = getattr(args, "config", None), getattr(args, "preset", None)
    if resume is not None and (config_file is not None or preset is not None):
        raise ValueError(f"--resume continues {resume} with the settings in its config.json: "
                         "drop --config/--preset")
    if resume is not None:
        run_dir = Path(resume)
        config = resumed_config(TrainConfig.load(run_dir / "config.json"), given, run_dir)
    else:
        config = _without_unused_base(dataclasses.replace(_base_config(preset, config_file), **given), given)
    try:
        result = train(config, resume=resume, progress=not getattr(args, "quiet", False))
    except KeyboardInterrupt as e:
        run_dir = getattr(e, "run_dir", None)
        if run_dir is not None and (Path(run_dir) / "last.pt").is_file():
            what = (f"interrupted; the epochs completed so far are in {run_dir}/last.pt: continue with --resume "
                    f"{run_dir}")
        else:
            what = "interrupted before the first epoch ended; there is nothing to resume: run the same command again"
        print(f"pyrovae: {what}", file=sys.stderr)
        return 130
    if result.run_dir is None:  # not the main process of a data-parallel run
        return 0
    print(f"run: {result.run_dir}")
    early = {"patience": ", stopped early", "epochs": "",
             "time_limit": f", the {result.planned_epochs} that fit in --time-limit {config.time_limit}"}
    early = early[result.stopped_by]
    print(f"epochs: {result.epochs_done} (best {result.best_epoch}{early}), {result.seconds:.1f} s")
    if result.test is not None and result.test.get("elbo") is not None:
        t = result.test
        from .model import MODEL_KINDS

        what = "ELBO" if MODEL_KINDS[config.model].has_posterior else "score (the bound it optimises)"
        print(f"test {what}: {t['elbo']:.2f} nats per example ({t['num_examples']} examples, "
              f"{t['num_samples']} samples each)")
    if not config.no_tensorboard:  # the one place a run mentions TensorBoard unasked
        if any(result.run_dir.glob("events.out.tfevents.*")):
            print(f"tensorboard: tensorboard --logdir {result.run_dir.parent}")
        else:
            print("tensorboard: off (pip install 'pyrovae[tensorboard]' to log this run)")
    return 0


def _base_config(preset: str | None, config_file: str | None):
    """The settings flags start from: the defaults, then the preset, then the file."""
    from .config import TrainConfig, preset_settings, read_settings_file

    settings = preset_settings(preset) if preset is not None else {}
    if config_file is not None:
        settings.update(read_settings_file(config_file))
    return TrainConfig.from_dict(settings, source=config_file or f"preset {preset}")


def _without_unused_base(config, given: dict):
    """``config`` with every setting that came from the preset or the settings file, not from a flag, and that
    the flags have made unused (``--optimizer adam`` over a preset's ``norm_grad_by``) put back to its default:
    the user cannot drop what they did not give. A flag given and unused is still refused when the run starts."""
    from .config import TrainConfig, unused_settings

    defaults = TrainConfig()
    back = {name: getattr(defaults, name) for name, _ in unused_settings(config) if name not in given}
    return dataclasses.replace(config, **back) if back else config


# --- commands on a trained run -----------------------------------------------------------


def _load(args, device=None):
    import torch

    from .distributed import resolve_device
    from .runs import load_run

    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must lie in [0, 2^63) (got {args.seed})")
    torch.manual_seed(args.seed)
    return load_run(args.run, which=args.checkpoint, device=device or resolve_device(args.device),
                    weights=args.weights)


#: above this many seconds, estimated from a short probe, evaluate/compare/bdmc need --allow-long
LONG_WORK_SECONDS = 3600


def _check_work(args, model, probe, n: int, terms: list[tuple[int, dict[str, int]]],
                count_flag: str | None = None) -> None:
    """Estimate the decoder passes the command will make, ``n`` examples times the sum of ``terms``
    (a multiplier and the flags whose values multiply into the passes per example), and, from a short
    timed probe on the examples ``probe``, how long that takes here; refuse work above
    :data:`LONG_WORK_SECONDS` unless --allow-long, naming of the largest term's flags (and
    ``count_flag``, the flag that sets ``n``) the one raised furthest above its default."""
    import math

    from .config import most_raised
    from .marginal import estimator_pace

    if getattr(args, "allow_long", False) or not getattr(model, "has_posterior", False):
        return
    passes = [c * math.prod(flags.values()) for c, flags in terms]
    total = n * sum(passes)
    if total < 2_000_000:  # seconds at any plausible rate: no probe needed
        return
    per_pair, per_example = estimator_pace(model, probe)
    seconds = total * per_pair + n * per_example
    rate = total / seconds
    if seconds > LONG_WORK_SECONDS:
        factors = dict(terms[passes.index(max(passes))][1], **({count_flag: n} if count_flag else {}))
        flag = most_raised({f: (v, _default_size(f)) for f, v in factors.items()})
        raise ValueError(f"this would make {total:.3g} decoder passes ({n} examples): about {_duration(seconds)} at "
                         f"the {rate:,.0f} passes/s measured here; lower {flag}, or pass --allow-long to go on")


def _default_size(flag: str) -> int:
    default = _SIZE_DEFAULTS[flag]
    return sum(default) if isinstance(default, tuple) else default


def _estimator_work(args) -> list[tuple[int, dict[str, int]]]:
    """The decoder passes per example of evaluate's and compare's estimators (see :func:`_check_work`):
    importance sampling always, AIS (a forward and a backward pass per leapfrog step, and its
    start) or the quadrature grid beside it."""
    terms = [(1, {"--num-samples": args.num_samples})]
    if args.estimator == "ais":
        terms.append((3, {"--ais-chains": args.ais_chains, "--ais-steps": args.ais_steps,
                          "--ais-leapfrog": args.ais_leapfrog}))
    elif args.estimator == "quadrature":
        terms.append((args.quadrature_resolution, {"--quadrature-resolution": args.quadrature_resolution}))
    return terms


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.0f} seconds"


def _split(args, run):
    """The split to score: the run's own dataset with the run's data settings, or, with
    --dataset, that dataset with the data flags given here only (a run's --label-column or
    --data-dir describe its training data, not another file)."""
    from .training import prepare_data

    config = run.config
    if getattr(args, "dataset", None) is not None:
        config = dataclasses.replace(config, dataset=args.dataset, data_dir=args.data_dir or "data",
                                     label_column=args.label_column, download=False)
    elif args.data_dir is not None or args.label_column is not None:
        config = dataclasses.replace(config, **{k: getattr(args, k) for k in ("data_dir", "label_column")
                                                if getattr(args, k) is not None})
    ds = prepare_data(config, args.split, run.device,
                      fix="the run was trained on binary data with --binarize none: give it binary data (--dataset)")
    if ds.data_dim != run.data_dim:
        raise ValueError(f"{config.dataset} has {ds.data_dim} values per example but the run was trained on "
                         f"{run.data_dim} ({run.config.dataset}): evaluate it on data of that shape")
    return ds


def _scored_split(args, run):
    """``(examples, note)``: the split of :func:`_split`, or ``--num-examples`` of it picked as ``--pick``
    says, and a note saying which (``None`` for the whole split)."""
    n = args.num_examples
    if n is not None and n < 1:
        raise ValueError(f"--num-examples must be at least 1 (got {n})")
    if n is None and args.pick is not None:
        raise ValueError("--pick chooses which --num-examples examples are scored: give --num-examples N too, or "
                         "leave --pick out to score the whole split")
    ds = _split(args, run)
    if n is None or n >= len(ds):
        return ds, None
    first = args.pick == "first"
    note = f"the first {n:,} of {len(ds):,}" if first else f"{n:,} of {len(ds):,} drawn at random (--seed {args.seed})"
    return ds.subset(n, seed=None if first else args.seed), note


def _evaluate(args) -> int:
    from .distributed import ProcessGroup
    from .metrics import evaluate, format_report, shard_bounds
    from .pictures import code_prior
    from .plots import plot_latent_2d

    env = ProcessGroup(args.device)  # under torchrun: one shard of the examples per process
    finished = False
    try:
        error = None
        try:  # every process checks; all of them refuse if any does, before the first collective
            run = _load(args, device=env.device)
            ds, picked = _scored_split(args, run)
            lo, hi = shard_bounds(len(ds), env.rank, env.world)
            _check_work(args, run.model, ds.images[lo:hi] if hi > lo else ds.images, hi - lo, _estimator_work(args))
        except BAD_INPUT as e:
            error = " ".join(str(e).split())
        env.raise_any(error)
        report = evaluate(run.model, ds.images, ds.labels, num_samples=args.num_samples, chunk_size=args.chunk_size,
                          batch_size=args.batch_size, progress=not args.quiet and env.main, seed=args.seed,
                          shard=(env.rank, env.world), per_example=bool(args.json), **estimator_options(args))
        finished = True
    finally:
        env.close(finished)
    if report is None:  # not rank 0: its share went to rank 0
        return 0
    report = {"run": str(run.dir), "checkpoint": str(run.checkpoint), "weights": run.weights, "dataset": ds.name,
              "split": ds.split, "processes": env.world, "seed": args.seed, **report}
    if picked is not None:
        report["picked"] = picked
    if run.model.has_code and run.model.latent_dim == 2:
        import torch

        with torch.no_grad():
            codes = run.model.encode(ds.images)
        prior = code_prior(run.model)  # drawing the autoencoder's unused prior would mislead
        png = plot_latent_2d(codes, ds.labels, run.dir / f"latent-{ds.split}.png",
                             mixture=prior.mixture() if prior is not None and prior.is_mixture else None,
                             title=f"{run.config.model}, {ds.name} {ds.split}")
        report["latent_png"] = str(png)
    if args.json != "-":
        _write_json(args.json, report)  # first: a file that cannot be written is the one line on stderr
    print(format_report(report))
    if "latent_png" in report:
        print(f"latent map: {report['latent_png']}")
    if args.json == "-":
        _write_json(args.json, report)
    pk = report.get("pareto_k")
    if pk and pk.get("num_above_0.7") and report.get("estimator", "is") == "is":
        print(f"warning: {pk['num_above_0.7']} examples ({100 * pk['frac_above_0.7']:.1f}%) have Pareto k-hat > 0.7: "
              "their log p(x) estimates are unreliable (raise --num-samples, read them as lower bounds, or use "
              "--estimator ais)", file=sys.stderr)
    return 0


def _write_json(where: str | None, obj) -> None:
    """``--json PATH``: strict JSON (non-finite numbers as null) written atomically; ``-``: stdout."""
    from .files import dumps, write_json

    if not where:
        return
    if where == "-":
        print(dumps(obj, explain=True))
    else:
        write_json(where, obj, explain=True)


def _compare(args) -> int:
    from .compare import compare_runs, markdown_table, plot_differences
    from .distributed import resolve_device
    from .files import write_text_atomic
    from .runs import load_run

    runs = list(args.runs)
    for r in runs:
        if not Path(r).is_dir():
            raise FileNotFoundError(f"{r}: no such run directory; give the folders that pyrovae train printed")
    baseline = 0
    if args.baseline is not None:
        matches = [i for i, r in enumerate(runs) if Path(r).resolve() == Path(args.baseline).resolve()]
        if not matches:
            runs.insert(0, args.baseline)
            matches = [0]
        baseline = matches[0]
    if args.plot is not None:
        from .plots import image_path

        image_path("--plot", args.plot, (".png",))  # before the runs are scored
    first = load_run(runs[baseline], which=args.checkpoint, weights=args.weights)
    ds, _ = _scored_split(args, first)
    _check_work(args, first.model, ds.images, len(ds), _estimator_work(args))
    options = estimator_options(args)
    result = compare_runs(runs, ds, baseline=baseline, num_samples=args.num_samples, seed=args.seed,
                          which=args.checkpoint, weights=args.weights, batch_size=args.batch_size,
                          progress=not args.quiet, device=resolve_device(args.device), **options)
    table = markdown_table(result)
    print(f"{ds.name} {ds.split}, {len(ds)} examples, seed {args.seed}")
    print(table)
    if args.markdown:
        write_text_atomic(args.markdown, f"{ds.name} {ds.split}, {len(ds)} examples, seed {args.seed}\n\n{table}\n")
    if args.plot:
        print(plot_differences(result, args.plot))
    _write_json(args.json, result)
    return 0


def _bdmc(args) -> int:
    import torch

    from .ais import _check_bdmc, bdmc, format_bdmc

    run = _load(args)
    settings = dict(num_examples=args.num_examples, steps=list(args.steps), num_chains=args.chains,
                    leapfrog=args.leapfrog, init=args.init, batch_size=args.batch_size)
    _check_bdmc(run.model, **settings)  # before the time check, which multiplies them
    probe = torch.zeros(min(args.num_examples, 16), run.data_dim, device=run.device)  # not one per example
    # forward and reverse AIS, each a forward and a backward pass per leapfrog step
    _check_work(args, run.model, probe, args.num_examples,
                [(6, {"--chains": args.chains, "--steps": sum(args.steps), "--leapfrog": args.leapfrog})],
                "--num-examples")
    result = bdmc(run.model, seed=args.seed, progress=not args.quiet, **settings)
    result = {"run": str(run.dir), "checkpoint": str(run.checkpoint), **result}
    print(format_bdmc(result))
    _write_json(args.json, result)
    return 0


def _picture_out(args, default: Path) -> Path:
    from .plots import image_path

    return image_path("--output", args.output if args.output is not None else default)


def _picture_size(flag: str, count: int, run) -> None:
    """Refuse, before allocating, a picture of more images than memory holds."""
    from .config import refuse_if_too_big

    refuse_if_too_big({flag: 4.0 * 4 * count * run.data_dim}, "the picture")


def _sample(args) -> int:
    from .pictures import component_count, sample_images, samples_by_component
    from .plots import save_image_grid

    run = _load(args)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1 (got {args.num_images})")
    _picture_size("--num-images", args.num_images, run)
    if args.by_component:
        if args.components < 1:
            raise ValueError(f"--components must be at least 1 (got {args.components})")
        out = _picture_out(args, run.dir / "samples-by-component.png")
        rows = min(args.components, component_count(run.model))  # the components there are, at most --components
        per = max(1, args.num_images // rows)
        images, order = samples_by_component(run.model, per_component=per, max_components=args.components)
        save_image_grid(images, run.image_shape, out, nrow=per)
        print(f"{out} (rows: components {order})")
    else:
        out = _picture_out(args, run.dir / "samples.png")
        images = sample_images(run.model, args.num_images)
        save_image_grid(images, run.image_shape, out, nrow=int(round(args.num_images ** 0.5)) or 1)
        print(out)
    return 0


def _reconstruct(args) -> int:
    from .pictures import reconstructions
    from .plots import save_image_grid

    run = _load(args)
    ds = _split(args, run)
    n = min(args.num_images, len(ds))
    if n < 1:
        raise ValueError(f"--num-images must be at least 1 (got {args.num_images})")
    out = _picture_out(args, run.dir / "reconstructions.png")
    save_image_grid(reconstructions(run.model, ds.images[:n]), run.image_shape, out, nrow=n)
    print(out)
    return 0


def _interpolate(args) -> int:
    import torch

    from .pictures import interpolation
    from .plots import save_image_grid

    run = _load(args)
    ds = _split(args, run)
    i, j = args.pair
    for k in (i, j):
        if not 0 <= k < len(ds):
            raise ValueError(f"--pair index {k} is outside the {ds.split} split (0..{len(ds) - 1})")
    out = _picture_out(args, run.dir / f"interpolate-{i}-{j}.png")
    _picture_size("--steps", args.steps, run)
    line, _ = interpolation(run.model, ds.images[i], ds.images[j], steps=args.steps)
    images = torch.cat([ds.images[i : i + 1], line, ds.images[j : j + 1]])
    save_image_grid(images, run.image_shape, out, nrow=images.shape[0])
    print(out)
    return 0


# --- entry point -------------------------------------------------------------------------


#: what an interrupted command says (train: whether anything was saved is known only there)
_INTERRUPTED = {"train": "interrupted; the epochs completed so far are in last.pt: continue with --resume RUN "
                         "(a run stopped before its first epoch ended starts again from epoch 0)",
                "evaluate": "interrupted; nothing was written", "compare": "interrupted; nothing was written",
                "bdmc": "interrupted; nothing was written"}


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code: 0, 1 for a diverged run, 2 for bad input (one
    line on stderr), 130 when interrupted (Ctrl-C)."""
    prog = "pyrovae"
    debug = argv is not None and "--debug" in argv or argv is None and "--debug" in sys.argv[1:]
    try:
        with warnings.catch_warnings():
            if not debug:  # third-party warnings are not pyrovae's to show (our own still are)
                warnings.filterwarnings("ignore", module=r"(numpy|torch|torchvision|matplotlib|sklearn|scipy|pyro|"
                                                         r"arviz|PIL|tensorboard)(\.|$)")
            args = _parser().parse_args(argv)
            prog = f"pyrovae {args.command}"
            from .training import TrainingDiverged

            try:
                return args.func(args) if debug else exit_code_of(prog, args.func, args)
            except TrainingDiverged as e:
                if debug:
                    raise
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        what = _INTERRUPTED.get(prog.split()[-1], "interrupted; nothing was written")
        print(f"{prog}: {what}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
