r"""log p(x) of a model with a 2-D latent, exactly (to quadrature error) on an adaptive grid.

.. math:: p(x) = \int_{\mathbb{R}^2} p(z)\, p(x \mid z)\, dz \approx \sum_{g} p(z_g)\, p(x \mid z_g)\, \Delta^2

over a square grid of spacing :math:`\Delta` (the midpoint rule). The integrand is smooth and
decays like a Gaussian, so once the grid covers every point where it is within
``margin`` nats of its maximum the rule converges faster than any power of :math:`\Delta`
(as the trapezoid rule does for rapidly decaying functions); two resolutions agreeing to
1e-3 nats is the check (``tests/test_quadrature.py``).

The grid adapts to each example in two stages: a coarse grid over the prior's box (every
component's mean ± 8 standard deviations) and one around q(z|x) (mean ± 12 standard
deviations) locate where :math:`\log p(x, z)` is within ``margin`` nats of its largest value;
the fine grid then covers that box, widened by two coarse cells on every side. Any decoder,
likelihood or prior works: :math:`\log p(x, z)` comes from the model's own trace
(:func:`pyrovae.marginal.log_joint`). Cost: ``resolution ** 2`` decoder passes per example.
"""

from __future__ import annotations

import inspect
import math

import torch

from .config import refuse_if_too_big, whole
from .marginal import check_images, default_chunk_size, latent_sites, log_joint, scoring

__all__ = ["quadrature_log_px", "QUADRATURE_RESOLUTION"]

#: points per side of the fine grid, by default
QUADRATURE_RESOLUTION = 256
#: points per side of the coarse grids that locate the posterior
_COARSE = 96


def _check_quadrature(model, images: torch.Tensor, resolution, batch_size=None) -> str:
    """Refuse a resolution that is not a whole number of at least 8, a model without one 2-D latent,
    and a fine grid that would not fit in memory (each batch's points, float64 and the model's
    float32, and log p(x, z) at each, are kept whole); return the latent site's name."""
    resolution = whole(resolution, "--quadrature-resolution", at_least=8)
    if batch_size is None:
        batch_size = inspect.signature(quadrature_log_px).parameters["batch_size"].default
    batch_size = whole(batch_size, "batch_size")
    site = _check_2d(model, images)
    refuse_if_too_big({"--quadrature-resolution": 40.0 * resolution**2 * min(batch_size, images.shape[0])},
                      "the quadrature grid")
    return site


def _check_2d(model, images: torch.Tensor) -> str:
    if not getattr(model, "has_posterior", False):
        raise ValueError(f"--estimator quadrature integrates over a VAE's latent; a {model.kind} model has none")
    sites = latent_sites(model, images)
    if len(sites) != 1 or tuple(next(iter(sites.values()))) != (2,):
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in sites.items())
        raise ValueError(f"--estimator quadrature needs a model with one 2-D latent (--latent-dim 2); this one has "
                         f"{shapes}: use --estimator is or ais")
    return next(iter(sites))


def _grid(lo: torch.Tensor, hi: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of an n x n grid over each box [lo, hi] (lo, hi: (B, 2)): points (n*n, B, 2)
    and the log of each cell's area (B,)."""
    t = (torch.arange(n, dtype=lo.dtype, device=lo.device) + 0.5) / n  # (n,)
    step = (hi - lo) / n  # (B, 2)
    a = lo[None, :, 0] + t[:, None] * (hi - lo)[None, :, 0]  # (n, B)
    b = lo[None, :, 1] + t[:, None] * (hi - lo)[None, :, 1]
    points = torch.stack([a[:, None, :].expand(n, n, -1), b[None, :, :].expand(n, n, -1)], -1)  # (n, n, B, 2)
    return points.reshape(n * n, -1, 2), step.log().sum(-1)


def _log_joint_on(model, site: str, x: torch.Tensor, points: torch.Tensor, chunk: int) -> torch.Tensor:
    """:math:`\\log p(x, z)` at ``points`` (G, B, 2), G split into passes of at most ``chunk`` rows per example."""
    per = max(1, chunk // x.shape[0])
    return torch.cat([log_joint(model, x, {site: p}) for p in points.split(per)]).double()  # (G, B)


@torch.no_grad()
def quadrature_log_px(model, images: torch.Tensor, *, resolution: int = QUADRATURE_RESOLUTION,
                      margin: float = 40.0, batch_size: int = 16, chunk_size: int | None = None,
                      progress: bool = False) -> torch.Tensor:
    r""":math:`\log p(x)` of every row of ``images`` by quadrature over the 2-D latent, float64, ``(N,)``.

    Parameters
    ----------
    model : a model with one 2-D latent site (``--latent-dim 2``), any prior, likelihood, guide.
    images : ``(N, D)``, on the model's device, binarised if the likelihood needs it.
    resolution : points per side of each example's fine grid (``resolution ** 2`` decoder passes).
    margin : the fine grid covers where :math:`\log p(x, z)` is within this many nats of its
        largest value on the coarse grids (beyond it the integrand adds less than
        :math:`e^{-\text{margin}}` per cell).
    batch_size : examples per pass; ``chunk_size``: at most this many (point, example) pairs decoded at
        once (default: 4 times the importance sampler's, :func:`~pyrovae.marginal.default_chunk_size`).
    """
    images = check_images(model, images)
    site = _check_quadrature(model, images, resolution, batch_size)
    chunk_size = whole(chunk_size, "chunk_size") if chunk_size is not None else 4 * default_chunk_size(images.device)
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(total=images.shape[0], desc=f"log p(x), quadrature {resolution}²", unit="ex", disable=not progress,
               leave=False)
    with scoring(model, bar):
        if model.prior.is_mixture:
            _, loc, scale = model.prior.mixture()  # (K, 2)
            prior_lo = (loc - 8 * scale).amin(0).double()
            prior_hi = (loc + 8 * scale).amax(0).double()
        else:  # any other prior: the box around its central 99.98% (from samples), widened by half
            z = model.prior.dist().sample((20000,)).double()
            lo_q, mid, hi_q = (torch.quantile(z, q, dim=0) for q in (1e-4, 0.5, 1 - 1e-4))
            prior_lo, prior_hi = mid - 1.5 * (mid - lo_q), mid + 1.5 * (hi_q - mid)
        for x in images.split(batch_size):
            b = x.shape[0]
            q_loc = model.encode(x).double()
            q_scale = model.encoder(x)[1].exp().double()  # the base Gaussian's, with a flow guide
            boxes = [(prior_lo.expand(b, 2), prior_hi.expand(b, 2)),
                     (q_loc - 12 * q_scale.clamp_min(1e-3), q_loc + 12 * q_scale.clamp_min(1e-3))]
            lo = torch.full((b, 2), math.inf, dtype=torch.float64, device=x.device)
            hi = -lo
            best = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
            coarse = []
            for box_lo, box_hi in boxes:
                pts, _ = _grid(box_lo, box_hi, _COARSE)
                lj = _log_joint_on(model, site, x, pts.to(x.dtype), chunk_size)  # (G, B)
                coarse.append((pts, lj, (box_hi - box_lo) / _COARSE))
                best = torch.maximum(best, lj.amax(0))
            for pts, lj, cell in coarse:
                keep = lj > (best - margin)  # (G, B)
                inf = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
                lo = torch.minimum(lo, torch.where(keep[..., None], pts, inf).amin(0) - 2 * cell)
                hi = torch.maximum(hi, torch.where(keep[..., None], pts, -inf).amax(0) + 2 * cell)
            pts, log_cell = _grid(lo, hi, resolution)
            lj = _log_joint_on(model, site, x, pts.to(x.dtype), chunk_size)
            out.append(torch.logsumexp(lj, 0) + log_cell)
            bar.update(b)
    return torch.cat(out).cpu()
