r"""log p(x) by importance sampling with the guide as proposal, and its diagnostics.

For each example, with :math:`z_k \sim q(z|x)`, :math:`k = 1..K`,

.. math::

    \log w_k = \log p(x, z_k) - \log q(z_k \mid x), \qquad
    \widehat{\log p(x)} = \operatorname{logsumexp}_k \log w_k - \log K .

Its expectation is the importance-weighted bound :math:`\mathcal{L}_K` (Burda et al. 2015),
which equals the ELBO at :math:`K = 1`, does not decrease with :math:`K` and tends to
:math:`\log p(x)`; with the exact posterior as proposal every :math:`w_k = p(x)`.

Every log density comes from the model's and guide's own Pyro traces (``site["fn"]``), so
any prior or likelihood works here unchanged. Sampling is vectorised over samples and
examples by a ``pyro.plate``; memory is bounded by ``chunk_size`` (samples x examples
decoded at once) whatever :math:`K` is, and exactly :math:`K` samples are drawn.

Reliability: the Pareto :math:`\hat k` of each example's weights (PSIS, Vehtari et al. 2015,
from arviz) — above 0.7 the estimate is not to be trusted — and the effective sample size
:math:`(\sum_k w_k)^2 / \sum_k w_k^2`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

__all__ = ["log_weight_terms", "estimate_log_px", "Estimate", "active_units", "pareto_k"]

#: the PSIS threshold above which an importance-sampling estimate is unreliable
PARETO_K_THRESHOLD = 0.7


@contextlib.contextmanager
def isolated_params():
    """Run Pyro code with an empty, private param store (restored afterwards), so that
    models never see each other's parameters through Pyro's global store."""
    with pyro.get_param_store().scope():
        yield


def log_weight_terms(model, x: torch.Tensor, num_samples: int) -> dict[str, torch.Tensor]:
    r"""Draw ``num_samples`` codes per example from the guide and score them.

    Returns ``log_lik`` = :math:`\log p(x|z_k)`, ``log_prior`` = :math:`\log p(z_k)` and
    ``log_q`` = :math:`\log q(z_k|x)`, each of shape ``(num_samples, B)``, read from the
    traces of ``model.guide`` and of ``model.model`` replayed against it.
    """
    with pyro.plate("samples", num_samples, dim=-2):
        guide_trace = poutine.trace(model.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    shape = (num_samples, x.shape[0])
    terms = {"log_lik": x.new_zeros(shape), "log_prior": x.new_zeros(shape), "log_q": x.new_zeros(shape)}
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            key = "log_lik" if site["is_observed"] else "log_prior"
            terms[key] = terms[key] + site["fn"].log_prob(site["value"])
    for site in guide_trace.nodes.values():
        if site["type"] == "sample":
            terms["log_q"] = terms["log_q"] + site["fn"].log_prob(site["value"])
    return terms


@dataclass
class Estimate:
    """Per-example results, each a float64 tensor of shape ``(N,)`` on the CPU.

    ``log_px`` is the importance-sampling estimate with ``num_samples`` samples (the IWAE
    bound at K in expectation); ``elbo = recon - kl``, all three averaged over the same
    samples. ``pareto_k`` and ``ess`` are ``None`` when diagnostics were not asked for.
    """

    num_samples: int
    log_px: torch.Tensor
    elbo: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    pareto_k: torch.Tensor | None = None
    ess: torch.Tensor | None = None

    @staticmethod
    def _mean_se(v: torch.Tensor) -> tuple[float, float]:
        n = v.numel()
        se = float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
        return float(v.mean()), se

    def summary(self) -> dict:
        """Means over examples, with standard errors over examples (``*_se``)."""
        out: dict = {"num_examples": int(self.log_px.numel()), "num_samples": self.num_samples}
        for name in ("elbo", "log_px", "recon", "kl"):
            out[name], out[f"{name}_se"] = self._mean_se(getattr(self, name))
        if self.pareto_k is not None:
            k = self.pareto_k
            above = int((k > PARETO_K_THRESHOLD).sum())
            out["pareto_k"] = {
                "mean": float(k.mean()),
                "max": float(k.max()),
                "num_above_0.7": above,
                "frac_above_0.7": above / k.numel(),
            }
            out["ess"] = {"mean": float(self.ess.mean()), "min": float(self.ess.min())}
        return out


def pareto_k(log_w: np.ndarray) -> np.ndarray:
    """Pareto k-hat per row of ``log_w`` ``(B, K)``, from arviz's PSIS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arviz 0.2x announces its refactor on import
        import arviz
    with warnings.catch_warnings():
        # arviz warns when k-hat is large; the caller reports the fraction instead
        warnings.simplefilter("ignore", UserWarning)
        _, k = arviz.psislw(np.asarray(log_w, dtype=np.float64))
    return np.atleast_1d(np.asarray(k, dtype=np.float64))


@torch.no_grad()
def estimate_log_px(
    model,
    images: torch.Tensor,
    num_samples: int = 5000,
    *,
    chunk_size: int = 32768,
    batch_size: int = 100,
    diagnostics: bool = True,
    progress: bool = False,
) -> Estimate:
    r"""Importance-sampling estimate of :math:`\log p(x)` for every row of ``images``.

    Parameters
    ----------
    model : a model with ``model(x)``/``guide(x)`` over a continuous ``"z"`` (``VAE``).
    images : ``(N, D)`` tensor, on the model's device, already binarised if need be.
    num_samples : K, exactly; importance samples per example.
    chunk_size : at most this many (sample, example) pairs are decoded at once; this,
        not K, bounds memory.
    batch_size : examples per pass (lowered to ``chunk_size`` if larger).
    diagnostics : also compute Pareto :math:`\hat k` (PSIS, arviz) and the ESS per example.
    progress : show a tqdm bar over examples.

    Returns
    -------
    :class:`Estimate` with per-example ``log_px`` (nats, higher is better), ``elbo``,
    ``recon`` = :math:`\mathbb{E}_q \log p(x|z)`, ``kl`` = :math:`\mathbb{E}_q[\log q - \log p(z)]`.
    """
    if num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1 (got {num_samples})")
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be at least 1 (got {chunk_size})")
    if not getattr(model, "has_posterior", False):
        raise ValueError(f"a {getattr(model, 'kind', type(model).__name__)} model has no q(z|x) density to sample from")
    n = images.shape[0]
    batch = max(1, min(batch_size, chunk_size, n))
    per_chunk = max(1, chunk_size // batch)  # samples per pass
    out = {k: [] for k in ("log_px", "elbo", "recon", "kl", "pareto_k", "ess")}
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"log p(x), K={num_samples}", unit="ex", disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    try:
        with isolated_params(), pyro.validation_enabled(False):
            for x in images.split(batch):
                parts = [log_weight_terms(model, x, min(per_chunk, num_samples - s)) for s in range(0, num_samples, per_chunk)]
                terms = {k: torch.cat([p[k] for p in parts]).double() for k in parts[0]}  # (K, B)
                log_w = terms["log_lik"] + terms["log_prior"] - terms["log_q"]
                lse = torch.logsumexp(log_w, 0)
                out["log_px"].append(lse - math.log(num_samples))
                out["elbo"].append(log_w.mean(0))
                out["recon"].append(terms["log_lik"].mean(0))
                out["kl"].append((terms["log_q"] - terms["log_prior"]).mean(0))
                if diagnostics:
                    out["ess"].append((2 * lse - torch.logsumexp(2 * log_w, 0)).exp())
                    if num_samples > 1:
                        out["pareto_k"].append(torch.from_numpy(pareto_k(log_w.T.cpu().numpy())))
                    else:
                        out["pareto_k"].append(torch.full((x.shape[0],), float("nan"), dtype=torch.float64))
                bar.update(x.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    cat = {k: torch.cat(v).cpu() if v else None for k, v in out.items()}
    return Estimate(num_samples, cat["log_px"], cat["elbo"], cat["recon"], cat["kl"], cat["pareto_k"], cat["ess"])


@torch.no_grad()
def active_units(model, images: torch.Tensor, threshold: float = 0.01, batch_size: int = 4096) -> tuple[int, torch.Tensor]:
    r"""Active latent dimensions (Burda et al. 2015): :math:`A_d = \mathrm{Cov}_x(\mathbb{E}_{q(z|x)}[z_d]) > 0.01`.

    Returns the count and the per-dimension variances.
    """
    codes = torch.cat([model.encode(x) for x in images.split(batch_size)]).double()
    var = codes.var(0, unbiased=True) if codes.shape[0] > 1 else torch.zeros(codes.shape[1], dtype=torch.float64)
    return int((var > threshold).sum()), var.cpu()
