"""Mixed precision, the optimiser's device-friendly paths, and CUDA (skipped without a GPU).

bf16 autocast works on the CPU too, so its maths is checked everywhere: the networks' matmuls
run in bfloat16, their outputs and every log density stay float32, and the ELBO stays close
to the float32 one.
"""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyrovae import TrainConfig, train
from pyrovae.data import binarize, load_dataset
from pyrovae.marginal import log_weight_terms
from pyrovae.model import build_model
from pyrovae.nets import set_autocast
from pyrovae.objectives import Optimizer, build_elbo, clip_grad_norm_
from pyrovae.runs import load_checkpoint, read_metrics

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: threads only add waiting on a busy machine
    yield
    torch.set_num_threads(before)


def _vae_and_batch(device="cpu", n=128, **settings):
    settings = {"dataset": "digits", "hidden_dims": (200,), "latent_dim": 8, **settings}
    config = TrainConfig(device=device, **settings).resolved()
    x = binarize(load_dataset("digits", "train").images[:n], 1).to(device)
    torch.manual_seed(0)
    return config, build_model(config, data_dim=x.shape[1], train_images=x).to(device), x


def _elbo_terms(model, x, seed=5, num_samples=4):
    torch.manual_seed(seed)
    with torch.no_grad(), pyro.get_param_store().scope():
        return log_weight_terms(model, x, num_samples)


def test_bf16_runs_the_matmuls_in_bf16_and_keeps_log_densities_in_float32():
    config, model, x = _vae_and_batch()
    fp32 = _elbo_terms(model, x)
    set_autocast(model, torch.bfloat16)
    seen = []
    hook = model.encoder.linear_maps[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    bf16 = _elbo_terms(model, x)
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)  # the matmuls did run in bf16 ...
    loc, log_scale = model.encoder(x)
    assert loc.dtype == log_scale.dtype == model.decoder(loc).dtype == torch.float32  # ... their outputs do not
    assert all(v.dtype == torch.float32 for v in bf16.values())
    elbo32 = fp32["log_lik"] + fp32["log_prior"] - fp32["log_q"]
    elbo16 = bf16["log_lik"] + bf16["log_prior"] - bf16["log_q"]
    assert not torch.equal(elbo16, elbo32)  # bf16 rounding is visible per example
    assert float(elbo16.mean()) == pytest.approx(float(elbo32.mean()), rel=1e-3)


def test_bf16_training_on_cpu_gives_float32_weights_and_a_close_elbo(tmp_path):
    settings = dict(dataset="digits", hidden_dims=(64,), latent_dim=4, epochs=2, batch_size=64, seed=2,
                    out=str(tmp_path), device="cpu")
    fp32 = train(TrainConfig(**settings, name="fp32"), progress=False)
    bf16 = train(TrainConfig(**settings, name="bf16", amp="bf16"), progress=False)
    state = load_checkpoint(bf16.run_dir / "last.pt")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    v32 = read_metrics(fp32.run_dir / "metrics.jsonl")[-1]["val_elbo"]
    v16 = read_metrics(bf16.run_dir / "metrics.jsonl")[-1]["val_elbo"]
    # the same seed: were --amp ignored the two runs would be bit for bit the same; bf16 rounding
    # makes them differ, by a small absolute amount after the same 46 steps
    assert v16 != v32 and abs(v16 - v32) < 1.0, (v16, v32)


def test_clipping_on_the_device_and_on_the_host_agree():
    torch.manual_seed(0)
    grads = [torch.randn(30, 20), torch.randn(20)]
    norm = float(torch.cat([g.flatten() for g in grads]).norm())
    for clip in (norm / 3, norm * 3):  # clipped, and left alone
        host, device = [g.clone() for g in grads], [g.clone() for g in grads]
        clip_grad_norm_(host, clip, sync=True)
        clip_grad_norm_(device, clip, sync=False)
        for a, b in zip(host, device):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        new_norm = float(torch.cat([g.flatten() for g in host]).norm())
        assert new_norm == pytest.approx(min(norm, clip), rel=1e-5)


def test_dropping_gradients_after_the_step_changes_no_number(monkeypatch):
    """The optimiser sets grads to None so that SVI's zero_grads allocates nothing; the
    parameters are those of the zeroed-gradient path, bit for bit."""
    config, _, x = _vae_and_batch(n=64, hidden_dims=(32,), latent_dim=4)

    def run():
        torch.manual_seed(0)
        model = build_model(config, data_dim=x.shape[1], train_images=x)
        optim = Optimizer(1e-3, config.clip_norm * 64)
        with pyro.get_param_store().scope():
            svi = SVI(model.model, model.guide, optim, loss=build_elbo(config))
            for _ in range(3):
                svi.step(x)
            grads = [p.grad for p in optim._params]
        return model.state_dict(), grads

    new, grads = run()
    assert all(g is None for g in grads)
    original = Optimizer.__call__

    def keep_grads(self, params, *a, **k):  # the old behaviour: leave grads for zero_grads
        saved = {p: p.grad for p in params}
        original(self, params, *a, **k)
        for p, g in saved.items():
            p.grad = g

    monkeypatch.setattr(Optimizer, "__call__", keep_grads)
    old, grads = run()
    assert all(g is not None for g in grads)
    assert all(torch.equal(new[k], old[k]) for k in new)


# --- CUDA ---------------------------------------------------------------------------------


@cuda
def test_cuda_training_keeps_data_on_the_device_and_checkpoints_on_the_host(tmp_path):
    from pyrovae.training import Trainer

    config = TrainConfig(dataset="digits", hidden_dims=(64,), latent_dim=4, epochs=2, batch_size=64,
                         out=str(tmp_path), name="gpu", device="cuda").resolved()
    with Trainer(config, progress=False) as trainer:  # (releases the run directory's lock: it never trains)
        assert trainer.data.train_grey.is_cuda and trainer.data.train_fixed.is_cuda and trainer.data.val.is_cuda
        assert all(p.is_cuda for p in trainer.model.parameters())
    result = train(TrainConfig(**{**config.to_dict(), "name": "gpu-run", "hidden_dims": (64,)}), progress=False)
    state = load_checkpoint(result.run_dir / "last.pt")
    assert all(v.device.type == "cpu" for v in state["model"].values())
    assert "cuda" in state["rng"][0]
    assert result.test is not None and result.test["elbo"] < 0


@cuda
def test_cuda_steps_wait_for_the_device_only_where_pyro_reads_the_loss():
    """Trace_ELBO reads each site's log-density sum with .item() (3 sites: z and x in the
    model, z in the guide); the rest of a pyrovae step (indexing, recorded terms, clipping,
    Adam) must not synchronise."""
    config, model, x = _vae_and_batch("cuda", n=512)
    optim = Optimizer(1e-3, config.clip_norm * 128)
    idx = torch.randperm(512, device="cuda").split(128)
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        svi = SVI(model.model, model.guide, optim, loss=build_elbo(config))
        svi.step(x[idx[0]])  # warm-up: the optimiser is built on the first step
        torch.cuda.synchronize()
        # the mode is process-wide: set and reset it where nothing can escape between the two (torch
        # announces the mode as a prototype with a warning, which the suite's filter would raise)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                torch.cuda.set_sync_debug_mode("warn")
                for b in idx[1:]:
                    svi.step(x[b])
            finally:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) <= 3 * (len(idx) - 1), [str(w.message)[:200] for w in syncs]


@cuda
def test_a_statically_binarised_split_is_the_same_images_on_the_gpu(tmp_path):
    """A seeded CUDA generator draws other bits than the CPU's: the fixed binary data (what a run is
    trained and scored on) are drawn on the host, so a GPU run and a CPU run see the same images."""
    from pyrovae.data import static_binarized
    from pyrovae.training import Trainer, prepare_data

    grey = load_dataset("digits", "train")
    on_host = static_binarized(grey).images
    assert torch.equal(static_binarized(grey.to("cuda")).images.cpu(), on_host)
    config = TrainConfig(dataset="digits", hidden_dims=(16,), latent_dim=2, epochs=1, out=str(tmp_path),
                         name="bits", device="cuda").resolved()
    assert torch.equal(prepare_data(config, "val", "cuda").images.cpu(), prepare_data(config, "val", "cpu").images)
    with Trainer(config, progress=False) as trainer:
        assert torch.equal(trainer.data.train_fixed.cpu(), on_host)


@cuda
def test_cuda_bf16_training_runs(tmp_path):
    result = train(TrainConfig(dataset="digits", hidden_dims=(64,), latent_dim=4, epochs=2, batch_size=64,
                               out=str(tmp_path), name="bf16", device="cuda", amp="bf16"), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert rows[-1]["val_elbo"] > rows[0]["val_elbo"] - 1 and rows[-1]["val_elbo"] < 0
