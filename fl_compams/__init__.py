"""fl_compams: the framework-agnostic core of COMP-AMS (torch + numpy only; never imports flwr or ray).

Li, Karimi & Li, "On Distributed Adaptive Optimization with Gradient Compression", ICLR 2022: clients compress
``update + residual`` (Top-k or Block-Sign), keep the compression error as their new residual, and the server
runs AMSGrad on the average of the decoded payloads.
"""

from fl_compams.aggregate import aggregation_weights, weighted_mean
from fl_compams.codec import from_bytes, to_bytes
from fl_compams.compressors import (
    COMPRESSORS,
    MVSS,
    QSGD,
    BlockSign,
    Compressor,
    Identity,
    RandK,
    SignTopK,
    TopK,
    make_compressor,
)
from fl_compams.config import ExperimentConfig, build_compressor, build_server_optimizer, parse_config
from fl_compams.error_feedback import ef_step
from fl_compams.errors import ConfigError, PayloadError
from fl_compams.flat import ParamSpec, flatten, unflatten
from fl_compams.payloads import Kind, Payload
from fl_compams.server_opt import (
    SERVER_OPTIMIZERS,
    SGD,
    AdamState,
    AMSGrad,
    SGDState,
    TorchAdam,
    TorchAMSGrad,
    make_server_optimizer,
)

__all__ = [
    "COMPRESSORS",
    "MVSS",
    "QSGD",
    "SERVER_OPTIMIZERS",
    "SGD",
    "AMSGrad",
    "AdamState",
    "BlockSign",
    "Compressor",
    "ConfigError",
    "ExperimentConfig",
    "Identity",
    "Kind",
    "ParamSpec",
    "Payload",
    "PayloadError",
    "RandK",
    "SGDState",
    "SignTopK",
    "TopK",
    "TorchAMSGrad",
    "TorchAdam",
    "aggregation_weights",
    "build_compressor",
    "build_server_optimizer",
    "ef_step",
    "flatten",
    "from_bytes",
    "make_compressor",
    "make_server_optimizer",
    "parse_config",
    "to_bytes",
    "unflatten",
    "weighted_mean",
]
