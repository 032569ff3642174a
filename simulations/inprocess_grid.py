"""A Flower ``Grid`` that runs the ClientApp without Ray or a SuperLink: the sweep engine.

:class:`InProcessGrid` stands where Flower's simulation puts its ``InMemoryGrid`` + SuperLink state + Ray actor
pool (``flwr.simulation.run_simulation``, ``flwr.server.superlink.fleet.vce``), and does what they do to a message,
in the same order, without polling:

- ``num_nodes`` virtual nodes with random-like 64-bit node ids (Flower draws them with ``secrets``; here a
  ``random.Random`` seeded per run, so a run's ids repeat), each with one :class:`flwr.app.Context` for the whole
  run: node config ``partition-id`` / ``num-partitions`` (plus what the runner adds through
  :class:`simulations.virtual_nodes.WithContext`), an empty run config and its own ``state`` RecordDict;
- ``push_messages`` gives each instruction a message id (a UUID4 string, seeded) and checks it with Flower's own
  :func:`flwr.server.utils.validate_message` (an invalid one, or one to an unknown node, is logged and dropped);
- each instruction reaches the ClientApp through Flower's wire format (every object of its tree deflated, then
  inflated: :mod:`flwr.supercore.inflatable`), so the client cannot touch the server's objects and every byte the
  strategies count (:func:`strategies.wire.wire_bytes`) is the byte that crossed; the reply crosses back the
  same way;
- the ClientApp runs on a copy of the node's context, stored back only when it returns (Ray's actor returns the
  updated context with the reply; a raising app leaves the stored context as it was), and Flower's check that
  the run config was not changed is kept;
- an exception in the ClientApp becomes the error reply Flower's simulation sends
  (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, reason ``"<class '...ClientAppException'>:<'...'>"``), which the
  strategies count as a failure; a reply that does not answer its instruction (Flower's ``validate_message`` and
  the source/destination check of its link state) is dropped, as the SuperLink drops it.

``workers = 0``: the nodes live in this process and clients run one after another. ``workers = k``: k worker
processes (fresh interpreters started once; node ``i`` lives in worker ``i mod k``, its context with it) run
the clients in parallel, as Ray's actor pool does; messages cross the pipes as the same deflated objects (the
parent never unpickles what a worker sends). Either way each client runs with ``client_threads`` torch threads
(Ray's actors run with ``OMP_NUM_THREADS`` = their ``num_cpus``, so 1 by default): the same thread count gives
the same floating-point sums. ``send_and_receive`` has no timeout to wait for: every reply is there when it returns.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
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


def encode(message: Message) -> bytes:
    """``message`` as one frame of deflated objects.

    A length-prefixed JSON head (message id, root object id, each object's id and length), then the objects'
    bytes. Deflating drops the message id (Flower's transport carries it beside the object tree), hence the head.
    """
    objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    head = json.dumps(
        {
            "message_id": message.metadata.message_id,
            "root": message.object_id,
            "objects": [[object_id, len(data)] for object_id, data in objects.items()],
        }
    ).encode()
    return b"".join([struct.pack("<I", len(head)), head, *objects.values()])


def decode(frame: bytes) -> Message:
    """The message of an :func:`encode` frame, inflated by Flower.

    Flower checks that each object's children are those its head names; frames come from this module only.
    """
    try:
        (size,) = struct.unpack_from("<I", frame)
        head = json.loads(frame[4 : 4 + size])
        contents, offset = {}, 4 + size
        for object_id, length in head["objects"]:
            contents[str(object_id)] = frame[offset : offset + int(length)]
            offset += int(length)
        if offset != len(frame):
            raise ValueError(f"{len(frame) - offset} bytes beyond the objects the head lists")
        message = inflate_object_from_contents(str(head["root"]), contents)
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"malformed message frame: {err}") from err
    if not isinstance(message, Message):
        raise ValueError(f"malformed message frame: its root is a {type(message).__name__}")
    message.metadata.__dict__["_message_id"] = str(head["message_id"])
    return message


def transport_copy(message: Message) -> Message:
    """``message`` as the receiver of Flower's transport sees it: every object deflated, then inflated."""
    return decode(encode(message))


class NodeSide:
    """The virtual nodes' side: their contexts and the ClientApp they run, in this process or in a worker."""

    def __init__(self, client_app: ClientApp, contexts: dict[int, Context], client_threads: int) -> None:
        self.client_app = client_app
        self.contexts = contexts
        self.client_threads = client_threads

    def handle(self, received: Message) -> Any:
        """Run the node's ClientApp on ``received``: its reply (or what it returned), or Flower's error reply."""
        received.metadata.delivered_at = now().isoformat()
        node_id = received.metadata.dst_node_id
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
        return reply

    @contextmanager
    def _client_threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.client_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


_NO_REPLY = b""  # a worker's answer when the ClientApp returned no Message


def _write_frame(stream, data: bytes) -> None:
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_frame(stream) -> bytes:
    """One length-prefixed frame; EOFError when the stream ends (the other side is gone) before it is whole."""
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the stream ended")
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the stream ended inside a frame")
    return data


def worker_main() -> None:
    """A worker process (``python -c``, started by :class:`InProcessGrid`): frames on stdin, replies on stdout.

    The first frame is the parent's own pickle of (ClientApp, the contexts of the nodes this worker holds, torch
    threads), as Ray ships an actor its app; then every frame is a message to one of those nodes, answered with
    its reply (or an empty frame: no reply). The worker ends when stdin closes. Anything the app prints goes to
    stderr: stdout carries frames only.
    """
    import cloudpickle  # Ray's dependency; pickles the app the way Ray ships it to actors

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    logging.getLogger("flwr").setLevel(int(sys.argv[1]))
    client_app, contexts, threads = cloudpickle.loads(_read_frame(inp))
    torch.set_num_threads(threads)
    nodes = NodeSide(client_app, contexts, threads)
    while True:
        try:
            frame = _read_frame(inp)
        except EOFError:
            return
        reply = nodes.handle(decode(frame))
        if not isinstance(reply, Message):
            log.error("the ClientApp returned %s, not a Message; no reply", type(reply).__name__)
        _write_frame(out, encode(reply) if isinstance(reply, Message) else _NO_REPLY)


class InProcessGrid(Grid):
    """A Grid whose ``num_nodes`` virtual nodes run ``client_app`` here or in ``workers`` processes (module doc).

    With workers, :meth:`close` (or ``with``) stops them; a worker also ends when this process does (its input
    closes).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        seed: int = 0,
        client_threads: int = 1,
        workers: int = 0,
    ) -> None:
        for name, value, least in (("num_nodes", num_nodes, 1), ("client_threads", client_threads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(
                f"workers must be an integer >= 0 (0 = clients in this process), got {workers!r}"
            )
        self._rng = random.Random(f"fl-compams in-process grid {seed}")  # ids only: never the experiment's
        self._run = Run.create_empty(run_id=self._rand_int(RUN_ID_NUM_BYTES, exclude=set()))
        self._run.primary_task_id = 1
        contexts: dict[int, Context] = {}
        for partition_id in range(num_nodes):  # Flower registers nodes in partition order
            node_id = self._rand_int(NODE_ID_NUM_BYTES, exclude={0, SUPERLINK_NODE_ID, *contexts})
            contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config={PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: num_nodes},
                state=RecordDict(),
                run_config={},
            )
        self._node_ids = list(contexts)
        self._replies: dict[str, Message] = {}  # instruction id -> reply, until pulled
        self.nodes: NodeSide | None = None  # workers = 0: the nodes, here
        self._owner: dict[int, int] = {}  # workers > 0: node id -> worker index
        self._workers: list[subprocess.Popen] = []
        if workers == 0:
            self.nodes = NodeSide(client_app, contexts, client_threads)
        else:
            self._start_workers(client_app, contexts, client_threads, workers)

    def _start_workers(self, client_app, contexts: dict[int, Context], threads: int, workers: int) -> None:
        """Start ``workers`` fresh interpreters (not ``multiprocessing``: no re-import of the caller's script)."""
        import cloudpickle

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the modules we see
        level = str(logging.getLogger("flwr").getEffectiveLevel())
        code = "from simulations.inprocess_grid import worker_main; worker_main()"
        for w in range(workers):
            held = {n: c for i, (n, c) in enumerate(contexts.items()) if i % workers == w}
            self._owner.update(dict.fromkeys(held, w))
            process = subprocess.Popen(
                [sys.executable, "-c", code, level], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
            )
            self._workers.append(process)
            _write_frame(process.stdin, cloudpickle.dumps((client_app, held, threads)))

    def close(self) -> None:
        """Stop the worker processes (nothing to do without workers)."""
        for process in self._workers:
            try:
                process.stdin.close()  # the worker ends at the end of its input
            except OSError:  # already gone
                pass
        for process in self._workers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()
        self._workers = []

    def __enter__(self) -> InProcessGrid:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rand_int(self, num_bytes: int, exclude: set[int]) -> int:
        """A random unsigned integer of ``num_bytes`` bytes, as Flower's ``generate_rand_int_from_bytes``."""
        while (value := self._rng.getrandbits(8 * num_bytes)) in exclude:
            pass
        return value

    def _message_id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    # ------------------------------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        """Operate in ``run`` (the id of the messages created after this; contexts keep the first run's id)."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

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
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp; return the ids of the messages accepted."""
        accepted = []
        for message in messages:
            meta = message.metadata
            meta.__dict__["_message_id"] = self._message_id()  # as InMemoryGrid does, on the original
            if meta.reply_to_message_id != "" or meta.ttl <= 0 or meta.delivered_at != "":
                raise ValueError(f"Invalid message: {message}")  # InMemoryGrid._check_message
            if errors := validate_message(message, is_reply_message=False):  # the link state's checks
                log.error("%s", errors)
                continue
            if meta.dst_node_id not in self._node_ids:
                log.error("Invalid destination node ID for Message: %s", meta.dst_node_id)
                continue
            accepted.append(message)
        if self.nodes is not None:
            for message in accepted:
                reply = self.nodes.handle(transport_copy(message))
                if not isinstance(reply, Message):
                    log.error("the ClientApp returned %s, not a Message; no reply", type(reply).__name__)
                    continue
                self._accept_reply(transport_copy(reply), message)
        else:
            self._run_on_workers(accepted)
        return [m.metadata.message_id for m in accepted]

    def _run_on_workers(self, messages: list[Message]) -> None:
        """Each worker handles its nodes' messages one at a time, all workers at once.

        A worker is sent its next message only once it has answered the last, so neither side ever blocks on a
        full pipe while the other does.
        """
        queues: dict[int, list[Message]] = {}
        for message in messages:
            queues.setdefault(self._owner[message.metadata.dst_node_id], []).append(message)
        busy: dict[int, tuple[int, Message]] = {}  # stdout fd of a busy worker -> (worker, its message)

        def send_next(w: int) -> None:
            if queues.get(w):
                message = queues[w].pop(0)
                process = self._workers[w]
                try:
                    _write_frame(process.stdin, encode(message))
                except OSError as err:
                    raise RuntimeError(f"in-process engine: worker process {w} ended unexpectedly") from err
                busy[process.stdout.fileno()] = (w, message)

        for w in list(queues):
            send_next(w)
        while busy:
            for fd in wait(list(busy)):
                w, message = busy.pop(fd)
                try:
                    frame = _read_frame(self._workers[w].stdout)
                except EOFError as err:
                    raise RuntimeError(f"in-process engine: worker process {w} ended unexpectedly") from err
                if frame != _NO_REPLY:
                    self._accept_reply(decode(frame), message)
                send_next(w)

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

    def _accept_reply(self, reply: Message, instruction: Message) -> None:
        """Store the reply as the link state does, to be pulled; or drop it, logged, as the link state drops it."""
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
            return
        self._replies[instruction.metadata.message_id] = reply

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
