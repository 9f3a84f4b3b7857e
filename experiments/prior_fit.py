r"""How well does a trained VampPrior fit its own model's aggregate posterior?

The VampPrior paper (Tomczak & Welling 2018, eqs. 7-9) starts from the prior that maximises the ELBO
for a fixed encoder: the aggregate posterior of the N training images,

.. math:: p^*(z) = \frac{1}{N} \sum_{n=1}^{N} q_\phi(z \mid x_n),

and approximates it by K pseudo-inputs :math:`u_k`, :math:`p_\lambda(z) = \frac1K \sum_k q_\phi(z \mid u_k)`.
The only term of the ELBO that the pseudo-inputs move is the cross-entropy
:math:`\mathbb{E}_{x}\mathbb{E}_{q_\phi(z \mid x)}[\log p_\lambda(z)]`. This script holds a trained
run's encoder and decoder fixed and asks how much that term, and log p(x) on held-out images, moves
when only the prior changes:

- ``learned``: the run's own pseudo-inputs, as trained;
- ``refit``: the same K pseudo-inputs trained further on the cross-entropy alone, with z drawn from
  :math:`q_\phi(z \mid x_n)` of the training images and everything else frozen, through the run's own
  map (with ``hardtanh`` a pixel past 0 or 1 gets no gradient and stays);
- ``refit-free``: the same, through a sigmoid from the learned values, so that no pixel is stuck;
- ``training-posteriors``: the N training images themselves as pseudo-inputs, :math:`p^*` itself.

For each prior it reports :math:`\mathbb{E}\log p(z)` over codes of the training images and of the
held-out ones, the number of components the training codes use (the exponential of the entropy of
their mean responsibility), and held-out log p(x). It also counts the pseudo-input pixels past the
``hardtanh`` bounds. Each held-out
figure is importance sampling with the same seed for every prior, so the same draws of z; the
differences are paired over images. Held fixed, the decoder was trained against the learned prior,
so a gain here is what a better-fitted prior is worth to this decoder, a lower bound on its worth
to a model trained with it::

    python experiments/prior_fit.py docs/results/benchmark/runs/hvae-vampprior-paper --data-dir DIR
    python experiments/prior_fit.py RUN --data-dir DIR --num-examples 50 --num-samples 20 --steps 50  # a minute

It reads the validation split by default: a diagnostic, not a model to score on test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))

from pyrovae import estimate_log_px, load_run  # noqa: E402
from pyrovae.cli import exit_code_of  # noqa: E402
from pyrovae.files import write_json  # noqa: E402
from pyrovae.priors import VampPrior  # noqa: E402
from pyrovae.training import prepare_data  # noqa: E402


def pseudo_input_state(prior: VampPrior) -> dict:
    """Share of pseudo-input parameters past the map's bounds (``hardtanh``: no gradient there)."""
    if prior.squash != "hardtanh":
        return {"squash": prior.squash}
    a = prior.pseudo_params.detach()
    low, high = (a <= 0).float(), (a >= 1).float()
    stuck = low + high
    return {"squash": "hardtanh", "below_0": low.mean().item(), "above_1": high.mean().item(),
            "stuck": stuck.mean().item(), "pseudo_inputs_fully_stuck": int((stuck.mean(1) == 1).sum()),
            "stuck_median_per_pseudo_input": stuck.mean(1).median().item()}


@torch.no_grad()
def posterior_params(encoder, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale of q(z | x) for every row of ``images`` (the encoder the prior reads)."""
    locs, scales = [], []
    for i in range(0, len(images), batch):
        loc, log_scale = encoder(images[i:i + batch])
        locs.append(loc)
        scales.append(log_scale.exp())
    return torch.cat(locs), torch.cat(scales)


def mean_log_prior(prior, loc, scale, seed: int, batch: int = 2000) -> float:
    r""":math:`\frac1N \sum_n \log p(z_n)`, one :math:`z_n \sim q(z \mid x_n)` each (``loc``, ``scale`` of
    q for every image), the same draws for every prior: minus the cross-entropy term of the ELBO."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(loc.shape, generator=gen)
    total = 0.0
    with torch.no_grad(), prior.frozen():
        d = prior.dist()
        for i in range(0, len(loc), batch):
            total += d.log_prob(loc[i:i + batch] + scale[i:i + batch] * eps[i:i + batch]).sum().item()
    return total / len(loc)


def components_used(prior, loc, batch: int = 2000) -> float:
    """exp(entropy) of the training codes' mean responsibility: how many components they use."""
    with torch.no_grad(), prior.frozen():
        mean_r = sum(prior.log_responsibilities(loc[i:i + batch]).exp().sum(0) for i in range(0, len(loc), batch))
    p = mean_r / mean_r.sum()
    return math.exp(-(p * p.clamp_min(1e-30).log()).sum().item())


def refit(prior: VampPrior, loc, scale, *, free: bool, steps: int, lr: float, batch: int, seed: int) -> VampPrior:
    """A copy of ``prior`` whose pseudo-inputs maximise the cross-entropy term, encoder frozen.

    ``free``: reparametrise through a sigmoid from the learned pseudo-inputs (clamped into
    [0.001, 0.999]), so that no pixel is stuck; otherwise keep the run's own map."""
    u = prior.pseudo_inputs.detach()
    squash = "sigmoid" if free else prior.squash
    new = VampPrior(prior.encoder, u.clamp(1e-3, 1 - 1e-3) if free else prior.pseudo_params.detach(),
                    squash=squash, margin=0.0)
    encoder = prior.encoder
    frozen = [p for p in encoder.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(new.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    try:
        for _ in tqdm(range(steps), desc=f"refit ({squash})", leave=False):
            idx = torch.randint(len(loc), (batch,), generator=gen)
            z = loc[idx] + scale[idx] * torch.randn(loc[idx].shape, generator=gen)
            loss = -new.dist().log_prob(z).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return new


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Hold a VampPrior run's encoder and decoder fixed and score held-out "
                                "log p(x) under its learned prior, the prior refitted to its aggregate posterior, "
                                "and the aggregate posterior of the training images itself (same draws).")
    p.add_argument("run", help="a run directory or checkpoint of a model with --prior vamp")
    p.add_argument("--data-dir", required=True, help="folder holding the run's dataset files")
    p.add_argument("--split", default="val", choices=("val", "test"),
                   help="held-out split to score (default: val; a diagnostic, not a model to score on test)")
    p.add_argument("--num-examples", type=int, default=1000,
                   help="random held-out images scored (default: 1000)")
    p.add_argument("--num-samples", type=int, default=1000, help="importance samples K per image (default: 1000)")
    p.add_argument("--steps", type=int, default=3000, help="refit steps (default: 3000)")
    p.add_argument("--lr", type=float, default=1e-3, help="refit learning rate, Adam (default: 1e-3)")
    p.add_argument("--batch-size", type=int, default=1000, help="training codes per refit step (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws shared by every prior (default: 0)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    return exit_code_of("experiments/prior_fit.py", _main, args)


def _main(args) -> int:
    for flag, value, least in (("--num-examples", args.num_examples, 1), ("--num-samples", args.num_samples, 1),
                               ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 0)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least} (got {value})")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive (got {args.lr:g})")
    run = load_run(args.run)
    model = run.model.eval()
    learned = model.prior
    if not isinstance(learned, VampPrior):
        raise ValueError(f"{args.run} has --prior {run.config.prior}; this measures a VampPrior: use a run "
                         "trained with --prior vamp")
    config = dataclasses.replace(run.config, data_dir=args.data_dir)  # binarised as the run scores data
    train = prepare_data(config, "train", "cpu").images
    held = prepare_data(config, args.split, "cpu").subset(args.num_examples, seed=args.seed).images
    loc, scale = posterior_params(learned.encoder, train)

    priors = {"learned": learned}
    if args.steps > 0:
        priors["refit"] = refit(learned, loc, scale, free=False, steps=args.steps, lr=args.lr,
                                batch=args.batch_size, seed=args.seed)
        priors["refit-free"] = refit(learned, loc, scale, free=True, steps=args.steps, lr=args.lr,
                                     batch=args.batch_size, seed=args.seed)
    priors["training-posteriors"] = VampPrior(learned.encoder, train, squash="none", margin=0.0)

    out = {"run": str(args.run), "split": args.split, "num_examples": len(held), "num_samples": args.num_samples,
           "pseudo_inputs": pseudo_input_state(learned), "priors": {}}
    held_loc, held_scale = posterior_params(learned.encoder, held)
    base = None
    for name, prior in priors.items():
        t0 = time.time()
        model.prior = prior
        own = name == "training-posteriors"  # each training code lies in its own component: no fit to read
        row = {"train_log_pz": None if own else mean_log_prior(prior, loc, scale, args.seed),
               "held_out_log_pz": mean_log_prior(prior, held_loc, held_scale, args.seed),
               "components_used": None if own else components_used(prior, loc)}
        with torch.no_grad():
            log_px = estimate_log_px(model, held, args.num_samples, seed=args.seed, diagnostics=False,
                                     progress=True).log_px
        base = log_px if base is None else base
        diff = log_px - base
        row.update(log_px=log_px.mean().item(), se=(log_px.std() / math.sqrt(len(log_px))).item(),
                   vs_learned=diff.mean().item(), vs_learned_se=(diff.std() / math.sqrt(len(diff))).item(),
                   minutes=(time.time() - t0) / 60)
        out["priors"][name] = row
        print(f"{name:>20}: E log p(z) train {_fmt(row['train_log_pz'], '8.3f')}, {args.split} "
              f"{row['held_out_log_pz']:8.3f}; components used {_fmt(row['components_used'], '6.1f')}; {args.split} "
              f"log p(x) {row['log_px']:.3f} ± {row['se']:.3f}, vs learned {row['vs_learned']:+.3f} ± "
              f"{row['vs_learned_se']:.3f} ({row['minutes']:.1f} min)", flush=True)
    model.prior = learned
    print("pseudo-inputs:", json.dumps(out["pseudo_inputs"]))
    if args.json is not None:
        write_json(args.json, out)
    return 0


def _fmt(value: float | None, spec: str) -> str:
    """``value`` in format ``spec`` (such as ``"8.3f"``), or a dash as wide for a figure that does not apply."""
    return f"{'—':>{spec.split('.')[0]}}" if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())
