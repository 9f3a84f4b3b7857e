"""experiments/conv_pace.py: the paper's convHVAE as described, and a report that agrees with its timings."""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import conv_pace  # noqa: E402


def _gated_conv(cin, cout, k):
    return 2 * cout * (cin * k * k + 1)


def _gated_dense(a, b):
    return 2 * b * (a + 1)


def _head(a, d):
    return 2 * (a * d + d)


def test_conv_hvae_has_the_layers_of_the_papers_appendix():
    # counted layer by layer from the description (Tomczak & Welling 2018; convHVAE_2level.py), K = 500
    d, f = 40, 6 * 7 * 7
    q_z2 = (_gated_conv(1, 32, 7) + _gated_conv(32, 32, 3) + _gated_conv(32, 64, 5) + _gated_conv(64, 64, 3)
            + _gated_conv(64, 6, 3) + _head(f, d))
    q_z1 = (_gated_conv(1, 32, 3) + _gated_conv(32, 32, 3) + _gated_conv(32, 64, 3) + _gated_conv(64, 64, 3)
            + _gated_conv(64, 6, 3) + _gated_dense(d, f) + _gated_dense(2 * f, 300) + _head(300, d))
    p_z1 = _gated_dense(d, 300) + _gated_dense(300, 300) + _head(300, d)
    p_x = (2 * _gated_dense(d, 300) + _gated_dense(600, 784) + _gated_conv(1, 64, 3) + 3 * _gated_conv(64, 64, 3)
           + (64 + 1))
    pseudo = 500 * 784
    model = conv_pace.ConvHVAE()
    assert sum(p.numel() for p in model.parameters()) == q_z2 + q_z1 + p_z1 + p_x + pseudo
    assert model.q_z2_convs(torch.zeros(3, 1, 28, 28)).shape == (3, f)


def test_conv_hvae_loss_is_minus_the_elbo_of_its_parts():
    # the same noise, recomputed term by term with torch.distributions and an explicit log-sum-exp over K
    torch.manual_seed(0)
    model = conv_pace.ConvHVAE(components=3)
    x = torch.bernoulli(torch.full((4, 784), 0.2))
    torch.manual_seed(1)
    loss = model.loss(x)
    torch.manual_seed(1)
    q2 = model.q_z2(x)
    z2 = q2.rsample()
    h = torch.cat([model.q_z1_convs(x.view(-1, 1, 28, 28)), model.q_z1_z2(z2)], dim=-1)
    q1 = model.q_z1_head(model.q_z1_joint(h))
    z1 = q1.rsample()
    p1 = model.p_z1_head(model.p_z1_layers(z2))
    logits = model.p_x_convs(model.p_x_pre(torch.cat([model.p_x_z1(z1), model.p_x_z2(z2)], -1)).view(-1, 1, 28, 28))
    u = torch.nn.functional.hardtanh(model.pseudo_inputs.weight.T, 0, 1)  # the K pseudo-inputs, (K, 784)
    qk = model.q_z2(u)
    log_prior = torch.logsumexp(torch.stack([torch.distributions.Normal(qk.loc[k], qk.scale[k]).log_prob(z2).sum(-1)
                                             for k in range(3)]), dim=0) - math.log(3)
    bern = (x * torch.nn.functional.logsigmoid(logits) + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    elbo = bern + p1.log_prob(z1).sum(-1) + log_prior - q1.log_prob(z1).sum(-1) - q2.log_prob(z2).sum(-1)
    assert torch.allclose(loss, -elbo.mean(), rtol=1e-5)


def test_report_follows_from_the_timings(tmp_path):
    assert conv_pace.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "conv_pace.json").read_text())
    for arm in ("gated", "conv"):
        r = report["arms"][arm]
        assert math.isclose(r["ms_per_step"], 1000 * r["rounds"][0])
        assert math.isclose(r["epoch_minutes"], r["ms_per_step"] * 500 / 60_000)
        assert r["epochs_in_3h"] == math.floor(3 * 3600 / (60 * r["epoch_minutes"]))
    assert math.isclose(report["ratio"], report["arms"]["conv"]["ms_per_step"] / report["arms"]["gated"]["ms_per_step"])
    assert f"{report['ratio']:.1f}x" in (tmp_path / "conv_pace.md").read_text()


def test_bad_flags_are_one_line_and_exit_2(capsys):
    assert conv_pace.main(["--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
