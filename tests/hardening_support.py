"""For the hardening tests (tests/test_hardening_*.py): a ROS session per module, the node as a real
process, parameters set through the node's own SetParameters service, and waiting on what it reports.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from lisa_ros.parameters import DEFAULT_NAMES, NODE_NAME


def start_perception_node(ros: dict, parameters: dict, name: str = NODE_NAME, namespace: str = "",
                          env: Optional[dict] = None):
    """The installed node executable with `parameters`; (process, log path)."""
    from lisa_ros.process import node_command, start_node

    folder = ros["tmp"] / f"{namespace.strip('/') or 'root'}_{name}"  # its own parameter files
    folder.mkdir()
    command = node_command([parameters], folder, namespace=namespace, name=name)
    return start_node(command, env or ros["env"], folder / "node.log"), folder / "node.log"


def end_process(process) -> None:
    """Kills the node process if a test left it running (by its pid, through its Popen)."""
    if process.poll() is None:
        process.kill()
        process.wait()


def set_parameters(client, node: str = "/" + NODE_NAME, **values) -> list:
    """Sets parameters through the node's SetParameters service (a real call from the client's node);
    one SetParametersResult per value, in order."""
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    kinds = {bool: (ParameterType.PARAMETER_BOOL, "bool_value"),
             int: (ParameterType.PARAMETER_INTEGER, "integer_value"),
             float: (ParameterType.PARAMETER_DOUBLE, "double_value"),
             str: (ParameterType.PARAMETER_STRING, "string_value")}
    service = client.node.create_client(SetParameters, f"{node}/set_parameters")
    try:
        assert service.wait_for_service(timeout_sec=10), f"{node}/set_parameters is not available"
        results = []
        for name, value in values.items():  # one call per value: a refused one leaves the others alone
            kind, field = kinds[type(value)]
            parameter = Parameter(name=name, value=ParameterValue(type=kind, **{field: value}))
            future = service.call_async(SetParameters.Request(parameters=[parameter]))
            assert client.wait_for(future.done, 10), f"no answer from {node}/set_parameters"
            results.append(future.result().results[0])
        return results
    finally:
        client.node.destroy_client(service)


def new_results(client, seen: int) -> list:
    with client.lock:
        return list(client.results[seen:])


def wait_for_status(client, condition: Callable[[dict], bool], timeout_s: float,
                    repeat: Optional[Callable[[], None]] = None, repeat_s: float = 0.2,
                    since: int = 0) -> Optional[dict]:
    """The first status (a lisa_ros.client.status_from_diagnostic dict, collected so far from index
    `since` or arriving within timeout_s) that meets `condition`; `repeat()` runs every repeat_s
    meanwhile (e.g. to publish a best-effort message again)."""
    deadline = time.monotonic() + timeout_s
    next_repeat = 0.0
    while True:
        with client.lock:
            found = next((s for s in client.statuses[since:] if condition(s)), None)
        if found is not None or time.monotonic() > deadline:
            return found
        if repeat is not None and time.monotonic() >= next_repeat:
            repeat()
            next_repeat = time.monotonic() + repeat_s
        time.sleep(0.01)


def error_reported(fragment: str) -> Callable[[dict], bool]:
    """A condition for wait_for_status: the status's last error holds `fragment`."""
    return lambda status: fragment in (status["last_error"] or "")


def collect_every_result(client, topic: str = "/" + DEFAULT_NAMES["result_topic"]) -> list:
    """A keep-all reliable subscription on the node's result topic (the client's own keeps the last 100):
    the list every outcome is appended to, under client.lock."""
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    from lisa_ros.msg import SegmentationResult

    received: list = []

    def store(message):
        with client.lock:
            received.append(message)
    client.node.create_subscription(SegmentationResult, topic, store,
                                    QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE))
    return received


def keep_all_query_publisher(client, topic: str = "/" + DEFAULT_NAMES["query_topic"]):
    """A keep-all reliable instruction publisher: the client's keeps the last 100, and a burst of more
    overwrites ones the node has not acknowledged yet (measured: 16 of 400 lost in transit)."""
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    publisher = client.node.create_publisher(
        String, topic, QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE))
    assert client.wait_for(lambda: publisher.get_subscription_count() > 0, 10), f"no subscriber on {topic}"
    return publisher
