"""Settings files: --config (JSON or TOML) and presets, checked key by key."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, cli

from pyrovae import TrainConfig

FLAGS = ["--dataset", "digits", "--hidden-dims", "16", "--latent-dim", "3", "--epochs", "1", "--seed", "4",
         "--prior", "mog", "--prior-components", "3", "--quiet", "--no-tensorboard"]


def _config_json(tmp_path, name, *args):
    return json.loads((tmp_path / name / "config.json").read_text())


def test_a_file_and_overriding_flags_give_the_config_json_of_the_flags_alone(capsys, tmp_path):
    code, _, err = cli(capsys, "train", *FLAGS, "--out", str(tmp_path), "--name", "flags")
    assert code == 0, err
    toml = tmp_path / "s.toml"
    toml.write_text('dataset = "digits"\nhidden_dims = [16]\nlatent_dim = 3\nepochs = 7\nseed = 4\nprior = "mog"\n'
                    "prior_components = 3\n")
    code, _, err = cli(capsys, "train", "--config", str(toml), "--epochs", "1", "--quiet", "--no-tensorboard",
                       "--out", str(tmp_path), "--name", "toml")
    assert code == 0, err
    as_json = tmp_path / "s.json"
    as_json.write_text(json.dumps({"dataset": "digits", "hidden_dims": [16], "latent_dim": 3, "epochs": 1, "seed": 4,
                                   "prior": "mog", "prior_components": 3, "no_tensorboard": True}))
    code, _, err = cli(capsys, "train", "--config", str(as_json), "--quiet", "--out", str(tmp_path), "--name", "json")
    assert code == 0, err
    a, b, c = (_config_json(tmp_path, n) for n in ("flags", "toml", "json"))
    for d in (a, b, c):
        d.pop("name")
    assert a == b == c
    # a run's own config.json is a settings file too
    code, _, err = cli(capsys, "train", "--config", str(tmp_path / "flags" / "config.json"), "--name", "again",
                       "--quiet")
    assert code == 0, err
    again = _config_json(tmp_path, "again")
    again.pop("name")
    assert again == a


@pytest.mark.parametrize("text, suffix, message", [
    ("latent_dim = 3\nlatnet_dim = 4\n", ".toml", "unknown setting 'latnet_dim' (did you mean 'latent_dim'?)"),
    ('latent_dim = "three"\n', ".toml", "setting 'latent_dim' must be a whole number"),
    ('prior = "gan"\n', ".toml", "setting 'prior' must be one of standard, mog, vamp"),
    ("latent_dim = \n", ".toml", "is not valid TOML"),
    ('{"lr": NaN}', ".json", "is not valid JSON"),
    ('[1, 2]', ".json", "expected a table of settings"),
    ("x", ".yaml", "must end in .json or .toml"),
])
def test_every_bad_settings_file_is_one_line_naming_the_key_and_the_file(capsys, tmp_path, text, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    code, _, err = cli(capsys, "train", "--config", str(path), "--out", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err and str(path) in err
    code, _, err = cli(capsys, "train", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path))
    assert code == 2 and "not found" in err


def test_the_example_file_in_docs_is_a_valid_settings_file():
    from pyrovae.config import read_settings_file

    config = TrainConfig.from_file(ROOT / "docs" / "config-example.toml").resolved()
    assert config.guide == "iaf" and read_settings_file(ROOT / "docs" / "config-example.toml")["prior"] == "vamp"


def test_resume_refuses_a_settings_file(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--resume", str(tmp_path), "--config", str(tmp_path / "x.toml"))
    assert code == 2 and "--resume" in err
