"""Several cameras, one model: three cameras served by one node against three nodes, one per camera, on
the CPU.

    tools/with_env.sh python bench/bench_cameras.py [--rounds 5] [--bursts 10] [--model demo]
        [--out bench/results_node.md]
    tools/with_env.sh python bench/bench_cameras.py --quick --out /tmp/results.md --json /tmp/numbers.json

Setups, each node its own process (installed executable, cpu_threads 1, other parameters default):
- one node with `cameras: [cam_a, cam_b, cam_c]`, one model, max_batch_size 8 (the default), then the
  same node with max_batch_size 1 (a run-time parameter, set through its SetParameters service);
- three nodes in the namespaces cam_a, cam_b and cam_c, one camera and one model each.
The topics are the same names in both (/cam_a/camera/image_raw, /cam_a/lisa/query, ...). One camera
process publishes the three cameras: 640x480 rgb8 (camera i shows demo scene i, scaled to fit), 16UC1
depth and CameraInfo, 10 Hz each, reliable keep last 10, Fast DDS's default environment. The model:
the shipped demo model (models/demo, empty model_path), or with --model segmenting the tests' tiny
model that always segments (max_new_tokens 2). Measured from a client here:
- the node processes' memory, summed: RSS, and USS (pages no other process shares: the three nodes
  share their libraries' pages, which RSS counts three times);
- model load: node start until every node reports its model loaded;
- single queries: each camera in turn, `rounds` times; the node's latency (result.latency_s) and wall;
- bursts: three instructions published at once, one per camera, `bursts` times: time until all three
  answered here, and answers per second over the bursts.
Appends a dated section to the results file (--quick: only with --out).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:0] = [str(ROOT / "tests"), str(BENCH_DIR)]

from bench_camera import (CAMERA_MATCH_TIMEOUT_S, CPU_THREADS, MAX_NEW_TOKENS, NODE_READY_TIMEOUT_S,  # noqa: E402
                          QUERY_TIMEOUT_S, TRANSPORT_VARIABLES, demo_scene, environment, format_statuses,
                          start_camera, start_node, status_counts, transport_env, wait_started)
from bench_node import _ms, versions  # noqa: E402
from lisa_ros.parameters import NODE_NAME, PARAMETERS_BY_NAME  # noqa: E402
from ros_support import child_env, reserved_domain_id, stop_process  # noqa: E402

CAMERAS = ("cam_a", "cam_b", "cam_c")
CAMERA_RATE_HZ = 10.0
ONE_NODE, THREE_NODES = "one node, 3 cameras", "3 nodes, 1 camera each"
BATCH_SIZES = (PARAMETERS_BY_NAME["max_batch_size"].default, 1)  # the default, then one at a time
CAMERA_LIMIT_S = 900.0  # the camera process ends by itself after this, should this process die
BURST_PAUSE_S = 0.2


def node_memory(pids: Sequence[int]) -> tuple[int, int]:
    """(RSS, USS) in bytes, summed over the processes and their children."""
    import psutil

    rss = uss = 0
    for pid in pids:
        process = psutil.Process(pid)
        for member in [process, *process.children(recursive=True)]:
            info = member.memory_full_info()
            rss, uss = rss + info.rss, uss + info.uss
    return rss, uss


def single_queries(clients: dict, texts: dict, rounds: int) -> dict:
    """Each camera's instruction in turn, `rounds` times, one at a time."""
    results, walls, missing = [], [], 0
    for _ in range(rounds):
        for camera, client in clients.items():
            sent = time.monotonic()
            try:
                results.append(client.query(texts[camera], QUERY_TIMEOUT_S))
                walls.append(time.monotonic() - sent)
            except TimeoutError:
                missing += 1
    return dict(results=results, walls=walls, missing=missing)


def burst(clients: dict, texts: dict) -> tuple[list, Optional[tuple[float, float]]]:
    """One instruction per camera published back to back; (their results, (first, last): times from
    the first sent to the first and to the last answer received; None when one got no answer within
    QUERY_TIMEOUT_S)."""
    from std_msgs.msg import String

    seen = {}
    for camera, client in clients.items():
        with client.lock:
            seen[camera] = len(client.results)
    sent_ns = time.time_ns()
    for camera, client in clients.items():
        client.query_pub.publish(String(data=texts[camera]))
    answers: dict = {}

    def all_answered() -> bool:
        for camera, client in clients.items():
            with client.lock:
                found = [(r, t) for r, t in zip(client.results[seen[camera]:], client.result_times[seen[camera]:])
                         if not r.tracked and r.query == texts[camera].strip()]
            if found:
                answers[camera] = found[0]
        return len(answers) == len(clients)
    done = next(iter(clients.values())).wait_for(all_answered, QUERY_TIMEOUT_S)
    results = [result for result, _ in answers.values()]
    arrivals = [(arrived - sent_ns) / 1e9 for _, arrived in answers.values()]
    return results, (min(arrivals), max(arrivals)) if done else None


def bursts(clients: dict, texts: dict, repeats: int) -> dict:
    results, firsts, times, missing = [], [], [], 0
    for _ in range(repeats):
        answered, elapsed = burst(clients, texts)
        results += answered
        missing += len(clients) - len(answered)
        if elapsed is not None:
            firsts.append(elapsed[0])
            times.append(elapsed[1])
        time.sleep(BURST_PAUSE_S)
    return dict(results=results, firsts=firsts, times=times, missing=missing)


def measure_setup(setup: str, parameters: dict, work: Path, domain_id: int, height: int, width: int,
                  rounds: int, repeats: int) -> list[dict]:
    """One setup's rows: a row per batch size for one node, one row for three nodes."""
    import rclpy
    from rclpy.context import Context

    from hardening_support import set_parameters
    from lisa_ros.client import PerceptionClient

    work.mkdir(parents=True)
    env = transport_env(child_env(domain_id, work / "ros_log"), "")
    started = time.monotonic()
    if setup == ONE_NODE:
        nodes = [start_node({**parameters, "cameras": list(CAMERAS)}, work, env)]
    else:
        nodes = [start_node(parameters, work, env, namespace=camera) for camera in CAMERAS]
    camera = None
    context = Context()
    with environment({key: env[key] for key in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOG_DIR")},
                     TRANSPORT_VARIABLES):
        rclpy.init(context=context, domain_id=domain_id)
        clients = {name: (PerceptionClient(context, name=f"bench_{name}", camera=False, camera_name=name)
                          if setup == ONE_NODE else
                          PerceptionClient(context, namespace=name, name="bench_client", camera=False))
                   for name in CAMERAS}
    rows = []
    try:
        for client in clients.values():
            client.wait_for_node(NODE_READY_TIMEOUT_S)
        load_s = time.monotonic() - started
        report = work / "camera.jsonl"
        camera = start_camera(env, report, work / "camera.log", height, width, CAMERA_LIMIT_S, reliable=True,
                              cameras=CAMERAS, rate=CAMERA_RATE_HZ)
        wait_started(camera, report, CAMERA_MATCH_TIMEOUT_S + 30)
        for client in clients.values():
            if not client.wait_for(lambda: client.frames_received() > 0, 10.0):
                raise RuntimeError(f"{client.camera_name or client.node_path}: the node receives no frames")
        texts = {name: demo_scene(index).instruction for index, name in enumerate(CAMERAS)}
        single_queries(clients, texts, 1)  # warm-up: first calls into torch are slower
        for batch_size in (BATCH_SIZES if setup == ONE_NODE else BATCH_SIZES[:1]):
            if setup == ONE_NODE:
                outcome, = set_parameters(clients[CAMERAS[0]], "/" + NODE_NAME, max_batch_size=batch_size)
                if not outcome.successful:
                    raise RuntimeError(f"max_batch_size {batch_size} refused: {outcome.reason}")
            singles = single_queries(clients, texts, rounds)
            together = bursts(clients, texts, repeats)
            rss, uss = node_memory([node.pid for node in nodes])
            answered = sum(len(r["results"]) for r in (singles, together))
            rows.append(dict(
                setup=setup, batch_size=batch_size, processes=len(nodes), rss=rss, uss=uss, load_s=load_s,
                asked=len(CAMERAS) * (rounds + repeats), answered=answered,
                statuses=status_counts(singles["results"] + together["results"],
                                       singles["missing"] + together["missing"]),
                single_node=[r.latency_s for r in singles["results"] if r.success], single_wall=singles["walls"],
                burst_first_s=together["firsts"], burst_s=together["times"],
                burst_queries_per_s=(len(together["results"]) / sum(together["times"])
                                     if together["times"] else 0.0)))
    finally:
        if camera is not None:
            stop_process(camera)
        for client in clients.values():
            client.close()
        context.try_shutdown()
        for node in nodes:  # all asked at once: each takes a moment to close
            node.process.send_signal(signal.SIGINT)
        exits = [stop_process(node, 20) for node in nodes]
    for row in rows:
        row["node_exits"] = exits
    return rows


def format_report(machine: str, model: str, height: int, width: int, rounds: int, repeats: int,
                  rows: list[dict]) -> str:
    mib = 1024 * 1024
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: three cameras, one node or three "
        "(bench/bench_cameras.py)\n",
        f"Machine: {machine}.",
        f"Model: {model}; CPU, cpu_threads {CPU_THREADS} per node. Cameras: {len(CAMERAS)} x {width}x{height} "
        f"rgb8 + depth + CameraInfo at {CAMERA_RATE_HZ:.0f} Hz each (one camera process, reliable keep last 10, "
        f"default Fast DDS environment). Single queries: each camera in turn, {rounds} rounds; bursts: "
        f"{len(CAMERAS)} instructions published at once (one per camera), {repeats} times. Times in ms, "
        "median / p95; `node` = result.latency_s, `wall` = sent to answered here. Memory after the queries; "
        "USS = pages no other process shares.\n",
        "| setup | max_batch_size | node processes | RSS total (MiB) | USS total (MiB) | model load (s) | "
        "single query node | single query wall | burst of 3: first answer | burst of 3: all answered | "
        "answers/s in bursts | "
        "answered / asked (statuses) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setup']} | {row['batch_size']} | {row['processes']} | {row['rss'] / mib:.0f} | "
            f"{row['uss'] / mib:.0f} | {row['load_s']:.1f} | {_ms(row['single_node'])} | "
            f"{_ms(row['single_wall'])} | {_ms(row['burst_first_s'])} | {_ms(row['burst_s'])} | "
            f"{row['burst_queries_per_s']:.2f} | "
            f"{row['answered']} / {row['asked']} ({format_statuses(row['statuses'])}) |")
    return "\n".join(lines) + "\n"


MODELS = {"demo": "the shipped demo model (models/demo, empty model_path)",
          "segmenting": f"the tests' tiny model that always segments (max_new_tokens {MAX_NEW_TOKENS})"}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="single queries per camera")
    parser.add_argument("--bursts", type=int, default=10, help="bursts of one query per camera")
    parser.add_argument("--model", choices=tuple(MODELS), help="default: demo (--quick: segmenting)")
    parser.add_argument("--quick", action="store_true", help="320x240 frames, 1 round, 2 bursts (for CI)")
    parser.add_argument("--out", type=Path, help="results file to append to (default bench/results_node.md; "
                        "--quick: none)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    arguments = parser.parse_args(argv)
    height, width, rounds, repeats = (240, 320, 1, 2) if arguments.quick else (480, 640, arguments.rounds,
                                                                               arguments.bursts)
    model = arguments.model or ("segmenting" if arguments.quick else "demo")
    out = arguments.out or (None if arguments.quick else ROOT / "bench" / "results_node.md")
    machine = versions()
    with tempfile.TemporaryDirectory(prefix="bench_cameras_") as work, reserved_domain_id() as domain_id:
        parameters = {"cpu_threads": CPU_THREADS}
        if model == "segmenting":
            from node_support import write_segmenting_model

            parameters.update(model_path=str(write_segmenting_model(Path(work) / "model")),
                              max_new_tokens=MAX_NEW_TOKENS)
        rows = []
        for index, setup in enumerate((ONE_NODE, THREE_NODES)):
            rows += measure_setup(setup, parameters, Path(work) / f"setup_{index}", domain_id, height, width,
                                  rounds, repeats)
            print(f"{setup}: done", file=sys.stderr)
    report = format_report(machine, MODELS[model], height, width, rounds, repeats, rows)
    print(report)
    if out is not None:
        with open(out, "a") as file:
            file.write(report)
    numbers = dict(machine=machine, model=model, height=height, width=width, rounds=rounds, bursts=repeats,
                   rows=rows)
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(numbers, indent=1))
    return numbers


if __name__ == "__main__":
    main()
    sys.exit(0)
