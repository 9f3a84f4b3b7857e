"""Every training setting, with its default, in one dataclass.

The command line is generated from :class:`TrainConfig` (``pyrovae train --help`` shows
the help strings below), the run directory stores it as ``config.json`` and
``pyrovae train --resume`` reads it back. A default is written here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import DATASETS

# parse_duration and unresumable, helpers of the trainer's --time-limit and --resume, stay importable but are not
# public
__all__ = ["TrainConfig", "preset_settings", "used_only", "resumed_config", "PREBINARIZED"]


def _setting(default, help: str, choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


MODELS = ("vae", "ae", "pca", "mixture")
#: values of --net (the networks of pyrovae.nets)
NETS = ("mlp", "gated", "conv")
#: values of --scale-head (pyrovae.nets.log_scale_from)
SCALE_HEADS = ("log-scale", "clipped-log-var")
#: values of --init (pyrovae.nets.init_weights_)
INITS = ("torch", "he", "xavier")
#: values of --pseudo-inputs (pyrovae.priors.VampPrior)
PSEUDO_INPUTS = ("sigmoid", "hardtanh", "none")
LIKELIHOODS = ("bernoulli", "gaussian")
ELBOS = ("trace", "meanfield", "iwae")
#: values of --iwae-gradient (pyrovae.objectives): the guide's gradient estimator for --elbo iwae
IWAE_GRADIENTS = ("reparam", "dreg")
IWAE_GRADIENT_HELP = ("with --elbo iwae: how the guide's gradient is estimated; reparam (Pyro's RenyiELBO, the "
                      "reparameterised gradient of the bound) or dreg (the doubly reparameterised estimator of Tucker "
                      "et al. 2019: the same expected gradient with less noise for q(z|x) at large k; the model's "
                      "gradient is unchanged; --guide gaussian only)")
GUIDES = ("gaussian", "iaf")
#: values of --estimator (evaluate, compare): importance sampling, annealed importance sampling, quadrature
ESTIMATORS = ("is", "ais", "quadrature")
HIERARCHIES = ("stack", "two-level")
#: settings that may change when a run is resumed (the others are the run's own)
RESUMABLE = ("epochs", "patience", "time_limit", "device", "no_tensorboard", "tensorboard_images_every", "data_dir",
             "download", "no_test_score")
#: of those, the ones that make a finished run train on when changed (the others change only where and how it runs;
#: a moved --data-dir must hold the same data, which the checkpoint's fingerprint of the training split checks)
CONTINUES = ("epochs", "patience", "time_limit")
#: datasets whose pixels are 0/1 samples fixed by their authors: --binarize never resamples them
PREBINARIZED = tuple(name for name, spec in DATASETS.items() if spec.prebinarized)
#: --epochs when it is not given and there is no --time-limit
DEFAULT_EPOCHS = 450
#: --epochs when it is not given and there is a --time-limit: the budget rules
BUDGET_EPOCHS = 1_000_000
#: units of --time-limit, in seconds
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
#: the learning rate when --lr is not given. Adam moves a parameter by about lr per step, so
#: the finite mixture's pixel logits (which must reach about +-7 from about +-1) take 0.05:
#: at 2e-3 its K=10 test log p(x) after 100 epochs on mnist5k is -188.1, at 0.03-0.3 about
#: -170.5 (PCA has no learning rate and ignores it)
DEFAULT_LR = {"vae": 2e-3, "ae": 2e-3, "pca": 2e-3, "mixture": 0.05}
#: the learning rate of a linear-Gaussian VAE (probabilistic PCA) when --lr is not given. On PPCA data
#: with a few strong directions (standard deviations 0.44, 0.22, 0.11, 0.055, noise 0.002) a run at
#: 2e-3 stalls at a saddle with its weakest unit collapsed, 26% below the PPCA optimum after 300
#: epochs; at 0.03 it ends 0.73% below (tests/test_models.py::test_linear_gaussian_vae_reaches...)
LINEAR_GAUSSIAN_LR = 0.03


@dataclass
class TrainConfig:
    """All settings of a training run. Field comments are the ``--help`` texts.

    Every field is a flag of ``pyrovae train`` with the same default (``latent_dim`` is
    ``--latent-dim``). A field left at ``None`` or ``"auto"`` means the default that
    :meth:`resolved` works out, and :meth:`resolved` also checks every value.

    Examples
    --------
    >>> from pyrovae import TrainConfig
    >>> config = TrainConfig(epochs=50, prior="mog", prior_components=10)
    >>> config.epochs, config.prior, config.prior_components, config.latent_dim
    (50, 'mog', 10, 50)
    >>> TrainConfig().epochs is None, TrainConfig().resolved().epochs
    (True, 450)
    >>> TrainConfig(prior="nope").resolved()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --prior must be one of ... (got 'nope')
    """

    # --- data ---
    dataset: str = _setting("mnist5k", "; ".join(f"{n} ({spec.summary}, {spec.splits})" for n, spec in DATASETS.items())
                            + "; or a path to your own .npy/.npz/.csv (one example per row, values 0-255 or 0-1)")
    data_dir: str = _setting("data", "folder holding IDX files, directly or as <dir>/<Name>/raw/")
    download: bool = _setting(False, "fetch the dataset's files into --data-dir first, from their published "
                              "location (needs internet; PYROVAE_<DATASET>_URL points elsewhere): "
                              + ", ".join(n for n, spec in DATASETS.items() if spec.source))
    label_column: typing.Optional[int] = _setting(None, "for a .csv dataset: index of the column holding labels "
                                                  "(others are pixels)")
    binarize: str = _setting(
        "auto", "dynamic (resampled every epoch), static (fixed seed), none (grey values); "
        "auto = dynamic for --likelihood bernoulli, none for gaussian. "
        "when training data is binarised (dynamic or static), validation and test data are binarised once with a "
        "fixed seed; with none they are scored as they are; "
        "binarized-mnist is binary already and is never resampled",
        ("auto", "dynamic", "static", "none"),
    )
    # --- model ---
    model: str = _setting(
        "vae", "vae (the variational autoencoder of docs/theory.md), ae (deterministic autoencoder: point-mass guide, "
        "reconstruction loss only), pca (scikit-learn PCA), mixture (finite mixture of "
        "--prior-components pixel distributions, component enumerated exactly)", MODELS)
    hidden_dims: typing.Tuple[int, ...] = _setting((400,), "hidden layer sizes of encoder and decoder, comma "
                                                   "separated; '' = linear maps")
    net: str = _setting(
        "mlp", "mlp (fully connected), gated (fully connected gated layers h = (W1 x + b1) * sigmoid(W2 x + b2), the "
        "VampPrior paper's MLP; --activation is unused), or conv (two stride-2 convolutions before the encoder's "
        "hidden layers and two transposed ones after the decoder's; images with height and width multiples of 4)",
        NETS)
    latent_dim: int = _setting(50, "dimension of the code z (the top stochastic layer, drawn from the prior)")
    lower_latent_dims: typing.Tuple[int, ...] = _setting(
        (), "stochastic layers between x and z, nearest x first, comma separated ('' = none): "
        "--lower-latent-dims 100 --latent-dim 50 is Burda et al.'s two-layer model")
    layer_hidden_dims: typing.Tuple[int, ...] = _setting(
        (100, 100), "with --lower-latent-dims and --hierarchy stack: hidden sizes of the networks between stochastic "
        "layers (--hierarchy two-level uses --hidden-dims for every network)")
    hierarchy: str = _setting(
        "stack", "with --lower-latent-dims: stack (Burda et al.: p(z) p(z1|z) p(x|z1), guide bottom-up "
        "q(z1|x) q(z|z1)), or two-level (Tomczak & Welling's HVAE: p(z) p(z1|z) p(x|z1,z), guide q(z|x) q(z1|x,z); "
        "one --lower-latent-dims entry)", HIERARCHIES)
    activation: str = _setting("softplus", "nonlinearity of the hidden layers", ("softplus", "relu"))
    scale_head: str = _setting(
        "log-scale", "how each Gaussian's scale s is read from its network's raw output r: log-scale (log s = r, "
        "unbounded) or clipped-log-var (log s^2 = hardtanh(r, -6, 2), the VampPrior paper's code)",
        SCALE_HEADS)
    init: str = _setting(
        "torch", "start of every linear map's weights: torch (PyTorch's uniform +-1/sqrt(fan-in)), he "
        "(N(0, 2/fan-in), the VampPrior paper's code) or xavier (N(0, 2/(fan-in + fan-out)), that code's first "
        "version); biases keep PyTorch's start, and --guide iaf flows their own (the identity)", INITS)
    likelihood: str = _setting("bernoulli", "p(x|z): bernoulli (logits) or gaussian", LIKELIHOODS)
    likelihood_scale: str = _setting("shared", "gaussian likelihood: one learned scale (shared) or one per pixel",
                                     ("shared", "pixel"))
    prior: str = _setting("standard", "p(z): standard N(0, I), mog (mixture of Gaussians), vamp (VampPrior)")
    prior_components: int = _setting(10, "components K of a mog/vamp prior, or of --model mixture")
    prior_init: str = _setting(
        "auto", "mog: kmeans (default: k-means on the encoder means after --prior-init-epochs, which keeps the "
        "components in use) or random; vamp: data (random training images, default), noise (uniform) or normal "
        "(every pixel from N(0.05, 0.01^2) before --pseudo-inputs squashes it, the VampPrior paper's code) or "
        "xavier (N(0, 2/(K + pixels)), that code's first version)")
    pseudo_inputs: str = _setting(
        "sigmoid", "vamp: how the pseudo-inputs' parameters a are kept in [0, 1]: sigmoid(a), hardtanh "
        "(min(1, max(0, a)), the VampPrior paper's code; a pixel pushed past 0 or 1 gets no gradient again), or "
        "none (a itself, unbounded: that code's first version)",
        PSEUDO_INPUTS)
    prior_init_epochs: typing.Optional[int] = _setting(None, "with --prior-init kmeans: epochs under N(0, I) before "
                                                       "k-means (default: 10, or a tenth of --epochs if less)")
    # --- inference ---
    guide: str = _setting(
        "gaussian", "q(z|x): gaussian (diagonal Gaussian from the encoder), or iaf (that Gaussian pushed through "
        "--flow-steps inverse autoregressive flow steps conditioned on the encoder, Kingma et al. 2016)", GUIDES)
    flow_steps: int = _setting(2, "with --guide iaf: number of autoregressive steps (order reversed between steps)")
    flow_hidden_dims: typing.Tuple[int, ...] = _setting((256,), "with --guide iaf: hidden sizes of each step's MADE "
                                                        "network, comma separated (each >= --latent-dim)")
    flow_context_dim: int = _setting(50, "with --guide iaf: size of the context h(x) the encoder gives the flow")
    elbo: str = _setting(
        "trace", "trace (Trace_ELBO, sampled KL), meanfield (TraceMeanField_ELBO, closed-form KL where it exists), "
        "iwae (importance-weighted bound with --num-particles samples; the best epoch is then the one with the "
        "best validation IWAE bound at the same k, val_iwae in metrics.jsonl)", ELBOS)
    num_particles: int = _setting(1, "samples of z per example in the objective")
    iwae_gradient: str = _setting("reparam", IWAE_GRADIENT_HELP, IWAE_GRADIENTS)
    epochs: typing.Optional[int] = _setting(
        None, f"maximum number of passes over the training split; default {DEFAULT_EPOCHS} (the default run: 134 s "
        f"of training on 2 CPU cores, 2 min 19 s in all), or with --time-limit as many as fit in it (at most "
        f"{BUDGET_EPOCHS:,}); with both "
        "given the run stops at whichever comes first")
    batch_size: int = _setting(128, "examples per gradient step (global, over all processes)")
    lr: typing.Optional[float] = _setting(
        None, "Adam learning rate (at the start, with --lr-schedule cosine); default 2e-3 for the networks, "
        "0.05 for --model mixture, whose per-pixel logits must move far from their start, 0.03 for a linear-Gaussian "
        "VAE (--hidden-dims '' --likelihood gaussian: probabilistic PCA), whose weak directions converge slowly")
    lr_schedule: str = _setting("cosine", "constant, or cosine: decay from --lr to --lr-min over --epochs",
                                ("constant", "cosine"))
    lr_min: float = _setting(1e-4, "with --lr-schedule cosine: the learning rate of the last epoch")
    clip_norm: float = _setting(100.0, "clip the global gradient norm to this value per example of the batch (0 = "
                                "off); typical norms are 20-50, so only early steps and spikes are clipped")
    warmup_epochs: int = _setting(0, "KL warm-up: scale log p(z) - log q(z|x) from 0 to 1 over this many epochs")
    warmup_unit: str = _setting(
        "step", "how the warm-up grows: step (after every step: (step + 1) / (warm-up epochs x steps per epoch)) or "
        "epoch (constant within epoch e = 1, 2, ...: e / --warmup-epochs, the VampPrior paper's code)",
        ("step", "epoch"))
    free_bits: float = _setting(
        0.0, "free bits (Kingma et al. 2016): in the training objective each latent dimension's KL, averaged over "
        "the batch, counts at least this many nats (each layer's KL, at least this many per dimension, where the "
        "prior does not factorise); reported ELBOs are always the true ones (0 = off)")
    weight_decay: float = _setting(0.0, "decoupled weight decay of every parameter (AdamW; 0 = plain Adam)")
    optimizer: str = _setting(
        "adam", "adam, or adamnormgrad (the VampPrior paper's code: each parameter's gradient divided by its own "
        "2-norm before Adam's step, so every tensor moves by about --lr whatever its gradient's size)",
        ("adam", "adamnormgrad"))
    norm_grad_by: str = _setting(
        "tensor", "with --optimizer adamnormgrad, what each gradient is divided by the norm of: tensor (each "
        "stored tensor; here a gated layer's value and gate maps are one tensor, and so are a Gaussian head's mean "
        "and log-scale maps) or map (each of those maps on its own, as in the VampPrior paper's code, which keeps "
        "them in separate layers)", ("tensor", "map"))
    ema: float = _setting(
        0.0, "average the weights after each step t: w_avg <- d_t w_avg + (1 - d_t) w, d_t = min(d, (1 + t)/(10 + t)), "
        "for d in [0, 1) (0.999, 0 = off), so d acts from step (10d - 1)/(1 - d): 8,990 for 0.999. Validation, the "
        "best checkpoint, evaluate and every picture use the averaged weights (the raw ones stay in the checkpoint)")
    encoder_dropout: float = _setting(
        0.0, "dropout after every hidden layer of the encoder, during training only: at small data the encoder "
        "overfits first (Zhang, Hayes & Barber 2022)")
    patience: int = _setting(0, "stop after this many epochs without a better validation ELBO (0 = never)")
    patience_after_warmup: bool = _setting(
        False, "count --patience only from the end of the KL warm-up (the VampPrior paper's code): during the "
        "warm-up the validation ELBO may fall while the KL's weight rises, and must not stop the run")
    time_limit: typing.Optional[str] = _setting(
        None, "a wall-clock budget for the training epochs, such as 900s, 45m or 2h: the run times its first epochs, "
        "fixes how many fit (at most --epochs), anneals --lr-schedule over exactly those and stops there; "
        "--resume continues within what is left (raise it to train longer)")
    seed: int = _setting(0, "random seed: same seed, same numbers on CPU")
    device: str = _setting("auto", "auto (CUDA when present), cpu or cuda", ("auto", "cpu", "cuda"))
    amp: str = _setting("none", "mixed precision for the networks (log densities stay float32)", ("none", "bf16"))
    # --- run directory ---
    no_tensorboard: bool = _setting(False, "do not write TensorBoard event files into the run directory (they are "
                                    "written when the tensorboard package is installed: pip install "
                                    "'pyrovae[tensorboard]')")
    tensorboard_images_every: int = _setting(10, "with TensorBoard: grids of samples and reconstructions every this "
                                             "many epochs (0 = none)")
    no_test_score: bool = _setting(False, "at the end, do not score the test split (its ELBO with the best weights): "
                                   "test stays unseen until you evaluate the finished model, as the literature asks")
    out: str = _setting("runs", "parent folder of run directories")
    name: typing.Optional[str] = _setting(None, "run directory name (default: <dataset>-<model>-<time>)")

    # --- the rules (:func:`resolve_settings`, :func:`validate_settings`, :func:`check_used`) and the files ---
    def resolved(self) -> TrainConfig:
        """A copy with every ``auto`` replaced by what it means, and validated (:func:`resolve_settings`)."""
        return resolve_settings(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for f, tp in setting_fields():
            if typing.get_origin(tp) is tuple:
                d[f.name] = list(d[f.name])
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """Build from a mapping of settings (``config.json``, a ``--config`` file, a preset),
        checking every key, type and choice: bad input raises ``ValueError`` naming the key
        and ``source``. Missing keys take their defaults."""
        return cls(**checked_settings(d, source))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        """Settings from a JSON (``.json``) or TOML (``.toml``) file of ``TrainConfig`` keys,
        such as a run's own ``config.json`` or a preset."""
        return cls.from_dict(read_settings_file(path), source=str(path))

    def save(self, path: Path) -> None:
        """Write ``config.json`` atomically: a temporary file beside it, then a rename, so
        that an interrupted write (first run or resume) never leaves half a file."""
        from .files import write_text_atomic

        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        """A run's ``config.json``, every setting checked, resolved and validated."""
        return load_settings(cls, path)



def checked_settings(d: dict, source: str = "config") -> dict:
    """The settings of mapping ``d``, every key, type and choice checked (``ValueError`` naming the key and
    ``source``)."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a table of settings (key = value), got {type(d).__name__}")
    fields = dict((f.name, (f, tp)) for f, tp in setting_fields())
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown setting {unknown_keys(unknown, fields)}: remove it (settings are "
                         "listed by pyrovae train --help, with - for _)")
    values = {}
    for key, value in d.items():
        f, tp = fields[key]
        values[key] = _checked(key, value, tp, setting_choices(key), source)
    return values


def load_settings(cls, path: Path) -> TrainConfig:
    """A run's ``config.json`` as ``cls``, every setting checked, resolved and validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a pyrovae run directory?")
    config = cls.from_file(path)
    try:
        config.resolved()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def unused_settings(config: TrainConfig) -> list[tuple[str, str]]:
    """The settings given (away from their defaults) that this configuration does not use, each with who
    does use it: one rule (:data:`USED_BY`) for every setting, so that nothing given is silently ignored.
    A value that resolution gives to an ``auto`` default counts as not given."""
    out = []
    for name, (uses, who) in USED_BY.items():
        value = getattr(config, name)
        value = tuple(value) if isinstance(value, list) else value
        if value == _DEFAULTS[name] or value in _resolved_defaults(config, name) or uses(config):
            continue
        out.append((name, who))
    return out


def resolve_settings(config: TrainConfig) -> TrainConfig:
    """Return a copy with every ``auto`` replaced by what it means, and validated."""
    for name in ("model", "likelihood", "elbo", "guide", "net", "binarize", "device", "amp", "lr_schedule",
                 "activation", "likelihood_scale", "prior", "hierarchy", "scale_head", "init", "optimizer",
                 "warmup_unit", "pseudo_inputs", "iwae_gradient"):
        choices = setting_choices(name)
        if choices and getattr(config, name) not in choices:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)} "
                             f"(got {getattr(config, name)!r})")
    c = dataclasses.replace(config)
    for f, tp in setting_fields():  # TrainConfig(...) from Python is typed as a settings file is
        setattr(c, f.name, _checked(f.name, getattr(c, f.name), tp, None, "TrainConfig"))
    if c.epochs is None:
        c.epochs = DEFAULT_EPOCHS if c.time_limit is None else BUDGET_EPOCHS
    if c.prior_init_epochs is None:
        c.prior_init_epochs = min(10, c.epochs // 10)
    if c.dataset in PREBINARIZED:  # already 0/1 samples: scored as they are, never resampled
        c.binarize = "none"
    elif c.binarize == "auto":
        c.binarize = "dynamic" if c.likelihood == "bernoulli" else "none"
    if c.lr is None:
        linear_gaussian = c.model == "vae" and not c.hidden_dims and not c.lower_latent_dims \
            and c.likelihood == "gaussian"
        c.lr = LINEAR_GAUSSIAN_LR if linear_gaussian else DEFAULT_LR[c.model]
    if c.prior_init == "auto":
        from .priors import PRIORS

        if c.prior in PRIORS:
            c.prior_init = PRIORS[c.prior].inits[0]
    validate_settings(c)
    return c


def check_used(config: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first setting given that this configuration does not use
    (:func:`unused_settings`). Checked when a run starts, not when a stored run is loaded: a run
    directory written before the rule loads as it is."""
    unused = unused_settings(config)
    if unused:
        name, who = unused[0]
        raise ValueError(f"--{name.replace('_', '-')} {_shown(getattr(config, name))} is not used here: it applies "
                         f"to {who}; drop it")


def validate_settings(config: TrainConfig) -> None:
    """Raise ``ValueError`` naming the flag and the fix for any impossible setting."""
    from .priors import PRIORS  # the registry is the source of prior names

    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    for name in ("latent_dim", "epochs", "batch_size", "num_particles"):
        value = getattr(config, name)
        need(value >= 1, f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    for name in ("hidden_dims", "lower_latent_dims", "layer_hidden_dims", "flow_hidden_dims"):
        value = getattr(config, name)
        need(all(h >= 1 for h in value), f"--{name.replace('_', '-')} must be positive sizes (got "
             f"{','.join(map(str, value))})")
    if config.lower_latent_dims:
        need(config.model == "vae", f"--lower-latent-dims applies to --model vae only (got --model {config.model})")
    if config.hierarchy == "two-level":
        need(len(config.lower_latent_dims) == 1, "--hierarchy two-level has two stochastic layers: give one "
             f"--lower-latent-dims size for z1 (got {','.join(map(str, config.lower_latent_dims)) or 'none'})")
        need(config.net != "conv", "--hierarchy two-level uses fully connected networks: use --net mlp or gated")
    if config.time_limit is not None:
        parse_duration(config.time_limit)
    for name in ("free_bits", "weight_decay"):
        value = getattr(config, name)
        need(math.isfinite(value) and value >= 0, f"--{name.replace('_', '-')} must be 0 (off) or positive "
             f"(got {value})")
    need(0 <= config.encoder_dropout < 1, f"--encoder-dropout must lie in [0, 1) (got {config.encoder_dropout})")
    need(0 <= config.ema < 1, f"--ema must lie in [0, 1): a decay such as 0.999, or 0 for off (got {config.ema})")
    if config.free_bits > 0:
        need(config.model == "vae" and config.elbo == "trace",
             f"--free-bits floors the KL of --elbo trace for --model vae (got --model {config.model}, "
             f"--elbo {config.elbo})")
    for f, _ in setting_fields():  # every number finite: --lr inf is no learning rate
        value = getattr(config, f.name)
        if isinstance(value, float):
            need(math.isfinite(value), f"--{f.name.replace('_', '-')} must be a finite number (got {value})")
    need(config.lr > 0, f"--lr must be positive (got {config.lr})")
    need(0 <= config.seed < 2**63, f"--seed must lie in [0, 2^63) (got {config.seed})")
    if config.name is not None:
        bad = (not config.name or config.name in (".", "..") or "/" in config.name or "\\" in config.name
               or Path(config.name).is_absolute() or config.name != config.name.strip())
        need(not bad, f"--name {config.name!r} must be one folder name (no /, no .., not absolute): the run "
             "directory is --out/--name")
    if config.lr_schedule == "cosine":  # (a constant rate has no minimum)
        need(0 <= config.lr_min <= config.lr, f"--lr-min must lie in [0, --lr] (got {config.lr_min}, --lr {config.lr})")
    need(config.clip_norm >= 0, f"--clip-norm must be 0 (off) or positive (got {config.clip_norm})")
    for name in ("warmup_epochs", "patience", "prior_init_epochs", "tensorboard_images_every"):
        value = getattr(config, name)
        need(value >= 0, f"--{name.replace('_', '-')} must be 0 or more (got {value})")
    need(config.prior in PRIORS, f"--prior must be one of {', '.join(PRIORS)} (got {config.prior!r})")
    need(
        config.prior_components >= 1,
        f"--prior-components must be at least 1 (got {config.prior_components}): K is a number of mixture components",
    )
    allowed = PRIORS[config.prior].inits
    need(
        config.prior_init in allowed,
        f"--prior-init {config.prior_init} does not apply to --prior {config.prior}: use {' or '.join(allowed)}",
    )
    need(
        config.binarize in ("dynamic", "static", "none"),
        f"--binarize must be dynamic, static, none or auto (got {config.binarize!r})",
    )
    need(config.iwae_gradient != "dreg" or config.guide == "gaussian",
         f"--iwae-gradient dreg needs log q(z|x) at any z, which --guide {config.guide} gives only by inverting its "
         "flow: use --guide gaussian or --iwae-gradient reparam")
    if config.guide != "gaussian":
        need(config.model == "vae", f"--guide {config.guide} applies to --model vae only (got --model {config.model})")
        need(config.elbo != "meanfield", f"--elbo meanfield needs the closed-form KL of a Gaussian q(z|x); "
             f"--guide {config.guide} has none: use --elbo trace or iwae")
        need(config.flow_steps >= 1, f"--flow-steps must be at least 1 (got {config.flow_steps})")
        need(config.flow_context_dim >= 0, f"--flow-context-dim must be 0 or more (got {config.flow_context_dim})")
        need(config.latent_dim >= 2, f"--guide {config.guide} needs --latent-dim 2 or more (got {config.latent_dim})")
        need(bool(config.flow_hidden_dims) and min(config.flow_hidden_dims) >= config.latent_dim,
             f"--flow-hidden-dims must be sizes of at least --latent-dim {config.latent_dim} "
             f"(got {','.join(map(str, config.flow_hidden_dims)) or 'none'})")
    if config.model in ("pca", "mixture"):
        need(
            config.elbo == "trace" and config.prior == "standard",
            f"--model {config.model} has no latent code to put a prior on or an ELBO to choose: "
            "drop --prior/--elbo",
        )


def used_only(settings: dict) -> dict:
    """``settings`` (a mapping of TrainConfig keys) without the keys its configuration would not use
    (:func:`unused_settings`): for studies whose shared settings (such as small flow networks in a
    quick mode) apply to some of their rows only."""
    unused = {name for name, _ in unused_settings(TrainConfig.from_dict(dict(settings), source="settings"))}
    return {k: v for k, v in settings.items() if k not in unused}


def _vae(c) -> bool:
    return c.model == "vae"


def _trained(c) -> bool:  # every kind but PCA, which is fitted once
    return c.model != "pca"


def _with_prior(c, *priors) -> bool:
    return c.model == "vae" and c.prior in priors


#: setting -> (whether a configuration uses it, who uses it): read by :func:`unused_settings`
USED_BY: dict[str, tuple] = {
    "prior": (_vae, "--model vae (the other kinds have no prior: ae drops it, pca and mixture have no code to put "
                    "it on)"),
    "prior_components": (lambda c: _with_prior(c, "mog", "vamp") or c.model == "mixture",
                         "--prior mog or vamp of --model vae, and --model mixture"),
    "prior_init": (lambda c: _with_prior(c, "mog", "vamp"), "--prior mog or vamp of --model vae"),
    "prior_init_epochs": (lambda c: _with_prior(c, "mog") and c.prior_init in ("kmeans", "auto"),
                          "--prior mog with --prior-init kmeans"),
    "pseudo_inputs": (lambda c: _with_prior(c, "vamp"), "--prior vamp of --model vae"),
    "guide": (_vae, "--model vae"),
    "flow_steps": (lambda c: _vae(c) and c.guide == "iaf", "--guide iaf"),
    "flow_hidden_dims": (lambda c: _vae(c) and c.guide == "iaf", "--guide iaf"),
    "flow_context_dim": (lambda c: _vae(c) and c.guide == "iaf", "--guide iaf"),
    "elbo": (_vae, "--model vae"),
    "num_particles": (_vae, "--model vae"),
    "iwae_gradient": (lambda c: _vae(c) and c.elbo == "iwae", "--elbo iwae"),
    "lower_latent_dims": (_vae, "--model vae"),
    "hierarchy": (lambda c: _vae(c) and bool(c.lower_latent_dims), "--model vae with --lower-latent-dims"),
    "layer_hidden_dims": (lambda c: _vae(c) and bool(c.lower_latent_dims) and c.hierarchy == "stack",
                          "--lower-latent-dims with --hierarchy stack"),
    "likelihood_scale": (lambda c: c.likelihood == "gaussian" and c.model != "pca", "--likelihood gaussian"),
    "warmup_epochs": (_vae, "--model vae (the KL it warms up)"),
    "warmup_unit": (lambda c: _vae(c) and c.warmup_epochs > 0, "--warmup-epochs above 0"),
    "patience_after_warmup": (lambda c: c.warmup_epochs > 0 and c.patience > 0,
                              "--patience with --warmup-epochs above 0"),
    "lr_min": (lambda c: c.lr_schedule == "cosine" and _trained(c), "--lr-schedule cosine"),
    "encoder_dropout": (lambda c: c.model in ("vae", "ae"), "--model vae or ae"),
    "scale_head": (_vae, "--model vae (its Gaussians' scales)"),
    "init": (lambda c: c.model in ("vae", "ae"), "--model vae or ae"),
    "optimizer": (_trained, "every --model but pca, which is fitted once"),
    "norm_grad_by": (lambda c: _trained(c) and c.optimizer == "adamnormgrad", "--optimizer adamnormgrad"),
    "ema": (_trained, "every --model but pca, which is fitted once"),
    "weight_decay": (_trained, "every --model but pca, which is fitted once"),
    "activation": (lambda c: c.model in ("vae", "ae") and c.net == "mlp", "--net mlp of --model vae or ae (gated "
                                                                           "layers gate, conv nets use ReLU)"),
    "net": (lambda c: c.model in ("vae", "ae"), "--model vae or ae"),
    "label_column": (lambda c: str(c.dataset).lower().endswith(".csv"), "a .csv dataset"),
}

#: every setting's default, for :func:`unused_settings`
_DEFAULTS: dict = {}


def _resolved_defaults(c, name: str) -> tuple:
    """Values that :meth:`TrainConfig.resolved` gives ``name`` from its ``auto`` default (a resumed run's
    config.json holds them)."""
    if name == "prior_init":
        from .priors import PRIORS

        return tuple(PRIORS[p].inits[0] for p in PRIORS)
    if name == "prior_init_epochs":
        epochs = c.epochs if c.epochs is not None else DEFAULT_EPOCHS if c.time_limit is None else BUDGET_EPOCHS
        return (min(10, epochs // 10),)
    return ()


def unresumable(stored: dict, wanted: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings of ``wanted`` (a mapping) that differ from a run's ``stored`` ones and that a resume may not
    change (all but :data:`RESUMABLE` and ``ignore``): the one rule the command line, :func:`pyrovae.train` and
    the studies' :func:`~pyrovae.training.train_or_reuse` apply."""
    return sorted(k for k, v in wanted.items() if k not in RESUMABLE and k not in ignore and stored.get(k) != v)


def resumed_config(stored: "TrainConfig", given: dict, run_dir) -> "TrainConfig":
    """The settings a resumed run trains with: its ``stored`` ones, with those of ``given`` that a resume may
    change (:data:`RESUMABLE`; ``None`` values count as not given); ``ValueError`` naming every other given
    setting that differs."""
    given = {k: v for k, v in given.items() if v is not None}
    fixed = unresumable(stored.to_dict(), {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()})
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        can = ", ".join("--" + r.replace("_", "-") for r in RESUMABLE)
        raise ValueError(f"{flags} cannot change when resuming {run_dir} (only {can} can); start a new run instead")
    return dataclasses.replace(stored, **{k: v for k, v in given.items() if k in RESUMABLE})


def parse_duration(text: str) -> float:
    """Seconds in a ``--time-limit`` such as ``900``, ``900s``, ``45m``, ``1.5h``; ``ValueError`` otherwise."""
    t = str(text).strip().lower()
    unit = t[-1:] if t[-1:] in _TIME_UNITS else ""
    number = t[: len(t) - len(unit)].strip()
    try:
        seconds = float(number) * _TIME_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= 366 * 86400) or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"--time-limit must be a duration such as 900s, 45m or 2h, above 0 and at most a year "
                         f"(got {text!r})")
    return seconds


def unknown_keys(unknown, known) -> str:
    """``unknown`` keys as an error names them, each with the closest of ``known`` where one is close."""
    close = [difflib.get_close_matches(k, list(known), n=1) for k in unknown]
    return "; ".join(f"{k!r} (did you mean {c[0]!r}?)" if c else repr(k) for k, c in zip(unknown, close))


def read_settings_file(path: str | os.PathLike) -> dict:
    """The mapping in a ``.json`` or ``.toml`` settings file, or one-line ``ValueError``/
    ``FileNotFoundError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: settings file not found; give a .json or .toml file of TrainConfig keys")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ValueError(f"{path}: a settings file must end in .json or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; restore the file or write a new one") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        if suffix == ".json":
            settings = json.loads(text, parse_constant=_refuse_constant)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            settings = tomllib.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid {suffix[1:].upper()} ({' '.join(str(e).split())}); "
                         "fix the file or train a new run") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a table of settings (key = value), got {type(settings).__name__}")
    return settings


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


#: whole-number settings and flags must lie below this in size: beyond it they are no size or count, and
#: the memory and time estimates made from them would overflow float arithmetic
WHOLE_LIMIT = 2**63


def _shown(value) -> str:
    """``repr(value)``, cut to 60 characters (a 400-digit number is not repeated whole)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return "a list of whole numbers"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[tp]


def _checked(key: str, value, tp, choices, source: str):
    """``value`` as the setting ``key`` of type ``tp`` takes it, or ``ValueError``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad():
        return ValueError(f"{source}: setting {key!r} must be {_describe(tp)} (got {_shown(value)})")

    def too_big():  # (far beyond any size or count: the memory checks' float arithmetic would overflow)
        return ValueError(f"{source}: setting {key!r} must be a whole number below 2^63 (got {_shown(value)})")

    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _checked(key, value, next(a for a in args if a is not type(None)), choices, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            raise bad()
        if any(abs(v) >= WHOLE_LIMIT for v in value):
            raise too_big()
        return tuple(int(v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:  # (numpy's integers too, from Python)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise bad()
        if abs(value) >= WHOLE_LIMIT:
            raise too_big()
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad()
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ValueError(f"{source}: setting {key!r} must be a finite number (got {_shown(value)})") from None
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        if choices is not None and value not in choices:
            raise ValueError(f"{source}: setting {key!r} must be one of {', '.join(choices)} (got {value!r})")
        return value
    raise bad()


def setting_choices(name: str) -> tuple[str, ...] | None:
    """The allowed values of a string setting (``None``: any string), from the field or,
    for ``prior`` and ``model``, from their registries."""
    if name == "prior":
        from .priors import PRIORS

        return tuple(PRIORS)
    if name == "model":
        return MODELS
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return f.metadata.get("choices")


def memory_bytes() -> int:
    """This machine's physical memory in bytes (8 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def most_raised(factors: dict[str, tuple[float, float]]) -> str:
    """Of flags whose values multiply into one cost, given as flag -> (value, its default), the one
    raised furthest above its default: the flag a refusal of that cost names."""
    return max(factors, key=lambda flag: factors[flag][0] / max(factors[flag][1], 1))


def whole(value, flag: str, at_least: int = 1) -> int:
    """``value`` as an ``int`` when it is a whole number of at least ``at_least`` and below
    :data:`WHOLE_LIMIT`, else ``ValueError`` naming ``flag`` (the Python API's check of a count or size
    that the command line gets from argparse)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{flag} must be a whole number (got {_shown(value)})")
    if not at_least <= value < WHOLE_LIMIT:
        raise ValueError(f"{flag} must be at least {at_least} (got {_shown(value)})" if value < at_least
                         else f"{flag} must be a whole number below 2^63 (got {_shown(value)})")
    return int(value)


def refuse_if_too_big(parts: dict[str, float] | list[tuple[str, float]], what: str) -> None:
    """``parts`` maps flags to the bytes they are responsible for (as a dict, or as pairs where one
    flag may appear more than once); when their sum exceeds half of this machine's memory, raise
    ``ValueError`` naming the largest, before anything is allocated."""
    if not isinstance(parts, dict):
        pairs, parts = parts, {}
        for flag, size in pairs:
            parts[flag] = parts.get(flag, 0.0) + size
    total, budget = sum(parts.values()), memory_bytes() / 2
    if total > budget:
        flag = max(parts, key=parts.get)
        raise ValueError(f"{flag}: {what} would need about {total / 2**30:,.1f} GiB, more than half of this "
                         f"machine's {memory_bytes() / 2**30:.0f} GiB; choose a smaller {flag}")


#: the folder of the presets shipped with pyrovae (``pyrovae train --preset NAME``)
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def presets() -> dict[str, tuple[Path, str]]:
    """Preset name -> (its file, the one-line description on its first comment line)."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.toml")):
        first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = (path, first.lstrip("#").strip())
    return out


def preset_settings(name: str) -> dict:
    """The settings of preset ``name``, checked."""
    known = presets()
    if name not in known:
        raise ValueError(f"--preset {name!r} does not exist: use one of {', '.join(known)}")
    path = known[name][0]
    settings = read_settings_file(path)
    TrainConfig.from_dict(settings, source=str(path))
    return settings


def setting_fields() -> list[tuple[dataclasses.Field, type]]:
    """(field, resolved type) for every setting, in declaration order; used to build the CLI."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


_DEFAULTS.update({f.name: f.default for f in dataclasses.fields(TrainConfig)})
