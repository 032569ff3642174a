"""strategies.traffic: the state-size columns of a round (design.md section 7, "State size")."""

from fl_compams import protocol
from strategies import validate
from strategies.traffic import RoundTraffic, traffic_row


def test_state_bytes_mean_and_max_over_counted_clients():
    traffic = RoundTraffic()
    traffic.ok = ["node-0", "node-1"]
    traffic.uplink_bytes = {"node-0": 100, "node-1": 100, "node-2": 100}
    traffic.per_client = {
        "node-0": {"state_bytes_residual": 400, "state_bytes_pending": 30},
        "node-1": {"state_bytes_residual": 400, "state_bytes_pending": 50, "state_bytes_lazy": 8},
        "node-2": {"state_bytes_residual": 10**9, "failure": "dropped"},  # not counted: its reply failed
    }
    row = traffic_row(traffic, {"up": 0, "down": 0})
    assert row["state_bytes"] == {
        "residual": {"mean": 400, "max": 400},
        "pending": {"mean": 40, "max": 50},
        "lazy": {"mean": 4, "max": 8},  # node-0 holds no LAQ state
    }


def test_every_state_slot_metric_is_validated_as_a_count():
    for name in protocol.STATE_BYTES.values():
        assert validate.TRAIN_METRICS[name] == ("an integer >= 0", False)
