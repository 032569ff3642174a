"""Non-trainable buffers (BatchNorm running statistics and counters): checked, averaged, counted; never compressed.

A model's buffers (:attr:`fl_compams.flat.ParamSpec.buffer_names`) stay out of the flat vector the core
compresses, and out of the server optimizer: AMSGrad's moments cover the trainable parameters only. The config
key ``buffers`` says what happens to them:

``average``
    Every reply carries its buffers dense beside the compressed payload (float32 statistics, int64 counters).
    The server checks them (:func:`check`), averages them over the replies it applied this round with the
    payloads' weights (:func:`average`; FedAvg applied to the whole state dict, McMahan et al., AISTATS 2017)
    and broadcasts and evaluates the average. A round that applies nothing keeps the previous buffers.
``local``
    FedBN's handling of the statistics (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
    Normalization", ICLR 2021; FedBN also keeps BatchNorm's affine weights local, here they are shared and
    compressed like every trainable tensor): each client keeps its own buffers in its state and sends none. The
    server never learns them, so it keeps (broadcasts, evaluates, checkpoints) the seeded model's initial buffers
    (mean 0, variance 1). Its central accuracy then measures the shared weights with untrained statistics, which
    says little about the method: FedBN evaluates each client with its own buffers on its own data, and that
    per-client evaluation is not built here.

In train mode BatchNorm normalises with each minibatch's own statistics, so local training (losses, gradients,
payloads) never reads the running buffers: they matter only where the model runs in eval mode (the server's
evaluation, the sigma_g^2 probe, a client's evaluation).

Averaging variances ignores the spread of the clients' means (the average of per-client variances is not the
variance of the pooled data); it is what averaging the state dict does and what FedAvg baselines report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fl_compams.errors import ConfigError, PayloadError
from fl_compams.flat import ParamSpec, flatten

__all__ = [
    "BUFFER_MODES",
    "average",
    "check",
    "check_spec",
    "pack",
    "packed_shapes",
    "theory_bits",
    "unpack",
    "unsupported",
]

#: Values of the ``buffers`` config key.
BUFFER_MODES = ("average", "local")
#: Buffer dtypes that travel: floating statistics and integer counters.
FLOAT_DTYPES = ("float32",)
INT_DTYPES = ("int64",)
#: Buffers that are variances (BatchNorm's ``running_var``): finite and >= 0.
_VARIANCE_SUFFIX = "running_var"


def check_spec(spec: ParamSpec) -> None:
    """Raise ConfigError if a buffer has a dtype the wire does not carry (float32 statistics, int64 counters)."""
    for name, dtype, trainable in zip(spec.names, spec.dtypes, spec.trainable, strict=True):
        if not trainable and dtype not in FLOAT_DTYPES + INT_DTYPES:
            raise ConfigError(
                f"model buffer {name!r} is {dtype}; buffers must be float32 or int64 (BatchNorm's statistics)"
            )


def unsupported(algorithm: str, downlink_compressor: str, baselines: Sequence[str]) -> str | None:
    """Why a run with a model that has buffers cannot go ahead, or None if it can.

    Flower's own FedAvg / FedAdam would treat buffers as weights (FedAdam takes adaptive steps on running
    variances; FedAvg turns the int64 counter into a float); two-way compression trains on a replica of the
    trainable vector only, which has no buffers to carry them.
    """
    if algorithm in baselines:
        return (
            f"algorithm {algorithm!r} is Flower's own strategy, which averages (or steps) every array, buffers "
            "included; use algorithm = 'compams' with compressor = 'identity' for a dense FedAvg-like baseline"
        )
    if downlink_compressor != "identity":
        return (
            f"downlink-compressor = {downlink_compressor!r}: two-way compression sends the trainable vector "
            "only and cannot carry buffers; use 'identity'"
        )
    return None


def check(spec: ParamSpec, tensors: Mapping[str, torch.Tensor], what: str = "buffers") -> None:
    """Raise PayloadError unless ``tensors`` are exactly the spec's buffers with sane values.

    Names, shapes and dtypes as the spec says; float buffers finite, variances (``*running_var``) >= 0;
    integer counters >= 0.
    """
    expected = spec.buffer_names
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise PayloadError(
            f"{what} must be the model's buffers: missing {missing[:8]}, unexpected {extra[:8]}"
        )
    shapes = dict(zip(spec.names, spec.shapes, strict=True))
    dtypes = dict(zip(spec.names, spec.dtypes, strict=True))
    for name in expected:
        t = tensors[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if tuple(t.shape) != shapes[name] or dtype != dtypes[name]:
            raise PayloadError(
                f"{what}: {name!r} must be {dtypes[name]} of shape {shapes[name]}, got {dtype} of shape "
                f"{tuple(t.shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PayloadError(f"{what}: {name!r} has non-finite values")
        if (name.endswith(_VARIANCE_SUFFIX) or not t.is_floating_point()) and bool((t < 0).any()):
            raise PayloadError(f"{what}: {name!r} has negative values (a variance or a counter)")


def average(
    spec: ParamSpec, buffers: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> torch.Tensor:
    """``sum_i w_i b_i`` as a flat float32 vector in the spec's buffer order (float64 accumulation).

    ``weights`` are normalised (they sum to 1). Integer counters are rounded to the nearest integer, so the
    vector unflattens to the spec's dtypes exactly (float32 holds integers exactly up to 2**24).
    """
    if not buffers or len(buffers) != len(weights):
        raise ValueError(
            f"need one weight per buffer set and at least one set, got {len(buffers)}, {len(weights)}"
        )
    total = torch.zeros(spec.buffer_dim, dtype=torch.float64)
    for tensors, w in zip(buffers, weights, strict=True):
        total += float(w) * flatten(tensors, spec, trainable=False).cpu().double()
    offset = 0
    for name in spec.buffer_names:
        i = spec.names.index(name)
        size = spec.sizes[i]
        if spec.dtypes[i] in INT_DTYPES:
            total[offset : offset + size] = total[offset : offset + size].round()
        offset += size
    return total.float()


def packed_shapes(spec: ParamSpec) -> dict[str, tuple[int]]:
    """The wire layout of a buffer set: one flat vector per dtype (``float32``, ``int64``), in spec order.

    Two arrays instead of one per buffer: ResNet-18 has 60 buffers, and each array on the wire carries its own
    ``.npy`` header and name (about 350 bytes: 21 kB of 60 kB per reply, against 0.3 kB packed). A dtype the
    model has no buffer of is left out.
    """
    counts: dict[str, int] = {}
    for dtype, size, trainable in zip(spec.dtypes, spec.sizes, spec.trainable, strict=True):
        if not trainable:
            counts[dtype] = counts.get(dtype, 0) + size
    return {dtype: (n,) for dtype, n in counts.items()}


def pack(spec: ParamSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A buffer set as :func:`packed_shapes` lays it out (CPU tensors)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name, dtype, trainable in zip(spec.names, spec.dtypes, spec.trainable, strict=True):
        if not trainable:
            parts.setdefault(dtype, []).append(tensors[name].detach().cpu().reshape(-1))
    return {dtype: torch.cat(ts) for dtype, ts in parts.items()}


def unpack(spec: ParamSpec, packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named buffers from :func:`pack`'s vectors, which must have :func:`packed_shapes` (else PayloadError)."""
    shapes = packed_shapes(spec)
    if set(packed) != set(shapes):
        raise PayloadError(f"buffers must be the vectors {sorted(shapes)}, got {sorted(packed)[:8]}")
    offsets = dict.fromkeys(shapes, 0)
    out = {}
    for name, shape, dtype, size, trainable in zip(
        spec.names, spec.shapes, spec.dtypes, spec.sizes, spec.trainable, strict=True
    ):
        if trainable:
            continue
        vector = packed[dtype]
        if tuple(vector.shape) != shapes[dtype] or str(vector.dtype).removeprefix("torch.") != dtype:
            raise PayloadError(
                f"buffers: the {dtype} vector must be {dtype} of shape {shapes[dtype]}, got "
                f"{str(vector.dtype).removeprefix('torch.')} of shape {tuple(vector.shape)}"
            )
        out[name] = vector[offsets[dtype] : offsets[dtype] + size].reshape(shape)
        offsets[dtype] += size
    return out


def theory_bits(spec: ParamSpec) -> float:
    """Bits of one dense buffer set: 32 per float32 value, 64 per int64 counter."""
    bits = 0
    for dtype, size, trainable in zip(spec.dtypes, spec.sizes, spec.trainable, strict=True):
        if not trainable:
            bits += 64 * size if dtype in INT_DTYPES else 32 * size
    return float(bits)


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a buffer set's values (its size in a client's state)."""
    return sum(math.prod(t.shape) * t.element_size() for t in tensors.values())
