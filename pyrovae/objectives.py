r"""Objectives handed to ``pyro.infer.SVI``, and the optimiser.

- ``trace``: ``Trace_ELBO``, the ELBO of the notes with the KL estimated by sampling,

  .. math:: \mathcal{L} = \mathbb{E}_{q(z|x)}[\log p(x|z) + \log p(z) - \log q(z|x)].

- ``meanfield``: ``TraceMeanField_ELBO``, the same bound with the closed-form
  :math:`\mathrm{KL}(q(z|x) \,\|\, p(z))` where one exists (the notes' section 2).
- ``iwae``: ``RenyiELBO(alpha=0)``, the importance-weighted bound (Burda et al. 2015)

  .. math:: \mathcal{L}_K = \mathbb{E}\Big[\log \frac{1}{K} \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k|x)}\Big],

  with the log-sum-exp taken per example because every site sits in the ``"data"`` plate
  (checked against a direct computation from traces in ``tests/test_marginal.py``).
- ``iwae`` with ``--iwae-gradient dreg``: the same bound and the same gradient in expectation, with the
  guide's part estimated by the doubly reparameterised estimator (Tucker et al. 2019; see
  :class:`RecordedIWAEDReG`).
- ``trace`` with ``--free-bits λ`` (Kingma et al. 2016): the gradient comes from

  .. math:: \mathbb{E}_q[\log p(x|z)] - \textstyle\sum_g \max\big(\lambda_g, \overline{\mathrm{KL}}_g\big)

  where :math:`\overline{\mathrm{KL}}_g` is group g's sampled KL averaged over the batch: each latent
  dimension is a group with :math:`\lambda_g = \lambda` where q and p of its layer are both
  diagonal Gaussians (the KL then splits by dimension), each layer one group with
  :math:`\lambda_g = \lambda \cdot \dim` otherwise (a mixture prior does not split). A unit whose
  KL is below its floor gets no gradient pushing it further down, so it is not switched off
  early. The loss it reports is the true negative ELBO.
- the finite mixture uses ``TraceEnum_ELBO``: the component is summed out, the loss is
  :math:`-\log p(x)` exactly.

Every ELBO here records, detached and unscaled by KL warm-up, the reconstruction term and
the KL of each step from the same traces it differentiates, so the reported training ELBO
costs nothing extra and is never the warm-up-scaled one.
"""

from __future__ import annotations

import math
import warnings

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.distributed as tdist
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from pyro.optim import PyroOptim
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan

from .config import ELBOS
from .nets import FUSED_PARTS

__all__ = ["build_elbo", "Optimizer"]


class _Recorded:
    """Mixin for a Pyro ELBO: sums per step of log p(x|z) and of log q(z|x) - log p(z)."""

    def reset_terms(self) -> None:
        self._terms: dict[str, torch.Tensor] = {}

    def pop_terms(self) -> dict[str, torch.Tensor]:
        """Sums since the last call (averaged over particles), as 0-d tensors."""
        terms = getattr(self, "_terms", {})
        self.reset_terms()
        return terms

    def _get_traces(self, model, guide, args, kwargs):
        for model_trace, guide_trace in super()._get_traces(model, guide, args, kwargs):
            self._record(model_trace, guide_trace)
            yield model_trace, guide_trace

    @torch.no_grad()
    def _record(self, model_trace, guide_trace) -> None:
        recon = kl = 0.0
        latent = False
        for site in model_trace.nodes.values():
            if site["type"] != "sample" or site["mask"] is False:
                continue
            if site["is_observed"]:
                recon = recon + site["unscaled_log_prob"].sum()
            else:
                latent = True
                kl = kl - site["unscaled_log_prob"].sum()
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and site["mask"] is not False:
                kl = kl + site["unscaled_log_prob"].sum()
        terms = getattr(self, "_terms", None)
        if terms is None:
            self.reset_terms()
            terms = self._terms
        n = self.num_particles
        for key, value in (("recon", recon), ("kl", kl if latent else None)):
            if value is not None:
                terms[key] = terms.get(key, 0.0) + value / n


class RecordedTraceELBO(_Recorded, Trace_ELBO):
    """Pyro's ``Trace_ELBO`` (``--elbo trace``: the KL estimated by sampling) that also records, at
    every step, the reconstruction term and the KL of the traces it differentiates, detached and
    unscaled by KL warm-up; ``pop_terms()`` returns their sums since its last call."""


class RecordedMeanFieldELBO(_Recorded, TraceMeanField_ELBO):
    """Pyro's ``TraceMeanField_ELBO`` (``--elbo meanfield``: the closed-form KL where one exists),
    recording the same terms as :class:`RecordedTraceELBO`."""


class RecordedFreeBitsELBO(_Recorded, Trace_ELBO):
    """``Trace_ELBO`` whose gradient floors each latent group's batch-mean KL at ``free_bits``
    nats per dimension (see the module docstring); every guide site must be reparameterised."""

    def __init__(self, free_bits: float, **kwargs):
        super().__init__(**kwargs)
        self.free_bits = float(free_bits)

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, _ = super()._differentiable_loss_particle(model_trace, guide_trace)  # the true -ELBO
        recon = 0.0
        floored = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                recon = recon + site["log_prob_sum"]
                continue
            q = guide_trace.nodes[name]
            per_dim = _diagonal_normal(q["fn"]) and _diagonal_normal(site["fn"])
            if per_dim:  # (..., B, D): the KL of each dimension
                kl = (_base_log_prob(q["fn"], q["value"]) - _base_log_prob(site["fn"], site["value"])) * site["scale"]
                kl = kl.reshape(-1, kl.shape[-1]).mean(0)  # batch (and particle) mean, per dimension
                floor = self.free_bits
            else:
                kl = (q["log_prob"] - site["log_prob"]).mean().reshape(1)
                floor = self.free_bits * q["fn"].event_shape.numel()
            batch = site["log_prob"].shape[-1]
            particles = site["log_prob"].numel() // batch
            floored = floored + particles * batch * kl.clamp(min=floor).sum()
        return loss, floored - recon


def _diagonal_normal(fn) -> bool:
    while isinstance(fn, dist.torch_distribution.ExpandedDistribution):
        fn = fn.base_dist
    return isinstance(fn, dist.Independent) and isinstance(fn.base_dist, dist.Normal) \
        and fn.reinterpreted_batch_ndims == 1


def _base_log_prob(fn, value):
    """Per-dimension log density of a diagonal Normal ``Independent`` (batch, D)."""
    return fn.base_dist.log_prob(value)


class RecordedIWAE(_Recorded, RenyiELBO):
    """Pyro's ``RenyiELBO`` at ``alpha = 0`` (``--elbo iwae``): the importance-weighted bound with
    ``num_particles`` samples, recording the same terms as :class:`RecordedTraceELBO`."""

    def __init__(self, num_particles: int, **kwargs):
        super().__init__(alpha=0.0, num_particles=num_particles, **kwargs)


class _Reweight(torch.autograd.Function):
    """The identity, whose backward pass multiplies the gradient by ``holder["ratio"]`` (one factor per
    particle and example, set after the forward pass has computed the importance weights)."""

    @staticmethod
    def forward(ctx, z, holder, event_dim):
        ctx.holder, ctx.event_dim = holder, event_dim
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        ratio = ctx.holder["ratio"]
        return grad * ratio.reshape(ratio.shape + (1,) * ctx.event_dim), None, None


class RecordedIWAEDReG(RecordedIWAE):
    r"""The importance-weighted bound of :class:`RecordedIWAE` (``--elbo iwae --iwae-gradient dreg``), the
    same loss, with the doubly reparameterised gradient (DReG) of Tucker et al. (2019) for the guide.

    With log-weights :math:`\log w_i = \log p(x|z_i) + \beta[\log p(z_i) - \log q_\phi(z_i|x)]`
    (β the KL warm-up scale, 1 after it), :math:`z_i = z_i(\epsilon_i, \phi)` and normalised weights
    :math:`\tilde w_i`, the reparameterised gradient of the bound with respect to the guide's parameters is

    .. math:: \nabla_\phi \mathcal{L}_K = \mathbb{E}\Big[\sum_i \tilde w_i \Big(\frac{\partial \log w_i}
        {\partial z_i} \frac{d z_i}{d\phi} - \beta\, \frac{\partial \log q_\phi(z_i|x)}{\partial \phi}
        \Big)\Big],

    where :math:`\partial/\partial z_i` holds φ fixed. The second term's expectation, by reparameterising
    once more, is :math:`\beta\,\mathbb{E}[\sum_i \tilde w_i(1-\tilde w_i)\,\partial \log w_i/\partial
    z_i\; dz_i/d\phi]`, so

    .. math:: \nabla_\phi \mathcal{L}_K = \mathbb{E}\Big[\sum_i \big((1-\beta)\tilde w_i + \beta \tilde
        w_i^2\big) \frac{\partial \log w_i}{\partial z_i} \frac{d z_i}{d\phi}\Big]

    (at β = 1 Tucker et al.'s :math:`\tilde w_i^2`), whose noise does not grow with K as the score term's
    does. Parameters that the model's log-density reads directly (the decoder, and the encoder where a
    VampPrior reads it at its pseudo-inputs) keep the plain gradient :math:`\sum_i \tilde w_i \nabla
    \log p(x, z_i)`. :math:`dz_i/d\phi` is the total derivative through every guide layer (with two levels,
    :math:`z_1` moves with :math:`z_2` too), and :math:`\partial/\partial z_i` is taken with the guide's
    parameters held fixed but its dependence on the upper draws kept, so hierarchical guides are exact.

    One step runs the guide (the draws), the guide again at those draws with its parameters frozen (the
    log-densities as functions of z only) and the model once; one backward pass carries the
    coefficients above through :class:`_Reweight`. Every latent site of the guide must be reparameterised
    and must give its log-density at any point (a diagonal Gaussian does; a flow would have to be
    inverted), and all latent sites must share one scale."""

    @staticmethod
    def ratio(weights: torch.Tensor, beta: float) -> torch.Tensor:
        r"""The factor on the guide's path gradient, per particle and example, that turns the plain
        weight :math:`\tilde w_i` into the DReG coefficient :math:`(1-\beta)\tilde w_i + \beta \tilde w_i^2`."""
        return (1.0 - beta) + beta * weights

    def __init__(self, num_particles: int, **kwargs):
        super().__init__(num_particles, **kwargs)
        if num_particles > 1 and not self.vectorize_particles:
            raise ValueError("RecordedIWAEDReG draws its particles in one vectorised pass: pass "
                             "vectorize_particles=True (build_elbo does)")

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        model, guide = self._vectorized_num_particles(model), self._vectorized_num_particles(guide)
        draws = prune_subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))  # z(eps, phi), on their path
        holder: dict = {}
        at_draws = draws.copy()
        has_latent, params, scales = False, set(), set()
        for name, site in draws.nodes.items():
            if site["type"] == "param":
                params.add(site["value"].unconstrained())
            elif site["type"] == "sample" and not site["is_observed"]:
                fn = site["fn"]
                if not (fn.has_rsample and _diagonal_normal(fn)):
                    raise ValueError(f"--iwae-gradient dreg needs a diagonal-Gaussian guide; site {name!r} is "
                                     f"{type(fn).__name__}: use --guide gaussian or --iwae-gradient reparam")
                has_latent = True
                scales.add(float(site["scale"]))
                at_draws.nodes[name] = {**site, "value": _Reweight.apply(site["value"], holder, fn.event_dim)}
        if len(scales) > 1:
            raise ValueError(f"--iwae-gradient dreg needs one scale on every latent site (got {sorted(scales)})")
        frozen = [p for p in params if p.requires_grad]
        try:  # the guide's log-density at the draws as a function of z alone
            for p in frozen:
                p.requires_grad_(False)
            with warnings.catch_warnings():  # pyro.module notes that frozen parameters are not registered anew
                warnings.filterwarnings("ignore", message=".*not registered in the param store", category=UserWarning)
                guide_trace = poutine.trace(poutine.replay(guide, trace=at_draws)).get_trace(*args, **kwargs)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        model_trace = prune_subsample_sites(
            poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs))
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        self._record(model_trace, guide_trace)
        sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
        log_w = 0.0
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    log_w = log_w + sign * torch_sum(site["log_prob"], sum_dims)
        if self.num_particles == 1:
            log_w = log_w.unsqueeze(0)
        with torch.no_grad():
            log_norm = torch.logsumexp(log_w, dim=0, keepdim=True)
            weights = (log_w - log_norm).exp()
            holder["ratio"] = self.ratio(weights, scales.pop() if scales else 1.0)
        if has_latent or any(p.requires_grad for p in params):
            (-(weights * log_w).sum()).backward()
        loss = -(log_norm.sum().item() - log_norm.numel() * math.log(log_w.shape[0]))
        warn_if_nan(loss, "loss")
        return loss


#: --elbo's values (named once, in :data:`pyrovae.config.ELBOS`) -> the ELBO classes, in that order
_ELBOS = dict(zip(ELBOS, (RecordedTraceELBO, RecordedMeanFieldELBO, RecordedIWAE)))


def build_elbo(config):
    """The Pyro ELBO object named by ``config.elbo`` (``TraceEnum_ELBO`` for a kind whose discrete
    latent is summed out, :attr:`~pyrovae.model.ModelKind.enumerated`)."""
    from .model import MODEL_KINDS

    if MODEL_KINDS[config.model].enumerated:
        return TraceEnum_ELBO(max_plate_nesting=1)
    if config.free_bits > 0:
        return RecordedFreeBitsELBO(config.free_bits, num_particles=config.num_particles, vectorize_particles=True,
                                    max_plate_nesting=1)
    cls = RecordedIWAEDReG if config.elbo == "iwae" and config.iwae_gradient == "dreg" else _ELBOS[config.elbo]
    return cls(num_particles=config.num_particles, vectorize_particles=True, max_plate_nesting=1)


class Optimizer(PyroOptim):
    r"""Adam over all parameters for ``pyro.infer.SVI``: one ``torch.optim.Adam`` (``AdamW`` with
    ``weight_decay``); in a data-parallel run the gradients summed over all processes first,
    so every process takes the step of the global batch; then the global gradient norm
    clipped to ``clip_norm`` (0: off; the loss is a sum over the batch, so pass the
    per-example limit times the batch size).

    ``normalize_grads`` (``--optimizer adamnormgrad``, the VampPrior paper's ``AdamNormGrad``): each
    parameter tensor's gradient is divided by its own 2-norm before Adam sees it,

    .. math:: g \leftarrow g / (\lVert g \rVert_2 + 10^{-7}),

    so the step no longer depends on the loss's scale (a sum or a mean over the batch) and no tensor's
    gradient can be larger than 1. With ``split_fused`` (``--norm-grad-by map``) a tensor that stacks
    several maps (:func:`~pyrovae.nets.mark_fused`: a gated layer's value and gate, a Gaussian head's
    mean and log-scale) has each map's rows of its gradient divided by their own norm, as the paper's
    code, whose maps are separate layers, does. ``after_step`` (optional) is called after every step
    (the weight average).

    (``pyro.optim.Adam`` keeps one torch optimiser per parameter and steps them in a Python
    loop; on the 784-400-50 network that alone cost about 5 ms of a 13 ms step.)
    """

    #: added to each gradient's norm by ``normalize_grads``
    NORM_EPS = 1e-7

    def __init__(self, lr: float, clip_norm: float = 0.0, weight_decay: float = 0.0, normalize_grads: bool = False,
                 after_step=None, split_fused: bool = False):
        # (no super().__init__: it sets per-parameter state this optimiser does not use)
        self.lr, self.clip_norm, self.weight_decay = lr, clip_norm, weight_decay
        self.normalize_grads, self.after_step, self.split_fused = normalize_grads, after_step, split_fused
        self._optim: torch.optim.Adam | None = None
        self._names: list[str] = []
        self._params: list[torch.Tensor] = []
        self._key: frozenset = frozenset()
        self._pending: dict | None = None

    def __call__(self, params, *args, **kwargs) -> None:
        import pyro

        key = frozenset(map(id, params))
        if self._optim is None or key != self._key:
            store = pyro.get_param_store()
            ordered = sorted(params, key=store.param_name)  # a set's order differs between processes
            if self.weight_decay > 0:  # decoupled weight decay (Loshchilov & Hutter 2019)
                self._optim = torch.optim.AdamW(ordered, lr=self.lr, weight_decay=self.weight_decay)
            else:
                self._optim = torch.optim.Adam(ordered, lr=self.lr)
            self._key = key
            self._names, self._params = [store.param_name(p) for p in ordered], ordered
            if self._pending is not None:
                self._load(self._pending)
                self._pending = None
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            _all_reduce_grads(self._params)
        if self.normalize_grads:
            grads = []
            for p in self._params:
                if p.grad is None:
                    continue
                parts = getattr(p, FUSED_PARTS, None) if self.split_fused else None
                grads.extend(p.grad.split(parts, dim=0) if parts else (p.grad,))
            if grads:
                torch._foreach_div_(grads, torch._foreach_add(torch._foreach_norm(grads), self.NORM_EPS))
        if self.clip_norm > 0:
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                clip_grad_norm_(grads, self.clip_norm, sync=grads[0].device.type == "cpu")
        self._optim.step()
        if self.after_step is not None:
            self.after_step()
        # SVI then "zeroes" gradients by allocating zero tensors that the next backward adds
        # into; with no gradient at all it skips them and backward writes fresh ones: the same
        # numbers, one allocation and one pass over all gradients fewer per step
        for p in self._params:
            p.grad = None

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        if self._optim is not None:
            for group in self._optim.param_groups:
                group["lr"] = lr

    def get_state(self) -> dict:
        if self._optim is None:
            return self._pending or {}
        return {"names": list(self._names), "adam": self._optim.state_dict()}

    def set_state(self, state: dict) -> None:
        if not state:
            return
        if self._optim is None:
            self._pending = state
        else:
            self._load(state)

    def _load(self, state: dict) -> None:
        if state["names"] != self._names:
            raise ValueError(
                "the checkpoint's optimiser state is for parameters "
                f"{state['names'][:3]}..., this model has {self._names[:3]}...: the checkpoint is from another model"
            )
        self._optim.load_state_dict(state["adam"])
        self.set_lr(self.lr)  # the schedule, not the checkpoint, sets the rate of this epoch


def clip_grad_norm_(grads: list[torch.Tensor], clip_norm: float, sync: bool):
    r"""Scale ``grads`` in place so that their global 2-norm is at most ``clip_norm``; returns the
    norm before clipping (a float with ``sync``).

    ``sync=True`` reads the norm on the host and skips the pass over the gradients when
    nothing is clipped (cheaper on the CPU); ``sync=False`` always multiplies by
    :math:`\min(1, c / \lVert g \rVert)` on the device, so that an accelerator never waits
    for the host.
    """
    norm = torch.nn.utils.get_total_norm(grads)
    if not sync:
        torch._foreach_mul_(grads, (clip_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm
    norm, clip_norm = float(norm), float(clip_norm)
    if norm > clip_norm:
        torch._foreach_mul_(grads, clip_norm / (norm + 1e-6))
    return norm


def _all_reduce_grads(params) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
