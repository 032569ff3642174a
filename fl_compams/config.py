"""The run configuration: every key, its default, its type and its allowed values, in one table.

Flower hands the ServerApp and ClientApp a flat kebab-case mapping (``context.run_config``, from
``[tool.flwr.app.config]`` plus ``--run-config`` overrides). :func:`parse_config` is the one place that turns it
into frozen dataclasses: it fills defaults, rejects unknown keys, wrong types and out-of-range values with a
message naming the key and what is allowed. ``pyproject.toml`` lists the same defaults (a test keeps the two
in step).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fl_compams.aggregate import WEIGHTINGS
from fl_compams.client_opt import LocalAdam
from fl_compams.compressors import COMPRESSORS, VALUE_DTYPES, Compressor, make_compressor
from fl_compams.errors import ConfigError
from fl_compams.payloads import INDEX_CODINGS
from fl_compams.server_opt import SERVER_OPTIMIZERS, ServerOptimizer, make_server_optimizer

__all__ = [
    "SCHEMA",
    "CompressorConfig",
    "DataConfig",
    "ExperimentConfig",
    "OutputConfig",
    "ServerConfig",
    "TrainConfig",
    "build_compressor",
    "build_server_optimizer",
    "default_config",
    "parse_config",
]

DATASETS = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10")
MODELS = ("auto", "digits-cnn", "mnist1d-cnn", "mnist-cnn", "cifar-cnn", "logreg")
#: The mnist1d package's default ``num_samples`` (its ``get_dataset_args()``; a test keeps the two equal).
MNIST1D_DEFAULT_SAMPLES = 5000
PARTITIONERS = ("dirichlet", "iid", "full")  # tasks.partition implements them
DEVICES = ("auto", "cpu", "cuda")
ALGORITHMS = ("compams", "flower-fedavg", "flower-fedadam")


@dataclass(frozen=True)
class Key:
    """One configuration key: default, type, validity check and its one-line help."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    allowed: str
    help: str

    @property
    def kind(self) -> type:
        return type(self.default)


def _choice(options: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"one of {list(options)}"


def _range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def check(v: float) -> bool:
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi) and math.isfinite(v)

    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    return check, f"a number in {lb}{lo}, {hi}{rb}"


def _key(name: str, default: Any, rule: tuple[Callable[[Any], bool], str], help: str) -> Key:
    return Key(name, default, rule[0], rule[1], help)


_ANY_STR = ((lambda v: True), "any string")
_BOOL = ((lambda v: True), "true or false")
_POS_INT = ((lambda v: v >= 1), "an integer >= 1")
_NONNEG_INT = ((lambda v: v >= 0), "an integer >= 0")
_POS_FLOAT = ((lambda v: v > 0 and math.isfinite(v)), "a finite number > 0")
_NONNEG_FLOAT = ((lambda v: v >= 0 and math.isfinite(v)), "a finite number >= 0")
_UNIT_OPEN = _range(0.0, 1.0, lo_open=True)
_BETA = _range(0.0, 1.0, hi_open=True)

#: Every run-config key, in the order pyproject.toml lists them.
SCHEMA: tuple[Key, ...] = (
    # --- federation
    _key("num-server-rounds", 60, _POS_INT, "number of federated rounds T"),
    _key("fraction-train", 1.0, _UNIT_OPEN, "fraction of connected nodes sampled for training each round"),
    _key("min-train-nodes", 1, _POS_INT, "at least this many nodes train each round"),
    _key("seed", 0, _NONNEG_INT, "seed of every random choice (data split, sampling, init, compressors)"),
    _key(
        "algorithm",
        "compams",
        _choice(ALGORITHMS),
        "compams = this project's strategy (every compressor/optimizer); flower-* = Flower's own strategies",
    ),
    # --- compression and error feedback
    _key("compressor", "topk", _choice(tuple(COMPRESSORS)), "uplink compressor C"),
    _key("error-feedback", True, _BOOL, "keep the compression error and add it to the next update"),
    _key("topk-ratio", 0.01, _UNIT_OPEN, "k / d for topk, randk and signtopk (ignored if topk-k > 0)"),
    _key("topk-k", 0, _NONNEG_INT, "absolute k for topk, randk and signtopk; 0 = use topk-ratio"),
    _key("value-dtype", "float32", _choice(VALUE_DTYPES), "wire dtype of sparse/dense values"),
    _key("index-coding", "int32", _choice(INDEX_CODINGS), "wire coding of sparse indices"),
    _key("mvss-density", 0.01, _UNIT_OPEN, "expected density kappa of MVSS"),
    _key("qsgd-levels", 4, ((lambda v: 1 <= v <= 2**15), "an integer in [1, 32768]"), "QSGD levels s"),
    _key("qsgd-bucket-size", 0, _NONNEG_INT, "QSGD bucket size; 0 = one bucket"),
    _key("randk-scaled", False, _BOOL, "send (d/k) x_S so that Rand-k is unbiased"),
    # --- server optimizer
    _key("server-opt", "amsgrad", _choice(tuple(SERVER_OPTIMIZERS)), "server optimizer"),
    _key("server-lr", 0.003, _POS_FLOAT, "server learning rate eta"),
    _key("beta1", 0.9, _BETA, "first-moment decay (amsgrad, adam)"),
    _key("beta2", 0.999, _BETA, "second-moment decay (amsgrad, adam)"),
    _key("eps", 1e-8, _POS_FLOAT, "epsilon (inside the sqrt for amsgrad, outside for the torch variants)"),
    _key("server-momentum", 0.0, _BETA, "momentum of the sgd server optimizer"),
    _key("nesterov", False, _BOOL, "Nesterov momentum for the sgd server optimizer"),
    _key("weighting", "uniform", _choice(WEIGHTINGS), "average client updates uniformly or by example count"),
    # --- robustness
    _key("round-timeout", 600.0, _POS_FLOAT, "seconds the server waits for replies in a round"),
    _key("min-valid-replies", 1, _POS_INT, "below this many valid replies a round changes nothing"),
    _key("max-update-norm", 0.0, _NONNEG_FLOAT, "clip or reject decoded updates above this l2 norm; 0 = off"),
    _key(
        "update-norm-action",
        "clip",
        _choice(("clip", "reject")),
        "what max-update-norm does to a large update",
    ),
    # --- client training
    _key("local-steps", 1, _POS_INT, "local SGD steps H per round (H = 1: one minibatch gradient)"),
    _key("local-lr", 0.05, _POS_FLOAT, "local learning rate (SGD when local-steps > 1; QAdam's alpha)"),
    _key(
        "client-opt",
        "none",
        _choice(("none", "adam")),
        "none = send gradients; adam = QAdam's local Adam steps",
    ),
    _key("client-beta1", 0.9, _BETA, "QAdam: first-moment decay of the local Adam"),
    _key("client-beta2", 0.999, _BETA, "QAdam: second-moment decay of the local Adam"),
    _key("client-eps", 1e-8, _POS_FLOAT, "QAdam: epsilon of the local Adam"),
    _key("client-eps-inside-sqrt", False, _BOOL, "QAdam: sqrt(v + eps) instead of sqrt(v) + eps"),
    _key("client-bias-correction", False, _BOOL, "QAdam: bias-correct the local Adam moments"),
    _key("batch-size", 32, _POS_INT, "local minibatch size"),
    _key("device", "auto", _choice(DEVICES), "where clients and server compute; auto = cuda if available"),
    # --- data
    _key(
        "dataset",
        "digits",
        _choice(DATASETS),
        "data set; digits is embedded, mnist1d is generated locally, the others need data-dir",
    ),
    _key("model", "auto", _choice(MODELS), "model; auto picks the data set's default"),
    _key(
        "data-dir",
        "",
        _ANY_STR,
        "directory of downloaded data sets (mnist, fashion-mnist, cifar10) and of the mnist1d cache",
    ),
    _key("download", False, _BOOL, "allow downloading the data set into data-dir"),
    _key(
        "partitioner",
        "dirichlet",
        _choice(PARTITIONERS),
        "split of the training set: dirichlet, iid, or full (every client has all)",
    ),
    _key("dirichlet-alpha", 0.5, _POS_FLOAT, "Dirichlet concentration alpha (smaller = more heterogeneous)"),
    _key(
        "min-partition-size", 10, _NONNEG_INT, "resample the Dirichlet split until every client has this many"
    ),
    _key(
        "mnist1d-samples",
        MNIST1D_DEFAULT_SAMPLES,
        ((lambda v: v >= 10 and v % 10 == 0), "a multiple of 10, >= 10"),
        "MNIST-1D: examples generated (10 classes, equal counts), split 80/20 into train/test",
    ),
    _key(
        "validation-fraction",
        0.0,
        _range(0.0, 0.5),
        "fraction of the training set held out for validation (seeded, stratified; never on clients)",
    ),
    # --- diagnostics and output
    _key("probe-every", 0, _NONNEG_INT, "measure sigma_g^2 every this many rounds; 0 = never"),
    _key("checkpoint-every", 0, _NONNEG_INT, "write the server state every this many rounds; 0 = never"),
    _key("resume", False, _BOOL, "continue from the latest valid checkpoint in the run directory"),
    _key("run-name", "", _ANY_STR, "results go to <out-dir>/<run-name>; empty = a timestamped name"),
    _key(
        "out-dir", "", _ANY_STR, "results root; empty = runs/ under the directory flwr run was started from"
    ),
)
_BY_NAME = {k.name: k for k in SCHEMA}


@dataclass(frozen=True)
class CompressorConfig:
    """Which compressor, its parameters, and whether error feedback is on."""

    compressor: str
    error_feedback: bool
    topk_ratio: float
    topk_k: int
    value_dtype: str
    index_coding: str
    mvss_density: float
    qsgd_levels: int
    qsgd_bucket_size: int
    randk_scaled: bool


@dataclass(frozen=True)
class ServerConfig:
    """Server optimizer, its hyper-parameters, the weighting and the federation settings."""

    num_server_rounds: int
    fraction_train: float
    min_train_nodes: int
    server_opt: str
    server_lr: float
    beta1: float
    beta2: float
    eps: float
    server_momentum: float
    nesterov: bool
    weighting: str
    round_timeout: float
    min_valid_replies: int
    max_update_norm: float
    update_norm_action: str


@dataclass(frozen=True)
class TrainConfig:
    """Local training of a client."""

    local_steps: int
    local_lr: float
    client_opt: str
    client_beta1: float
    client_beta2: float
    client_eps: float
    client_eps_inside_sqrt: bool
    client_bias_correction: bool
    batch_size: int
    device: str


@dataclass(frozen=True)
class DataConfig:
    """Data set, model, partitioning and the validation split.

    ``mnist1d_samples`` matters only for ``dataset = "mnist1d"``. ``validation_fraction`` > 0 holds out that
    share of the training set (per class, drawn from the run seed) before partitioning: see
    ``tasks.task.load_data``.
    """

    dataset: str
    model: str
    data_dir: str
    download: bool
    partitioner: str
    dirichlet_alpha: float
    min_partition_size: int
    mnist1d_samples: int
    validation_fraction: float


@dataclass(frozen=True)
class OutputConfig:
    """Diagnostics and where results go."""

    probe_every: int
    checkpoint_every: int
    resume: bool
    run_name: str
    out_dir: str


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole resolved configuration."""

    seed: int
    algorithm: str
    compression: CompressorConfig
    server: ServerConfig
    train: TrainConfig
    data: DataConfig
    output: OutputConfig

    def to_flat(self) -> dict[str, Any]:
        """The kebab-case mapping this config was parsed from (with defaults filled in)."""
        flat: dict[str, Any] = {"seed": self.seed, "algorithm": self.algorithm}
        for part in (self.compression, self.server, self.train, self.data, self.output):
            for f in dataclasses.fields(part):
                flat[f.name.replace("_", "-")] = getattr(part, f.name)
        return {k.name: flat[k.name] for k in SCHEMA}


def _coerce(key: Key, value: Any) -> Any:
    kind = key.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key.name!r}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key.name!r}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key.name!r}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"config key {key.name!r}: expected a string, got {value!r}")
    return value


def parse_config(mapping: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Validate a flat kebab-case mapping and return the resolved :class:`ExperimentConfig`.

    Missing keys take their defaults. Raises :class:`ConfigError` naming the first bad key.
    """
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(_BY_NAME))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}; known keys: {sorted(_BY_NAME)}")
    values: dict[str, Any] = {}
    for key in SCHEMA:
        value = _coerce(key, mapping.get(key.name, key.default))
        if not key.check(value):
            raise ConfigError(f"config key {key.name!r}: must be {key.allowed}, got {value!r}")
        values[key.name.replace("-", "_")] = value

    def take(cls):
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    cfg = ExperimentConfig(
        seed=values["seed"],
        algorithm=values["algorithm"],
        compression=take(CompressorConfig),
        server=take(ServerConfig),
        train=take(TrainConfig),
        data=take(DataConfig),
        output=take(OutputConfig),
    )
    if cfg.server.server_opt != "sgd" and cfg.server.nesterov:
        raise ConfigError("config key 'nesterov': only applies to server-opt = 'sgd'")
    if cfg.server.nesterov and cfg.server.server_momentum == 0.0:
        raise ConfigError("config key 'nesterov': needs server-momentum > 0")
    if cfg.train.client_opt == "adam" and cfg.train.local_steps != 1:
        raise ConfigError(
            "config key 'client-opt': 'adam' (QAdam) sends one local Adam step; set local-steps = 1"
        )
    if cfg.algorithm != "compams" and (
        cfg.compression.compressor != "identity" or cfg.train.client_opt != "none"
    ):
        raise ConfigError(
            f"config key 'algorithm': {cfg.algorithm!r} runs Flower's own strategy on dense models; it takes "
            "compressor = 'identity' and client-opt = 'none'"
        )
    if cfg.output.resume and not cfg.output.run_name:
        raise ConfigError("config key 'resume': needs 'run-name' (the run directory to continue)")
    return cfg


def default_config() -> ExperimentConfig:
    """All defaults."""
    return parse_config({})


def build_compressor(cfg: CompressorConfig, block_sizes: tuple[int, ...] | None = None) -> Compressor:
    """The compressor named by the config (Block-Sign blocks = the model's trainable tensors)."""
    name = cfg.compressor
    k_or_ratio = {"k": cfg.topk_k} if cfg.topk_k > 0 else {"ratio": cfg.topk_ratio}
    params: dict[str, dict[str, Any]] = {
        "identity": {"value_dtype": cfg.value_dtype},
        "topk": {**k_or_ratio, "value_dtype": cfg.value_dtype, "index_coding": cfg.index_coding},
        "blocksign": {"block_sizes": block_sizes},
        "randk": {
            **k_or_ratio,
            "scaled": cfg.randk_scaled,
            "value_dtype": cfg.value_dtype,
            "index_coding": cfg.index_coding,
        },
        "mvss": {
            "density": cfg.mvss_density,
            "value_dtype": cfg.value_dtype,
            "index_coding": cfg.index_coding,
        },
        "qsgd": {"levels": cfg.qsgd_levels, "bucket_size": cfg.qsgd_bucket_size},
        "signtopk": {**k_or_ratio, "index_coding": cfg.index_coding},
    }
    return make_compressor(name, **params[name])


def build_client_optimizer(cfg: TrainConfig) -> LocalAdam | None:
    """QAdam's local Adam (``client-opt = "adam"``), or None when clients send plain gradients."""
    if cfg.client_opt == "none":
        return None
    return LocalAdam(
        lr=cfg.local_lr,
        beta1=cfg.client_beta1,
        beta2=cfg.client_beta2,
        eps=cfg.client_eps,
        eps_inside_sqrt=cfg.client_eps_inside_sqrt,
        bias_correction=cfg.client_bias_correction,
    )


def build_server_optimizer(cfg: ServerConfig) -> ServerOptimizer:
    """The server optimizer named by the config."""
    if cfg.server_opt == "sgd":
        return make_server_optimizer(
            "sgd", lr=cfg.server_lr, momentum=cfg.server_momentum, nesterov=cfg.nesterov
        )
    return make_server_optimizer(
        cfg.server_opt, lr=cfg.server_lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps
    )
