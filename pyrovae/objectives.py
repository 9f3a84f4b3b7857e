r"""Objectives handed to ``pyro.infer.SVI``, and the optimiser.

- ``trace``: ``Trace_ELBO``, the ELBO of the notes with the KL estimated by sampling,

  .. math:: \mathcal{L} = \mathbb{E}_{q(z|x)}[\log p(x|z) + \log p(z) - \log q(z|x)].

- ``meanfield``: ``TraceMeanField_ELBO``, the same bound with the closed-form
  :math:`\mathrm{KL}(q(z|x) \,\|\, p(z))` where one exists (the notes' section 2).
- ``iwae``: ``RenyiELBO(alpha=0)``, the importance-weighted bound (Burda et al. 2015)

  .. math:: \mathcal{L}_K = \mathbb{E}\Big[\log \frac{1}{K} \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k|x)}\Big],

  with the log-sum-exp taken per example because every site sits in the ``"data"`` plate
  (checked against a direct computation from traces in ``tests/test_marginal.py``).
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

import pyro.distributions as dist
import torch
import torch.distributed as tdist
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.optim import PyroOptim

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
    cls = _ELBOS[config.elbo]
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
