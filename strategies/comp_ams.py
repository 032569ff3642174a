"""CompAMS: a Flower strategy that moves records in and out of the algorithm layer (design.md section 7).

Sampling, ``fraction-train``, minimum node counts and the round loop (``start``) are Flower's own (FedAvg's).
Each sampled node gets the shared dense model and settings plus the statuses of its unacknowledged replies
(:func:`fl_compams.algorithm.instruction_for`). ``aggregate_train`` validates each reply and decodes its payload
(:mod:`strategies.validate`: records, metrics, kind, dimension, block layout) and hands the valid ones to
:func:`fl_compams.algorithm.server_step` (bound, average, one optimizer step, a status for every reply). A reply
that fails validation, or an error reply, is dropped, logged with its node label and reason, counted, and never
touches the model; its client folds it back. Per-client rows hold the server's measurements and the known
client metrics; a client metric never overwrites a server field.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_compams import buffers, laq, protocol
from fl_compams.aggregate import aggregation_weights
from fl_compams.algorithm import Algorithm, Outcome, ServerReply, instruction_for, server_step
from fl_compams.config import ExperimentConfig, default_config
from fl_compams.downlink import forget
from fl_compams.errors import PayloadError
from fl_compams.flat import ParamSpec, unflatten
from fl_compams.nodes import label_sort_key
from fl_compams.server import ServerState
from strategies import validate
from strategies.naming import NodeNames
from strategies.traffic import RoundTraffic, sorted_by_label

log = logging.getLogger("flwr").getChild(__name__)  # shown in the `flwr run` stream beside Flower's own lines


@dataclass(frozen=True)
class ValidReply:
    """A training reply that passed validation: what the algorithm layer needs, plus the reply's metrics."""

    reply: ServerReply
    payload_bytes: int
    metrics: dict
    claimed_examples: int
    #: The model buffers it carried (``buffers = "average"``), checked; None when it carries none.
    buffers: dict | None = None


class CompAMS(FedAvg):
    """COMP-AMS server strategy.

    Parameters
    ----------
    config
        The resolved experiment configuration (server optimizer, weighting, robustness, client settings).
    spec
        The model's ParamSpec; payloads must have dimension ``spec.dim``.
    algorithm
        The composition of parts (compressor, EF, bound, weighting, server optimizer) the round runs.
    state
        The current :class:`~fl_compams.server.ServerState` (model, optimizer moments, unacknowledged statuses).
    names
        Stable names of the nodes (``"partition-3"``), used to order replies before summing (so results do not
        depend on arrival order or on Flower's random node ids), to key per-client results and statuses; nodes
        that appear during the run (a restarted SuperNode) are named before the round that samples them.
    round_offset
        Rounds already done before this ``start()`` (when resuming from a checkpoint).
    fedavg_kwargs
        Passed to Flower's ``FedAvg`` (``min_available_nodes`` etc.).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        spec: ParamSpec,
        algorithm: Algorithm,
        state: ServerState,
        *,
        names: NodeNames | None = None,
        round_offset: int = 0,
        **fedavg_kwargs,
    ) -> None:
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        fedavg_kwargs.setdefault("min_train_nodes", config.server.min_train_nodes)
        fedavg_kwargs.setdefault("min_available_nodes", config.server.min_train_nodes)
        super().__init__(fraction_train=config.server.fraction_train, **fedavg_kwargs)
        self.config = config
        self.spec = spec
        self.algorithm = algorithm
        self.compressor = algorithm.compressor
        self.state = state
        self.names = names if names is not None else NodeNames()
        self.round_offset = round_offset
        self.traffic: dict[int, RoundTraffic] = {}
        self._sent: dict[int, list[Message]] = {}
        #: Replies carry the model's buffers and the server averages them (fl_compams.buffers).
        self.averages_buffers = spec.buffer_dim > 0 and config.data.buffers == "average"

    def label(self, node_id: int) -> str:
        """Stable name of a node: its partition if known, else its node id."""
        return self.names.label(node_id)

    # ------------------------------------------------------------------------------------------ train
    def client_config(self) -> ConfigRecord:
        """The run-config keys clients need (compressor, local training, data), sent with every instruction."""
        flat, default = self.config.to_flat(), default_config().to_flat()
        optional = set(protocol.OPTIONAL_CLIENT_KEYS)
        return ConfigRecord(
            {k: flat[k] for k in protocol.CLIENT_KEYS if k not in optional or flat[k] != default[k]}
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling; one instruction per node: the shared model and settings plus its statuses."""
        rnd = server_round + self.round_offset
        for key, value in self.client_config().items():
            config[key] = value
        # Flower samples with the `random` module: seeding it per round makes the sample a function of
        # (seed, round) only, so runs repeat and a resumed run samples what the uninterrupted one would.
        self.names.learn(
            grid, grid.get_node_ids(), self.config.server.round_timeout
        )  # new or restarted nodes
        random.seed(protocol.derive_seed(self.config.seed, rnd))
        messages, resyncs, theory_bits = [], 0, 0.0
        for m in super().configure_train(rnd, arrays, config, grid):
            node = m.metadata.dst_node_id
            instruction = instruction_for(self.state, self.label(node), rnd, self.algorithm)
            statuses = instruction.statuses
            content = m.content
            if instruction.downlink is not None:  # two-way: the model only on a resync, else the broadcasts
                content = RecordDict(
                    {k: v for k, v in m.content.items() if k != protocol.ARRAYS or instruction.downlink.dense}
                )
                content[protocol.DOWNLINK] = ConfigRecord(protocol.downlink_to_fields(instruction.downlink))
                resyncs += instruction.downlink.dense
                theory_bits += self._downlink_theory_bits(instruction.downlink)
            if statuses or instruction.lazy:  # the model and settings records are shared objects, not copies
                content = RecordDict({**content})
                if statuses:
                    content[protocol.STATUSES] = ConfigRecord(protocol.statuses_to_fields(statuses))
                if instruction.lazy:
                    content[protocol.LAZY] = ConfigRecord(
                        {
                            protocol.LAZY_THRESHOLD: float(instruction.lazy.threshold),
                            protocol.LAZY_RESET: bool(instruction.lazy.reset),
                        }
                    )
            if content is not m.content:
                m = Message(content=content, message_type=m.metadata.message_type, dst_node_id=node)
            messages.append(m)
        self._sent[rnd] = messages  # the Grid sets each one's message_id in place when it sends them
        traffic = RoundTraffic()
        traffic.record_instructions(messages, self.label)
        if self.state.downlink is not None:
            traffic.downlink_resyncs = resyncs
            traffic.downlink_theory_bits = theory_bits
        self.traffic[rnd] = traffic
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and decode the replies, then one ``server_step``; dropped replies never reach the model."""
        rnd = server_round + self.round_offset
        traffic = self.traffic.setdefault(rnd, RoundTraffic())
        valid: list[ValidReply] = []
        resync: list[str] = []
        # For a node that left (a stopped or restarted SuperNode) the SuperLink itself answers, with an error
        # reply from node 1: find the node the instruction went to through reply_to_message_id.
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.pop(rnd, [])}
        for msg in replies:
            label = self.label(dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
            if not traffic.record_reply(label, msg):
                continue
            if (
                self.state.downlink is not None
                and (reason := validate.resync_request(msg.content)) is not None
            ):
                traffic.failures[label] = f"replica mismatch, dense model next time: {reason}"
                resync.append(label)
                continue
            try:
                valid.append(self.parse_reply(msg, label, rnd))
            except PayloadError as err:
                traffic.failures[label] = str(err)
        traffic.record_missing(self.config.server.round_timeout)
        self.state, step = server_step(
            self.algorithm, self.state, rnd, [v.reply for v in valid], lost=traffic.lost()
        )
        if resync:
            self.state = self.state._replace(downlink=forget(self.state.downlink, resync))
        for label, reason in step.expired.items():
            log.warning("round %d: %s expired from LAQ's aggregate: %s", rnd, label, reason)
        if self.algorithm.lazy is not None:
            traffic.skipped = list(step.skipped)
        for v in valid:
            if v.reply.payload is None:  # a skip: no status
                continue
            status = step.statuses[v.reply.label]
            if status.outcome == Outcome.REJECTED:
                traffic.failures[v.reply.label] = (
                    f"update norm {step.norms[v.reply.label]:.6g} exceeds the reply bound {step.bound:.6g} "
                    f"(update-norm-bound = {self.algorithm.bound.mode!r})"
                )
            elif status.factor < 1.0 and status.outcome == Outcome.APPLIED:
                traffic.clipped.append(v.reply.label)
        ok = sorted(  # label order, so means over replies do not depend on arrival order
            (v for v in valid if v.reply.label not in traffic.failures),
            key=lambda v: label_sort_key(v.reply.label),
        )
        for label, reason in sorted(traffic.failures.items()):
            log.warning("round %d: dropped the reply of %s: %s", rnd, label, reason)
            traffic.per_client[label] = {
                "uplink_bytes": traffic.uplink_bytes.get(label, 0),
                "failure": reason,
            }
        for v in ok:
            label = v.reply.label
            row = {
                "uplink_bytes": traffic.uplink_bytes[label],
                "payload_bytes": v.payload_bytes,
                "downlink_bytes": traffic.downlink_bytes.get(label, 0),
            }
            for key, value in v.metrics.items():  # the server's own fields win over any client metric
                row.setdefault(key.replace("-", "_"), value)
            if v.claimed_examples != v.reply.num_examples:
                row["num_examples_claimed"] = v.claimed_examples
            if v.reply.payload is None:
                row["skipped"] = True
            traffic.per_client[label] = row
        traffic.per_client = sorted_by_label(traffic.per_client)
        traffic.ok = [v.reply.label for v in ok]
        if not step.applied:
            log.warning(
                "round %d: %d valid replies, fewer than min-valid-replies = %d; the model and the optimizer "
                "state are unchanged this round",
                rnd,
                len(ok),
                self.algorithm.min_valid_replies,
            )
            return None, self._metrics(traffic)
        traffic.applied = True
        skips = sum(v.reply.payload is None for v in ok)
        traffic.uplink_theory_bits = self.compressor.theory_bits(self.spec.dim) * (len(ok) - skips)
        traffic.uplink_theory_bits += laq.SKIP_BITS * skips
        if self.averages_buffers:
            self._average_buffers(ok, step, traffic)
        traffic.train_loss = _mean(self.algorithm.weighting, ok, protocol.TRAIN_LOSS)
        traffic.residual_norm = sum(v.metrics.get(protocol.RESIDUAL_NORM, 0.0) for v in ok) / len(ok)
        return self.current_arrays(), self._metrics(traffic)

    def parse_reply(self, msg: Message, label: str, rnd: int) -> ValidReply:
        """Check a training reply (:func:`strategies.validate.training_reply`); raise PayloadError if it is bad."""
        checked = validate.training_reply(
            msg.content,
            rnd,
            dim=self.spec.dim,
            kind=self.compressor.kind,
            block_sizes=self.spec.block_sizes,
            device=self.state.theta.device,
            weighted=self.config.server.weighting == "num-examples",
            max_num_examples=self.config.server.max_num_examples,
            can_skip=self.algorithm.lazy is not None,
        )
        metrics = checked.metrics
        if metrics.dropped:
            log.warning(
                "round %d: %s sent metrics the server does not read; left out: %s",
                rnd,
                label,
                validate.quote_names(metrics.dropped),
            )
        n = int(metrics.values[protocol.NUM_EXAMPLES])
        if n < metrics.claimed:
            log.warning(
                "round %d: %s claims %d examples; capped at max-num-examples = %d",
                rnd,
                label,
                metrics.claimed,
                n,
            )
        replica = validate.replica_echo(msg.content) if self.state.downlink is not None else None
        reply = ServerReply(label, rnd, checked.payload, n, checked.acked, replica)
        tensors = validate.buffers_reply(
            msg.content, self.spec, expected=self.averages_buffers and checked.payload is not None
        )
        return ValidReply(reply, checked.payload_bytes, metrics.values, metrics.claimed, tensors)

    def _average_buffers(self, ok: list[ValidReply], step, traffic: RoundTraffic) -> None:
        """The buffers of the applied replies, averaged with the payloads' weights, become the model's buffers.

        Clipped replies count with their base weight (a convex combination keeps statistics in range); rejected
        ones and skips carry none into the average. Their dense bytes are in the uplink bytes already (the whole
        reply is measured); theory bits add 32 per float value and 64 per counter of every set received.
        """
        applied = [
            v
            for v in ok
            if v.buffers is not None
            and (status := step.statuses.get(v.reply.label)) is not None
            and status.outcome == Outcome.APPLIED
        ]
        traffic.uplink_theory_bits += buffers.theory_bits(self.spec) * sum(v.buffers is not None for v in ok)
        if not applied:
            return
        weights = aggregation_weights(self.algorithm.weighting, [v.reply.num_examples for v in applied])
        averaged = buffers.average(self.spec, [v.buffers for v in applied], weights)
        self.state = self.state._replace(buffers=averaged.to(self.state.theta.device))

    def summary(self) -> None:
        """Log what this strategy does (Flower's start banner; FedAvg's would name its num-examples weighting)."""
        a = self.algorithm
        bound = f"{a.bound.action} above {a.bound.max_norm:g}" if a.bound.max_norm else "off"
        log.info(
            "\t├──> Sampling: fraction-train %.2f, at least %d nodes",
            self.fraction_train,
            self.min_train_nodes,
        )
        log.info(
            "\t├──> Algorithm %r: uplink %s, error feedback %s%s",
            a.name,
            type(a.compressor).__name__,
            "on (acknowledged)" if a.error_feedback else "off",
            ", local Adam (QAdam)" if a.local_opt is not None else "",
        )
        if a.lazy is not None:
            log.info(
                "\t├──> LAQ: skip rule xi %g over D = %d changes, t-bar %d, expiry after %d silent rounds%s",
                a.lazy.xi,
                a.lazy.history,
                a.lazy.max_skip,
                a.lazy.expire_rounds,
                ", SLAQ threshold" if a.lazy.stochastic else "",
            )
        log.info(
            "\t├──> Server: %s, replies averaged %s, bound %s, min-valid-replies %d",
            type(a.server_opt).__name__,
            "uniformly" if a.weighting == "uniform" else "by num-examples",
            bound,
            a.min_valid_replies,
        )
        down = a.downlink
        log.info(
            "\t├──> Downlink: %s",
            "the dense model"
            if down is None
            else f"{type(down.compressor).__name__} with server EF, a log of {down.log_size} broadcasts",
        )
        if self.spec.buffer_dim:
            log.info(
                "\t├──> Buffers: %d values (BatchNorm statistics), %s",
                self.spec.buffer_dim,
                "sent dense and averaged like the updates"
                if self.averages_buffers
                else "kept by each client (FedBN); the server evaluates with the initial ones",
            )
        log.info("\t└──> Evaluation: central, on the server's test set (no federated evaluation round)")

    # ------------------------------------------------------------------------------------------ helpers
    def _downlink_theory_bits(self, instruction) -> float:
        """Theory bits of a two-way instruction: 32 d for a resync, else C_s's formula per broadcast."""
        if instruction.dense:
            return 32.0 * self.spec.dim
        return len(instruction.steps) * self.algorithm.downlink.compressor.theory_bits(self.spec.dim)

    def public_model(self):
        """The flat model clients hold: theta, or with two-way compression the public model (evaluated)."""
        return self.state.theta if self.state.downlink is None else self.state.downlink.public

    def current_arrays(self) -> ArrayRecord:
        """The model clients hold as named dense tensors (what Flower broadcasts next round, what is evaluated)."""
        tensors = self.model_tensors()
        return ArrayRecord({k: v.contiguous() for k, v in tensors.items()})

    def model_tensors(self) -> dict:
        """The model clients hold, trainable tensors and buffers, by name in state-dict order."""
        tensors = unflatten(self.public_model().detach().cpu(), self.spec)
        if self.state.buffers is not None:
            tensors |= unflatten(self.state.buffers.detach().cpu(), self.spec, trainable=False)
        return {name: tensors[name] for name in self.spec.names}

    def _metrics(self, traffic: RoundTraffic) -> MetricRecord:
        return MetricRecord(
            {
                "clients-ok": len(traffic.ok),
                "clients-failed": len(traffic.failures),
                "clients-clipped": len(traffic.clipped),
                **({"clients-skipped": len(traffic.skipped)} if traffic.skipped is not None else {}),
                "update-applied": int(traffic.applied),
                "uplink-bytes": int(sum(traffic.uplink_bytes.values())),
                "downlink-bytes": int(sum(traffic.downlink_bytes.values())),
                "train-loss": float(traffic.train_loss),
            }
        )


def _mean(weighting: str, replies: list[ValidReply], key: str) -> float:
    """The mean of a reported metric, weighted as the updates are."""
    weights = aggregation_weights(weighting, [v.reply.num_examples for v in replies])
    return sum(w * v.metrics[key] for w, v in zip(weights, replies, strict=True))
