"""A query that reached the node's subscription but was not taken yet when the node closes (a signal
between its arrival and the executor's next turn) still gets its one answer: SHUTTING_DOWN.

The node runs in this process, in an executor that never spins before close, so every query is still
waiting in the subscription when close() runs: without the drain at close none would be answered. The
slow executor stands for a host whose cores are busy: each turn takes 60 ms, so a drain of fixed length
(0.1 s) answers at most two of the three queries.
"""

import time

import pytest

from lisa_ros.parameters import DEFAULT_NAMES
from lisa_ros.status import Status
from ros_support import ros_session


@pytest.mark.parametrize("turn_delay_s", [0.0, 0.06], ids=["idle_host", "busy_host"])
def test_queries_not_taken_yet_at_close_are_answered_shutting_down(tmp_path, turn_delay_s):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from std_msgs.msg import String

    from lisa_ros.client import PerceptionClient
    from lisa_ros.perception_node import PerceptionNode

    with ros_session(tmp_path) as ros:
        node = PerceptionNode(context=ros["context"], parameter_overrides=[Parameter("autostart", value=False)])
        class Executor(SingleThreadedExecutor):
            def spin_once(self, timeout_sec=None):
                time.sleep(turn_delay_s)
                super().spin_once(timeout_sec=timeout_sec)

        executor = Executor(context=ros["context"])
        executor.add_node(node)
        client = PerceptionClient(ros["context"], name="shutdown_user", camera=False)
        try:
            assert client.wait_for(lambda: client.query_pub.get_subscription_count() > 0
                                   and client.node.count_publishers(DEFAULT_NAMES["result_topic"]) > 0, 10)
            texts = [f"before close {index}: where is the cup?" for index in range(3)]
            for text in texts:
                client.query_pub.publish(String(data=text))
            time.sleep(0.5)  # delivered to the node's subscription; nothing has taken them

            node.close()

            def outcomes():
                with client.lock:
                    return [r for r in client.results if r.query in texts]

            assert client.wait_for(lambda: len(outcomes()) >= len(texts), 5), outcomes()
            time.sleep(0.2)  # a second answer to any query would arrive by now
            answered = outcomes()
            assert sorted(r.query for r in answered) == sorted(texts)
            assert all(r.status == Status.SHUTTING_DOWN and r.error.startswith("node shutting down")
                       for r in answered), [(r.status, r.error) for r in answered]
        finally:
            client.close()
            executor.shutdown(timeout_sec=1.0)
            node.destroy_node()
