"""Traffic accounting: one path for CompAMS and for Flower's own FedAvg / FedAdam.

Every byte counted is the serialised size of a message Flower actually sends (:func:`strategies.wire.wire_bytes`);
theory bits are kept beside them, never instead of them. Both strategies record a round through the same
:class:`RoundTraffic` methods, and :func:`traffic_row` turns a round into the ``metrics.jsonl`` columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from fl_compams import protocol
from fl_compams.nodes import label_sort_key
from strategies.wire import wire_bytes

__all__ = ["RoundTraffic", "traffic_row"]


@dataclass
class RoundTraffic:
    """What one training round cost and who took part, per client label (partition or node)."""

    downlink_bytes: dict[str, int] = field(default_factory=dict)
    uplink_bytes: dict[str, int] = field(default_factory=dict)
    uplink_theory_bits: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    ok: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    #: LAQ: clients whose valid reply was a skip (None for algorithms that cannot skip: no column).
    skipped: list[str] | None = None
    applied: bool = False
    train_loss: float = math.nan
    residual_norm: float = math.nan
    #: Per client: bytes, payload size and the client's reported metrics (or its failure).
    per_client: dict[str, dict] = field(default_factory=dict)
    #: Two-way compression: instructions that carried the dense model (None = one-way, every one does).
    downlink_resyncs: int | None = None
    downlink_theory_bits: float = 0.0

    def state_bytes(self) -> dict[str, dict[str, float]]:
        """Per state slot, the mean and max bytes over the clients whose reply counted (slots some client holds).

        A client that reports no bytes for a slot holds none (it sends only the slots that hold anything).
        """
        rows = [self.per_client[label] for label in self.ok if label in self.per_client]
        out = {}
        for slot in protocol.STATE_BYTES:
            values = [int(row.get(f"state_bytes_{slot}", 0)) for row in rows]
            if any(values):
                out[slot] = {"mean": sum(values) / len(values), "max": max(values)}
        return out

    def record_instructions(self, messages: Iterable[Message], label_of: Callable[[int], str]) -> None:
        """Downlink: the serialised size of every instruction (each distinct content measured once)."""
        sizes: dict[int, int] = {}
        for m in messages:
            self.downlink_bytes[label_of(m.metadata.dst_node_id)] = sizes.setdefault(
                id(m.content), wire_bytes(m.content)
            )

    def record_reply(self, label: str, reply: Message) -> bool:
        """Uplink: the reply's serialised size, or its error as a failure; True if it carries content."""
        if reply.has_error():
            self.failures[label] = f"client error: {reply.error.reason}"
            return False
        self.uplink_bytes[label] = wire_bytes(reply.content)
        return True

    def record_missing(self, round_timeout: float) -> None:
        """Every client sent an instruction that neither replied nor failed timed out."""
        for label in self.downlink_bytes:
            if label not in self.uplink_bytes and label not in self.failures:
                self.failures[label] = f"no reply within round-timeout ({round_timeout:g} s)"

    def lost(self) -> list[str]:
        """Clients that were sent an instruction and whose reply did not count (failed or missing)."""
        return sorted(self.failures, key=label_sort_key)


def traffic_row(traffic: RoundTraffic | None, totals: dict[str, int]) -> dict[str, Any]:
    """The traffic columns of a ``metrics.jsonl`` row; ``totals`` accumulates the cumulative bytes."""
    if traffic is None:  # round 0: the initial model, nothing sent yet
        return {
            "train_loss": None,
            "uplink_bytes": 0,
            "downlink_bytes": 0,
            "uplink_bytes_cum": 0,
            "downlink_bytes_cum": 0,
            "uplink_theory_bits": 0.0,
            "clients_ok": 0,
            "clients_failed": 0,
            "clients_clipped": 0,
            "update_applied": False,
        }
    up, down = sum(traffic.uplink_bytes.values()), sum(traffic.downlink_bytes.values())
    totals["up"] += up
    totals["down"] += down
    ok = max(1, len(traffic.ok))
    two_way = {}
    if traffic.downlink_resyncs is not None:
        sent = max(1, len(traffic.downlink_bytes))
        two_way = {
            "downlink_resyncs": traffic.downlink_resyncs,
            "downlink_bytes_per_client": down / sent,
            "downlink_theory_bytes_per_client": traffic.downlink_theory_bits / 8 / sent,
        }
    return {
        **two_way,
        "train_loss": traffic.train_loss,
        "uplink_bytes": up,
        "downlink_bytes": down,
        "uplink_bytes_cum": totals["up"],
        "downlink_bytes_cum": totals["down"],
        "uplink_theory_bits": traffic.uplink_theory_bits,
        "uplink_bytes_per_client": sum(traffic.uplink_bytes[n] for n in traffic.ok) / ok,
        "uplink_theory_bytes_per_client": traffic.uplink_theory_bits / 8 / ok,
        "clients_ok": len(traffic.ok),
        "clients_failed": len(traffic.failures),
        "clients_clipped": len(traffic.clipped),
        **({"clients_skipped": len(traffic.skipped)} if traffic.skipped is not None else {}),
        "update_applied": traffic.applied,
        "failures": dict(sorted(traffic.failures.items())),
        "residual_norm": traffic.residual_norm,
        "state_bytes": traffic.state_bytes(),
        "clients": traffic.per_client,
    }


def sorted_by_label(per_client: Mapping[str, dict]) -> dict[str, dict]:
    """Per-client entries in natural label order."""
    return dict(sorted(per_client.items(), key=lambda kv: label_sort_key(kv[0])))
