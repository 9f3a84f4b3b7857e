r"""Benchmark: log p(x) by importance sampling, K = 5000 samples on 10,000 images of 784 pixels.

What one run measures, on the machine it runs on:

- the estimator (:func:`pyrovae.estimate_log_px`, with Pareto k-hat diagnostics) on all images:
  wall time, peak resident memory, and its effective GFLOP/s, counting the decoder's
  matmuls, :math:`2 \sum_l n_{l-1} n_l` per (sample, image) (784-400-50:
  :math:`2(50 \cdot 400 + 400 \cdot 784)` = 667,200), plus the encoder's once per image;
- the float32 matmul rate of this machine on the decoder's own shapes (``torch.addmm`` of
  both layers at several row counts; measured before and after the estimator, the best
  kept, so the ratio is conservative);
- a straightforward reference estimator, timed in the same run on the first
  ``--reference-images`` images: batches of 100 images, a Python loop over chunks of 250
  samples, ``dist.Normal`` for q(z|x) and p(z), ``dist.Bernoulli(logits=...)`` for p(x|z);
  its mean log p(x) is checked against the estimator's on the same images;
- a layout sweep: the estimator's rate for several ``--chunk-size`` values (what the
  default is chosen from), and its peak memory at a much larger K (memory must not grow
  with K).

Data: the MNIST test set (``t10k`` files in ``--data-dir``) when present, else the 5,000
mnist5k digits repeated to 10,000 (said so in the output); statically binarised.
Model: ``--run RUN`` (a trained 784-pixel Bernoulli VAE with the standard prior), else a
short run this script trains itself (``--train-epochs`` on mnist5k, kept under
``--out``); ``--quick`` uses an untrained network and small sizes (a smoke test).

Writes ``bench.json`` and ``bench.md`` under ``--out`` (default ``results/bench_marginal``).
Run it on a quiet machine: timings from a machine shared with other work are not results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

from pyrovae import TrainConfig, estimate_log_px, load_dataset  # noqa: E402
from pyrovae.cli import exit_code_of  # noqa: E402
from pyrovae.data import static_binarized  # noqa: E402
from pyrovae.marginal import default_chunk_size, isolated_params  # noqa: E402

#: the reference estimator's layout (the issue's "straightforward" one)
REFERENCE_CHUNK, REFERENCE_BATCH = 250, 100
#: --quick's sizes
QUICK = {"num_images": 200, "num_samples": 100, "reference_images": 100, "sweep_chunks": "1024,2048",
         "prior_images": 50, "prior_samples": 50, "ais_images": 20, "ais_steps": 20}


# --- measuring ---------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory (MB) of this process while the block runs, sampled every 10 ms
    from /proc (where there is no /proc: the process-wide peak so far, from getrusage)."""

    def __enter__(self):
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _max_rss_mb()


def _max_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10  # bytes on macOS, KiB on Linux


def net_flops(net) -> int:
    """Multiply-adds x 2 of one row through a network's linear maps."""
    return sum(2 * m.in_features * m.out_features for m in net.linear_maps)


def matmul_rate(decoder, rows: int, seconds: float = 1.0) -> float:
    """GFLOP/s of ``torch.addmm`` through the decoder's own weight shapes, ``rows`` rows at a
    time, best of repeated timings over about ``seconds``."""
    maps = decoder.linear_maps
    with torch.no_grad():
        inputs = [torch.randn(rows, m.in_features) for m in maps]
        weights = [m.weight.detach().T.contiguous() for m in maps]
        biases = [m.bias.detach() for m in maps]
        flops = rows * net_flops(decoder)

        def once():
            for x, w, b in zip(inputs, weights, biases):
                torch.addmm(b, x, w)

        once()
        best, start = math.inf, time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            once()
            best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def op_profile(model, images, num_samples, chunk_size, batch_size, top: int = 8) -> list[dict]:
    """Where the estimator's time goes: torch.profiler's self CPU time of the ``top`` ops, as
    fractions of all op time (the rest of the wall time is Python)."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        # some torch versions (2.11 seen) announce that a one-cycle profile keeps only its own cycle
        warnings.filterwarnings("ignore", message=".*Profiler clears events", category=UserWarning)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            estimate_log_px(model, images, num_samples, chunk_size=chunk_size, batch_size=batch_size)
            wall = time.perf_counter() - t
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "fraction_of_op_time": e.self_cpu_time_total / total, "calls": e.count} for e in rows] + [
        {"op": "(all ops / wall time)", "fraction_of_op_time": total / 1e6 / wall, "calls": None}]


# --- the reference estimator --------------------------------------------------------------------


@torch.no_grad()
def reference_log_px(model, images: torch.Tensor, num_samples: int, progress: bool = True) -> torch.Tensor:
    r"""The straightforward estimator: per batch of 100 images, encode once, then a Python loop
    over chunks of 250 samples scoring :math:`\log p(x|z) + \log p(z) - \log q(z|x)` with
    ``dist.Bernoulli(logits)`` and ``dist.Normal``; log-sum-exp over all K at the end."""
    from tqdm.auto import tqdm

    out = []
    with pyro.validation_enabled(False):  # as the estimator runs: no argument checks in either
        for x in tqdm(images.split(REFERENCE_BATCH), desc="reference", unit="batch", disable=not progress,
                      leave=False):
            loc, log_scale = model.encoder(x)
            q = dist.Normal(loc, log_scale.exp())
            prior = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc))
            log_w = []
            for start in range(0, num_samples, REFERENCE_CHUNK):
                z = q.sample((min(REFERENCE_CHUNK, num_samples - start),))  # (S, B, D)
                log_lik = dist.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
                log_w.append(log_lik + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1))
            out.append(torch.logsumexp(torch.cat(log_w).double(), 0) - math.log(num_samples))
    return torch.cat(out)


# --- data and model ------------------------------------------------------------------------------


def load_images(data_dir: str, n: int) -> tuple[torch.Tensor, str]:
    """n binarised 784-pixel images and a sentence saying where they come from."""
    try:
        ds = load_dataset("mnist", "test", data_dir=data_dir)
        source = f"MNIST test set ({len(ds)} images, t10k files in {data_dir}/)"
    except FileNotFoundError:
        ds = load_dataset("mnist5k", "all")
        source = f"no MNIST t10k files in {data_dir}/: the {len(ds)} mnist5k digits"
    images = static_binarized(ds).images
    reps = math.ceil(n / images.shape[0])
    if reps > 1:
        source += f", repeated {reps} times"
    source += f"; first {n} used, statically binarised"
    return images.repeat(reps, 1)[:n].contiguous(), source


def load_model(args, out: Path):
    """The VAE to benchmark and a sentence saying where it comes from."""
    from pyrovae import load_run
    from pyrovae.model import build_model

    if args.run:
        run = load_run(args.run)
        source = f"trained run {run.dir} ({run.checkpoint.name}, epoch {run.epoch})"
        model = run.model
    elif args.quick:
        model = build_model(TrainConfig().resolved(), data_dim=784)
        source = "untrained 784-400-50 network (--quick: a smoke test, its log p(x) means nothing)"
    else:
        run = load_run(_short_run(args, out, "run", []))
        source = (f"a short run trained by this script: the default 784-400-50 Bernoulli VAE, "
                  f"{run.epoch} epochs on mnist5k ({run.dir})")
        model = run.model
    if (getattr(model, "kind", None) != "vae" or model.decoder.linear_maps[-1].out_features != 784
            or type(model.prior).__name__ != "StandardNormalPrior"
            or type(model.likelihood).__name__ != "BernoulliLikelihood"):
        raise ValueError(f"{source}: the benchmark needs a 784-pixel Bernoulli VAE with the standard prior "
                         f"(its reference estimator is written for that model)")
    return model.eval(), source


def _short_run(args, out: Path, name: str, flags: list[str]) -> Path:
    """``out/name``: ``pyrovae train --epochs args.train_epochs FLAGS``, trained once (in a child
    process, so that training's memory is not counted in the benchmark's) and reused."""
    import subprocess

    run_dir = out / name
    if not (run_dir / "summary.json").is_file():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # an interrupted training: start it again
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "pyrovae", "train", "--epochs", str(args.train_epochs), "--out", str(out),
               "--name", name, *flags] + (["--quiet"] if args.quiet else [])
        if subprocess.run(cmd, env=env).returncode != 0:
            raise ValueError(f"training the short run failed ({' '.join(cmd)}); give a trained run with --run")
    return run_dir


#: the mixture priors compared with the standard prior: (row name, pyrovae train flags)
PRIOR_ROWS = [("standard", []),
              ("MoG K=10", ["--prior", "mog", "--prior-components", "10"]),
              ("MoG K=512", ["--prior", "mog", "--prior-components", "512"]),
              ("VampPrior K=50", ["--prior", "vamp", "--prior-components", "50"]),
              ("VampPrior K=500", ["--prior", "vamp", "--prior-components", "500"])]


def prior_rows(args, out: Path, images: torch.Tensor, progress: bool) -> list[dict]:
    """The estimator under each prior of :data:`PRIOR_ROWS`, same network, images, K and layout:
    wall time and peak memory, and their ratios to the standard prior's. The standard prior
    runs first and last, and its mean is the reference, so that drift over the section cancels.
    Models: short runs (``--train-epochs``), so that the mixtures' scales are trained ones
    (they decide whether the mixture's products run in float32 or float64); untrained with ``--quick``."""
    from pyrovae import load_run
    from pyrovae.model import build_model

    rows = []
    order = PRIOR_ROWS + PRIOR_ROWS[:1]
    for i, (name, flags) in enumerate(order):
        if args.quick:
            settings = dict(zip([f[2:].replace("-", "_") for f in flags[::2]], flags[1::2]))
            if "prior_components" in settings:
                settings["prior_components"] = int(settings["prior_components"])
            model = build_model(TrainConfig(**settings).resolved(), data_dim=784, train_images=torch.rand(1000, 784))
        else:
            slug = "prior-" + name.lower().replace(" ", "").replace("=", "")
            model = load_run(_short_run(args, out, slug, flags)).model
        model.eval()
        with PeakRSS() as rss:
            est, wall, _ = run_estimator(model, images, args.prior_samples, args.chunk_size, args.batch_size,
                                         progress and i < len(PRIOR_ROWS))
        extra = rss.peak - rss.start
        mix = model.prior.dist()
        dtype = str(mix.products_dtype).removeprefix("torch.") if hasattr(mix, "log_joint") else "—"
        rows.append({"prior": name, "wall_s": wall, "extra_rss_mb": extra, "log_px": float(est.log_px.mean()),
                     "mixture_products": dtype})
        _log(f"priors: {name}: {wall:.1f} s")
    ref_wall = (rows[0]["wall_s"] + rows[-1]["wall_s"]) / 2
    ref_peak = max(rows[0]["extra_rss_mb"], rows[-1]["extra_rss_mb"], 1.0)
    rows[0]["wall_s"] = ref_wall
    rows = rows[:-1]
    for row in rows:
        row["wall_ratio"] = row["wall_s"] / ref_wall
        row["extra_rss_ratio"] = row["extra_rss_mb"] / ref_peak
    return rows


def ais_section(args, model, images: torch.Tensor, progress: bool) -> dict:
    """AIS with ``pyrovae evaluate --estimator ais``'s defaults on ``--ais-images`` images: wall time,
    peak memory above the start, and its rate in decoder gradient passes (forward and backward)
    per second and in GFLOP/s, counting the decoder's matmuls twice per pass (the forward
    products and the backward products for the gradient with respect to z)."""
    from pyrovae.ais import ais_log_px

    t, c, lf = args.ais_steps, args.ais_chains, args.ais_leapfrog
    x = images[: args.ais_images]
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        r = ais_log_px(model, x, num_steps=t, num_chains=c, leapfrog=lf, seed=0, batch_size=args.ais_batch_size,
                       progress=progress)
        wall = time.perf_counter() - t0
    passes = x.shape[0] * c * ((t - 1) * lf + 1)  # one gradient at the start, L per transition
    flops = passes * 2 * net_flops(model.decoder)
    return {"images": int(x.shape[0]), "num_steps": t, "num_chains": c, "leapfrog": lf,
            "batch_size": args.ais_batch_size, "wall_s": wall, "extra_rss_mb": rss.peak - rss.start,
            "gradient_passes": passes, "passes_per_s": passes / wall, "gflops": flops / wall / 1e9,
            "log_px": float(r.log_px.mean()), "acceptance": float(r.acceptance.mean()),
            "wall_extrapolated_1000_images_s": wall * 1000 / x.shape[0]}


def _log(msg: str) -> None:
    print(f"[bench_marginal] {msg}", file=sys.stderr, flush=True)


# --- the run ----------------------------------------------------------------------------------------


def run_estimator(model, images, K, chunk_size, batch_size, progress):
    torch.manual_seed(0)
    with PeakRSS() as rss:
        t = time.perf_counter()
        est = estimate_log_px(model, images, K, chunk_size=chunk_size, batch_size=batch_size, diagnostics=True,
                              progress=progress)
        wall = time.perf_counter() - t
    return est, wall, rss.peak


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="bench_marginal",
        description=__doc__.split("\n\n")[0] + " Measures wall time, peak memory and effective GFLOP/s of "
        "pyrovae's estimator against this machine's matmul rate on the decoder's shapes and against a "
        "straightforward reference estimator, in one run. Run it on a quiet machine.",
        epilog="Full size, on a quiet machine: python experiments/bench_marginal.py --data-dir DIR "
        "(DIR holding MNIST's t10k files).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", help="a trained run directory (784-pixel Bernoulli VAE, standard prior); "
                   "None: train a short one (see --train-epochs)")
    p.add_argument("--data-dir", default="data", help="folder with MNIST's t10k files; without them mnist5k "
                   "digits are repeated to --num-images")
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--num-samples", type=int, default=5000, help="K, importance samples per image")
    p.add_argument("--chunk-size", type=int, default=None, help="(sample, image) pairs per pass; "
                   "None: the estimator's own default for the device")
    p.add_argument("--batch-size", type=int, default=100, help="images per batch of the estimator")
    p.add_argument("--reference-images", type=int, default=1000, help="images the reference estimator "
                   "runs on (its rate is per image; the full-size time is extrapolated and said so)")
    p.add_argument("--sweep-chunks", default="1024,2048,3072,4096,8192,32768",
                   help="chunk sizes of the layout sweep, comma separated ('' = no sweep)")
    p.add_argument("--train-epochs", type=int, default=10, help="epochs of the short runs trained here (the "
                   "model without --run, and one per prior of the priors section)")
    p.add_argument("--prior-images", type=int, default=1000, help="images of the priors section")
    p.add_argument("--prior-samples", type=int, default=1000, help="K of the priors section")
    p.add_argument("--no-priors", action="store_true", help="skip the priors section")
    p.add_argument("--ais-images", type=int, default=1000, help="images of the AIS section")
    p.add_argument("--ais-steps", type=int, default=500, help="AIS steps T (evaluate's default)")
    p.add_argument("--ais-chains", type=int, default=4, help="AIS chains (evaluate's default)")
    p.add_argument("--ais-leapfrog", type=int, default=5, help="AIS leapfrog steps (evaluate's default)")
    p.add_argument("--ais-batch-size", type=int, default=100, help="images per AIS pass (evaluate's default)")
    p.add_argument("--no-ais", action="store_true", help="skip the AIS section")
    p.add_argument("--out", default="results/bench_marginal", help="folder for bench.json, bench.md (and the "
                   "short run)")
    p.add_argument("--quick", action="store_true", help="small sizes and an untrained network: checks that "
                   "everything runs (seconds), measures nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("num_images", "num_samples", "reference_images", "batch_size", "train_epochs", "prior_images",
                 "prior_samples", "ais_images", "ais_steps", "ais_chains", "ais_leapfrog", "ais_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.quick:  # small sizes, where not given explicitly
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    sweep = [int(c) for c in args.sweep_chunks.split(",") if c.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    torch.manual_seed(0)

    model, model_source = load_model(args, out)
    images, data_source = load_images(args.data_dir, args.num_images)
    n, K = images.shape[0], args.num_samples
    chunk = args.chunk_size or default_chunk_size(images.device)
    dec_flops, enc_flops = net_flops(model.decoder), net_flops(model.encoder)

    def gflops(num_images, num_samples, seconds):
        return (num_images * num_samples * dec_flops + num_images * enc_flops) / seconds / 1e9

    rows = sorted({chunk, REFERENCE_CHUNK * REFERENCE_BATCH})
    mm_seconds = 0.2 if args.quick else 2.0
    mm_before = {r: matmul_rate(model.decoder, r, mm_seconds) for r in rows}
    with isolated_params():  # a warm-up
        estimate_log_px(model, images[:10], 20)

    # the estimator on everything first, so that its peak memory is its own; then one image at a
    # K a hundred chunks deep, with the same chunk: memory must not grow with K
    est, wall, peak = run_estimator(model, images, K, args.chunk_size, args.batch_size, progress)
    summary = est.summary()
    big_k = 4 * chunk if args.quick else 100 * chunk
    _, wall_big, peak_big = run_estimator(model, images[:1], big_k, chunk, args.batch_size, False)
    mm_after = {r: matmul_rate(model.decoder, r, mm_seconds) for r in rows}
    mm_best = max(max(mm_before.values()), max(mm_after.values()))

    # the reference on the first images, and the two estimates side by side
    r = min(args.reference_images, n)
    torch.manual_seed(1)
    with PeakRSS() as rss:
        t = time.perf_counter()
        ref = reference_log_px(model, images[:r], K, progress)
        ref_wall = time.perf_counter() - t
    diff = est.log_px[:r] - ref
    diff_se = float(diff.std() / math.sqrt(r)) if r > 1 else math.nan

    # the layout sweep (small, smallest chunk first) and where the time goes
    sweep_rows = []
    sweep_n, sweep_k = (50, 100) if args.quick else (200, 500)
    for c in sorted(sweep):
        _, sweep_wall, sweep_peak = run_estimator(model, images[:sweep_n], sweep_k, c, args.batch_size, False)
        sweep_rows.append({"chunk_size": c, "images": sweep_n, "num_samples": sweep_k, "wall_s": sweep_wall,
                           "gflops": gflops(sweep_n, sweep_k, sweep_wall), "peak_rss_mb": sweep_peak})
    profile_rows = op_profile(model, images[:sweep_n], sweep_k, args.chunk_size, args.batch_size)
    priors = [] if args.no_priors else prior_rows(args, out, images[: args.prior_images], progress)
    ais = None if args.no_ais else ais_section(args, model, images, progress)

    rate = gflops(n, K, wall)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "pyro": pyro.__version__, "device": str(images.device)},
        "quick": args.quick,
        "data": data_source,
        "model": model_source,
        "num_images": n, "num_samples": K, "chunk_size": chunk, "batch_size": args.batch_size,
        "flops_per_sample_image": dec_flops, "flops_encoder_per_image": enc_flops,
        "estimator": {"wall_s": wall, "peak_rss_mb": peak, "gflops": rate, "fraction_of_matmul": rate / mm_best,
                      "log_px": summary["log_px"], "log_px_se": summary["log_px_se"], "elbo": summary["elbo"],
                      "pareto_k": summary["pareto_k"], "ess": summary["ess"]},
        "matmul_gflops": {"before": {str(k): v for k, v in mm_before.items()},
                          "after": {str(k): v for k, v in mm_after.items()}, "best": mm_best},
        "reference": {"images": r, "wall_s": ref_wall, "gflops": gflops(r, K, ref_wall),
                      "fraction_of_matmul": gflops(r, K, ref_wall) / mm_best,
                      "extrapolated_wall_s_all_images": ref_wall * n / r, "peak_rss_mb": rss.peak,
                      "log_px": float(ref.mean()),
                      "estimator_minus_reference": float(diff.mean()), "difference_se": diff_se},
        "memory_at_large_k": {"num_samples": big_k, "images": 1, "wall_s": wall_big, "peak_rss_mb": peak_big},
        "sweep": sweep_rows,
        "op_profile": profile_rows,
        "priors": {"images": min(args.prior_images, n), "num_samples": args.prior_samples, "rows": priors},
        "ais": ais,
        "process_peak_rss_mb": _max_rss_mb(),
        "targets": {"fraction_of_matmul_at_least_0.5": rate / mm_best >= 0.5,
                    "wall_under_600_s": wall < 600 if n * K >= 10_000 * 5000 else None,
                    "peak_rss_under_2_gb": max(peak, peak_big) < 2048,
                    "ais_defaults_on_1000_images_within_600_s": (ais["wall_s"] <= 600 if ais and ais["images"] >= 1000
                                                                 else None)},
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return result


def markdown(r: dict) -> str:
    e, ref, mm = r["estimator"], r["reference"], r["matmul_gflops"]
    lines = [
        f"# log p(x) benchmark: K = {r['num_samples']} on {r['num_images']} images"
        + (" (--quick: a smoke test, not a measurement)" if r["quick"] else ""),
        "",
        f"- data: {r['data']}",
        f"- model: {r['model']}",
        f"- machine: {r['machine']['processor']}, {r['machine']['cpu_count']} CPUs, "
        f"{r['machine']['torch_threads']} torch threads, torch {r['machine']['torch']}, pyro {r['machine']['pyro']}",
        f"- FLOPs counted: {r['flops_per_sample_image']:,} per (sample, image) (decoder matmuls) + "
        f"{r['flops_encoder_per_image']:,} per image (encoder)",
        f"- estimator layout: chunk {r['chunk_size']} (sample, image) pairs, batches of {r['batch_size']} images; "
        f"reference: chunks of {REFERENCE_CHUNK} samples, batches of {REFERENCE_BATCH} images",
        "",
        "| | images | wall (s) | GFLOP/s | of matmul rate | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| pyrovae `estimate_log_px` (with k-hat) | {r['num_images']} | {e['wall_s']:.1f} | {e['gflops']:.1f} | "
        f"{100 * e['fraction_of_matmul']:.0f}% | {e['peak_rss_mb']:.0f} |",
        f"| reference loop | {ref['images']} | {ref['wall_s']:.1f} (all {r['num_images']}: "
        f"~{ref['extrapolated_wall_s_all_images']:.0f}, extrapolated) | {ref['gflops']:.1f} | "
        f"{100 * ref['fraction_of_matmul']:.0f}% | {ref['peak_rss_mb']:.0f} |",
        f"| `torch.addmm`, decoder shapes (best) | | | {mm['best']:.1f} | 100% | |",
        "",
        "matmul GFLOP/s by rows per call, before / after the estimator: "
        + ", ".join(f"{k} rows {mm['before'][k]:.1f} / {mm['after'][k]:.1f}" for k in mm["before"]),
        "",
        f"log p(x) = {e['log_px']:.3f} ± {e['log_px_se']:.3f} nats (ELBO {e['elbo']:.3f}); Pareto k-hat > 0.7 for "
        f"{e['pareto_k']['num_above_0.7']} images; estimator − reference on the same {ref['images']} images: "
        f"{ref['estimator_minus_reference']:+.4f} ± {ref['difference_se']:.4f} nats (independent draws)",
        "",
        f"memory at large K: K = {r['memory_at_large_k']['num_samples']} on one image peaked at "
        f"{r['memory_at_large_k']['peak_rss_mb']:.0f} MB ({r['memory_at_large_k']['wall_s']:.1f} s)",
        "",
    ]
    if r["sweep"]:
        lines += ["| chunk size | GFLOP/s | wall (s) | peak RSS (MB) |", "|---:|---:|---:|---:|"]
        lines += [f"| {s['chunk_size']} | {s['gflops']:.1f} | {s['wall_s']:.2f} | {s['peak_rss_mb']:.0f} |"
                  for s in r["sweep"]]
        s0 = r["sweep"][0]
        lines += ["", f"(layout sweep: {s0['images']} images, K = {s0['num_samples']}, run last; its peak RSS "
                  "includes what earlier phases left allocated)", ""]
    if r.get("priors", {}).get("rows"):
        p = r["priors"]
        lines += [f"Priors: the estimator at K = {p['num_samples']} on {p['images']} images, each prior's model "
                  "trained as long as the standard one; ratios to the standard prior in the same run "
                  "(target for MoG K=512 and VampPrior K=500: at most 1.5x):", "",
                  "| prior | wall (s) | × standard | memory above the start (MB) | × standard | mixture products |",
                  "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {x['prior']} | {x['wall_s']:.1f} | {x['wall_ratio']:.2f} | {x['extra_rss_mb']:.0f} | "
                  f"{x['extra_rss_ratio']:.2f} | {x['mixture_products']} |" for x in p["rows"]]
        lines += [""]
    if r.get("ais"):
        a = r["ais"]
        lines += [f"AIS (`evaluate --estimator ais` defaults: T = {a['num_steps']}, {a['num_chains']} chains, "
                  f"L = {a['leapfrog']}, {a['batch_size']} images per pass) on {a['images']} images: "
                  f"{a['wall_s']:.1f} s (1,000 images: {a['wall_extrapolated_1000_images_s']:.0f} s), "
                  f"{a['gradient_passes']:,} decoder gradient passes, {a['passes_per_s']:,.0f} per second, "
                  f"{a['gflops']:.1f} GFLOP/s = {100 * a['gflops'] / mm['best']:.0f}% of the matmul rate (forward and "
                  f"backward products counted), memory above the start {a['extra_rss_mb']:.0f} MB, "
                  f"acceptance {a['acceptance']:.2f}, mean log p(x) {a['log_px']:.3f}.", ""]
    if r.get("op_profile"):
        lines += ["| op (torch.profiler, self CPU time) | share | calls |", "|---|---:|---:|"]
        lines += [f"| {o['op']} | {100 * o['fraction_of_op_time']:.1f}% "
                  f"| {o['calls'] if o['calls'] is not None else ''} |"
                  for o in r["op_profile"]]
        lines += ["", "(the last row: time inside torch ops over wall time; the rest is Python and Pyro)", ""]
    t = r["targets"]
    lines.append("targets: " + "; ".join(f"{k}: {'yes' if v else 'no' if v is not None else 'n/a (not full size)'}"
                                         for k, v in t.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(exit_code_of("bench_marginal", main))
