r"""The VampPrior paper's settings (Tomczak & Welling 2018, github.com/jmtomczak/vae_vampprior), each
against its formula, and the weight average (``--ema``) against a hand computation."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from conftest import SHIPPED, cli
from torch import nn

from pyrovae import TrainConfig, build_model, load_run
from pyrovae.averaging import WeightAverage
from pyrovae.config import preset_settings
from pyrovae.metrics import split_scores
from pyrovae.nets import Encoder, log_scale_from
from pyrovae.objectives import Optimizer
from pyrovae.runs import load_checkpoint, read_metrics
from pyrovae.training import VAL_SEED, count_since_best

#: the reference code's values, read from its files: experiment.py's argparse defaults, utils/load_data.py's
#: static-MNIST overrides, utils/optimizer.py, utils/nn.py, models/Model.py, utils/training.py and
#: utils/perform_experiment.py
REFERENCE = {
    "lr": 5e-4,  # --lr 0.0005
    "batch_size": 100,  # --batch_size 100
    "epochs": 2000,  # --epochs 2000
    "patience": 50,  # --early_stopping_epochs 50
    "warmup_epochs": 100,  # --warmup 100
    "latent_dim": 40,  # --z2_size (the top layer) and --z1_size: 40
    "prior_components": 500,  # --number_components 500
    "hidden_dims": (300, 300),  # GatedDense(., 300) twice
    "net": "gated",
    "prior": "vamp",
    "lr_schedule": "constant",  # no scheduler
    "optimizer": "adamnormgrad",  # AdamNormGrad
    "norm_grad_by": "map",  # ... over each nn.Linear's own weight and bias: gated value and gate, mean and log-var
    "clip_norm": 0.0,  # no clipping
    "weight_decay": 0.0,  # AdamNormGrad(weight_decay=0)
    "init": "he",  # he_init on every nn.Linear
    "scale_head": "clipped-log-var",  # NonLinear(300, z, activation=Hardtanh(-6, 2))
    "pseudo_inputs": "hardtanh",  # means = NonLinear(K, D, bias=False, activation=Hardtanh(0, 1))
    "prior_init": "normal",  # normal_init(means, 0.05, 0.01) for static MNIST (load_data.py)
    "warmup_unit": "epoch",  # beta = epoch / warmup, once per epoch
    "patience_after_warmup": True,  # "if epoch < args.warmup: e = 0"
    "num_particles": 1,
    "elbo": "trace",
    "binarize": "none",  # static MNIST as published
}


@pytest.mark.parametrize("preset, two_level", [("vampprior-paper", False), ("hvae-vampprior-paper", True)])
def test_the_paper_presets_resolve_to_the_reference_codes_defaults(preset, two_level):
    c = TrainConfig.from_dict(preset_settings(preset)).resolved()
    got = {k: getattr(c, k) for k in REFERENCE}
    assert got == REFERENCE
    assert c.dataset == "binarized-mnist"
    assert (c.hierarchy, c.lower_latent_dims) == (("two-level", (40,)) if two_level else ("stack", ()))


#: the 3-hour recipe: --preset bmnist-best with these flags
RECIPE_FLAGS = {"elbo": "iwae", "num_particles": 20, "ema": 0.999, "scale_head": "clipped-log-var", "epochs": 100,
                "patience": 10, "weight_decay": 0.1}


def test_the_three_hour_preset_is_bmnist_best_with_the_recipes_flags_and_100_minutes():
    recipe = TrainConfig.from_dict(preset_settings("bmnist-3h")).resolved().to_dict()
    best = TrainConfig.from_dict({**preset_settings("bmnist-best"), **RECIPE_FLAGS}).resolved().to_dict()
    assert {k: (recipe[k], v) for k, v in best.items() if recipe[k] != v} == {"time_limit": ("100m", "30m")}


def test_the_best_recipes_preset_is_bmnist_3h_with_dreg_at_3e_3_and_trains_the_shipped_runs_settings():
    recipe = TrainConfig.from_dict(preset_settings("bmnist-3h")).resolved().to_dict()
    dreg = TrainConfig.from_dict(preset_settings("bmnist-3h-dreg")).resolved().to_dict()
    assert {k: (dreg[k], v) for k, v in recipe.items() if dreg[k] != v} == {
        "iwae_gradient": ("dreg", "reparam"), "lr": (3e-3, 1e-3), "epochs": (79, 100), "time_limit": ("3h", "100m"),
        "prior_init_epochs": (7, 10)}  # resolved from the epochs
    # the shipped run was trained by flags on bmnist-3h (its command is on the results page) with a looser budget
    # that it never reached; everything else it ran with is what the preset gives
    shipped = json.loads((SHIPPED / "bmnist-3h-dreg-lr3e-3" / "config.json").read_text())
    bookkeeping = {"data_dir", "out", "name", "no_test_score", "time_limit"}
    assert {k: (dreg[k], v) for k, v in shipped.items() if k not in bookkeeping and dreg[k] != v} == {}
    assert json.loads((SHIPPED / "bmnist-3h-dreg-lr3e-3" / "summary.json").read_text())["train_seconds"] < 3 * 3600


def test_clipped_log_variances_are_half_a_hard_tanh_to_minus_6_and_2():
    raw = torch.tensor([-20.0, -6.0, -1.0, 0.0, 1.5, 2.0, 20.0], requires_grad=True)
    log_scale = log_scale_from(raw, "clipped-log-var")
    assert torch.equal(log_scale, 0.5 * torch.tensor([-6.0, -6.0, -1.0, 0.0, 1.5, 2.0, 2.0]))
    log_scale.sum().backward()
    # no gradient at or beyond the bounds (torch's hardtanh, as in the paper's code: a log-variance pushed out
    # stays out)
    assert raw.grad.tolist() == [0.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0]
    assert torch.equal(log_scale_from(raw, "log-scale"), raw)
    enc = Encoder(5, (8,), 3, scale_head="clipped-log-var")
    _, s, _ = enc.with_context(1e4 * torch.randn(64, 5))
    assert s.min() >= -3.0 and s.max() <= 1.0 and (s == -3.0).any() | (s == 1.0).any()


def test_hardtanh_pseudo_inputs_start_at_the_papers_grey_and_stay_in_0_1():
    c = TrainConfig(dataset="digits", prior="vamp", prior_components=400, pseudo_inputs="hardtanh",
                    prior_init="normal", latent_dim=4, hidden_dims=(16,)).resolved()
    vae = build_model(c, data_dim=64, train_images=torch.rand(500, 64))
    u = vae.prior.pseudo_inputs
    assert u.shape == (400, 64)
    assert abs(u.mean().item() - 0.05) < 1e-3 and abs(u.std().item() - 0.01) < 1e-3  # N(0.05, 0.01^2)
    with torch.no_grad():
        vae.prior.pseudo_params.copy_(torch.linspace(-1, 2, 400 * 64).reshape(400, 64))
    u = vae.prior.pseudo_inputs
    assert u.min() == 0.0 and u.max() == 1.0
    a = vae.prior.pseudo_params
    (u * torch.randn_like(u)).sum().backward()
    inside = (a > 0) & (a < 1)
    assert bool((a.grad[~inside] == 0).all()) and bool((a.grad[inside] != 0).all())


def test_he_init_draws_every_linear_weight_from_n_0_2_over_fan_in():
    c = TrainConfig(dataset="digits", net="gated", hidden_dims=(300, 300), latent_dim=40, init="he").resolved()
    torch.manual_seed(1)
    vae = build_model(c, data_dim=784)
    linears = [m for m in vae.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6
    for m in linears:
        w = m.weight.detach()
        want = math.sqrt(2.0 / m.in_features)
        assert abs(w.std().item() / want - 1) < 0.03 and abs(w.mean().item()) < 0.05 * want
        assert m.bias.abs().max() <= 1 / math.sqrt(m.in_features)  # biases keep PyTorch's start
    torch.manual_seed(1)
    default = build_model(dataclass_replace(c, init="torch"), data_dim=784)
    w = next(m for m in default.modules() if isinstance(m, nn.Linear)).weight
    assert w.abs().max() <= 1 / math.sqrt(784)  # PyTorch's uniform start, for contrast


def test_xavier_init_draws_each_maps_weights_from_n_0_2_over_its_fan_in_plus_fan_out():
    """The first version's xavier_init on the gated nets: each of a fused map's parts (a gated layer's value
    and gate, a head's mean and scale) takes its own fan-out, as the reference code's separate layers do."""
    from pyrovae.nets import FUSED_PARTS

    c = TrainConfig(dataset="digits", net="gated", hidden_dims=(300, 300), latent_dim=40, init="xavier").resolved()
    torch.manual_seed(1)
    vae = build_model(c, data_dim=784)
    linears = [m for m in vae.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 and sum(hasattr(m.weight, FUSED_PARTS) for m in linears) >= 5
    for m in linears:
        parts = getattr(m.weight, FUSED_PARTS, (m.out_features,))
        for w in m.weight.detach().split(list(parts), dim=0):
            want = math.sqrt(2.0 / (m.in_features + w.shape[0]))
            whole = math.sqrt(2.0 / (m.in_features + m.out_features))
            assert abs(w.std().item() / want - 1) < 0.03 and abs(w.mean().item()) < 0.05 * want
            if len(parts) > 1:  # the fused map's whole fan-out would have drawn them measurably narrower
                assert abs(w.std().item() / whole - 1) > 0.04
        assert m.bias.abs().max() <= 1 / math.sqrt(m.in_features)  # biases keep PyTorch's start


def test_unbounded_pseudo_inputs_are_their_own_parameters_from_a_xavier_start():
    """--pseudo-inputs none --prior-init xavier: the first version's bias-free linear layer of one-hot inputs,
    u_k = a_k with a ~ N(0, 2/(K + D)); no bound, so every pixel keeps its gradient, outside [0, 1] too."""
    c = TrainConfig(dataset="digits", prior="vamp", prior_components=400, pseudo_inputs="none",
                    prior_init="xavier", latent_dim=4, hidden_dims=(16,)).resolved()
    vae = build_model(c, data_dim=64, train_images=torch.rand(1000, 64))
    u = vae.prior.pseudo_inputs
    want = math.sqrt(2.0 / (400 + 64))
    assert abs(u.std().item() / want - 1) < 0.03 and abs(u.mean().item()) < 0.05 * want
    assert bool((u < 0).any())  # a start no squash would allow
    a = vae.prior.pseudo_params
    with torch.no_grad():
        a.copy_(torch.linspace(-1, 2, 400 * 64).reshape(400, 64))
    assert torch.equal(vae.prior.pseudo_inputs, a)
    (vae.prior.pseudo_inputs * torch.randn(400, 64)).sum().backward()
    assert bool((a.grad != 0).all())


def dataclass_replace(c, **kw):
    import dataclasses

    return dataclasses.replace(c, **kw)


def test_adamnormgrad_takes_adams_step_on_each_gradient_divided_by_its_norm():
    """Three steps on f(a, b) = sum(c_a * a^2) + sum(c_b * b), against the update written out by hand."""
    a0, b0 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 4.0])
    ca, cb = torch.tensor([1.0, 10.0, 100.0]), torch.tensor([-0.3, 0.7])
    a = pyro.param("a", a0.clone())
    b = pyro.param("b", b0.clone())
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opt = Optimizer(lr, normalize_grads=True)
    hand = {"a": [a0.clone(), torch.zeros(3), torch.zeros(3)], "b": [b0.clone(), torch.zeros(2), torch.zeros(2)]}
    for t in range(1, 4):
        for p in (a, b):
            p.grad = None
        ((ca * a**2).sum() + (cb * b).sum()).backward()
        opt({a.unconstrained(), b.unconstrained()} if hasattr(a, "unconstrained") else {a, b})
        for name, grad_of in (("a", lambda w: 2 * ca * w), ("b", lambda w: cb)):
            w, m, v = hand[name]
            g = grad_of(w)
            g = g / (g.norm() + 1e-7)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            hand[name] = [w, m, v]
        assert torch.allclose(a.detach(), hand["a"][0], atol=1e-6, rtol=0)
        assert torch.allclose(b.detach(), hand["b"][0], atol=1e-6, rtol=0)
    # the step does not depend on the loss's scale: a 1000x larger loss moves the weights the same way
    pyro.clear_param_store()
    a2 = pyro.param("a", a0.clone())
    opt2 = Optimizer(lr, normalize_grads=True)
    (1000 * (ca * a2**2).sum()).backward()
    opt2({a2})
    pyro.clear_param_store()
    a3 = pyro.param("a", a0.clone())
    opt3 = Optimizer(lr, normalize_grads=True)
    ((ca * a3**2).sum()).backward()
    opt3({a3})
    assert torch.allclose(a2.detach(), a3.detach(), atol=1e-7, rtol=0)


def test_adamnormgrad_map_by_map_divides_each_fused_maps_gradient_by_its_own_norm():
    """A linear map that stacks two maps (rows 0-1 and 2-3, as a gated layer's value and gate): the first
    map's loss is quadratic, so its gradient shrinks, the second's linear. Eight steps against the hand
    computation with each part normalised on its own; normalising the tensor whole (the default,
    --norm-grad-by tensor) lets the second part's share of the norm grow, and its steps with it."""
    from pyrovae.nets import FUSED_PARTS, mark_fused

    w0, b0 = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.2], [2.0, 2.0]]), torch.tensor([0.1, -0.4, 2.0, 1.0])
    c = torch.tensor([[5.0], [3.0], [0.1], [-0.2]])  # quadratic in rows 0-1, linear in rows 2-3

    def loss_grad(v):  # d/dv of sum(c * v^2) over rows 0-1 + sum(c * v) over rows 2-3
        c_ = c if v.dim() == 2 else c[:, 0]
        return torch.cat([2 * c_[:2] * v[:2], c_[2:] * torch.ones_like(v[2:])])

    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    ends = {}
    for split in (True, False):
        pyro.clear_param_store()
        lin = nn.Linear(2, 4)
        with torch.no_grad():
            lin.weight.copy_(w0)
            lin.bias.copy_(b0)
        mark_fused(lin, (2, 2))
        pyro.module("lin", lin)
        opt = Optimizer(lr, normalize_grads=True, split_fused=split)
        hand = {"w": [w0.clone(), torch.zeros(4, 2), torch.zeros(4, 2)], "b": [b0.clone(), torch.zeros(4),
                                                                               torch.zeros(4)]}
        for t in range(1, 9):
            lin.zero_grad(set_to_none=True)
            for v in (lin.weight, lin.bias):
                ((c if v.dim() == 2 else c[:, 0])[:2] * v[:2] ** 2).sum().add(
                    ((c if v.dim() == 2 else c[:, 0])[2:] * v[2:]).sum()).backward()
            opt(set(lin.parameters()))
            for name in ("w", "b"):
                v, m, s2 = hand[name]
                g = loss_grad(v)
                parts = g.split(2, dim=0) if split else [g]
                g = torch.cat([q / (q.norm() + 1e-7) for q in parts])
                m = b1 * m + (1 - b1) * g
                s2 = b2 * s2 + (1 - b2) * g * g
                v = v - lr * (m / (1 - b1**t)) / ((s2 / (1 - b2**t)).sqrt() + eps)
                hand[name] = [v, m, s2]
            assert torch.allclose(lin.weight.detach(), hand["w"][0], atol=1e-5, rtol=0), (split, t)
            assert torch.allclose(lin.bias.detach(), hand["b"][0], atol=1e-5, rtol=0), (split, t)
        assert getattr(lin.weight, FUSED_PARTS) == (2, 2)
        ends[split] = lin.weight.detach().clone()
    assert (ends[True] - ends[False]).abs().max() > 1e-3  # (the hand checks above hold to 1e-5)


def test_the_paper_model_marks_every_fused_map_and_training_normalises_them_apart():
    """Through Pyro's parameter store and SVI: after two steps from one start (Adam's first step is the same
    either way, up to its eps), --norm-grad-by map and tensor differ in the fused tensors and nowhere else."""
    from pyro.infer import SVI

    from pyrovae.marginal import isolated_params
    from pyrovae.nets import FUSED_PARTS
    from pyrovae.objectives import build_elbo

    settings = {**preset_settings("hvae-vampprior-paper"), "hidden_dims": [8, 8], "latent_dim": 3,
                "lower_latent_dims": [2], "prior_components": 4}
    x = torch.bernoulli(torch.full((20, 12), 0.3), generator=torch.Generator().manual_seed(0))
    after = {}
    for by in ("map", "tensor"):
        config = TrainConfig.from_dict({**settings, "norm_grad_by": by}).resolved()
        torch.manual_seed(0)
        vae = build_model(config, data_dim=12, train_images=x)
        fused = {n for n, p in vae.named_parameters() if hasattr(p, FUSED_PARTS)}
        assert len(fused) == 26  # 13 maps (10 gated layers, 3 Gaussian heads), weight and bias each
        with isolated_params():
            svi = SVI(vae.model, vae.guide, Optimizer(1e-2, normalize_grads=True, split_fused=by == "map"),
                      loss=build_elbo(config))
            for _ in range(2):
                torch.manual_seed(1)
                svi.step(x, 1.0)
        after[by] = {n: p.detach().clone() for n, p in vae.named_parameters()}
    moved = {n: (after["map"][n] - after["tensor"][n]).abs().max().item() for n in after["map"]}
    # (elsewhere only float noise: Adam's eps makes the first step depend on the gradient's scale at 1e-8)
    assert {n for n, d in moved.items() if d > 1e-6} == fused, moved


@pytest.mark.parametrize("after_warmup, expected_stop", [(False, 3), (True, 6)])
def test_patience_counts_from_the_end_of_the_warm_up_as_the_papers_loop_does(after_warmup, expected_stop):
    """Validation that peaks in epoch 1 and then only falls: with patience 2 and a 5-epoch warm-up the paper's
    loop resets its counter in epochs 1-4 and stops once 2 more epochs have passed without a gain. (The paper's
    code tests ``e > patience`` and so stops one epoch later, at 7: with its patience of 50, after 51 epochs.)"""
    since, best = 0, -math.inf
    for epoch in range(1, 20):
        val = -epoch  # falls every epoch after the first
        improved = val > best
        best = max(best, val)
        since = count_since_best(since, improved, epoch, warmup_epochs=5, after_warmup=after_warmup)
        if since >= 2:
            break
    assert epoch == expected_stop


def test_a_per_epoch_warm_up_holds_e_over_w_for_a_whole_epoch(tmp_path):
    from pyrovae import train

    result = train(TrainConfig(dataset="digits", hidden_dims=(16,), latent_dim=2, epochs=5, warmup_epochs=4,
                               warmup_unit="epoch", out=str(tmp_path), name="w", no_tensorboard=True), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["kl_scale"] for r in rows] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_the_weight_average_matches_a_hand_computation():
    lin = nn.Linear(2, 1)
    ema = WeightAverage(lin, 0.9)
    w0 = lin.weight.detach().clone()
    hand = w0.clone()
    for t in range(1, 6):
        with torch.no_grad():
            lin.weight.add_(float(t))
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))
        hand = d * hand + (1 - d) * lin.weight.detach()
        assert torch.allclose(ema.average[0], hand, atol=1e-6, rtol=0)
    raw = lin.weight.detach().clone()
    with ema.swapped():
        assert torch.equal(lin.weight.detach(), ema.average[0])
    assert torch.equal(lin.weight.detach(), raw)


def ema_config(tmp_path, name, epochs):
    return TrainConfig(dataset="digits", hidden_dims=(16,), latent_dim=2, epochs=epochs, ema=0.95,
                       lr_schedule="constant", out=str(tmp_path), name=name, no_tensorboard=True)


def test_the_average_resumes_bit_for_bit_and_evaluate_uses_it_and_says_so(tmp_path, capsys):
    from pyrovae import train

    train(ema_config(tmp_path, "straight", 4), progress=False)
    train(ema_config(tmp_path, "cut", 2), progress=False)
    train(ema_config(tmp_path, "cut", 4), resume=tmp_path / "cut", progress=False)
    one = load_checkpoint(tmp_path / "straight" / "last.pt")
    two = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert one["ema"]["steps"] == two["ema"]["steps"] > 0
    for k, v in one["ema"]["params"].items():
        assert torch.equal(v, two["ema"]["params"][k]), k
    assert any(not torch.equal(one["ema"]["params"][k], one["model"][k]) for k in one["ema"]["params"])
    # validation scored the averaged weights: the last row's figure is theirs, with the same noise
    run = load_run(tmp_path / "straight", which="last")
    assert run.weights == "averaged"
    for k, v in one["ema"]["params"].items():
        assert torch.equal(dict(run.model.named_parameters())[k].detach(), v)
    from pyrovae.training import prepare_data

    val = prepare_data(run.config, "val", "cpu").images
    with torch.random.fork_rng():
        torch.manual_seed(VAL_SEED)
        score = split_scores(run.model, val, num_samples=1)["elbo"]
    assert score == pytest.approx(read_metrics(tmp_path / "straight" / "metrics.jsonl")[-1]["val_elbo"], abs=1e-4)
    reports = {}
    for weights in ("averaged", "raw"):
        code, out, err = cli(capsys, "evaluate", str(tmp_path / "straight"), "--num-samples", "10", "--weights",
                             weights, "--split", "val", "--json", "-", "--quiet")
        assert code == 0, err
        reports[weights] = json.loads(out[out.index("{"):])
        assert ("averaged (the run's --ema" in out) == (weights == "averaged")
    assert reports["averaged"]["weights"] == "averaged" and reports["raw"]["weights"] == "raw"
    assert reports["averaged"]["elbo"] != reports["raw"]["elbo"]


def test_the_differences_study_changes_one_setting_per_row_and_writes_its_table(tmp_path):
    from conftest import load_experiment
    from test_binarized_mnist import amat_text, images, write

    d = tmp_path / "bm"
    d.mkdir()
    for name, n in (("train", 40), ("valid", 12)):
        write(d / f"binarized_mnist_{name}.amat", amat_text(images(n, seed=len(name))))
    study = load_experiment("paper_differences")
    args = study._parser().parse_args(["--data-dir", str(d), "--quick"])
    paper = TrainConfig.from_dict(study.row_settings("paper", args)).resolved().to_dict()
    for name, _, back in study.ROWS[1:]:
        row = TrainConfig.from_dict(study.row_settings(name, args)).resolved().to_dict()
        changed = {k for k in row if row[k] != paper[k]}
        assert changed == set(back), (name, changed)  # exactly the settings the row puts back
    code = study.main(["--data-dir", str(d), "--quick", "--quiet", "--out", str(tmp_path / "out"),
                       "--rows", "paper,optimizer"])
    assert code == 0
    table = (tmp_path / "out" / "differences.md").read_text()
    assert "| paper |" in table and "| optimizer | AdamNormGrad -> Adam |" in table


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_the_two_level_objective_and_its_gradients_are_the_papers_equations_written_out(beta):
    """What ``hvae-vampprior-paper`` trains on is, to float precision in value and in every gradient, the
    reference code's loss for HVAE_2level written out by hand from its equations (summed over the batch; the
    reference averages, a scale AdamNormGrad removes):

    loss = -[log p(x|z1,z2) + beta (log p(z1|z2) + log p(z2) - log q(z1|x,z2) - log q(z2|x))],
    z2 = mu + sigma eps2 from q(z2|x), z1 = mu + sigma eps1 from q(z1|x,z2), log-variances hardtanh(r, -6, 2),
    p(z2) = 1/K sum_k N(z2; q(.|u_k)), u_k = hardtanh(a_k, 0, 1), p(x|z1,z2) Bernoulli with sigmoid means.

    Here every piece the training path builds through Pyro (sites, plates, scales, the VampPrior's
    matmul mixture, the objective object) is checked against one plain-torch path."""
    from pyro import poutine
    from torch.nn.functional import hardtanh, logsigmoid

    from pyrovae.marginal import isolated_params
    from pyrovae.objectives import build_elbo

    config = TrainConfig.from_dict({**preset_settings("hvae-vampprior-paper"), "prior_components": 7}).resolved()
    torch.manual_seed(0)
    vae = build_model(config, data_dim=784)
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    with isolated_params():
        torch.manual_seed(1)
        guide = poutine.trace(vae.guide).get_trace(x, beta)
        torch.manual_seed(1)  # the same noise: the objective runs the guide first
        pyro_loss = build_elbo(config).differentiable_loss(vae.model, vae.guide, x, beta)
    params = [p for p in vae.parameters() if p.requires_grad]
    pyro_grads = torch.autograd.grad(pyro_loss, params, allow_unused=True)

    def eps(site):  # the standard normal noise behind the guide's draw
        fn = guide.nodes[site]["fn"].base_dist
        return ((guide.nodes[site]["value"] - fn.loc) / fn.scale).detach()

    def log_normal(z, mu, logvar):  # the reference's log_Normal_diag, with the 2 pi it leaves out
        return (-0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp())).sum(-1)

    def head(raw):  # the mean as an affine output, the log-variance through hardtanh(-6, 2)
        mu, r = raw.chunk(2, dim=-1)
        return mu, hardtanh(r, -6.0, 2.0)

    def q_z2(v):
        mu, log_scale = vae.encoder(v)  # (its own head, checked above: log-variance = 2 log-scale)
        return mu, 2 * log_scale

    mu2, lv2 = q_z2(x)
    z2 = mu2 + (0.5 * lv2).exp() * eps("z").reshape(mu2.shape)
    mu1, lv1 = head(vae.z1_encoder(x, z2))
    z1 = mu1 + (0.5 * lv1).exp() * eps("z1").reshape(mu1.shape)
    p_mu1, p_log_scale1 = vae.z1_prior(z2)
    logits = vae.decoder(z1, z2)
    log_px = (x * logsigmoid(logits) + (1 - x) * logsigmoid(-logits)).sum(-1)
    u = hardtanh(vae.prior.pseudo_params, 0.0, 1.0)
    m_k, lv_k = q_z2(u)
    log_pz2 = torch.logsumexp(log_normal(z2[:, None], m_k, lv_k), dim=1) - math.log(len(u))
    kl = -(log_normal(z1, p_mu1, 2 * p_log_scale1) + log_pz2 - log_normal(z1, mu1, lv1) - log_normal(z2, mu2, lv2))
    hand_loss = (-log_px + beta * kl).sum()
    hand_grads = torch.autograd.grad(hand_loss, params, allow_unused=True)

    assert torch.allclose(pyro_loss, hand_loss, rtol=1e-5), (pyro_loss.item(), hand_loss.item())
    names = [n for n, p in vae.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, pyro_grads, hand_grads):
        assert (got is None) == (want is None), name
        if want is not None:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item()), name
    assert any(n.startswith("prior.") and g is not None and g.abs().sum() > 0 for n, g in zip(names, hand_grads))
