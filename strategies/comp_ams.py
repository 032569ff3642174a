"""CompAMS: Flower's FedAvg with aggregation replaced by COMP-AMS's server (Li, Karimi & Li, Algorithm 2).

Sampling, ``fraction-train``, minimum node counts, evaluation and the round loop (``start``) are Flower's own.
``aggregate_train`` never averages arrays the FedAvg way: it validates each reply, decodes its payload with the
core codec, averages the decoded updates (uniform or by example count) and takes one server-optimizer step
(AMSGrad by default) through :func:`fl_compams.server.apply_round`. A reply that fails validation, or an error
reply, is dropped, logged with its node id and reason, counted, and never touches the model.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_compams import protocol
from fl_compams.aggregate import aggregation_weights
from fl_compams.codec import from_bytes
from fl_compams.compressors import Compressor
from fl_compams.config import ExperimentConfig
from fl_compams.errors import PayloadError
from fl_compams.flat import ParamSpec, unflatten
from fl_compams.nodes import label_sort_key
from fl_compams.payloads import Payload
from fl_compams.server import ServerState, apply_round
from fl_compams.server_opt import ServerOptimizer
from strategies.wire import wire_bytes

log = logging.getLogger(__name__)


@dataclass
class RoundTraffic:
    """What one training round cost and who took part, per client label (partition or node)."""

    downlink_bytes: dict[str, int] = field(default_factory=dict)
    uplink_bytes: dict[str, int] = field(default_factory=dict)
    uplink_theory_bits: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    ok: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    applied: bool = False
    train_loss: float = math.nan
    residual_norm: float = math.nan
    #: Per client: bytes, payload size and the client's reported metrics (or its failure).
    per_client: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidReply:
    """A training reply that passed validation, with its decoded payload."""

    label: str
    payload: Payload
    payload_bytes: int
    num_examples: int
    metrics: dict


class CompAMS(FedAvg):
    """COMP-AMS server strategy.

    Parameters
    ----------
    config
        The resolved experiment configuration (server optimizer, weighting, robustness, client settings).
    spec
        The model's ParamSpec; payloads must have dimension ``spec.dim``.
    compressor
        The clients' compressor (to check payload kinds and report theory bits).
    optimizer
        The server optimizer; ``state`` its current :class:`~fl_compams.server.ServerState`.
    node_labels
        Stable names of the nodes (``"partition-3"``), used to order replies before summing (so results do not
        depend on arrival order or on Flower's random node ids) and to key per-client results.
    round_offset
        Rounds already done before this ``start()`` (when resuming from a checkpoint).
    fedavg_kwargs
        Passed to Flower's ``FedAvg`` (``min_available_nodes`` etc.).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        spec: ParamSpec,
        compressor: Compressor,
        optimizer: ServerOptimizer,
        state: ServerState,
        *,
        node_labels: Mapping[int, str] | None = None,
        round_offset: int = 0,
        **fedavg_kwargs,
    ) -> None:
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        fedavg_kwargs.setdefault("min_train_nodes", config.server.min_train_nodes)
        fedavg_kwargs.setdefault("min_available_nodes", config.server.min_train_nodes)
        super().__init__(fraction_train=config.server.fraction_train, **fedavg_kwargs)
        self.config = config
        self.spec = spec
        self.compressor = compressor
        self.optimizer = optimizer
        self.state = state
        self.node_labels = dict(node_labels or {})
        self.round_offset = round_offset
        self.traffic: dict[int, RoundTraffic] = {}
        self._sent: dict[int, list[Message]] = {}

    def label(self, node_id: int) -> str:
        """Stable name of a node: its partition if known, else its node id."""
        return self.node_labels.get(node_id, f"node-{node_id}")

    # ------------------------------------------------------------------------------------------ train
    def client_config(self) -> ConfigRecord:
        """The run-config keys clients need (compressor, local training, data), sent with every instruction."""
        flat = self.config.to_flat()
        return ConfigRecord({k: flat[k] for k in protocol.CLIENT_KEYS})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling and messages, with the client settings added and the downlink bytes measured."""
        rnd = server_round + self.round_offset
        for key, value in self.client_config().items():
            config[key] = value
        # Flower samples with the `random` module: seeding it per round makes the sample a function of
        # (seed, round) only, so runs repeat and a resumed run samples what the uninterrupted one would.
        random.seed(protocol.derive_seed(self.config.seed, rnd))
        messages = list(super().configure_train(rnd, arrays, config, grid))
        self._sent[rnd] = messages  # the Grid sets each one's message_id in place when it sends them
        traffic = RoundTraffic()
        if messages:
            size = wire_bytes(messages[0].content)  # FedAvg shares one RecordDict across all messages
            traffic.downlink_bytes = {self.label(m.metadata.dst_node_id): size for m in messages}
        self.traffic[rnd] = traffic
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, decode, bound, average and step; dropped replies never reach the model."""
        rnd = server_round + self.round_offset
        traffic = self.traffic.setdefault(rnd, RoundTraffic())
        valid: list[ValidReply] = []
        # For a node that left (a stopped or restarted SuperNode) the SuperLink itself answers, with an error
        # reply from node 1: find the node the instruction went to through reply_to_message_id.
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.pop(rnd, [])}
        for msg in replies:
            label = self.label(dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
            if msg.has_error():
                traffic.failures[label] = f"client error: {msg.error.reason}"
                continue
            traffic.uplink_bytes[label] = wire_bytes(msg.content)
            try:
                valid.append(self.parse_reply(msg))
            except PayloadError as err:
                traffic.failures[label] = str(err)
        for label in traffic.downlink_bytes:
            if label not in traffic.uplink_bytes and label not in traffic.failures:
                traffic.failures[label] = (
                    f"no reply within round-timeout ({self.config.server.round_timeout:g} s)"
                )
        valid.sort(key=lambda r: label_sort_key(r.label))  # summation order independent of arrival order
        valid, factors = self._bound_norms(valid, traffic)
        for label, reason in sorted(traffic.failures.items()):
            log.warning("round %d: dropped the reply of %s: %s", rnd, label, reason)
            traffic.per_client[label] = {
                "uplink_bytes": traffic.uplink_bytes.get(label, 0),
                "failure": reason,
            }
        for r in valid:
            traffic.per_client[r.label] = {
                "uplink_bytes": traffic.uplink_bytes[r.label],
                "payload_bytes": r.payload_bytes,
                "downlink_bytes": traffic.downlink_bytes.get(r.label, 0),
                **{key.replace("-", "_"): value for key, value in r.metrics.items()},
            }
        traffic.per_client = dict(sorted(traffic.per_client.items(), key=lambda kv: label_sort_key(kv[0])))
        traffic.ok = [r.label for r in valid]
        minimum = self.config.server.min_valid_replies
        if len(valid) < minimum:
            log.warning(
                "round %d: %d valid replies, fewer than min-valid-replies = %d; the model and the optimizer "
                "state are unchanged this round",
                rnd,
                len(valid),
                minimum,
            )
            self.state = self.state._replace(round=rnd)
            return None, self._metrics(traffic)
        weights = aggregation_weights(self.config.server.weighting, [r.num_examples for r in valid])
        weights = [w * f for w, f in zip(weights, factors, strict=True)]  # clipping scales an update
        self.state, _ = apply_round(self.state, [r.payload for r in valid], weights, self.optimizer)
        self.state = self.state._replace(round=rnd)
        traffic.applied = True
        traffic.uplink_theory_bits = self.compressor.theory_bits(self.spec.dim) * len(valid)
        mean_w = aggregation_weights(self.config.server.weighting, [r.num_examples for r in valid])
        traffic.train_loss = sum(
            w * r.metrics[protocol.TRAIN_LOSS] for w, r in zip(mean_w, valid, strict=True)
        )
        norms = [r.metrics.get(protocol.RESIDUAL_NORM, 0.0) for r in valid]
        traffic.residual_norm = sum(norms) / len(norms)
        return self.current_arrays(), self._metrics(traffic)

    def _bound_norms(
        self, valid: list[ValidReply], traffic: RoundTraffic
    ) -> tuple[list[ValidReply], list[float]]:
        """Apply ``max-update-norm``: clip (scale factor < 1) or reject updates whose decoded norm exceeds it."""
        limit = self.config.server.max_update_norm
        if not limit:
            return valid, [1.0] * len(valid)
        kept, factors = [], []
        for r in valid:
            norm = r.payload.norm()
            if norm <= limit:
                kept.append(r)
                factors.append(1.0)
            elif self.config.server.update_norm_action == "reject":
                traffic.failures[r.label] = f"update norm {norm:.6g} exceeds max-update-norm {limit:.6g}"
            else:
                kept.append(r)
                factors.append(limit / norm)
                traffic.clipped.append(r.label)
        return kept, factors

    def parse_reply(self, msg: Message) -> ValidReply:
        """Check a training reply's records and decode its payload; raise PayloadError on anything wrong."""
        content = msg.content
        record = content.get(protocol.PAYLOAD) if protocol.PAYLOAD in content else None
        if not isinstance(record, ConfigRecord) or protocol.PAYLOAD_BYTES not in record:
            raise PayloadError(
                f"reply has no {protocol.PAYLOAD!r} ConfigRecord with {protocol.PAYLOAD_BYTES!r}; "
                f"got records {sorted(content.keys())}"
            )
        data = record[protocol.PAYLOAD_BYTES]
        if not isinstance(data, bytes):
            raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
        metrics = content.get(protocol.METRICS) if protocol.METRICS in content else None
        if not isinstance(metrics, MetricRecord):
            raise PayloadError(f"reply has no {protocol.METRICS!r} MetricRecord")
        n = metrics.get(protocol.NUM_EXAMPLES)
        if not isinstance(n, int) or n < 0:
            raise PayloadError(f"{protocol.NUM_EXAMPLES!r} must be an integer >= 0, got {n!r}")
        if self.config.server.weighting == "num-examples" and n == 0:
            raise PayloadError("num-examples is 0, but replies are weighted by num-examples")
        loss = metrics.get(protocol.TRAIN_LOSS, math.nan)
        if not isinstance(loss, int | float) or not math.isfinite(loss):
            raise PayloadError(f"{protocol.TRAIN_LOSS!r} must be a finite number, got {loss!r}")
        payload = from_bytes(
            data, self.spec.dim, expected_kind=self.compressor.kind, device=self.state.theta.device
        )
        return ValidReply(self.label(msg.metadata.src_node_id), payload, len(data), n, dict(metrics))

    # ------------------------------------------------------------------------------------------ helpers
    def current_arrays(self) -> ArrayRecord:
        """The global model as named dense tensors (what Flower broadcasts next round)."""
        tensors = unflatten(self.state.theta.detach().cpu(), self.spec)
        return ArrayRecord({k: v.contiguous() for k, v in tensors.items()})

    def _metrics(self, traffic: RoundTraffic) -> MetricRecord:
        return MetricRecord(
            {
                "clients-ok": len(traffic.ok),
                "clients-failed": len(traffic.failures),
                "clients-clipped": len(traffic.clipped),
                "update-applied": int(traffic.applied),
                "uplink-bytes": int(sum(traffic.uplink_bytes.values())),
                "downlink-bytes": int(sum(traffic.downlink_bytes.values())),
                "train-loss": float(traffic.train_loss),
            }
        )
