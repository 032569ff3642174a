"""Flat vectors, the run-config schema, and the core's independence from flwr and ray."""

import pathlib

import numpy as np
import pytest
import tomllib
import torch

import fl_compams
from fl_compams import (
    ConfigError,
    ParamSpec,
    build_compressor,
    build_server_optimizer,
    flatten,
    parse_config,
    protocol,
    unflatten,
)
from fl_compams.compressors.base import compressor_keys
from fl_compams.config import SCHEMA

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.bn = torch.nn.BatchNorm2d(2)
        self.fc = torch.nn.Linear(8, 3)
        self.fc.bias.requires_grad_(False)


def test_flatten_unflatten_round_trip_with_buffers():
    net = Net()
    spec = ParamSpec.from_module(net)
    sd = net.state_dict()
    assert spec.block_sizes == (18, 2, 2, 2, 24)  # conv.w, conv.b, bn.w, bn.b, fc.w (fc.b frozen)
    assert spec.dim == 48 and spec.buffer_dim == 2 + 2 + 1 + 3
    vec = flatten(sd, spec)
    assert vec.dtype == torch.float32 and vec.shape == (48,)
    back = unflatten(vec, spec)
    for name, t in back.items():
        assert torch.equal(t, sd[name]) and t.dtype == sd[name].dtype
    buffers = unflatten(flatten(sd, spec, trainable=False), spec, trainable=False)
    assert torch.equal(buffers["bn.num_batches_tracked"], sd["bn.num_batches_tracked"])
    assert buffers["bn.num_batches_tracked"].dtype == torch.int64
    assert ParamSpec.from_dict(spec.to_dict()) == spec


def test_flatten_numpy_and_errors():
    arrays = {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    spec = ParamSpec.from_tensors(arrays)
    assert torch.equal(flatten(arrays, spec), torch.tensor([1.0] * 6 + [0.0] * 4))
    with pytest.raises(ValueError, match="tensor 'b' of the ParamSpec is missing"):
        flatten({"a": arrays["a"]}, spec)
    with pytest.raises(ValueError, match=r"expected shape \(4,\), got \(5,\)"):
        flatten({"a": arrays["a"], "b": np.zeros(5, np.float32)}, spec)
    with pytest.raises(ValueError, match="flat vector of 10 elements"):
        unflatten(torch.zeros(9), spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flatten_stays_on_device():
    net = Net().cuda()
    assert flatten(net.state_dict(), ParamSpec.from_module(net)).device.type == "cuda"


def test_defaults_parse_and_round_trip():
    cfg = parse_config()
    assert cfg.compression.compressor == "topk" and cfg.server.server_opt == "amsgrad"
    assert parse_config(cfg.to_flat()) == cfg
    assert isinstance(build_server_optimizer(cfg.server), fl_compams.AMSGrad)
    c = build_compressor(parse_config({"compressor": "blocksign"}).compression, (3, 4))
    assert c.block_sizes == (3, 4)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"topk-ration": 0.1}, "unknown config key.*'topk-ration' \\(did you mean 'topk-ratio'\\?\\)"),
        ({"topk-ratio": 0.0}, r"'topk-ratio': must be a number in \(0.0, 1.0\], got 0.0"),
        ({"topk-ratio": 1.5}, "'topk-ratio'"),
        ({"server-lr": -1.0}, "'server-lr': must be a finite number > 0"),
        ({"beta1": 1.0}, r"'beta1': must be a number in \[0.0, 1.0\)"),
        ({"beta2": 1.2}, "'beta2'"),
        ({"eps": 0.0}, "'eps'"),
        ({"compressor": "topk2"}, "'compressor': must be one of"),
        ({"error-feedback": 1}, "'error-feedback': expected true or false"),
        ({"local-steps": 1.5}, "'local-steps': expected an integer"),
        ({"local-steps": 0}, "'local-steps': must be an integer >= 1"),
        ({"seed": "1"}, "'seed': expected an integer"),
        ({"nesterov": True}, "'nesterov': only applies"),
        ({"dataset": "mnist-1d"}, "'dataset': must be one of"),
        ({"mnist1d-samples": 995}, "'mnist1d-samples': must be a multiple of 10"),
        ({"mnist1d-samples": 0}, "'mnist1d-samples'"),
        ({"validation-fraction": 0.6}, r"'validation-fraction': must be a number in \[0.0, 0.5\]"),
        ({"validation-fraction": -0.1}, "'validation-fraction'"),
    ],
)
def test_bad_config_is_rejected_with_the_key_named(override, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(override)


def test_int_is_accepted_for_float_keys():
    assert parse_config({"server-lr": 1}).server.server_lr == 1.0


def test_pyproject_lists_every_key_with_the_schema_default():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if app_config is None:
        pytest.skip("the Flower app section is not in pyproject.toml yet")
    assert app_config == {k.name: k.default for k in SCHEMA}
    assert list(app_config) == [k.name for k in SCHEMA]


def test_client_keys_are_derived_from_the_schema():
    assert compressor_keys() and all(k.side == "client" for k in compressor_keys())
    assert {k.name for k in compressor_keys()} <= set(protocol.CLIENT_KEYS)
    assert list(protocol.CLIENT_KEYS) == [k.name for k in SCHEMA if k.name in protocol.CLIENT_KEYS]
    server_only = {k.name for k in SCHEMA} - set(protocol.CLIENT_KEYS)
    assert server_only == {
        "num-server-rounds", "fraction-train", "min-train-nodes", "server-opt", "server-lr", "beta1", "beta2",
        "eps", "server-momentum", "nesterov", "weighting", "max-num-examples", "round-timeout", "min-valid-replies",
        "update-norm-bound", "update-norm-multiplier", "update-norm-window", "max-update-norm",
        "update-norm-action", "probe-every", "checkpoint-every", "resume", "run-name",
        "out-dir", "downlink-compressor", "downlink-ratio", "downlink-log",
        "laq-xi", "laq-history", "laq-expire-rounds",
        "tensorboard",
    }  # fmt: skip
