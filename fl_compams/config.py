"""The run configuration: every key, its default, its type and its allowed values.

The general keys are declared here; each registered compressor declares its own (in its module, see
:mod:`fl_compams.compressors.base`), and :func:`schema` puts them together at each call. Flower hands the
ServerApp and ClientApp a flat kebab-case mapping (``context.run_config``, from ``[tool.flwr.app.config]``
plus ``--run-config`` overrides). :func:`parse_config` is the one place that turns it into frozen dataclasses:
it fills defaults, rejects unknown keys, wrong types and out-of-range values with a message naming the key and
what is allowed. ``pyproject.toml`` lists the same defaults (``scripts/sync_config.py`` writes them; a test
keeps the two in step).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fl_compams.aggregate import WEIGHTINGS
from fl_compams.algorithm import ALGORITHMS as COMPOSITIONS
from fl_compams.algorithm import BOUND_MODES, FLOWER_BASELINES, Algorithm, ReplyBound
from fl_compams.buffers import BUFFER_MODES
from fl_compams.client_opt import LocalAdam, NesterovMomentum
from fl_compams.compressors.base import COMPRESSORS, Compressor, compressor_class, compressor_keys
from fl_compams.downlink import DownlinkPart
from fl_compams.errors import ConfigError
from fl_compams.laq import LazyConfig
from fl_compams.precision import STATE_DTYPES
from fl_compams.qsparse import Qsparse, check_compressor, parse_periods
from fl_compams.schema import (
    ANY_STR,
    BETA,
    BOOL,
    NONNEG_FLOAT,
    NONNEG_INT,
    PLAIN_NAME_OR_EMPTY,
    POS_FLOAT,
    POS_INT,
    UNIT_OPEN,
    Key,
    choice,
    key,
    num_range,
)
from fl_compams.server_opt import SERVER_OPTIMIZERS, ServerOptimizer, make_server_optimizer

__all__ = [
    "SCHEMA",
    "CompressorConfig",
    "DataConfig",
    "ExperimentConfig",
    "LAQConfig",
    "OutputConfig",
    "ServerConfig",
    "TrainConfig",
    "build_algorithm",
    "build_compressor",
    "build_server_optimizer",
    "client_keys",
    "default_config",
    "parse_config",
    "schema",
]

DATASETS = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10")
MODELS = (
    "auto",
    "digits-cnn",
    "digits-bn-cnn",
    "mnist1d-cnn",
    "mnist1d-mlp",
    "transformer",
    "mnist-cnn",
    "cifar-cnn",
    "resnet18",
    "logreg",
)
#: The mnist1d package's default ``num_samples`` (its ``get_dataset_args()``; a test keeps the two equal).
MNIST1D_DEFAULT_SAMPLES = 5000
PARTITIONERS = ("dirichlet", "iid", "full")  # tasks.partition implements them
DEVICES = ("auto", "cpu", "cuda")
ALGORITHMS = tuple(COMPOSITIONS)  # fl_compams.algorithm.ALGORITHMS: the one registry of named compositions


_S = "server"  # side of the keys only the server reads; the others are client keys (Key's default)


def _periods_ok(value: str) -> bool:
    try:
        parse_periods(value)
    except ConfigError:
        return False
    return True


# General keys before the compression keys (federation) and after them; ``schema()`` puts them together.
_FEDERATION: tuple[Key, ...] = (
    key("num-server-rounds", 60, POS_INT, "number of federated rounds T", _S),
    key("fraction-train", 1.0, UNIT_OPEN, "fraction of connected nodes sampled for training each round", _S),
    key("min-train-nodes", 1, POS_INT, "at least this many nodes train each round", _S),
    key("seed", 0, NONNEG_INT, "seed of every random choice (data split, sampling, init, compressors)"),
    key(
        "algorithm",
        "compams",
        choice(ALGORITHMS),
        "compams = compressor + EF + server optimizer as configured; qadam, mvss, sgdm, qsparse, ef-sgdm, laq = "
        "named compositions (fl_compams.algorithm.ALGORITHMS); flower-* = Flower's own strategies",
    ),
)
_ERROR_FEEDBACK = key(
    "error-feedback", True, BOOL, "keep the compression error and add it to the next update"
)
_REST: tuple[Key, ...] = (
    # --- server optimizer
    key("server-opt", "amsgrad", choice(tuple(SERVER_OPTIMIZERS)), "server optimizer", _S),
    key("server-lr", 0.003, POS_FLOAT, "server learning rate eta", _S),
    key("beta1", 0.9, BETA, "first-moment decay (amsgrad, adam)", _S),
    key("beta2", 0.999, BETA, "second-moment decay (amsgrad, adam)", _S),
    key("eps", 1e-8, POS_FLOAT, "epsilon (inside the sqrt for amsgrad, outside for the torch variants)", _S),
    key("server-momentum", 0.0, BETA, "momentum of the sgd server optimizer", _S),
    key("nesterov", False, BOOL, "Nesterov momentum for the sgd server optimizer", _S),
    key(
        "weighting",
        "uniform",
        choice(WEIGHTINGS),
        "average client updates uniformly or by example count",
        _S,
    ),
    key(
        "max-num-examples",
        0,
        NONNEG_INT,
        "cap on the num-examples a client claims (weighting = num-examples, Flower's baselines); 0 = no cap",
        _S,
    ),
    # --- robustness
    key("round-timeout", 600.0, POS_FLOAT, "seconds the server waits for replies in a round", _S),
    key("min-valid-replies", 1, POS_INT, "below this many valid replies a round changes nothing", _S),
    key(
        "update-norm-bound",
        "adaptive",
        choice(BOUND_MODES),
        "per-reply l2 norm bound: adaptive (multiplier x a recent norm), fixed (max-update-norm), off (paper)",
        _S,
    ),
    key(
        "update-norm-multiplier",
        10.0,
        ((lambda v: v >= 1 and math.isfinite(v)), "a finite number >= 1"),
        "adaptive bound: this many times the 0.75-quantile of recent reply norms",
        _S,
    ),
    key(
        "update-norm-window",
        10,
        POS_INT,
        "adaptive bound: the quantile is over the last this many rounds",
        _S,
    ),
    key(
        "max-update-norm",
        0.0,
        NONNEG_FLOAT,
        "the fixed bound (update-norm-bound = fixed); 0 with the other modes",
        _S,
    ),
    key(
        "update-norm-action",
        "reject",
        choice(("clip", "reject")),
        "what the bound does to a larger update: drop it (as TFF's zeroing aggregators), or scale it to the bound",
        _S,
    ),
    # --- client training
    key("local-steps", 1, POS_INT, "local SGD steps H per round (H = 1: one minibatch gradient)"),
    key("local-lr", 0.05, POS_FLOAT, "local learning rate (SGD when local-steps > 1; QAdam's alpha)"),
    key(
        "client-opt",
        "none",
        choice(("none", "adam", "nesterov")),
        "none = send gradients; adam = QAdam's local Adam steps; nesterov = dist-EF-SGDM's Nesterov momentum",
    ),
    key("client-beta1", 0.9, BETA, "QAdam: first-moment decay of the local Adam"),
    key("client-beta2", 0.999, BETA, "QAdam: second-moment decay of the local Adam"),
    key("client-eps", 1e-8, POS_FLOAT, "QAdam: epsilon of the local Adam"),
    key("client-eps-inside-sqrt", False, BOOL, "QAdam: sqrt(v + eps) instead of sqrt(v) + eps"),
    key("client-bias-correction", False, BOOL, "QAdam: bias-correct the local Adam moments"),
    key("batch-size", 32, POS_INT, "local minibatch size"),
    # --- Qsparse-local-SGD (algorithm = "qsparse"; H = local-steps, eta = local-lr, QComp = compressor)
    key(
        "qsparse-async",
        False,
        BOOL,
        "qsparse: asynchronous variant (a client sends the work it did since its last contact, from the model "
        "it received then)",
    ),
    key(
        "qsparse-periods",
        "",
        (_periods_ok, "'', 'uniform' or a comma-separated list of integers >= 1"),
        "qsparse-async: local steps per client; empty = local-steps for all, uniform = drawn in "
        "[1, local-steps] per client from the seed, or one per partition id (e.g. '1,2,4,8')",
    ),
    key("device", "auto", choice(DEVICES), "where clients and server compute; auto = cuda if available"),
    key(
        "deterministic",
        True,
        BOOL,
        "on CUDA, use torch's deterministic kernels so a seeded run repeats (false trades that for speed)",
    ),
    # --- data
    key(
        "dataset",
        "digits",
        choice(DATASETS),
        "data set; digits is embedded, mnist1d is generated locally, the others need data-dir",
    ),
    key("model", "auto", choice(MODELS), "model; auto picks the data set's default"),
    key(
        "buffers",
        "average",
        choice(BUFFER_MODES),
        "model buffers (BatchNorm statistics): average = sent dense and averaged by the server; local = kept "
        "by each client (FedBN), never sent (fl_compams.buffers)",
    ),
    key(
        "data-dir",
        "",
        ANY_STR,
        "directory of downloaded data sets (mnist, fashion-mnist, cifar10) and of the mnist1d cache",
    ),
    key("download", False, BOOL, "allow downloading the data set into data-dir"),
    key(
        "partitioner",
        "dirichlet",
        choice(PARTITIONERS),
        "split of the training set: dirichlet, iid, or full (every client has all)",
    ),
    key("dirichlet-alpha", 0.5, POS_FLOAT, "Dirichlet concentration alpha (smaller = more heterogeneous)"),
    key(
        "min-partition-size", 10, NONNEG_INT, "resample the Dirichlet split until every client has this many"
    ),
    key(
        "mnist1d-samples",
        MNIST1D_DEFAULT_SAMPLES,
        ((lambda v: v >= 10 and v % 10 == 0), "a multiple of 10, >= 10"),
        "MNIST-1D: examples generated (10 classes, equal counts), split 80/20 into train/test",
    ),
    key(
        "validation-fraction",
        0.0,
        num_range(0.0, 0.5),
        "fraction of the training set held out for validation (seeded, stratified; never on clients)",
    ),
    # --- diagnostics and output
    key("probe-every", 0, NONNEG_INT, "measure sigma_g^2 every this many rounds; 0 = never", _S),
    key("checkpoint-every", 0, NONNEG_INT, "write the server state every this many rounds; 0 = never", _S),
    key("resume", False, BOOL, "continue from the latest valid checkpoint in the run directory", _S),
    key(
        "run-name",
        "",
        PLAIN_NAME_OR_EMPTY,
        "results go to <out-dir>/<run-name> (a plain name, never reused without resume); empty = a timestamp",
        _S,
    ),
    key(
        "out-dir",
        "",
        ANY_STR,
        "results root; empty = runs/ under the directory flwr run was started from",
        _S,
    ),
    # --- TensorBoard (strategies.results)
    key(
        "tensorboard",
        False,
        BOOL,
        "also write every round's metrics as TensorBoard scalars in the run directory (tensorboard --logdir runs/)",
        _S,
    ),
)


# LAQ / SLAQ (algorithm = "laq", fl_compams.laq); laq-bits is the quantizer's key (fl_compams.compressors.laq).
_LAQ: tuple[Key, ...] = (
    key("laq-xi", 0.8, NONNEG_FLOAT, "LAQ: weight xi of the model-change history in the skip rule (7a)", _S),
    key("laq-history", 10, POS_INT, "LAQ: model changes D in the skip rule's history", _S),
    key(
        "laq-max-skip",
        100,
        NONNEG_INT,
        "LAQ: t-bar, the most rounds a worker skips in a row (0: never skip, i.e. quantized GD)",
    ),
    key(
        "laq-expire-rounds",
        10,
        POS_INT,
        "LAQ: a worker silent (no upload, no skip) this many rounds is removed from the aggregate",
        _S,
    ),
    key(
        "laq-stochastic",
        False,
        BOOL,
        "LAQ: SLAQ (batch-size minibatches, the code's threshold 0.5 x error term + 0.2); false = full local batch",
    ),
)


# Where and how clients keep their state (clients.state_io, fl_compams.precision); both default to today's bytes.
_STATE: tuple[Key, ...] = (
    key(
        "state-dtype",
        "float32",
        choice(STATE_DTYPES),
        "storage of the EF residual and the two-way replica: float32 (exact), float16 (scaled) or bfloat16; "
        "the rounded residual is the one used, and two-way keeps the public model representable in it",
    ),
    key(
        "state-store",
        "memory",
        choice(("memory", "disk")),
        "where client state arrays live between rounds: memory (context.state) or disk (the node's state-dir, "
        "else a run-scoped temporary directory)",
    ),
)


def schema() -> tuple[Key, ...]:
    """Every run-config key, in the order pyproject.toml lists them, from the registry as it is now.

    The federation keys, ``compressor`` (one of the registered names) and ``error-feedback``, then the keys
    the registered compressors declare (:func:`fl_compams.compressors.base.compressor_keys`), then the
    server, client-training, data and output keys. ``config.SCHEMA`` is the same tuple.
    """
    names = tuple(sorted(COMPRESSORS))
    compressor = key("compressor", "topk", choice(names), "uplink compressor C")
    own = compressor_keys()
    clash = sorted(
        {k.name for k in (*_FEDERATION, compressor, _ERROR_FEEDBACK, *_REST, *_LAQ, *_STATE)}
        & {k.name for k in own}
    )
    if clash:
        raise ValueError(f"compressor config keys {clash} clash with general run-config keys")
    return (*_FEDERATION, compressor, _ERROR_FEEDBACK, *own, *_REST, *_two_way_keys(names), *_LAQ, *_STATE)


def _two_way_keys(names: tuple[str, ...]) -> tuple[Key, ...]:
    """Two-way compression and dist-EF-SGDM (fl_compams.downlink, client_opt.NesterovMomentum)."""
    return (
        key(
            "downlink-compressor",
            "identity",
            choice(names),
            "server broadcast C_s with server EF; identity = the dense model (one-way)",
            _S,
        ),
        key(
            "downlink-ratio",
            0.01,
            UNIT_OPEN,
            "k / d of a sparse downlink compressor (topk, randk, signtopk)",
            _S,
        ),
        key(
            "downlink-log",
            8,
            POS_INT,
            "broadcasts the server keeps; a client further behind gets the dense model",
            _S,
        ),
        key("client-momentum", 0.9, BETA, "Nesterov momentum mu of client-opt = nesterov (0 = dist-EF-SGD)"),
    )


def client_keys() -> tuple[str, ...]:
    """Names of the keys clients need (``side == "client"``, every compressor key among them), in order."""
    return tuple(k.name for k in schema() if k.side == "client")


#: ``SCHEMA`` = ``schema()``, computed at each access so that registered compressors are always included.
SCHEMA: tuple[Key, ...]


def __getattr__(name: str) -> Any:
    if name == "SCHEMA":
        return schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class CompressorConfig:
    """Which compressor, whether error feedback is on, and the compressor keys' values.

    ``params`` maps every registered compressor's run-config key (kebab-case, e.g. ``"topk-ratio"``) to its
    value; :func:`build_compressor` hands it to the chosen class's ``from_config``.
    """

    compressor: str
    error_feedback: bool
    params: Mapping[str, Any] = field(hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))


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
    max_num_examples: int
    round_timeout: float
    min_valid_replies: int
    update_norm_bound: str
    update_norm_multiplier: float
    update_norm_window: int
    max_update_norm: float
    update_norm_action: str
    downlink_compressor: str
    downlink_ratio: float
    downlink_log: int


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
    deterministic: bool
    qsparse_async: bool
    qsparse_periods: str
    client_momentum: float
    state_dtype: str
    state_store: str


@dataclass(frozen=True)
class DataConfig:
    """Data set, model, partitioning and the validation split.

    ``mnist1d_samples`` matters only for ``dataset = "mnist1d"``. ``validation_fraction`` > 0 holds out that
    share of the training set (per class, drawn from the run seed) before partitioning: see
    ``tasks.task.load_data``.
    """

    dataset: str
    model: str
    buffers: str
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
    tensorboard: bool


@dataclass(frozen=True)
class LAQConfig:
    """LAQ's skip rule and aggregate (``algorithm = "laq"``); the bits are the quantizer's ``laq-bits``."""

    laq_xi: float
    laq_history: int
    laq_max_skip: int
    laq_expire_rounds: int
    laq_stochastic: bool


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
    laq: LAQConfig

    def to_flat(self) -> dict[str, Any]:
        """The kebab-case mapping this config was parsed from (with defaults filled in), in schema order."""
        c = self.compression
        flat: dict[str, Any] = {
            "seed": self.seed,
            "algorithm": self.algorithm,
            "compressor": c.compressor,
            "error-feedback": c.error_feedback,
            **c.params,
        }
        for part in (self.server, self.train, self.data, self.output, self.laq):
            for f in dataclasses.fields(part):
                flat[f.name.replace("_", "-")] = getattr(part, f.name)
        return {k.name: flat[k.name] for k in schema()}


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
    keys = schema()
    known = [k.name for k in keys]
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}; known keys: {sorted(known)}")
    _apply_composition(mapping, {k.name: k.default for k in keys})
    values: dict[str, Any] = {}
    for k in keys:
        value = _coerce(k, mapping.get(k.name, k.default))
        if not k.check(value):
            raise ConfigError(f"config key {k.name!r}: must be {k.allowed}, got {value!r}")
        values[k.name] = value

    def take(cls):
        return cls(**{f.name: values[f.name.replace("_", "-")] for f in dataclasses.fields(cls)})

    cfg = ExperimentConfig(
        seed=values["seed"],
        algorithm=values["algorithm"],
        compression=CompressorConfig(
            values["compressor"],
            values["error-feedback"],
            {k.name: values[k.name] for k in compressor_keys()},
        ),
        server=take(ServerConfig),
        train=take(TrainConfig),
        data=take(DataConfig),
        output=take(OutputConfig),
        laq=take(LAQConfig),
    )
    if cfg.server.server_opt != "sgd" and cfg.server.nesterov:
        raise ConfigError("config key 'nesterov': only applies to server-opt = 'sgd'")
    if cfg.server.nesterov and cfg.server.server_momentum == 0.0:
        raise ConfigError("config key 'nesterov': needs server-momentum > 0")
    if cfg.train.client_opt == "adam" and cfg.train.local_steps != 1:
        raise ConfigError(
            "config key 'client-opt': 'adam' (QAdam) sends one local Adam step; set local-steps = 1"
        )
    bound, max_norm = cfg.server.update_norm_bound, cfg.server.max_update_norm
    if bound == "fixed" and max_norm == 0:
        raise ConfigError(
            "config key 'max-update-norm': update-norm-bound = 'fixed' needs max-update-norm > 0"
        )
    if bound != "fixed" and max_norm > 0:
        raise ConfigError(
            f"config key 'max-update-norm': {max_norm!r} is the bound of update-norm-bound = 'fixed', but "
            f"update-norm-bound = {bound!r}; set update-norm-bound = 'fixed', or drop max-update-norm"
        )
    _check_qsparse(cfg)
    _check_two_way(cfg, mapping, {k.name: k.default for k in keys})
    _check_laq(cfg)
    if cfg.output.resume and not cfg.output.run_name:
        raise ConfigError("config key 'resume': needs 'run-name' (the run directory to continue)")
    return cfg


def _check_qsparse(cfg: ExperimentConfig) -> None:
    """The qsparse keys go with ``algorithm = "qsparse"``; its periods with its asynchronous variant."""
    train = cfg.train
    if cfg.algorithm != "qsparse":
        for name, value, default in (
            ("qsparse-async", train.qsparse_async, False),
            ("qsparse-periods", train.qsparse_periods, ""),
        ):
            if value != default:
                raise ConfigError(
                    f"config key {name!r}: applies to algorithm = 'qsparse' only, got {value!r}"
                )
        return
    build_qsparse(cfg)
    check_compressor(build_compressor(cfg.compression))


def build_qsparse(cfg: ExperimentConfig) -> Qsparse | None:
    """Qsparse-local-SGD's worker part (``algorithm = "qsparse"``), or None for the other algorithms."""
    if cfg.algorithm != "qsparse":
        return None
    t = cfg.train
    return Qsparse(
        lr=t.local_lr,
        steps=t.local_steps,
        asynchronous=t.qsparse_async,
        periods=parse_periods(t.qsparse_periods),
        seed=cfg.seed,
    )


def _check_two_way(cfg: ExperimentConfig, mapping: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Downlink compression needs the algorithm layer; client-momentum needs client-opt = nesterov."""
    down = cfg.server.downlink_compressor
    if down != "identity" and cfg.algorithm in FLOWER_BASELINES:
        raise ConfigError(
            f"config key 'downlink-compressor': {down!r} needs the algorithm layer; algorithm "
            f"{cfg.algorithm!r} is Flower's own strategy and broadcasts the dense model (use 'identity')"
        )
    for name in ("downlink-ratio", "downlink-log"):
        if down == "identity" and mapping.get(name, defaults[name]) != defaults[name]:
            raise ConfigError(f"config key {name!r}: applies to a downlink-compressor other than 'identity'")
    if cfg.train.client_opt != "nesterov" and cfg.train.client_momentum != defaults["client-momentum"]:
        raise ConfigError("config key 'client-momentum': only applies to client-opt = 'nesterov'")


def _check_laq(cfg: ExperimentConfig) -> None:
    """LAQ's rule assumes every worker checks it every iteration, on one gradient."""
    if cfg.algorithm != "laq":
        return
    if cfg.server.fraction_train < 1.0:
        raise ConfigError(
            f"config key 'fraction-train': algorithm 'laq' needs 1.0, got {cfg.server.fraction_train!r}: LAQ's skip "
            "rule assumes every worker checks it every iteration (a worker not sampled would neither upload nor "
            "skip, and its stale gradient would stay in the aggregate)"
        )
    if cfg.train.local_steps != 1:
        raise ConfigError(
            "config key 'local-steps': algorithm 'laq' sends one gradient per round; set 1, got "
            f"{cfg.train.local_steps}"
        )


def _apply_composition(mapping: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """Fill in the settings a named algorithm fixes; refuse an explicit value that contradicts one.

    A key still at its schema default takes the composition's value (``flwr run`` passes every key, so a default
    cannot be told from an explicit choice of the same value).
    """
    name = mapping.get("algorithm", defaults["algorithm"])
    for name_of_key, value in COMPOSITIONS.get(name, {}).items():
        allowed = value if isinstance(value, tuple) else (value,)
        given = mapping.get(name_of_key, defaults[name_of_key])
        if given != defaults[name_of_key] and given not in allowed:
            fixed = f"one of {list(allowed)}" if len(allowed) > 1 else repr(value)
            raise ConfigError(
                f"config key {name_of_key!r}: algorithm {name!r} fixes it to {fixed}, got {given!r}; drop the "
                "key, or use algorithm = 'compams' and set the parts yourself"
            )
        mapping[name_of_key] = given if given in allowed else allowed[0]


def default_config() -> ExperimentConfig:
    """All defaults."""
    return parse_config({})


def build_compressor(cfg: CompressorConfig, block_sizes: tuple[int, ...] | None = None) -> Compressor:
    """The compressor named by the config, from its class's ``from_config`` (Block-Sign: the model's blocks)."""
    return compressor_class(cfg.compressor).from_config(cfg.params, block_sizes)


def build_client_optimizer(cfg: TrainConfig) -> LocalAdam | NesterovMomentum | None:
    """QAdam's local Adam (``client-opt = "adam"``), dist-EF-SGDM's Nesterov momentum (``"nesterov"``), or None.

    None: clients send plain gradients.
    """
    if cfg.client_opt == "none":
        return None
    if cfg.client_opt == "nesterov":
        return NesterovMomentum(cfg.client_momentum)
    return LocalAdam(
        lr=cfg.local_lr,
        beta1=cfg.client_beta1,
        beta2=cfg.client_beta2,
        eps=cfg.client_eps,
        eps_inside_sqrt=cfg.client_eps_inside_sqrt,
        bias_correction=cfg.client_bias_correction,
    )


def build_algorithm(cfg: ExperimentConfig, block_sizes: tuple[int, ...] | None = None) -> Algorithm:
    """The configured composition of parts (uplink compressor + EF, local optimizer, bound, server optimizer)."""
    return Algorithm(
        name=cfg.algorithm,
        compressor=build_compressor(cfg.compression, block_sizes),
        server_opt=build_server_optimizer(cfg.server),
        error_feedback=cfg.compression.error_feedback,
        local_opt=build_client_optimizer(cfg.train),
        weighting=cfg.server.weighting,
        bound=ReplyBound(
            mode=cfg.server.update_norm_bound,
            max_norm=cfg.server.max_update_norm,
            multiplier=cfg.server.update_norm_multiplier,
            window=cfg.server.update_norm_window,
            action=cfg.server.update_norm_action,
        ),
        min_valid_replies=cfg.server.min_valid_replies,
        qsparse=build_qsparse(cfg),
        downlink=build_downlink(cfg, block_sizes),
        lazy=build_lazy(cfg.laq) if cfg.algorithm == "laq" else None,
    )


def build_lazy(cfg: LAQConfig) -> LazyConfig:
    """LAQ's trigger and aggregator settings (SLAQ's threshold with ``laq-stochastic``)."""
    return LazyConfig(
        xi=cfg.laq_xi,
        history=cfg.laq_history,
        max_skip=cfg.laq_max_skip,
        expire_rounds=cfg.laq_expire_rounds,
        stochastic=cfg.laq_stochastic,
    )


def build_downlink(cfg: ExperimentConfig, block_sizes: tuple[int, ...] | None = None) -> DownlinkPart | None:
    """The server's broadcast compressor (``downlink-compressor``), or None for the dense model.

    Built through the compressor registry with the uplink's compressor keys, except that a sparse compressor keeps
    ``downlink-ratio`` of the coordinates; Block-Sign uses the model's per-layer blocks.
    """
    s = cfg.server
    if s.downlink_compressor == "identity":
        return None
    values = {**cfg.compression.params, "topk-ratio": s.downlink_ratio, "topk-k": 0}
    compressor = compressor_class(s.downlink_compressor).from_config(values, block_sizes)
    return DownlinkPart(compressor, log_size=s.downlink_log, seed=cfg.seed, dtype=cfg.train.state_dtype)


def build_server_optimizer(cfg: ServerConfig) -> ServerOptimizer:
    """The server optimizer named by the config."""
    if cfg.server_opt == "sgd":
        return make_server_optimizer(
            "sgd", lr=cfg.server_lr, momentum=cfg.server_momentum, nesterov=cfg.nesterov
        )
    return make_server_optimizer(
        cfg.server_opt, lr=cfg.server_lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps
    )
