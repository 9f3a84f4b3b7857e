"""experiments/adamnormgrad_parts.py: it finds every fused map of the paper's two-level model (each gated
layer's value and gate, each Gaussian head's mean and log-scale), its shares are the parts' norms over the
whole tensor's (so their squares sum to 1 per tensor), and the script runs on a finished run."""

import math

import torch
from conftest import load_experiment

from pyrovae import TrainConfig, build_model
from pyrovae.config import preset_settings

parts = load_experiment("adamnormgrad_parts")


def paper_two_level(**changes):
    """The hvae-vampprior-paper preset, small."""
    settings = {**preset_settings("hvae-vampprior-paper"), "hidden_dims": [8, 8], "latent_dim": 3,
                "lower_latent_dims": [2], "prior_components": 4, **changes}
    return TrainConfig.from_dict(settings).resolved()


def test_every_fused_map_of_the_two_level_model_is_found_with_its_parts():
    torch.manual_seed(0)
    model = build_model(paper_two_level(), data_dim=12)
    found = sorted(sizes for _, _, sizes in parts.fused_parts(model))
    # gated layers: q(z|x) 2, q(z1|x, z) 2 branches + 1 joint, p(z1|z) 2, p(x|z1, z) 2 branches + 1 joint;
    # Gaussian heads (mean, log-scale): q(z|x) 3 + 3, q(z1|x, z) and p(z1|z) 2 + 2
    assert found == [[2, 2], [2, 2], [3, 3]] + [[8, 8]] * 10


def test_shares_are_each_parts_norm_over_its_tensors_so_their_squares_sum_to_one():
    config = paper_two_level()
    torch.manual_seed(0)
    model = build_model(config, data_dim=12)
    images = (torch.rand(40, 12) > 0.5).float()
    measured = parts.shares(model, config, images, beta=1.0, steps=3, batch_size=10, seed=0)
    tensors = {}
    for key, values in measured.items():
        assert len(values) == 3 and all(0 < v <= 1 for v in values)
        tensors.setdefault(key.rsplit(" part ", 1)[0], []).append(values)
    assert len(tensors) == 2 * 13  # 13 fused maps, weight and bias each
    for name, per_part in tensors.items():
        for step in range(3):
            assert math.isclose(sum(p[step] ** 2 for p in per_part), 1.0, rel_tol=1e-4), name


def test_the_script_measures_a_finished_run_and_refuses_too_few_steps(tmp_path, capsys):
    from pyrovae import train

    common = {"dataset": "digits", "binarize": "static", "epochs": 1, "out": str(tmp_path), "no_tensorboard": True}
    run = train(paper_two_level(**common, name="hvae"), progress=False)
    assert parts.main([str(run.run_dir), "--data-dir", str(tmp_path), "--steps", "3", "--batch-size", "20"]) == 0
    out = capsys.readouterr().out
    assert "13 fused maps, 3 minibatches of 20" in out
    rows = [line for line in out.splitlines() if line.startswith("| trained") or line.startswith("| fresh")]
    assert len(rows) == 6 and "β = 1 | all | 52 |" in rows[0] and "β = 1 | weights | 26 |" in rows[1]
    assert "β = 1 | biases | 26 |" in rows[2] and "β = 0.01 | all | 52 |" in rows[3]
    plain = train(TrainConfig(hidden_dims=(8,), latent_dim=2, likelihood="gaussian", **{**common, "binarize": "none"},
                              name="plain", scale_head="log-scale"), progress=False)
    code = parts.main([str(plain.run_dir), "--data-dir", str(tmp_path), "--steps", "3"])
    assert code == 0  # a plain MLP VAE still has its encoder's fused mean and log-scale head
    assert parts.main([str(plain.run_dir), "--data-dir", str(tmp_path), "--steps", "1"]) == 2
    assert "--steps must be at least 2" in capsys.readouterr().err
