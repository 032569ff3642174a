"""A ClientApp whose first partitions misbehave, for the reliability tests (imported by Ray workers too)."""

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import client_app as real
from fl_compams import protocol

app = ClientApp()
SLOW_SECONDS = 12.0


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    if pid == 0:
        raise RuntimeError("simulated client crash")
    if pid == 1:
        garbage = RecordDict(
            {
                protocol.PAYLOAD: ConfigRecord({protocol.PAYLOAD_BYTES: b"\x00garbage" * 10}),
                protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 5, protocol.TRAIN_LOSS: 1.0}),
            }
        )
        return Message(garbage, reply_to=msg)
    if pid == 2 and int(msg.content[protocol.CONFIG]["server-round"]) == 1:
        time.sleep(SLOW_SECONDS)  # beyond the round timeout
    return real.train(msg, context)


app.query(protocol.HELLO_ROUTE)(real.hello)
app.query(protocol.PROBE_ROUTE)(real.probe)
