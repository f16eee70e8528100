"""Runs the `lisa_perception` node: lib/lisa_ros/perception_node, or `python -m lisa_ros.node`.

With `autostart` (the default) the node is configured (the model loaded) and activated before it
spins; otherwise it waits in the unconfigured state for its lifecycle transitions.

The signal handlers go in before the heavy imports (torch alone takes seconds), so SIGINT or SIGTERM
at any moment, start-up included, ends the process with exit code 0 and no traceback.
"""

import os
import signal
import sys
import threading


def main(args=None) -> int:
    """Runs the node until SIGINT or SIGTERM, then exits the process with code 0; returns 2 when a
    parameter is unusable."""
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stop.set())

    import rclpy
    from rclpy.exceptions import ParameterException
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from rclpy.lifecycle import TransitionCallbackReturn

    from lisa_ros.parameters import NODE_NAME
    from lisa_ros.perception_node import PerceptionNode

    if stop.is_set():
        return 0
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = PerceptionNode(abort=stop)
    except ParameterException as error:
        print(f"[{NODE_NAME}] cannot start: {error}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    if node.get_parameter("autostart").value and not stop.is_set():
        if node.trigger_configure() == TransitionCallbackReturn.SUCCESS and not stop.is_set():
            node.trigger_activate()
    while not stop.is_set():
        try:
            executor.spin_once(timeout_sec=0.1)
        except Exception as error:  # one callback failing (e.g. undecodable message) must not end the node
            node.report_error(f"callback failed: {type(error).__name__}: {error}")
    node.close()
    executor.shutdown(timeout_sec=0.5)
    node.destroy_node()
    rclpy.try_shutdown()
    # Everything is closed. The interpreter's own teardown of torch and transformers takes seconds,
    # and aborts when an abandoned inference is still inside torch: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
