r"""Does the VampPrior paper's clamp on Bernoulli probabilities move a trained model's log p(x)?

The reference code (github.com/jmtomczak/vae_vampprior, ``utils/distributions.py``) scores binary pixels
with the decoder's probabilities clamped to :math:`[\epsilon, 1 - \epsilon]`, :math:`\epsilon = 10^{-5}`;
pyrovae scores :math:`\mathrm{Bernoulli}(\text{logits}=\ell)` unclamped. Clamping the probability is
clamping the logit to :math:`\pm b`, :math:`b = \log((1 - \epsilon) / \epsilon) \approx 11.51`, so one
pixel's loss is at most :math:`\log(1 + e^{b}) \approx 11.51` nats:

.. math:: \log p_\epsilon(x \mid z) = \sum_d x_d \tilde\ell_d - \mathrm{softplus}(\tilde\ell_d),
          \qquad \tilde\ell_d = \min(\max(\ell_d, -b), b).

This script scores one run both ways by importance sampling with the same seed, so the same draws of z,
and reports the paired difference of the mean log p(x) with its standard error over images::

    python experiments/bernoulli_clamp.py docs/results/benchmark/runs/hvae-vampprior-paper --data-dir DIR
    python experiments/bernoulli_clamp.py RUN --data-dir DIR --num-examples 200 --num-samples 20  # seconds

It measures the clamp's effect on a trained model's figure only, not on training.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))

from pyrovae import estimate_log_px, load_dataset, load_run  # noqa: E402
from pyrovae.cli import exit_code_of  # noqa: E402
from pyrovae.distributions import BernoulliImages  # noqa: E402

#: the reference code's bound on a pixel's probability
EPSILON = 1e-5


@contextlib.contextmanager
def clamped_bernoulli(epsilon: float = EPSILON):
    """Score :class:`~pyrovae.distributions.BernoulliImages` with logits clamped to ``±log((1-ε)/ε)``."""
    bound = math.log((1 - epsilon) / epsilon)
    plain = BernoulliImages.log_prob

    def log_prob(self, value):  # the plain density of the clamped logits
        return plain(BernoulliImages(self.logits.clamp(-bound, bound)), value)

    BernoulliImages.log_prob = log_prob
    try:
        yield
    finally:
        BernoulliImages.log_prob = plain


def paired_difference(model, images: torch.Tensor, num_samples: int, seed: int) -> dict:
    """Mean log p(x) unclamped and clamped, and their paired difference (clamped - plain) ± s.e."""
    plain = estimate_log_px(model, images, num_samples, seed=seed, diagnostics=False).log_px
    with clamped_bernoulli():
        clamped = estimate_log_px(model, images, num_samples, seed=seed, diagnostics=False).log_px
    diff = clamped - plain
    return {"plain": plain.mean().item(), "clamped": clamped.mean().item(), "difference": diff.mean().item(),
            "se": (diff.std() / math.sqrt(len(diff))).item() if len(diff) > 1 else float("nan"),
            "largest": diff.abs().max().item(), "num_examples": len(diff), "num_samples": num_samples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Score a binary-data run with and without the VampPrior code's clamp "
                                "of Bernoulli probabilities to [1e-5, 1-1e-5], same draws, and print the "
                                "paired difference of mean log p(x).")
    p.add_argument("run", help="a run directory or checkpoint of a model of binary images")
    p.add_argument("--data-dir", required=True, help="folder holding the run's dataset files")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split to score (default: test)")
    p.add_argument("--num-examples", type=int, default=None,
                   help="first N images of the split (default: all of them; the clamp acts on a few rare images, "
                   "so a prefix of the split can miss it)")
    p.add_argument("--num-samples", type=int, default=200, help="importance samples K per image (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws shared by both scorings (default: 0)")
    args = p.parse_args(argv)
    if (args.num_examples is not None and args.num_examples < 1) or args.num_samples < 1:
        p.error("--num-examples and --num-samples must be at least 1")
    return exit_code_of("experiments/bernoulli_clamp.py", _main, args)


def _main(args) -> int:
    run = load_run(args.run)
    data = load_dataset(run.config.dataset, args.split, data_dir=args.data_dir, progress=False)
    r = paired_difference(run.model, data.images[: args.num_examples], args.num_samples, args.seed)
    print(f"{r['num_examples']} {args.split} images, K = {r['num_samples']}: log p(x) {r['plain']:.4f} unclamped, "
          f"{r['clamped']:.4f} clamped; difference {r['difference']:+.4f} ± {r['se']:.4f} nats "
          f"(largest on one image {r['largest']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
