r"""log p(x) by annealed importance sampling (AIS) with Hamiltonian Monte Carlo, and its
reverse run for bidirectional Monte Carlo (BDMC) bounds.

AIS (Neal 2001) moves C chains per example from a normalised start :math:`q_0(z)` (the
guide's Gaussian, or the prior) to the posterior :math:`p(z|x) \propto p(x, z)` through

.. math:: f_\beta(z) = q_0(z)^{1 - \beta}\, p(x, z)^{\beta}, \qquad 0 = \beta_0 < \beta_1 < \dots < \beta_T = 1,

with one HMC transition leaving :math:`f_{\beta_t}` invariant at each step. Each chain's
weight

.. math:: \log w = \sum_{t=1}^{T} (\beta_t - \beta_{t-1}) \big[\log p(x, z_{t-1}) - \log q_0(z_{t-1})\big]

has :math:`\mathbb{E}[w] = p(x)`, so :math:`\log \frac1C \sum_c w_c` is a stochastic lower bound
on :math:`\log p(x)` that tightens as T grows (Wu, Burda, Salakhutdinov & Grosse 2017, "On the
Quantitative Analysis of Decoder-Based Generative Models"). The schedule is sigmoidal
(their eq. 6): :math:`\tilde\beta_t = \sigma(\delta(2t/T - 1))`, rescaled to [0, 1], δ = 4.

BDMC (Grosse, Ghahramani & Adams 2015): on data simulated from the model, :math:`z^* \sim p(z)`,
:math:`x \sim p(x|z^*)`, the pair's :math:`z^*` is an exact posterior sample; AIS run backwards
from it (β from 1 to 0) gives weights with :math:`\mathbb{E}[w] = 1/p(x)`, hence a stochastic
*upper* bound :math:`-\log \frac1C \sum_c w_c`. The gap between the two bounds bounds the error
of either; a T that closes it on simulated data is a T to trust on real data.

HMC: momenta :math:`r \sim \mathcal{N}(0, M)` with a diagonal mass :math:`M = \mathrm{diag}(1/s^2)`
from the guide's scales at the start (a fixed preconditioner), L leapfrog steps, a
Metropolis correction; each example's step size moves by ±2% after every transition towards an
acceptance rate of 0.65 (Wu et al.'s rule). All chains of all examples in a batch advance
together: one batched gradient of :math:`\log f_\beta` per leapfrog step, from the model's own Pyro
trace (:func:`pyrovae.marginal.log_joint`), so any prior, likelihood and number of latent sites
work. A flow guide contributes its Gaussian base as :math:`q_0` (its density at arbitrary z would
need the flow inverted at every step). Randomness comes from per-example streams
(:class:`~pyrovae.marginal.ExampleNoise`): an example's estimate does not depend on the batch
it was in or on the process that computed it. On a GPU nothing is read back to the host
between steps.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites

from .config import most_raised, refuse_if_too_big, whole
from .marginal import ExampleNoise, check_images, isolated_params, log_joint, pass_bytes, scoring

__all__ = ["AISResult", "ais_log_px", "sigmoidal_schedule", "simulate", "bdmc", "format_bdmc", "TARGET_ACCEPTANCE"]

#: the acceptance rate each example's step size is adapted towards
TARGET_ACCEPTANCE = 0.65
#: the step size's multiplicative change after each transition
_ADAPT = 1.02
_STEP_RANGE = (1e-4, 2.0)
#: the settings of :func:`ais_log_px` that ``evaluate(ais_options=...)`` passes on to it
AIS_OPTIONS = ("num_steps", "num_chains", "leapfrog", "init", "step_size", "batch_size")
#: the names errors give AIS's settings: ``evaluate --estimator ais``'s flags, and ``pyrovae bdmc``'s
_EVALUATE_FLAGS = {"num_steps": "--ais-steps", "num_chains": "--ais-chains", "leapfrog": "--ais-leapfrog",
                   "init": "--ais-init", "batch_size": "--batch-size", "command": "--estimator ais"}
_BDMC_FLAGS = {"num_steps": "--steps", "num_chains": "--chains", "leapfrog": "--leapfrog", "init": "--init",
               "batch_size": "--batch-size", "command": "pyrovae bdmc"}


def sigmoidal_schedule(num_steps: int, delta: float = 4.0, dtype=torch.float64) -> torch.Tensor:
    r""":math:`\beta_0 = 0 < \dots < \beta_T = 1`: :math:`\sigma(\delta(2t/T - 1))` rescaled to [0, 1]
    (Wu et al. 2017, eq. 6): small steps near both ends, where :math:`f_\beta` changes fastest."""
    if num_steps < 1:
        raise ValueError(f"--ais-steps must be at least 1 (got {num_steps})")
    t = torch.arange(num_steps + 1, dtype=dtype) / num_steps
    s = torch.sigmoid(delta * (2 * t - 1))
    beta = (s - s[0]) / (s[-1] - s[0])
    beta[0], beta[-1] = 0.0, 1.0
    return beta


@dataclass
class AISResult:
    r"""Per-example results (float64, CPU, shape ``(N,)``).

    ``log_px``: the AIS estimate, log-mean-exp over chains of the log-weights (forward: a
    stochastic lower bound; ``reverse=True``: the upper bound ``-log mean w``). ``ess``: the
    effective sample size of the C chain weights, :math:`(\sum w)^2 / \sum w^2`. ``acceptance``:
    the mean HMC acceptance rate over chains and transitions; ``step_size``: the final step size.
    """

    num_steps: int
    num_chains: int
    log_px: torch.Tensor
    ess: torch.Tensor
    acceptance: torch.Tensor
    step_size: torch.Tensor
    reverse: bool = False

    def summary(self) -> dict:
        n = self.log_px.numel()
        se = float(self.log_px.std()) / math.sqrt(n) if n > 1 else math.nan
        return {"estimator": "ais", "num_steps": self.num_steps, "num_chains": self.num_chains,
                "num_examples": n, "log_px": float(self.log_px.mean()), "log_px_se": se,
                "ess": {"mean": float(self.ess.mean()), "min": float(self.ess.min())},
                "acceptance": float(self.acceptance.mean())}


class _FlowBases(Messenger):
    """Replace every flow site of the guide by its Gaussian base (q0 of AIS)."""

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        while isinstance(fn, torch.distributions.TransformedDistribution):
            fn = fn.base_dist
        msg["fn"] = fn


class ChainStart:
    """q0 for one batch: draws (from the per-example noise), its log density at any z, and the
    per-site scales used as the HMC mass."""

    def __init__(self, model, x: torch.Tensor, chains: int, init: str, noise: ExampleNoise):
        self.model, self.x, self.chains, self.init = model, x, chains, init
        with noise, pyro.plate("samples", chains, dim=-2), _FlowBases():
            trace = prune_subsample_sites(poutine.trace(model.guide).get_trace(x))
        self.sites = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
        # the mass: the guide's scale of each site at the start (fixed for the whole run)
        self.scale = {n: _scale_of(trace.nodes[n]["fn"]).detach().expand(trace.nodes[n]["value"].shape).clone()
                      for n in self.sites}
        # one site: q0 does not depend on z, keep its distribution; several: re-trace per z
        self._fn = trace.nodes[self.sites[0]]["fn"] if len(self.sites) == 1 else None
        if init == "guide":
            self.z = {n: trace.nodes[n]["value"].detach() for n in self.sites}
        else:
            with noise, pyro.plate("samples", chains, dim=-2), poutine.block(hide=["x"]):
                prior_trace = prune_subsample_sites(poutine.trace(model.model).get_trace(x))
            self.z = {n: prior_trace.nodes[n]["value"].detach() for n in self.sites}

    def log_q0(self, z: dict, log_prior: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q_0(z)`, ``(C, B)``; for the prior start it is ``log_prior`` itself."""
        if self.init == "prior":
            return log_prior
        if self._fn is not None:
            return self._fn.log_prob(z[self.sites[0]])
        with pyro.plate("samples", self.chains, dim=-2), _FlowBases():
            guide = poutine.condition(self.model.guide, data=z)
            trace = prune_subsample_sites(poutine.trace(guide).get_trace(self.x))
        return sum(trace.nodes[n]["fn"].log_prob(trace.nodes[n]["value"]) for n in self.sites)


def _scale_of(fn) -> torch.Tensor:
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn.scale if hasattr(fn, "scale") else torch.ones(fn.batch_shape + fn.event_shape)


@dataclass
class _State:
    r"""Where the chains are: z per site, and at z the two log densities (``(C, B)``) and their
    gradients, from which :math:`\log f_\beta` and its gradient follow for any β."""

    z: dict
    log_pxz: torch.Tensor
    log_q0: torch.Tensor
    g_pxz: dict
    g_q0: dict

    def log_f(self, beta) -> torch.Tensor:
        return self.log_q0 + beta * (self.log_pxz - self.log_q0)

    def grad(self, beta) -> dict:
        return {n: self.g_q0[n] + beta * (self.g_pxz[n] - self.g_q0[n]) for n in self.z}

    def where(self, keep: torch.Tensor, other: "_State") -> "_State":
        """This state where ``keep`` (``(C, B)``), else ``other``."""
        def pick(a, b):
            return torch.where(keep.view(*keep.shape, *[1] * (a.dim() - 2)), a, b)
        return _State({n: pick(self.z[n], other.z[n]) for n in self.z}, pick(self.log_pxz, other.log_pxz),
                      pick(self.log_q0, other.log_q0), {n: pick(self.g_pxz[n], other.g_pxz[n]) for n in self.z},
                      {n: pick(self.g_q0[n], other.g_q0[n]) for n in self.z})


def chain_state(model, x, z: dict, start: ChainStart) -> _State:
    """Both log densities at z and their gradients (two backward passes; the second, through the
    decoder, is the expensive one)."""
    z = {n: v.detach().requires_grad_() for n, v in z.items()}
    with torch.enable_grad():
        log_prior, log_lik = log_joint(model, x, z, split=True)
        log_q0 = start.log_q0(z, log_prior)
        g_q0 = torch.autograd.grad(log_q0.sum(), list(z.values()), retain_graph=True, allow_unused=True)
        log_pxz = log_prior + log_lik
        g_pxz = torch.autograd.grad(log_pxz.sum(), list(z.values()))
    zeros = [torch.zeros_like(v) for v in z.values()]
    return _State({n: v.detach() for n, v in z.items()}, log_pxz.detach(), log_q0.detach(),
                  dict(zip(z, g_pxz)), dict(zip(z, [g if g is not None else o for g, o in zip(g_q0, zeros)])))


def hmc_move(model, x, state: _State, beta, start: ChainStart, step: torch.Tensor, leapfrog: int, noise: ExampleNoise,
         chains: int) -> tuple[_State, torch.Tensor]:
    r"""One HMC transition leaving :math:`f_\beta` invariant, every chain at once; ``step`` is
    ``(B,)``. Returns the new state and each example's acceptance rate over its chains."""
    z = state.z
    mass_inv = {n: start.scale[n] ** 2 for n in z}  # M^{-1} = diag(s^2)
    eps = {n: step.view(1, -1, *[1] * (v.dim() - 2)) for n, v in z.items()}  # (1, B, 1...)
    r = {n: noise.take(f"momentum:{n}", chains, v.shape[2:]).to(v.dtype) / start.scale[n] for n, v in z.items()}

    def kinetic(r):
        return sum((0.5 * r[n] ** 2 * mass_inv[n]).flatten(2).sum(-1) for n in z)  # (C, B)

    h0 = state.log_f(beta) - kinetic(r)
    new, grad = state, state.grad(beta)
    for _ in range(leapfrog):  # the gradient of log f is minus the gradient of the potential
        r = {n: r[n] + 0.5 * eps[n] * grad[n] for n in z}
        new = chain_state(model, x, {n: new.z[n] + eps[n] * mass_inv[n] * r[n] for n in z}, start)
        grad = new.grad(beta)
        r = {n: r[n] + 0.5 * eps[n] * grad[n] for n in z}
    h1 = new.log_f(beta) - kinetic(r)
    u = torch.special.ndtr(noise.take("accept", chains, torch.Size()).to(h0.dtype))  # uniform, from a normal
    accept = torch.log(u) < torch.nan_to_num(h1 - h0, nan=-math.inf)  # (C, B); a NaN proposal is rejected
    return new.where(accept, state), accept.to(h0.dtype).mean(0)


def ais_log_px(model, images: torch.Tensor, *, num_steps: int = 500, num_chains: int = 4, leapfrog: int = 5,
               init: str = "guide", step_size: float = 0.2, seed: int = 0, batch_size: int = 100,
               first_index: int = 0, progress: bool = False, start_values: dict | None = None) -> AISResult:
    r"""AIS estimates of :math:`\log p(x)` for every row of ``images``, ``num_chains`` chains each.

    Parameters
    ----------
    model : a model with ``model(x)``/``guide(x)`` (``VAE``): any prior, likelihood, guide, layers.
    images : ``(N, D)`` on the model's device, binarised if the likelihood needs it.
    num_steps : T, the number of intermediate distributions (and HMC transitions).
    num_chains : C, independent chains per example; the estimate is their log-mean-exp.
    leapfrog : L, leapfrog steps per HMC transition (one batched gradient each).
    init : ``"guide"`` (start from q(z|x), the flow's Gaussian base for a flow guide) or ``"prior"``.
    step_size : the initial leapfrog step in units of the guide's scale; adapted per example.
    seed, first_index : per-example random streams (see :class:`~pyrovae.marginal.ExampleNoise`).
    start_values : ``{site: (N, *event)}`` exact posterior draws: run AIS in reverse from them
        (β from 1 to 0) and return the BDMC upper bound instead (every chain starts at the draw).

    Returns
    -------
    :class:`AISResult`. Cost: about ``N * C * T * L`` decoder forward and backward passes.
    """
    _check_ais(model, images.shape[0] if isinstance(images, torch.Tensor) else 0, _EVALUATE_FLAGS,
               num_steps=num_steps, num_chains=num_chains, leapfrog=leapfrog, init=init, batch_size=batch_size,
               step_size=step_size)
    images = check_images(model, images)
    betas = sigmoidal_schedule(num_steps).to(images.device)
    reverse = start_values is not None
    from tqdm.auto import tqdm

    out = {k: [] for k in ("log_px", "ess", "acceptance", "step_size")}
    bar = tqdm(total=images.shape[0] * num_steps, desc=f"AIS{' (reverse)' if reverse else ''}, T={num_steps}",
               unit="ex·step", unit_scale=True, disable=not progress, leave=False)
    with scoring(model, bar):
        for i, x in enumerate(images.split(batch_size)):
            b = x.shape[0]
            noise = ExampleNoise(seed, first_index + i * batch_size, b, x.device)
            with torch.no_grad():
                start = ChainStart(model, x, num_chains, init, noise)
            z = start.z
            if reverse:
                lo = i * batch_size
                z = {n: v[lo: lo + b].to(x.device).unsqueeze(0).expand(num_chains, b, *v.shape[1:]).clone()
                     for n, v in start_values.items()}
            state = chain_state(model, x, z, start)
            step = torch.full((b,), float(step_size), dtype=x.dtype, device=x.device)
            log_w = torch.zeros(num_chains, b, dtype=torch.float64, device=x.device)
            acc_sum = torch.zeros(b, dtype=torch.float64, device=x.device)
            # forward: weight f_t / f_{t-1} at z, then move under f_t (none after the last);
            # reverse: weight f_{t-1} / f_t at z, then move under f_{t-1} (none at f_0 = q0)
            levels = betas.flip(0) if reverse else betas
            for t in range(1, num_steps + 1):
                beta = levels[t]
                log_w += (beta - levels[t - 1]) * (state.log_pxz - state.log_q0).double()
                if t < num_steps:
                    state, acc = hmc_move(model, x, state, beta.to(x.dtype), start, step, leapfrog, noise,
                                      num_chains)
                    acc_sum += acc.double()
                    step = torch.where(acc > TARGET_ACCEPTANCE, step * _ADAPT, step / _ADAPT).clamp(*_STEP_RANGE)
                bar.update(b)
            lse, lse2 = torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0)
            est = lse - math.log(num_chains)
            out["log_px"].append(-est if reverse else est)
            out["ess"].append((2 * lse - lse2).exp())
            out["acceptance"].append(acc_sum / max(1, num_steps - 1))
            out["step_size"].append(step.double())
    cat = {k: torch.cat(v).cpu() for k, v in out.items()}
    return AISResult(num_steps, num_chains, cat["log_px"], cat["ess"], cat["acceptance"], cat["step_size"], reverse)


def _check_ais(model, num_examples: int, flags: dict[str, str] = _EVALUATE_FLAGS, **options) -> None:
    """Refuse, naming the command's own ``flags``, settings of :func:`ais_log_px` (``options``, the
    others at their defaults) that AIS cannot run with on ``num_examples`` examples: counts that are
    not whole numbers of at least 1, an unknown start, a model without a guide, and chains and steps
    whose tensors would not fit in memory (one batch's chains through the networks with their
    gradients, and the schedule), before anything is allocated or computed."""
    defaults = {k: v.default for k, v in inspect.signature(ais_log_px).parameters.items()}
    o = {k: options.get(k, defaults[k]) for k in AIS_OPTIONS}
    num_steps, num_chains, batch_size = (whole(o[k], flags[k]) for k in ("num_steps", "num_chains", "batch_size"))
    whole(o["leapfrog"], flags["leapfrog"])
    if o["init"] not in ("guide", "prior"):
        raise ValueError(f"{flags['init']} must be guide or prior (got {o['init']!r})")
    step_size = o["step_size"]
    if isinstance(step_size, bool) or not (isinstance(step_size, (int, float)) and 0 < step_size < math.inf):
        raise ValueError(f"step_size must be a positive number (got {step_size!r})")
    if not getattr(model, "has_posterior", False):
        raise ValueError(f"{flags['command']} needs a VAE (a model with a guide); a "
                         f"{getattr(model, 'kind', type(model).__name__)} model has none")
    rows = max(1, min(batch_size, num_examples))
    chains_or_batch = most_raised({flags["num_chains"]: (num_chains, defaults["num_chains"]),
                                   flags["batch_size"]: (rows, defaults["batch_size"])})
    refuse_if_too_big({chains_or_batch: num_chains * rows * pass_bytes(model),
                       flags["num_steps"]: 32.0 * (num_steps + 1)}, "AIS")


@torch.no_grad()
def simulate(model, num_examples: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""``num_examples`` pairs from the model itself: :math:`z^* \sim p(z)`, :math:`x \sim p(x|z^*)`.
    Returns ``(x (N, D), {site: z* (N, *event)})``; each :math:`z^*` is an exact draw from
    :math:`p(z|x)` of its x (what reverse AIS starts from)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with isolated_params(), pyro.plate("samples", num_examples, dim=-2):
            probe = torch.zeros(1, _data_dim(model), device=_device(model))
            trace = prune_subsample_sites(poutine.trace(model.model).get_trace(probe))
        x = trace.nodes["x"]["fn"].sample()  # (N, 1, D)
        z = {n: s["value"][:, 0] for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
        return x[:, 0], z
    finally:
        torch.random.set_rng_state(gen_state)


def _data_dim(model) -> int:
    return model.decoder.linear_maps[-1].out_features if hasattr(model.decoder, "linear_maps") else model.data_dim


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_bdmc(model, num_examples, steps: list, num_chains, leapfrog, init: str, batch_size) -> None:
    """:func:`bdmc`'s settings checked as :func:`_check_ais` checks AIS's, with bdmc's flag names, and the
    simulated examples (drawn all at once) checked against memory."""
    whole(num_examples, "--num-examples")
    if not steps:
        raise ValueError("--steps needs at least one number of AIS steps, such as 10,100,1000")
    for t in steps:
        _check_ais(model, num_examples, _BDMC_FLAGS, num_steps=t, num_chains=num_chains, leapfrog=leapfrog,
                   init=init, batch_size=batch_size)
    refuse_if_too_big({"--num-examples": num_examples * pass_bytes(model)}, "simulating the examples")


def bdmc(model, *, num_examples: int = 100, steps=(10, 100, 1000), num_chains: int = 4, leapfrog: int = 5,
         init: str = "guide", seed: int = 0, batch_size: int = 100, progress: bool = False) -> dict:
    r"""Bidirectional Monte Carlo on ``num_examples`` examples simulated from the model: for each
    T in ``steps``, forward AIS (a stochastic lower bound on :math:`\log p(x)`) and reverse AIS
    from the simulated :math:`z^*` (a stochastic upper bound), with their means, standard errors
    and the gap upper − lower (mean, its standard error, largest per example)."""
    import time

    steps = list(steps)
    _check_bdmc(model, num_examples, steps, num_chains, leapfrog, init, batch_size)
    x, z_star = simulate(model, num_examples, seed=seed)
    rows = []
    for t in steps:
        t0 = time.perf_counter()
        common = dict(num_steps=t, num_chains=num_chains, leapfrog=leapfrog, init=init, batch_size=batch_size,
                      progress=progress)
        lower = ais_log_px(model, x, seed=seed, **common)
        upper = ais_log_px(model, x, seed=seed + 1, start_values=z_star, **common)
        gap = upper.log_px - lower.log_px

        rows.append({"num_steps": t, "lower": float(lower.log_px.mean()), "lower_se": _se(lower.log_px),
                     "upper": float(upper.log_px.mean()), "upper_se": _se(upper.log_px),
                     "gap": float(gap.mean()), "gap_se": _se(gap), "gap_max": float(gap.max()),
                     "acceptance_forward": float(lower.acceptance.mean()),
                     "acceptance_reverse": float(upper.acceptance.mean()),
                     "seconds": time.perf_counter() - t0,
                     "per_example": {"lower": lower.log_px.tolist(), "upper": upper.log_px.tolist()}})
    return {"num_examples": num_examples, "num_chains": num_chains, "leapfrog": leapfrog, "init": init,
            "seed": seed, "rows": rows}


def _se(v: torch.Tensor) -> float:
    return float(v.std()) / math.sqrt(v.numel()) if v.numel() > 1 else math.nan


def format_bdmc(result: dict) -> str:
    """The BDMC table for the terminal."""
    lines = [f"BDMC on {result['num_examples']} examples simulated from the model; {result['num_chains']} chains, "
             f"L={result['leapfrog']}, start: {result['init']}",
             "",
             f"{'T':>7}  {'lower (forward AIS)':>22}  {'upper (reverse AIS)':>22}  {'gap (mean ± se)':>18}  "
             f"{'max gap':>8}  {'accept':>6}  {'seconds':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['num_steps']:>7}  {r['lower']:>13.3f} ± {r['lower_se']:<6.3f}  "
                     f"{r['upper']:>13.3f} ± {r['upper_se']:<6.3f}  {r['gap']:>9.3f} ± {r['gap_se']:<6.3f}  "
                     f"{r['gap_max']:>8.3f}  {r['acceptance_forward']:>6.2f}  {r['seconds']:>8.1f}")
    return "\n".join(lines)
