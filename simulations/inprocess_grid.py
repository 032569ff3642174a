"""A Flower ``Grid`` that runs the ClientApp in the server's own process: the sweep engine without Ray.

:class:`InProcessGrid` stands where Flower's simulation puts its ``InMemoryGrid`` + SuperLink state + Ray actor
pool (``flwr.simulation.run_simulation``, ``flwr.server.superlink.fleet.vce``), and does what they do to a message,
in the same order, without threads, polling or actor processes:

- ``num_nodes`` virtual nodes with random-like 64-bit node ids (Flower draws them with ``secrets``; here a
  ``random.Random`` seeded per run, so a run's ids repeat), each with one :class:`flwr.app.Context` for the whole
  run: node config ``partition-id`` / ``num-partitions`` (plus what the runner adds through
  :class:`simulations.virtual_nodes.WithContext`), an empty run config and its own ``state`` RecordDict;
- ``push_messages`` gives each instruction a message id (a UUID4 string, seeded) and checks it with Flower's own
  :func:`flwr.server.utils.validate_message` (an invalid one, or one to an unknown node, is logged and dropped);
- each instruction is handed to the ClientApp as a copy made through Flower's wire format (every object of its
  tree deflated, then inflated: :mod:`flwr.supercore.inflatable`), so the client cannot touch the server's
  objects and every byte the strategies count (:func:`strategies.wire.wire_bytes`) is the byte that crossed;
  the reply crosses back the same way;
- the ClientApp runs on a copy of the node's context, stored back only when it returns (Ray's actor returns the
  updated context with the reply; a raising app leaves the stored context as it was), and Flower's check that
  the run config was not changed is kept;
- an exception in the ClientApp becomes the error reply Flower's simulation sends
  (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, reason ``"<class '...ClientAppException'>:<'...'>"``), which the
  strategies count as a failure; a reply that does not answer its instruction (Flower's ``validate_message`` and
  the source/destination check of its link state) is dropped, as the SuperLink drops it.

Clients run one after another, with ``client_threads`` torch threads (Ray's actors run with ``OMP_NUM_THREADS``
= their ``num_cpus``, so 1 by default): the same thread count gives the same floating-point sums.
``send_and_receive`` has no timeout to wait for: every reply is there when it returns.
"""

from __future__ import annotations

import copy
import logging
import random
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import (
    NODE_ID_NUM_BYTES,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    RUN_ID_NUM_BYTES,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.server.utils import validate_message
from flwr.serverapp import Grid
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "transport_copy"]

log = logging.getLogger("flwr").getChild(__name__)


def transport_copy(message: Message) -> Message:
    """``message`` as the receiver of Flower's transport sees it: every object deflated, then inflated.

    Deflating drops the message id (Flower's transport carries it beside the object tree); it is put back.
    """
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    copied = inflate_object_from_contents(message.object_id, contents)
    if not isinstance(copied, Message):  # the root of a message's tree is the message
        raise TypeError(f"a message's object tree inflated to a {type(copied).__name__}")
    copied.metadata.__dict__["_message_id"] = message.metadata.message_id
    return copied


class InProcessGrid(Grid):
    """A Grid whose ``num_nodes`` virtual nodes run ``client_app`` in this process (see the module docstring)."""

    def __init__(
        self, client_app: ClientApp, num_nodes: int, *, seed: int = 0, client_threads: int = 1
    ) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
        if isinstance(client_threads, bool) or not isinstance(client_threads, int) or client_threads < 1:
            raise ValueError(f"client_threads must be an integer >= 1, got {client_threads!r}")
        self.client_app = client_app
        self.client_threads = client_threads
        self._rng = random.Random(f"fl-compams in-process grid {seed}")  # ids only: never the experiment's
        self._run = Run.create_empty(run_id=self._rand_int(RUN_ID_NUM_BYTES, exclude=set()))
        self._run.primary_task_id = 1
        self.contexts: dict[int, Context] = {}
        for partition_id in range(num_nodes):  # Flower registers nodes in partition order
            node_id = self._rand_int(NODE_ID_NUM_BYTES, exclude={0, SUPERLINK_NODE_ID, *self.contexts})
            self.contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config={PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: num_nodes},
                state=RecordDict(),
                run_config={},
            )
        self._replies: dict[str, Message] = {}  # instruction id -> reply, until pulled

    def _rand_int(self, num_bytes: int, exclude: set[int]) -> int:
        """A random unsigned integer of ``num_bytes`` bytes, as Flower's ``generate_rand_int_from_bytes``."""
        while (value := self._rng.getrandbits(8 * num_bytes)) in exclude:
            pass
        return value

    def _message_id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    # ------------------------------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        """Operate in ``run`` (its id becomes the id of the messages and contexts that follow)."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        for context in self.contexts.values():
            context.run_id = run.run_id

    @property
    def run(self) -> Run:
        """The run this grid operates in (a copy, as Flower's grids return)."""
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A new message to ``dst_node_id`` (Flower's deprecated helper; ``Message(...)`` is the same)."""
        with self.identity():
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The virtual nodes' ids."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp; return the ids of the messages accepted."""
        ids = []
        for message in messages:
            meta = message.metadata
            meta.__dict__["_message_id"] = self._message_id()  # as InMemoryGrid does, on the original
            if meta.reply_to_message_id != "" or meta.ttl <= 0 or meta.delivered_at != "":
                raise ValueError(f"Invalid message: {message}")  # InMemoryGrid._check_message
            if errors := validate_message(message, is_reply_message=False):  # the link state's checks
                log.error("%s", errors)
                continue
            if meta.dst_node_id not in self.contexts:
                log.error("Invalid destination node ID for Message: %s", message.metadata.dst_node_id)
                continue
            ids.append(message.metadata.message_id)
            reply = self._deliver(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` not pulled yet, each returned once."""
        replies = [self._replies.pop(i) for i in message_ids if i in self._replies]
        delivered_at = now().isoformat()
        for reply in replies:
            reply.metadata.delivered_at = delivered_at
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push the messages and pull every reply (the clients have answered when ``push_messages`` returns)."""
        return self.pull_messages(self.push_messages(messages))

    # ------------------------------------------------------------------------------------------ the node side
    def _deliver(self, message: Message) -> Message | None:
        """Run the ClientApp of the message's node on a transport copy; the reply as the server receives it."""
        node_id = message.metadata.dst_node_id
        received = transport_copy(message)
        received.metadata.delivered_at = now().isoformat()
        stored = self.contexts[node_id]
        context = copy.deepcopy(stored)  # Ray hands the actor a copy; only a returned one is kept
        try:
            try:
                with self._client_threads():
                    reply = self.client_app(message=received, context=context)
            except Exception as ex:  # the actor wraps whatever the app raised (ray_actor.run)
                raise ClientAppException(str(ex)) from ex
            if context.run_config != stored.run_config:  # DeprecatedRunInfoStore.update_context
                raise ValueError(
                    "The `run_config` field of the `Context` object cannot be modified "
                    f"(run_id: {stored.run_id})."
                )
            self.contexts[node_id] = context
        except Exception as ex:  # vce_api.worker: every exception becomes an error reply
            log.error("%s", ex)
            code = (
                ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                if isinstance(ex, ClientAppException)
                else ErrorCode.UNKNOWN
            )
            reply = Message(
                Error(code=code, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=received
            )
        return self._accept_reply(reply, message)

    def _accept_reply(self, reply: Any, instruction: Message) -> Message | None:
        """The reply as stored by the link state and pulled by the server, or None if the link state drops it."""
        if not isinstance(reply, Message):
            log.error("the ClientApp returned %s, not a Message; no reply", type(reply).__name__)
            return None
        reply.metadata.__dict__["_message_id"] = self._message_id()
        errors = validate_message(reply, is_reply_message=True)
        meta = reply.metadata
        if not errors and (
            meta.reply_to_message_id != instruction.metadata.message_id
            or meta.src_node_id != instruction.metadata.dst_node_id
            or meta.run_id != instruction.metadata.run_id
        ):
            errors = ["it does not answer the instruction it was handed (reply_to, source node or run)"]
        if errors:
            log.error("dropped the reply of node %d: %s", instruction.metadata.dst_node_id, "; ".join(errors))
            return None
        return transport_copy(reply)

    @contextmanager
    def _client_threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.client_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    @contextmanager
    def identity(self) -> Iterator[None]:
        """Messages created inside are the SuperLink's, of this run (Flower's simulation sets the same identity)."""
        saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
            1,
            self._run.run_id,
            SUPERLINK_NODE_ID,
        )
        try:
            yield
        finally:
            TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
