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
decoded at once) whatever :math:`K` is, and exactly :math:`K` samples are drawn. The guide
is traced once per batch of examples and later draws come from its site's distribution,
so the encoder does not run again for every chunk; log densities stay float32 and are
reduced (log-sum-exp, means) in float64 across chunks.

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
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from .config import memory_bytes, refuse_if_too_big, whole

# the helpers other modules of the package import (check_seed, pass_bytes, nonfinite_tensors, latent_sites,
# estimator_pace) stay importable but are not public: the API reference documents __all__ only
__all__ = ["log_weight_terms", "estimate_log_px", "Estimate", "active_units", "pareto_k", "default_chunk_size",
           "ExampleNoise", "derive_seed", "log_joint", "active_units_by_layer", "check_images", "isolated_params",
           "PARETO_K_THRESHOLD"]

#: the PSIS threshold above which an importance-sampling estimate is unreliable
PARETO_K_THRESHOLD = 0.7
#: log-weights of one example spanning less than this (nats) count as equal: no tail for PSIS
EQUAL_LOG_WEIGHTS = 1e-3
#: the fewest importance samples K for which PSIS fits a tail: arviz takes the largest
#: ceil(min(K / 5, 3 sqrt(K))) weights as the tail and needs at least 5 of them
PSIS_MIN_SAMPLES = next(k for k in range(1, 100) if math.ceil(min(k / 5, 3 * math.sqrt(k))) > 4)


@contextlib.contextmanager
def isolated_params():
    """Run Pyro code with an empty, private param store (restored afterwards), so that
    models never see each other's parameters through Pyro's global store."""
    with pyro.get_param_store().scope():
        yield


def data_dim_of(model) -> int:
    """Values per example a model was built for."""
    for get in (lambda m: m.encoder.in_dim, lambda m: m.mean.numel(), lambda m: m.params.shape[1]):
        try:
            return int(get(model))
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__} is not a pyrovae model")


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> str | None:
    """The floating-point tensors of ``tensors`` (a state dict) holding NaN or infinite values, as
    ``"name"`` or ``"name and N more"``; ``None`` when every value is finite."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return f"{bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}" if bad else None


def pass_bytes(model) -> float:
    """About the bytes one (sample, example) pair takes in a pass through ``model`` and back (AIS
    takes gradients): four bytes for the data and for every output of a linear or convolutional
    layer (a stride-2 convolution's: a quarter of its channels per pixel), four times over (values,
    gradients, temporaries). The memory checks of the estimators multiply it by their settings."""
    d = data_dim_of(model)
    width = d
    for m in model.modules():
        if isinstance(m, nn.Linear):
            width += m.out_features
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            width += m.out_channels * d / 4
    return 4.0 * 4 * width


def check_seed(seed) -> int | None:
    """``seed`` (``None``: no seed) as the command line takes ``--seed``, or ``ValueError``."""
    return None if seed is None else whole(seed, "--seed", at_least=0)


def check_images(model, images, what: str = "images") -> torch.Tensor:
    """Return ``images`` in the model's floating-point type (float64 data becomes float32), or
    raise ``ValueError`` with one line naming the problem and the fix unless ``images`` is a
    floating-point ``(N, D)`` tensor of finite values with N >= 1, the model's D, on the model's
    device, and binary where the model's likelihood is Bernoulli, and the model's own weights are
    finite (NaN weights would make every estimate NaN)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what}: expected a torch tensor of shape (N, D), got {type(images).__name__}; convert "
                         "with torch.as_tensor(x, dtype=torch.float32)")
    if images.dim() != 2:
        raise ValueError(f"{what}: expected one example per row, shape (N, D), got shape {tuple(images.shape)}; "
                         "a single image x is x.reshape(1, -1)")
    if images.shape[0] == 0:
        raise ValueError(f"{what}: no examples (shape {tuple(images.shape)}); give at least one row")
    if not images.is_floating_point():
        raise ValueError(f"{what}: values must be floating point, got {images.dtype}; use images.float()")
    d = data_dim_of(model)
    if images.shape[1] != d:
        raise ValueError(f"{what}: {images.shape[1]} values per example, the model was trained on {d}; give data "
                         "of the model's shape")
    device = next((p.device for p in model.parameters()), next((b.device for b in model.buffers()), images.device))
    if images.device != device:
        raise ValueError(f"{what} are on {images.device}, the model on {device}: move one of them with .to()")
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise ValueError(f"the model's weights hold NaN or infinite values ({bad}), so every estimate would be NaN: "
                         "load them again from a checkpoint (pyrovae.load_run) or train again")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    images = images.to(dtype)
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what}: {int((~torch.isfinite(images)).sum())} values are NaN or infinite; clean the data")
    if getattr(model, "takes_binary", False):  # (a model of another library may lack the flag)
        if not bool(((images == 0) | (images == 1)).all()):
            raise ValueError(f"{what}: the model's likelihood is Bernoulli but the values are not all 0 or 1; "
                             "binarise them first (pyrovae.data.static_binarized, or torch.bernoulli(x))")
    return images


@contextlib.contextmanager
def scoring(model, bar=None):
    """How the estimators score a model: in eval mode (no dropout), with a private param store,
    Pyro's argument checks off and the prior's components computed once; all restored, and the
    progress ``bar`` closed, afterwards."""
    was_training = model.training
    model.eval()
    try:
        with isolated_params(), pyro.validation_enabled(False), frozen_prior(model):
            yield
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)


def frozen_prior(model) -> contextlib.AbstractContextManager:
    """The model's prior with its components computed once (:meth:`~pyrovae.priors.Prior.frozen`),
    for evaluation; a model without a prior module is left as it is."""
    prior = getattr(model, "prior", None)
    return prior.frozen() if hasattr(prior, "frozen") else contextlib.nullcontext()


def log_weight_terms(model, x: torch.Tensor, num_samples: int) -> dict[str, torch.Tensor]:
    r"""Draw ``num_samples`` codes per example from the guide and score them.

    Returns ``log_lik`` = :math:`\log p(x|z_k)`, ``log_prior`` = :math:`\log p(z_k)` and
    ``log_q`` = :math:`\log q(z_k|x)`, each of shape ``(num_samples, B)``, read from the
    traces of ``model.guide`` and of ``model.model`` replayed against it.
    """
    return score_traces(model, x, trace_guide(model, x, num_samples), num_samples)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (FNV-1a; stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def trace_guide(model, x: torch.Tensor, num_samples: int, noise: ExampleNoise | None = None):
    """The guide's trace with ``num_samples`` draws per example (an outer plate at dim -2),
    its noise from ``noise`` where given."""
    with (noise or contextlib.nullcontext()), pyro.plate("samples", num_samples, dim=-2):
        return prune_subsample_sites(poutine.trace(model.guide).get_trace(x))


def score_traces(model, x: torch.Tensor, guide_trace, num_samples: int) -> dict[str, torch.Tensor]:
    """Replay the model against ``guide_trace`` and read every log density from the two traces."""
    with pyro.plate("samples", num_samples, dim=-2):
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    model_trace = prune_subsample_sites(model_trace)
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


def log_joint(model, x: torch.Tensor, values: dict[str, torch.Tensor], split: bool = False):
    r""":math:`\log p(x, z)` of every example at given latent values, read from the model's own
    Pyro trace (any prior, likelihood or number of latent sites): ``values`` maps each latent
    site to a tensor ``(S, B, *event)``, and the result is ``(S, B)`` (with ``split``: the pair
    :math:`(\log p(z), \log p(x|z))`). Differentiable in the values (AIS takes its gradient);
    the scoring function the estimators share."""
    num_samples = next(iter(values.values())).shape[0]
    with pyro.plate("samples", num_samples, dim=-2):
        trace = poutine.trace(poutine.condition(model.model, data=values)).get_trace(x)
    trace = prune_subsample_sites(trace)
    log_prior = log_lik = x.new_zeros((num_samples, x.shape[0]))
    for site in trace.nodes.values():
        if site["type"] == "sample":
            lp = site["fn"].log_prob(site["value"])
            if site["name"] in values:
                log_prior = log_prior + lp
            else:
                log_lik = log_lik + lp
    return (log_prior, log_lik) if split else log_prior + log_lik


def latent_sites(model, x: torch.Tensor) -> dict[str, torch.Size]:
    """The model's latent sample sites and their event shapes (from one trace of the guide)."""
    with isolated_params(), torch.no_grad():
        trace = prune_subsample_sites(poutine.trace(model.guide).get_trace(x[:1]))
    return {name: site["fn"].event_shape for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]}


def reparameterized_draw(fn, eps: torch.Tensor) -> torch.Tensor | None:
    r"""A draw of ``fn`` made from standard normal noise ``eps`` (its full sample shape):
    :math:`\mu + \sigma \epsilon` for a Normal, then the transforms of a
    ``TransformedDistribution`` applied in order (which fills their caches, so that the
    draw's log density is then read, not inverted). ``None`` for any other distribution."""
    if isinstance(fn, dist.TransformedDistribution):
        z = reparameterized_draw(fn.base_dist, eps)
        if z is not None:
            for t in fn.transforms:
                z = t(z)
        return z
    if isinstance(fn, dist.Independent):
        return reparameterized_draw(fn.base_dist, eps)
    if isinstance(fn, dist.Normal):
        return fn.loc + fn.scale * eps
    return None


class ExampleNoise(Messenger):
    """Noise for the guide's sample sites from one random stream per example, so that an
    example's draws do not depend on how examples are batched, how draws are chunked, or
    how examples are sharded over processes: with the same seed, ``--chunk-size``,
    ``--batch-size`` and ``torchrun`` give the same estimate, example by example.

    Example ``i`` (its index in the whole set) and site ``n`` (order of appearance) draw from
    a generator seeded with ``derive_seed(seed, i, n)``, in blocks of :data:`NOISE_BLOCK`
    samples, so that a stream yields the same numbers whatever the number of samples taken
    per pass. As a Pyro messenger (entered outside the samples plate) it makes every
    Gaussian or flow site's draw from that noise; other sites sample as usual.
    """

    def __init__(self, seed: int, first: int, count: int, device):
        super().__init__()
        self.seed, self.first, self.count, self.device = int(seed), int(first), int(count), torch.device(device)
        self._streams: dict[str, list[torch.Generator]] = {}
        self._left: dict[str, torch.Tensor] = {}  # site -> (count, L, *event): drawn, not yet used

    def take(self, site: str, num_samples: int, event_shape: torch.Size) -> torch.Tensor:
        """The next ``num_samples`` standard normal draws of every example, ``(S, count, *event)``."""
        if site not in self._streams:
            n = len(self._streams)
            self._streams[site] = [torch.Generator(device=self.device).manual_seed(
                derive_seed(self.seed, self.first + j, n)) for j in range(self.count)]
            self._left[site] = torch.empty((self.count, 0, *event_shape), device=self.device)
        left = self._left[site]
        while left.shape[1] < num_samples:
            block = torch.stack([torch.randn((NOISE_BLOCK, *event_shape), generator=g, device=self.device)
                                 for g in self._streams[site]])
            left = torch.cat([left, block], 1)
        self._left[site] = left[:, num_samples:]
        return left[:, :num_samples].transpose(0, 1)

    def draw(self, site: str, fn) -> torch.Tensor | None:
        """A draw of the site's (plate-expanded) distribution ``fn`` from this noise."""
        shape = fn.batch_shape + fn.event_shape  # (S, B, *event)
        if len(fn.batch_shape) != 2 or fn.batch_shape[1] != self.count:
            return None
        return reparameterized_draw(fn, self.take(site, fn.batch_shape[0], fn.event_shape).reshape(shape))

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        if not isinstance(msg["fn"], torch.distributions.Distribution):
            return  # the samples plate's own subsample site
        value = self.draw(msg["name"], msg["fn"])
        if value is not None:
            msg["value"] = value


#: samples per block of an example's noise stream (see :class:`ExampleNoise`)
NOISE_BLOCK = 256


class _Proposal:
    """Draws from q(z|x) for one batch of examples, ``num_samples`` per example at a time.

    The guide is traced once per batch. When it has a single sample site (the VAE's
    ``"z"``), later draws come from that site's own distribution object (already expanded
    over the samples plate), so the encoder runs once per batch, not once per chunk. A guide
    with several sites, whose later sites may depend on earlier draws, is traced afresh for
    every draw. With ``noise`` every draw is made from it (seeded, per example).
    """

    def __init__(self, model, x: torch.Tensor, num_samples: int, noise: ExampleNoise | None = None):
        self.model, self.x, self.num_samples, self.noise = model, x, num_samples, noise
        self.trace = trace_guide(model, x, num_samples, noise)
        sites = [name for name, site in self.trace.nodes.items() if site["type"] == "sample"]
        self.site = sites[0] if len(sites) == 1 and not self.trace.nodes[sites[0]]["is_observed"] else None
        self.fresh = True  # the traced draw is still unused

    def draw(self, num_samples: int):
        """A guide trace holding ``num_samples`` new draws per example."""
        if num_samples == self.num_samples and self.fresh:
            self.fresh = False
            return self.trace
        if num_samples != self.num_samples or self.site is None:
            return trace_guide(self.model, self.x, num_samples, self.noise)
        site = self.trace.nodes[self.site]
        value = self.noise.draw(self.site, site["fn"]) if self.noise is not None else None
        trace = self.trace.copy()
        trace.nodes[self.site] = {**site, "value": site["fn"]() if value is None else value}  # (S, B, D)
        return trace


@dataclass
class Estimate:
    """Per-example results, each a float64 tensor of shape ``(N,)`` on the CPU.

    ``log_px`` is the importance-sampling estimate with ``num_samples`` samples (the IWAE
    bound at K in expectation); ``elbo = recon - kl``, all three averaged over the same
    samples. ``pareto_k`` and ``ess`` are ``None`` when diagnostics were not asked for;
    ``pareto_k`` is ``nan`` where it is undefined (K = 1, or all K weights equal: see :func:`pareto_k`).
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
            defined = k[k.isfinite()]
            above = int((defined > PARETO_K_THRESHOLD).sum())
            # undefined k-hats (nan) are left out of every figure; with none defined, every figure is None
            out["pareto_k"] = {
                "mean": float(defined.mean()) if defined.numel() else None,
                "max": float(defined.max()) if defined.numel() else None,
                "num_above_0.7": above if defined.numel() else None,
                "frac_above_0.7": above / defined.numel() if defined.numel() else None,
                "num_defined": int(defined.numel()),
            }
            if not defined.numel():
                out["pareto_k"]["undefined"] = (
                    f"K too small for PSIS; need at least {PSIS_MIN_SAMPLES}" if self.num_samples < PSIS_MIN_SAMPLES
                    else "every example's importance weights are equal (no tail to fit)")
            out["ess"] = {"mean": float(self.ess.mean()), "min": float(self.ess.min())}
        return out


def pareto_k(log_w: np.ndarray) -> np.ndarray:
    r"""Pareto :math:`\hat k` per row of ``log_w`` ``(B, K)``, from arviz's PSIS (Vehtari et al.
    2015, "Pareto Smoothed Importance Sampling", arXiv:1507.02646).

    A row whose K log-weights span less than :data:`EQUAL_LOG_WEIGHTS` nats (the proposal
    is the exact posterior, up to float32 rounding of the log densities) has no tail to
    fit: arviz returns ``inf`` for exactly equal weights, and a k-hat of the rounding noise
    otherwise, either of which would read as "unreliable". It is ``nan`` (undefined) here,
    as is every row when K is below :data:`PSIS_MIN_SAMPLES` (arviz's ``inf``: too few weights
    in the tail to fit) and any other row arviz cannot fit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arviz 0.2x announces its refactor on import
        import arviz
    log_w = np.atleast_2d(np.asarray(log_w, dtype=np.float64))
    with warnings.catch_warnings():
        # arviz warns when k-hat is large; the caller reports the fraction instead
        warnings.simplefilter("ignore", UserWarning)
        # its generalised Pareto fit overflows exp() to inf on far-spread weights, by design (1/inf = 0)
        warnings.filterwarnings("ignore", message="overflow encountered in exp", category=RuntimeWarning)
        _, k = arviz.psislw(log_w)
    k = np.atleast_1d(np.asarray(k, dtype=np.float64)).copy()
    k[np.ptp(log_w, axis=1) < EQUAL_LOG_WEIGHTS] = np.nan
    k[~np.isfinite(k)] = np.nan
    return k


def estimator_pace(model, images: torch.Tensor) -> tuple[float, float]:
    """How long :func:`estimate_log_px` takes here on ``model``: ``(seconds per (sample, example) pair,
    seconds per example)``, so that K samples on n examples take about ``n * (K * a + b)``. Measured the way
    the real pass runs (diagnostics on, PSIS included): after an untimed warm-up call, whose one-off set-up
    would read as a slow pace (about 3x for the two-level model), two timed calls on up to 16 of ``images``
    at K = 64 and K = 512 give the cost per sample and the cost per example that does not grow with K."""
    import time

    probe = images[:16]
    estimate_log_px(model, images[:2], 32, diagnostics=True, seed=0)
    seconds = []
    for k in (64, 512):
        t0 = time.perf_counter()
        estimate_log_px(model, probe, k, diagnostics=True, seed=0)
        seconds.append(time.perf_counter() - t0)
    n = probe.shape[0]
    per_pair = max((seconds[1] - seconds[0]) / (n * (512 - 64)), seconds[1] / (n * 512) / 10, 1e-12)
    per_example = max(seconds[0] / n - 64 * per_pair, 0.0)
    return per_pair, per_example


def default_chunk_size(device: torch.device | str) -> int:
    """(sample, example) pairs decoded at once when ``chunk_size`` is not given: 2048 per CPU
    thread torch uses, 65536 on a GPU.

    On a CPU the decoder's output for 2048 pairs (2048 x 784 float32, 6.4 MB) and the
    Bernoulli log density's temporaries (three or four more of that size) stay in a 32 MB
    last-level cache while the elementwise passes run over them. Larger chunks spill to
    memory: on one core of the development machine (CPU time, best of three, 784-400-50)
    the whole estimator ran at 41 GFLOP/s with 2048, 38 with 3072, 34 with 4096 and 17-24
    with 32768, against 75 for the decoder's matmuls alone. Every pass also pays about 1 ms
    of Pyro and Python, and with several threads a fork and join for each of its ~35 ops,
    so each thread gets 2048 pairs' work. A GPU wants large launches instead.
    ``experiments/bench_marginal.py`` sweeps chunk sizes on the machine it runs on.
    """
    if torch.device(device).type == "cuda":
        return 65536
    return 2048 * max(1, torch.get_num_threads())


#: at most this many log-weights (float64) are kept at once for PSIS, unless K alone is more
LOG_WEIGHT_BUDGET = 2**22


def pass_layout(num_examples: int, num_samples: int, chunk_size: int, batch_size: int,
                keep_log_w: bool) -> tuple[int, int]:
    """(examples per batch, samples per pass): ``b * s <= chunk_size``, ``b <= batch_size``,
    and ``b * K`` within :data:`LOG_WEIGHT_BUDGET` when all K log-weights are kept."""
    b = max(1, min(batch_size, chunk_size, num_examples))
    if keep_log_w:
        b = max(1, min(b, LOG_WEIGHT_BUDGET // num_samples))
    s = max(1, min(num_samples, chunk_size // b))
    return b, s


@torch.no_grad()
def estimate_log_px(
    model,
    images: torch.Tensor,
    num_samples: int = 5000,
    *,
    chunk_size: int | None = None,
    batch_size: int = 100,
    diagnostics: bool = True,
    progress: bool = False,
    seed: int | None = None,
    first_index: int = 0,
) -> Estimate:
    r"""Importance-sampling estimate of :math:`\log p(x)` for every row of ``images``.

    .. math::

        \widehat{\log p(x)} = \log \frac{1}{K} \sum_{k=1}^{K} w_k, \qquad
        \log w_k = \log p(x \mid z_k) + \log p(z_k) - \log q(z_k \mid x), \quad z_k \sim q(z \mid x),

    whose expectation is the importance-weighted bound :math:`\mathcal{L}_K \le \log p(x)`
    (Burda et al. 2015, "Importance Weighted Autoencoders", arXiv:1509.00519).

    Exactly K draws per example, made ``s`` per example at a time for ``b`` examples at once
    (``b * s <= chunk_size``): a ``pyro.plate`` vectorises each pass, a Python loop runs over
    passes only. The log-sum-exp is accumulated across passes in float64 from float32
    log densities, so memory is bounded by ``chunk_size`` whatever K is; with
    ``diagnostics`` the K log-weights of each example are also kept (PSIS needs all of
    them), at most :data:`LOG_WEIGHT_BUDGET` or K values at once.

    Parameters
    ----------
    model : a model with ``model(x)``/``guide(x)`` over a continuous ``"z"`` (``VAE``).
    images : ``(N, D)`` tensor, on the model's device, already binarised if need be.
    num_samples : K, exactly; importance samples per example.
    chunk_size : at most this many (sample, example) pairs are decoded at once; this,
        not K, bounds memory. Default :func:`default_chunk_size` of the images' device.
    batch_size : at most this many examples per pass (lowered to ``chunk_size`` if larger).
    diagnostics : also compute Pareto :math:`\hat k` (PSIS, Vehtari et al. 2015,
        arXiv:1507.02646, via arviz) and the effective sample size
        :math:`(\sum_k w_k)^2 / \sum_k w_k^2` per example.
    progress : show a tqdm bar over examples.
    seed : with a seed, every example's draws come from its own stream (:class:`ExampleNoise`),
        so that the estimate of each example is the same whatever ``chunk_size``,
        ``batch_size`` or sharding; ``None`` (default): torch's global generator.
    first_index : the index of ``images[0]`` in the whole set, which seeds its stream (for
        shards of a larger set).

    Returns
    -------
    :class:`Estimate` with per-example ``log_px`` (nats, higher is better), ``elbo``,
    ``recon`` = :math:`\mathbb{E}_q \log p(x|z)`, ``kl`` = :math:`\mathbb{E}_q[\log q - \log p(z)]`,
    the last three averaged over the same K draws.

    Examples
    --------
    An untrained model (its numbers mean nothing) on five binarised test images:

    >>> import torch
    >>> from pyrovae import TrainConfig, build_model, estimate_log_px, load_dataset
    >>> from pyrovae.data import static_binarized
    >>> model = build_model(TrainConfig(hidden_dims=(32,), latent_dim=2), data_dim=784)
    >>> x = static_binarized(load_dataset("mnist5k", "test")).images[:5]
    >>> est = estimate_log_px(model, x, num_samples=100, seed=0)
    >>> est.log_px.shape, est.pareto_k.shape  # one estimate and one k-hat per image
    (torch.Size([5]), torch.Size([5]))
    >>> bool((est.log_px >= est.elbo).all())  # log of the mean weight >= mean of the log weights
    True
    >>> again = estimate_log_px(model, x, num_samples=100, seed=0, chunk_size=30)  # other passes, same draws
    >>> torch.allclose(again.log_px, est.log_px)
    True
    """
    num_samples = whole(num_samples, "--num-samples")
    images = check_images(model, images)
    given_chunk = chunk_size is not None
    chunk_size = whole(chunk_size, "--chunk-size") if given_chunk else default_chunk_size(images.device)
    batch_size = whole(batch_size, "--batch-size")
    seed = check_seed(seed)
    first_index = whole(first_index, "first_index", at_least=0)
    if not getattr(model, "has_posterior", False):
        raise ValueError(f"a {getattr(model, 'kind', type(model).__name__)} model has no q(z|x) density to sample from")
    if diagnostics and num_samples * 8 > memory_bytes() / 4:
        raise ValueError(f"--num-samples {num_samples}: the Pareto k-hat of one example needs all its {num_samples} "
                         f"log-weights in memory ({num_samples * 8 / 2**30:.1f} GiB); use fewer samples")
    n, K = images.shape[0], num_samples
    keep_log_w = diagnostics and K > 1
    batch, per_pass = pass_layout(n, K, chunk_size, batch_size, keep_log_w)
    if given_chunk:  # (the default is sized for this machine)
        refuse_if_too_big({"--chunk-size": batch * per_pass * pass_bytes(model)}, "one pass of the estimator")
    out = {k: [] for k in ("log_px", "elbo", "recon", "kl", "pareto_k", "ess")}
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"log p(x), K={K}", unit="ex", disable=not progress, leave=False)
    with scoring(model, bar):
        for i, x in enumerate(images.split(batch)):
            b = x.shape[0]
            noise = None if seed is None else ExampleNoise(seed, first_index + i * batch, b, x.device)
            proposal = _Proposal(model, x, min(per_pass, K), noise)
            f64 = {"dtype": torch.float64, "device": x.device}
            lse = torch.full((b,), -math.inf, **f64)  # logsumexp_k log w_k so far
            lse2 = torch.full((b,), -math.inf, **f64)  # logsumexp_k 2 log w_k, for the ESS
            sums = {key: torch.zeros(b, **f64) for key in ("log_w", "log_lik", "kl")}
            log_w_all = torch.empty(K, b, **f64) if keep_log_w else None
            for start in range(0, K, per_pass):
                s = min(per_pass, K - start)
                terms = score_traces(model, x, proposal.draw(s), s)  # (s, b) float32 each
                log_w = (terms["log_lik"] + terms["log_prior"] - terms["log_q"]).double()
                lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
                lse2 = torch.logaddexp(lse2, torch.logsumexp(2 * log_w, 0))
                sums["log_w"] += log_w.sum(0)
                sums["log_lik"] += terms["log_lik"].double().sum(0)
                sums["kl"] += (terms["log_q"] - terms["log_prior"]).double().sum(0)
                if log_w_all is not None:
                    log_w_all[start : start + s] = log_w
            out["log_px"].append(lse - math.log(K))
            out["elbo"].append(sums["log_w"] / K)
            out["recon"].append(sums["log_lik"] / K)
            out["kl"].append(sums["kl"] / K)
            if diagnostics:
                out["ess"].append((2 * lse - lse2).exp())
                if log_w_all is not None:
                    out["pareto_k"].append(torch.from_numpy(pareto_k(log_w_all.T.cpu().numpy())))
                else:
                    out["pareto_k"].append(torch.full((b,), float("nan"), dtype=torch.float64))
            bar.update(b)
    cat = {k: torch.cat(v).cpu() if v else None for k, v in out.items()}
    return Estimate(num_samples, cat["log_px"], cat["elbo"], cat["recon"], cat["kl"], cat["pareto_k"], cat["ess"])


@torch.no_grad()
def active_units(model, images: torch.Tensor, threshold: float = 0.01,
                 batch_size: int = 4096) -> tuple[int, torch.Tensor]:
    r"""Active latent dimensions (Burda et al. 2015): :math:`A_d = \mathrm{Cov}_x(\mathbb{E}_{q(z|x)}[z_d]) > 0.01`,
    over every latent layer (:func:`active_units_by_layer` splits them).

    Returns the count and the per-dimension variances (layers concatenated, bottom up).
    """
    by_layer = active_units_by_layer(model, images, threshold, batch_size)
    return sum(n for n, _ in by_layer.values()), torch.cat([v for _, v in by_layer.values()])


@torch.no_grad()
def active_units_by_layer(model, images: torch.Tensor, threshold: float = 0.01,
                          batch_size: int = 4096) -> dict[str, tuple[int, torch.Tensor]]:
    """``{site: (active count, per-dimension variance of the code)}`` for every latent layer,
    bottom up, the code of each layer being its guide's mean (``encode_layers``)."""
    if hasattr(model, "encode_layers"):
        parts = [model.encode_layers(x) for x in images.split(batch_size)]
        codes = {site: torch.cat([p[site] for p in parts]).double() for site in parts[0]}
    else:
        codes = {"z": torch.cat([model.encode(x) for x in images.split(batch_size)]).double()}
    out = {}
    for site, c in codes.items():
        var = c.var(0, unbiased=True) if c.shape[0] > 1 else torch.zeros(c.shape[1], dtype=torch.float64)
        out[site] = (int((var > threshold).sum()), var.cpu())
    return out
