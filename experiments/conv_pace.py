r"""Would the VampPrior paper's convolutional two-level model (convHVAE) fit a 3-hour CPU budget?

Tomczak & Welling (2018, Table 2) report their best binarized-MNIST figure, log p(x) = -81.09 on the test
split, for a two-level VAE whose encoders and decoder are gated convolutions (convHVAE + VampPrior). Before
building it as a ``--net`` kind, this script measures what one training step of it costs on this machine,
against pyrovae's fully connected two-level model (the ``bmnist-best`` preset) in the same process,
interleaved round by round so that a busy machine slows both arms alike; medians over rounds.

- **gated**: pyrovae's two-level model of the ``bmnist-best`` preset (gated 300-300 networks, latent 40/40,
  VampPrior K = 500), its own SVI step (:func:`pyrovae.build_model`, the preset's ELBO and optimiser).
- **conv**: the convHVAE of the paper's appendix, written here in plain PyTorch from that description:
  q(z2|x) by five gated convolutions (1-32 7x7, 32-32 3x3 stride 2, 32-64 5x5, 64-64 3x3 stride 2, 64-6 3x3)
  to 6x7x7 = 294 features; q(z1|x,z2) by a second such stack (3x3 kernels) beside a gated dense map of z2,
  joined by a gated dense layer of 300; p(z1|z2) by two gated dense layers of 300; p(x|z1,z2) by gated dense
  maps of z1 and z2 (300 each) joined into a 784-pixel map, then four gated 3x3 convolutions of 64 channels at
  full 28x28 resolution and a 1x1 convolution to the Bernoulli logits. The VampPrior passes its 500
  pseudo-inputs through q(z2|.) at every step, as in the gated arm. Log-variances through hardtanh(-6, 2).
  The single-sample ELBO with sampled KL terms and ``torch.optim.Adam``: no Pyro tracing, no validation and
  no checkpoint, so this arm is timed in its most favourable form.

Reported: milliseconds per step at batch 100, minutes per epoch of the 50,000 training images (500 steps;
validation left out, which flatters the slower arm), and how many such epochs fit in 3 hours.

Usage::

    python experiments/conv_pace.py --out /tmp/conv-pace          # about 2 minutes on 2 cores
    python experiments/conv_pace.py --quick --out /tmp/conv-pace  # seconds (the test runs this)

Timings are only as good as the machine is quiet: run it alone.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro.infer import SVI  # noqa: E402

from pyrovae import TrainConfig, build_model  # noqa: E402
from pyrovae.cli import exit_code_of  # noqa: E402
from pyrovae.config import preset_settings, used_only  # noqa: E402
from pyrovae.files import write_json, write_text_atomic  # noqa: E402
from pyrovae.nets import GatedDense  # noqa: E402
from pyrovae.objectives import Optimizer, build_elbo  # noqa: E402

#: training images of binarized MNIST and the batch of both presets: 500 steps an epoch
TRAIN_IMAGES, BATCH = 50_000, 100
BUDGET_SECONDS = 3 * 3600


class GatedConv2d(nn.Module):
    r"""A gated convolution, :math:`h = (W_1 * x + b_1) \odot \sigma(W_2 * x + b_2)`: one ``nn.Conv2d``
    of twice the channels, split in two."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, 2 * cout, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.conv(x).chunk(2, dim=1)
        return h * torch.sigmoid(gate)


class _GaussianHead(nn.Module):
    """A mean and a log-variance through hardtanh(-6, 2), as the paper's code bounds them."""

    def __init__(self, features: int, latent: int):
        super().__init__()
        self.mean, self.log_var = nn.Linear(features, latent), nn.Linear(features, latent)

    def forward(self, h: torch.Tensor) -> dist.Normal:
        log_var = nn.functional.hardtanh(self.log_var(h), -6.0, 2.0)
        return dist.Normal(self.mean(h), (0.5 * log_var).exp())


class ConvHVAE(nn.Module):
    """The paper's convHVAE with a VampPrior on z2 (see the module docstring for its layers)."""

    def __init__(self, latent: int = 40, components: int = 500, side: int = 28):
        super().__init__()
        self.side, features = side, 6 * (side // 4) ** 2
        self.q_z2_convs = nn.Sequential(GatedConv2d(1, 32, 7, 1, 3), GatedConv2d(32, 32, 3, 2, 1),
                                        GatedConv2d(32, 64, 5, 1, 2), GatedConv2d(64, 64, 3, 2, 1),
                                        GatedConv2d(64, 6, 3, 1, 1), nn.Flatten())
        self.q_z2_head = _GaussianHead(features, latent)
        self.q_z1_convs = nn.Sequential(GatedConv2d(1, 32, 3, 1, 1), GatedConv2d(32, 32, 3, 2, 1),
                                        GatedConv2d(32, 64, 3, 1, 1), GatedConv2d(64, 64, 3, 2, 1),
                                        GatedConv2d(64, 6, 3, 1, 1), nn.Flatten())
        self.q_z1_z2 = GatedDense(latent, features)
        self.q_z1_joint = GatedDense(2 * features, 300)
        self.q_z1_head = _GaussianHead(300, latent)
        self.p_z1_layers = nn.Sequential(GatedDense(latent, 300), GatedDense(300, 300))
        self.p_z1_head = _GaussianHead(300, latent)
        self.p_x_z1, self.p_x_z2 = GatedDense(latent, 300), GatedDense(latent, 300)
        self.p_x_pre = GatedDense(600, side * side)
        self.p_x_convs = nn.Sequential(GatedConv2d(1, 64, 3, 1, 1), GatedConv2d(64, 64, 3, 1, 1),
                                       GatedConv2d(64, 64, 3, 1, 1), GatedConv2d(64, 64, 3, 1, 1),
                                       nn.Conv2d(64, 1, 1), nn.Flatten())
        self.pseudo_inputs = nn.Linear(components, side * side, bias=False)
        nn.init.normal_(self.pseudo_inputs.weight, 0.05, 0.01)
        self.register_buffer("one_hot", torch.eye(components))

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, self.side, self.side)

    def q_z2(self, x: torch.Tensor) -> dist.Normal:
        return self.q_z2_head(self.q_z2_convs(self._image(x)))

    def prior_log_prob(self, z2: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(z_2) = \log \frac{1}{K} \sum_k q(z_2 \mid u_k)` over the pseudo-inputs :math:`u_k`."""
        u = nn.functional.hardtanh(self.pseudo_inputs(self.one_hot), 0.0, 1.0)
        q = self.q_z2(u)
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(q.loc.shape[0])),
                                         dist.Normal(q.loc, q.scale).to_event(1))
        return mixture.log_prob(z2)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Minus the single-sample ELBO, averaged over the batch."""
        q2 = self.q_z2(x)
        z2 = q2.rsample()
        h = torch.cat([self.q_z1_convs(self._image(x)), self.q_z1_z2(z2)], dim=-1)
        q1 = self.q_z1_head(self.q_z1_joint(h))
        z1 = q1.rsample()
        p1 = self.p_z1_head(self.p_z1_layers(z2))
        pre = self.p_x_pre(torch.cat([self.p_x_z1(z1), self.p_x_z2(z2)], dim=-1))
        logits = self.p_x_convs(self._image(pre))
        elbo = (dist.Bernoulli(logits=logits).log_prob(x).sum(-1) + p1.log_prob(z1).sum(-1)
                + self.prior_log_prob(z2) - q1.log_prob(z1).sum(-1) - q2.log_prob(z2).sum(-1))
        return -elbo.mean()


def _gated_step(quick: bool, images: torch.Tensor):
    """pyrovae's own SVI step for the bmnist-best model (smaller nets with ``quick``)."""
    settings = used_only({**preset_settings("bmnist-best"), "batch_size": images.shape[0]})
    if quick:
        settings.update(hidden_dims=[16, 16], prior_components=10)
    config = TrainConfig.from_dict(settings)
    model = build_model(config, data_dim=images.shape[1], train_images=images)
    optim = Optimizer(config.lr, config.clip_norm * config.batch_size, config.weight_decay)
    svi = SVI(model.model, model.guide, optim, loss=build_elbo(config))

    def step(x: torch.Tensor) -> float:
        with pyro.validation_enabled(False):  # as pyrovae's training loop runs it
            return svi.step(x)
    return step


def _conv_step(quick: bool):
    model = ConvHVAE(components=10 if quick else 500)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)

    def step(x: torch.Tensor) -> float:
        optimizer.zero_grad()
        loss = model.loss(x)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time a training step of the VampPrior paper's convolutional "
                                "two-level model (convHVAE) against pyrovae's gated two-level model, and say how "
                                "many epochs of each fit in 3 hours.")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians over them (default 5)")
    p.add_argument("--steps", type=int, default=4, help="timed steps of each arm per round (default 4)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, this machine's cores)")
    p.add_argument("--quick", action="store_true", help="batch 10, small nets, one round of one step (tests)")
    p.add_argument("--out", default="results/conv-pace", help="output folder for conv_pace.{json,md}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return exit_code_of("experiments/conv_pace.py", _main, args, argv)


def _main(args, argv) -> int:
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        raise ValueError("--rounds, --steps and --threads must each be at least 1")
    if args.quick:
        args.rounds, args.steps = 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = 10 if args.quick else BATCH
    x = torch.bernoulli(torch.full((batch, 784), 0.13))
    arms = {"gated": _gated_step(args.quick, x), "conv": _conv_step(args.quick)}
    for step in arms.values():  # one untimed step each: allocations and first-call costs
        step(x)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, step in arms.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x)
            times[name].append((time.perf_counter() - start) / args.steps)
    steps_per_epoch = math.ceil(TRAIN_IMAGES / BATCH)
    rows = {}
    for name, ts in times.items():
        ms = 1000 * statistics.median(ts)
        epoch_minutes = ms * steps_per_epoch / 60_000
        rows[name] = {"ms_per_step": ms, "epoch_minutes": epoch_minutes,
                      "epochs_in_3h": math.floor(BUDGET_SECONDS / (60 * epoch_minutes)), "rounds": ts}
    ratio = rows["conv"]["ms_per_step"] / rows["gated"]["ms_per_step"]
    lines = [f"Training step at batch {batch}, {args.threads} threads, median of {args.rounds} rounds of "
             f"{args.steps} steps{' (--quick: small nets, not a measurement)' if args.quick else ''}.", "",
             "| model | ms per step | minutes per epoch (500 steps) | epochs in 3 hours |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ms_per_step']:.0f} | {r['epoch_minutes']:.1f} | {r['epochs_in_3h']} |")
    lines += ["", f"convHVAE costs {ratio:.1f}x the gated model's step."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "conv_pace.json", {"batch": batch, "threads": args.threads, "rounds": args.rounds,
                                         "steps": args.steps, "quick": args.quick, "ratio": ratio, "arms": rows})
    write_text_atomic(out / "conv_pace.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
