"""The Query action on the CPU with the shipped demo model: time to the first streamed token against
the time to the whole answer, and how soon a cancel mid-answer ends the goal.

    tools/with_env.sh python bench/bench_action.py [--goals 10] [--out bench/results_node.md]

Runs the real node (its own process, default parameters, empty model_path: models/demo) and a camera
of the demo's scenes from this process, over DDS on this machine only; each goal is timed here, from
sending it to its first "generating" feedback and to its result. Cancels are sent after the third
generated token of an answer that may run to 256 tokens. Appends a dated section to the results file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench_node import _ms  # noqa: E402
from ros_support import child_env, reserved_domain_id  # noqa: E402

INSTRUCTIONS = ("Which shape would roll?", "the red one", "What has the most corners?", "the smallest shape")
CANCEL_AFTER_TOKENS = 3
LONG_ANSWER = 256


@contextlib.contextmanager
def node_with_client(work: Path, parameters: dict, client_name: str, camera: bool = True):
    """(node process, PerceptionClient): the node as its own process with `parameters` and a client in
    this one, on a ROS domain of their own, discovery on this machine only; the node is stopped after."""
    import rclpy
    from rclpy.context import Context

    from lisa_ros.client import PerceptionClient
    from lisa_ros.process import node_command, start_node

    with reserved_domain_id() as domain_id:
        env = child_env(domain_id, work / "ros_log")
        os.environ.update({key: env[key] for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE",
                                                     "ROS_LOG_DIR")})
        node = start_node(node_command([parameters], work), env, work / "node.log")
        context = Context()
        rclpy.init(context=context)
        client = PerceptionClient(context, name=client_name, camera=camera)
        try:
            yield node, client
        finally:
            client.close()
            rclpy.shutdown(context=context)
            node.send_signal(subprocess.signal.SIGINT)
            node.wait(30)


def record(text: str, out: Path, no_record: bool) -> None:
    """Prints a results section and, unless no_record, appends it to `out`."""
    print(text)
    if not no_record:
        with open(out, "a") as results:
            results.write(text)


def run(goals: int, work: Path) -> dict:
    from lisa_ros.action import Query
    from lisa_ros.demo import load_scenes, scenes_dir
    from lisa_ros.status import Status

    with node_with_client(work, {"cpu_threads": 1, "max_image_age": 10.0}, "bench_action") as (_, client):
        client.wait_for_node(timeout_s=120)
        scene = load_scenes(scenes_dir())[0]
        assert client.wait_for(lambda: client.image_pub.get_subscription_count() > 0, 30)
        first, whole, tokens, cancels = [], [], [], []
        for index in range(goals):
            client.publish_frame(scene.image, time.time_ns())
            time.sleep(0.2)
            feedback = []
            sent = time.monotonic()
            handle = client.send_goal(Query.Goal(query=INSTRUCTIONS[index % len(INSTRUCTIONS)]), feedback)
            result = client.goal_result(handle)
            done = time.monotonic()
            if result.status != Status.OK:
                raise RuntimeError(f"goal failed: {result.error}")
            generating = [t for t, m in feedback if m.stage == m.STAGE_GENERATING]
            first.append(generating[0] - sent)
            whole.append(done - sent)
            tokens.append(len(generating))
        for _ in range(goals):
            client.publish_frame(scene.image, time.time_ns())
            time.sleep(0.2)
            feedback = []
            handle = client.send_goal(Query.Goal(query=INSTRUCTIONS[0], max_new_tokens=LONG_ANSWER), feedback)

            def generated():
                with client.lock:
                    return sum(1 for _, m in feedback if m.stage == m.STAGE_GENERATING)
            client.wait_for(lambda: generated() >= CANCEL_AFTER_TOKENS, 30)
            asked = time.monotonic()
            handle.cancel_goal_async()
            result = client.goal_result(handle)
            if result.status == Status.CANCELLED:
                cancels.append(time.monotonic() - asked)
        return dict(first=first, whole=whole, tokens=tokens, cancels=cancels, goals=goals)


def report(numbers: dict) -> str:
    import torch

    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "n/a"
    return "\n".join([
        f"\n## {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC: the Query action, demo model, CPU, 1 torch thread",
        "",
        f"Machine: {platform.processor() or platform.machine()}, load average {load}; Python "
        f"{platform.python_version()}, torch {torch.__version__}. bench/bench_action.py, {numbers['goals']} goals each.",
        "Times in ms, median / p95, measured in the client from sending the goal.",
        "",
        "| measure | time |",
        "|---|---|",
        f"| first streamed token (first 'generating' feedback) | {_ms(numbers['first'])} |",
        f"| whole answer (result received; {statistics.median(numbers['tokens']):.0f} tokens median) | "
        f"{_ms(numbers['whole'])} |",
        f"| cancel after {CANCEL_AFTER_TOKENS} tokens: request to CANCELLED result "
        f"({len(numbers['cancels'])} of {numbers['goals']} cancelled) | {_ms(numbers['cancels'])} |",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goals", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_node.md"))
    parser.add_argument("--no-record", action="store_true", help="print only")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        numbers = run(arguments.goals, Path(work))
    record(report(numbers), arguments.out, arguments.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
