r"""Scores of a trained model on a split: the bound, log p(x), reconstruction errors,
active units, and how a mixture prior's components are used.

:func:`split_scores` is the cheap per-epoch score (ELBO, KL, reconstruction term) of every
model kind; :func:`evaluate` is the full report of ``pyrovae evaluate``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import ESTIMATORS, unknown_keys, whole
from .marginal import Estimate, active_units_by_layer, check_images, check_seed, estimate_log_px, isolated_params

__all__ = ["split_scores", "evaluate", "reconstruction_errors", "component_usage", "cluster_scores",
           "responsibilities", "shard_bounds"]


#: (sample, example) pairs scored per pass by :func:`split_scores`
_SCORE_PAIRS = 4096


def _mean(v: torch.Tensor) -> float:
    return float(v.double().mean())


def _se(v: torch.Tensor) -> float:
    return float(v.double().std()) / math.sqrt(v.numel()) if v.numel() > 1 else math.nan


@torch.no_grad()
def split_scores(model, images: torch.Tensor, num_samples: int = 1) -> dict[str, float | None]:
    r"""Mean per-example ``elbo``, ``recon`` and ``kl`` (nats) of ``images``.

    ``elbo`` is the bound each kind optimises: the ELBO (VAE, ``num_samples`` draws from
    q), :math:`\log p(x|m(x))` (autoencoder), :math:`\log p(x)` exactly (finite mixture, whose
    posterior is exact) and the PPCA density (PCA on grey data; ``None`` otherwise). A VAE scored
    with ``num_samples`` K > 1 also gives ``iwae``, the importance-weighted bound
    :math:`\log \frac{1}{K}\sum_k w_k` over the same K draws (never below ``elbo``, the mean of their
    :math:`\log w_k`).
    """
    was_training = model.training
    model.eval()
    try:
        if model.has_posterior:
            # a few thousand (sample, example) pairs per pass: the validation split of an epoch
            # in one pass rather than Pyro's tracing once per 100 examples
            est = estimate_log_px(model, images, num_samples, diagnostics=False,
                                  batch_size=max(1, _SCORE_PAIRS // num_samples))
            scores = {"elbo": _mean(est.elbo), "recon": _mean(est.recon), "kl": _mean(est.kl)}
            return {**scores, "iwae": _mean(est.log_px)} if num_samples > 1 else scores
        with isolated_params():
            terms = model.score_terms(images)
        return {k: _mean(v) if v is not None else None for k, v in terms.items()}
    finally:
        model.train(was_training)


@torch.no_grad()
def reconstruction_errors(model, images: torch.Tensor) -> dict[str, float]:
    r"""Reconstruction :math:`\hat x` = decode(encode(x)) against x: ``mse`` (per pixel) and
    ``bce`` (binary cross-entropy, nats per image, :math:`\hat x` clipped to [1e-6, 1-1e-6])."""
    with isolated_params():
        xhat = torch.cat([model.decode(model.encode(x)) for x in images.split(4096)])
    mse = ((xhat - images) ** 2).mean()
    p = xhat.clamp(1e-6, 1 - 1e-6)
    bce = -(images * p.log() + (1 - images) * (1 - p).log()).sum(-1).mean()
    return {"mse": float(mse), "bce": float(bce)}


@torch.no_grad()
def responsibilities(model, images: torch.Tensor) -> torch.Tensor | None:
    r""":math:`p(k \mid x)` over mixture components, ``(N, K)``: the finite mixture's exact
    posterior, or a mixture prior's :math:`p(k \mid z = m(x))` at the code of x. ``None``
    for a single-component prior."""
    with isolated_params():
        if model.mixture_size() < 2:
            return None
        return torch.cat([model.log_responsibilities(x).exp() for x in images.split(1024)])


#: a mixture component of K counts as in use while it holds at least this share of an even share
#: (1/K) of the responsibility mass: a tenth, so 1% for K = 10 and 0.02% for K = 500. One rule for
#: training's ``val_components_used`` and ``evaluate``'s report.
COMPONENT_SHARE = 0.1


def component_usage(resp: torch.Tensor, share: float = COMPONENT_SHARE) -> dict:
    r"""How the posterior responsibility mass :math:`\bar r_k = \frac1N \sum_x p(k|x)` spreads:
    ``components_used``, the components with :math:`\bar r_k \ge` ``share`` / K (``threshold``, a
    tenth of an even share by default, so that K evenly used components all count whatever K is), and
    the mass's entropy (nats; its exp, ``usage_perplexity``, is the effective number of components)."""
    mass = resp.double().mean(0)
    entropy = float(-(mass * mass.clamp_min(1e-300).log()).sum())
    threshold = share / resp.shape[1]
    return {
        "num_components": int(resp.shape[1]),
        "components_used": int((mass >= threshold).sum()),
        "threshold": threshold,
        "usage_entropy": entropy,
        "usage_perplexity": math.exp(entropy),
    }


def cluster_scores(labels: torch.Tensor, assign: torch.Tensor, num_components: int) -> dict:
    """Cluster accuracy and NMI of component assignments against labels.

    Accuracy maps components to classes to maximise agreement: one-to-one by
    ``scipy.optimize.linear_sum_assignment`` when K <= classes; when K > classes several
    components may share a class, and the optimal many-to-one map gives each component its
    majority class.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import normalized_mutual_info_score

    y = labels.cpu().numpy()
    a = assign.cpu().numpy()
    classes = np.unique(y)
    table = np.zeros((num_components, len(classes)), dtype=np.int64)
    np.add.at(table, (a, np.searchsorted(classes, y)), 1)
    if num_components <= len(classes):
        rows, cols = linear_sum_assignment(-table)
        correct = table[rows, cols].sum()
    else:
        correct = table.max(1).sum()
    return {"cluster_accuracy": float(correct / len(y)), "nmi": float(normalized_mutual_info_score(y, a))}




def _is_scores(model, images, first_index, *, num_samples, chunk_size, batch_size, seed, progress) -> dict:
    est = estimate_log_px(model, images, num_samples, chunk_size=chunk_size, batch_size=batch_size, diagnostics=True,
                          progress=progress, seed=seed, first_index=first_index)
    return {"log_px": est.log_px, "elbo": est.elbo, "recon": est.recon, "kl": est.kl, "pareto_k": est.pareto_k,
            "ess": est.ess}


def _ais_scores(model, images, first_index, *, seed, progress, **options) -> dict:
    from .ais import ais_log_px

    r = ais_log_px(model, images, seed=seed if seed is not None else 0, first_index=first_index, progress=progress,
                   **options)
    return {"log_px": r.log_px, "ess": r.ess, "acceptance": r.acceptance}


def _quadrature_scores(model, images, first_index, *, progress, resolution) -> dict:
    from .quadrature import quadrature_log_px

    return {"log_px": quadrature_log_px(model, images, resolution=resolution, progress=progress)}


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``(lo, hi)``: the contiguous share of ``n`` examples that process ``rank`` of ``world`` scores
    (empty for some processes when there are fewer examples than processes)."""
    return n * rank // world, n * (rank + 1) // world


def _sharded(fn, images: torch.Tensor, shard: tuple[int, int] | None):
    """``fn(images, first_index)`` (a dict of per-example CPU tensors) over all images, or, with
    ``shard = (rank, world)`` in a ``torch.distributed`` group, over this process's contiguous
    share, gathered on rank 0 (other ranks get ``None``). Per-example random streams make the
    result the same as one process's. Every process joins the gather, a process with no share
    and one whose share was refused (``ValueError``) included, and all of them raise the refusal:
    a process that left early would leave the others waiting for it forever."""
    if shard is None or shard[1] == 1:
        return fn(images, 0)
    import torch.distributed as tdist

    rank, world = shard
    lo, hi = shard_bounds(images.shape[0], rank, world)
    error, part = None, None
    if hi > lo:
        try:
            part = {k: v.cpu() for k, v in fn(images[lo:hi], lo).items()}
        except ValueError as e:
            error = str(e)
    parts = [None] * world
    tdist.all_gather_object(parts, (error, part))
    errors = [e for e, _ in parts if e]
    if errors:
        raise ValueError(errors[0])
    if rank != 0:
        return None
    parts = [p for _, p in parts if p is not None]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _checked_ais_options(options) -> dict:
    from .ais import AIS_OPTIONS

    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"ais_options must be a dict with keys among {', '.join(AIS_OPTIONS)} "
                         f"(got {type(options).__name__})")
    unknown = sorted(set(options) - set(AIS_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"ais_options: unknown key {unknown_keys(unknown, AIS_OPTIONS)}; the keys are "
                         f"{', '.join(AIS_OPTIONS)}")
    return dict(options)


def _checked_labels(labels, n: int) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels: expected a torch tensor of shape ({n},), got {type(labels).__name__}; convert "
                         "with torch.as_tensor(y)")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels: {n} images but labels of shape {tuple(labels.shape)}; give one label per image")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be whole numbers, got {labels.dtype}; use labels.long()")
    return labels


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor | None = None, *, num_samples: int = 1000,
             chunk_size: int | None = None, batch_size: int = 100, progress: bool = False,
             seed: int | None = None, per_example: bool = False, estimator: str = "is",
             ais_options: dict | None = None, quadrature_resolution: int = 256,
             shard: tuple[int, int] | None = None) -> dict | None:
    r"""The full report of a model on one split (means over examples, nats per example).

    For a VAE: ``elbo``, ``iwae`` (the importance-weighted bound at K = ``num_samples``), their
    standard errors over examples, ``kl``, ``recon``, Pareto :math:`\hat k` and ESS summaries,
    active units, and ``log_px`` with ``log_px_se`` from ``estimator``: ``"is"`` (the IWAE
    estimate itself), ``"ais"`` (annealed importance sampling, :func:`pyrovae.ais.ais_log_px`
    with ``ais_options``; its ESS over chains and HMC acceptance rate under ``report["ais"]``) or
    ``"quadrature"`` (2-D latents, :func:`pyrovae.quadrature.quadrature_log_px`); ``is_log_px``
    keeps the importance-sampling estimate beside the other two. For every kind:
    ``exact_log_px`` where a closed form exists (linear-Gaussian VAE, PPCA, finite mixture),
    reconstruction ``mse``/``bce``, and for mixtures component usage and, with labels,
    cluster accuracy and NMI. ``seed``: per-example noise streams (see :func:`estimate_log_px`).
    ``per_example``: also ``report["per_example"]``, lists of each example's ``log_px``,
    ``elbo``, ``kl`` (and the estimator's diagnostics), for paired comparisons between models.
    ``shard = (rank, world)``: inside a ``torch.distributed`` group, each process scores its
    share of the examples; rank 0 gathers them and returns the report, the others ``None``.

    Examples
    --------
    An untrained model (its numbers mean nothing) on five binarised test images:

    >>> from pyrovae import TrainConfig, build_model, estimate_log_px, evaluate, load_dataset
    >>> from pyrovae.data import static_binarized
    >>> model = build_model(TrainConfig(hidden_dims=(32,), latent_dim=2), data_dim=784)
    >>> x = static_binarized(load_dataset("mnist5k", "test")).images[:5]
    >>> report = evaluate(model, x, num_samples=100, seed=0)
    >>> report["num_examples"], report["num_samples"], report["estimator"]
    (5, 100, 'is')
    >>> {"elbo", "iwae", "log_px", "log_px_se", "kl", "recon", "pareto_k", "active_units"} <= set(report)
    True
    >>> est = estimate_log_px(model, x, num_samples=100, seed=0)  # the same seed: the same estimate
    >>> abs(report["log_px"] - float(est.log_px.mean())) < 1e-9
    True
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"--estimator must be one of {', '.join(ESTIMATORS)} (got {estimator!r})")
    images = check_images(model, images)
    labels = _checked_labels(labels, images.shape[0])
    num_samples = whole(num_samples, "--num-samples")
    seed = check_seed(seed)
    ais_options = _checked_ais_options(ais_options)
    if model.has_posterior and estimator == "ais":  # on every example, before any is scored (or sharded)
        from .ais import _check_ais

        _check_ais(model, images.shape[0], **ais_options)
    elif model.has_posterior and estimator == "quadrature":
        from .quadrature import _check_quadrature

        _check_quadrature(model, images, quadrature_resolution)
    if shard is not None:
        rank, world = shard
        whole(world, "shard's world size")
        if not 0 <= rank < world:
            raise ValueError(f"shard = (rank, world) needs 0 <= rank < world (got {shard})")
    report: dict = {"model": model.kind, "num_examples": int(images.shape[0])}
    was_training = model.training
    model.eval()
    try:
        if model.has_posterior:
            def work(imgs, first):
                out = {f"is_{k}": v for k, v in _is_scores(model, imgs, first, num_samples=num_samples,
                                                            chunk_size=chunk_size, batch_size=batch_size,
                                                            seed=seed, progress=progress).items()}
                if estimator == "ais":
                    out.update({f"ais_{k}": v for k, v in _ais_scores(model, imgs, first, seed=seed,
                                                                       progress=progress,
                                                                       **(ais_options or {})).items()})
                elif estimator == "quadrature":
                    out["quadrature_log_px"] = _quadrature_scores(model, imgs, first, progress=progress,
                                                                  resolution=quadrature_resolution)["log_px"]
                return out

            per = _sharded(work, images, shard)
            if per is None:
                return None
            est = Estimate(num_samples, per["is_log_px"], per["is_elbo"], per["is_recon"], per["is_kl"],
                           per["is_pareto_k"], per["is_ess"])
            s = est.summary()
            report.update({k: s[k] for k in ("num_samples", "elbo", "elbo_se", "log_px", "log_px_se", "kl", "recon",
                                             "pareto_k", "ess")})
            report["iwae"] = report["is_log_px"] = s["log_px"]
            report["estimator"] = estimator
            chosen = per[f"{estimator}_log_px"]
            report["log_px"], report["log_px_se"] = _mean(chosen), _se(chosen)
            if estimator == "ais":
                r = per["ais_ess"]
                report["ais"] = {**(ais_options or {}), "ess": {"mean": _mean(r), "min": float(r.min())},
                                 "acceptance": _mean(per["ais_acceptance"])}
            if estimator == "quadrature":
                report["quadrature"] = {"resolution": quadrature_resolution}
            if per_example:
                report["per_example"] = {"log_px": chosen.tolist(), "elbo": est.elbo.tolist(), "kl": est.kl.tolist(),
                                         "pareto_k": est.pareto_k.tolist()}
                if estimator != "is":
                    report["per_example"]["is_log_px"] = est.log_px.tolist()
                if estimator == "ais":
                    report["per_example"].update({"ais_ess": per["ais_ess"].tolist(),
                                                  "acceptance": per["ais_acceptance"].tolist()})
            by_layer = active_units_by_layer(model, images)
            report["active_units"] = sum(n for n, _ in by_layer.values())
            report["latent_dim"] = sum(v.numel() for _, v in by_layer.values())
            if len(by_layer) > 1:
                report["active_units_by_layer"] = {site: [n, v.numel()] for site, (n, v) in by_layer.items()}
        else:
            if estimator != "is":
                why = "has its log p(x) in closed form" if model.exact_marginal() is not None else "has no guide"
                raise ValueError(f"--estimator {estimator} needs a VAE; a {model.kind} model {why}")
            if shard is not None and shard[0] != 0:
                return None
            scores = split_scores(model, images)
            report.update({k: v for k, v in scores.items() if v is not None})
            if model.enumerated:  # its bound is log p(x) itself
                report["log_px"] = report["elbo"]
                if per_example:
                    with isolated_params():
                        t = model.score_terms(images)
                    report["per_example"] = {"log_px": t["elbo"].tolist(), "elbo": t["elbo"].tolist(),
                                             "kl": t["kl"].tolist()}
        marginal = model.exact_marginal()
        if marginal is not None:
            with isolated_params():
                lp = torch.cat([marginal.log_prob(x) for x in images.split(1024)])
            report["exact_log_px"], report["exact_log_px_se"] = _mean(lp), _se(lp)
        report.update(reconstruction_errors(model, images))
        resp = responsibilities(model, images)
        if resp is not None:
            report["components"] = component_usage(resp)
            if labels is not None:
                report["components"].update(cluster_scores(labels, resp.argmax(1), resp.shape[1]))
    finally:
        model.train(was_training)
    return report


def format_report(report: dict) -> str:
    """One aligned table of a report, for the terminal."""
    examples = report.get("num_examples")
    if report.get("picked"):
        examples = f"{examples} ({report['picked']})"
    rows = [("model", report.get("model")), ("examples", examples)]
    if report.get("weights") == "averaged":
        rows.append(("weights", "averaged (the run's --ema; --weights raw for the optimiser's)"))
    if "num_samples" in report:
        rows.append(("importance samples K", report["num_samples"]))

    def pm(key):
        if report.get(key) is None:
            return None
        se = report.get(f"{key}_se")
        return f"{report[key]:.3f}" + (f" ± {se:.3f}" if se is not None and not math.isnan(se) else "")

    k = report.get("num_samples")
    estimator = report.get("estimator", "is")
    what = {"is": f"importance sampling, K={k}", "quadrature": "quadrature"}.get(estimator)
    if estimator == "ais":
        a = report["ais"]
        what = (f"AIS, T={a.get('num_steps')}, {a.get('num_chains')} chains, L={a.get('leapfrog')}, "
                f"from the {a.get('init', 'guide')}")
    rows += [
        ("ELBO (nats)", pm("elbo")),
        (f"IWAE bound, K={k}", f"{report['iwae']:.3f}" if "iwae" in report else None),
        (f"log p(x) estimate ({what})" if "num_samples" in report else "log p(x)", pm("log_px")),
        ("log p(x) exact (closed form)", pm("exact_log_px")),
        ("KL(q(z|x) || p(z))", f"{report['kl']:.3f}" if report.get("kl") is not None else None),
        ("reconstruction E_q log p(x|z)", f"{report['recon']:.3f}" if report.get("recon") is not None else None),
        ("reconstruction MSE per pixel", f"{report['mse']:.5f}" if "mse" in report else None),
        ("reconstruction BCE per image", f"{report['bce']:.3f}" if "bce" in report else None),
    ]
    if "pareto_k" in report:
        pk = report["pareto_k"]
        if pk.get("undefined"):
            rows.append(("Pareto k-hat", f"undefined ({pk['undefined']})"))
        else:
            defined = pk.get("num_defined", report["num_examples"])
            rows.append(("Pareto k-hat > 0.7", f"{pk['num_above_0.7']} of {defined} "
                                               f"({100 * pk['frac_above_0.7']:.1f}%), max {pk['max']:.2f}"))
        rows.append(("ESS of weights (mean, min)", f"{report['ess']['mean']:.1f}, {report['ess']['min']:.1f}"))
    if "ais" in report:
        a = report["ais"]
        rows.append(("AIS: ESS of chain weights (mean, min)", f"{a['ess']['mean']:.2f}, {a['ess']['min']:.2f} "
                                                               f"of {a.get('num_chains')}"))
        rows.append(("AIS: HMC acceptance rate", f"{a['acceptance']:.3f}"))
    if "active_units" in report:
        rows.append(("active units", f"{report['active_units']} of {report['latent_dim']}"))
        for site, (n, d) in report.get("active_units_by_layer", {}).items():
            rows.append((f"  in layer {site}", f"{n} of {d}"))
    if "components" in report:
        c = report["components"]
        rows.append((f"components used (mass >= {COMPONENT_SHARE:g}/K)",
                     f"{c['components_used']} of {c['num_components']}"))
        rows.append(("usage entropy (nats)", f"{c['usage_entropy']:.3f} (perplexity {c['usage_perplexity']:.1f})"))
        if "cluster_accuracy" in c:
            rows.append(("cluster accuracy", f"{c['cluster_accuracy']:.4f}"))
            rows.append(("NMI", f"{c['nmi']:.4f}"))
    rows = [(a, b) for a, b in rows if b is not None]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
