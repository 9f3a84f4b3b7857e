r"""How far apart are AdamNormGrad's steps over fused tensors and map by map (``--norm-grad-by``)?

The VampPrior paper's optimiser (github.com/jmtomczak/vae_vampprior, ``utils/optimizer.py``) divides each
parameter tensor's gradient by its own 2-norm before Adam. Its networks keep every map in its own
``nn.Linear``: a gated layer's value map and gate map apart, an encoder's mean head and log-variance head
apart. pyrovae stores each such pair as one tensor (one matrix product). With ``--norm-grad-by tensor``
(pyrovae's default) ``--optimizer adamnormgrad`` divides the pair's gradient :math:`g = (g_1, g_2)` by
:math:`\lVert g \rVert`; with ``map`` (the paper presets) it divides :math:`g_1` by :math:`\lVert g_1 \rVert`,
as the paper's code does. Under ``tensor`` part 1 receives :math:`s_t\, g_1 / \lVert g_1 \rVert` with

.. math:: s_t = \lVert g_{1,t} \rVert / \lVert g_t \rVert \in (0, 1].

Adam's step :math:`\hat m / (\sqrt{\hat v} + \epsilon)` is unchanged when every gradient of a tensor is
multiplied by one constant, so the two differ only as much as :math:`s_t` varies from step to step. This
script measures that: over ``--steps`` minibatches it records :math:`s_t` for every part of every fused tensor
(weights and biases) and prints each part's mean share and its coefficient of variation (standard deviation
over mean), for a trained run at β = 1 and for a fresh model of the same settings at the first warm-up
epoch's β::

    python experiments/adamnormgrad_parts.py docs/results/benchmark/runs/hvae-vampprior-paper --data-dir DIR
    python experiments/adamnormgrad_parts.py RUN --data-dir DIR --steps 5  # seconds

A coefficient of variation c reweights the gradients inside Adam's averages by about c from step to step;
what that does to a trained model takes a paired run (``experiments/paper_differences.py``, row
``norm-grad-by``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))

from pyrovae import build_model, load_run  # noqa: E402
from pyrovae.cli import exit_code_of  # noqa: E402
from pyrovae.marginal import isolated_params  # noqa: E402
from pyrovae.nets import FUSED_PARTS  # noqa: E402
from pyrovae.objectives import build_elbo  # noqa: E402
from pyrovae.training import prepare_data  # noqa: E402


def fused_parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear, list[int]]]:
    """Every linear map that stacks several of the paper's maps along its outputs (marked by
    :func:`~pyrovae.nets.mark_fused`: a gated layer's value and gate; a Gaussian head's mean and
    log-scale, and a flow guide's context where there is one): ``(name, map, sizes of its parts)``."""
    return [(name, m, list(getattr(m.weight, FUSED_PARTS))) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and hasattr(m.weight, FUSED_PARTS)]


def shares(model, config, images: torch.Tensor, beta: float, steps: int, batch_size: int, seed: int) -> dict:
    """``{part: [s_t for each step]}``: each part's share of its tensor's gradient norm, weights and
    biases separately, over ``steps`` minibatches drawn with ``seed`` (and the guide's draws from it)."""
    elbo, parts = build_elbo(config), fused_parts(model)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the guide's draws of z
    out: dict[str, list[float]] = {}
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=generator)]
        with isolated_params():
            loss = elbo.differentiable_loss(model.model, model.guide, x, beta)
        model.zero_grad()
        loss.backward()
        for name, linear, sizes in parts:
            for kind, p in (("weight", linear.weight), ("bias", linear.bias)):
                if p is None or p.grad is None:
                    continue
                whole = p.grad.norm()
                for i, piece in enumerate(p.grad.split(sizes, dim=0)):
                    out.setdefault(f"{name} {kind} part {i + 1}", []).append((piece.norm() / whole).item())
    return out


def summary_table(measured: dict[str, dict[str, list[float]]]) -> str:
    """One line per model and kind of tensor (all, weights, biases): the parts, their mean share and the
    median and largest coefficient of variation of the share over the steps."""
    lines = ["| when | tensors | parts | mean share s | variation of s over steps (CV): median | largest |",
             "|---|---|---:|---:|---:|---:|"]
    for when, per_part in measured.items():
        for kind, label in (("all", "all"), ("weight", "weights"), ("bias", "biases")):
            chosen = [v for k, v in per_part.items() if kind == "all" or f" {kind} part " in k]
            cvs = [statistics.pstdev(v) / statistics.mean(v) for v in chosen if statistics.mean(v) > 0]
            if not cvs:
                continue
            mean_share = statistics.mean(statistics.mean(v) for v in chosen)
            lines.append(f"| {when} | {label} | {len(chosen)} | {mean_share:.2f} | "
                         f"{statistics.median(cvs):.1%} | {max(cvs):.1%} |")
    return "\n".join(lines)


def _main(args) -> int:
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2 to measure a variation (got {args.steps})")
    run = load_run(args.run)
    config = run.config
    found = fused_parts(run.model)
    if not found:
        raise ValueError(f"{args.run}: the model has no fused maps (no gated layers or Gaussian heads); "
                         "nothing to measure")
    data = prepare_data(type(config).from_dict({**config.to_dict(), "data_dir": args.data_dir}).resolved(),
                        "train", "cpu")
    first_beta = 1.0 / config.warmup_epochs if config.warmup_epochs else 1.0
    measured = {"trained (its best weights), β = 1": shares(run.model, config, data.images, 1.0, args.steps,
                                                            args.batch_size, args.seed)}
    torch.manual_seed(args.seed)
    fresh = build_model(config, data_dim=data.data_dim, train_images=data.images, image_shape=data.image_shape)
    measured[f"fresh (its first warm-up epoch), β = {first_beta:g}"] = shares(
        fresh, config, data.images, first_beta, args.steps, args.batch_size, args.seed)
    print(f"{args.run}: {len(found)} fused maps, {args.steps} minibatches of {args.batch_size}")
    print(summary_table(measured))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a run directory (for example docs/results/benchmark/runs/hvae-vampprior-paper)")
    p.add_argument("--data-dir", required=True, help="the folder of the run's dataset")
    p.add_argument("--steps", type=int, default=40, help="minibatches to measure over")
    p.add_argument("--batch-size", type=int, default=100, help="images per minibatch (the paper's 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the minibatches and of the fresh model")
    args = p.parse_args(argv)
    return exit_code_of("experiments/adamnormgrad_parts.py", _main, args)


if __name__ == "__main__":
    sys.exit(main())
