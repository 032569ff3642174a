"""Everything a client sends that the server uses, checked in one place (issue 10).

Training replies (CompAMS's and Flower's baselines'), hello replies (node names) and probe replies. Each check
is a pure function over Flower records; a bad value raises :class:`fl_compams.errors.PayloadError` naming the
field, what was expected and what was got. The caller drops *that* reply (a training reply then counts as lost,
so its client folds it back), or leaves that node out of the probe or names it by its node id, and logs the
reason: no value a client sends can stop the run.

Rules:

- **Metrics.** The server reads and records only the metrics in :data:`TRAIN_METRICS`, each of a fixed type
  (counts: integers >= 0; the loss: a finite number; norms: finite numbers >= 0). A known metric of the wrong
  type or range drops the reply. Every other name a client sends is left out of the results (listed in the
  log): a client cannot add columns, bloat ``metrics.jsonl`` or pose as a server-measured field such as
  ``uplink-bytes``; the per-client rows add client metrics only under names the server has not set.
- **num-examples** is capped at ``max-num-examples`` when that is > 0 (weighting by examples trusts the claim).
- **Payloads** go through :func:`fl_compams.codec.from_bytes` with the expected kind, dimension and the model's
  block layout (a Block-Sign payload must have the model's blocks, which bounds its decode cost).
- **Skips** (LAQ): the ``skip`` field must be ``True`` with empty payload bytes, and only an algorithm that can
  skip accepts one; any other algorithm drops it (it never moves the model).
- **Names.** A hello reply claims ``partition-id`` (an integer >= -1; -1 = none) and ``node-name`` (a plain
  name, :data:`fl_compams.schema.PLAIN_NAME`, not all digits, at most :data:`MAX_NODE_NAME` characters, or
  empty). Claims are only labels: they are granted in node id order, the first claim of a label wins and a
  later duplicate, like any node whose claim is malformed, is named ``node-<node id>`` (a label no valid name
  can take, since names are never all digits).
- **Buffers** (``buffers = "average"``, :mod:`fl_compams.buffers`): a reply with a payload carries the model's
  buffers in the ``buffers`` ArrayRecord (one float32 vector of statistics, one int64 vector of counters, each of
  the model's length, read like arrays below), finite, with variances and counters >= 0; any other reply carries
  none.
- **Arrays** (probe gradients, Flower baselines' models) must be float32 numpy arrays of the expected shape
  whose ``.npy`` header agrees, with finite values; they are read with ``np.frombuffer``, never ``np.load``,
  so a header claiming a huge shape allocates nothing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fl_compams import buffers, protocol
from fl_compams.codec import from_bytes
from fl_compams.downlink import Version, parse_version
from fl_compams.errors import PayloadError
from fl_compams.flat import ParamSpec
from fl_compams.payloads import Payload
from fl_compams.schema import PLAIN_NAME

__all__ = [
    "MAX_NODE_NAME",
    "TRAIN_METRICS",
    "ReplyMetrics",
    "TrainingReply",
    "buffers_reply",
    "check_node_name",
    "dense_model_reply",
    "node_claim",
    "probe_reply",
    "quote_names",
    "reply_metrics",
    "training_reply",
]

#: Longest ``node-name`` a hello reply may claim.
MAX_NODE_NAME = 64
_COUNT = "an integer >= 0"
_FINITE = "a finite number"
_NORM = "a finite number >= 0"
#: The metrics a training reply may carry, what each must be, and whether it is required.
TRAIN_METRICS: Mapping[str, tuple[str, bool]] = {
    protocol.NUM_EXAMPLES: (_COUNT, True),
    protocol.TRAIN_LOSS: (_FINITE, True),
    protocol.RESIDUAL_NORM: (_NORM, False),
    protocol.RESIDUAL_NORM_IN: (_NORM, False),
    protocol.FOLDED_NORM: (_NORM, False),
    protocol.REMOVED_NORM: (_NORM, False),
    protocol.STATE_ROUNDS: (_COUNT, False),
    protocol.WORK_STEPS: (_COUNT, False),
    protocol.STALENESS: (_COUNT, False),
    **{name: (_COUNT, False) for name in protocol.STATE_BYTES.values()},
}
_SHOWN = 60  # characters of a bad value quoted in a message (a value may be a list of a million numbers)


def _show(value: Any) -> str:
    text = repr(value)
    kind = type(value).__name__
    return f"{text if len(text) <= _SHOWN else text[:_SHOWN] + '...'} ({kind})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(what: str, value: Any, rule: str) -> int | float:
    """``value`` if it satisfies ``rule`` (one of the :data:`TRAIN_METRICS` rules); else raise PayloadError."""
    if rule == _COUNT:
        ok = _is_int(value) and value >= 0
    else:
        ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
        ok = ok and (rule == _FINITE or value >= 0)
    if not ok:
        raise PayloadError(f"{what} must be {rule}, got {_show(value)}")
    return value


def _record(content: RecordDict, name: str, kind: type) -> Any:
    record = content[name] if name in content else None
    if not isinstance(record, kind):
        raise PayloadError(
            f"reply has no {name!r} {kind.__name__}; got records {quote_names(content.keys())}"
        )
    return record


def quote_names(names: Iterable[str], limit: int = 8) -> str:
    """Sorted names, quoted and shortened, at most ``limit`` of them (for messages and the log)."""
    names = sorted(names)
    shown = ", ".join(repr(n[:_SHOWN]) for n in names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


@dataclass(frozen=True)
class ReplyMetrics:
    """A reply's metrics after validation.

    ``values``: the known metrics it carried, by protocol name (``num-examples`` capped); ``claimed``: the
    ``num-examples`` it claimed; ``dropped``: the names of the metrics the server does not read.
    """

    values: dict[str, int | float]
    claimed: int
    dropped: tuple[str, ...]


def reply_metrics(
    metrics: MetricRecord,
    *,
    weighted: bool = False,
    max_num_examples: int = 0,
    known: Mapping[str, tuple[str, bool]] = TRAIN_METRICS,
) -> ReplyMetrics:
    """Check the known metrics of a training reply and cap ``num-examples``; raise PayloadError on a bad one.

    ``weighted``: replies are weighted by ``num-examples``, which must then be > 0.
    """
    values: dict[str, int | float] = {}
    for name, (rule, required) in known.items():
        if name not in metrics:
            if required:
                raise PayloadError(f"metric {name!r} is missing; it must be {rule}")
            continue
        values[name] = check_number(f"metric {name!r}", metrics[name], rule)
    claimed = int(values.get(protocol.NUM_EXAMPLES, 0))
    if weighted and protocol.NUM_EXAMPLES in values and claimed == 0:
        raise PayloadError("metric 'num-examples' is 0, but replies are weighted by num-examples")
    if max_num_examples and claimed > max_num_examples:
        values[protocol.NUM_EXAMPLES] = max_num_examples
    dropped = tuple(sorted(k for k in metrics.keys() if k not in known))
    return ReplyMetrics(values, claimed, dropped)


@dataclass(frozen=True)
class TrainingReply:
    """A CompAMS training reply that passed validation: its decoded payload, its acknowledgement, metrics."""

    payload: Payload | None  # None: a skip
    payload_bytes: int
    acked: int
    metrics: ReplyMetrics


def training_reply(
    content: RecordDict,
    rnd: int,
    *,
    dim: int,
    kind: int,
    block_sizes: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    weighted: bool = False,
    max_num_examples: int = 0,
    can_skip: bool = False,
) -> TrainingReply:
    """Check a CompAMS training reply's records and metrics, then decode its payload (cheap checks first).

    ``can_skip``: the algorithm accepts skips (LAQ); a valid skip has ``payload = None``.
    """
    record = _record(content, protocol.PAYLOAD, ConfigRecord)
    if protocol.PAYLOAD_BYTES not in record:
        raise PayloadError(
            f"reply has no {protocol.PAYLOAD!r} ConfigRecord with {protocol.PAYLOAD_BYTES!r}; "
            f"got fields {quote_names(record.keys())}"
        )
    data = record[protocol.PAYLOAD_BYTES]
    if not isinstance(data, bytes):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    reply_round = record.get(protocol.REPLY_ROUND, rnd)
    if reply_round != rnd or not _is_int(reply_round):
        raise PayloadError(f"reply answers round {_show(reply_round)}, expected this round {rnd}")
    acked = record.get(protocol.ACKED, -1)
    if not _is_int(acked) or not -1 <= acked < rnd:
        raise PayloadError(f"{protocol.ACKED!r} must be an integer in [-1, {rnd - 1}], got {_show(acked)}")
    metrics = reply_metrics(
        _record(content, protocol.METRICS, MetricRecord), weighted=weighted, max_num_examples=max_num_examples
    )
    if protocol.SKIP in record:
        skip = record[protocol.SKIP]
        if skip is not True or data:
            raise PayloadError(f"a skip is {protocol.SKIP!r} = True with an empty payload, got {_show(skip)}")
        if not can_skip:
            raise PayloadError("a skip reply, but this algorithm cannot skip (only algorithm = 'laq' skips)")
        return TrainingReply(None, 0, acked, metrics)
    payload = from_bytes(data, dim, expected_kind=kind, block_sizes=block_sizes, device=device)
    return TrainingReply(payload, len(data), acked, metrics)


def resync_request(content: RecordDict) -> str | None:
    """Why a two-way client could not reach the public model, or None for an ordinary reply.

    Such a client trained nothing and wants the dense model; the reason is a string (shortened).
    """
    record = content[protocol.PAYLOAD] if protocol.PAYLOAD in content else None
    if not isinstance(record, ConfigRecord) or protocol.RESYNC not in record:
        return None
    reason = record[protocol.RESYNC]
    return reason[:_SHOWN] if isinstance(reason, str) else _show(reason)


def replica_echo(content: RecordDict) -> Version:
    """The replica version a two-way reply says it trained at (a well-formed version; unknown ones get a resync)."""
    record = _record(content, protocol.PAYLOAD, ConfigRecord)
    try:
        return parse_version(record.get(protocol.REPLICA))
    except ValueError as err:
        raise PayloadError(f"{protocol.REPLICA!r}: {err}") from None


def dense_model_reply(
    content: RecordDict, shapes: Mapping[str, Sequence[int]], *, max_num_examples: int = 0
) -> ReplyMetrics:
    """Check a Flower baseline's reply: one ``arrays`` record with the model's tensors, one ``metrics`` record.

    Flower's FedAvg / FedAdam weight by ``num-examples`` (so it must be > 0) and average every array; each must
    be a finite float32 tensor of the model's shape. Returns the checked metrics (``num-examples`` capped).
    """
    arrays, metric_records = content.array_records, content.metric_records
    if set(arrays) != {protocol.ARRAYS} or set(metric_records) != {protocol.METRICS}:
        raise PayloadError(
            f"reply must hold exactly one ArrayRecord {protocol.ARRAYS!r} and one MetricRecord "
            f"{protocol.METRICS!r}; got ArrayRecords {quote_names(arrays)}, MetricRecords {quote_names(metric_records)}"
        )
    record = arrays[protocol.ARRAYS]
    if set(record.keys()) != set(shapes):
        raise PayloadError(
            f"model arrays must be the model's tensors {quote_names(shapes)}, got {quote_names(record.keys())}"
        )
    for name, shape in shapes.items():
        _float32_array(record[name], f"array {name!r}", tuple(shape))
    known = {k: TRAIN_METRICS[k] for k in (protocol.NUM_EXAMPLES, protocol.TRAIN_LOSS)}
    return reply_metrics(
        metric_records[protocol.METRICS], weighted=True, max_num_examples=max_num_examples, known=known
    )


def probe_reply(content: RecordDict, dim: int) -> tuple[torch.Tensor, float]:
    """The full local gradient (float64, length ``dim``, finite) and the local variance (finite, >= 0)."""
    record = _record(content, protocol.PROBE_GRADIENT, ArrayRecord)
    if set(record.keys()) != {protocol.PROBE_GRADIENT}:
        raise PayloadError(
            f"probe gradient record must hold one array {protocol.PROBE_GRADIENT!r}, got {quote_names(record.keys())}"
        )
    grad = _float32_array(record[protocol.PROBE_GRADIENT], "probe gradient", (dim,))
    metrics = _record(content, protocol.METRICS, MetricRecord)
    if protocol.LOCAL_VARIANCE not in metrics:
        raise PayloadError(f"metric {protocol.LOCAL_VARIANCE!r} is missing; it must be {_NORM}")
    variance = check_number(f"metric {protocol.LOCAL_VARIANCE!r}", metrics[protocol.LOCAL_VARIANCE], _NORM)
    return torch.from_numpy(grad.astype(np.float64)), float(variance)


def buffers_reply(content: RecordDict, spec: ParamSpec, *, expected: bool) -> dict[str, torch.Tensor] | None:
    """The model buffers a training reply carries (``buffers = "average"``), checked; None if it carries none.

    ``expected``: the reply must carry them (a reply with a payload under ``buffers = "average"``); otherwise it
    must not (``buffers = "local"``, a skip, a model without buffers). The record holds the spec's buffers packed
    (:func:`fl_compams.buffers.pack`: one float32 and one int64 vector, each of its length; headers checked before
    anything is read); the values must pass :func:`fl_compams.buffers.check` (finite, variances and counters
    >= 0). Returns them by name.
    """
    record = content[protocol.BUFFERS] if protocol.BUFFERS in content else None
    if not expected:
        if record is not None:
            raise PayloadError(
                f"reply carries a {protocol.BUFFERS!r} record, but none is expected (buffers = 'local', a skip, "
                "or a model without buffers)"
            )
        return None
    if not isinstance(record, ArrayRecord):
        raise PayloadError(
            f"reply has no {protocol.BUFFERS!r} ArrayRecord with the model's buffers (buffers = 'average'); got "
            f"records {quote_names(content.keys())}"
        )
    shapes = buffers.packed_shapes(spec)
    if set(record.keys()) != set(shapes):
        raise PayloadError(
            f"buffers must be the vectors {quote_names(shapes)} of the model's buffers, got "
            f"{quote_names(record.keys())}"
        )
    packed = {
        dtype: torch.from_numpy(_numpy_array(record[dtype], f"buffers {dtype!r}", shape, dtype).copy())
        for dtype, shape in shapes.items()
    }
    tensors = buffers.unpack(spec, packed)
    buffers.check(spec, tensors)
    return tensors


#: numpy's little-endian codes of the dtypes arrays from clients may have.
_NPY_DTYPES = {"float32": "<f4", "int64": "<i8"}


def _float32_array(array: Any, what: str, shape: tuple[int, ...]) -> np.ndarray:
    """The values of a Flower ``Array`` that must be a finite float32 numpy array of ``shape``."""
    values = _numpy_array(array, what, shape, "float32")
    if not np.isfinite(values).all():
        raise PayloadError(f"{what} has non-finite values")
    return values


def _numpy_array(array: Any, what: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The values of a Flower ``Array`` that must be a numpy array of ``shape`` and ``dtype`` (float32, int64).

    The ``.npy`` header inside the bytes is parsed and compared before anything is allocated; the values are
    then a view of the bytes (``np.load`` would allocate whatever shape the header claims).
    """
    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise PayloadError(f"{what} must be a numpy Array, got {_show(getattr(array, 'stype', array))}")
    if array.dtype != dtype or tuple(array.shape) != shape:
        raise PayloadError(
            f"{what} must be {dtype} of shape {shape}, got {_show(array.dtype)} of shape {_show(array.shape)}"
        )
    code = np.dtype(_NPY_DTYPES[dtype])
    buf = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        header_shape, fortran, header_dtype = read_header[version](buf)
    except Exception as err:  # numpy tokenizes and literal_evals the header: any of several error types
        raise PayloadError(f"{what}: malformed .npy data ({type(err).__name__}: {err})") from None
    count = math.prod(shape)
    if header_shape != shape or header_dtype != code or fortran:
        raise PayloadError(
            f"{what}: .npy header says {header_dtype} of shape {header_shape}, expected {code.str} of shape {shape}"
        )
    if len(array.data) - buf.tell() != code.itemsize * count:
        raise PayloadError(
            f"{what}: {len(array.data) - buf.tell()} data bytes, expected {code.itemsize * count}"
        )
    return np.frombuffer(array.data, dtype=code, count=count, offset=buf.tell()).reshape(shape)


def node_claim(content: RecordDict) -> tuple[int, str]:
    """The ``(partition-id, node-name)`` a hello reply claims; raise PayloadError if malformed."""
    info = _record(content, protocol.NODE_INFO, ConfigRecord)
    for field in (protocol.PARTITION_ID, protocol.NODE_NAME):
        if field not in info:
            raise PayloadError(f"hello reply has no {field!r} in {protocol.NODE_INFO!r}")
    pid, name = info[protocol.PARTITION_ID], info[protocol.NODE_NAME]
    if not _is_int(pid) or pid < -1:
        raise PayloadError(
            f"{protocol.PARTITION_ID!r} must be an integer >= 0 (or -1 = none), got {_show(pid)}"
        )
    if not isinstance(name, str):
        raise PayloadError(f"{protocol.NODE_NAME!r} must be a string, got {_show(name)}")
    check_node_name(name, protocol.NODE_NAME)
    return pid, name


def check_node_name(name: str, what: str) -> None:
    """A node name is empty or plain: at most 64 letters, digits, '.', '_', '-', and not all digits."""
    if name and (len(name) > MAX_NODE_NAME or PLAIN_NAME.fullmatch(name) is None or name.isdigit()):
        raise PayloadError(
            f"{what!r} must be empty or a plain name of at most {MAX_NODE_NAME} characters "
            f"(letters, digits, '.', '_', '-', starting with a letter or digit, not all digits), got {_show(name)}"
        )
